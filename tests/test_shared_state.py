"""Shared state through the whole service: replicas sharing one Redis (or one SQLite
host) enforce one limit exactly, restarts and reloads keep counters and approvals, a
failed upstream call gives its slot back, weighted limits count arguments, and a store
that fails never turns into an allow."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml

from engine.errors import StateUnavailable
from engine.policy.opa_process import OpaProcess
from engine.policy.source import read_bundle
from engine.transports.server import Servers, start_servers
from tests.clients import GrpcClient, HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    approval_call,
    copy_call,
    copy_policy,
    session,
    settings_for,
    without_agent_limit,
)
from tests.kv import KvServer
from tests.processes import Serve

Client = HttpClient | GrpcClient
PAY = {"server": "payments-mcp", "tool": "pay"}


def edit_policy(tmp: Path, copy_limit: int) -> tuple[Path, Path]:
    """The shipped policy with copy_image_set at `copy_limit` per minute (without its
    per-agent limit), plus a `pay` tool whose limit is a spend cap of 100 per minute
    counting its `amount` argument."""
    rego, data = copy_policy(tmp)
    without_agent_limit(rego)
    rules_file = data / "rules.yaml"
    rules = yaml.safe_load(rules_file.read_text())
    rules["mcp_policy"]["rules"]["copy_image_set"]["rate_limit"]["max"] = copy_limit
    rules["mcp_policy"]["rules"]["pay"] = {
        "action": "rate_limit",
        "rate_limit": {"max": 100, "window": 60, "increment_from": "amount"},
    }
    rules_file.write_text(yaml.safe_dump(rules))
    catalog_file = data / "catalog.yaml"
    catalog = yaml.safe_load(catalog_file.read_text())
    catalog["mcp_policy"]["catalog"].setdefault(PAY["server"], {})["pay"] = {
        "category": "write",
        "risk": "high",
    }
    catalog_file.write_text(yaml.safe_dump(catalog))
    return rego, data


async def hammer(urls: list[str], body: dict[str, Any], count: int) -> list[str]:
    """`count` concurrent decisions spread over `urls` (aiohttp: httpx's pool is slow with
    hundreds of requests in flight)."""
    connector = aiohttp.TCPConnector(limit=300)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one(i: int) -> str:
            async with client.post(f"{urls[i % len(urls)]}/v1/decide", json=body) as response:
                assert response.status == 200, await response.text()
                decision = await response.json()
                verdict: str = decision["verdict"]
                if verdict == "deny":
                    return f"deny: {decision['reason']}"
                return verdict

        return await asyncio.gather(*[one(i) for i in range(count)])


@pytest.fixture
async def shared_opa() -> AsyncIterator[OpaProcess]:
    opa = OpaProcess("opa")
    await opa.start()
    yield opa
    await opa.stop()


def replicas(tmp: Path, opa: OpaProcess, env: dict[str, str], count: int = 3) -> list[Serve]:
    """`count` services on one OPA. Their evaluation deadline is raised: 1,000 calls at
    once on two cores would otherwise fail closed on OPA's timeout, which is not what
    these tests are about (the same for Redis operations, and for the wait on a locked
    SQLite file)."""
    env = {
        **env,
        "MCP_POLICY_OPA_TIMEOUT_MS": "10000",
        "MCP_POLICY_REDIS_TIMEOUT_MS": "10000",
        "MCP_POLICY_SQLITE_BUSY_TIMEOUT_MS": "10000",
    }
    rego, data = edit_policy(tmp, copy_limit=100)
    started = []
    try:
        for i in range(count):
            started.append(
                Serve(
                    tmp,
                    [rego, data],
                    env,
                    "--opa-url",
                    opa.url,
                    "--decision-log",
                    str(tmp / f"decisions-{i}.jsonl"),
                    measured=False,
                )
            )
    except BaseException:
        for serve in started:
            serve.stop()
        raise
    return started


async def test_replicas_sharing_redis_allow_exactly_the_limit(
    tmp_path: Path, shared_opa: OpaProcess, kv_server: KvServer
) -> None:
    env = {
        "MCP_POLICY_REDIS_URL": kv_server.url,
        "MCP_POLICY_REDIS_PREFIX": f"replicas-{session()}:",
    }
    services = replicas(tmp_path, shared_opa, env)
    try:
        verdicts = await hammer([s.url for s in services], copy_call(session()), 1000)
    finally:
        for service in services:
            assert service.stop() == 0
    assert verdicts.count("allow") == 100
    assert verdicts.count("rate_limited") == 900, sorted(set(verdicts))


async def test_processes_sharing_sqlite_allow_exactly_the_limit(
    tmp_path: Path, shared_opa: OpaProcess
) -> None:
    services = replicas(tmp_path, shared_opa, {"MCP_POLICY_STATE_STORE": "sqlite"})
    try:
        verdicts = await hammer([s.url for s in services], copy_call(session()), 1000)
    finally:
        for service in services:
            assert service.stop() == 0
    assert verdicts.count("allow") == 100
    assert verdicts.count("rate_limited") == 900, sorted(set(verdicts))


def store_settings(kind: str, tmp: Path, kv: KvServer | None, **extra: Any) -> Any:
    if kind == "redis":
        assert kv is not None
        extra |= {"redis_url": kv.url, "redis_prefix": f"restart-{session()}:"}
    return settings_for(tmp, state_store=kind, **extra)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_counters_and_approvals_survive_a_restart(
    tmp_path: Path, kind: str, kv_pool: Any
) -> None:
    settings = store_settings(kind, tmp_path, kv_pool.get("redis") if kind == "redis" else None)
    counted, pending, granted = copy_call(), approval_call(), approval_call()
    granted["arguments"]["source_datastore_id"] = "a" * 32
    used = approval_call(source_datastore_id="b" * 32)
    servers = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            for _ in range(3):
                assert (await client.decide(counted))["verdict"] == "allow"
            ids = {
                name: (await client.decide(call))["approval"]["id"]
                for name, call in (("pending", pending), ("granted", granted), ("used", used))
            }
            for name in ("granted", "used"):
                await client.act(APPROVER_TOKEN, ids[name], "approve", "ops")
            assert (await client.decide({**used, "approval_id": ids["used"]}))["verdict"] == "allow"
    finally:
        await servers.stop()

    servers = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            after = await client.decide(counted)
            assert after["rate_limit"]["remaining"] == 10 - 4, "a restart resets no quota"
            assert (await client.decide(pending))["approval"]["id"] == ids["pending"]
            assert (await client.decide({**granted, "approval_id": ids["granted"]}))[
                "verdict"
            ] == "allow"
            replay = await client.decide({**used, "approval_id": ids["used"]})
            assert replay["verdict"] == "deny"
            assert "already used" in replay["reason"]
    finally:
        await servers.stop()


async def test_reload_keeps_counters(tmp_path: Path, servers: Servers, http: HttpClient) -> None:
    body = copy_call()
    for _ in range(4):
        await http.decide(body)
    policy = servers.runtime.policy
    original = policy.bundle
    assert original is not None
    rego, data = edit_policy(tmp_path, copy_limit=10)  # same limit, new revision
    try:
        revision = await policy.load(read_bundle([rego, data]))
        assert revision != original.revision
        decision = await http.decide(body)
        assert decision["policy_revision"] == revision
        assert decision["rate_limit"]["remaining"] == 10 - 5
    finally:
        await policy.load(original)


async def test_failed_upstream_call_gives_its_slot_back(client: Client) -> None:
    body = copy_call()
    first = await client.decide(body)
    assert first["rate_limit"]["remaining"] == 9

    async def report(decision: dict[str, Any], succeeded: bool) -> bool:
        ack = await client.report(decision["decision_id"], succeeded, decision["outcome_token"])
        assert ack["decision_id"] == decision["decision_id"]
        return bool(ack.get("released", False))

    assert await report(first, False) is True
    assert await report(first, False) is False, "idempotent"
    second = await client.decide(body)
    assert second["rate_limit"]["remaining"] == 9, "the failed call's slot came back"
    assert await report(second, True) is False
    assert await report(second, False) is False, "a success is final"
    assert (await client.decide(body))["rate_limit"]["remaining"] == 8
    denied = await client.decide(copy_call(datastore_id="bad"))
    assert not denied.get("outcome_token"), "a refusal holds nothing to report"


async def test_outcome_report_needs_a_boolean(http: HttpClient) -> None:
    response = await http.raw.post(
        "/v1/decisions/dec_x/outcome", json={"succeeded": "yes", "outcome_token": "t"}
    )
    assert response.status_code == 422
    assert "succeeded" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
async def payments(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HttpClient]:
    tmp = tmp_path_factory.mktemp("payments")
    rego, data = edit_policy(tmp, copy_limit=10)
    running = await start_servers(settings_for(tmp, policy_paths=[rego, data]))
    async with httpx.AsyncClient(base_url=running.http_url) as raw:
        yield HttpClient(raw)
    await running.stop()


def pay(sid: str, amount: Any) -> dict[str, Any]:
    return {**PAY, "arguments": {"amount": amount}, "principal": {"session_id": sid}}


async def test_weighted_limit_counts_the_argument(payments: HttpClient) -> None:
    sid = session()
    first = await payments.decide(pay(sid, 60))
    assert first["verdict"] == "allow"
    assert first["rate_limit"]["remaining"] == 40
    over = await payments.decide(pay(sid, 50))
    assert over["verdict"] == "rate_limited"
    assert (await payments.decide(pay(sid, 40)))["rate_limit"]["remaining"] == 0
    assert (await payments.decide(pay(sid, 0)))["verdict"] == "allow"
    too_big = await payments.decide(pay(session(), 150))
    assert too_big["verdict"] == "deny"
    assert "more than the 100" in too_big["reason"]
    missing = await payments.decide(pay(session(), "lots"))
    assert missing["verdict"] == "deny"
    assert missing["rule"] == "catalog.rate_limit_cost_invalid"


async def store_seen(raw: httpx.AsyncClient) -> tuple[int, bool, float]:
    """/readyz's status and what it says of the state store, and mcp_policy_state_store_up."""
    ready = await raw.get("/readyz")
    store = ready.json()["state_store"]
    assert store["store"] == "redis"
    assert (store["error"] is None) == store["healthy"]
    metrics = (await raw.get("/metrics")).text
    (up,) = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('mcp_policy_state_store_up{store="redis"}')
    ]
    return ready.status_code, store["healthy"], up


async def test_redis_killed_under_load_never_allows_and_recovers(
    tmp_path: Path, kv_server: KvServer
) -> None:
    servers = await start_servers(store_settings("redis", tmp_path, kv_server))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=10) as raw:
            client = HttpClient(raw)

            async def burst() -> list[dict[str, Any]]:
                return await asyncio.gather(*[client.decide(copy_call()) for _ in range(20)])

            assert all(d["verdict"] == "allow" for d in await burst())
            assert await store_seen(raw) == (200, True, 1.0)
            kv_server.kill()
            down = await burst() + await burst()
            assert all(d["verdict"] == "deny" for d in down), "no allow without the store"
            assert all(d["rule"] == "engine.state_unavailable" for d in down)
            assert "state store unavailable" in down[0]["reason"]
            # The operator sees it: not ready, with the reason, and in /metrics.
            assert await store_seen(raw) == (503, False, 0.0)
            kv_server.start()
            started = time.monotonic()
            while (await client.decide(copy_call()))["verdict"] != "allow":
                assert time.monotonic() - started < 10, "recovers within seconds"
                await asyncio.sleep(0.1)
            assert await store_seen(raw) == (200, True, 1.0)
    finally:
        if kv_server.proc is None:
            kv_server.start()
        await servers.stop()


async def test_rate_limit_fail_open_is_an_explicit_choice(
    tmp_path: Path, kv_server: KvServer
) -> None:
    settings = store_settings("redis", tmp_path, kv_server, rate_limit_fail_mode="open")
    servers = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            kv_server.kill()
            decision = await client.decide(copy_call())
            assert decision["verdict"] == "allow"
            assert "rate_limit" not in decision
            # Still ready (it decides, by the operator's choice), and the store shown down.
            assert await store_seen(raw) == (200, False, 0.0)
            held = await client.decide(approval_call())
            assert held["verdict"] == "deny", "approvals always fail closed"
    finally:
        kv_server.start()
        await servers.stop()


async def test_corrupt_sqlite_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, state_store="sqlite")
    settings.state_dir.mkdir(parents=True)
    settings.approvals_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateUnavailable) as caught:
        await start_servers(settings)
    assert "approvals.sqlite3" in caught.value.message
    assert "not a database" in caught.value.message


async def test_locked_sqlite_file_denies_quickly_then_recovers(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, state_store="sqlite")
    servers = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            assert (await client.decide(copy_call()))["verdict"] == "allow"
            holder = sqlite3.connect(settings.rate_limits_db, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                started = time.monotonic()
                locked = await client.decide(copy_call())
                assert time.monotonic() - started < 3
                assert locked["verdict"] == "deny"
                assert "locked" in locked["reason"]
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            assert (await client.decide(copy_call()))["verdict"] == "allow"
    finally:
        await servers.stop()
