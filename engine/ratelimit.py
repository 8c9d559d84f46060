"""Exact sliding-window rate limits.

No more than `max` calls are allowed in any interval of `window_seconds`: every allowed
call's time is kept (at most `max` per key) and a call passes only if fewer than `max`
lie inside the window ending now. Several limits on one call are checked together and
recorded together, so a call blocked by one limit consumes none of the others.

The store is a small Protocol so further backends (SQLite, Redis) can stand beside the
in-memory one. The memory store does its whole check-and-record without awaiting, so on
one event loop it is exact under any number of concurrent decisions.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

LimitKey = tuple[str, ...]


@dataclass(frozen=True)
class Limit:
    """One limit on one key: at most `max` calls in any `window` seconds."""

    key: LimitKey
    max: int
    window: float


@dataclass(frozen=True)
class LimitState:
    limit: Limit
    remaining: int
    retry_after: float


@dataclass(frozen=True)
class Reservation:
    """The slots an allowed call took; `release` gives them back."""

    slots: tuple[tuple[LimitKey, float], ...]


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    states: tuple[LimitState, ...]
    reservation: Reservation | None

    def reported(self) -> LimitState | None:
        """The limit to report: the one blocking longest, or the tightest when allowed."""
        if not self.states:
            return None
        if not self.allowed:
            return max(self.states, key=lambda s: s.retry_after)
        return min(self.states, key=lambda s: s.remaining)


class RateLimitStore(Protocol):
    async def acquire(self, limits: Sequence[Limit]) -> Outcome: ...

    async def release(self, reservation: Reservation) -> None: ...


class MemoryRateLimitStore:
    """Per-process limits, kept in memory; keys vanish once their window has passed."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, sweep_every: int = 4096
    ) -> None:
        self._clock = clock
        self._hits: dict[LimitKey, tuple[deque[float], float]] = {}
        self._sweep_every = sweep_every
        self._since_sweep = 0

    def __len__(self) -> int:
        return len(self._hits)

    async def acquire(self, limits: Sequence[Limit]) -> Outcome:
        return self.acquire_now(limits)

    def acquire_now(self, limits: Sequence[Limit]) -> Outcome:
        now = self._clock()
        self._since_sweep += 1
        if self._since_sweep >= self._sweep_every:
            self.sweep(now)
        states = []
        blocked = False
        for limit in limits:
            hits = self._window(limit, now)
            count = len(hits)
            if count >= limit.max:
                blocked = True
                retry_after = hits[count - limit.max] + limit.window - now
                states.append(LimitState(limit, 0, max(retry_after, 0.0)))
            else:
                states.append(LimitState(limit, limit.max - count - 1, 0.0))
        if blocked:
            return Outcome(False, tuple(states), None)
        for limit in limits:
            self._hits[limit.key][0].append(now)
        return Outcome(True, tuple(states), Reservation(tuple((lim.key, now) for lim in limits)))

    def _window(self, limit: Limit, now: float) -> deque[float]:
        entry = self._hits.get(limit.key)
        if entry is None:
            hits: deque[float] = deque()
            self._hits[limit.key] = (hits, limit.window)
            return hits
        hits = entry[0]
        if entry[1] != limit.window:
            self._hits[limit.key] = (hits, limit.window)
        start = now - limit.window
        while hits and hits[0] <= start:
            hits.popleft()
        return hits

    async def release(self, reservation: Reservation) -> None:
        for key, at in reservation.slots:
            entry = self._hits.get(key)
            if entry is not None and at in entry[0]:
                entry[0].remove(at)

    def sweep(self, now: float | None = None) -> None:
        """Drop every key with no call inside its window."""
        now = self._clock() if now is None else now
        self._since_sweep = 0
        stale = [
            key
            for key, (hits, window) in self._hits.items()
            if not hits or hits[-1] <= now - window
        ]
        for key in stale:
            del self._hits[key]
