"""The Redis stores on a real Redis Cluster: three primaries on loopback that these tests
start (`redis-server --cluster-enabled yes` three times, `redis-cli --cluster create`)
and stop afterwards.

The store promises of test_stores.py hold there too. Every key of one atomic step
shares a slot, while keys of different tools and approvals spread over the nodes. Three
`mcp-policy serve` replicas allow exactly the limit, with one limit and with a session
and a user limit on one call. And a node killed while calls flow turns the calls it
held into denials, never allows, while the other nodes keep every limit exact.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from pydantic import ValidationError

from engine.models import Principal, ToolCall
from engine.policy.opa_process import OpaProcess
from engine.state.approvals import RedisApprovalStore
from engine.state.ratelimit import Limit, RedisGate, RedisRateLimitStore, cluster_client
from engine.transports.server import start_servers
from tests import test_approval_caps, test_stores
from tests.conftest import (
    add_tools,
    copy_call,
    copy_policy,
    session,
    settings_for,
    without_agent_limit,
)
from tests.kv import KvCluster
from tests.processes import Serve
from tests.test_faults import add_rule_package
from tests.test_shared_state import hammer, replicas
from tests.test_stores import Backend


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvCluster]:
    running = KvCluster(tmp_path_factory.mktemp("cluster"))
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
async def opa() -> AsyncIterator[OpaProcess]:
    process = OpaProcess("opa")
    await process.start()
    yield process
    await process.stop()


@pytest.fixture
async def backend(cluster: KvCluster) -> AsyncIterator[Backend]:
    """test_stores' Backend on the cluster: stores on fresh cluster clients, one prefix."""
    clients: list[Any] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    gate = RedisGate(32)

    def client() -> Any:
        made = cluster_client(cluster.url, decode_responses=True, max_connections=32)
        clients.append(made)
        return made

    yield Backend(
        "redis-cluster",
        lambda: RedisRateLimitStore(client(), prefix, gate=gate),
        lambda: RedisApprovalStore(client(), prefix, gate=gate),
        persistent=True,
    )
    for made in clients:
        await made.aclose()


SHARED: list[Callable[[Backend], Awaitable[None]]] = [
    test_stores.test_limit_is_exact_under_concurrency,
    test_stores.test_weighted_costs,
    test_stores.test_window_slides_and_keys_reset_by_themselves,
    test_stores.test_release_and_forget,
    test_stores.test_counters_survive_reopening,
    test_stores.test_approval_lifecycle,
    test_stores.test_one_grant_lets_exactly_one_concurrent_call_through,
    test_stores.test_denial_expiry_and_listing,
    test_stores.test_approvals_survive_reopening,
    *test_approval_caps.STORE_PROMISES,
]


@pytest.mark.parametrize("case", SHARED, ids=lambda case: case.__name__.removeprefix("test_"))
async def test_store_promises_hold_on_the_cluster(
    case: Callable[[Backend], Awaitable[None]], backend: Backend
) -> None:
    await case(backend)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({}, "needs redis_url"),
        ({"redis_url": "redis://127.0.0.1:7000/2"}, "needs database 0"),
        ({"redis_url": "unix:///run/redis.sock"}, "redis:// or rediss://"),
        ({"redis_url": "redis://127.0.0.1:7000", "redis_prefix": "a{b}:"}, "without { or }"),
    ],
)
def test_cluster_settings_say_what_is_wrong(
    tmp_path: Path, overrides: dict[str, str], words: str
) -> None:
    with pytest.raises(ValidationError, match=words):
        settings_for(tmp_path, redis_cluster=True, **overrides)


def one_call(session_id: str, user: str, tool: str = "copy", server: str = "srv") -> list[Limit]:
    """The limits of one call as the service makes them: a session and a user limit."""
    return [
        Limit(key=("per-session", "session", session_id, server, tool), max=1, window=60),
        Limit(key=("per-user", "user", user, server, tool), max=100, window=60),
    ]


def keyslot(cluster: KvCluster, key: str) -> int:
    client = next(node for node in cluster.nodes if node.proc is not None).client()
    try:
        return int(client.cluster("KEYSLOT", key))
    finally:
        client.close()


def keys_by_node(cluster: KvCluster, pattern: str) -> list[list[str]]:
    """The keys matching `pattern` on each node, in node order (none on a node down)."""
    out: list[list[str]] = []
    for node in cluster.nodes:
        if node.proc is None:
            out.append([])
            continue
        client = node.client()
        try:
            out.append(sorted(client.scan_iter(match=pattern, count=1000)))
        finally:
            client.close()
    return out


async def test_limits_of_one_call_share_a_slot_and_are_taken_together(
    backend: Backend, cluster: KvCluster
) -> None:
    store = await test_stores.opened(backend.open_limits())
    try:
        limits = one_call("s-1", "u-1")
        counters = [store.counter_key(limit.key) for limit in limits]
        assert len({keyslot(cluster, key) for key in counters}) == 1
        assert (await store.acquire(limits, "a")).allowed
        for i in range(3):
            blocked = await store.acquire(limits, f"b{i}")
            assert not blocked.allowed, "the session limit blocks"
        other = await store.acquire(one_call("s-2", "u-1"), "c")
        assert other.allowed
        assert other.states[1].remaining == 100 - 2, "blocked calls took nothing from the user"
        assert await store.release("a")
        again = await store.acquire(one_call("s-1", "u-1"), "d")
        assert again.allowed and again.states[1].remaining == 100 - 2
    finally:
        await store.close()


async def test_limits_of_different_tools_in_one_call_are_refused(backend: Backend) -> None:
    store = await test_stores.opened(backend.open_limits())
    try:
        mixed = [one_call("s", "u", tool="a")[0], one_call("s", "u", tool="b")[1]]
        with pytest.raises(ValueError, match="share their server and tool"):
            await store.acquire(mixed, "t")
    finally:
        await store.close()


async def test_keys_spread_over_the_nodes(backend: Backend, cluster: KvCluster) -> None:
    limits = await test_stores.opened(backend.open_limits())
    approvals = await test_stores.opened(backend.open_approvals())
    try:
        tools = [f"tool-{i}" for i in range(24)]
        for tool in tools:
            for s in range(4):
                outcome = await limits.acquire(one_call(f"s-{s}", "u-1", tool), f"{tool}-{s}")
                assert outcome.allowed
        for i in range(48):  # approvals are tagged by agent: 48 agents spread them
            call = ToolCall(server="srv", name="t", arguments={"i": i})
            me = Principal(session_id="s-1", agent_id=f"a-{i}")
            await approvals.open_or_get(call, me, rule="r", reason="why", decision_id="d", ttl=60)
        prefix = limits.counter_key(("x",)).split("rl:")[0]
        for kind in ("rl:", "held:", "apr:", "apr-fp:", "apr-index:"):
            counts = [len(keys) for keys in keys_by_node(cluster, f"{prefix}{kind}*")]
            assert all(counts), f"{kind} keys on every node: {counts}"
        for tool in tools:
            sessions = [
                limits.counter_key(one_call(f"s-{s}", "u-1", tool)[0].key) for s in range(4)
            ]
            assert len({keyslot(cluster, key) for key in sessions}) == 1, "one tool, one slot"
        listed = await approvals.list(None, 100)
        assert len(listed) == 48, "listing reads every node"
    finally:
        await limits.close()
        await approvals.close()


def cluster_env(cluster: KvCluster) -> dict[str, str]:
    return {
        "MCP_POLICY_REDIS_URL": cluster.url,
        "MCP_POLICY_REDIS_CLUSTER": "true",
        "MCP_POLICY_REDIS_PREFIX": f"replicas-{session()}:",
    }


async def test_replicas_on_the_cluster_allow_exactly_the_limit(
    tmp_path: Path, opa: OpaProcess, cluster: KvCluster
) -> None:
    services = replicas(tmp_path, opa, cluster_env(cluster))
    try:
        verdicts = await hammer([s.url for s in services], copy_call(session()), 1000)
    finally:
        for service in services:
            assert service.stop() == 0
    assert verdicts.count("allow") == 100
    assert verdicts.count("rate_limited") == 900, sorted(set(verdicts))


PER_USER = """rate_limit contains {
	"rule": "test.copies_per_user",
	"reason": "at most 150 copies a minute per user",
	"max": 150,
	"window_seconds": 60,
	"scope": "user",
} if input.tool.name == "copy_image_set"
"""


async def test_session_and_user_limits_of_one_call_are_exact_across_replicas(
    tmp_path: Path, opa: OpaProcess, cluster: KvCluster
) -> None:
    """copy_image_set at 100 per session and 150 per user; 1,000 calls at once from four
    sessions of one user allow exactly 150, and no blocked call took a session slot (the
    shipped per-agent limit left out: each session is an agent of its own here)."""
    rego, data = copy_policy(tmp_path)
    without_agent_limit(rego)
    add_tools(
        data,
        rules={
            "copy_image_set": {
                "action": "rate_limit",
                "rate_limit": {"max": 100, "window": 60, "scope": "session"},
            }
        },
    )
    add_rule_package(rego, "per_user", PER_USER)
    env = cluster_env(cluster) | {
        "MCP_POLICY_OPA_TIMEOUT_MS": "10000",
        "MCP_POLICY_REDIS_TIMEOUT_MS": "10000",
    }
    services = [
        Serve(
            tmp_path,
            [rego, data],
            env,
            "--opa-url",
            opa.url,
            "--decision-log",
            "off",
            measured=False,
        )
        for _ in range(3)
    ]
    sessions = [session() for _ in range(4)]
    try:
        bodies = [copy_call(sessions[i % 4]) for i in range(1000)]
        verdicts = await burst([s.url for s in services], bodies)
    finally:
        for service in services:
            assert service.stop() == 0
    allowed = Counter(
        body["principal"]["session_id"]
        for body, v in zip(bodies, verdicts, strict=True)
        if v == "allow"
    )
    assert sum(allowed.values()) == 150
    assert all(count <= 100 for count in allowed.values())
    assert verdicts.count("rate_limited") == 850, sorted(set(verdicts))

    prefix = env["MCP_POLICY_REDIS_PREFIX"]
    counters = [key for keys in keys_by_node(cluster, f"{prefix}rl:*") for key in keys]
    assert len({keyslot(cluster, key) for key in counters}) == 1, "one call, one slot"
    hits = {}
    for key in counters:
        scope, subject = json.loads(key.split("}:", 1)[1])[1:3]
        hits[(scope, subject)] = zcard(cluster, key)
    assert hits.pop(("user", "user-1")) == 150
    assert hits == {("session", sid): allowed[sid] for sid in sessions}, "all or nothing"


def zcard(cluster: KvCluster, key: str) -> int:
    node = cluster.nodes[cluster.node_of_slot(keyslot(cluster, key))]
    client = node.client()
    try:
        return int(client.zcard(key))
    finally:
        client.close()


async def burst(urls: list[str], bodies: list[dict[str, Any]]) -> list[str]:
    """One decision for each body, all at once, spread over `urls`; the verdicts."""
    connector = aiohttp.TCPConnector(limit=300)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one(i: int) -> str:
            url = f"{urls[i % len(urls)]}/v1/decide"
            async with client.post(url, json=bodies[i]) as response:
                assert response.status == 200, await response.text()
                verdict: str = (await response.json())["verdict"]
                return verdict

        return await asyncio.gather(*[one(i) for i in range(len(bodies))])


PROBE_SERVER = "probe-mcp"
PROBE_TOOLS = [f"probe_{i}" for i in range(9)]
PER_SESSION = 20
WINDOW_SECONDS = 60


def probe_policy(tmp: Path) -> tuple[Path, Path]:
    """Nine low-risk tools on one server, each limited to PER_SESSION calls per session."""
    rego, data = copy_policy(tmp)
    add_tools(
        data,
        catalog=[
            {"server": PROBE_SERVER, "tool": tool, "category": "read", "risk": "low"}
            for tool in PROBE_TOOLS
        ],
        rules={
            tool: {
                "action": "rate_limit",
                "rate_limit": {"max": PER_SESSION, "window": WINDOW_SECONDS, "scope": "session"},
            }
            for tool in PROBE_TOOLS
        },
    )
    return rego, data


def probe_call(tool: str, session_id: str) -> dict[str, Any]:
    return {
        "server": PROBE_SERVER,
        "tool": tool,
        "arguments": {},
        "principal": {"session_id": session_id, "agent_id": "agent-1", "user_id": "user-1"},
    }


async def test_a_node_killed_under_load_denies_its_calls_and_no_limit_slips(
    tmp_path: Path, opa: OpaProcess, cluster: KvCluster
) -> None:
    """Calls flow over nine tools; the node holding some tools' counters is SIGKILLed.

    Those tools' calls are then denied (engine.state_unavailable); every answer is a
    200; no session gets more than its limit; and the tools on the surviving nodes keep
    exact limits with the node down, although a third of their reservations (held under
    the decision's token, in any slot) cannot be written: such a call is denied and its
    counted slot given back (in time for the next call, not for calls judged meanwhile).
    Restarted, the node serves again within seconds.
    """
    rego, data = probe_policy(tmp_path)
    prefix = f"kill-{session()}:"
    settings = settings_for(
        tmp_path,
        opa_url=opa.url,
        policy_paths=[rego, data],
        state_store="redis",
        redis_url=cluster.url,
        redis_cluster=True,
        redis_prefix=prefix,
        redis_timeout_ms=5000,  # slow is not what this is about; a dead node is
        opa_timeout_ms=10000,
    )
    unused = cluster_client(cluster.url)
    names = RedisRateLimitStore(unused, prefix)  # for its key names only
    node_of = {
        tool: cluster.node_of_slot(
            keyslot(cluster, names.counter_key(("r", "session", "s", PROBE_SERVER, tool)))
        )
        for tool in PROBE_TOOLS
    }
    victim = node_of[PROBE_TOOLS[0]]
    lost = {tool for tool, node in node_of.items() if node == victim}
    kept = set(PROBE_TOOLS) - lost
    assert kept, f"every probe tool on node {victim}: {node_of}"

    results: list[tuple[str, str, float, int, dict[str, Any]]] = []
    answered_at: list[float] = []
    servers = await start_servers(settings)
    try:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=60, limits=limits) as raw:
            turns = asyncio.Semaphore(48)

            async def decide(tool: str, session_id: str) -> dict[str, Any]:
                async with turns:
                    started = time.monotonic()
                    response = await raw.post("/v1/decide", json=probe_call(tool, session_id))
                    decision: dict[str, Any] = response.json()
                    results.append((tool, session_id, started, response.status_code, decision))
                    answered_at.append(time.monotonic())
                    return decision

            flowing = {tool: session() for tool in PROBE_TOOLS}
            stop = asyncio.Event()

            async def flow() -> None:
                while not stop.is_set():
                    await asyncio.gather(*[decide(tool, flowing[tool]) for tool in PROBE_TOOLS])

            load = asyncio.create_task(flow())
            await asyncio.sleep(1.0)
            cluster.kill(victim)
            killed = time.monotonic()
            await asyncio.sleep(2.0)  # the others mark it failed after 1 s
            stop.set()
            await load

            # With the node down, each surviving tool's fresh session calls 3 x its limit,
            # one call after the other (so a slot given back is there for the next call);
            # a few calls of each lost tool's.
            fresh = {tool: session() for tool in PROBE_TOOLS}

            async def calls(tool: str) -> None:
                for _ in range(3 * PER_SESSION if tool in kept else 5):
                    await decide(tool, fresh[tool])

            await asyncio.gather(*[calls(tool) for tool in PROBE_TOOLS])
            counted = {
                tool: zcard(cluster, key)
                for keys in keys_by_node(cluster, f"{prefix}rl:*")
                for key in keys
                for tool in kept
                if f'"{fresh[tool]}"' in key
            }

            cluster.start_node(victim)
            cluster.wait_ok()
            back = next(iter(lost))
            restarted = time.monotonic()
            while (await decide(back, session()))["verdict"] != "allow":
                assert time.monotonic() - restarted < 15, "serves again within seconds"
                await asyncio.sleep(0.2)
    finally:
        if cluster.nodes[victim].proc is None:
            cluster.start_node(victim)
            cluster.wait_ok()
        await servers.stop()
        await unused.aclose()

    assert {status for *_, status, _ in results} == {200}, "the service kept answering"
    allowed = Counter((tool, sid) for tool, sid, _, _, d in results if d["verdict"] == "allow")
    # No limit slips: no PER_SESSION + 1 allows of one session within one window. Each
    # call was decided between its start and its answer; on a loaded machine a session's
    # calls can span more than a window, so a count over the whole test would not say it.
    spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (tool, sid, started, _, d), answered in zip(results, answered_at, strict=True):
        if d["verdict"] == "allow":
            spans.setdefault((tool, sid), []).append((started, answered))
    for key, calls in spans.items():
        calls.sort()
        for first in range(len(calls) - PER_SESSION):
            group = calls[first : first + PER_SESSION + 1]
            latest = max(end for _, end in group)
            assert latest - group[0][0] >= WINDOW_SECONDS, f"{key}: past its limit in a window"
    assert any(allowed[(tool, flowing[tool])] for tool in lost), "calls flowed before the kill"

    lost_after = [
        d
        for tool, sid, started, _, d in results
        if tool in lost and started > killed and sid in (flowing[tool], fresh[tool])
    ]
    assert lost_after, "calls kept flowing after the kill"
    assert all(
        d["verdict"] == "deny" and d["rule"] == "engine.state_unavailable" for d in lost_after
    ), "a dead node's calls are denied"
    for tool in kept:
        fresh_calls = spans.get((tool, fresh[tool]), [])
        within_a_window = fresh_calls[-1][1] - fresh_calls[0][0] < WINDOW_SECONDS
        if within_a_window:  # else the window slid while they ran: more may pass
            assert allowed[(tool, fresh[tool])] == PER_SESSION, f"{tool}: exact on a node"
        else:
            assert allowed[(tool, fresh[tool])] >= PER_SESSION, f"{tool}: not below its limit"
        if within_a_window:
            assert counted[tool] == PER_SESSION, f"{tool}: slots of unheld reservations given back"
        else:
            assert counted[tool] <= PER_SESSION, f"{tool}: no slot left taken past its limit"
    kept_fresh = [d for tool, sid, *_, d in results if tool in kept and sid == fresh[tool]]
    refused = Counter(d["rule"] for d in kept_fresh if d["verdict"] != "allow")
    assert refused["engine.state_unavailable"] > 0, "some reservations were on the dead node"
