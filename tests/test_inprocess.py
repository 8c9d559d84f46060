"""The in-process evaluator: OPA's Go evaluator as a shared library, called with ctypes.

Everything here runs the real library (`make tools` builds it into .tools/lib) and, for the
comparisons, a real `opa run --server` through the REST evaluator: the two must give the
same decisions and fail the same ways.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine import translate
from engine.errors import PolicyRejected, PolicyUnavailable
from engine.models import DecideRequest
from engine.policy import inprocess
from engine.policy.inprocess import InProcessOpa, find_library
from engine.policy.opa_process import OpaProcess, ToolMissing
from engine.policy.rest import Opa
from engine.policy.source import MODULE_PREFIX, PolicyBundle, read_bundle
from engine.settings import PROJECT_ROOT
from tests.conftest import DATASTORE_2, HEALTHIMAGING, VALKEY, approval_call, copy_call

TIMEOUT = 5.0  # generous: these tests are about answers, not speed


def bundle(rego: str, data: dict[str, Any] | None = None, name: str = "test.rego") -> PolicyBundle:
    return PolicyBundle(modules={f"{MODULE_PREFIX}{name}": rego}, data=data or {})


def slow_policy(count: int) -> PolicyBundle:
    """A decision that takes a while: it counts a `count`-element comprehension."""
    return bundle(
        'package mcp\n\ndecision := {"action": "allow", "rule": "slow"} if {\n'
        f"\tcount([x | some x in numbers.range(1, {count})]) > 0\n}}\n"
    )


SHIPPED = read_bundle([PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"])


@pytest.fixture(scope="session", autouse=True)
def library_built() -> None:
    try:
        find_library()
    except ToolMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture
async def opa() -> AsyncIterator[InProcessOpa]:
    evaluator = InProcessOpa(timeout=TIMEOUT)
    await evaluator.open()
    await evaluator.load(SHIPPED)
    yield evaluator
    await evaluator.close()


async def _rest_opa() -> AsyncIterator[Opa]:
    process = OpaProcess("opa")
    await process.start()
    client = Opa(process.url, timeout=TIMEOUT)
    await client.open()
    try:
        yield client
    finally:
        await client.close()
        await process.stop()


@pytest.fixture(scope="module")
async def rest_shipped() -> AsyncIterator[Opa]:
    """An `opa run --server` holding the shipped policy, through the REST evaluator."""
    async for client in _rest_opa():
        await client.load(SHIPPED)
        yield client


@pytest.fixture(scope="module")
async def rest_scratch() -> AsyncIterator[Opa]:
    """One for single-module test policies (each replaces the last: the same module id)."""
    async for client in _rest_opa():
        yield client


def input_for(body: dict[str, Any], *, asserted_by: str | None = None) -> dict[str, Any]:
    """The input document the service builds for a decide request body."""
    request = DecideRequest.model_validate(body)
    call = translate.tool_call(request, max_depth=24)
    return translate.input_document(
        call,
        request,
        decision_id="dec_inprocess",
        now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        transport="http",
        asserted_by=asserted_by,
    )


def edited(doc: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    edit(doc)
    return doc


def _no_principal(doc: dict[str, Any]) -> None:
    del doc["principal"]


CASES: dict[str, dict[str, Any]] = {
    "valid copy": input_for(copy_call("s-parity")),
    "valid copy on valkey": input_for({**copy_call("s-parity"), "server": VALKEY}),
    "malformed datastore id": input_for(copy_call("s-parity", datastore_id="not-a-hex-id")),
    "missing image set id": input_for(copy_call("s-parity", source_image_set_id=None)),
    "cross datastore": input_for(copy_call("s-parity", source_datastore_id=DATASTORE_2)),
    "into an existing image set": input_for(approval_call("s-parity")),
    "no copy_image_set_information": input_for(
        copy_call("s-parity", copy_image_set_information=None)
    ),
    "malformed copy_image_set_information": input_for(
        copy_call("s-parity", copy_image_set_information={"sourceImageSet": {}, "x": 1})
    ),
    # force: a flag of servers other than the real one, which the shipped pack still checks
    "force true": input_for(copy_call("s-parity", force=True)),
    "force not boolean": input_for(copy_call("s-parity", force="yes")),
    "force by an asserted caller without the role": input_for(
        copy_call("s-parity", force=True), asserted_by="proxy-1"
    ),
    "force by an imaging-admin": input_for(
        {
            **copy_call("s-parity", force=True),
            "principal": {"session_id": "s-parity", "roles": ["imaging-admin"]},
        },
        asserted_by="proxy-1",
    ),
    "unknown tool": input_for({**copy_call("s-parity"), "tool": "delete_everything"}),
    "unknown server": input_for({**copy_call("s-parity"), "server": "someone.else"}),
    "as a JSON-RPC message": input_for(
        {
            "server": HEALTHIMAGING,
            "message": {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "copy_image_set", "arguments": copy_call()["arguments"]},
            },
            "principal": {"session_id": "s-parity"},
        }
    ),
    "empty session id": edited(
        input_for(copy_call("s-parity")), lambda d: d["principal"].update(session_id="")
    ),
    "no principal": edited(input_for(copy_call("s-parity")), _no_principal),
    "arguments not an object": edited(
        input_for(copy_call("s-parity")), lambda d: d["tool"].update(arguments=[1, 2])
    ),
    "empty input": {},
}


async def test_shipped_policy_decides_as_the_opa_server(
    opa: InProcessOpa, rest_shipped: Opa
) -> None:
    actions, rules = set(), set()
    for name, doc in CASES.items():
        expected = await rest_shipped.evaluate(doc)
        got, revision = await opa.evaluate(doc)
        assert got == expected, name
        assert revision == SHIPPED.revision
        actions.add(got.action)
        rules.add(got.rule)
    # The table reaches several different answers, so agreeing on it means something.
    assert "deny" in actions and len(actions) >= 2
    assert len(rules) >= 5


@pytest.mark.parametrize(
    ("rego", "kind"),
    [
        ("package mcp\n\nsomething_else := 1\n", "undefined"),
        ('package mcp\n\ndecision := {"action": "maybe", "rule": "x"}\n', "malformed"),
        ('package mcp\n\ndecision := "allow"\n', "malformed"),
        ('package mcp\n\ndecision := {"action": "allow"}\n', "malformed"),
    ],
)
async def test_unusable_decision_fails_as_over_rest(
    opa: InProcessOpa, rest_scratch: Opa, rego: str, kind: str
) -> None:
    policy = bundle(rego)
    await rest_scratch.load(policy)
    await opa.load(policy)
    with pytest.raises(PolicyUnavailable) as over_rest:
        await rest_scratch.evaluate(CASES["valid copy"])
    with pytest.raises(PolicyUnavailable) as in_process:
        await opa.evaluate(CASES["valid copy"])
    assert in_process.value.kind == over_rest.value.kind == kind
    assert in_process.value.message == over_rest.value.message


@pytest.mark.parametrize(
    ("rego", "row", "words"),
    [
        ('package mcp\n\ndecision := {"action": "allow",\n', 4, ""),
        ('package mcp\n\ndecision := {"action": "allow", "rule": r}\n', 3, "var r is unsafe"),
        ("package mcp\n\ndecision := nowhere.to_be_found(1)\n", 3, "undefined function"),
    ],
    ids=["syntax", "unsafe var", "unknown function"],
)
async def test_rejected_policy_names_the_place_and_keeps_the_old_one(
    opa: InProcessOpa, rego: str, row: int, words: str
) -> None:
    with pytest.raises(PolicyRejected) as rejected:
        await opa.load(bundle(rego, name="broken.rego"))
    where = f"{MODULE_PREFIX}broken.rego:{row}:"
    assert any(e.startswith(where) and words in e for e in rejected.value.errors), (
        rejected.value.errors
    )
    assert where in rejected.value.message
    assert opa.revision == SHIPPED.revision
    result, revision = await opa.evaluate(CASES["malformed datastore id"])
    assert (result.action, revision) == ("deny", SHIPPED.revision)


async def test_data_where_a_rule_is_is_rejected(opa: InProcessOpa) -> None:
    """As the OPA server does: a rule may not be defined where the data has a value."""
    with pytest.raises(PolicyRejected):
        await opa.load(bundle("package mcp\n\nx := 1\n", data={"mcp": {"x": 2}}))
    assert opa.revision == SHIPPED.revision


async def test_conflicting_decision_is_an_error(opa: InProcessOpa) -> None:
    await opa.load(
        bundle(
            'package mcp\n\ndecision = {"action": "allow", "rule": "a"} if input.tool\n'
            'decision = {"action": "deny", "rule": "b"} if input.tool\n'
        )
    )
    with pytest.raises(PolicyUnavailable) as failed:
        await opa.evaluate(CASES["valid copy"])
    assert failed.value.kind == "error"
    assert "conflict" in failed.value.message


# Slow in one builtin (numbers.range asks the deadline per element), or slow by running
# many short expressions (the evaluator asks it before each one).
BUSY_EXPRESSIONS = bundle(
    'package mcp\n\ndecision := {"action": "allow", "rule": "slow"} if {\n'
    "\tcount([x | some x in numbers.range(1, 2000000); x % 7 == 0; x % 3 == 0]) > 0\n}\n"
)


@pytest.mark.parametrize(
    "policy",
    [slow_policy(50_000_000), BUSY_EXPRESSIONS],
    ids=["long builtin", "many expressions"],
)
async def test_slow_policy_times_out_promptly(opa: InProcessOpa, policy: PolicyBundle) -> None:
    opa.timeout = 0.05
    await opa.load(policy)
    started = time.monotonic()
    with pytest.raises(PolicyUnavailable) as slow:
        await opa.evaluate(CASES["valid copy"])
    assert time.monotonic() - started < 1.0
    assert slow.value.kind == "timeout"
    assert slow.value.message == "OPA did not answer within 50 ms"


async def test_a_policy_waiting_on_the_network_times_out_promptly(opa: InProcessOpa) -> None:
    """http.send waits on the evaluation's context, not on the evaluator's cancel: the
    context carries the same deadline, so a server that never answers costs 50 ms."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        port = silent.getsockname()[1]
        await opa.load(
            bundle(
                'package mcp\n\ndecision := {"action": "allow", "rule": "net"} if {\n'
                f'\thttp.send({{"method": "get", "url": "http://127.0.0.1:{port}/", '
                '"timeout": "30s"}).status_code == 200\n}\n'
            )
        )
        opa.timeout = 0.05
        started = time.monotonic()
        with pytest.raises(PolicyUnavailable) as slow:
            await opa.evaluate(CASES["valid copy"])
        assert time.monotonic() - started < 1.0
        assert slow.value.kind == "timeout"
    finally:
        silent.close()


async def test_no_policy_loaded_is_unavailable() -> None:
    evaluator = InProcessOpa(timeout=TIMEOUT)
    await evaluator.open()
    assert not await evaluator.healthy()
    assert evaluator.revision is None
    with pytest.raises(PolicyUnavailable, match="no policy is loaded"):
        await evaluator.evaluate(CASES["valid copy"])
    await evaluator.load(SHIPPED)
    assert await evaluator.healthy()
    await evaluator.close()
    assert not await evaluator.healthy()
    with pytest.raises(PolicyUnavailable, match="no policy is loaded"):
        await evaluator.evaluate(CASES["valid copy"])
    with pytest.raises(PolicyUnavailable, match="not open"):
        await evaluator.load(SHIPPED)


async def test_released_handle_and_bad_query_index_are_refused(opa: InProcessOpa) -> None:
    lib = inprocess._library()
    handle = lib.prepare(b'{"modules": {}, "data": {}, "queries": ["data"]}')
    assert isinstance(handle, int)
    assert lib.eval(handle, 0, b"{}", 0)[0] == inprocess.OK
    assert lib.eval(handle, 1, b"{}", 0)[0] == inprocess.UNKNOWN_HANDLE
    assert lib.eval(handle, -1, b"{}", 0)[0] == inprocess.UNKNOWN_HANDLE
    lib.release(handle)
    assert lib.eval(handle, 0, b"{}", 0)[0] == inprocess.UNKNOWN_HANDLE
    assert lib.eval(0, 0, b"{}", 0)[0] == inprocess.UNKNOWN_HANDLE


async def test_other_queries_for_load_time_checks(opa: InProcessOpa) -> None:
    checks = bundle(
        "package checks\n\n"
        "negative contains name if {\n\tsome name, limit in data.limits\n\tlimit < 0\n}\n\n"
        "echo := input.x\n\n"
        "package_decision := data.mcp.decision\n",
        data={"limits": {"a": 1, "b": -1, "c": -2}},
    )
    await opa.load(checks, queries=("data.checks.negative", "data.checks.echo"))
    assert sorted(await opa.query("data.checks.negative")) == ["b", "c"]
    assert await opa.query("data.checks.echo", {"x": [1, "two"]}) == [1, "two"]
    assert await opa.query("data.checks.echo") is None  # no input: undefined
    with pytest.raises(ValueError, match="not prepared"):
        await opa.query("data.checks.package_decision")
    with pytest.raises(PolicyUnavailable) as undefined:
        await opa.evaluate({})
    assert undefined.value.kind == "undefined"


async def test_reload_while_evaluating_never_mixes_revisions(opa: InProcessOpa) -> None:
    """Threads decide in a loop while loads alternate two policies: every decision names
    the revision that made it, module and data alike, and none fails."""

    def marked(marker: str) -> PolicyBundle:
        return bundle(
            "package mcp\n\n"
            'decision := {"action": "allow", "rule": "marked", '
            f'"reason": concat("/", ["{marker}", data.marker])}}\n',
            data={"marker": marker},
        )

    policies = {marker: marked(marker) for marker in ("left", "right")}
    expected = {p.revision: f"{marker}/{marker}" for marker, p in policies.items()}
    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    failures: list[BaseException] = []

    def decide_in_a_loop() -> None:
        try:
            while not stop.is_set():
                result, revision = opa.evaluate_sync(CASES["valid copy"])
                seen.append((revision, result.reason))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    await opa.load(policies["left"])
    threads = [threading.Thread(target=decide_in_a_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(40):
            await opa.load(policies["right" if i % 2 == 0 else "left"])
            await asyncio.sleep(0.005)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert {revision for revision, _ in seen} == set(expected)
    mixed = [(revision, reason) for revision, reason in seen if expected[revision] != reason]
    assert mixed == []


async def test_evaluation_releases_the_gil(opa: InProcessOpa) -> None:
    """While one thread is inside a long evaluation, the main thread keeps running: it
    is never held up for more than a moment (a call holding the GIL would hold it up for
    the whole evaluation)."""
    await opa.load(slow_policy(400_000))
    done = threading.Event()
    window: list[float] = []
    results: list[Any] = []

    def evaluate() -> None:
        window.append(time.perf_counter())
        results.append(opa.evaluate_sync(CASES["valid copy"]))
        window.append(time.perf_counter())
        done.set()

    thread = threading.Thread(target=evaluate)
    longest, loops = 0.0, 0
    last = time.perf_counter()
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        longest, last, loops = max(longest, now - last), now, loops + 1
    thread.join()
    assert results and results[0][0].rule == "slow"
    duration = window[1] - window[0]
    assert duration > 20 * sys.getswitchinterval(), "the evaluation must be long to tell"
    assert longest < duration / 4, (longest, duration, loops)


DEEP = 9_000  # under the 10 000 levels Go's JSON decoder accepts


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"\xff\xfe{}",
        b"{} {}",
        b'{"tool": NaN}',
        b"[" * 20_000 + b"]" * 20_000,
    ],
    ids=["empty", "truncated", "not utf-8", "two documents", "NaN", "too deep"],
)
async def test_input_that_is_not_json_is_unavailable(opa: InProcessOpa, raw: bytes) -> None:
    with pytest.raises(PolicyUnavailable) as failed:
        opa.evaluate_json(raw)
    assert failed.value.kind == "input"


def _valid_call_with(**tool: Any) -> dict[str, Any]:
    doc = input_for(copy_call("s-hostile"))
    doc["tool"].update(tool)
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        _valid_call_with(name="copy_image_set" + "x" * 5_000_000),
        _valid_call_with(name="copy_image_set\u200b"),
        _valid_call_with(server="\ud800"),  # a lone surrogate: JSON escapes it
        _valid_call_with(arguments={"datastore_id": 10**300, "source_image_set_id": -1e308}),
        _valid_call_with(arguments=[[[[[[[[[[{}]]]]]]]]]]),
        _valid_call_with(name=None, arguments=None, server=None),
    ],
    ids=["huge name", "zero-width name", "lone surrogate", "huge numbers", "nested", "nulls"],
)
async def test_hostile_input_is_denied(opa: InProcessOpa, doc: dict[str, Any]) -> None:
    result, _ = await opa.evaluate(doc)
    assert result.action == "deny"


@pytest.mark.parametrize(
    "raw",
    [
        # Deep nesting that the decoder accepts, where the policy wants an object.
        b'{"tool": {"server": "s", "name": "copy_image_set", "arguments": '
        + b"[" * DEEP
        + b"]" * DEEP
        + b'}, "principal": {"session_id": "s"}}',
        b'{"tool": {"server": "%s", "name": "copy_image_set", "name": "x y", "arguments": {}},'
        b' "principal": {"session_id": "s"}}' % HEALTHIMAGING.encode(),  # duplicate keys
        b'{"tool": {"server": "s", "name": "copy_image_set", "arguments": '
        b'{"datastore_id": 1e400, "source_image_set_id": 123456789012345678901234567890}}}',
    ],
    ids=["deep", "duplicate keys", "numbers beyond float"],
)
async def test_hostile_json_is_denied(opa: InProcessOpa, raw: bytes) -> None:
    result, _ = opa.evaluate_json(raw)
    assert result.action == "deny"


async def test_input_python_cannot_encode_is_unavailable(opa: InProcessOpa) -> None:
    nested: dict[str, Any] = {}
    for _ in range(5_000):
        nested = {"x": nested}
    for arguments in (nested, {"x": float("nan")}, {"x": object()}, {"x": 10**5000}):
        with pytest.raises(PolicyUnavailable) as failed:
            await opa.evaluate(_valid_call_with(arguments=arguments))
        assert failed.value.kind == "input"
    assert (await opa.evaluate(CASES["valid copy"]))[0].action != "deny"


def test_missing_library_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(inprocess.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(ToolMissing) as missing:
        find_library()
    assert "\n" not in missing.value.message
    assert "missing.so" in missing.value.message and "make tools" in missing.value.message


def test_not_a_library_or_another_version_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    impostor = tmp_path / "libmcppolicy_opa.so"
    impostor.write_text("not a shared library")
    with pytest.raises(ToolMissing) as wrong:
        inprocess._Library(impostor)
    assert "\n" not in wrong.value.message and "make tools" in wrong.value.message
    monkeypatch.setattr(inprocess, "OPA_VERSION", "0.0.1")
    with pytest.raises(ToolMissing) as mismatch:
        inprocess._Library(find_library())
    assert "\n" not in mismatch.value.message
    assert "built with OPA 1.22.2, the engine needs 0.0.1" in mismatch.value.message


# A process that loads the library, evaluates once, then waits for a signal with its own
# Python handlers: Go installs signal handlers in c-shared mode, and must not take these.
SIGNAL_SCRIPT = """
import asyncio, signal, sys, time
from engine.policy.inprocess import InProcessOpa
from engine.policy.source import PolicyBundle
opa = InProcessOpa(timeout=5)
asyncio.run(opa.open())
asyncio.run(opa.load(PolicyBundle(modules={"p.rego": sys.argv[2]}, data={})))
def on_term(signum, frame):
    print("terminated", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
# Python leaves SIGINT ignored when it starts so (a background job of a shell does)
signal.signal(signal.SIGINT, signal.default_int_handler)
print(opa.evaluate_sync({})[0].rule, flush=True)
try:
    if sys.argv[1] == "busy":
        opa.evaluate_sync({"slow": True})  # the signal arrives inside the evaluation
    time.sleep(30)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(4)
"""

SIGNAL_POLICY = (
    'package mcp\n\ndefault decision := {"action": "allow", "rule": "ready"}\n\n'
    'decision := {"action": "allow", "rule": "slow"} if {\n\tinput.slow\n'
    "\tcount([x | some x in numbers.range(1, 2000000)]) > 0\n}\n"
)


@pytest.mark.parametrize("when", ["idle", "busy"])
@pytest.mark.parametrize(
    ("signum", "words", "status"),
    [(signal.SIGTERM, "terminated", 3), (signal.SIGINT, "interrupted", 4)],
    ids=["SIGTERM", "SIGINT"],
)
def test_python_signal_handlers_still_run(
    signum: signal.Signals, words: str, status: int, when: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, when, SIGNAL_POLICY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.communicate()  # reaped and its pipes closed, also after a timeout
    assert (out.strip(), proc.returncode) == (words, status), err


FORK_SCRIPT = """
import asyncio, os, sys
from engine.errors import PolicyUnavailable
from engine.policy.inprocess import InProcessOpa
from engine.policy.source import PolicyBundle
opa = InProcessOpa(timeout=5)
asyncio.run(opa.open())
asyncio.run(opa.load(PolicyBundle(modules={"p.rego": sys.argv[1]}, data={})))
opa.evaluate_sync({})
pid = os.fork()
if pid == 0:
    try:
        opa.evaluate_sync({})
    except PolicyUnavailable as exc:
        os._exit(7 if "forked" in exc.message else 8)
    os._exit(9)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), opa.evaluate_sync({})[0].rule, flush=True)
"""


def test_forked_child_is_refused_not_hung() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, SIGNAL_POLICY],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=30,
    )
    assert done.stdout.split() == ["7", "ready"], done.stderr
