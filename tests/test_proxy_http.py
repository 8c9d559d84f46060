"""`mcp-policy proxy --listen`, end to end over streamable HTTP: the real MCP SDK client →
the proxy (in this process, with the decision service embedded around a Runtime the test
can also use directly) → the fixture MCP server as a stdio child per MCP session, or at a
URL. Approvals, outcome reports, and an upstream that hangs or crashes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from engine.models import ApprovalStatus, DecideRequest, Principal, Verdict
from engine.proxy.core import APPROVAL_META_KEY, ProxyOptions
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child, open_http
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import (
    DATASTORE,
    DATASTORE_2,
    HEALTHIMAGING,
    INTO_EXISTING,
    copy_call,
    settings_for,
)
from tests.fixtures.proxy_harness import (
    EXPORT_LIMIT,
    EXPORT_TOOL,
    FIXTURE,
    MODE_ENV,
    PROXY,
    RECORD_ENV,
    HttpFixture,
    calls,
    clean_env,
    copy_args,
    decision_of,
    embedded_args,
    export_args,
    http_session,
    proxy_policy,
)


@pytest.fixture(scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    tmp = tmp_path_factory.mktemp("proxy-http")
    running = Runtime(settings_for(tmp, decision_log="off", policy_paths=proxy_policy(tmp)))
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@contextlib.asynccontextmanager
async def proxy(
    runtime: Runtime,
    record: Path,
    *,
    mode: str = "",
    url: str | None = None,
    headers: dict[str, str] | None = None,
    **options: Any,
) -> AsyncIterator[HttpProxy]:
    """The proxy on a free port, in front of a fixture child (or `url`)."""
    env = {**os.environ, RECORD_ENV: str(record), MODE_ENV: mode}

    def open_upstream() -> Any:
        if url is not None:
            return open_http(url, headers)
        return open_child(FIXTURE, env)

    running = await start_http_proxy(
        "127.0.0.1",
        0,
        decider=EmbeddedDecider(runtime),
        options=ProxyOptions(**options),
        open_upstream=open_upstream,
    )
    try:
        yield running
    finally:
        await running.stop()


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def only_session(running: HttpProxy) -> str:
    (session_id,) = running.app.sessions
    return session_id


async def test_decisions_enforced_over_http(runtime: Runtime, record: Path) -> None:
    args = copy_args()
    async with proxy(runtime, record) as running, http_session(running.url) as session:
        listed = await session.list_tools()
        allowed = [await session.call_tool("copy_image_set", args) for _ in range(10)]
        limited = await session.call_tool("copy_image_set", args)
        denied = await session.call_tool("delete_datastore", {"datastore_id": DATASTORE})

    assert sorted(tool.name for tool in listed.tools) == ["copy_image_set", EXPORT_TOOL]
    assert [result.is_error for result in allowed] == [False] * 10
    assert allowed[0].structured_content is not None
    assert allowed[0].structured_content["datastore_id"] == DATASTORE
    assert limited.is_error is True
    assert decision_of(limited) is not None
    assert decision_of(limited)["verdict"] == "rate_limited"
    assert "rate limit exceeded" in text_of(limited)
    assert denied.is_error is True
    assert decision_of(denied) is not None
    assert decision_of(denied)["rule"] == "catalog.default"
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}] * 10


async def test_sdk_client_in_auto_mode_speaks_the_2026_protocol(
    runtime: Runtime, record: Path
) -> None:
    args = copy_args()
    async with proxy(runtime, record) as running, Client(running.url) as client:
        result = await client.call_tool("copy_image_set", args)
        version = client.protocol_version

    assert result.is_error is False
    assert version == "2026-07-28"
    (call,) = calls(record)
    assert (call["tool"], call["arguments"]) == ("copy_image_set", args)
    assert call["meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"


async def test_approval_id_in_meta(runtime: Runtime, record: Path) -> None:
    args = copy_args(copy_image_set_information=INTO_EXISTING)
    async with proxy(runtime, record) as running, http_session(running.url) as session:
        asked = await session.call_tool("copy_image_set", args)
        assert decision_of(asked) is not None
        approval_id = decision_of(asked)["approval"]["id"]
        await runtime.service.decide_approval(
            approval_id, approve=True, approver="dr-ops", comment="overwrite ok"
        )
        meta: Any = {APPROVAL_META_KEY: approval_id}
        approved = await session.call_tool("copy_image_set", args, meta=meta)
        again = await session.call_tool("copy_image_set", args, meta=meta)

    assert asked.is_error is True
    assert decision_of(asked)["verdict"] == "approval_required"
    assert "into the existing image set" in text_of(asked)
    assert approved.is_error is False
    assert again.is_error is True
    assert decision_of(again) is not None
    assert decision_of(again)["verdict"] == "deny"
    assert f"approval {approval_id} was already used" in text_of(again)
    # The approval id never reached the server: the proxy strips it.
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]


async def waiting_approval(runtime: Runtime, image_set: str) -> str:
    for _ in range(200):
        for approval in await runtime.approvals.list(ApprovalStatus.PENDING, 1000):
            if approval.arguments.get("source_image_set_id") == image_set:
                return approval.id
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


async def test_proxy_waits_for_the_approval(runtime: Runtime, record: Path) -> None:
    args = copy_args(source_datastore_id=DATASTORE_2)
    async with (
        proxy(runtime, record, approval_wait=30) as running,
        http_session(running.url) as session,
    ):
        call = asyncio.create_task(session.call_tool("copy_image_set", args))
        approval_id = await waiting_approval(runtime, args["source_image_set_id"])
        assert not call.done()
        await runtime.service.decide_approval(
            approval_id, approve=True, approver="dr-ops", comment="ok"
        )
        result = await call

    assert result.is_error is False
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]
    approval = await runtime.service.get_approval(approval_id)
    assert approval.status is ApprovalStatus.USED


async def test_waiting_ends_with_a_denial_or_the_wait(runtime: Runtime, record: Path) -> None:
    refused_args = copy_args(copy_image_set_information=INTO_EXISTING)
    unanswered_args = copy_args(copy_image_set_information=INTO_EXISTING)
    async with (
        proxy(runtime, record, approval_wait=30) as running,
        http_session(running.url) as session,
    ):
        call = asyncio.create_task(session.call_tool("copy_image_set", refused_args))
        approval_id = await waiting_approval(runtime, refused_args["source_image_set_id"])
        await runtime.service.decide_approval(
            approval_id, approve=False, approver="dr-ops", comment="not this datastore"
        )
        refused = await call
    async with (
        proxy(runtime, record, approval_wait=0.3) as running,
        http_session(running.url) as session,
    ):
        unanswered = await session.call_tool("copy_image_set", unanswered_args)

    assert refused.is_error is True
    assert "approval denied by dr-ops: not this datastore" in text_of(refused)
    assert unanswered.is_error is True
    assert decision_of(unanswered) is not None
    assert decision_of(unanswered)["verdict"] == "approval_required"
    assert "pending" in text_of(unanswered)
    assert calls(record) == []


async def test_failed_upstream_calls_give_their_rate_limit_slot_back(
    runtime: Runtime, record: Path
) -> None:
    agent = "agent-" + uuid.uuid4().hex[:8]
    async with (
        proxy(runtime, record, agent_id=agent) as running,
        http_session(running.url) as session,
    ):
        results = [
            await session.call_tool(EXPORT_TOOL, export_args()) for _ in range(EXPORT_LIMIT + 1)
        ]

    # Each call reached the server and failed there, so none of them used up the limit.
    assert len(calls(record)) == EXPORT_LIMIT + 1
    for result in results:
        assert result.is_error is True
        assert "export failed" in text_of(result)
        assert "rate limit" not in text_of(result)
    decision = await runtime.service.decide(
        DecideRequest(
            server=HEALTHIMAGING,
            tool=EXPORT_TOOL,
            arguments={"datastore_id": DATASTORE},
            principal=Principal(agent_id=agent, session_id="check"),
        ),
        transport="test",
    )
    assert decision.verdict is Verdict.ALLOW
    assert decision.rate_limit is not None
    assert decision.rate_limit.remaining == EXPORT_LIMIT - 1


async def test_upstream_that_hangs(runtime: Runtime, record: Path) -> None:
    args = copy_args()
    async with (
        proxy(runtime, record, mode="hang", upstream_timeout=1) as running,
        http_session(running.url) as session,
    ):
        with pytest.raises(MCPError) as timed_out:
            await session.call_tool("copy_image_set", args)
        listed = await session.list_tools()
        session_id = only_session(running)

    assert timed_out.value.error.code == -32001
    assert "within 1 s" in timed_out.value.error.message
    assert [tool.name for tool in listed.tools] == ["copy_image_set", EXPORT_TOOL]
    assert len(calls(record)) == 1
    # The timed-out call was reported as failed: its slot is back (10 per session).
    body = copy_call(session_id)
    body["arguments"] = args
    decision = await runtime.service.decide(DecideRequest.model_validate(body), transport="test")
    assert decision.rate_limit is not None
    assert decision.rate_limit.remaining == 9


async def test_upstream_that_crashes(runtime: Runtime, record: Path) -> None:
    async with proxy(runtime, record, mode="crash") as running:
        async with http_session(running.url) as session:
            with pytest.raises(MCPError) as crashed:
                await session.call_tool("copy_image_set", copy_args())
            with pytest.raises(MCPError) as after:
                await session.list_tools()
        # The proxy keeps serving: a new session gets a new child.
        async with http_session(running.url) as fresh:
            listed = await fresh.list_tools()

    assert crashed.value.error.code == -32000
    assert "exited with status 3" in crashed.value.error.message
    assert after.value.error.code == -32000
    assert "start a new session" in after.value.error.message
    assert [tool.name for tool in listed.tools] == ["copy_image_set", EXPORT_TOOL]


async def test_upstream_url_over_http(runtime: Runtime, record: Path, tmp_path: Path) -> None:
    server = HttpFixture.start(clean_env(**{RECORD_ENV: str(record)}), tmp_path / "server.log")
    args = copy_args()
    try:
        async with (
            proxy(
                runtime,
                record,
                url=server.url,
                headers={"Authorization": "Bearer upstream-secret"},
            ) as running,
            http_session(running.url) as session,
        ):
            listed = await session.list_tools()
            allowed = await session.call_tool("copy_image_set", args)
            denied = await session.call_tool("delete_datastore", {"datastore_id": DATASTORE})
    finally:
        server.stop()

    assert sorted(tool.name for tool in listed.tools) == ["copy_image_set", EXPORT_TOOL]
    assert allowed.is_error is False
    assert denied.is_error is True
    assert calls(record) == [
        {"tool": "copy_image_set", "arguments": args, "authorization": "Bearer upstream-secret"}
    ]


async def test_the_listen_command(tmp_path: Path, record: Path) -> None:
    """`mcp-policy proxy --listen` as users run it: prints its URL, serves, stops on SIGTERM."""
    args = copy_args()
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "proxy",
        *embedded_args(tmp_path),
        "--listen",
        "127.0.0.1:0",
        "--",
        *FIXTURE,
        stdout=asyncio.subprocess.PIPE,
        env=clean_env(**{RECORD_ENV: str(record)}),
        cwd=str(PROJECT_ROOT),
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "MCP on http://127.0.0.1:" in line, line
        url = line.split("MCP on ", 1)[1].split(" ", 1)[0]
        async with http_session(url) as session:
            result = await session.call_tool("copy_image_set", args)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(proc.wait(), 30)
        rest = (await proc.stdout.read()).decode()

    assert result.is_error is False
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]
    assert status == 0
    assert "stopping" in rest
