"""Shadow rules, dry runs, metrics and traces, checked after known sequences of calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from engine.models import DecideRequest
from engine.obs import tracing
from engine.runtime import Runtime
from engine.transports.server import Servers, start_servers
from tests.clients import GrpcClient, HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    approval_call,
    copy_call,
    copy_policy,
    session,
    settings_for,
)

Client = HttpClient | GrpcClient
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}

TRIAL = """
# A stricter limit on trial: 2 copies per minute per agent, counted but not enforced.
rate_limit contains {
	"rule": "trial.copies_per_agent", "reason": "trial: 2 per minute per agent",
	"max": 2, "window_seconds": 60, "scope": "agent", "shadow": true,
} if input.tool.name == "copy_image_set"

# A trial deny of copies from agent "bot".
deny contains {"rule": "trial.no_bots", "reason": "trial: no bots", "shadow": true} if {
	input.tool.name == "copy_image_set"
	input.principal.agent_id == "bot"
}
"""


@pytest.fixture(scope="module")
async def trial(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    tmp = tmp_path_factory.mktemp("trial")
    rego, data = copy_policy(tmp)
    folder = rego / "mcp" / "rules" / "trial"
    folder.mkdir()
    (folder / "trial.rego").write_text("package mcp.rules.trial\n" + TRIAL)
    running = await start_servers(settings_for(tmp, policy_paths=[rego, data]))
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def trial_http(trial: Servers) -> AsyncIterator[HttpClient]:
    async with httpx.AsyncClient(base_url=trial.http_url) as raw:
        yield HttpClient(raw)


async def logged(servers: Servers, http: HttpClient, decision_id: str) -> dict[str, Any]:
    response = await http.raw.get("/v1/decisions", params={"limit": 1000}, headers=AUTH)
    [record] = [r for r in response.json()["decisions"] if r["decision_id"] == decision_id]
    return record


async def test_shadow_rules_are_logged_never_enforced(
    trial: Servers, trial_http: HttpClient
) -> None:
    agent = "agent-" + session()
    records = []
    for _ in range(4):
        body = copy_call()
        body["principal"]["agent_id"] = agent
        decision = await trial_http.decide(body)
        assert decision["verdict"] == "allow", "a shadow limit never blocks"
        assert decision["rate_limit"]["rule"] == "catalog.rule.copy_image_set"
        records.append(await logged(trial, trial_http, decision["decision_id"]))
    woulds = [{s["rule"]: s["would"] for s in r["shadow"]} for r in records]
    assert [w["trial.copies_per_agent"] for w in woulds] == [
        "pass",
        "pass",
        "rate_limit",
        "rate_limit",
    ]
    bot = copy_call()
    bot["principal"]["agent_id"] = "bot"
    decision = await trial_http.decide(bot)
    assert decision["verdict"] == "allow"
    record = await logged(trial, trial_http, decision["decision_id"])
    assert {
        "level": "deny",
        "rule": "trial.no_bots",
        "reason": "trial: no bots",
        "would": "deny",
    } in record["shadow"]


async def test_shadow_limits_consume_no_real_quota(trial: Servers, trial_http: HttpClient) -> None:
    sid, agent = session(), "agent-" + session()
    for i in range(10):
        body = copy_call(sid)
        body["principal"]["agent_id"] = agent
        decision = await trial_http.decide(body)
        assert decision["rate_limit"]["remaining"] == 9 - i, "only the real limit counts"


async def test_dry_run_changes_nothing(client: Client, http: HttpClient) -> None:
    sid = session()
    body = copy_call(sid)
    for _ in range(3):
        dry = await client.decide({**body, "dry_run": True})
        assert dry["verdict"] == "allow"
        assert dry["dry_run"] is True
        assert dry["rate_limit"]["remaining"] == 9, "a dry run consumes no quota"
    real = await client.decide(body)
    assert real["rate_limit"]["remaining"] == 9
    assert not real.get("dry_run")

    held = approval_call(sid)  # a copy into an existing image set needs approval
    would = await client.decide({**held, "dry_run": True})
    assert would["verdict"] == "approval_required"
    assert "approval" not in would, "a dry run creates no approval"
    pending = await http.approvals(APPROVER_TOKEN, status="pending")
    assert all(a["principal"]["session_id"] != sid for a in pending)

    approval_id = (await client.decide(held))["approval"]["id"]
    await http.act(APPROVER_TOKEN, approval_id, "approve", "ops")
    peek = await client.decide({**held, "approval_id": approval_id, "dry_run": True})
    assert peek["verdict"] == "allow"
    assert (await http.get_approval(APPROVER_TOKEN, approval_id))["status"] == "approved"
    used = await client.decide({**held, "approval_id": approval_id})
    assert used["verdict"] == "allow"
    assert used["rate_limit"]["remaining"] == 8


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_after_a_known_sequence(tmp_path: Path) -> None:
    servers = await start_servers(settings_for(tmp_path))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            http = HttpClient(raw)
            sid = session()
            for _ in range(11):
                await http.decide(copy_call(sid))  # 10 allowed, 1 rate limited
            await http.decide(copy_call(datastore_id="bad"))
            await http.decide({**copy_call(), "tool": "made_up_tool"})
            approval = (await http.decide(approval_call()))["approval"]["id"]
            await http.act(APPROVER_TOKEN, approval, "approve", "ops")
            await raw.post("/v1/decide", content=b"{", headers={"content-type": "application/json"})
            text = (await raw.get("/metrics")).text
    finally:
        await servers.stop()
    m = scrape(text)

    def decisions(verdict: str, tool: str, rule: str) -> float:
        return m[
            ("mcp_policy_decisions_total", (("rule", rule), ("tool", tool), ("verdict", verdict)))
        ]

    assert decisions("allow", "copy_image_set", "catalog.rule.copy_image_set") == 10
    assert decisions("rate_limited", "copy_image_set", "catalog.rule.copy_image_set") == 1
    assert decisions("deny", "copy_image_set", "copy_image_set.datastore_id_invalid") == 1
    assert decisions("deny", "(unknown)", "catalog.default") == 1, "unknown tools: one label"
    assert (
        decisions("approval_required", "copy_image_set", "copy_image_set.existing_destination") == 1
    )
    assert m[("mcp_policy_decision_seconds_count", (("transport", "http"),))] == 14
    assert m[("mcp_policy_opa_seconds_count", ())] == 14
    assert m[("mcp_policy_rate_limit_checks_total", (("outcome", "allowed"),))] == 10
    assert m[("mcp_policy_rate_limit_checks_total", (("outcome", "limited"),))] == 1
    assert m[("mcp_policy_approvals_total", (("event", "requested"),))] == 1
    assert m[("mcp_policy_approvals_total", (("event", "approved"),))] == 1
    assert m[("mcp_policy_invalid_requests_total", (("transport", "http"),))] == 1
    assert m[("mcp_policy_policy_reloads_total", (("result", "applied"),))] == 1
    stages = ("translate", "evaluate", "enforce", "log", "metrics")
    for stage in stages:
        assert m[("mcp_policy_stage_seconds_count", (("stage", stage),))] == 14
        assert m[("mcp_policy_stage_seconds_sum", (("stage", stage),))] > 0
    total = sum(m[("mcp_policy_stage_seconds_sum", (("stage", stage),))] for stage in stages)
    assert total >= m[("mcp_policy_decision_seconds_sum", (("transport", "http"),))]


async def test_opa_errors_are_counted(tmp_path: Path) -> None:
    servers = await start_servers(settings_for(tmp_path))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            await servers.runtime.opa.close()  # the decision client is gone: unreachable
            decision = await HttpClient(raw).decide(copy_call())
            assert decision["verdict"] == "deny"
            await servers.runtime.opa.open()
            text = (await raw.get("/metrics")).text
    finally:
        await servers.stop()
    assert scrape(text)[("mcp_policy_opa_errors_total", (("kind", "unreachable"),))] == 1


async def test_traces_cover_decide_opa_and_stores(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runtime = Runtime(settings_for(tmp_path))
    runtime.service.tracer = tracing.tracer_from(provider)
    await runtime.start()
    try:
        decision = await runtime.service.decide(
            DecideRequest.model_validate(copy_call()), transport="test"
        )
    finally:
        await runtime.stop()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"decide", "opa.evaluate", "ratelimit.acquire"} <= set(spans)
    root = spans["decide"]
    assert spans["opa.evaluate"].parent is not None
    assert spans["opa.evaluate"].parent.span_id == root.context.span_id
    assert root.attributes is not None
    assert root.attributes["mcp_policy.decision_id"] == decision.decision_id
    assert root.attributes["mcp_policy.verdict"] == "allow"
    assert root.attributes["mcp.tool"] == "copy_image_set"


def test_no_exporter_means_no_tracing() -> None:
    assert tracing.provider_for("none") is None
    assert tracing.provider_for("console") is not None
    # Without an exporter a span is one shared context that records nothing.
    tracer = tracing.tracer_from(None)
    with tracing.span(tracer, "decide") as span:
        span.set_attribute("mcp_policy.verdict", "allow")
    assert tracing.span(tracer, "decide") is tracing.span(tracer, "opa.evaluate")
    recording = tracing.tracer_from(TracerProvider())
    assert tracing.span(recording, "decide") is not tracing.span(recording, "decide")


async def test_a_failing_store_for_a_shadow_limit_changes_nothing(
    trial: Servers, trial_http: HttpClient
) -> None:
    """The real limit passes; the shadow counter's store then fails: still allowed."""
    from engine.errors import StateUnavailable

    store = trial.runtime.service.rate_limits
    real_acquire = store.acquire

    async def failing_for_shadow(limits: Any, token: str, *, record: bool = True) -> Any:
        if token.endswith(":shadow"):
            raise StateUnavailable("shadow store down")
        return await real_acquire(limits, token, record=record)

    store.acquire = failing_for_shadow  # type: ignore[method-assign]
    try:
        body = copy_call()
        body["principal"]["agent_id"] = "agent-" + session()
        decision = await trial_http.decide(body)
    finally:
        store.acquire = real_acquire  # type: ignore[method-assign]
    assert decision["verdict"] == "allow"
    record = await logged(trial, trial_http, decision["decision_id"])
    assert {s["rule"]: s["would"] for s in record["shadow"]}[
        "trial.copies_per_agent"
    ] == "not_counted"
