"""Every rate-limit and approval store keeps the same promises: memory, SQLite, and Redis
and Valkey (real servers). Atomicity is checked with concurrent callers, persistence by
opening the same state again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from engine.errors import Conflict, InvalidRequest, NotFound
from engine.models import Approval, ApprovalStatus, Principal, ToolCall
from engine.state.approvals import (
    ApprovalCursor,
    ApprovalPage,
    ApprovalStore,
    MemoryApprovalStore,
    RedisApprovalStore,
    SqliteApprovalStore,
    Use,
    fingerprint,
)
from engine.state.ratelimit import (
    Limit,
    MemoryRateLimitStore,
    RateLimitStore,
    RedisRateLimitStore,
    SqliteRateLimitStore,
)
from tests.kv import KvServer


@dataclass
class Backend:
    """Opens stores on one backing state; `reopen` gives fresh objects on the same state."""

    name: str
    open_limits: Callable[[], RateLimitStore]
    open_approvals: Callable[[], ApprovalStore]
    persistent: bool


@pytest.fixture(params=["memory", "sqlite", "redis", "valkey"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    clients: list[Any] = []
    if request.param == "memory":
        yield Backend(
            "memory", lambda: MemoryRateLimitStore(time.time), MemoryApprovalStore, persistent=False
        )
        return
    if request.param == "sqlite":
        yield Backend(
            "sqlite",
            lambda: SqliteRateLimitStore(tmp_path / "limits.sqlite3"),
            lambda: SqliteApprovalStore(tmp_path / "approvals.sqlite3"),
            persistent=True,
        )
        return
    kv: KvServer = request.getfixturevalue("kv_pool").get(request.param)
    prefix = f"test-{uuid.uuid4().hex[:8]}:"

    def client() -> Any:
        made = redis.asyncio.Redis.from_url(kv.url, decode_responses=True)
        clients.append(made)
        return made

    yield Backend(
        kv.kind,
        lambda: RedisRateLimitStore(client(), prefix),
        lambda: RedisApprovalStore(client(), prefix),
        persistent=True,
    )
    for made in clients:
        await made.aclose()


async def opened(store: Any) -> Any:
    await store.open()
    return store


def limit(key: str, max_: float, window: float, cost: float = 1) -> Limit:
    return Limit(key=(key,), max=max_, window=window, cost=cost)


async def test_limit_is_exact_under_concurrency(backend: Backend) -> None:
    store = await opened(backend.open_limits())
    try:
        outcomes = await asyncio.gather(
            *[store.acquire([limit("k", 10, 60)], f"d{i}") for i in range(60)]
        )
        assert sum(o.allowed for o in outcomes) == 10
        blocked = [o for o in outcomes if not o.allowed]
        assert all(0 < o.states[0].retry_after <= 60 for o in blocked)
    finally:
        await store.close()


async def test_weighted_costs(backend: Backend) -> None:
    store = await opened(backend.open_limits())
    try:
        first = await store.acquire([limit("w", 10, 60, cost=4)], "a")
        assert first.allowed and first.states[0].remaining == 6
        assert (await store.acquire([limit("w", 10, 60, cost=4)], "b")).allowed
        blocked = await store.acquire([limit("w", 10, 60, cost=4)], "c")
        assert not blocked.allowed
        assert blocked.states[0].retry_after > 0
        fits = await store.acquire([limit("w", 10, 60, cost=2)], "d")
        assert fits.allowed and fits.states[0].remaining == 0
        assert (await store.acquire([limit("w", 10, 60, cost=0)], "e")).allowed
    finally:
        await store.close()


async def test_window_slides_and_keys_reset_by_themselves(backend: Backend) -> None:
    store = await opened(backend.open_limits())
    try:
        assert (await store.acquire([limit("s", 2, 0.3)], "a")).allowed
        assert (await store.acquire([limit("s", 2, 0.3)], "b")).allowed
        blocked = await store.acquire([limit("s", 2, 0.3)], "c")
        assert not blocked.allowed
        await asyncio.sleep(blocked.states[0].retry_after + 0.02)
        assert (await store.acquire([limit("s", 2, 0.3)], "d")).allowed
    finally:
        await store.close()


async def test_blocked_call_consumes_no_other_limit(backend: Backend) -> None:
    store = await opened(backend.open_limits())
    try:
        wide, tight = limit("wide", 100, 60), limit("tight", 1, 60)
        assert (await store.acquire([wide, tight], "a")).allowed
        for i in range(3):
            assert not (await store.acquire([wide, tight], f"b{i}")).allowed
        outcome = await store.acquire([wide], "c")
        assert outcome.states[0].remaining == 100 - 2
    finally:
        await store.close()


async def test_release_and_forget(backend: Backend) -> None:
    store = await opened(backend.open_limits())
    try:
        one = limit("r", 1, 60)
        assert (await store.acquire([one], "a")).allowed
        assert not (await store.acquire([one], "b")).allowed
        assert await store.release("a")
        assert not await store.release("a"), "slots are given back once"
        assert (await store.acquire([one], "c")).allowed
        await store.forget("c")
        assert not await store.release("c"), "a reported success is final"
        assert not (await store.acquire([one], "d")).allowed
        assert not await store.release("never-seen")
    finally:
        await store.close()


async def test_counters_survive_reopening(backend: Backend) -> None:
    store = await opened(backend.open_limits())
    for i in range(3):
        await store.acquire([limit("p", 5, 60)], f"a{i}")
    await store.close()
    again = await opened(backend.open_limits())
    try:
        outcome = await again.acquire([limit("p", 5, 60)], "b")
        expected = 1 if backend.persistent else 4
        assert outcome.states[0].remaining == expected
    finally:
        await again.close()


CALL = ToolCall(server="srv", name="copy_image_set", arguments={"n": 1})
ME = Principal(session_id="s-1", agent_id="a-1")


async def _open(store: ApprovalStore, call: ToolCall = CALL, ttl: float = 60) -> Any:
    return await store.open_or_get(call, ME, rule="r", reason="why", decision_id="dec_1", ttl=ttl)


async def test_approval_lifecycle(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    fp = fingerprint(CALL, ME.session_id)
    try:
        first = await _open(store)
        assert first.status is ApprovalStatus.PENDING
        assert (await _open(store)).id == first.id
        assert (await store.consume(first.id, fp, principal=ME, decision_id="d")).use is Use.PENDING
        approved = await store.decide(
            first.id, approve=True, approver="ops", comment="ok", grant_ttl=60
        )
        assert approved.status is ApprovalStatus.APPROVED and approved.approver == "ops"
        assert (await _open(store)).id == first.id, "an unused grant is still the open one"
        assert (
            await store.consume(first.id, "other", principal=ME, decision_id="d")
        ).use is Use.MISMATCH
        used = await store.consume(first.id, fp, principal=ME, decision_id="d")
        assert used.use is Use.GRANTED
        assert (await store.consume(first.id, fp, principal=ME, decision_id="d")).use is Use.USED
        assert (await store.get(first.id)).status is ApprovalStatus.USED
        with pytest.raises(Conflict):
            await store.decide(first.id, approve=False, approver="ops", comment="", grant_ttl=60)
        with pytest.raises(NotFound):
            await store.get("apr_missing")
        assert (
            await store.consume("apr_missing", fp, principal=ME, decision_id="d")
        ).use is Use.NOT_FOUND
        fresh = await _open(store)
        assert fresh.id != first.id, "a used approval is not reopened"
    finally:
        await store.close()


async def test_one_grant_lets_exactly_one_concurrent_call_through(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    fp = fingerprint(CALL, ME.session_id)
    try:
        approval = await _open(store)
        await store.decide(approval.id, approve=True, approver="ops", comment="", grant_ttl=60)
        results = await asyncio.gather(
            *[store.consume(approval.id, fp, principal=ME, decision_id=f"d{i}") for i in range(20)]
        )
        assert [r.use for r in results].count(Use.GRANTED) == 1
        opened_many = await asyncio.gather(
            *[
                _open(store, ToolCall(server="srv", name="t", arguments={"same": True}))
                for _ in range(20)
            ]
        )
        assert len({a.id for a in opened_many}) == 1, "one pending approval per call"
    finally:
        await store.close()


async def test_denial_expiry_and_listing(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    try:
        denied = await _open(store, ToolCall(server="srv", name="t", arguments={"x": 1}))
        await store.decide(denied.id, approve=False, approver="ops", comment="no", grant_ttl=60)
        short = await _open(store, ToolCall(server="srv", name="t", arguments={"x": 2}), ttl=0.2)
        pending = await _open(store, ToolCall(server="srv", name="t", arguments={"x": 3}))
        await asyncio.sleep(0.3)
        assert (await store.get(short.id)).status is ApprovalStatus.EXPIRED
        with pytest.raises(Conflict):
            await store.decide(short.id, approve=True, approver="ops", comment="", grant_ttl=60)
        by_status = {s: [a.id for a in await store.list(s, 100)] for s in ApprovalStatus}
        assert by_status[ApprovalStatus.DENIED] == [denied.id]
        assert by_status[ApprovalStatus.EXPIRED] == [short.id]
        assert by_status[ApprovalStatus.PENDING] == [pending.id]
        everything = [a.id for a in await store.list(None, 100)]
        assert everything == [pending.id, short.id, denied.id], "newest first"
        assert len(await store.list(None, 2)) == 2
    finally:
        await store.close()


async def every_page(
    store: ApprovalStore,
    status: ApprovalStatus | None,
    size: int,
    keep: Callable[[Approval], bool] | None = None,
) -> list[list[str]]:
    """The ids of each page, following the pages' tokens (as a client would) to the end."""
    pages: list[list[str]] = []
    after = None
    while True:
        page: ApprovalPage = await store.page(status, size, after=after, keep=keep)
        pages.append([a.id for a in page.approvals])
        if page.next is None:
            return pages
        after = ApprovalCursor.from_token(page.next.token(), field="page_token")
        assert len(pages) < 100, "the pages end"


async def test_listing_pages_newest_first_without_gaps(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    try:
        made = [
            await _open(store, ToolCall(server="srv", name="p", arguments={"i": i}))
            for i in range(7)
        ]
        for approval in made[::3]:
            await store.decide(approval.id, approve=False, approver="o", comment="", grant_ttl=1)
        newest_first = [a.id for a in reversed(made)]
        pages = await every_page(store, None, 3)
        assert pages == [newest_first[:3], newest_first[3:6], newest_first[6:]]
        denied = await every_page(store, ApprovalStatus.DENIED, 2)
        assert sum(denied, []) == [a.id for a in reversed(made[::3])]
        assert all(len(page) <= 2 for page in denied)

        def even(approval: Approval) -> bool:
            return int(approval.arguments["i"]) % 2 == 0

        evens = await every_page(store, None, 2, keep=even)
        assert evens == [[made[6].id, made[4].id], [made[2].id, made[0].id]], "no empty last page"
        assert await store.list(None, 7) == (await store.page(None, 7)).approvals
        assert (await store.page(None, 7)).next is None
    finally:
        await store.close()


@pytest.fixture(params=["memory", "sqlite", "redis", "valkey"])
async def approvals_at(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[Callable[[], float]], ApprovalStore]]:
    """Approval stores of each kind, on a clock the test gives."""
    clients: list[Any] = []
    kind = request.param
    kv: KvServer | None = None
    if kind in ("redis", "valkey"):
        kv = request.getfixturevalue("kv_pool").get(kind)

    def make(clock: Callable[[], float]) -> ApprovalStore:
        if kind == "memory":
            return MemoryApprovalStore(clock)
        if kv is None:
            return SqliteApprovalStore(tmp_path / "approvals.sqlite3", clock=clock)
        client = redis.asyncio.Redis.from_url(kv.url, decode_responses=True)
        clients.append(client)
        return RedisApprovalStore(client, f"test-{uuid.uuid4().hex[:8]}:", clock)

    yield make
    for client in clients:
        await client.aclose()


async def test_pages_split_approvals_made_in_the_same_microsecond(
    approvals_at: Callable[[Callable[[], float]], ApprovalStore],
) -> None:
    """Ties in time are ordered by id, so a page boundary inside them loses nothing."""
    store = await opened(approvals_at(lambda: 1_700_000_000.25))
    try:
        made = [
            await _open(store, ToolCall(server="srv", name="tie", arguments={"i": i}))
            for i in range(5)
        ]
        pages = await every_page(store, None, 2)
        assert [len(page) for page in pages] == [2, 2, 1]
        assert sum(pages, []) == sorted((a.id for a in made), reverse=True)
    finally:
        await store.close()


@pytest.mark.parametrize(
    "token",
    [
        "",
        "123",
        "ZDE6NQ",  # a decision-log token ("d1:5")
        ApprovalCursor(10**18, "apr_1").token() + "!",
        ApprovalCursor(10**18, "apr_1").token(),  # past what a datetime holds
        ApprovalCursor(5, "apr 1").token(),  # not an id made here
        "YTE6MTox" * 100,
    ],
)
def test_approval_page_tokens_are_checked(token: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        ApprovalCursor.from_token(token, field="page_token")
    assert refused.value.field == "page_token"
    assert "not a token from a previous page" in refused.value.message


def test_approval_page_tokens_round_trip() -> None:
    cursor = ApprovalCursor(1_700_000_000_250_000, "apr_" + "ab" * 16)
    token = cursor.token()
    assert not token.isdigit() and "=" not in token
    assert ApprovalCursor.from_token(token, field="page_token") == cursor


async def test_approvals_survive_reopening(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    pending = await _open(store, ToolCall(server="srv", name="t", arguments={"k": "p"}))
    granted = await _open(store, ToolCall(server="srv", name="t", arguments={"k": "g"}))
    await store.decide(granted.id, approve=True, approver="ops", comment="", grant_ttl=60)
    await store.close()
    again = await opened(backend.open_approvals())
    try:
        if not backend.persistent:
            with pytest.raises(NotFound):
                await again.get(pending.id)
            return
        assert (await again.get(pending.id)).status is ApprovalStatus.PENDING
        assert (await again.get(granted.id)).status is ApprovalStatus.APPROVED
    finally:
        await again.close()


async def test_redis_keys_expire_by_themselves(kv_server: KvServer) -> None:
    client = redis.asyncio.Redis.from_url(kv_server.url, decode_responses=True)
    prefix = f"ttl-{uuid.uuid4().hex[:8]}:"
    store = RedisRateLimitStore(client, prefix)
    try:
        await store.acquire([limit("e", 5, 2)], "tok")
        keys = await client.keys(f"{prefix}*")
        assert len(keys) == 2  # the counter and the reservation
        for key in keys:
            assert 0 < await client.pttl(key) <= 2000
    finally:
        await client.aclose()


async def test_an_expiry_is_claimed_once(
    approvals_at: Callable[[Callable[[], float]], ApprovalStore],
) -> None:
    """Claims racing for one approval's expiry (replicas sharing the store make theirs
    through the same atomic update): exactly one wins, once it has expired; none before;
    a gone one is NotFound."""
    now = [1_700_000_000.0]
    store = await opened(approvals_at(lambda: now[0]))
    try:
        left = await _open(store, ToolCall(server="srv", name="left", arguments={}))
        assert await store.claim_expiry(left.id) == (left, False), "not expired yet"
        now[0] += 10_000
        claims = await asyncio.gather(*[store.claim_expiry(left.id) for _ in range(6)])
        assert [won for _, won in claims].count(True) == 1
        assert {approval.status for approval, _ in claims} == {ApprovalStatus.EXPIRED}
        assert (await store.claim_expiry(left.id))[1] is False
        with pytest.raises(NotFound):
            await store.claim_expiry("apr_" + "0" * 32)
    finally:
        await store.close()


async def test_a_denial_stands_for_the_identical_call_until_it_would_have_expired(
    approvals_at: Callable[[Callable[[], float]], ApprovalStore],
) -> None:
    now = [1_700_000_000.0]
    store = await opened(approvals_at(lambda: now[0]))
    try:
        call = ToolCall(server="srv", name="denied", arguments={"a": 1})
        first = await _open(store, call, ttl=60)
        await store.decide(first.id, approve=False, approver="x", comment="no", grant_ttl=60)
        again = await _open(store, call, ttl=60)
        assert (again.id, again.status, again.comment) == (first.id, ApprovalStatus.DENIED, "no")
        now[0] += 61
        fresh = await _open(store, call, ttl=60)
        assert fresh.id != first.id and fresh.status is ApprovalStatus.PENDING
    finally:
        await store.close()
