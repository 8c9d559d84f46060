"""Approval events between two replicas sharing a real Redis (and Valkey): what happens on
one is seen live on the other, marked as relayed; a waiter on one is woken by a decision on
the other; an expiry is announced once between them; a message on the channel that is not
an event is dropped and nothing breaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio

from engine.models import ApprovalStatus
from engine.notify.events import ApprovalEvent, EventType, Subscription
from engine.transports.server import Servers, start_servers
from tests.clients import HttpClient
from tests.conftest import APPROVER_TOKEN, approval_call, copy_policy, session, settings_for
from tests.kv import KvServer
from tests.test_webhooks import SECRET, Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver both replicas send to (it verifies every request)."""
    running = await Receiver(SECRET).start()
    yield running
    await running.stop()


@pytest.fixture
async def pair(
    tmp_path: Path, kv_server: KvServer, receiver: Receiver
) -> AsyncIterator[tuple[Servers, Servers, str]]:
    prefix = f"relay-{session()}:"
    rego, data = copy_policy(tmp_path)
    started = []
    for name in ("a", "b"):
        settings = settings_for(
            tmp_path / name,
            policy_paths=[rego, data],
            state_store="redis",
            redis_url=kv_server.url,
            redis_prefix=prefix,
            approval_ttl_seconds=2,
            approval_webhook_urls=receiver.url,
            approval_webhook_secret=SECRET,
        )
        started.append(await start_servers(settings))
    for servers in started:
        relay = servers.runtime._relay
        assert relay is not None
        await asyncio.wait_for(relay.subscribed.wait(), 10)
    yield started[0], started[1], prefix
    for servers in started:
        await servers.stop()


async def next_of(seen: Subscription, approval_id: str, kind: EventType) -> ApprovalEvent:
    while True:
        event = await seen.get(timeout=10)
        assert event is not None, f"no {kind} for {approval_id}"
        if event.approval.id == approval_id and event.type is kind:
            return event


async def test_events_cross_replicas(
    pair: tuple[Servers, Servers, str], receiver: Receiver
) -> None:
    a, b, _ = pair
    async with (
        httpx.AsyncClient(base_url=a.http_url, timeout=30) as raw_a,
        httpx.AsyncClient(base_url=b.http_url, timeout=30) as raw_b,
    ):
        api_a, api_b = HttpClient(raw_a), HttpClient(raw_b)
        with (
            a.runtime.service.events.subscribe() as on_a,
            b.runtime.service.events.subscribe() as on_b,
        ):
            call = approval_call()
            approval_id = (await api_a.decide(call))["approval"]["id"]
            here = await next_of(on_a, approval_id, EventType.REQUESTED)
            there = await next_of(on_b, approval_id, EventType.REQUESTED)
            assert (here.local, there.local) == (True, False)
            assert there.id == here.id and there.approval == here.approval

            # A waiter on a is woken by the approval given on b.
            waiting = asyncio.create_task(a.runtime.service.await_approval(approval_id, 30))
            await asyncio.sleep(0)
            await api_b.act(APPROVER_TOKEN, approval_id, "approve", "operator", "ok")
            ref = await asyncio.wait_for(waiting, 30)
            assert ref.status is ApprovalStatus.APPROVED
            approved = await next_of(on_a, approval_id, EventType.APPROVED)
            assert approved.local is False

            assert (await api_a.decide(call))["verdict"] == "allow"
            used = await next_of(on_b, approval_id, EventType.USED)
            assert used.local is False
    # Each event reached the webhook once, from the replica where it happened (both
    # replicas send to the receiver, and both saw every event).
    kinds = ["approval.requested", "approval.approved", "approval.used"]
    delivered = await receiver.wait_types(approval_id, kinds)
    await asyncio.sleep(1.0)  # time for a second copy to arrive, were one sent
    assert [r.type for r in receiver.of(approval_id)] == kinds
    assert len({r.id for r in delivered}) == 3


async def test_an_expiry_is_announced_once_by_the_pair(pair: tuple[Servers, Servers, str]) -> None:
    a, b, _ = pair
    async with httpx.AsyncClient(base_url=a.http_url, timeout=30) as raw:
        with (
            a.runtime.service.events.subscribe() as on_a,
            b.runtime.service.events.subscribe() as on_b,
        ):
            approval_id = (await HttpClient(raw).decide(approval_call()))["approval"]["id"]
            first = await next_of(on_a, approval_id, EventType.EXPIRED)
            second = await next_of(on_b, approval_id, EventType.EXPIRED)
            assert first.id == second.id, "one event, seen on both"
            assert sorted([first.local, second.local]) == [False, True]
            # Both replicas watched it; wait past another round of both watches.
            await asyncio.sleep(1.5)
            for seen in (on_a, on_b):
                while (event := await seen.get(timeout=0)) is not None:
                    assert not (
                        event.approval.id == approval_id and event.type is EventType.EXPIRED
                    )


async def test_a_message_that_is_no_event_is_dropped(
    pair: tuple[Servers, Servers, str], kv_server: KvServer
) -> None:
    a, b, prefix = pair
    relay = b.runtime._relay
    assert relay is not None
    client = redis.asyncio.Redis.from_url(kv_server.url)
    try:
        with b.runtime.service.events.subscribe() as on_b:
            for junk in (
                b"not json",
                b"[1, 2]",
                b'{"origin": "x", "type": "approval.approved"}',
                b'{"origin": "x", "id": "e", "type": "approval.owned", "at": "2026-01-01T00:00:00",'
                b' "approval": {}}',
                b"{" * 100_000,
            ):
                await client.publish(f"{prefix}approval-events", junk)
            async with httpx.AsyncClient(base_url=a.http_url, timeout=30) as raw:
                approval_id = (await HttpClient(raw).decide(approval_call()))["approval"]["id"]
            event = await next_of(on_b, approval_id, EventType.REQUESTED)
            assert event.local is False
        assert relay.rejected == 5
    finally:
        await client.aclose()
