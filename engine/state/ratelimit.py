"""Exact sliding-window rate limits, with three stores: memory, SQLite and Redis.

No more than `max` (cost units; 1 per call unless the policy weights calls) are allowed in
any interval of `window` seconds: every allowed call's time and cost are kept, and a call
passes only if what lies inside the window ending now, plus its own cost, stays within
`max`. Several limits on one call are checked together and recorded together, so a call
blocked by one limit consumes none of the others. Each store does the whole
check-and-record atomically: memory without awaiting, SQLite in one IMMEDIATE
transaction, Redis in one Lua script that reads the Redis server's clock, so limits
hold exactly across processes and replicas sharing the store. On a Redis Cluster the
counters of one call share a hash tag, so that script runs on the one node holding them.

An allowed call's slots are held under its decision id; `release(decision_id)` gives them
back (the upstream call failed), `forget(decision_id)` makes them final.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from engine.errors import StateUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
LimitKey = tuple[str, ...]


@dataclass(frozen=True)
class Limit:
    """One limit on one key: at most `max` cost units in any `window` seconds.

    The limits acquired together end their keys with the same two parts (the service's
    keys end with the server and tool): on a Redis Cluster that is what puts their
    counters in one slot (see `group`).
    """

    key: LimitKey
    max: float
    window: float
    cost: float = 1


@dataclass(frozen=True)
class LimitState:
    limit: Limit
    remaining: float
    retry_after: float
    ok: bool


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    states: tuple[LimitState, ...]

    def reported(self) -> LimitState | None:
        """The limit to report: the one blocking longest, or the tightest when allowed."""
        if not self.states:
            return None
        if not self.allowed:
            return max(self.states, key=lambda s: s.retry_after)
        return min(self.states, key=lambda s: s.remaining)


class RateLimitStore(Protocol):
    async def open(self) -> None: ...

    async def acquire(
        self, limits: Sequence[Limit], token: str, *, record: bool = True
    ) -> Outcome: ...

    async def release(self, token: str) -> bool: ...

    async def forget(self, token: str) -> bool:
        """Make a reservation's slots final; whether `token` held any."""
        ...

    async def close(self) -> None: ...


def _check(limit: Limit, hits: Sequence[tuple[float, float]], now: float) -> LimitState:
    """Judge `limit` given the (time, cost) hits inside its window, oldest first."""
    used = math.fsum(cost for _, cost in hits)
    if used + limit.cost <= limit.max:
        return LimitState(limit, limit.max - used - limit.cost, 0.0, True)
    retry = limit.window  # a cost above `max` never passes; waiting a window is the answer
    for i, (at, _) in enumerate(hits):
        freed = math.fsum(cost for _, cost in hits[: i + 1])
        if used - freed + limit.cost <= limit.max:
            retry = max(at + limit.window - now, 0.0)
            break
    return LimitState(limit, 0, retry, False)


def _settle(states: list[LimitState]) -> Outcome:
    return Outcome(all(state.ok for state in states), tuple(states))


class _Window:
    """One key's hits inside its window, oldest first, and the sum of their costs (kept as
    hits come and go, so a call that passes costs O(1) whatever the limit)."""

    __slots__ = ("hits", "used", "window")

    def __init__(self, window: float) -> None:
        self.hits: deque[tuple[float, float, str]] = deque()
        self.window = window
        self.used = 0.0

    def expire(self, now: float) -> None:
        start = now - self.window
        hits = self.hits
        while hits and hits[0][0] <= start:
            self.used -= hits.popleft()[1]
        if not hits:
            self.used = 0.0  # no rounding left over from fractional costs

    def add(self, at: float, cost: float, token: str) -> None:
        self.hits.append((at, cost, token))
        self.used += cost

    def remove(self, token: str) -> None:
        for hit in self.hits:
            if hit[2] == token:
                self.hits.remove(hit)
                self.used = math.fsum(cost for _, cost, _ in self.hits)
                return

    def check(self, limit: Limit, now: float) -> LimitState:
        used = self.used
        if used + limit.cost <= limit.max and not math.isclose(used + limit.cost, limit.max):
            return LimitState(limit, limit.max - used - limit.cost, 0.0, True)
        # At the edge (or over it), judge on the exact hits, as the other stores do.
        return _check(limit, [(at, cost) for at, cost, _ in self.hits], now)


class MemoryRateLimitStore:
    """Per-process limits in memory; keys vanish once their window has passed."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, sweep_every: int = 4096
    ) -> None:
        self._clock = clock
        self._hits: dict[LimitKey, _Window] = {}
        self._held: dict[str, tuple[float, list[LimitKey]]] = {}
        self._sweep_every = sweep_every
        self._since_sweep = 0

    def __len__(self) -> int:
        return len(self._hits)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def acquire(self, limits: Sequence[Limit], token: str, *, record: bool = True) -> Outcome:
        return self.acquire_now(limits, token, record=record)

    def acquire_now(
        self, limits: Sequence[Limit], token: str = "", *, record: bool = True
    ) -> Outcome:
        now = self._clock()
        self._since_sweep += 1
        if self._since_sweep >= self._sweep_every:
            self.sweep(now)
        windows = [self._window(limit, now) for limit in limits]
        outcome = _settle([w.check(limit, now) for w, limit in zip(windows, limits, strict=True)])
        if outcome.allowed and record:
            for w, limit in zip(windows, limits, strict=True):
                w.add(now, limit.cost, token)
            if token and limits:
                self._held[token] = (
                    now + max(lim.window for lim in limits),
                    [lim.key for lim in limits],
                )
        return outcome

    def _window(self, limit: Limit, now: float) -> _Window:
        w = self._hits.get(limit.key)
        if w is None:
            w = self._hits[limit.key] = _Window(limit.window)
            return w
        w.window = limit.window
        w.expire(now)
        return w

    async def release(self, token: str) -> bool:
        held = self._held.pop(token, None)
        if held is None:
            return False
        for key in held[1]:
            w = self._hits.get(key)
            if w is not None:
                w.remove(token)
        return True

    async def forget(self, token: str) -> bool:
        return self._held.pop(token, None) is not None

    def sweep(self, now: float | None = None) -> None:
        """Drop every key with no call inside its window, and lapsed reservations."""
        now = self._clock() if now is None else now
        self._since_sweep = 0
        stale = [
            key for key, w in self._hits.items() if not w.hits or w.hits[-1][0] <= now - w.window
        ]
        for key in stale:
            del self._hits[key]
        for token in [t for t, (until, _) in self._held.items() if until <= now]:
            del self._held[token]


def _key_text(key: LimitKey) -> str:
    return json.dumps(list(key), separators=(",", ":"), ensure_ascii=False)


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_hits (
    key TEXT NOT NULL,
    at REAL NOT NULL,
    cost REAL NOT NULL,
    token TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_hits_key_at ON rate_hits (key, at);
CREATE INDEX IF NOT EXISTS rate_hits_token ON rate_hits (token);
CREATE INDEX IF NOT EXISTS rate_hits_expires ON rate_hits (expires_at);
"""


class SqliteDb:
    """One SQLite file used from one dedicated thread, so the event loop never blocks."""

    def __init__(
        self,
        path: Path,
        schema: str,
        *,
        busy_timeout_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.clock = clock
        self._schema = schema
        self._busy_timeout = busy_timeout_ms / 1000
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self.run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(self._schema)
        except sqlite3.Error:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self.run(_close)
        self._executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"SQLite store {self.path}: {exc}") from exc

    async def transaction(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        """Run `work(db, now)` in one IMMEDIATE transaction on the store's thread."""
        return await self.run(self._tx, work)

    def _tx(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        db = self._db
        if db is None:
            raise sqlite3.ProgrammingError("store is not open")
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db, self.clock())
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result


class SqliteRateLimitStore:
    """Limits in a SQLite file: exact across the processes of one host."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = 500,
        clock: Callable[[], float] = time.time,
        sweep_every: int = 1024,
    ) -> None:
        self.db = SqliteDb(path, SQLITE_SCHEMA, busy_timeout_ms=busy_timeout_ms, clock=clock)
        self._sweep_every = sweep_every
        self._since_sweep = 0

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def acquire(self, limits: Sequence[Limit], token: str, *, record: bool = True) -> Outcome:
        self._since_sweep += 1
        sweep = self._since_sweep >= self._sweep_every
        if sweep:
            self._since_sweep = 0

        def work(db: sqlite3.Connection, now: float) -> Outcome:
            if sweep:
                db.execute("DELETE FROM rate_hits WHERE expires_at <= ?", (now,))
            states = []
            for limit in limits:
                key = _key_text(limit.key)
                start = now - limit.window
                # The sum answers a passing call; the hits themselves are read only to say
                # when a blocked one could pass.
                used = db.execute(
                    "SELECT COALESCE(SUM(cost), 0) FROM rate_hits WHERE key = ? AND at > ?",
                    (key, start),
                ).fetchone()[0]
                if used + limit.cost <= limit.max:
                    states.append(LimitState(limit, limit.max - used - limit.cost, 0.0, True))
                    continue
                rows = db.execute(
                    "SELECT at, cost FROM rate_hits WHERE key = ? AND at > ? ORDER BY at",
                    (key, start),
                ).fetchall()
                states.append(_check(limit, [(row[0], row[1]) for row in rows], now))
            outcome = _settle(states)
            if outcome.allowed and record:
                db.executemany(
                    "INSERT INTO rate_hits (key, at, cost, token, expires_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (_key_text(lim.key), now, lim.cost, token, now + lim.window)
                        for lim in limits
                    ],
                )
            return outcome

        return await self.db.transaction(work)

    async def release(self, token: str) -> bool:
        def work(db: sqlite3.Connection, now: float) -> bool:
            cursor = db.execute(
                "DELETE FROM rate_hits WHERE token = ? AND expires_at > ?", (token, now)
            )
            return cursor.rowcount > 0

        return await self.db.transaction(work)

    async def forget(self, token: str) -> bool:
        def work(db: sqlite3.Connection, now: float) -> bool:
            cursor = db.execute("UPDATE rate_hits SET token = '' WHERE token = ?", (token,))
            return cursor.rowcount > 0

        held: bool = await self.db.transaction(work)
        return held


# Redis keys (under the configured prefix):
#   rl:{<tag>}:<limit key as JSON>  a sorted set of hits, members "<token>|<cost>" scored
#                                   by their time in ms; it expires a window after its
#                                   newest hit.
#   held:<token>                    a hash: counter key -> member, the slots a decision
#                                   holds; it expires with the longest of its windows.
# <tag> is a digest of the limit key's group (its server and tool, see `group`). Redis
# Cluster places a key by the text between its first `{` and `}`, so every counter of
# one call lies in one slot and one script can check and record them all.

# KEYS: the counters, then (on one Redis, not a cluster) the reservation. ARGV: token,
# "record" or "peek", the number of counters, then max, window_ms, cost for each. Time
# is the Redis server's, so every replica judges by one clock. Returns allowed (1 or 0),
# then remaining and retry_ms for each counter.
REDIS_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = ARGV[1]
local n = tonumber(ARGV[3])
local out = {1}
local longest = 0
for i = 1, n do
  local max = tonumber(ARGV[3 * i + 1])
  local window = tonumber(ARGV[3 * i + 2])
  local cost = tonumber(ARGV[3 * i + 3])
  if window > longest then longest = window end
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local hits = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  local used = 0
  for j = 1, #hits, 2 do
    used = used + tonumber(string.match(hits[j], '|([^|]*)$'))
  end
  local remaining = max - used - cost
  local retry = 0
  if remaining < 0 then
    out[1] = 0
    remaining = 0
    if cost > max then
      retry = window
    else
      local freed = 0
      for j = 1, #hits, 2 do
        freed = freed + tonumber(string.match(hits[j], '|([^|]*)$'))
        if used - freed + cost <= max then
          retry = tonumber(hits[j + 1]) + window - now
          break
        end
      end
    end
  end
  out[#out + 1] = tostring(remaining)
  out[#out + 1] = tostring(retry)
end
if out[1] == 1 and ARGV[2] == 'record' then
  local held = KEYS[n + 1]
  for i = 1, n do
    local member = token .. '|' .. ARGV[3 * i + 3]
    redis.call('ZADD', KEYS[i], now, member)
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[3 * i + 2]))
    if held then redis.call('HSET', held, KEYS[i], member) end
  end
  if held and n > 0 then redis.call('PEXPIRE', held, longest) end
end
return out
"""

# On a cluster the reservation lies in its own slot, so it is written after the counters.
# KEYS: the reservation. ARGV: its TTL in ms, then counter key and member pairs.
REDIS_HOLD = """
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: the reservation. Deletes it and returns what it held: key, member, key, member...
REDIS_TAKE = """
local held = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return held
"""

# One Redis only. KEYS: the reservation. Removes the hits it lists (keys named in it, not
# in KEYS: fine on one server, refused by a cluster); returns how many it removed.
REDIS_RELEASE = """
local held = redis.call('HGETALL', KEYS[1])
local removed = 0
for i = 1, #held, 2 do
  removed = removed + redis.call('ZREM', held[i], held[i + 1])
end
redis.call('DEL', KEYS[1])
return removed
"""

# KEYS: counters (of one slot). ARGV: one member for each. Returns how many were removed.
REDIS_UNHIT = """
local removed = 0
for i = 1, #KEYS do
  removed = removed + redis.call('ZREM', KEYS[i], ARGV[i])
end
return removed
"""

# Tries to give back the hits of a call whose reservation could not be written.
GIVE_BACK_TRIES = 3


def group(key: LimitKey) -> LimitKey:
    """The part of a limit key that decides where Redis Cluster keeps its counter.

    The service's keys are (rule, scope, subject, server, tool) and a call's limits all
    concern one server and tool, so those last two parts are what the counters of one
    call share. The subject cannot be part of it: a user's counter is checked together
    with the counter of whichever session the call came from.
    """
    return key[-2:]


def slot_tag(text: str) -> str:
    """A Redis hash tag for `text`: `{` + 8 hex digits of its SHA-256 + `}`.

    A digest, because `text` may hold braces that would end a tag early; two texts that
    share a digest merely share a slot.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return "{" + digest[:8] + "}"


class RedisGate:
    """At most `size` Redis operations of this process in flight; each waits at most
    `wait` seconds for its turn, then fails (StateUnavailable).

    redis-py's cluster client has no blocking connection pool: past `max_connections`
    per node it fails at once, so a burst of decisions would be denied instead of
    waiting briefly as it does on one Redis. With at most `size` operations in flight
    (each using one connection per node at a time), `size` connections per node suffice.
    Without a size (one Redis, whose pool already blocks) it only maps errors.
    """

    def __init__(self, size: int | None = None, wait: float = 1.0) -> None:
        self._turns = asyncio.Semaphore(size) if size is not None else None
        self._wait = wait

    async def run(self, call: Awaitable[T]) -> T:
        """Await `call` in its turn; every Redis failure becomes StateUnavailable."""
        if self._turns is None:
            result: T = await redis_call(call)
            return result
        try:
            async with asyncio.timeout(self._wait):
                await self._turns.acquire()
        except BaseException as exc:
            if isinstance(call, Coroutine):
                call.close()  # never started: say so, rather than warn it was never awaited
            if isinstance(exc, TimeoutError):
                raise StateUnavailable(
                    f"Redis: no free connection within {self._wait:g} s"
                ) from exc
            raise
        try:
            result = await redis_call(call)
            return result
        finally:
            self._turns.release()


def is_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


async def open_cluster(client: Any, gate: RedisGate) -> None:
    """Learn the cluster's slot map now, before calls arrive.

    redis-py fetches it on first use, and many first uses at once can trip over each
    other's connections. If the cluster cannot be reached yet, calls are denied until it
    can (the map is fetched on first use then).
    """
    try:
        await gate.run(client.initialize())
    except StateUnavailable as exc:
        log.warning("Redis Cluster not reachable yet: %s", exc)


def cluster_client(url: str, **options: Any) -> Any:
    """redis-py's asyncio RedisCluster from `url` (any node of the cluster).

    It closes like a `redis.asyncio.Redis` (`aclose(close_connection_pool=True)`), so
    whoever owns a client closes either kind the same way.
    """
    from redis.asyncio.cluster import RedisCluster

    class ClusterClient(RedisCluster):
        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            await super().aclose()

    return ClusterClient.from_url(url, **options)


class RedisRateLimitStore:
    """Limits in Redis (or Valkey), or a Redis Cluster: exact across every replica
    sharing it.

    On one Redis a call's check, record and reservation are one script, and so is a
    release. On a cluster the counters of one call share a slot (see `group`) and are
    checked and recorded in one script there; the reservation, in its token's slot, is
    written next, so a process that dies between the two leaves its slots taken until
    their window passes (never more calls than the limit). A release there takes the
    reservation, then removes the hits it names.
    """

    def __init__(self, client: Any, prefix: str, *, gate: RedisGate | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self._cluster = is_cluster(client)
        self._gate = gate or RedisGate()
        self._acquire = client.register_script(REDIS_ACQUIRE)
        self._hold = client.register_script(REDIS_HOLD)
        self._take = client.register_script(REDIS_TAKE)
        self._unhit = client.register_script(REDIS_UNHIT)
        self._release = client.register_script(REDIS_RELEASE)

    async def open(self) -> None:
        if self._cluster:
            await open_cluster(self._client, self._gate)

    async def close(self) -> None:
        return None

    def counter_key(self, key: LimitKey) -> str:
        return f"{self._prefix}rl:{slot_tag(_key_text(group(key)))}:{_key_text(key)}"

    def held_key(self, token: str) -> str:
        return f"{self._prefix}held:{token}"

    async def acquire(self, limits: Sequence[Limit], token: str, *, record: bool = True) -> Outcome:
        if not limits:
            return Outcome(True, ())
        if self._cluster and len({group(limit.key) for limit in limits}) > 1:
            raise ValueError(
                "on a Redis Cluster the limits of one call must share their server and "
                f"tool (the last two parts of their keys): {[lim.key for lim in limits]}"
            )
        counters = [self.counter_key(limit.key) for limit in limits]
        members = [f"{token}|{float(limit.cost)!r}" for limit in limits]
        args: list[Any] = [token, "record" if record else "peek", len(limits)]
        for limit in limits:
            args += [repr(float(limit.max)), _window_ms(limit), repr(float(limit.cost))]
        keys = counters if self._cluster else [*counters, self.held_key(token)]
        reply = await self._gate.run(self._acquire(keys=keys, args=args))
        states = []
        for i, limit in enumerate(limits):
            remaining = float(reply[1 + 2 * i])
            retry_ms = float(reply[2 + 2 * i])
            states.append(
                LimitState(limit, remaining, retry_ms / 1000, remaining >= 0 and retry_ms == 0)
            )
        outcome = Outcome(bool(int(reply[0])), tuple(states))
        if outcome.allowed and record and self._cluster:
            longest = max(_window_ms(limit) for limit in limits)
            pairs = [item for pair in zip(counters, members, strict=True) for item in pair]
            try:
                await self._gate.run(
                    self._hold(keys=[self.held_key(token)], args=[longest, *pairs])
                )
            except StateUnavailable:
                # Not held, so not releasable: give the slots back now (else they lapse
                # with their window).
                await self._give_back(counters, members)
                raise
        return outcome

    async def _give_back(self, counters: list[str], members: list[str]) -> None:
        """Remove hits that no reservation holds, if their node answers within a few
        tries (the client may be refreshing its slot map after another node failed)."""
        for attempt in range(GIVE_BACK_TRIES):
            try:
                await self._gate.run(self._unhit(keys=counters, args=members))
                return
            except StateUnavailable as exc:
                if attempt == GIVE_BACK_TRIES - 1:
                    log.warning("slots not given back (they lapse with their window): %s", exc)
                    return
                await asyncio.sleep(0.05 * (attempt + 1))

    async def release(self, token: str) -> bool:
        if not self._cluster:
            # One Redis: take the reservation and remove its hits in one script.
            removed = await self._gate.run(self._release(keys=[self.held_key(token)]))
            return int(removed) > 0
        held = await self._gate.run(self._take(keys=[self.held_key(token)]))
        if not held:
            return False
        counters, members = held[0::2], held[1::2]
        removed = await self._gate.run(self._unhit(keys=counters, args=members))
        return int(removed) > 0

    async def forget(self, token: str) -> bool:
        removed = await self._gate.run(self._client.delete(self.held_key(token)))
        return int(removed) > 0


def _window_ms(limit: Limit) -> int:
    return max(1, round(limit.window * 1000))


async def redis_call(call: Awaitable[T]) -> T:
    """Await a Redis command; every Redis failure becomes StateUnavailable."""
    import redis.exceptions

    try:
        return await call
    except (redis.exceptions.MovedError, redis.exceptions.ClusterCrossSlotError) as exc:
        # What a node of a Redis Cluster answers a client that does not know it is one.
        raise StateUnavailable(
            f"Redis: {exc} (the server is a Redis Cluster: set MCP_POLICY_REDIS_CLUSTER=true)"
        ) from exc
    except (
        redis.exceptions.RedisError,
        redis.exceptions.RedisClusterException,
        OSError,
        TimeoutError,
    ) as exc:
        raise StateUnavailable(f"Redis: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        # A failure inside the client that is not a Redis error (redis-py's cluster
        # client has raised AttributeError from a connection another task reset): the
        # store could not answer, which is a deny like any other store failure.
        log.warning("Redis client failure", exc_info=True)
        raise StateUnavailable(f"Redis client: {type(exc).__name__}: {exc}") from exc
