"""Rate limits: exact under concurrency, resetting by themselves; the limiter's
sliding window checked against a reference model with hypothesis."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.state.ratelimit import Limit, MemoryRateLimitStore
from engine.transports.server import Servers, start_servers
from tests.clients import GrpcClient, HttpClient
from tests.conftest import copy_call, copy_policy, session, settings_for

Client = HttpClient | GrpcClient


async def test_limit_is_exact_under_concurrent_calls(
    http: HttpClient, grpc_client: GrpcClient
) -> None:
    sid = session()
    calls = [(http if i % 2 else grpc_client).decide(copy_call(sid)) for i in range(60)]
    decisions = await asyncio.gather(*calls)
    verdicts = [d["verdict"] for d in decisions]
    assert verdicts.count("allow") == 10
    assert verdicts.count("rate_limited") == 50
    for decision in decisions:
        if decision["verdict"] == "rate_limited":
            limit = decision["rate_limit"]
            assert limit["remaining"] == 0
            assert 0 < limit["retry_after_seconds"] <= 60
            assert "retry in" in decision["reason"]
            assert decision["mcp_result"]["isError"] is True


async def test_limits_are_per_session(http: HttpClient) -> None:
    first, second = session(), session()
    for _ in range(10):
        assert (await http.decide(copy_call(first)))["verdict"] == "allow"
    assert (await http.decide(copy_call(first)))["verdict"] == "rate_limited"
    assert (await http.decide(copy_call(second)))["verdict"] == "allow"


AGENT_LIMIT = 20  # copy_image_set: 20 per 60 s per agent (rego/mcp/rules/copy_image_set/)


def as_agent(body: dict[str, Any], agent: str | None) -> dict[str, Any]:
    """`body` with principal.agent_id `agent` (None: naming no agent)."""
    principal = {k: v for k, v in body["principal"].items() if k != "agent_id"}
    if agent is not None:
        principal["agent_id"] = agent
    return {**body, "principal": principal}


@pytest.fixture(scope="module")
async def shipped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """A service of this module's own with the shipped policy as it is (the shared one
    leaves the per-agent limit out: tests/conftest.py)."""
    running = await start_servers(settings_for(tmp_path_factory.mktemp("shipped")))
    yield running
    await running.stop()


@pytest.fixture(params=["http", "grpc"])
async def shipped_client(request: pytest.FixtureRequest, shipped: Servers) -> AsyncIterator[Client]:
    if request.param == "http":
        async with httpx.AsyncClient(base_url=shipped.http_url, timeout=10) as raw:
            yield HttpClient(raw)
    else:
        async with grpc.aio.insecure_channel(shipped.grpc_target) as channel:
            yield GrpcClient(channel)


async def test_sessions_of_one_agent_share_its_limit(shipped_client: Client) -> None:
    """Three sessions of one agent, 11 copies each, in turn (33 within the window): each
    session alone would allow 10 (30 in all), the agent allows 20, and a fourth session is
    no way round it. Another agent is untouched."""
    client = shipped_client
    agent = "agent-" + uuid.uuid4().hex[:12]
    sessions = [session() for _ in range(3)]
    decisions = [
        await client.decide(as_agent(copy_call(sid), agent)) for _ in range(11) for sid in sessions
    ]
    verdicts = [d["verdict"] for d in decisions]
    assert verdicts == ["allow"] * AGENT_LIMIT + ["rate_limited"] * (33 - AGENT_LIMIT)
    for refused in decisions[AGENT_LIMIT:]:
        assert refused["rule"] == "copy_image_set.agent_limit", refused
        assert refused["rate_limit"]["scope"] == "agent"
        assert refused["rate_limit"]["limit"] == AGENT_LIMIT
        assert refused["rate_limit"]["remaining"] == 0
    fourth = await client.decide(as_agent(copy_call(), agent))
    assert (fourth["verdict"], fourth["rule"]) == ("rate_limited", "copy_image_set.agent_limit")
    other = await client.decide(copy_call())
    assert other["verdict"] == "allow"
    assert other["rate_limit"]["remaining"] == 9, "the session's own limit is the tighter"


async def test_calls_naming_no_agent_share_one_agent_limit(tmp_path: Path) -> None:
    """Calls that name no agent cannot be told apart by agent: they share one counter,
    however many sessions they open (a service of its own, so no other test's anonymous
    calls count here)."""
    servers = await start_servers(settings_for(tmp_path))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            http = HttpClient(raw)
            decisions = [
                await http.decide(as_agent(copy_call(), None)) for _ in range(AGENT_LIMIT + 1)
            ]
            named = await http.decide(copy_call())
    finally:
        await servers.stop()
    assert [d["verdict"] for d in decisions] == ["allow"] * AGENT_LIMIT + ["rate_limited"]
    assert decisions[-1]["rule"] == "copy_image_set.agent_limit"
    assert decisions[-1]["rate_limit"]["scope"] == "global"
    assert named["verdict"] == "allow", "an agent that names itself has its own counter"


async def test_denied_calls_consume_no_quota(http: HttpClient) -> None:
    sid = session()
    for _ in range(15):
        assert (await http.decide(copy_call(sid, datastore_id="bad")))["verdict"] == "deny"
    decision = await http.decide(copy_call(sid))
    assert decision["verdict"] == "allow"
    assert decision["rate_limit"]["remaining"] == 9


@pytest.fixture(scope="module")
async def short_window(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """The shipped Rego with the YAML limit changed to 3 calls per second, scoped by agent."""
    tmp = tmp_path_factory.mktemp("short-window")
    rego, data = copy_policy(tmp)
    rules_file = data / "rules.yaml"
    rules = yaml.safe_load(rules_file.read_text())
    rules["mcp_policy"]["rules"]["copy_image_set"]["rate_limit"] = {
        "max": 3,
        "window": 1,
        "scope": "agent",
    }
    rules_file.write_text(yaml.safe_dump(rules))
    running = await start_servers(settings_for(tmp, policy_paths=[rego, data]))
    yield running
    await running.stop()


async def test_limit_resets_by_itself(short_window: Servers) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=short_window.http_url) as raw:
        client = HttpClient(raw)
        body = copy_call()
        verdicts = [(await client.decide(body))["verdict"] for _ in range(4)]
        assert verdicts == ["allow", "allow", "allow", "rate_limited"]
        blocked = await client.decide(body)
        wait = blocked["rate_limit"]["retry_after_seconds"]
        assert 0 < wait <= 1
        await asyncio.sleep(wait + 0.05)
        assert (await client.decide(body))["verdict"] == "allow"


async def test_agent_scope_spans_sessions_and_needs_an_agent(short_window: Servers) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=short_window.http_url) as raw:
        client = HttpClient(raw)
        agent = "agent-" + session()
        verdicts = []
        for _ in range(4):
            body = copy_call()  # a new session each time: re-initialising does not help
            body["principal"]["agent_id"] = agent
            verdicts.append((await client.decide(body))["verdict"])
        assert verdicts == ["allow", "allow", "allow", "rate_limited"]
        anonymous = copy_call()
        del anonymous["principal"]["agent_id"]
        decision = await client.decide(anonymous)
        assert decision["verdict"] == "deny"
        assert "principal.agent_id" in decision["reason"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=200, deadline=None)
@given(
    max_calls=st.integers(min_value=1, max_value=5),
    window=st.floats(min_value=0.5, max_value=10),
    gaps=st.lists(st.floats(min_value=0, max_value=4), min_size=1, max_size=60),
)
def test_sliding_window_matches_reference(max_calls: int, window: float, gaps: list[float]) -> None:
    clock = Clock()
    store = MemoryRateLimitStore(clock=clock, sweep_every=7)
    limit = Limit(key=("k",), max=max_calls, window=window)
    allowed: list[float] = []
    for gap in gaps:
        clock.now += gap
        outcome = store.acquire_now([limit])
        in_window = [t for t in allowed if t > clock.now - window]
        assert outcome.allowed == (len(in_window) < max_calls)
        if outcome.allowed:
            allowed.append(clock.now)
        else:
            # retry_after is exactly when the oldest counted call leaves the window
            retry = outcome.states[0].retry_after
            assert retry == pytest.approx(sorted(in_window)[-max_calls] + window - clock.now)
    # never more than max_calls in any window
    for i, start in enumerate(allowed):
        assert len([t for t in allowed[i:] if t < start + window]) <= max_calls


def test_blocked_call_consumes_no_other_limit() -> None:
    clock = Clock()
    store = MemoryRateLimitStore(clock=clock)
    wide = Limit(key=("wide",), max=100, window=60)
    tight = Limit(key=("tight",), max=1, window=60)
    assert store.acquire_now([wide, tight]).allowed
    for _ in range(5):
        assert not store.acquire_now([wide, tight]).allowed
    outcome = store.acquire_now([wide])
    assert outcome.allowed
    assert outcome.states[0].remaining == 100 - 2


async def test_release_gives_the_slot_back() -> None:
    store = MemoryRateLimitStore(clock=Clock())
    limit = Limit(key=("k",), max=1, window=60)
    assert store.acquire_now([limit], "d1").allowed
    assert not store.acquire_now([limit], "d2").allowed
    assert await store.release("d1")
    assert not await store.release("d1"), "a slot is given back once"
    assert store.acquire_now([limit], "d3").allowed


@given(
    costs=st.lists(st.sampled_from([0.1, 0.2, 0.25, 0.5, 1.0, 0.0]), min_size=1, max_size=60),
    gaps=st.lists(st.floats(min_value=0, max_value=4), min_size=60, max_size=60),
    release_every=st.integers(min_value=2, max_value=9),
)
@settings(max_examples=50, deadline=None)
def test_fractional_costs_are_exact_as_hits_come_and_go(
    costs: list[float], gaps: list[float], release_every: int
) -> None:
    """The store keeps a running sum of each window; at the edge it must agree with the
    exact sum of the hits in the window, however costs were added, expired and released."""
    clock = Clock()
    store = MemoryRateLimitStore(clock=clock)
    held: list[tuple[float, float, str]] = []  # (time, cost, token) counted now
    for i, (cost, gap) in enumerate(zip(costs, gaps, strict=False)):
        clock.now += gap
        limit = Limit(key=("k",), max=1.0, window=5, cost=cost)
        held = [h for h in held if h[0] > clock.now - 5]
        exact = math.fsum(c for _, c, _ in held)
        outcome = store.acquire_now([limit], f"t{i}")
        assert outcome.allowed == (exact + cost <= 1.0)
        if outcome.allowed:
            held.append((clock.now, cost, f"t{i}"))
        if i % release_every == 0 and held:
            _, _, token = held.pop(0)
            assert asyncio.run(store.release(token))


def test_a_large_limit_stays_exact() -> None:
    clock = Clock()
    store = MemoryRateLimitStore(clock=clock)
    limit = Limit(key=("k",), max=5000, window=60)
    allowed = 0
    for _ in range(5100):
        clock.now += 0.001
        allowed += store.acquire_now([limit]).allowed
    assert allowed == 5000
    clock.now += 60
    assert store.acquire_now([limit]).states[0].remaining == 4999


def test_idle_keys_are_swept() -> None:
    clock = Clock()
    store = MemoryRateLimitStore(clock=clock)
    for i in range(1000):
        store.acquire_now([Limit(key=(str(i),), max=1, window=5)])
    assert len(store) == 1000
    clock.now += 6
    store.sweep()
    assert len(store) == 0
