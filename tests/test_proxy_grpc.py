"""`mcp-policy proxy --decision-url`: the proxy (its own process) asks a decision service
running on its own (`start_servers`) over gRPC, and a human approves through the service's
HTTP approval API, as in production."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.policy.opa_process import free_loopback_port
from engine.transports.server import Servers, start_servers
from tests.conftest import APPROVER_TOKEN, DATASTORE, DATASTORE_2, HEALTHIMAGING, settings_for
from tests.fixtures.proxy_harness import (
    EXPORT_LIMIT,
    EXPORT_TOOL,
    FIXTURE,
    RECORD_ENV,
    calls,
    clean_env,
    copy_args,
    decision_of,
    export_args,
    proxy_policy,
    stdio_session,
)


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    tmp = tmp_path_factory.mktemp("proxy-grpc")
    running = await start_servers(
        settings_for(tmp, decision_log="off", policy_paths=proxy_policy(tmp))
    )
    yield running
    await running.stop()


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def test_decisions_over_grpc_with_an_http_approval(service: Servers, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    agent = "agent-" + uuid.uuid4().hex[:8]
    allowed_args = copy_args()
    approval_args = copy_args(source_datastore_id=DATASTORE_2)
    proxy_args = ["--decision-url", service.grpc_target, "--agent-id", agent, "--", *FIXTURE]
    async with (
        httpx.AsyncClient(
            base_url=service.http_url, headers={"Authorization": f"Bearer {APPROVER_TOKEN}"}
        ) as approver,
        stdio_session(
            proxy_args, clean_env(**{RECORD_ENV: str(record)}), tmp_path / "proxy.log"
        ) as session,
    ):
        listed = await session.list_tools()
        allowed = await session.call_tool("copy_image_set", allowed_args)
        denied = await session.call_tool("delete_datastore", {"datastore_id": DATASTORE})
        asked = await session.call_tool("copy_image_set", approval_args)
        assert decision_of(asked) is not None
        approval_id = decision_of(asked)["approval"]["id"]
        answer = await approver.post(
            f"/v1/approvals/{approval_id}/approve", json={"approver": "dr-ops", "comment": "ok"}
        )
        assert answer.status_code == 200, answer.text
        approved = await session.call_tool("copy_image_set", approval_args)
        failures = [
            await session.call_tool(EXPORT_TOOL, export_args()) for _ in range(EXPORT_LIMIT + 1)
        ]
        check = await approver.post(
            "/v1/decide",
            json={
                "server": HEALTHIMAGING,
                "tool": EXPORT_TOOL,
                "arguments": {"datastore_id": DATASTORE},
                "principal": {"agent_id": agent, "session_id": "check"},
            },
        )

    assert sorted(tool.name for tool in listed.tools) == ["copy_image_set", EXPORT_TOOL]
    assert allowed.is_error is False
    assert denied.is_error is True
    assert decision_of(denied) is not None
    assert decision_of(denied)["verdict"] == "deny"
    assert decision_of(denied)["rule"] == "catalog.default"
    assert asked.is_error is True
    assert decision_of(asked)["verdict"] == "approval_required"
    assert approved.is_error is False
    assert [r.is_error for r in failures] == [True] * (EXPORT_LIMIT + 1)
    assert all("export failed" in text_of(r) for r in failures)
    # ReportOutcome over gRPC gave every failed call's slot back.
    assert check.json()["verdict"] == "allow"
    assert check.json()["rate_limit"]["remaining"] == EXPORT_LIMIT - 1
    assert [(c["tool"], c["arguments"]) for c in calls(record)] == [
        ("copy_image_set", allowed_args),
        ("copy_image_set", approval_args),
        *[(EXPORT_TOOL, export_args())] * (EXPORT_LIMIT + 1),
    ]


async def test_decision_service_down_fails_closed(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    proxy_args = [
        "--decision-url",
        f"127.0.0.1:{free_loopback_port()}",
        "--decision-timeout",
        "1",
        "--",
        *FIXTURE,
    ]
    async with stdio_session(
        proxy_args, clean_env(**{RECORD_ENV: str(record)}), tmp_path / "proxy.log"
    ) as session:
        listed = await session.list_tools()
        refused = await session.call_tool("copy_image_set", copy_args())

    # Nothing can be hidden without an answer, but nothing goes through either.
    assert len(listed.tools) == 4
    assert refused.is_error is True
    assert "policy decision service unavailable" in text_of(refused)
    assert decision_of(refused) is not None
    assert decision_of(refused)["rule"] == "proxy.decision_unavailable"
    assert calls(record) == []
