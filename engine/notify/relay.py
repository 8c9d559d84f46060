"""Approval events between replicas that share a Redis store.

An approval opened on one replica may be decided on another, and the approver's console,
or the proxy waiting for that approval, may be connected to a third. Each replica sends
the events it publishes to a Redis pub/sub channel (`<redis_prefix>approval-events`) and
hands those of the other replicas to its own listeners (`ApprovalEvents.deliver`): the
console's live view and the waiters see every change within the channel's latency,
whichever replica made it. Webhooks are sent only by the replica where the change
happened (a relayed event is `local=False`), so a receiver gets each event once.

Sending never blocks a decision: events wait in a bounded queue (the oldest dropped and
counted when Redis is slow) and one task publishes them. The subscription reconnects with
backoff when Redis goes away; while it is away, a replica's listeners see only its own
events (the waiters read the store every second regardless). A message on the channel
that is not an event this code wrote is dropped and logged, never delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from engine.models import Approval
from engine.notify.events import ApprovalEvent, ApprovalEvents, EventType

log = logging.getLogger(__name__)

QUEUE = 1000
MAX_MESSAGE_BYTES = 1 << 20
RECONNECT_MAX = 5.0


class RedisEventRelay:
    def __init__(self, url: str, channel: str, hub: ApprovalEvents, *, timeout: float) -> None:
        self.url = url
        self.channel = channel
        self.hub = hub
        self.timeout = timeout
        self.origin = uuid.uuid4().hex  # this replica, on the messages it sends
        self.dropped = 0  # events not sent (the queue was full)
        self.received = 0
        self.rejected = 0  # messages on the channel that were not events
        self._queue: deque[ApprovalEvent] = deque()
        self._ready = asyncio.Event()
        self._client: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        import redis.asyncio

        self._client = redis.asyncio.Redis.from_url(
            self.url,
            socket_timeout=None,  # the subscription waits for messages indefinitely
            socket_connect_timeout=max(1.0, self.timeout),
            health_check_interval=10,
        )
        self.hub.relay = self.send
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="approval-events-send"),
            asyncio.create_task(self._receive_loop(), name="approval-events-receive"),
        ]

    async def close(self) -> None:
        if self.hub.relay == self.send:
            self.hub.relay = None
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- out -------------------------------------------------------------------------------

    def send(self, event: ApprovalEvent) -> None:
        """Queue a local event for the other replicas (never blocks)."""
        if len(self._queue) >= QUEUE:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    def _message(self, event: ApprovalEvent) -> str:
        return json.dumps(
            {
                "origin": self.origin,
                "id": event.id,
                "type": event.type.value,
                "at": event.at.isoformat(),
                "approval": event.approval.model_dump(mode="json"),
            }
        )

    async def _send_loop(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            event = self._queue.popleft()
            try:
                async with asyncio.timeout(max(1.0, self.timeout)):
                    await self._client.publish(self.channel, self._message(event))
            except Exception as exc:  # Redis away: this event reaches only local listeners
                self.dropped += 1
                log.warning("approval event %s not relayed to other replicas: %s", event.id, exc)

    # -- in --------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.subscribed.set()
                    backoff = 0.1
                    async for message in pubsub.listen():
                        self._receive(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                log.warning("approval events from other replicas: %s; reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)

    def _receive(self, data: Any) -> None:
        event = self.parse(data)
        if event is not None:
            self.received += 1
            self.hub.deliver(event)

    def parse(self, data: Any) -> ApprovalEvent | None:
        """The event another replica sent, or None (this replica's own, or not an event)."""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
            self._reject("not a message of this size")
            return None
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                self._reject("not a JSON object")
                return None
            if body.get("origin") == self.origin:
                return None
            return ApprovalEvent(
                type=EventType(body["type"]),
                approval=Approval.model_validate(body["approval"]),
                at=datetime.fromisoformat(body["at"]),
                id=str(body["id"]),
                local=False,
            )
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            self._reject(str(exc)[:200])
            return None

    def _reject(self, why: str) -> None:
        self.rejected += 1
        log.warning("dropped a message on %s that is no approval event: %s", self.channel, why)
