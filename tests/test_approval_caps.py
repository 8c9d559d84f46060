"""Caps on pending approvals, and paging the approvals list.

An attacker probe opened 300 pending approvals from one session in 1.4 s by varying an
argument. Now every store (memory, SQLite, Redis, Valkey; the Redis Cluster runs
`STORE_PROMISES` in tests/test_redis_cluster.py) refuses a new pending approval past its
agent's or its session's cap, exactly under concurrency, while a call that matches an open
approval still gets it back; decided and expired approvals free their place. The service
answers a refused call with a deny (rule approval.too_many_pending) that takes nothing,
logs those refusals within a per-agent budget, and counts them. An approver pages through
everything it may see, over HTTP (`Link` / `X-Next-Page-Token`, the body still a list) as
over gRPC; page tokens that were not made by this listing are a 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from pydantic import ValidationError

from engine.identity import add_entry
from engine.models import Approval, ApprovalStatus, Principal, ToolCall
from engine.settings import Settings
from engine.state.approvals import (
    SQLITE_SCHEMA,
    ApprovalCursor,
    ApprovalStore,
    MemoryApprovalStore,
    PendingCaps,
    SqliteApprovalStore,
    Stored,
    TooManyPending,
)
from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import approval_pb2, approval_pb2_grpc, types_pb2
from tests import test_stores
from tests.clients import GrpcClient, HttpClient
from tests.conftest import HEALTHIMAGING, add_tools, copy_policy, session, settings_for
from tests.test_stores import Backend, opened

# The store fixtures of test_stores.py: every store kind (memory, SQLite, Redis, Valkey),
# and every kind on a clock the test gives.
backend = test_stores.backend
approvals_at = test_stores.approvals_at

Client = HttpClient | GrpcClient
RULE = "approval.too_many_pending"
FLOOD_TOOL = "flood_tool"  # needs an approval, and takes a slot of an agent rate limit
OTHER_TOOL = "other_tool"  # needs an approval; a limited approver may not see it
AGENT_LIMIT = 5


def unique(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:10]}"


# -- every store ----------------------------------------------------------------------------


async def open_one(
    store: ApprovalStore, agent: str | None, session_id: str, n: int, ttl: float = 60
) -> Approval | TooManyPending:
    """Open (or get) the approval of call `n`; the store's refusal is returned, not raised."""
    call = ToolCall(server="srv", name="flood", arguments={"n": n})
    who = Principal(agent_id=agent, session_id=session_id)
    try:
        return await store.open_or_get(
            call, who, rule="r", reason="why", decision_id=f"dec_{n}", ttl=ttl
        )
    except TooManyPending as refused:
        return refused


def made(results: list[Approval | TooManyPending]) -> list[Approval]:
    return [r for r in results if isinstance(r, Approval)]


def refusals(results: list[Approval | TooManyPending]) -> list[TooManyPending]:
    return [r for r in results if isinstance(r, TooManyPending)]


async def pending_of(store: ApprovalStore, agent: str | None) -> set[str]:
    listed = await store.list(ApprovalStatus.PENDING, 1000)
    return {a.id for a in listed if a.principal.agent_id == agent}


async def agent_cap_is_exact_under_concurrency(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    store.caps = PendingCaps(per_agent=20, per_session=50)
    try:
        results = await asyncio.gather(
            *[open_one(store, "a-1", f"s-{n % 5}", n) for n in range(50)]
        )
        opened_ = made(results)
        assert len({a.id for a in opened_}) == len(opened_) == 20
        refused = refusals(results)
        assert len(refused) == 30
        assert {(r.scope, r.pending, r.cap) for r in refused} == {("agent", 20, 20)}
        assert await pending_of(store, "a-1") == {a.id for a in opened_}, "nothing more stored"
        assert isinstance(await open_one(store, "a-2", "s-0", 0), Approval), "others may"
    finally:
        await store.close()


async def session_cap_is_exact_under_concurrency(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    store.caps = PendingCaps(per_agent=100, per_session=20)
    try:
        results = await asyncio.gather(*[open_one(store, "a-1", "s-1", n) for n in range(50)])
        assert len({a.id for a in made(results)}) == 20
        assert {(r.scope, r.pending, r.cap) for r in refusals(results)} == {("session", 20, 20)}
        assert len(refusals(results)) == 30
        another = await open_one(store, "a-1", "s-2", 0)
        assert isinstance(another, Approval), "another session of the agent may"
        assert len(await pending_of(store, "a-1")) == 21
    finally:
        await store.close()


async def open_approvals_come_back_at_the_cap(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    store.caps = PendingCaps(per_agent=3, per_session=3)
    try:
        first = made([await open_one(store, "a-1", "s-1", n) for n in range(3)])
        assert len(first) == 3
        assert isinstance(await open_one(store, "a-1", "s-1", 3), TooManyPending)
        again = await asyncio.gather(*[open_one(store, "a-1", "s-1", n % 3) for n in range(30)])
        assert [a.id for a in made(again)] == [first[n % 3].id for n in range(30)]
        granted = await store.decide(
            first[0].id, approve=True, approver="ops", comment="", grant_ttl=60
        )
        assert (await open_one(store, "a-1", "s-1", 0)) == granted, "an unused grant is open"
        fourth = await open_one(store, "a-1", "s-1", 3)
        assert isinstance(fourth, Approval), "a granted approval is no longer pending"
        assert isinstance(await open_one(store, "a-1", "s-1", 4), TooManyPending)
        assert await pending_of(store, "a-1") == {first[1].id, first[2].id, fourth.id}
    finally:
        await store.close()


async def another_agent_never_gets_an_agents_approval(backend: Backend) -> None:
    """The fingerprint binds the session, not the agent: an agent naming another agent's
    session and repeating its call gets an approval of its own (counted against itself),
    never the other agent's id."""
    store = await opened(backend.open_approvals())
    store.caps = PendingCaps(per_agent=1, per_session=1)
    try:
        mine = await open_one(store, "a-1", "s-1", 0)
        theirs = await open_one(store, "a-2", "s-1", 0)
        assert isinstance(mine, Approval) and isinstance(theirs, Approval)
        assert theirs.id != mine.id and theirs.principal.agent_id == "a-2"
        assert await open_one(store, "a-1", "s-1", 0) == mine
        assert isinstance(await open_one(store, "a-2", "s-1", 1), TooManyPending)
        assert await pending_of(store, "a-1") == {mine.id}
    finally:
        await store.close()


async def calls_without_an_agent_share_one_agent_cap(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    store.caps = PendingCaps(per_agent=2, per_session=5)
    try:
        assert isinstance(await open_one(store, None, "s-1", 0), Approval)
        assert isinstance(await open_one(store, None, "s-2", 1), Approval)
        refused = await open_one(store, None, "s-3", 2)
        assert isinstance(refused, TooManyPending) and refused.scope == "agent"
        assert refused.reason.startswith("2 approvals of callers without an agent_id are")
        assert isinstance(await open_one(store, "a-1", "s-3", 2), Approval)
    finally:
        await store.close()


STORE_PROMISES: list[Callable[[Backend], Awaitable[None]]] = [
    agent_cap_is_exact_under_concurrency,
    session_cap_is_exact_under_concurrency,
    open_approvals_come_back_at_the_cap,
    another_agent_never_gets_an_agents_approval,
    calls_without_an_agent_share_one_agent_cap,
]


@pytest.mark.parametrize("case", STORE_PROMISES, ids=lambda case: case.__name__)
async def test_store_caps(case: Callable[[Backend], Awaitable[None]], backend: Backend) -> None:
    await case(backend)


async def test_decided_and_expired_approvals_free_their_place(
    approvals_at: Callable[[Callable[[], float]], ApprovalStore],
) -> None:
    now = [1_700_000_000.0]
    store = await opened(approvals_at(lambda: now[0]))
    store.caps = PendingCaps(per_agent=2, per_session=2)
    try:
        denied = await open_one(store, "a-1", "s-1", 0)
        expiring = await open_one(store, "a-1", "s-1", 1, ttl=30)
        assert isinstance(denied, Approval) and isinstance(expiring, Approval)
        full = await open_one(store, "a-1", "s-1", 2)
        assert isinstance(full, TooManyPending) and (full.scope, full.pending) == ("agent", 2)
        await store.decide(denied.id, approve=False, approver="ops", comment="", grant_ttl=60)
        assert isinstance(await open_one(store, "a-1", "s-1", 2), Approval), "a denial frees"
        assert isinstance(await open_one(store, "a-1", "s-1", 3), TooManyPending)
        now[0] += 31
        assert (await store.get(expiring.id)).status is ApprovalStatus.EXPIRED
        assert isinstance(await open_one(store, "a-1", "s-1", 3), Approval), "expiry frees"
        assert isinstance(await open_one(store, "a-1", "s-1", 4), TooManyPending)
    finally:
        await store.close()


async def test_a_sqlite_file_from_before_the_caps_counts_its_pending(tmp_path: Path) -> None:
    """A file written before the cap columns existed gets them when opened, filled from
    its records: its pending approvals count and are found again by their call."""
    earlier = MemoryApprovalStore()
    first, second, decided = made([await open_one(earlier, "a-1", "s-1", n) for n in range(3)])
    await earlier.decide(decided.id, approve=False, approver="ops", comment="", grant_ttl=60)
    path = tmp_path / "approvals.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(SQLITE_SCHEMA)
        for approval in (first, second, await earlier.get(decided.id)):
            old.execute(
                "INSERT INTO approval_records (id, fingerprint, created_at, record) "
                "VALUES (?, ?, ?, ?)",
                (
                    approval.id,
                    approval.fingerprint,
                    approval.created_at.timestamp(),
                    Stored(approval=approval).model_dump_json(),
                ),
            )
    old.close()
    for _ in range(2):  # the second opening finds the columns there
        store = SqliteApprovalStore(path, caps=PendingCaps(per_agent=2, per_session=5))
        await store.open()
        try:
            assert await open_one(store, "a-1", "s-1", 0) == first
            refused = await open_one(store, "a-1", "s-2", 7)
            assert isinstance(refused, TooManyPending) and refused.pending == 2
        finally:
            await store.close()


def test_the_caps_have_no_off_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fields = Settings.model_fields
    assert fields["approval_max_pending_per_agent"].default == 20
    assert fields["approval_max_pending_per_session"].default == 10
    for name in ("approval_max_pending_per_agent", "approval_max_pending_per_session"):
        for value in (0, -1, 1.5, "many"):
            with pytest.raises(ValidationError) as refused:
                settings_for(tmp_path, **{name: value})
            assert name in str(refused.value)
    monkeypatch.setenv("MCP_POLICY_APPROVAL_MAX_PENDING_PER_SESSION", "0")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "approval_max_pending_per_session" in str(refused.value)
    for caps in ((0, 1), (1, 0), (True, 1), (1, 2.0)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            PendingCaps(*caps)


# -- the service ----------------------------------------------------------------------------


@dataclass
class World:
    servers: Servers
    tokens: dict[str, str]

    @property
    def log_path(self) -> Path:
        return Path(self.servers.runtime.settings.decision_log_settings.jsonl)


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    """A service with the default caps (20 per agent, 10 per session), named approvers
    (alice sees everything, carol only FLOOD_TOOL on HealthImaging) and a decision log
    budget of one too_many_pending record per agent now and then."""
    tmp = tmp_path_factory.mktemp("caps")
    approvers = tmp / "approvers.yaml"
    tokens = {
        "alice": add_entry(approvers, "approver", "alice", user_id="alice"),
        "carol": add_entry(
            approvers,
            "approver",
            "carol",
            user_id="carol",
            servers=[HEALTHIMAGING],
            tools=[FLOOD_TOOL],
        ),
    }
    rego, data = copy_policy(tmp)
    add_tools(
        data,
        catalog=[
            {"server": HEALTHIMAGING, "tool": tool, "category": "write", "risk": "high"}
            for tool in (FLOOD_TOOL, OTHER_TOOL)
        ],
        rules={
            FLOOD_TOOL: {
                "action": "require_approval",
                "rate_limit": {"max": AGENT_LIMIT, "window": 3600, "scope": "agent"},
            }
        },
    )
    settings = settings_for(
        tmp,
        policy_paths=[rego, data],
        approvers_file=approvers,
        approval_max_pending_per_agent=20,
        approval_max_pending_per_session=10,
        decision_log_too_many_pending_per_second=0.01,
    )
    servers = await start_servers(settings)
    yield World(servers, tokens)
    await servers.stop()


@pytest.fixture(scope="module")
async def capped_http(world: World) -> AsyncIterator[HttpClient]:
    # Kept for the whole module: pooled connections are dropped well before the service
    # closes an idle one (5 s), so a request never races that close (httpx.ReadError).
    limits = httpx.Limits(keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=60, limits=limits) as raw:
        yield HttpClient(raw)


@pytest.fixture(scope="module")
async def capped_grpc(world: World) -> AsyncIterator[GrpcClient]:
    async with grpc.aio.insecure_channel(world.servers.grpc_target) as channel:
        yield GrpcClient(channel)


@pytest.fixture(params=["http", "grpc"])
def capped(
    request: pytest.FixtureRequest, capped_http: HttpClient, capped_grpc: GrpcClient
) -> Client:
    """A client of the capped service, through each transport."""
    return capped_http if request.param == "http" else capped_grpc


def call(agent: str, session_id: str, n: int, tool: str = FLOOD_TOOL) -> dict[str, Any]:
    return {
        "server": HEALTHIMAGING,
        "tool": tool,
        "arguments": {"n": n},
        "principal": {"agent_id": agent, "session_id": session_id, "user_id": "user-1"},
    }


async def decide_all(client: Client, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Decide the calls concurrently (40 at a time); a refused request raises ApiError."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(calls), 40):
        out += await asyncio.gather(*[client.decide(c) for c in calls[start : start + 40]])
    return out


def verdicts(decisions: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((d["verdict"], RULE if d["rule"] == RULE else "approval") for d in decisions)


async def cap_refusals(world: World) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=world.servers.http_url) as raw:
        text = (await raw.get("/metrics")).text
    found = re.findall(r'^mcp_policy_approval_cap_refusals_total\{cap="(\w+)"\} (\S+)$', text, re.M)
    return {"agent": 0.0, "session": 0.0} | {cap: float(value) for cap, value in found}


async def logged_refusals(world: World, agent: str, expected: int) -> tuple[int, int]:
    """(records written one by one, refusals counted in summaries) of `agent`'s
    too_many_pending decisions, once the log accounts for `expected` of them (summaries
    are written about once a second)."""
    runtime = world.servers.runtime
    for _ in range(100):
        await runtime.decision_log.flush()
        records = [json.loads(line) for line in world.log_path.read_text().splitlines() if line]
        written = sum(
            1
            for r in records
            if r.get("event") == "decision"
            and r.get("rule") == RULE
            and r["principal"]["agent_id"] == agent
        )
        summed = sum(
            r["agents"].get(agent, 0) for r in records if r.get("event") == "decisions_suppressed"
        )
        if written + summed >= expected:
            return written, summed
        await asyncio.sleep(0.2)
    return written, summed


async def test_a_flood_from_one_session_is_capped(capped: Client, world: World) -> None:
    agent, sid = unique("flooder"), session()
    before = await cap_refusals(world)
    flood = await decide_all(capped, [call(agent, sid, n) for n in range(300)])
    assert verdicts(flood) == {("approval_required", "approval"): 10, ("deny", RULE): 290}
    refused = [n for n, d in enumerate(flood) if d["rule"] == RULE]
    assert all(not flood[n].get("approval") for n in refused), "a refusal opens nothing"
    assert {flood[n]["reason"] for n in refused} == {
        "10 approvals of this session are already waiting for a human (at most 10 may wait "
        "at once); wait for them to be decided or expire"
    }
    first = {n: d["approval"]["id"] for n, d in enumerate(flood) if d["rule"] != RULE}

    # The calls that opened them still get their approval; the others are still refused.
    repeated = [*first, *refused[:10]]
    again = await decide_all(capped, [call(agent, sid, n) for n in repeated])
    assert [d.get("approval", {}).get("id") for d in again[:10]] == list(first.values())
    assert {(d["verdict"], d["rule"]) for d in again[10:]} == {("deny", RULE)}

    # Another session: ten more; then the agent's own cap (20) holds in every session.
    sid_2 = session()
    second = await decide_all(capped, [call(agent, sid_2, n) for n in range(12)])
    assert verdicts(second) == {("approval_required", "approval"): 10, ("deny", RULE): 2}
    third = await capped.decide(call(agent, session(), 0))
    for refusal in [third, *(d for d in second if d["rule"] == RULE)]:
        assert (refusal["verdict"], refusal["rule"]) == ("deny", RULE)
        assert refusal["reason"].startswith("20 approvals of this agent are already waiting")
    opened = set(first.values()) | {d["approval"]["id"] for d in second if d["rule"] != RULE}
    assert len(opened) == 20

    # Another agent is not held back, and its refusals have their own log budget.
    other, their_session = unique("neighbour"), session()
    theirs = await decide_all(capped, [call(other, their_session, n) for n in range(11)])
    assert verdicts(theirs) == {("approval_required", "approval"): 10, ("deny", RULE): 1}

    # The approver sees all of them, page by page, whatever the transport.
    seen = await every_id(capped, world.tokens["alice"], size=7)
    assert len(seen) == len(set(seen)), "no approval twice"
    assert opened <= set(seen)

    # Counted by cap; logged within a budget per agent; nothing lost.
    after = await cap_refusals(world)
    assert after["session"] - before["session"] == 290 + 10 + 1
    assert after["agent"] - before["agent"] == 2 + 1
    written, summed = await logged_refusals(world, agent, 303)
    assert written + summed == 303 and 1 <= written < 303
    assert await logged_refusals(world, other, 1) == (1, 0), "its own budget"

    # The flood took no rate-limit slot: a granted call takes the first of the agent's.
    n, approval_id = next(iter(first.items()))
    await capped.act_as(world.tokens["alice"], approval_id, "approve")
    granted = await capped.decide({**call(agent, sid, n), "approval_id": approval_id})
    assert granted["verdict"] == "allow"
    assert granted["rate_limit"]["remaining"] == AGENT_LIMIT - 1
    # A used approval is no longer pending: its place is free again, for one call.
    freed = await capped.decide(call(agent, sid, 1000))
    assert freed["verdict"] == "approval_required"
    assert (await capped.decide(call(agent, sid, 1001)))["rule"] == RULE


async def every_id(client: Client, token: str, *, size: int) -> list[str]:
    """The ids of every pending approval `token` may see, following the pages."""
    if isinstance(client, HttpClient):
        pages = await http_pages(client.raw, token, {"status": "pending", "limit": size})
    else:
        pages = await grpc_pages(client.channel, token, size)
    return [a for page in pages for a in page]


async def http_pages(raw: httpx.AsyncClient, token: str, params: dict[str, Any]) -> list[list[str]]:
    """Follow `Link: rel="next"` from the first page to the last, checking each page."""
    auth = {"Authorization": f"Bearer {token}"}
    response = await raw.get("/v1/approvals", params=params, headers=auth)
    pages: list[list[str]] = []
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body, list), "the body is still the list"
        assert len(body) <= int(params.get("limit", 100))
        pages.append([a["id"] for a in body])
        link = response.headers.get("link")
        next_token = response.headers.get("x-next-page-token")
        if link is None:
            assert next_token is None
            return pages
        target = re.fullmatch(r'<(/v1/approvals\?[^>]+)>; rel="next"', link)
        assert target is not None, link
        assert httpx.URL(target.group(1)).params["page_token"] == next_token
        response = await raw.get(target.group(1), headers=auth)
        assert len(pages) < 1000, "the pages end"


async def grpc_pages(channel: grpc.aio.Channel, token: str, size: int) -> list[list[str]]:
    stub = approval_pb2_grpc.ApprovalServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    pages: list[list[str]] = []
    page_token = ""
    while True:
        reply = await stub.ListApprovals(
            approval_pb2.ListApprovalsRequest(
                status=types_pb2.APPROVAL_STATUS_PENDING,
                page_size=size,
                page_token=page_token,
            ),
            metadata=metadata,
        )
        assert len(reply.approvals) <= size
        pages.append([a.id for a in reply.approvals])
        if not reply.next_page_token:
            return pages
        page_token = reply.next_page_token
        assert len(pages) < 1000, "the pages end"


async def test_a_limited_approver_pages_through_more_than_a_thousand(
    world: World, capped_http: HttpClient, capped_grpc: GrpcClient
) -> None:
    """1320 pending approvals (the default caps: 66 agents, 2 sessions each, 10 calls per
    session), one in ten of a tool carol may not see. Carol pages through her 1188 over
    HTTP, 100 or 1000 at a time, as over gRPC, and a token from alice's listing shows her
    nothing more."""
    visible: set[str] = set()
    hidden: set[str] = set()
    calls = [
        call(agent, sid, n, OTHER_TOOL if n == 9 else FLOOD_TOOL)
        for agent in (unique("pager") for _ in range(66))
        for sid in (session(), session())
        for n in range(10)
    ]
    for decision, sent in zip(await decide_all(capped_http, calls), calls, strict=True):
        assert decision["verdict"] == "approval_required", decision
        (hidden if sent["tool"] == OTHER_TOOL else visible).add(decision["approval"]["id"])
    assert len(visible) == 1188 and len(hidden) == 132

    carol, alice = world.tokens["carol"], world.tokens["alice"]
    for size in (100, 1000):
        pages = await http_pages(capped_http.raw, carol, {"status": "pending", "limit": size})
        ids = [a for page in pages for a in page]
        assert len(ids) == len(set(ids)), "no approval twice"
        assert visible <= set(ids) and not hidden & set(ids)
        assert len(pages) >= -(-len(visible) // size)
    over_grpc = await grpc_pages(capped_grpc.channel, carol, 100)
    assert [a for p in over_grpc for a in p] == [
        a for p in await http_pages(capped_http.raw, carol, {"status": "pending"}) for a in p
    ], "HTTP and gRPC page through the same listing"

    everything = await http_pages(capped_http.raw, alice, {"limit": 1000})
    assert (visible | hidden) <= {a for page in everything for a in page}
    # A token from alice's listing names a position, not a view: carol still sees only hers.
    auth = {"Authorization": f"Bearer {carol}"}
    first = await capped_http.raw.get(
        "/v1/approvals", params={"limit": 50}, headers={"Authorization": f"Bearer {alice}"}
    )
    foreign = first.headers["x-next-page-token"]
    borrowed = await capped_http.raw.get(
        "/v1/approvals", params={"page_token": foreign, "limit": 1000}, headers=auth
    )
    assert borrowed.status_code == 200
    assert {a["tool"] for a in borrowed.json()} <= {FLOOD_TOOL}

    # A client that only reads the list still gets the newest page, as before.
    plain = await capped_http.raw.get("/v1/approvals", headers=auth)
    assert plain.status_code == 200 and len(plain.json()) == 100
    assert {a["tool"] for a in plain.json()} == {FLOOD_TOOL}
    assert plain.headers["x-next-page-token"]


def token_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


HOSTILE_TOKENS = [
    "!!!",
    "a1:5:apr_1",  # the text inside, not its base64
    "ZDE6NQ",  # a decision-log token ("d1:5")
    token_of("a2:5:apr_1"),  # another version
    token_of("a1:5:apr_1:x"),
    token_of("a1:-:apr_1"),
    ApprovalCursor(10**18, "apr_1").token(),  # past what a datetime holds
    ApprovalCursor(5, "apr 1").token(),  # not an id made here
    ApprovalCursor(5, "apr_1").token() + "=",
    "x" * 300,
    "\u0661\u0662\u0663",
]


@pytest.mark.parametrize("bad", HOSTILE_TOKENS)
async def test_page_tokens_not_made_by_this_listing_are_refused(
    bad: str, world: World, capped_http: HttpClient, capped_grpc: GrpcClient
) -> None:
    alice = world.tokens["alice"]
    auth = {"Authorization": f"Bearer {alice}"}
    listed = await capped_http.raw.get("/v1/approvals", params={"limit": 1000}, headers=auth)
    response = await capped_http.raw.get("/v1/approvals", params={"page_token": bad}, headers=auth)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert "page_token" in error["field"] and "page_token" in error["message"]
    assert "link" not in response.headers
    stub = approval_pb2_grpc.ApprovalServiceStub(capped_grpc.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListApprovals(
            approval_pb2.ListApprovalsRequest(page_token=bad),
            metadata=(("authorization", f"Bearer {alice}"),),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    again = await capped_http.raw.get("/v1/approvals", params={"limit": 1000}, headers=auth)
    assert again.json() == listed.json(), "nothing changed"


async def test_another_listings_token_and_bad_pages_are_refused(
    world: World, capped_http: HttpClient
) -> None:
    """The decision log's own next-page token, a page size out of range, a status that
    does not exist: each a 4xx naming the parameter, never a 5xx."""
    operator = {"Authorization": f"Bearer {world.servers.runtime.approver_token}"}
    await capped_http.decide(call(unique("logged"), session(), 0))
    await capped_http.decide(call(unique("logged"), session(), 0))
    await world.servers.runtime.decision_log.flush()
    log_page = await capped_http.raw.get("/v1/decisions", params={"limit": 1}, headers=operator)
    decisions_token = log_page.json()["next_cursor"]
    assert decisions_token
    auth = {"Authorization": f"Bearer {world.tokens['alice']}"}
    for params, field in [
        ({"page_token": decisions_token}, "page_token"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "granted"}, "status"),
    ]:
        response = await capped_http.raw.get("/v1/approvals", params=params, headers=auth)
        assert 400 <= response.status_code < 500, (params, response.text)
        assert field in response.json()["error"]["field"]
