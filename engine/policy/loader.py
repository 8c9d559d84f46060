"""The running policy: which bundle OPA holds, its revision, loading and reloading.

A new bundle replaces the running one only when its data matches the policy schema and
OPA accepted all of its modules; otherwise `PolicyRejected` (with the schema's or OPA's
messages) is raised, recorded as the last reload, and the running policy keeps serving.
Counters and approvals live in the state stores and are never touched by a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import PolicyRejected, PolicyUnavailable
from engine.models import PolicyResult, ResultPolicyResult
from engine.policy import schema as policy_schema
from engine.policy.fleet import BundleVerification, read_bundle_file
from engine.policy.inprocess import (
    DECISION_QUERY,
    LOAD_ERRORS_QUERY,
    RESULT_DECISION_QUERY,
    InProcessOpa,
)
from engine.policy.source import PolicyBundle, data_files, read_bundle

if TYPE_CHECKING:
    from engine.policy.rest import Opa

log = logging.getLogger(__name__)

NO_REVISION = "none"


@dataclass
class ReloadStatus:
    """What the last load or reload did; shown in /readyz."""

    time: str
    ok: bool
    revision: str
    changed: bool
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "ok": self.ok,
            "revision": self.revision,
            "changed": self.changed,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class BundleFile:
    """A bundle file (`opa build`, `mcp-policy build`) as the policy's source, verified
    with `verification` when one is given."""

    path: Path
    verification: BundleVerification | None = None

    def read(self) -> PolicyBundle:
        return read_bundle_file(self.path, self.verification)

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        try:
            stat = self.path.stat()
        except OSError:
            return ()
        return ((str(self.path), stat.st_mtime_ns, stat.st_size),)


def _files_state(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """A cheap fingerprint of the policy files: path, mtime and size of each."""
    out = []
    for root in paths:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file():
                stat = path.stat()
                out.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(out)


class Gate:
    """Many evaluations at once, or one policy change alone.

    OPA's REST API replaces modules one at a time; the gate lets every evaluation in
    flight finish and holds new ones back while a change is pushed (and, if rejected,
    rolled back), so no decision ever sees half of an old policy and half of a new one.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.asynccontextmanager
    async def evaluating(self, wait: float) -> AsyncIterator[None]:
        """Enter as an evaluation; PolicyUnavailable if a change holds the gate > `wait` s."""
        try:
            async with asyncio.timeout(wait), self._cond:
                await self._cond.wait_for(lambda: not self._writing)
                self._readers += 1
        except TimeoutError as exc:
            raise PolicyUnavailable("the policy is being replaced", kind="timeout") from exc
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writing)
            self._writing = True
            await self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._writing = False
                self._cond.notify_all()


class Policy:
    """Keeps the engine loaded with the last good bundle, and evaluates decisions with it.

    Two engines: OPA in this process (`InProcessOpa`: a load compiles the new revision
    aside and swaps it in whole, so decisions never wait and each knows the revision it
    used), or an OPA server over REST (`Opa`: modules are replaced one by one, so the gate
    holds decisions back while a change is pushed)."""

    def __init__(
        self,
        opa: Opa | InProcessOpa,
        paths: list[Path],
        schema_path: Path | None = None,
        *,
        bundle_file: BundleFile | None = None,
        pulled: bool = False,
    ) -> None:
        self.opa = opa
        self.paths = paths
        # Where the policy comes from: directories (`paths`), one bundle file, or bundles
        # pulled from a bundle server (`pulled`: handed to load() as they arrive).
        self.bundle_file = bundle_file
        self.pulled = pulled
        # Which bundles (name: revision) made each recent policy revision (none for
        # directories): what a decision's log record and uploaded event name.
        self._bundle_sets: dict[str, dict[str, str]] = {}
        # Called with each new policy once it decides (the decision-log plugin's masking).
        self.on_change: list[Callable[[PolicyBundle], Awaitable[None]]] = []
        self.bundle: PolicyBundle | None = None
        self.loaded = False
        self.last_reload: ReloadStatus | None = None
        self.reloads = {"applied": 0, "unchanged": 0, "rejected": 0}
        self._schema: dict[str, Any] | None = (
            policy_schema.load(schema_path) if schema_path is not None else None
        )
        self._lock = asyncio.Lock()
        self.gate = Gate()
        self._seen_files: tuple[tuple[str, int, int], ...] | None = None

    def note_bundles(self, revision: str, bundles: dict[str, str]) -> None:
        """Remember that policy `revision` is made of `bundles` (the last few are kept, for
        decisions still being logged under an older one)."""
        self._bundle_sets[revision] = dict(bundles)
        while len(self._bundle_sets) > 8:
            del self._bundle_sets[next(iter(self._bundle_sets))]

    def bundles_of(self, revision: str) -> dict[str, str] | None:
        """The bundles (name: revision) policy `revision` came from; None for directories."""
        return self._bundle_sets.get(revision)

    @property
    def revision(self) -> str:
        return self.bundle.revision if self.bundle is not None else NO_REVISION

    @property
    def timeout(self) -> float:
        """Deadline of one evaluation, in seconds."""
        return self.opa.timeout

    async def evaluate(self, input_doc: dict[str, Any]) -> tuple[PolicyResult, str]:
        """`data.mcp.decision` for `input_doc` and the revision it was evaluated with;
        PolicyUnavailable on any failure."""
        if isinstance(self.opa, InProcessOpa):
            return await self.opa.evaluate(input_doc)
        async with self.gate.evaluating(wait=self.opa.timeout):
            return await self.opa.evaluate(input_doc), self.revision

    async def evaluate_result(
        self, input_doc: dict[str, Any], input_json: bytes, *, in_thread: bool = False
    ) -> tuple[ResultPolicyResult, str]:
        """`data.mcp.result_decision` for the input (`input_doc`, and the same as JSON text:
        `input_json`) and the revision it was evaluated with; PolicyUnavailable on any
        failure. In this process the JSON text is evaluated as it is: inline, or with
        `in_thread` on a worker thread (a large input: the event loop is not held while OPA
        reads it); an OPA server is sent the document."""
        if isinstance(self.opa, InProcessOpa):
            if in_thread:
                return await asyncio.to_thread(self.opa.evaluate_result_json, input_json)
            return self.opa.evaluate_result_json(input_json)
        async with self.gate.evaluating(wait=self.opa.timeout):
            answer = await self.opa.evaluate_result(input_doc)
            return answer, self.revision

    async def _apply(self, bundle: PolicyBundle) -> None:
        """Make the engine run `bundle`, checked by data.mcp.load_errors, or raise
        PolicyRejected with the running policy unchanged. In this process the result
        decision is prepared beside the call's: a bundle without it loads all the same (its
        results are then blocked: `NO_RESULT_DECISION`)."""
        if isinstance(self.opa, InProcessOpa):
            await self.opa.load(
                bundle, (DECISION_QUERY, RESULT_DECISION_QUERY), check=LOAD_ERRORS_QUERY
            )
            return
        async with self.gate.changing():
            await self.opa.load(bundle)
            try:
                errors = await self.opa.load_errors()
            except BaseException:
                # Unchecked: never leave it serving under the old revision's name.
                await self._restore_running()
                raise
            if errors:
                await self._restore_running()
                raise PolicyRejected(
                    "the policy data has errors; the running policy is unchanged: "
                    + "; ".join(errors[:5]),
                    errors,
                )

    def validate(self, bundle: PolicyBundle) -> None:
        """Check the policy data against the schema; raise PolicyRejected listing problems,
        each with its file, line and most specific reason (as `mcp-policy validate` says
        them). Files are read only when there is a problem to place."""
        if self._schema is None:
            return
        if next(policy_schema.problems(bundle.data, self._schema), None) is None:
            return
        files = [] if self.pulled or self.bundle_file else data_files(self.paths)
        messages = policy_schema.explained(bundle.data, self._schema, files)
        if messages:
            raise PolicyRejected(
                "the policy data does not match the schema: " + "; ".join(messages[:5]), messages
            )

    async def _restore_running(self) -> None:
        """Put the running bundle back into the OPA server after a refused change."""
        if self.bundle is not None and self.loaded:
            await self.opa.load(self.bundle)

    async def load(self, bundle: PolicyBundle | None = None) -> str:
        """Load `bundle` (default: read from `paths`); return the revision now running."""
        async with self._lock:
            now = datetime.now(UTC).isoformat(timespec="seconds")
            try:
                if bundle is None:
                    self._seen_files = await asyncio.to_thread(self._fingerprint)
                    bundle = await asyncio.to_thread(self._read)
                changed = self.bundle is None or bundle.revision != self.bundle.revision
                if changed or not self.loaded:
                    self.validate(bundle)
                    await self._apply(bundle)
            except PolicyRejected as exc:
                self.reloads["rejected"] += 1
                self.last_reload = ReloadStatus(now, False, self.revision, False, exc.errors)
                log.error("policy rejected, still serving %s: %s", self.revision, exc.message)
                raise
            self.reloads["applied" if changed else "unchanged"] += 1
            if changed:
                log.info("policy %s loaded (%d modules)", bundle.revision, len(bundle.modules))
            self.bundle = bundle
            self.loaded = True
            self.last_reload = ReloadStatus(now, True, bundle.revision, changed)
            if changed:
                for listener in self.on_change:
                    try:
                        await listener(bundle)
                    except Exception:
                        log.exception("a listener of policy changes failed")
            return bundle.revision

    def _read(self) -> PolicyBundle:
        """The policy as its source holds it now (directories or a bundle file)."""
        if self.pulled:
            message = "the policy comes from the bundle server: it is activated as it arrives"
            raise PolicyRejected(message, [message])
        if self.bundle_file is not None:
            return self.bundle_file.read()
        return read_bundle(self.paths)

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        if self.bundle_file is not None:
            return self.bundle_file.fingerprint()
        return _files_state(self.paths)

    async def reload_if_changed(self) -> None:
        """Reload when a file under `paths` (or the bundle file) changed since the last
        read (the watcher)."""
        if self.pulled:
            return
        state = await asyncio.to_thread(self._fingerprint)
        if state == self._seen_files:
            return
        try:
            await self.load()
        except PolicyRejected:
            self._seen_files = state  # reported once; wait for the next edit
        except PolicyUnavailable as exc:
            log.warning("policy reload could not reach OPA: %s", exc)
            self._seen_files = None  # try again at the next tick

    def mark_stale(self) -> None:
        """OPA seems to have lost the policy (a restart): reload at the next chance."""
        self.loaded = False

    async def ensure_loaded(self) -> None:
        """Push the last good bundle again when OPA lost it."""
        if self.loaded or self.bundle is None:
            return
        try:
            await self.load(self.bundle)
        except PolicyUnavailable as exc:
            log.warning("policy reload into OPA failed: %s", exc)
