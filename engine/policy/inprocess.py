"""OPA's own evaluator inside this process: a Go shared library called through ctypes.

A drop-in for the REST evaluator (`rest.Opa`): the same `open`/`close`/`healthy`/`load`
and the same errors, every failure of `evaluate` a `PolicyUnavailable` with the same
kinds and messages. The library (engine/policy/native/evaluator.go, built by `make tools`)
compiles a bundle once into a handle; a decision is one ctypes call on that handle, which
releases the GIL while OPA evaluates, so other threads and the event loop's callers keep
running.

A load prepares the new handle on a worker thread, then swaps the current
(handle, revision) pair in one assignment: an evaluation reads the pair once, so its
decision is always labelled with the revision that made it. Handles are never reused;
an evaluation that picked up a handle just released simply retries on the new one.

Loading the library starts Go's runtime in this process. It adds signal handlers only for
synchronous signals, SIGPIPE and SIGURG (Python's SIGINT/SIGTERM handling is unchanged),
and it does not survive fork(): a forked child gets PolicyUnavailable, never a hang.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.errors import MAX_MESSAGE_CHARS, PolicyRejected, PolicyUnavailable, bounded
from engine.models import PolicyResult, ResultPolicyResult
from engine.policy.opa_process import (
    CHECKOUT_ROOT,
    IN_CHECKOUT,
    OPA_BINARY_ENV,
    OPA_VERSION,
    ToolMissing,
)
from engine.policy.result import (
    NO_RESULT_DECISION,
    checked_result,
    checked_result_decision,
    consistent,
)
from engine.policy.source import PolicyBundle

LIBRARY_ENV = "MCP_POLICY_OPA_LIBRARY"
# Deadline of the load-time checks (they read all of the policy data once).
ADMIN_TIMEOUT = 10.0
LIBRARY_NAME = "libmcppolicy_opa.so"
CHECKOUT_LIBRARY = CHECKOUT_ROOT / ".tools" / "lib" / LIBRARY_NAME
# The Go source is package data (pyproject.toml): an installed copy can build the library
# in place, here, where it is then found.
NATIVE_DIR = Path(__file__).resolve().parent / "native"
PACKAGED_LIBRARY = NATIVE_DIR / LIBRARY_NAME
GO_BUILD = "go build -buildmode=c-shared -trimpath -o"
if IN_CHECKOUT:
    BUILD_HINT = (
        f"run `make tools`, or `cd engine/policy/native && {GO_BUILD} {CHECKOUT_LIBRARY} .`, "
        f"or set {LIBRARY_ENV}"
    )
else:
    BUILD_HINT = (
        f"set MCP_POLICY_ENGINE=opa (with OPA {OPA_VERSION} on PATH or in "
        f"{OPA_BINARY_ENV}), or build the library with Go: `cd {NATIVE_DIR} && "
        f"{GO_BUILD} {LIBRARY_NAME} .`, or set {LIBRARY_ENV}"
    )
DECISION_QUERY = "data.mcp.decision"
# The decision on a tool's result (prepared beside DECISION_QUERY at every load of a
# serving policy: `Policy._apply`); a policy without it still loads.
RESULT_DECISION_QUERY = "data.mcp.result_decision"
# Problems in the policy data the rule packages report, evaluated once per load (no input).
LOAD_ERRORS_QUERY = "data.mcp.load_errors"

# mcp_opa_eval's status codes (engine/policy/native/evaluator.go).
OK, UNDEFINED, EVAL_ERROR, CANCELLED, UNKNOWN_HANDLE, PANIC, BAD_INPUT = range(7)

_Buffer = ctypes.c_void_p  # char* the library allocated; freed with mcp_opa_free
_Handle = ctypes.c_size_t  # uintptr_t: the same width as size_t on every supported platform


def find_library() -> Path:
    """The library to load: $MCP_POLICY_OPA_LIBRARY, else the checkout's .tools/lib copy
    (`make tools`), else one built in the package's own engine/policy/native/."""
    configured = os.environ.get(LIBRARY_ENV)
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise ToolMissing(f"{LIBRARY_ENV}={configured}: no such file; {BUILD_HINT}")
        return path
    for path in (CHECKOUT_LIBRARY, PACKAGED_LIBRARY):
        if path.is_file():
            return path
    raise ToolMissing(f"the in-process OPA library ({LIBRARY_NAME}) is not built: {BUILD_HINT}")


def library_version() -> tuple[Path, str]:
    """The library decisions would be evaluated with and the OPA version it reports,
    loading it (once per process) as `InProcessOpa.open` does; ToolMissing, one line, when
    it is missing, not the library, or built with another OPA."""
    library = _library()
    return library.path, library.version


class _Library:
    """The shared library's five functions, typed once."""

    def __init__(self, path: Path) -> None:
        try:
            lib = ctypes.CDLL(str(path))  # CDLL, not PyDLL: the GIL is released per call
            functions = (
                lib.mcp_opa_version,
                lib.mcp_opa_free,
                lib.mcp_opa_prepare,
                lib.mcp_opa_eval,
                lib.mcp_opa_release,
            )
        except (OSError, AttributeError) as exc:
            raise ToolMissing(
                f"{path} is not the in-process OPA library ({exc}); {BUILD_HINT}"
            ) from exc
        version, free, prepare, evaluate, release = functions
        out = ctypes.POINTER(_Buffer)
        size = ctypes.POINTER(ctypes.c_size_t)
        version.argtypes, version.restype = [], _Buffer
        free.argtypes, free.restype = [_Buffer], None
        prepare.argtypes = [ctypes.c_char_p, ctypes.c_size_t, out, size]
        prepare.restype = _Handle
        evaluate.argtypes = [
            _Handle,  # handle
            ctypes.c_int,  # query index
            ctypes.c_char_p,  # input JSON (NULL: no input)
            ctypes.c_size_t,  # its length
            ctypes.c_int64,  # timeout, ns
            out,
            size,
        ]
        evaluate.restype = ctypes.c_int
        release.argtypes, release.restype = [_Handle], None
        self._lib = lib
        self.path = path
        pointer = lib.mcp_opa_version()
        self.version = ctypes.string_at(pointer).decode()
        lib.mcp_opa_free(pointer)
        if self.version != OPA_VERSION:
            raise ToolMissing(
                f"{path} is built with OPA {self.version}, the engine needs {OPA_VERSION}: "
                + BUILD_HINT
            )
        # Go's runtime does not survive fork(): its threads are gone in the child, and a
        # call into Go there hangs if one of them held a lock. Refuse instead.
        self.forked = False
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.forked = True

    def _check_not_forked(self) -> None:
        if self.forked:
            raise PolicyUnavailable(
                "the in-process OPA was loaded before this process forked, and Go cannot run "
                "in a forked child: load it after the fork (or start workers with spawn)"
            )

    def _take(self, out: ctypes.c_void_p, size: ctypes.c_size_t) -> bytes:
        """Copy what the library returned in `out`, then free it."""
        if out.value is None:
            return b""
        try:
            return ctypes.string_at(out.value, size.value)
        finally:
            self._lib.mcp_opa_free(out)

    def prepare(self, bundle_json: bytes) -> int | list[dict[str, Any]]:
        """A handle for the compiled bundle, or OPA's problems with it."""
        self._check_not_forked()
        out, size = _Buffer(), ctypes.c_size_t()
        handle: int = self._lib.mcp_opa_prepare(
            bundle_json, len(bundle_json), ctypes.byref(out), ctypes.byref(size)
        )
        body = self._take(out, size)
        if handle:
            return handle
        problems: list[dict[str, Any]] = json.loads(body)
        return problems

    def eval(
        self, handle: int, query: int, input_json: bytes | None, timeout_ns: int
    ) -> tuple[int, bytes]:
        """(status, body) of one evaluation; input None means no input document."""
        self._check_not_forked()
        out, size = _Buffer(), ctypes.c_size_t()
        length = 0 if input_json is None else len(input_json)
        status: int = self._lib.mcp_opa_eval(
            handle, query, input_json, length, timeout_ns, ctypes.byref(out), ctypes.byref(size)
        )
        return status, self._take(out, size)

    def release(self, handle: int) -> None:
        if not self.forked:
            self._lib.mcp_opa_release(handle)


@functools.cache
def _library() -> _Library:
    """The library, loaded once per process (a failure is not cached: fix it and retry)."""
    return _Library(find_library())


@dataclass(frozen=True)
class _Loaded:
    """One prepared bundle: swapped in as a whole, never changed."""

    handle: int
    revision: str
    queries: tuple[str, ...]  # queries[0] is DECISION_QUERY


def _message(body: bytes) -> str:
    return bounded(body.decode("utf-8", "replace"), MAX_MESSAGE_CHARS)


def _problem_text(problem: dict[str, Any]) -> str:
    if problem.get("file"):
        where = f"{problem['file']}:{problem.get('row', '?')}:{problem.get('col', '?')}: "
        return where + str(problem.get("message", ""))
    return str(problem.get("message", problem))


def _decision(body: bytes) -> PolicyResult:
    """The decision (the JSON text the library answered) as a PolicyResult, parsed and
    checked in one pass; a malformed one is PolicyUnavailable, described as the REST
    engine describes it (the Python value checked, not the text)."""
    try:
        return PolicyResult.model_validate_json(body)
    except ValidationError:
        return checked_result(_json(body))


def _json(body: bytes) -> Any:
    """The library's JSON answer as a Python value; PolicyUnavailable when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise PolicyUnavailable(
            f"the policy gave a malformed decision (not JSON: {exc})", kind="malformed"
        ) from exc


class InProcessOpa:
    """OPA's evaluator in this process, loaded with one policy bundle at a time."""

    def __init__(self, *, timeout: float, result_timeout: float | None = None) -> None:
        self.timeout = timeout
        # A tool's result can be a MiB: its decision gets a deadline of its own.
        self.result_timeout = timeout if result_timeout is None else result_timeout
        self._lib: _Library | None = None
        self._loaded: _Loaded | None = None
        self._load_lock = asyncio.Lock()

    @property
    def revision(self) -> str | None:
        """The revision of the bundle decisions are evaluated with now (None: none yet)."""
        loaded = self._loaded
        return loaded.revision if loaded is not None else None

    @property
    def where(self) -> str:
        """Where decisions are evaluated, for people."""
        return f"OPA {OPA_VERSION} in this process"

    async def open(self) -> None:
        """Load the library (ToolMissing, one line, when it is missing or mismatched)."""
        self._lib = _library()

    async def close(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None and self._lib is not None:
            self._lib.release(loaded.handle)
        self._lib = None

    async def healthy(self) -> bool:
        return self._loaded is not None

    async def load(
        self,
        bundle: PolicyBundle,
        queries: Sequence[str] = (DECISION_QUERY,),
        *,
        check: str | None = None,
    ) -> None:
        """Compile `bundle` with `queries` prepared and make it the one evaluated, or raise
        PolicyRejected with OPA's messages and leave the running bundle serving.

        With `check` (a query for a set of messages, e.g. LOAD_ERRORS_QUERY), the new
        bundle is only swapped in when that query, evaluated once on it, reports nothing."""
        lib = self._lib
        if lib is None:
            raise PolicyUnavailable("the in-process OPA is not open")
        extra = [q for q in (*queries, *([check] if check else [])) if q != DECISION_QUERY]
        names = (DECISION_QUERY, *dict.fromkeys(extra))
        payload = {"modules": bundle.modules, "data": bundle.data, "queries": list(names)}
        async with self._load_lock:
            prepared = await asyncio.to_thread(lambda: lib.prepare(json.dumps(payload).encode()))
            if not isinstance(prepared, int):
                messages = [_problem_text(p) for p in prepared] or ["unknown error"]
                raise PolicyRejected(
                    "OPA rejected the policy; the running policy is unchanged: "
                    + "; ".join(messages[:5]),
                    messages,
                )
            candidate = _Loaded(prepared, bundle.revision, names)
            if check is not None:
                try:
                    errors = await asyncio.to_thread(self._check, candidate, check)
                except BaseException:
                    lib.release(prepared)
                    raise
                if errors:
                    lib.release(prepared)
                    raise PolicyRejected(
                        "the policy data has errors; the running policy is unchanged: "
                        + "; ".join(errors[:5]),
                        errors,
                    )
            old, self._loaded = self._loaded, candidate
            if old is not None:
                lib.release(old.handle)

    async def evaluate(self, input_doc: dict[str, Any]) -> tuple[PolicyResult, str]:
        """Evaluate `data.mcp.decision`: the result and the revision that gave it.

        Async for parity with `rest.Opa`; the work is done inline (one ctypes call)."""
        return self.evaluate_sync(input_doc)

    def evaluate_sync(self, input_doc: dict[str, Any]) -> tuple[PolicyResult, str]:
        """`evaluate` for callers on other threads."""
        return self.evaluate_json(_encode(input_doc))

    def evaluate_json(self, input_json: bytes) -> tuple[PolicyResult, str]:
        """`evaluate` for an input already in JSON text (what the library is given)."""
        body, revision = self._call(0, input_json)
        if body is None:
            raise PolicyUnavailable(
                "the policy gave no decision (data.mcp.decision is undefined)", kind="undefined"
            )
        return _decision(body), revision

    def evaluate_result_json(self, input_json: bytes) -> tuple[ResultPolicyResult, str]:
        """`data.mcp.result_decision` for an input in JSON text: the answer and the revision
        that gave it. Blocking (one ctypes call, the GIL released while OPA evaluates): the
        service calls it inline for small inputs, on a worker thread for large ones.
        PolicyUnavailable when the answer is undefined (kind undefined: the policy has no
        result_decision), malformed, or not given within the deadline."""
        try:
            body, revision = self._call(
                RESULT_DECISION_QUERY, input_json, timeout=self.result_timeout
            )
        except ValueError as exc:  # loaded without it (not by Policy, which always asks)
            raise PolicyUnavailable(
                f"{RESULT_DECISION_QUERY} was not prepared with this policy", kind="error"
            ) from exc
        if body is None:
            raise PolicyUnavailable(NO_RESULT_DECISION, kind="undefined")
        try:
            answer = ResultPolicyResult.model_validate_json(body)
        except ValidationError:
            answer = checked_result_decision(_json(body))
        return consistent(answer), revision

    async def query(self, name: str, input_doc: Any = None) -> Any:
        """The value of another prepared query of the running bundle (None: undefined), for
        load-time checks; evaluated on a worker thread, with no input when `input_doc` is
        None."""
        loaded = self._loaded
        if loaded is not None and name not in loaded.queries:
            raise ValueError(f"{name} was not prepared: pass it to load(queries=...)")
        input_json = None if input_doc is None else _encode(input_doc)
        value, _ = await asyncio.to_thread(self._run, name, input_json)
        return None if value is None else value[0]

    def _check(self, loaded: _Loaded, query: str) -> list[str]:
        """The messages `query` gives on a bundle not yet swapped in (sorted)."""
        lib = self._lib
        if lib is None:
            raise PolicyUnavailable("the in-process OPA is not open")
        status, body = lib.eval(
            loaded.handle, loaded.queries.index(query), None, int(ADMIN_TIMEOUT * 1e9)
        )
        if status == UNDEFINED:
            return []
        if status != OK:
            raise PolicyRejected(f"{query} could not be evaluated: {_message(body)}", [query])
        value = json.loads(body)
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise PolicyRejected(f"{query} must be a set of strings", [query])
        return sorted(value)

    def _run(self, query: int | str, input_json: bytes | None) -> tuple[list[Any] | None, str]:
        """([value], revision), or (None, revision) when undefined; PolicyUnavailable else."""
        body, revision = self._call(query, input_json)
        if body is None:
            return None, revision
        return [_json(body)], revision

    def _call(
        self, query: int | str, input_json: bytes | None, *, timeout: float | None = None
    ) -> tuple[bytes | None, str]:
        """(the value as JSON text, revision), or (None, revision) when undefined;
        PolicyUnavailable for every other answer. `timeout`: the deadline, when not the
        call decision's."""
        deadline = self.timeout if timeout is None else timeout
        while True:
            loaded = self._loaded
            lib = self._lib
            if loaded is None or lib is None:
                raise PolicyUnavailable("no policy is loaded into the in-process OPA")
            index = query if isinstance(query, int) else loaded.queries.index(query)
            status, body = lib.eval(loaded.handle, index, input_json, int(deadline * 1_000_000_000))
            if status == UNKNOWN_HANDLE and self._loaded is not loaded:
                continue  # released by a load between reading it and the call: use the new
            break
        if status == OK:
            return body, loaded.revision
        if status == UNDEFINED:
            return None, loaded.revision
        if status == CANCELLED:
            raise PolicyUnavailable(
                f"OPA did not answer within {deadline * 1000:.0f} ms", kind="timeout"
            )
        if status == EVAL_ERROR:
            raise PolicyUnavailable(f"the policy failed: {_message(body)}", kind="error")
        if status == PANIC:
            raise PolicyUnavailable(f"OPA failed: {_message(body)}", kind="error")
        if status == BAD_INPUT:
            raise PolicyUnavailable(f"the input is not valid JSON: {_message(body)}", kind="input")
        raise PolicyUnavailable(f"the in-process OPA answered status {status}")


def _encode(input_doc: Any) -> bytes:
    try:
        return json.dumps(input_doc, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise PolicyUnavailable(
            f"the input could not be encoded as JSON: {type(exc).__name__}", kind="input"
        ) from exc
