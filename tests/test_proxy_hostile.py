"""What a hostile agent can send the proxy, over both transports, with a real upstream.

A `tools/call` without a usable id (a notification, `"id": null`, `true`, `7.5`, ...)
would be neither decided nor answered: it is refused with -32600 and never relayed. Text
that is not strict JSON (duplicate keys, NaN, Infinity, 1e400, a 5000-digit integer, lone
UTF-16 surrogates, nesting past the service's limit, bytes that are not UTF-8) gets a
bounded -32700; what parses but is not one JSON-RPC message gets -32600. Each case is
sent in a live session: the test checks what the agent got back, that the upstream MCP
server received nothing of it (the fixture records every request and notification it
receives), and that the session still relays an allowed call afterwards.

stdio: one `mcp-policy proxy` process for the module, raw lines on its stdin. HTTP: the
`--listen` app in this process, a real SDK client session per test, the hostile body
POSTed into that session (and as the first POST of a session that does not exist yet).
The proxy core's own guard (behind the transports' screen) and its answer to an
unexpected failure are tested with the core relaying to a real fixture child.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCError, JSONRPCNotification, JSONRPCRequest, JSONRPCResponse

from engine.models import DecideRequest, Decision
from engine.proxy.core import ProxyOptions, ProxySession
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child
from engine.runtime import Runtime
from tests.conftest import (
    DATASTORE,
    HEALTHIMAGING,
    copy_policy,
    settings_for,
    without_agent_limit,
)
from tests.fixtures.imaging_server import INBOUND_ENV
from tests.fixtures.proxy_harness import (
    FIXTURE,
    RECORD_ENV,
    RawProxy,
    calls,
    clean_env,
    copy_args,
    embedded_args,
    http_session,
)

PROTOCOL = "2025-11-25"
DENIED = {"name": "delete_datastore", "arguments": {"datastore_id": DATASTORE}}
# Errors cite at most this much: never the megabytes a hostile agent sent.
MESSAGE_BOUND = 300


@dataclass(frozen=True)
class Hostile:
    name: str
    raw: bytes
    code: int
    request_id: Any  # what the error's id must be
    phrase: str  # what the error message must say (case-insensitive)


def _call(params: str, id_part: str = '"id": 7, ') -> bytes:
    return (
        '{"jsonrpc": "2.0", ' + id_part + '"method": "tools/call", "params": ' + params + "}"
    ).encode()


def _copy(arguments: str) -> bytes:
    return _call('{"name": "copy_image_set", "arguments": ' + arguments + "}")


def _nested(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


_DENIED = json.dumps(DENIED)
_SOURCE = '"source_image_set_id": "' + "0" * 32 + '"'
_INVALID = "Invalid Request"

HOSTILE = [
    # A tools/call without a usable id: never decided, so never relayed.
    Hostile(
        "notification", _call(_DENIED, id_part=""), -32600, None, "tools/call must be a request"
    ),
    Hostile("id-null", _call(_DENIED, '"id": null, '), -32600, None, "never null"),
    Hostile("id-true", _call(_DENIED, '"id": true, '), -32600, None, "string or an integer"),
    Hostile("id-float", _call(_DENIED, '"id": 7.5, '), -32600, None, "string or an integer"),
    Hostile(
        "id-integral-float", _call(_DENIED, '"id": 7.0, '), -32600, None, "string or an integer"
    ),
    Hostile("id-object", _call(_DENIED, '"id": {}, '), -32600, None, "string or an integer"),
    Hostile("id-array", _call(_DENIED, '"id": [7], '), -32600, None, "string or an integer"),
    Hostile(
        "ping-id-null",
        b'{"jsonrpc": "2.0", "id": null, "method": "ping"}',
        -32600,
        None,
        "never null",
    ),
    # Parses, but is not one JSON-RPC message.
    Hostile(
        "method-and-error",
        _call(_DENIED)[:-1] + b', "error": {"code": 1, "message": "x"}}',
        -32600,
        7,
        "not both",
    ),
    Hostile("method-and-result", _call(_DENIED)[:-1] + b', "result": {}}', -32600, 7, "not both"),
    Hostile("params-array", _call("[]"), -32600, 7, "not a JSON-RPC 2.0"),
    Hostile("batch", b"[" + _call(_DENIED) + b"]", -32600, None, "batches are not supported"),
    Hostile("scalar", b'"tools/call"', -32600, None, "not a JSON-RPC 2.0"),
    # Not strict JSON.
    Hostile(
        "duplicate-name",
        _call('{"name": "copy_image_set", "name": "delete_datastore", "arguments": {}}'),
        -32700,
        None,
        "duplicate key",
    ),
    Hostile(
        "duplicate-params",
        _call('{"name": "copy_image_set"}, "params": ' + _DENIED),
        -32700,
        None,
        "duplicate key",
    ),
    Hostile(
        "duplicate-argument",
        _copy('{"datastore_id": "' + DATASTORE + '", "datastore_id": "x", ' + _SOURCE + "}"),
        -32700,
        None,
        "duplicate key",
    ),
    Hostile("duplicate-id", _call(_DENIED, '"id": 7, "id": 8, '), -32700, None, "duplicate key"),
    Hostile(
        "duplicate-method",
        b'{"jsonrpc": "2.0", "id": 7, "method": "ping", "method": "tools/call", "params": '
        + _DENIED.encode()
        + b"}",
        -32700,
        None,
        "duplicate key",
    ),
    Hostile(
        "duplicate-long-key",
        _copy('{"' + "k" * 5000 + '": 1, "' + "k" * 5000 + '": 2}'),
        -32700,
        None,
        "duplicate key",
    ),
    Hostile("nan", _copy('{"datastore_id": NaN}'), -32700, None, "NaN"),
    Hostile("infinity", _copy('{"datastore_id": Infinity}'), -32700, None, "Infinity"),
    Hostile("minus-infinity", _copy('{"datastore_id": -Infinity}'), -32700, None, "Infinity"),
    Hostile("overflow-1e400", _copy('{"datastore_id": 1e400}'), -32700, None, "1e400"),
    Hostile("overflow-minus-1e400", _copy('{"force": -1e400}'), -32700, None, "1e400"),
    Hostile("huge-integer", _copy('{"datastore_id": ' + "9" * 5000 + "}"), -32700, None, "digits"),
    Hostile(
        "huge-integer-id", _call(_DENIED, '"id": ' + "7" * 5000 + ", "), -32700, None, "digits"
    ),
    Hostile("surrogate-in-key", _copy('{"\\ud800": 1}'), -32700, None, "surrogate"),
    Hostile(
        "surrogate-in-value",
        _copy('{"datastore_id": "' + DATASTORE + '\\udfff", ' + _SOURCE + "}"),
        -32700,
        None,
        "surrogate",
    ),
    Hostile(
        "surrogate-in-tool-name",
        _call('{"name": "delete_datastore\\ud800", "arguments": {}}'),
        -32700,
        None,
        "surrogate",
    ),
    Hostile(
        "surrogate-in-method",
        b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call\\udc00", "params": {}}',
        -32700,
        None,
        "surrogate",
    ),
    Hostile("too-deep", _copy(_nested(40)), -32700, None, "deeper"),
    Hostile("far-too-deep", _copy("[" * 100_000 + "]" * 100_000), -32700, None, "deeper"),
    Hostile(
        "not-utf8",
        _call(_DENIED).replace(b"delete_datastore", b"delete\xffdatastore"),
        -32700,
        None,
        "UTF-8",
    ),
    Hostile("not-json", b"tools/call delete_datastore", -32700, None, "not JSON"),
]


def check_error(error: dict[str, Any], case: Hostile) -> None:
    """The JSON-RPC error the agent got for `case`."""
    assert error["jsonrpc"] == "2.0"
    assert "id" in error and error["id"] == case.request_id
    assert error["error"]["code"] == case.code
    message = error["error"]["message"]
    assert message.startswith("Parse error" if case.code == -32700 else _INVALID), message
    assert case.phrase.lower() in message.lower(), message
    assert len(message) <= MESSAGE_BOUND, message
    assert "k" * 101 not in message
    assert "Traceback" not in message


def relaxed_policy(tmp: Path) -> list[Path]:
    """The shipped policy, with copy_image_set's limit raised (and its per-agent one left
    out) so one session can make an allowed call after every hostile message."""
    rego, data = copy_policy(tmp)
    without_agent_limit(rego)
    rules_file = data / "rules.yaml"
    rules = yaml.safe_load(rules_file.read_text())
    rules["mcp_policy"]["rules"]["copy_image_set"]["rate_limit"]["max"] = 10_000
    rules_file.write_text(yaml.safe_dump(rules))
    return [rego, data]


def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def only_the_allowed_call(
    inbound: list[dict[str, Any]], args: dict[str, Any], *, listing: bool = False
) -> None:
    """What the upstream received since the hostile message: exactly the allowed call (and
    with `listing`, the tools/list the SDK client sends to check a result's schema)."""
    if listing:
        assert [(m["method"], m["params"]) for m in inbound if m["method"] == "tools/list"] == [
            ("tools/list", None)
        ]
        inbound = [m for m in inbound if m["method"] != "tools/list"]
    assert [(m["method"], m["params"]) for m in inbound] == [
        ("tools/call", {"name": "copy_image_set", "arguments": args})
    ]
    assert isinstance(inbound[0]["id"], int)


# stdio.


@dataclass
class StdioRig:
    proxy: RawProxy
    record: Path
    inbound: Path


@pytest.fixture(scope="module")
async def stdio_rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StdioRig]:
    tmp = tmp_path_factory.mktemp("hostile-stdio")
    record, inbound = tmp / "calls.jsonl", tmp / "inbound.jsonl"
    env = clean_env(**{RECORD_ENV: str(record), INBOUND_ENV: str(inbound)})
    proxy = await RawProxy.start(
        [*embedded_args(tmp, relaxed_policy(tmp)), "--", *FIXTURE], env, tmp / "proxy.log"
    )
    try:
        init = await proxy.initialize()
        assert init["result"]["serverInfo"]["name"] == HEALTHIMAGING
        # Answered only after the upstream got (and recorded) everything before it.
        assert (await proxy.request("ping"))["result"] == {}
        yield StdioRig(proxy, record, inbound)
    finally:
        status = await proxy.close()
    assert status == 0


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
async def test_stdio_hostile_line(stdio_rig: StdioRig, case: Hostile) -> None:
    proxy = stdio_rig.proxy
    inbound_before = len(lines_of(stdio_rig.inbound))
    calls_before = len(calls(stdio_rig.record))
    assert proxy.proc.stdin is not None
    proxy.proc.stdin.write(case.raw + b"\n")
    await proxy.proc.stdin.drain()
    answer = await proxy.receive()
    args = copy_args()
    allowed = await proxy.request("tools/call", {"name": "copy_image_set", "arguments": args})

    check_error(answer, case)
    assert allowed["result"]["isError"] is False, allowed
    assert allowed["result"]["structuredContent"]["datastore_id"] == DATASTORE
    only_the_allowed_call(lines_of(stdio_rig.inbound)[inbound_before:], args)
    assert calls(stdio_rig.record)[calls_before:] == [{"tool": "copy_image_set", "arguments": args}]


async def test_stdio_session_began_with_nothing_but_the_handshake(stdio_rig: StdioRig) -> None:
    """Whatever the hostile lines did, the upstream received the agent's handshake and a
    ping, then nothing but the allowed copy_image_set calls."""
    methods = [m["method"] for m in lines_of(stdio_rig.inbound)]
    assert methods[:3] == ["initialize", "notifications/initialized", "ping"]
    assert methods[3:] == ["tools/call"] * (len(methods) - 3)
    assert len(methods) - 3 == len(HOSTILE)
    assert {c["tool"] for c in calls(stdio_rig.record)} <= {"copy_image_set"}


# HTTP.


@pytest.fixture(scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    tmp = tmp_path_factory.mktemp("hostile-http")
    running = Runtime(settings_for(tmp, decision_log="off", policy_paths=relaxed_policy(tmp)))
    await running.start()
    yield running
    await running.stop()


@contextlib.asynccontextmanager
async def http_proxy(runtime: Runtime, record: Path, inbound: Path) -> AsyncIterator[HttpProxy]:
    env = {**os.environ, RECORD_ENV: str(record), INBOUND_ENV: str(inbound)}
    running = await start_http_proxy(
        "127.0.0.1",
        0,
        decider=EmbeddedDecider(runtime),
        options=ProxyOptions(),
        open_upstream=lambda: open_child(FIXTURE, env),
    )
    try:
        yield running
    finally:
        await running.stop()


def post_headers(session_id: str | None) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": PROTOCOL,
    }
    if session_id is not None:
        headers["mcp-session-id"] = session_id
    return headers


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
async def test_http_hostile_post(runtime: Runtime, tmp_path: Path, case: Hostile) -> None:
    record, inbound = tmp_path / "calls.jsonl", tmp_path / "inbound.jsonl"
    args = copy_args()
    async with (
        http_proxy(runtime, record, inbound) as running,
        http_session(running.url) as session,
        httpx.AsyncClient(timeout=30) as raw,
    ):
        (session_id,) = running.app.sessions
        response = await raw.post(running.url, content=case.raw, headers=post_headers(session_id))
        allowed = await session.call_tool("copy_image_set", args)
        sessions = set(running.app.sessions)

    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    check_error(response.json(), case)
    assert allowed.is_error is False
    assert allowed.structured_content is not None
    assert allowed.structured_content["datastore_id"] == DATASTORE
    assert sessions == {session_id}
    received = lines_of(inbound)
    assert [m["method"] for m in received[:2]] == ["initialize", "notifications/initialized"]
    only_the_allowed_call(received[2:], args, listing=True)
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]


@pytest.mark.parametrize(
    "case",
    [case for case in HOSTILE if case.name in ("id-null", "duplicate-params", "surrogate-in-key")],
    ids=lambda case: case.name,
)
async def test_http_hostile_first_post_opens_no_session(
    runtime: Runtime, tmp_path: Path, case: Hostile
) -> None:
    """A hostile body as the POST that would open a session: answered, and no session
    (so no upstream server) is started for it; a proper session still opens after it."""
    record, inbound = tmp_path / "calls.jsonl", tmp_path / "inbound.jsonl"
    args = copy_args()
    async with http_proxy(runtime, record, inbound) as running:
        async with httpx.AsyncClient(timeout=30) as raw:
            response = await raw.post(running.url, content=case.raw, headers=post_headers(None))
        sessions_after_hostile = dict(running.app.sessions)
        upstream_after_hostile = lines_of(inbound)
        async with http_session(running.url) as session:
            allowed = await session.call_tool("copy_image_set", args)

    assert response.status_code == 400
    check_error(response.json(), case)
    assert sessions_after_hostile == {}
    assert upstream_after_hostile == []
    assert allowed.is_error is False
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]


async def test_http_tools_call_notification_in_chunks(runtime: Runtime, tmp_path: Path) -> None:
    """A tools/call notification POSTed in many small chunks is screened as one body: 400,
    not relayed, and the session goes on."""
    record, inbound = tmp_path / "calls.jsonl", tmp_path / "inbound.jsonl"
    notification = json.dumps({"jsonrpc": "2.0", "method": "tools/call", "params": DENIED})

    async def chunks() -> AsyncIterator[bytes]:
        data = notification.encode()
        for start in range(0, len(data), 7):
            yield data[start : start + 7]

    async with (
        http_proxy(runtime, record, inbound) as running,
        http_session(running.url) as session,
        httpx.AsyncClient(timeout=30) as raw,
    ):
        (session_id,) = running.app.sessions
        response = await raw.post(running.url, content=chunks(), headers=post_headers(session_id))
        listed = await session.list_tools()

    assert response.status_code == 400
    assert response.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": -32600,
            "message": "Invalid Request: tools/call must be a request with an id (a string or "
            "an integer); sent as a notification it is neither decided nor relayed",
        },
    }
    assert [tool.name for tool in listed.tools] == ["copy_image_set"]
    assert [m["method"] for m in lines_of(inbound)] == [
        "initialize",
        "notifications/initialized",
        "tools/list",
    ]
    assert calls(record) == []


# The core, behind the transports' screen.


class Agent:
    """The agent side of a ProxySession: messages in, answers out, in memory."""

    def __init__(self) -> None:
        self.to_proxy, self.inbox = anyio.create_memory_object_stream[SessionMessage | Exception](
            16
        )
        self.outbox, self.from_proxy = anyio.create_memory_object_stream[SessionMessage](16)

    async def close(self) -> None:
        for stream in (self.to_proxy, self.inbox, self.outbox, self.from_proxy):
            await stream.aclose()

    async def send(self, message: JSONRPCRequest | JSONRPCNotification) -> None:
        await self.to_proxy.send(SessionMessage(message))

    async def answer(self) -> JSONRPCResponse | JSONRPCError:
        with anyio.fail_after(30):
            while True:
                message = (await self.from_proxy.receive()).message
                if isinstance(message, JSONRPCResponse | JSONRPCError):
                    return message


@contextlib.asynccontextmanager
async def core_session(decider: Any, tmp_path: Path) -> AsyncIterator[tuple[Agent, Path, Path]]:
    """A ProxySession relaying to a real fixture child, initialized."""
    record, inbound = tmp_path / "calls.jsonl", tmp_path / "inbound.jsonl"
    env = {**os.environ, RECORD_ENV: str(record), INBOUND_ENV: str(inbound)}
    agent = Agent()
    session = ProxySession(decider, ProxyOptions(), session_id="core-" + uuid.uuid4().hex)
    async with (
        contextlib.AsyncExitStack() as closing,
        open_child(FIXTURE, env) as upstream,
        anyio.create_task_group() as tg,
    ):
        closing.push_async_callback(agent.close)
        tg.start_soon(session.run, agent.inbox, agent.outbox, upstream)
        await agent.send(
            JSONRPCRequest(
                jsonrpc="2.0",
                id=1,
                method="initialize",
                params={
                    "protocolVersion": PROTOCOL,
                    "capabilities": {},
                    "clientInfo": {"name": "core-test", "version": "1"},
                },
            )
        )
        init = await agent.answer()
        assert isinstance(init, JSONRPCResponse)
        await agent.send(JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized"))
        try:
            yield agent, record, inbound
        finally:
            await agent.to_proxy.aclose()


async def test_core_never_relays_a_tools_call_notification(
    runtime: Runtime, tmp_path: Path
) -> None:
    args = copy_args()
    async with core_session(EmbeddedDecider(runtime), tmp_path) as (agent, record, inbound):
        await agent.send(JSONRPCNotification(jsonrpc="2.0", method="tools/call", params=DENIED))
        refused = await agent.answer()
        await agent.send(
            JSONRPCRequest(
                jsonrpc="2.0",
                id=2,
                method="tools/call",
                params={"name": "copy_image_set", "arguments": args},
            )
        )
        allowed = await agent.answer()

    assert isinstance(refused, JSONRPCError)
    assert refused.id is None
    assert refused.error.code == -32600
    assert "tools/call must be a request with an id" in refused.error.message
    assert isinstance(allowed, JSONRPCResponse)
    assert allowed.id == 2
    assert allowed.result["isError"] is False
    assert [m["method"] for m in lines_of(inbound)] == [
        "initialize",
        "notifications/initialized",
        "tools/call",
    ]
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]


class BrokenDecider:
    """A decider failing in a way nobody planned for."""

    async def decide(self, request: DecideRequest) -> Decision:
        raise RuntimeError("secret internals: /srv/keys/proxy.pem")

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool:
        return False

    async def close(self) -> None:
        return None


async def test_an_unexpected_failure_is_answered_without_its_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="engine.proxy.core")
    async with core_session(BrokenDecider(), tmp_path) as (agent, record, inbound):
        await agent.send(
            JSONRPCRequest(
                jsonrpc="2.0",
                id=2,
                method="tools/call",
                params={"name": "copy_image_set", "arguments": copy_args()},
            )
        )
        failed = await agent.answer()

    assert isinstance(failed, JSONRPCError)
    assert failed.id == 2
    assert failed.error.code == -32603
    assert failed.error.message == "internal proxy error"
    assert failed.error.data is None
    # The proxy's own log has the traceback.
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert logged and "secret internals" in str(logged[0].exc_info[1])  # type: ignore[index]
    assert "tools/call" not in [m["method"] for m in lines_of(inbound)]
    assert calls(record) == []


async def test_the_embedded_proxy_screens_at_its_own_depth(tmp_path: Path) -> None:
    """`--embedded` screens agent messages at the runtime's MCP_POLICY_MAX_JSON_DEPTH."""
    record = tmp_path / "calls.jsonl"
    env = clean_env(**{RECORD_ENV: str(record), "MCP_POLICY_MAX_JSON_DEPTH": "6"})
    proxy = await RawProxy.start(
        [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "p.log"
    )
    try:
        await proxy.initialize()
        deep: Any = "x"
        for _ in range(6):
            deep = {"a": deep}
        params = {"name": "copy_image_set", "arguments": copy_args(deep=deep)}
        await proxy.send({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params})
        answer = await proxy.receive()  # text past the depth: no id can be trusted from it
    finally:
        await proxy.close()
    assert answer["id"] is None
    assert answer["error"]["code"] == -32700
    assert "deeper than 6" in answer["error"]["message"]
    assert calls(record) == []
