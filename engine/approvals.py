"""Human approvals, with three stores: memory, SQLite and Redis.

An approval is bound to a fingerprint of (server, tool, canonical arguments, session).
While one is open (pending, or approved and not yet used) the same call gets the same
approval back. An approved grant lets exactly one matching call through, once, before it
expires.

What may happen to an approval is decided here once, by pure functions over one record
(`_consume`, `_decide`, `_release`); each store only supplies an atomic read-modify-write
of one record (`_update`) and of the fingerprint index (`open_or_get`): memory by not
awaiting, SQLite by an IMMEDIATE transaction, Redis by a compare-and-set script on keys
of one hash tag (so a Redis Cluster runs it on one node).
"""

from __future__ import annotations

import abc
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from engine import jsonstrict
from engine.errors import Conflict, NotFound
from engine.models import Approval, ApprovalStatus, Principal, ToolCall
from engine.ratelimit import RedisGate, SqliteDb, is_cluster, open_cluster

T = TypeVar("T")

OPEN = (ApprovalStatus.PENDING, ApprovalStatus.APPROVED)
FINISHED_RETENTION_SECONDS = 7 * 24 * 3600


def fingerprint(call: ToolCall, session_id: str) -> str:
    """What an approval is bound to: this server, tool, arguments and session."""
    return jsonstrict.sha256_hex(
        {
            "server": call.server,
            "tool": call.name,
            "arguments": call.arguments,
            "session_id": session_id,
        }
    )


class Use(StrEnum):
    """What happened when a call presented an approval id."""

    GRANTED = "granted"
    NOT_FOUND = "not_found"
    MISMATCH = "mismatch"
    PENDING = "pending"
    DENIED = "denied"
    USED = "used"
    EXPIRED = "expired"


@dataclass(frozen=True)
class UseResult:
    use: Use
    approval: Approval | None


class Stored(BaseModel):
    """An approval as stored: the public record plus bookkeeping, times as epoch seconds."""

    approval: Approval
    used_at: float | None = None
    used_by_decision: str | None = None

    def effective(self, now: float) -> Approval:
        """The approval as seen at `now`: open ones past their expiry read as expired."""
        approval = self.approval
        if approval.status in OPEN and approval.expires_at.timestamp() <= now:
            return approval.model_copy(update={"status": ApprovalStatus.EXPIRED})
        return approval


def _epoch(seconds: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, tz=UTC)


def _new(
    call: ToolCall,
    principal: Principal,
    *,
    rule: str,
    reason: str,
    decision_id: str,
    ttl: float,
    now: float,
    approval_id: str | None = None,
) -> Stored:
    return Stored(
        approval=Approval(
            id=approval_id or "apr_" + uuid.uuid4().hex,
            status=ApprovalStatus.PENDING,
            server=call.server,
            tool=call.name,
            arguments=call.arguments,
            principal=principal,
            rule=rule,
            reason=reason,
            decision_id=decision_id,
            fingerprint=fingerprint(call, principal.session_id),
            created_at=_epoch(now),
            expires_at=_epoch(now + ttl),
        )
    )


def _consume(
    stored: Stored | None, fp: str, decision_id: str, now: float
) -> tuple[UseResult, Stored | None]:
    if stored is None:
        return UseResult(Use.NOT_FOUND, None), None
    current = stored.effective(now)
    if current.fingerprint != fp:
        return UseResult(Use.MISMATCH, current), None
    if current.status is ApprovalStatus.APPROVED:
        used = current.model_copy(update={"status": ApprovalStatus.USED})
        return UseResult(Use.GRANTED, used), Stored(
            approval=used, used_at=now, used_by_decision=decision_id
        )
    return UseResult(Use(current.status.value), current), None


def _release(stored: Stored | None, now: float) -> tuple[None, Stored | None]:
    if stored is None or stored.approval.status is not ApprovalStatus.USED:
        return None, None
    back = stored.approval.model_copy(update={"status": ApprovalStatus.APPROVED})
    return None, Stored(approval=back)


def _decide(
    stored: Stored | None,
    approval_id: str,
    *,
    approve: bool,
    approver: str,
    comment: str,
    grant_ttl: float,
    now: float,
) -> tuple[Approval, Stored]:
    if stored is None:
        raise NotFound(f"no approval {jsonstrict.quote(approval_id)}")
    current = stored.effective(now)
    if current.status is not ApprovalStatus.PENDING:
        raise Conflict(
            f"approval {jsonstrict.quote(approval_id)} is {current.status.value}, not pending"
        )
    decided = current.model_copy(
        update={
            "status": ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED,
            "decided_at": _epoch(now),
            "approver": approver,
            "comment": comment,
            "expires_at": _epoch(now + grant_ttl) if approve else current.expires_at,
        }
    )
    return decided, Stored(approval=decided)


def _open_one(current: Stored | None, now: float) -> bool:
    return current is not None and current.effective(now).status in OPEN


class ApprovalStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def open_or_get(
        self,
        call: ToolCall,
        principal: Principal,
        *,
        rule: str,
        reason: str,
        decision_id: str,
        ttl: float,
    ) -> Approval: ...

    async def consume(self, approval_id: str, fp: str, *, decision_id: str) -> UseResult: ...

    async def release(self, approval_id: str) -> None: ...

    async def get(self, approval_id: str) -> Approval: ...

    async def list(self, status: ApprovalStatus | None, limit: int) -> list[Approval]: ...

    async def decide(
        self, approval_id: str, *, approve: bool, approver: str, comment: str, grant_ttl: float
    ) -> Approval: ...


class _RecordStore(abc.ABC):
    """The operations every store shares, built on its `_update` and `_records`."""

    clock: Callable[[], float]

    @abc.abstractmethod
    async def _update(
        self, approval_id: str, change: Callable[[Stored | None, float], tuple[T, Stored | None]]
    ) -> T:
        """Apply `change(record, now)` to one record atomically; store what it returns."""

    @abc.abstractmethod
    async def _records(self, limit: int, status: ApprovalStatus | None) -> list[Stored]:
        """Newest first; at most `limit` when no status is asked for."""

    async def consume(self, approval_id: str, fp: str, *, decision_id: str) -> UseResult:
        return await self._update(
            approval_id, lambda stored, now: _consume(stored, fp, decision_id, now)
        )

    async def release(self, approval_id: str) -> None:
        await self._update(approval_id, _release)

    async def decide(
        self, approval_id: str, *, approve: bool, approver: str, comment: str, grant_ttl: float
    ) -> Approval:
        return await self._update(
            approval_id,
            lambda stored, now: _decide(
                stored,
                approval_id,
                approve=approve,
                approver=approver,
                comment=comment,
                grant_ttl=grant_ttl,
                now=now,
            ),
        )

    async def get(self, approval_id: str) -> Approval:
        def read(stored: Stored | None, now: float) -> tuple[Approval, None]:
            if stored is None:
                raise NotFound(f"no approval {jsonstrict.quote(approval_id)}")
            return stored.effective(now), None

        return await self._update(approval_id, read)

    async def list(self, status: ApprovalStatus | None, limit: int) -> list[Approval]:
        now = self.clock()
        out = []
        for stored in await self._records(limit, status):
            approval = stored.effective(now)
            if status is None or approval.status is status:
                out.append(approval)
                if len(out) >= limit:
                    break
        return out


class MemoryApprovalStore(_RecordStore):
    """Approvals in memory: for tests and benchmarks (a restart forgets them)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._by_id: dict[str, Stored] = {}
        self._open_by_fp: dict[str, str] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _update(
        self, approval_id: str, change: Callable[[Stored | None, float], tuple[T, Stored | None]]
    ) -> T:
        result, new = change(self._by_id.get(approval_id), self.clock())
        if new is not None:
            self._by_id[approval_id] = new
        return result

    async def _records(self, limit: int, status: ApprovalStatus | None) -> list[Stored]:
        return sorted(self._by_id.values(), key=lambda s: s.approval.created_at, reverse=True)

    async def open_or_get(
        self,
        call: ToolCall,
        principal: Principal,
        *,
        rule: str,
        reason: str,
        decision_id: str,
        ttl: float,
    ) -> Approval:
        now = self.clock()
        fp = fingerprint(call, principal.session_id)
        current = self._by_id.get(self._open_by_fp.get(fp, ""))
        if current is not None and _open_one(current, now):
            return current.effective(now)
        stored = _new(
            call, principal, rule=rule, reason=reason, decision_id=decision_id, ttl=ttl, now=now
        )
        self._by_id[stored.approval.id] = stored
        self._open_by_fp[fp] = stored.approval.id
        return stored.approval


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS approval_records (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approval_records_fp ON approval_records (fingerprint, created_at);
CREATE INDEX IF NOT EXISTS approval_records_created ON approval_records (created_at);
"""


class SqliteApprovalStore(_RecordStore):
    """Approvals in a SQLite file (WAL): safe for several processes on one host."""

    def __init__(
        self, path: Path, *, busy_timeout_ms: int = 500, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self.db = SqliteDb(path, SQLITE_SCHEMA, busy_timeout_ms=busy_timeout_ms, clock=clock)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    @staticmethod
    def _load(db: sqlite3.Connection, approval_id: str) -> Stored | None:
        row = db.execute(
            "SELECT record FROM approval_records WHERE id = ?", (approval_id,)
        ).fetchone()
        return None if row is None else Stored.model_validate_json(row[0])

    @staticmethod
    def _save(db: sqlite3.Connection, stored: Stored) -> None:
        approval = stored.approval
        db.execute(
            "INSERT INTO approval_records (id, fingerprint, created_at, record) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            (
                approval.id,
                approval.fingerprint,
                approval.created_at.timestamp(),
                stored.model_dump_json(),
            ),
        )

    async def _update(
        self, approval_id: str, change: Callable[[Stored | None, float], tuple[T, Stored | None]]
    ) -> T:
        def work(db: sqlite3.Connection, now: float) -> T:
            result, new = change(self._load(db, approval_id), now)
            if new is not None:
                self._save(db, new)
            return result

        return await self.db.transaction(work)

    async def _records(self, limit: int, status: ApprovalStatus | None) -> list[Stored]:
        # A status filter is applied after reading (expiry is a matter of time), so read
        # more than `limit` then.
        scan = limit if status is None else max(limit * 10, 1000)

        def work(db: sqlite3.Connection, now: float) -> list[Stored]:
            rows = db.execute(
                "SELECT record FROM approval_records ORDER BY created_at DESC LIMIT ?", (scan,)
            ).fetchall()
            return [Stored.model_validate_json(row[0]) for row in rows]

        return await self.db.transaction(work)

    async def open_or_get(
        self,
        call: ToolCall,
        principal: Principal,
        *,
        rule: str,
        reason: str,
        decision_id: str,
        ttl: float,
    ) -> Approval:
        fp = fingerprint(call, principal.session_id)

        def work(db: sqlite3.Connection, now: float) -> Approval:
            row = db.execute(
                "SELECT record FROM approval_records WHERE fingerprint = ? "
                "ORDER BY created_at DESC LIMIT 1",
                (fp,),
            ).fetchone()
            current = None if row is None else Stored.model_validate_json(row[0])
            if current is not None and _open_one(current, now):
                return current.effective(now)
            stored = _new(
                call, principal, rule=rule, reason=reason, decision_id=decision_id, ttl=ttl, now=now
            )
            self._save(db, stored)
            return stored.approval

        return await self.db.transaction(work)


# Redis keys (under the configured prefix). <t> is the first two hex digits of the
# fingerprint, so everything one open_or_get touches shares a hash tag (one slot on a
# Redis Cluster), and approvals spread over 256 tags:
#   apr:{<t>}:<id>     the record (JSON). Ids made here are "apr_" + <t> + 30 random hex
#                      digits, so an id names its slot (callers treat ids as opaque).
#   apr-fp:{<t>}:<fp>  the id of the newest approval for a fingerprint
#   apr-index:{<t>}    a sorted set of ids by creation time: one of 256 index shards
# Each change is one script that writes only if what was read is unchanged (compare and
# set), which a cluster runs like one Redis; a lost race reads again.
TAGS = tuple(f"{i:02x}" for i in range(256))

# KEYS: a record. ARGV: the record as read ('' when there was none), the new record, its
# TTL in ms. Writes only if the record still reads as given; 1 if it wrote.
REDIS_SWAP = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: the fingerprint key, the new record, the index shard, then the record the
# fingerprint named when read (if it named one). ARGV: that id and that record as read
# ('' for none), the new id, the new record, its TTL in ms, now (its index score), and
# the index horizon (older entries are dropped). Writes only if both still read as
# given; 1 if it wrote.
REDIS_OPEN = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
if KEYS[4] and (redis.call('GET', KEYS[4]) or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[7])
return 1
"""


class RedisApprovalStore(_RecordStore):
    """Approvals in Redis (or Valkey), or a Redis Cluster, shared by every replica.

    Records and fingerprint keys expire a week after the approval itself does. Listing
    merges the newest entries of the 256 index shards, reading more from a shard only
    while it could still hold one of the newest asked for.
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        clock: Callable[[], float] = time.time,
        *,
        gate: RedisGate | None = None,
    ) -> None:
        self.clock = clock
        self._client = client
        self._prefix = prefix
        self._gate = gate or RedisGate()
        self._swap = client.register_script(REDIS_SWAP)
        self._open = client.register_script(REDIS_OPEN)

    async def open(self) -> None:
        if is_cluster(self._client):
            await open_cluster(self._client, self._gate)

    async def close(self) -> None:
        return None

    def record_key(self, approval_id: str) -> str:
        return f"{self._prefix}apr:{{{approval_id[4:6]}}}:{approval_id}"

    def fingerprint_key(self, fp: str) -> str:
        return f"{self._prefix}apr-fp:{{{fp[:2]}}}:{fp}"

    def index_key(self, tag: str) -> str:
        return f"{self._prefix}apr-index:{{{tag}}}"

    def _ttl_ms(self, stored: Stored, now: float) -> int:
        until = stored.approval.expires_at.timestamp() + FINISHED_RETENTION_SECONDS
        return max(1000, int((until - now) * 1000))

    @staticmethod
    def _horizon(now: float) -> float:
        """Index entries older than this name records that have surely expired."""
        return now - FINISHED_RETENTION_SECONDS - 86400 * 30

    async def _update(
        self, approval_id: str, change: Callable[[Stored | None, float], tuple[T, Stored | None]]
    ) -> T:
        key = self.record_key(approval_id)
        while True:
            raw = await self._gate.run(self._client.get(key))
            now = self.clock()
            result, new = change(None if raw is None else Stored.model_validate_json(raw), now)
            if new is None:
                return result
            args = [raw or "", new.model_dump_json(), self._ttl_ms(new, now)]
            if int(await self._gate.run(self._swap(keys=[key], args=args))):
                return result

    async def _records(self, limit: int, status: ApprovalStatus | None) -> list[Stored]:
        scan = limit if status is None else max(limit * 10, 1000)
        ids = await self._newest(scan)
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for approval_id in ids:
            pipe.get(self.record_key(approval_id))
        raws = await self._gate.run(pipe.execute())
        return [Stored.model_validate_json(raw) for raw in raws if raw is not None]

    async def _newest(self, count: int) -> list[str]:
        """The ids of the `count` newest approvals in the index, newest first.

        Each round reads the next page of every shard that could still hold one of them
        (it has more, and its last entry read is not older than the count-th newest seen
        so far), doubling the page: a shard is read past its share only as far as its
        entries are among the newest.
        """
        horizon = self._horizon(self.clock())
        page = max(4, -(-2 * count // len(TAGS)))
        offsets = dict.fromkeys(TAGS, 0)
        newest: list[tuple[float, str]] = []
        pending = list(TAGS)
        while pending:
            pipe = self._client.pipeline(transaction=False)
            for tag in pending:
                pipe.zrevrangebyscore(
                    self.index_key(tag), "+inf", horizon, offsets[tag], page, withscores=True
                )
            pages = await self._gate.run(pipe.execute())
            more: list[tuple[str, float]] = []
            for tag, entries in zip(pending, pages, strict=True):
                newest.extend((float(score), approval_id) for approval_id, score in entries)
                offsets[tag] += len(entries)
                if len(entries) == page:
                    more.append((tag, float(entries[-1][1])))
            newest.sort(reverse=True)
            del newest[count:]
            cutoff = newest[-1][0] if len(newest) == count else float("-inf")
            pending = [tag for tag, last in more if last >= cutoff]
            page *= 2
        return [approval_id for _, approval_id in newest]

    async def open_or_get(
        self,
        call: ToolCall,
        principal: Principal,
        *,
        rule: str,
        reason: str,
        decision_id: str,
        ttl: float,
    ) -> Approval:
        fp = fingerprint(call, principal.session_id)
        fp_key = self.fingerprint_key(fp)
        while True:
            current_id = await self._gate.run(self._client.get(fp_key))
            raw = None
            if current_id is not None:
                raw = await self._gate.run(self._client.get(self.record_key(current_id)))
                current = None if raw is None else Stored.model_validate_json(raw)
                now = self.clock()
                if current is not None and _open_one(current, now):
                    return current.effective(now)
            now = self.clock()
            stored = _new(
                call,
                principal,
                rule=rule,
                reason=reason,
                decision_id=decision_id,
                ttl=ttl,
                now=now,
                approval_id="apr_" + fp[:2] + secrets.token_hex(15),
            )
            new_id = stored.approval.id
            keys = [fp_key, self.record_key(new_id), self.index_key(fp[:2])]
            if current_id is not None:
                keys.append(self.record_key(current_id))
            args = [
                current_id or "",
                raw or "",
                new_id,
                stored.model_dump_json(),
                self._ttl_ms(stored, now),
                repr(now),
                repr(self._horizon(now)),
            ]
            if int(await self._gate.run(self._open(keys=keys, args=args))):
                return stored.approval
