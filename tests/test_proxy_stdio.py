"""`mcp-policy proxy` over stdio, end to end: the real MCP SDK client → the proxy (its own
process, decisions in-process with --embedded) → the fixture MCP server, run by the proxy
as its child over stdio, or reached at a URL. Plus raw JSON-RPC lines for what an SDK
client would never send, and the child's crash, hang, signals and exit status."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import DATASTORE, DATASTORE_2, HEALTHIMAGING, settings_for
from tests.fixtures.proxy_harness import (
    FIXTURE,
    MODE_ENV,
    PROXY,
    RECORD_ENV,
    HttpFixture,
    RawProxy,
    calls,
    clean_env,
    copy_args,
    decision_of,
    embedded_args,
    stdio_session,
)


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def test_allowed_call_reaches_the_server_with_exactly_the_evaluated_arguments(
    tmp_path: Path, record: Path
) -> None:
    env = clean_env(**{RECORD_ENV: str(record)})
    args = copy_args()
    async with stdio_session(
        [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "proxy.log"
    ) as session:
        result = await session.call_tool("copy_image_set", args)

    assert result.is_error is False
    assert result.structured_content is not None
    assert result.structured_content["datastore_id"] == DATASTORE
    assert (
        result.structured_content["source_image_set_properties"]["image_set_id"]
        == (args["source_image_set_id"])
    )
    # The environment reached the child (the record file is named by an env var) and the
    # server saw the call exactly as it was evaluated.
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]


async def test_denied_and_rate_limited_calls_never_reach_the_server(
    tmp_path: Path, record: Path
) -> None:
    env = clean_env(**{RECORD_ENV: str(record)})
    args = copy_args()
    async with stdio_session(
        [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "proxy.log"
    ) as session:
        denied = await session.call_tool("delete_datastore", {"datastore_id": DATASTORE})
        malformed = await session.call_tool(
            "copy_image_set", {"datastore_id": "not-an-id", "source_image_set_id": "x"}
        )
        allowed = [await session.call_tool("copy_image_set", args) for _ in range(10)]
        limited = await session.call_tool("copy_image_set", args)

    assert denied.is_error is True
    assert "delete_datastore" in text_of(denied)
    assert "not in the policy catalog" in text_of(denied)
    assert decision_of(denied) is not None
    assert decision_of(denied)["verdict"] == "deny"
    assert decision_of(denied)["rule"] == "catalog.default"

    assert malformed.is_error is True
    assert decision_of(malformed) is not None
    assert decision_of(malformed)["rule"].startswith("copy_image_set.")
    assert "32-character lowercase hex id" in text_of(malformed)

    assert [r.is_error for r in allowed] == [False] * 10
    assert limited.is_error is True
    assert "rate limit exceeded" in text_of(limited)
    assert decision_of(limited) is not None
    assert decision_of(limited)["verdict"] == "rate_limited"
    assert decision_of(limited)["rate_limit"]["remaining"] == 0
    assert decision_of(limited)["rate_limit"]["retry_after_seconds"] > 0

    assert [c["tool"] for c in calls(record)] == ["copy_image_set"] * 10


async def test_tools_list_hides_tools_the_policy_always_denies(
    tmp_path: Path, record: Path
) -> None:
    env = clean_env(**{RECORD_ENV: str(record)})
    async with stdio_session(
        [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "proxy.log"
    ) as session:
        listed = await session.list_tools()
        hidden_call = await session.call_tool("delete_datastore", {"datastore_id": DATASTORE})
        async with stdio_session(
            [*embedded_args(tmp_path / "all"), "--show-all-tools", "--", *FIXTURE],
            env,
            tmp_path / "proxy-all.log",
        ) as unfiltered:
            everything = await unfiltered.list_tools()

    # copy_image_set is catalogued (its deny for empty arguments depends on the arguments);
    # the others are not in the catalog, so every call to them is denied.
    assert [tool.name for tool in listed.tools] == ["copy_image_set"]
    assert listed.tools[0].input_schema["required"] == [
        "datastore_id",
        "source_image_set_id",
        "copy_image_set_information",
    ]
    assert sorted(tool.name for tool in everything.tools) == [
        "copy_image_set",
        "delete_datastore",
        "list_datastores",
        "start_dicom_export_job",
    ]
    # Hidden or not, a call is decided at call time.
    assert hidden_call.is_error is True
    assert calls(record) == []


async def test_upstream_url_behind_a_stdio_proxy(tmp_path: Path, record: Path) -> None:
    server = HttpFixture.start(clean_env(**{RECORD_ENV: str(record)}), tmp_path / "server.log")
    try:
        args = copy_args()
        async with stdio_session(
            [
                *embedded_args(tmp_path),
                "--upstream",
                server.url,
                "--header",
                "Authorization: Bearer upstream-secret",
            ],
            clean_env(),
            tmp_path / "proxy.log",
        ) as session:
            tools = await session.list_tools()
            allowed = await session.call_tool("copy_image_set", args)
            denied = await session.call_tool("delete_datastore", {"datastore_id": DATASTORE})
    finally:
        server.stop()

    assert [tool.name for tool in tools.tools] == ["copy_image_set"]
    assert allowed.is_error is False
    assert denied.is_error is True
    assert calls(record) == [
        {
            "tool": "copy_image_set",
            "arguments": args,
            "authorization": "Bearer upstream-secret",
        }
    ]


async def test_the_2026_protocol_passes_through(tmp_path: Path, record: Path) -> None:
    """The SDK's Client in its default `auto` mode speaks protocol 2026-07-28 (server/discover,
    no initialize) when the server does; the proxy relays it, child or URL alike."""
    env = clean_env(**{RECORD_ENV: str(record)})
    server = HttpFixture.start(env, tmp_path / "server.log")
    args = copy_args()
    results = {}
    try:
        for name, upstream in (("child", ["--", *FIXTURE]), ("url", ["--upstream", server.url])):
            params = StdioServerParameters(
                command=PROXY[0],
                args=[*PROXY[1:], "proxy", *embedded_args(tmp_path / name), *upstream],
                env=env,
                cwd=str(PROJECT_ROOT),
            )
            with (tmp_path / f"{name}.log").open("w") as errlog:
                async with Client(stdio_client(params, errlog=errlog)) as client:
                    tools = await client.list_tools()
                    allowed = await client.call_tool("copy_image_set", args)
                    denied = await client.call_tool("delete_datastore", {"datastore_id": "x"})
                    results[name] = (client.protocol_version, tools, allowed, denied)
    finally:
        server.stop()

    for version, tools, allowed, denied in results.values():
        assert version == "2026-07-28"
        assert [tool.name for tool in tools.tools] == ["copy_image_set"]
        assert allowed.is_error is False
        assert denied.is_error is True
        assert decision_of(denied) is not None
        assert decision_of(denied)["rule"] == "catalog.default"
    assert [call["arguments"] for call in calls(record)] == [args, args]


async def test_malformed_json_rpc_from_the_client_gets_clear_errors(
    tmp_path: Path, record: Path
) -> None:
    env = clean_env(**{RECORD_ENV: str(record)})
    proxy = await RawProxy.start(
        [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "p.log"
    )
    try:
        init = await proxy.initialize()
        assert init["result"]["serverInfo"]["name"] == HEALTHIMAGING

        await proxy.write_line("this is not JSON")
        parse_error = await proxy.receive()
        await proxy.write_line('[{"jsonrpc": "2.0", "id": 70, "method": "ping"}]')
        batch = await proxy.receive()
        await proxy.write_line('{"id": 71, "method": "ping"}')
        not_rpc = await proxy.receive()
        unknown = await proxy.request("no/such/method", {})
        denied = await proxy.request(
            "tools/call", {"name": "delete_datastore", "arguments": {"datastore_id": DATASTORE}}
        )
        ping = await proxy.request("ping")
    finally:
        status = await proxy.close()

    assert parse_error["id"] is None
    assert parse_error["error"]["code"] == -32700
    assert "not JSON" in parse_error["error"]["message"]
    assert batch["id"] is None
    assert batch["error"]["code"] == -32600
    assert "batches are not supported" in batch["error"]["message"]
    assert not_rpc["id"] == 71
    assert not_rpc["error"]["code"] == -32600
    # Unknown methods are the server's to answer.
    assert unknown["error"]["code"] == -32601
    # And the proxy kept running.
    assert denied["result"]["isError"] is True
    assert denied["result"]["_meta"]["mcp-policy/decision"]["rule"] == "catalog.default"
    assert ping["result"] == {}
    assert status == 0
    assert calls(record) == []


async def test_upstream_crash_answers_the_pending_call_and_exits_with_its_status(
    tmp_path: Path, record: Path
) -> None:
    env = clean_env(**{RECORD_ENV: str(record), MODE_ENV: "crash"})
    proxy = await RawProxy.start(
        [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "p.log"
    )
    try:
        await proxy.initialize()
        answer = await proxy.request(
            "tools/call", {"name": "copy_image_set", "arguments": copy_args()}
        )
        status = await proxy.wait()
    finally:
        await proxy.close()

    assert answer["error"]["code"] == -32000
    assert "exited with status 3" in answer["error"]["message"]
    assert "copy_image_set" in answer["error"]["message"]
    assert status == 3
    assert len(calls(record)) == 1


async def test_upstream_that_hangs_times_out_and_the_proxy_keeps_going(
    tmp_path: Path, record: Path
) -> None:
    env = clean_env(**{RECORD_ENV: str(record), MODE_ENV: "hang"})
    async with stdio_session(
        [*embedded_args(tmp_path), "--upstream-timeout", "1", "--", *FIXTURE],
        env,
        tmp_path / "proxy.log",
    ) as session:
        with pytest.raises(MCPError) as timed_out:
            await session.call_tool("copy_image_set", copy_args())
        still_there = await session.list_tools()

    assert timed_out.value.error.code == -32001
    assert "did not answer tools/call 'copy_image_set' within 1 s" in timed_out.value.error.message
    assert [tool.name for tool in still_there.tools] == ["copy_image_set"]
    assert len(calls(record)) == 1


async def test_signals_reach_the_child_and_its_status_is_the_proxys(
    tmp_path: Path, record: Path
) -> None:
    env = clean_env(**{RECORD_ENV: str(record)})
    proxy = await RawProxy.start(
        [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "p.log"
    )
    try:
        await proxy.initialize()
        proxy.proc.send_signal(signal.SIGTERM)
        status = await proxy.wait()
    finally:
        await proxy.close()

    # The fixture dies of the SIGTERM passed on to it; a shell reports that as 128 + 15.
    assert status == 128 + signal.SIGTERM


async def test_approval_then_the_same_call_again(tmp_path: Path, record: Path) -> None:
    """The agent retries the identical call once a human approved it (approved here through
    a second decision service sharing the proxy's state directory)."""
    env = clean_env(**{RECORD_ENV: str(record)})
    args = copy_args(source_datastore_id=DATASTORE_2)
    approver = Runtime(settings_for(tmp_path, decision_log="off"))
    await approver.start()
    try:
        async with stdio_session(
            [*embedded_args(tmp_path), "--", *FIXTURE], env, tmp_path / "proxy.log"
        ) as session:
            first = await session.call_tool("copy_image_set", args)
            assert decision_of(first) is not None
            approval_id = decision_of(first)["approval"]["id"]
            await approver.service.decide_approval(
                approval_id, approve=True, approver="dr-ops", comment="cross-datastore ok"
            )
            second = await session.call_tool("copy_image_set", args)
            third = await session.call_tool("copy_image_set", args)
    finally:
        await approver.stop()

    assert first.is_error is True
    assert decision_of(first)["verdict"] == "approval_required"
    assert approval_id in text_of(first)
    assert second.is_error is False
    assert third.is_error is True
    assert decision_of(third) is not None
    assert decision_of(third)["verdict"] == "approval_required"
    assert decision_of(third)["approval"]["id"] != approval_id
    assert calls(record) == [{"tool": "copy_image_set", "arguments": args}]


async def test_a_command_that_cannot_start_is_reported(tmp_path: Path) -> None:
    proxy = await RawProxy.start(
        [*embedded_args(tmp_path), "--", str(tmp_path / "no-such-server")],
        clean_env(),
        tmp_path / "p.log",
    )
    status = await proxy.close()
    await asyncio.sleep(0)
    assert status == 127
    assert "cannot start the MCP server" in (tmp_path / "p.log").read_text()
