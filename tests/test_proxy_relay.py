"""The relay's own path, as it is kept short: a message the proxy does not act on goes on
as the very bytes it came as (no SDK model is built for it, none of its members is
dropped or converted that a model would keep), a tools/call is forwarded as the JSON of
exactly what was evaluated, and nothing the decision service does after deciding (the
decision log's writer, the outcome report) holds up an answer or a relayed message.

Units for the frames (`kind_of` checked against the SDK's own models with Hypothesis),
then the core relaying to a real fixture child, then the stdio proxy as a process with
its child's stdin and stdout recorded byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.shared.message import SessionMessage
from mcp_types import (
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    jsonrpc_message_adapter,
)

import engine.proxy.core as core
import engine.proxy.screen as screen
import engine.proxy.upstream as upstream
from engine.proxy.core import (
    ERROR,
    NOTIFICATION,
    REQUEST,
    RESPONSE,
    Frame,
    MalformedMessage,
    ProxyOptions,
    ProxySession,
    kind_of,
)
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.screen import screen_line
from engine.proxy.upstream import open_child, parse_line
from engine.runtime import Runtime
from tests.conftest import settings_for
from tests.fixtures.proxy_harness import (
    FIXTURE,
    RECORD_ENV,
    RawProxy,
    calls,
    clean_env,
    copy_args,
    embedded_args,
)
from tests.strategies import FUZZ

PROTOCOL = "2025-11-25"
KINDS = {
    JSONRPCRequest: REQUEST,
    JSONRPCNotification: NOTIFICATION,
    JSONRPCResponse: RESPONSE,
    JSONRPCError: ERROR,
}


# Frames.

MISSING = object()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
ids = st.sampled_from([MISSING, None, True, 1.0, 1.5, "x"]) | st.integers() | st.text(max_size=5)
members = {
    "jsonrpc": st.sampled_from([MISSING, "2.0", "1.0", 2.0, None]),
    "id": ids,
    "method": st.sampled_from([MISSING, None, 5]) | st.text(max_size=12),
    "params": st.sampled_from([MISSING, None, [1], "x"]) | st.dictionaries(st.text(), json_values),
    "result": st.sampled_from([MISSING, MISSING, None, [], 3])
    | st.dictionaries(st.text(), json_values),
    "error": st.sampled_from([MISSING, MISSING, None, "x"])
    | st.fixed_dictionaries(
        {
            "code": st.sampled_from([1, -32600, "1", 1.0, True]),
            "message": st.sampled_from(["m", 5]),
        },
        optional={"data": json_values, "extra": st.just(1)},
    ),
    "extra": st.sampled_from([MISSING, MISSING, MISSING, 1]),
}


@st.composite
def message_like(draw: st.DrawFn) -> dict[str, Any]:
    value = {name: draw(strategy) for name, strategy in members.items()}
    return {name: item for name, item in value.items() if item is not MISSING}


def test_a_frame_is_plain_only_when_the_sdk_models_read_it_as_exactly_that() -> None:
    """Whatever `kind_of` lets through as it came, the SDK's models would read as the
    same kind of message and write back as the same object: relaying the text itself
    changes nothing an SDK relay would have sent."""

    @FUZZ
    @given(message_like())
    def examples(value: dict[str, Any]) -> None:
        kind = kind_of(value)
        if kind is None:
            return
        model = jsonrpc_message_adapter.validate_python(value, by_name=False)
        assert KINDS[type(model)] == kind
        assert model.model_dump(by_alias=True, exclude_unset=True) == value
        text = json.dumps(value).encode()
        frame = Frame.parsed(value, b"  " + text + b"\r\n")
        assert frame is not None
        assert frame.line() == text + b"\n"

    examples()


@pytest.mark.parametrize(
    "value",
    [
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "extra": True},  # the models drop it
        {"jsonrpc": "2.0", "id": 1.0, "method": "ping"},  # a float id is no id
        {"jsonrpc": "2.0", "id": 1, "error": {"code": "7", "message": "m"}},  # converted
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "m"}},
        {"jsonrpc": "2.0", "method": "x", "params": [1]},
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
    ],
)
def test_anything_else_is_left_to_the_models(value: dict[str, Any]) -> None:
    assert kind_of(value) is None
    assert Frame.parsed(value, json.dumps(value).encode()) is None


class Exploding:
    """Stands in for the SDK's message models: any use of them fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"an SDK model was built ({name})")


def test_a_plain_message_is_relayed_without_an_sdk_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (core, screen, upstream):
        monkeypatch.setattr(module, "jsonrpc_message_adapter", Exploding())
    line = b'{ "method" : "resources/read", "id" : "r-\\u00e9", "jsonrpc":"2.0",\r  "params":'
    line += b' {"uri": "x:1"} }\n'
    frame = screen_line(line)
    assert isinstance(frame, Frame)
    assert (frame.kind, frame.id, frame.method) == (REQUEST, "r-é", "resources/read")
    assert frame.line() == line.strip() + b"\n"

    answer = b'{"jsonrpc": "2.0", "id": "r-\\u00e9", "result": {"contents": [], "n": 1E2}}'
    relayed = parse_line(answer)
    assert isinstance(relayed, Frame)
    assert relayed.kind == RESPONSE
    assert relayed.line() == answer + b"\n"


def test_what_the_models_must_read_is_relayed_as_they_write_it() -> None:
    # A member the SDK's models drop is dropped, as it always was.
    frame = screen_line(b'{"jsonrpc": "2.0", "id": 3, "method": "ping", "x-extra": 1}')
    assert isinstance(frame, Frame)
    assert json.loads(frame.line()) == {"jsonrpc": "2.0", "id": 3, "method": "ping"}
    # A server's NaN (which strict JSON never holds) is written as the models write it.
    odd = parse_line(b'{"jsonrpc": "2.0", "id": 4, "result": {"x": NaN}}')
    assert isinstance(odd, Frame)
    assert json.loads(odd.line()) == {"jsonrpc": "2.0", "id": 4, "result": {"x": None}}
    # A tools/call without an id is still refused, and so is anything that is not JSON.
    refused = screen_line(b'{"jsonrpc": "2.0", "method": "tools/call", "params": {}}')
    assert isinstance(refused, MalformedMessage)
    assert refused.error.code == -32600
    broken = screen_line(b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "ping"}')
    assert isinstance(broken, MalformedMessage)
    assert broken.error.code == -32700
    assert isinstance(parse_line(b"not json"), Exception)


# The core, relaying to a real fixture child.


class Agent:
    """The agent side of a ProxySession that takes frames (as the stdio transport does)."""

    def __init__(self) -> None:
        self.to_proxy, self.inbox = anyio.create_memory_object_stream[SessionMessage | Frame](16)
        self.frames: list[Frame] = []
        self.arrived = anyio.Event()

    async def send_frame(self, frame: Frame, /) -> None:
        self.frames.append(frame)
        self.arrived.set()

    async def request(self, request_id: Any, method: str, params: dict[str, Any]) -> None:
        await self.to_proxy.send(Frame.request(request_id, method, params))

    async def answer(self, request_id: Any) -> Frame:
        with anyio.fail_after(30):
            while True:
                for frame in self.frames:
                    if frame.kind in (RESPONSE, ERROR) and frame.id == request_id:
                        return frame
                self.arrived = anyio.Event()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def core_session(decider: Any, tmp_path: Path) -> AsyncIterator[tuple[Agent, Path]]:
    record = tmp_path / "calls.jsonl"
    agent = Agent()
    session = ProxySession(decider, ProxyOptions(), session_id="relay-" + uuid.uuid4().hex)
    async with (
        open_child(FIXTURE, {**os.environ, RECORD_ENV: str(record)}) as child,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(session.run, agent.inbox, agent, child)
        await agent.request(
            0,
            "initialize",
            {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "relay-test", "version": "1"},
            },
        )
        assert (await agent.answer(0)).kind == RESPONSE
        await agent.to_proxy.send(Frame.notification("notifications/initialized", {}))
        try:
            yield agent, record
        finally:
            await agent.to_proxy.aclose()
    await agent.inbox.aclose()


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    running = Runtime(settings_for(tmp_path, decision_db=False))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_a_stuck_decision_log_writer_holds_up_no_answer(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The decision log is written by its own thread: while that thread is stuck (a slow
    disk), calls are decided, forwarded and answered, and other messages relayed; the
    records are written once it goes on."""
    log = runtime.decision_log
    stuck = threading.Event()
    store = log._store

    def slow_store(records: list[dict[str, Any]]) -> None:
        stuck.wait(60)
        store(records)

    log._store = slow_store
    try:
        args = [copy_args() for _ in range(3)]
        async with core_session(EmbeddedDecider(runtime), tmp_path) as (agent, record):
            for i, arguments in enumerate(args, start=1):
                await agent.request(
                    i, "tools/call", {"name": "copy_image_set", "arguments": arguments}
                )
                answer = await agent.answer(i)
                assert answer.result["isError"] is False, answer
            await agent.request("ping-1", "ping", {})
            assert (await agent.answer("ping-1")).kind == RESPONSE
            assert log.written == 0  # nothing could be written yet
        assert [call["arguments"] for call in calls(record)] == args
    finally:
        stuck.set()
    await log.flush()
    written = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    decided = [r for r in written if r.get("event") == "decision" and r["tool"] == "copy_image_set"]
    assert [r["verdict"] for r in decided] == ["allow"] * 3


class SlowReports(EmbeddedDecider):
    """The embedded decider, its outcome reports held until `release` is set."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.release = anyio.Event()
        self.reported: list[bool] = []

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool:
        await self.release.wait()
        released = await super().report_outcome(decision_id, outcome_token, succeeded=succeeded)
        self.reported.append(succeeded)
        return released


async def test_an_outcome_report_holds_up_neither_its_answer_nor_what_comes_next(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A success is answered first and reported after: while the decision service takes
    its time with the reports, the agent has its answers and the session goes on."""
    decider = SlowReports(runtime)
    async with core_session(decider, tmp_path) as (agent, record):
        for i in (1, 2):
            params = {"name": "copy_image_set", "arguments": copy_args()}
            await agent.request(i, "tools/call", params)
            assert (await agent.answer(i)).result["isError"] is False
        await agent.request("ping-1", "ping", {})
        assert (await agent.answer("ping-1")).kind == RESPONSE
        assert decider.reported == []  # both reports still waiting
        decider.release.set()
        with anyio.fail_after(30):
            while len(decider.reported) < 2:
                await anyio.sleep(0.01)
    assert decider.reported == [True, True]
    assert len(calls(record)) == 2


async def test_relayed_frames_are_the_servers_own_text(runtime: Runtime, tmp_path: Path) -> None:
    async with core_session(EmbeddedDecider(runtime), tmp_path) as (agent, _):
        await agent.request("p", "ping", {})
        pong = await agent.answer("p")
        await agent.request(9, "tools/call", {"name": "copy_image_set", "arguments": copy_args()})
        answer = await agent.answer(9)
    for frame in (pong, answer):
        assert frame.raw is not None
        assert frame._model is None  # no SDK model was built for it
        assert json.loads(frame.raw) == frame.value


# The stdio proxy as a process, its child's stdin and stdout recorded byte for byte.


async def test_stdio_relay_is_byte_for_byte_and_calls_are_what_was_evaluated(
    tmp_path: Path,
) -> None:
    sent, received = tmp_path / "server.in", tmp_path / "server.out"
    record = tmp_path / "calls.jsonl"
    tee = 'i="$0"; o="$1"; shift; tee -a "$i" | "$@" | tee -a "$o"'
    proxy = await RawProxy.start(
        [*embedded_args(tmp_path), "--", "sh", "-c", tee, str(sent), str(received), *FIXTURE],
        clean_env(**{RECORD_ENV: str(record)}),
        tmp_path / "proxy.log",
    )
    assert proxy.proc.stdout is not None
    try:
        await proxy.initialize()

        async def line_with(marker: str) -> bytes:
            assert proxy.proc.stdout is not None
            while True:
                line = await asyncio.wait_for(proxy.proc.stdout.readline(), 30)
                assert line, proxy.log.read_text()
                if marker in line.decode():
                    return line

        # Not acted on: goes to the server exactly as written, and its answer comes back
        # exactly as the server wrote it.
        ping = '{ "id" : "p-\\u00e9-1" ,"method":"ping",  "jsonrpc" : "2.0" }'
        await proxy.write_line(ping)
        pong = await line_with("p-é-1")
        # A tools/call: forwarded as the proxy's JSON of what was evaluated (the name
        # written with an escape arrives as the name the policy saw).
        arguments = copy_args(
            copy_image_set_information={"sourceImageSet": {"latestVersionId": "1"}}
        )
        call = (
            '{"params": {"arguments": ' + json.dumps(arguments, indent=1) + ', "name": '
            '"copy\\u005fimage_set"}, "method": "tools/call", "id": 77, "jsonrpc": "2.0"}'
        ).replace("\n", " ")
        await proxy.write_line(call)
        answer = await line_with('"id":77')
    finally:
        await proxy.close()

    upstream_in = sent.read_bytes().splitlines()
    upstream_out = received.read_bytes().splitlines()
    assert ping.encode() in upstream_in
    assert pong.rstrip(b"\n") in upstream_out
    forwarded = [json.loads(line) for line in upstream_in if b'"tools/call"' in line]
    assert forwarded == [
        {
            "jsonrpc": "2.0",
            "id": 77,
            "method": "tools/call",
            "params": {"arguments": arguments, "name": "copy_image_set"},
        }
    ]
    assert call.encode() not in upstream_in  # written by the proxy, not passed through
    assert answer.rstrip(b"\n") in upstream_out
    assert json.loads(answer)["result"]["isError"] is False
    assert calls(record) == [{"tool": "copy_image_set", "arguments": arguments}]
