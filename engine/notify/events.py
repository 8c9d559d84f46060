"""Approval events: what happened to an approval, fanned out to whoever listens.

The service publishes one event per change of an approval (`EventType`): requested (a new
approval was opened), approved, denied, used (its grant let the call through) and expired
(it was neither decided nor used in time). Listeners are the console's live view (server-
sent events), the webhook dispatcher and anyone waiting for one approval to be decided (a
proxy waiting for a human). Publishing never blocks and never fails a decision: each
subscriber has a bounded queue of its own, and one that falls behind loses the oldest
events and is told so (`Subscription.dropped`), never slows the publisher.

Expiry is not an action anybody takes, so it is watched for (`ExpiryWatch`): the approvals
open when the process started, and every one it saw opened or granted since, are looked at
once due, and `approval.expired` is published by whichever process first claims it in the
store (`ApprovalStore.claim_expiry`, atomic), so replicas sharing a store announce each
expiry once. The other events come from the replica where the change happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from engine.errors import EngineError, NotFound
from engine.models import Approval, ApprovalStatus

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 1000
EXPIRY_INTERVAL = 0.5


class EventType(StrEnum):
    REQUESTED = "approval.requested"
    APPROVED = "approval.approved"
    DENIED = "approval.denied"
    USED = "approval.used"
    EXPIRED = "approval.expired"


# The event a status change to each status is.
EVENT_OF_STATUS = {
    ApprovalStatus.PENDING: EventType.REQUESTED,
    ApprovalStatus.APPROVED: EventType.APPROVED,
    ApprovalStatus.DENIED: EventType.DENIED,
    ApprovalStatus.USED: EventType.USED,
    ApprovalStatus.EXPIRED: EventType.EXPIRED,
}


@dataclass(frozen=True)
class ApprovalEvent:
    """One change of one approval. `id` is unique per event (a webhook's `webhook-id`);
    `approval` is the record after the change, its `url` filled in when the service has a
    public URL."""

    type: EventType
    approval: Approval
    at: datetime
    id: str = field(default_factory=lambda: "evt_" + uuid.uuid4().hex)
    # False for an event another replica published (engine.notify.relay): shown live, but
    # sent on (webhooks) only by the replica where it happened.
    local: bool = True

    def payload(self) -> dict[str, Any]:
        """The event as JSON: `{"type", "timestamp", "data": {"approval": {...}}}` (the
        shape of Standard Webhooks payloads)."""
        return {
            "type": self.type.value,
            "timestamp": self.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": {"approval": self.approval.model_dump(mode="json")},
        }


class Subscription:
    """A listener's bounded queue of events, read with `async for` (or `get`)."""

    def __init__(
        self, hub: ApprovalEvents, maxsize: int, accept: Callable[[ApprovalEvent], bool]
    ) -> None:
        self._hub = hub
        self.accept = accept
        self._queue: deque[ApprovalEvent] = deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self.dropped = 0  # events lost because this subscriber fell behind
        self.closed = False

    def _put(self, event: ApprovalEvent) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    def pending(self) -> int:
        return len(self._queue)

    async def get(self, timeout: float | None = None) -> ApprovalEvent | None:
        """The next event; None when `timeout` passes first or the subscription is closed."""
        while not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return None
        return self._queue.popleft()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._hub._subscribers.discard(self)

    def __aiter__(self) -> AsyncIterator[ApprovalEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ApprovalEvent]:
        while (event := await self.get()) is not None:
            yield event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ApprovalEvents:
    """The hub: `publish` from the service, `subscribe` / `wait_change` to listen."""

    def __init__(self, url_of: Callable[[str], str | None] | None = None) -> None:
        self._subscribers: set[Subscription] = set()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._url_of = url_of or (lambda approval_id: None)
        self.published = 0
        self.expiry = ExpiryWatch(self)
        # Sends each local event to the other replicas (engine.notify.relay), when set.
        self.relay: Callable[[ApprovalEvent], None] | None = None

    def url(self, approval_id: str) -> str | None:
        """The approval's page in the console, when the service has a public URL."""
        return self._url_of(approval_id)

    def with_url(self, approval: Approval) -> Approval:
        url = self.url(approval.id)
        if url is None or approval.url == url:
            return approval
        return approval.model_copy(update={"url": url})

    def publish(self, event_type: EventType, approval: Approval) -> ApprovalEvent:
        """Hand one event to every subscriber and wake the waiters of its approval."""
        event = ApprovalEvent(event_type, self.with_url(approval), datetime.now(UTC))
        self.published += 1
        self.deliver(event)
        if self.relay is not None:
            self.relay(event)
        return event

    def deliver(self, event: ApprovalEvent) -> None:
        """Hand `event` (published here, or relayed from another replica) to this process's
        subscribers and waiters."""
        for subscriber in list(self._subscribers):
            if subscriber.accept(event):
                subscriber._put(event)
        for waiter in self._waiters.pop(event.approval.id, ()):
            waiter.set()
        if event.type in (EventType.REQUESTED, EventType.APPROVED):
            self.expiry.watch(event.approval)

    def subscribe(
        self,
        *,
        maxsize: int = DEFAULT_QUEUE,
        accept: Callable[[ApprovalEvent], bool] = lambda event: True,
    ) -> Subscription:
        """A new listener's queue, of the events `accept` takes (all, by default)."""
        subscription = Subscription(self, maxsize, accept)
        self._subscribers.add(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def wait_change(self, approval_id: str, timeout: float) -> bool:
        """Wait until an event of `approval_id` is published here, at most `timeout`
        seconds; whether one was. (A change made by another replica is not published
        here: a waiter reads the store again after its timeout.)"""
        waiter = asyncio.Event()
        self._waiters.setdefault(approval_id, set()).add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.wait()
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[approval_id]

    async def start(
        self,
        claim: Callable[[str], Awaitable[tuple[Approval, bool]]],
        open_now: Iterable[Approval] = (),
    ) -> None:
        """Start watching for expiries: `claim` is the store's `claim_expiry`, `open_now`
        the approvals open at start."""
        await self.expiry.start(claim, open_now)

    async def close(self) -> None:
        await self.expiry.close()
        for subscriber in list(self._subscribers):
            subscriber.close()


class ExpiryWatch:
    """Publishes `approval.expired` for the open approvals this process saw, once due."""

    def __init__(self, hub: ApprovalEvents, interval: float = EXPIRY_INTERVAL) -> None:
        self._hub = hub
        self._interval = interval
        self._due: list[tuple[float, str]] = []  # (expires at, approval id), a heap
        self._expires: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._claim: Callable[[str], Awaitable[tuple[Approval, bool]]] | None = None

    def watch(self, approval: Approval) -> None:
        at = approval.expires_at.timestamp()
        if self._expires.get(approval.id) == at:
            return
        self._expires[approval.id] = at
        heapq.heappush(self._due, (at, approval.id))

    @property
    def watched(self) -> int:
        return len(self._expires)

    async def start(
        self,
        claim: Callable[[str], Awaitable[tuple[Approval, bool]]],
        open_now: Iterable[Approval] = (),
    ) -> None:
        self._claim = claim
        for approval in open_now:
            self.watch(approval)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="approval-expiry")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check(time.time())
            except Exception:  # never let the watch die: the next round tries again
                log.exception("approval expiry watch failed")

    async def check(self, now: float) -> None:
        """Look at every watched approval due by `now`."""
        assert self._claim is not None
        while self._due and self._due[0][0] <= now:
            at, approval_id = heapq.heappop(self._due)
            if self._expires.get(approval_id) != at:
                continue  # superseded (granted: a new expiry) or already settled
            try:
                approval, claimed = await self._claim(approval_id)
            except NotFound:
                del self._expires[approval_id]
                continue
            except EngineError as exc:  # the store is down: look again next round
                heapq.heappush(self._due, (at, approval_id))
                log.warning("approval %s: cannot read its expiry: %s", approval_id, exc.message)
                return
            if approval.status is ApprovalStatus.EXPIRED:
                del self._expires[approval_id]
                if claimed:  # else another process announced it
                    self._hub.publish(EventType.EXPIRED, approval)
            elif approval.status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED):
                # Granted elsewhere (a new expiry), or the store's clock is behind this
                # one's: look again when it is due.
                later = max(approval.expires_at.timestamp(), now + self._interval)
                self._expires[approval_id] = later
                heapq.heappush(self._due, (later, approval_id))
            else:
                del self._expires[approval_id]
