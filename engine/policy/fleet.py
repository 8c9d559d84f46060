"""Running in a fleet: OPA's configuration file, policy from bundles, decisions to a collector.

OPA's own Go packages do OPA's protocols, inside the engine library
(engine/policy/native/fleet.go, upload.go): its plugin manager reads the configuration
(services and their credentials, keys, labels), its downloader pulls bundles (ETag, polling,
long polling) and verifies their signatures, its status plugin reports, and its
decision_logs plugin masks decisions by the policy before they are spooled on disk and
uploaded in OPA's format. This module is the Python side:

- `load_config` reads the file (YAML or JSON, `${VAR}` from the environment, as OPA does)
  and refuses every key this engine does not run, naming it, before anything starts.
- `Fleet` starts the plugins and runs one thread that takes their events: each bundle
  downloaded is handed to the event loop, validated and activated exactly as policy
  directories are (`Policy.load`: schema, OPA's compile, data.mcp.load_errors), and the
  verdict goes back to the downloader and the status plugin. A refused bundle leaves the
  running revision serving. Before that, what only a bundle can get wrong is refused: a
  file path that leaves the bundle, a policy with no decision for a plain call (data
  without the Rego), other contents under the revision already running.
- `Fleet.decision` queues a decision for the collector (`Fleet.result_decision` a decision
  on a tool's result: path mcp/result_decision, never the result itself); a feeder thread
  hands them to the library in batches, never on the event loop.
- `read_bundle_file` reads (and verifies) a bundle file, for `--bundle FILE`.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import yaml

from engine.errors import PolicyRejected, PolicyUnavailable
from engine.models import Decision, PolicyResult, ResultDecision
from engine.policy import schema as policy_schema
from engine.policy.inprocess import (
    ADMIN_TIMEOUT,
    DECISION_QUERY,
    OK,
    UNDEFINED,
    _Buffer,
    _library,
)
from engine.policy.result import checked_result
from engine.policy.source import MODULE_PREFIX, PolicyBundle, merge_data
from engine.state.decision_log import arguments_sha256, redact

log = logging.getLogger(__name__)

# mcp_fleet_* status codes (engine/policy/native/fleet.go).
FLEET_OK, FLEET_TIMEOUT, FLEET_STOPPED, FLEET_ERROR = range(4)
NEXT_WAIT_MS = 500
# Decisions waiting for the feeder thread; past this they are dropped and counted (the
# library's spool on disk is the buffer that rides out a collector's outage).
MAX_QUEUED = 100_000
FEED_BATCH = 500
DECISION_PATH = "mcp/decision"
RESULT_DECISION_PATH = "mcp/result_decision"
_ENV = re.compile(r"\$\{([^}]+)\}")
# Characters of a bundle's file path that would change the URL it is pushed to on an OPA
# server (the REST engine names modules by their path), or that no file name needs.
_UNSAFE_PATH = re.compile(r"[?#%\\\x00-\x1f\x7f]")
# A plain call of a tool no policy knows, evaluated once on each bundle before it is
# activated: the decision must be defined (and well formed) for it.
PROBE_INPUT = {
    "tool": {"server": "mcp-policy.probe", "name": "probe", "arguments": {}},
    "principal": {"agent_id": "probe", "session_id": "probe", "roles": []},
    "request": {"id": "probe", "time": "1970-01-01T00:00:00Z", "transport": "http"},
    "context": {},
}


class ConfigRejected(ValueError):
    """The OPA configuration file cannot be used: the message names the file and key."""


def _schema_path() -> Path:
    from engine.settings import PROJECT_ROOT

    return PROJECT_ROOT / "schema" / "opa-config.schema.json"


def load_config(path: Path) -> dict[str, Any]:
    """OPA's configuration file as a dict, checked against the keys this engine runs."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigRejected(f"{path}: {exc.strerror or exc}") from exc
    values: dict[str, str] = {}  # what ${NAME} became, for messages that must not show it
    unset: set[str] = set()

    def env(match: re.Match[str]) -> str:
        value = os.environ.get(match.group(1), "")
        if value:
            values[value] = match.group(1)
        else:
            unset.add(match.group(1))
        return value

    def rejected(message: str) -> ConfigRejected:
        message = _hidden(message, values)
        if unset:
            names = ", ".join(f"${{{name}}}" for name in sorted(unset))
            message += f" ({names}: not set in the environment, or empty)"
        return ConfigRejected(message)

    text = _ENV.sub(env, text)
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # From None: YAML's message (and so the chained exception) quotes the text, and
        # the values of ${NAME}s (bearer tokens) are in it.
        raise rejected(f"{path}: not YAML or JSON: {_yaml_problem(exc)}") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigRejected(f"{path}: the top level must be a mapping")
    schema = json.loads(_schema_path().read_text("utf-8"))
    problems = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(config),
        key=lambda e: list(map(str, e.absolute_path)),
    )
    if problems:
        raise rejected("; ".join(_config_problem(e, path) for e in problems[:5]))
    return config


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what, without the lines around it that YAML's own message shows."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return type(error).__name__
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + "; ".join(str(part) for part in (error.context, error.problem) if part)


def _hidden(message: str, values: dict[str, str]) -> str:
    """`message` with every value taken from the environment shown as its ${NAME}, and any
    quoted part of one (YAML quotes an alias name, say) left out."""
    for value, name in sorted(values.items(), key=lambda item: -len(item[0])):
        message = message.replace(value, f"${{{name}}}")

    def quoted(match: re.Match[str]) -> str:
        part = match.group(2)
        return "'…'" if any(part in value for value in values) else match.group(0)

    return re.sub(r"(['\"])([^'\"]{3,})\1", quoted, message)


def _config_problem(error: jsonschema.ValidationError, path: Path) -> str:
    if error.validator == "oneOf" and error.context:
        # services is a map or a list: say what is wrong in the form that was written.
        written = [e for e in error.context if e.validator != "type" or e.relative_path]
        error = jsonschema.exceptions.best_match(written or error.context)
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        allowed = set(schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed)
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        line = policy_schema.locate([*error.absolute_path, unknown[0]], [path]) if unknown else None
        supported = ", ".join(sorted(allowed)) or "none"
        return f"{line or path}: {names}: not a key this engine runs (supported here: {supported})"
    line = policy_schema.locate(list(error.absolute_path), [path])
    return f"{line or path}: {where or '(top level)'}: {error.message}"


@dataclass(frozen=True)
class BundleVerification:
    """How a bundle file must be signed (`opa run --verification-key` and friends)."""

    key: str  # a PEM public key (or the path of one), or an HMAC secret
    key_id: str = "default"
    algorithm: str = "RS256"
    scope: str = ""

    def as_json(self) -> dict[str, str]:
        return {
            "key": self.key,
            "keyid": self.key_id,
            "algorithm": self.algorithm,
            "scope": self.scope,
        }


def _call_json(function: Any, *args: Any) -> tuple[int, bytes]:
    lib = _library()
    out, size = _Buffer(), ctypes.c_size_t()
    status: int = function(*args, ctypes.byref(out), ctypes.byref(size))
    return status, lib._take(out, size)


@functools.cache
def _typed() -> Any:
    """The library's fleet functions, typed once."""
    lib = _library()._lib
    out: Any = ctypes.POINTER(_Buffer)
    size: Any = ctypes.POINTER(ctypes.c_size_t)
    text: list[Any] = [ctypes.c_char_p, ctypes.c_size_t]
    lib.mcp_fleet_start.argtypes = [*text, *text, out, size]
    lib.mcp_fleet_next.argtypes = [ctypes.c_int, out, size]
    lib.mcp_fleet_bundle_done.argtypes = text
    lib.mcp_fleet_use.argtypes = [ctypes.c_size_t, out, size]
    lib.mcp_fleet_stats.argtypes = [out, size]
    lib.mcp_fleet_stop.argtypes = [ctypes.c_int]
    lib.mcp_fleet_stop.restype = None
    lib.mcp_fleet_log.argtypes = [*text, out, size]
    lib.mcp_bundle_read.argtypes = [*text, *text, out, size]
    lib.mcp_fleet_check_events.argtypes = [*text, out, size]
    for name in (
        "mcp_fleet_start",
        "mcp_fleet_next",
        "mcp_fleet_bundle_done",
        "mcp_fleet_use",
        "mcp_fleet_stats",
        "mcp_fleet_log",
        "mcp_bundle_read",
        "mcp_fleet_check_events",
    ):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _policy_bundle(modules: dict[str, str], data: Any, revision: str) -> PolicyBundle:
    """A bundle's contents, its module ids its file paths (OPA's: `/x.rego`); PolicyRejected
    for a path that could name a module outside the bundle."""
    if not isinstance(data, dict):
        data = {}
    ids = {_module_path(path): text for path, text in modules.items()}
    return PolicyBundle(modules=ids, data=data, revision=revision)


def _module_path(path: str) -> str:
    """A module's file path in a bundle, without its leading `/`, when it stays inside the
    bundle: a `..` or `.` segment, an empty one, or a character that changes a URL is
    refused (the REST engine pushes each module to OPA's /v1/policies/<id>, where
    `mcp-policy/bundles/b/../../../x.rego` would land outside the modules it manages)."""
    relative = path.lstrip("/")
    if any(part in ("", ".", "..") for part in relative.split("/")) or _UNSAFE_PATH.search(
        relative
    ):
        message = f"bundle file path {path!r} is not a plain path inside the bundle"
        raise PolicyRejected(message, [message])
    return relative


def read_bundle_file(path: Path, verification: BundleVerification | None) -> PolicyBundle:
    """The bundle file at `path` (an `opa build` tarball), verified when asked; raises
    PolicyRejected with OPA's reason when it cannot be read or does not verify."""
    lib = _typed()
    name = str(path).encode()
    check = json.dumps(verification.as_json()).encode() if verification else b""
    status, body = _call_json(lib.mcp_bundle_read, name, len(name), check, len(check))
    if status != FLEET_OK:
        message = f"bundle {path}: {body.decode('utf-8', 'replace')}"
        raise PolicyRejected(message, [message])
    read = json.loads(body)
    return _policy_bundle(read.get("modules") or {}, read.get("data"), read.get("revision", ""))


def check_events(events: list[Any]) -> int:
    """Read decision-log events with OPA's own type (EventV1), refusing a field OPA does not
    know, as a collector built on OPA's code reads them; the count, or ValueError naming
    the first problem."""
    body = json.dumps(events).encode()
    status, answer = _call_json(_typed().mcp_fleet_check_events, body, len(body))
    if status != FLEET_OK:
        raise ValueError(answer.decode("utf-8", "replace"))
    return int(answer)


@dataclass
class BundleState:
    """One configured bundle, as /readyz and /metrics show it."""

    name: str
    revision: str | None = None  # active
    activated_at: float | None = None
    refused: int = 0
    download_errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    contents: PolicyBundle | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "active_revision": self.revision,
            "activated_at": _iso(self.activated_at),
            "refused": self.refused,
            "download_errors": self.download_errors,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
        }


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


@dataclass
class UploadCounters:
    queued_here: int = 0
    dropped_here: int = 0
    feed_errors: int = 0
    last_feed_error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


_Queued = tuple[Decision, dict[str, Any], "PolicyResult | None", float, dict[str, str]]


@dataclass(frozen=True)
class _QueuedResult:
    """A decision on a tool's result, as queued: its input is the policy's input without
    the result (`result_info` says its size), and `result_sha256` names the result."""

    decision: ResultDecision
    input_doc: dict[str, Any]
    result_sha256: str
    elapsed: float
    bundles: dict[str, str]


Activate = Callable[[PolicyBundle, dict[str, str]], Coroutine[Any, Any, None]]


class Fleet:
    """OPA's plugins for this replica: bundles, status, decision-log upload."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        replica_id: str,
        spool_dir: Path,
        arguments: str = "hash",
        redact: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        # How tool arguments go into uploaded events: as in the local decision log.
        self.arguments = arguments
        self.redact = redact
        self.replica_id = replica_id
        self.spool_dir = spool_dir
        self.bundles = {name: BundleState(name) for name in sorted(config.get("bundles") or {})}
        self.uploads_enabled = bool(config.get("decision_logs"))
        self.uploads = UploadCounters()
        self._activate: Activate | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: threading.Thread | None = None
        self._feeder: threading.Thread | None = None
        self._queue: queue.Queue[_Queued | _QueuedResult | None] = queue.Queue()
        self._running = False

    @property
    def pulls_policy(self) -> bool:
        return bool(self.bundles)

    def start(self, activate: Activate) -> None:
        """Start OPA's plugins (ConfigRejected naming OPA's complaint) and the threads."""
        lib = _typed()
        self._activate = activate
        self._loop = asyncio.get_running_loop()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        config = json.dumps(self.config).encode()
        options = json.dumps({"id": self.replica_id, "spool_dir": str(self.spool_dir)}).encode()
        status, body = _call_json(lib.mcp_fleet_start, config, len(config), options, len(options))
        if status != FLEET_OK:
            raise ConfigRejected(f"OPA configuration: {body.decode('utf-8', 'replace')}")
        self._running = True
        self._events = threading.Thread(target=self._take_events, name="fleet-events", daemon=True)
        self._events.start()
        if self.uploads_enabled:
            self._feeder = threading.Thread(target=self._feed, name="fleet-upload", daemon=True)
            self._feeder.start()

    def stop(self, timeout: float) -> None:
        """Stop: decisions queued here go to the spool, then the uploader has up to
        `timeout` seconds to send what it holds (the rest stays on disk for the next
        start), and the status plugin sends its last report."""
        if not self._running:
            return
        if self._feeder is not None:
            self._queue.put(None)
            self._feeder.join(timeout)
        self._running = False
        lib = _typed()
        lib.mcp_fleet_stop(int(timeout * 1000))
        if self._events is not None:
            self._events.join(2.0)

    def use_policy(self, bundle: PolicyBundle) -> None:
        """Mask and drop decisions with `bundle` (the policy now deciding), compiled once
        more for OPA's decision_logs plugin: data.system.log.mask / drop, as OPA does.
        Blocking (a compile): call it on a worker thread."""
        if not self._running or not self.uploads_enabled:
            return
        library = _library()
        payload = {"modules": bundle.modules, "data": bundle.data, "queries": []}
        handle = library.prepare(json.dumps(payload).encode())
        if not isinstance(handle, int):
            log.error("decision logs: the policy for masking does not compile: %s", handle[:3])
            return
        try:
            status, body = _call_json(_typed().mcp_fleet_use, handle)
        finally:
            library.release(handle)
        if status != FLEET_OK:
            log.error("decision logs: the policy for masking could not be set: %s", body.decode())

    def stats(self) -> dict[str, Any]:
        """What the library's plugins report (bundles, uploads), refreshed now."""
        if not self._running:
            return self.uploads.stats
        lib = _typed()
        status, body = _call_json(lib.mcp_fleet_stats)
        if status == FLEET_OK:
            self.uploads.stats = json.loads(body).get("decision_logs") or {}
        return self.uploads.stats

    # Bundles: the events thread.

    def _take_events(self) -> None:
        lib = _typed()
        while self._running:
            status, body = _call_json(lib.mcp_fleet_next, NEXT_WAIT_MS)
            if status == FLEET_STOPPED:
                return
            if status != FLEET_OK:
                continue
            try:
                event = json.loads(body)
                self._handle(lib, event)
            except Exception:  # the thread outlives any one event
                log.exception("fleet event could not be handled")

    def _handle(self, lib: Any, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "log":
            level = {"error": logging.ERROR, "warning": logging.WARNING}.get(
                event.get("level", ""), logging.INFO
            )
            log.log(level, "opa: %s", event.get("message", ""))
            return
        state = self.bundles.get(event.get("name", ""))
        if state is None:
            return
        if kind in ("error", "refused"):
            # The downloader retries with backoff: say each new reason once.
            if kind == "error":
                state.download_errors += 1
                reason = f"download: {event.get('message', '')}"
            else:
                state.refused += 1
                reason = f"refused: {event.get('message', '')}"
            if reason != state.last_error:
                log.error(
                    "bundle %s: %s (still serving %s)",
                    state.name,
                    reason,
                    state.revision or "nothing",
                )
            state.last_error, state.last_error_at = reason, time.time()
            return
        if kind != "bundle":
            return
        done: dict[str, Any] = {"id": event["id"], "ok": False, "revision": "", "errors": []}
        try:
            revision = self._activate_bundle(state, event)
        except PolicyRejected as exc:
            done["errors"] = exc.errors or [exc.message]
            state.refused += 1
            state.last_error = f"refused: {exc.message}"
            state.last_error_at = time.time()
            log.error(
                "bundle %s revision %s refused, still serving %s: %s",
                state.name,
                event.get("revision") or "(none)",
                state.revision or "nothing",
                exc.message,
            )
        except Exception as exc:  # noqa: BLE001 - reported to OPA's status like a refusal
            done["errors"] = [f"{type(exc).__name__}: {exc}"]
            state.refused += 1
            state.last_error = f"refused: {done['errors'][0]}"
            state.last_error_at = time.time()
            log.exception("bundle %s could not be activated", state.name)
        else:
            done.update(ok=True, revision=revision)
        reply = json.dumps(done).encode()
        lib.mcp_fleet_bundle_done(reply, len(reply))

    def _activate_bundle(self, state: BundleState, event: dict[str, Any]) -> str:
        """Validate and activate the bundle (with the other bundles' active contents) on
        the event loop; the revision now active."""
        contents = _policy_bundle(
            event.get("modules") or {}, event.get("data"), event.get("revision", "")
        )
        candidates = {
            name: (contents if name == state.name else other.contents)
            for name, other in self.bundles.items()
        }
        running = state.contents is not None and contents.revision == state.revision
        if running and state.contents != contents:
            # Decisions name the revision that gave them: one name, one policy.
            message = (
                f"revision {contents.revision} is active with other contents: a changed "
                "bundle needs a new revision"
            )
            raise PolicyRejected(message, [message])
        merged, revisions = merge_bundles(
            {name: c for name, c in candidates.items() if c is not None}
        )
        if not running and all(c is not None for c in candidates.values()):
            # Every configured bundle is in (until then, the others may bring the Rego).
            _check_decides(merged)
        assert self._loop is not None and self._activate is not None
        future = asyncio.run_coroutine_threadsafe(self._activate(merged, revisions), self._loop)
        future.result()
        if state.revision != contents.revision:
            log.info("bundle %s revision %s activated", state.name, contents.revision)
        state.contents = contents
        state.revision = contents.revision
        state.activated_at = time.time()
        return contents.revision

    # Decisions: the feeder thread.

    def decision(
        self,
        decision: Decision,
        input_doc: dict[str, Any],
        result: PolicyResult | None,
        elapsed: float,
        bundles: dict[str, str],
    ) -> None:
        """Queue one decision for the collector: one put, never blocking the event loop
        (the event is built on the feeder thread); counted when the queue is full."""
        if not self.uploads_enabled or not self._running:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            self.uploads.dropped_here += 1
            return
        self.uploads.queued_here += 1
        self._queue.put((decision, input_doc, result, elapsed, bundles))

    def result_decision(
        self,
        decision: ResultDecision,
        input_doc: dict[str, Any],
        result_sha256: str,
        elapsed: float,
        bundles: dict[str, str],
    ) -> None:
        """Queue one decision on a tool's result for the collector (`input_doc` without
        the result: it is never uploaded), as `decision` queues a call's."""
        if not self.uploads_enabled or not self._running:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            self.uploads.dropped_here += 1
            return
        self.uploads.queued_here += 1
        self._queue.put(_QueuedResult(decision, input_doc, result_sha256, elapsed, bundles))

    def _tool(self, input_doc: dict[str, Any]) -> dict[str, Any]:
        """The input's `tool`, its arguments as the local decision log keeps them."""
        tool = dict(input_doc.get("tool") or {})
        arguments = tool.get("arguments")
        if self.arguments == "redacted":
            tool["arguments"] = redact(arguments, self.redact)
        elif self.arguments == "hash":
            tool.pop("arguments", None)
            tool["arguments_sha256"] = arguments_sha256(arguments)
        return tool

    def _result_event(self, item: _QueuedResult) -> dict[str, Any]:
        decision = item.decision
        answer = decision.model_dump(mode="json", exclude={"result"}, exclude_none=True)
        answer["result_sha256"] = item.result_sha256
        doc = {k: v for k, v in item.input_doc.items() if k != "result"}
        return {
            "decision_id": decision.decision_id,
            "path": RESULT_DECISION_PATH,
            "input": {**doc, "tool": self._tool(doc)},
            "result": answer,
            "timestamp": (doc.get("request") or {}).get("time"),
            "bundles": item.bundles,
            "metrics": {"timer_mcp_policy_result_decision_ns": int(item.elapsed * 1e9)},
        }

    def _event(self, item: _Queued | _QueuedResult) -> dict[str, Any]:
        if isinstance(item, _QueuedResult):
            return self._result_event(item)
        decision, input_doc, result, elapsed, bundles = item
        tool = self._tool(input_doc)
        verdict = decision.model_dump(mode="json", exclude_none=True)
        if result is not None:
            verdict["policy"] = result.model_dump(mode="json", exclude_none=True)
        return {
            "decision_id": decision.decision_id,
            "path": DECISION_PATH,
            "input": {**input_doc, "tool": tool},
            "result": verdict,
            "timestamp": (input_doc.get("request") or {}).get("time"),
            "bundles": bundles,
            "metrics": {"timer_mcp_policy_decision_ns": int(elapsed * 1e9)},
        }

    def _feed(self) -> None:
        lib = _typed()
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < FEED_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is None for item in batch)
            items = [item for item in batch if item is not None]
            if not items:
                continue
            try:
                events = [self._event(item) for item in items]
                body = json.dumps(events, separators=(",", ":"), default=str).encode()
                status, answer = _call_json(lib.mcp_fleet_log, body, len(body))
            except Exception as exc:  # noqa: BLE001 - counted and shown, never raised
                status, answer = FLEET_ERROR, f"{type(exc).__name__}: {exc}".encode()
            if status != FLEET_OK:
                self.uploads.feed_errors += len(items)
                self.uploads.last_feed_error = answer.decode("utf-8", "replace")[:300]
                log.error("decision logs: %s", self.uploads.last_feed_error)


def _check_decides(bundle: PolicyBundle) -> None:
    """PolicyRejected unless `bundle` gives a well-formed data.mcp.decision for a plain
    call (PROBE_INPUT): a bundle of data without the policy's Rego (or with a decision
    that is not one) would deny every call, so it never replaces the policy deciding.
    A bundle OPA cannot compile passes here: its activation says why, as for any policy."""
    library = _library()
    payload = {"modules": bundle.modules, "data": bundle.data, "queries": [DECISION_QUERY]}
    handle = library.prepare(json.dumps(payload).encode())
    if not isinstance(handle, int):
        return
    try:
        probe = json.dumps(PROBE_INPUT).encode()
        status, body = library.eval(handle, 0, probe, int(ADMIN_TIMEOUT * 1e9))
    finally:
        library.release(handle)
    problem = None
    if status == UNDEFINED:
        problem = "is undefined"
    elif status != OK:
        problem = f"cannot be evaluated: {body.decode('utf-8', 'replace')[:300]}"
    else:
        try:
            checked_result(json.loads(body))
        except PolicyUnavailable as exc:
            problem = f"is malformed: {exc}"
    if problem is not None:
        message = (
            f"{DECISION_QUERY} {problem} for a plain call: the bundle does not carry the "
            "policy's Rego (rego/), or its decision rule is broken"
        )
        raise PolicyRejected(message, [message])


def merge_bundles(
    bundles: dict[str, PolicyBundle],
) -> tuple[PolicyBundle, dict[str, str]]:
    """The policy several bundles make together (modules side by side, data merged; a
    path two bundles both set is refused) and each one's revision."""
    revisions = {name: b.revision for name, b in sorted(bundles.items())}
    if len(bundles) == 1:
        ((name, only),) = bundles.items()
        return PolicyBundle(_module_ids(name, only), only.data, only.revision), revisions
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    for name, b in sorted(bundles.items()):
        modules.update(_module_ids(name, b))
        merge_data(data, json.loads(json.dumps(b.data)), f"bundle {name}: data")
    joined = ",".join(f"{name}={rev}" for name, rev in revisions.items())
    revision = "bundles:" + hashlib.sha256(joined.encode()).hexdigest()[:16]
    return PolicyBundle(modules=modules, data=data, revision=revision), revisions


def _module_ids(name: str, bundle: PolicyBundle) -> dict[str, str]:
    """The bundle's modules under ids the engine manages (an OPA server's others stay)."""
    return {f"{MODULE_PREFIX}bundles/{name}/{path}": text for path, text in bundle.modules.items()}
