"""Human approvals, with three stores: memory, SQLite and Redis.

An approval is bound to a fingerprint of (server, tool, canonical arguments, session).
While one is open (pending, or approved and not yet used) the same call gets the same
approval back. An approved grant lets exactly one matching call through, once, before it
expires.

What may happen to an approval is decided here once, by pure functions over one record
(`_consume`, `_decide`, `_release`); each store only supplies an atomic read-modify-write
of one record (`_update`) and of the fingerprint index (`open_or_get`): memory by not
awaiting, SQLite by an IMMEDIATE transaction, Redis by WATCH/MULTI.
"""

from __future__ import annotations

import abc
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
from engine.ratelimit import SqliteDb, redis_call

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
) -> Stored:
    return Stored(
        approval=Approval(
            id="apr_" + uuid.uuid4().hex,
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


class RedisApprovalStore(_RecordStore):
    """Approvals in Redis (or Valkey), shared by every replica.

    Keys (under the configured prefix): `apr:<id>` the record (JSON), `apr-fp:<fp>` the id
    of the newest approval for a fingerprint, `apr-index` a sorted set of ids by creation.
    Records and fingerprint keys expire a week after the approval itself does.
    """

    def __init__(self, client: Any, prefix: str, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._client = client
        self._prefix = prefix

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _key(self, approval_id: str) -> str:
        return f"{self._prefix}apr:{approval_id}"

    def _ttl_ms(self, stored: Stored, now: float) -> int:
        until = stored.approval.expires_at.timestamp() + FINISHED_RETENTION_SECONDS
        return max(1000, int((until - now) * 1000))

    async def _update(
        self, approval_id: str, change: Callable[[Stored | None, float], tuple[T, Stored | None]]
    ) -> T:
        import redis.exceptions

        key = self._key(approval_id)
        while True:
            async with self._client.pipeline(transaction=True) as pipe:
                try:
                    await redis_call(pipe.watch(key))
                    raw = await redis_call(pipe.get(key))
                    now = self.clock()
                    result, new = change(
                        None if raw is None else Stored.model_validate_json(raw), now
                    )
                    if new is None:
                        await redis_call(pipe.unwatch())
                        return result
                    pipe.multi()
                    pipe.set(key, new.model_dump_json(), px=self._ttl_ms(new, now))
                    await redis_call(pipe.execute())
                    return result
                except redis.exceptions.WatchError:
                    continue

    async def _records(self, limit: int, status: ApprovalStatus | None) -> list[Stored]:
        scan = limit if status is None else max(limit * 10, 1000)
        index = f"{self._prefix}apr-index"
        horizon = self.clock() - FINISHED_RETENTION_SECONDS - 86400 * 30
        await redis_call(self._client.zremrangebyscore(index, "-inf", horizon))
        ids = await redis_call(self._client.zrevrange(index, 0, scan - 1))
        if not ids:
            return []
        raws = await redis_call(self._client.mget([self._key(i) for i in ids]))
        return [Stored.model_validate_json(raw) for raw in raws if raw is not None]

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
        import redis.exceptions

        fp = fingerprint(call, principal.session_id)
        fp_key = f"{self._prefix}apr-fp:{fp}"
        while True:
            async with self._client.pipeline(transaction=True) as pipe:
                try:
                    await redis_call(pipe.watch(fp_key))
                    current_id = await redis_call(pipe.get(fp_key))
                    now = self.clock()
                    if current_id is not None:
                        raw = await redis_call(pipe.get(self._key(current_id)))
                        current = None if raw is None else Stored.model_validate_json(raw)
                        if current is not None and _open_one(current, now):
                            await redis_call(pipe.unwatch())
                            return current.effective(now)
                    stored = _new(
                        call,
                        principal,
                        rule=rule,
                        reason=reason,
                        decision_id=decision_id,
                        ttl=ttl,
                        now=now,
                    )
                    ttl_ms = self._ttl_ms(stored, now)
                    pipe.multi()
                    pipe.set(self._key(stored.approval.id), stored.model_dump_json(), px=ttl_ms)
                    pipe.set(fp_key, stored.approval.id, px=ttl_ms)
                    pipe.zadd(f"{self._prefix}apr-index", {stored.approval.id: now})
                    await redis_call(pipe.execute())
                    return stored.approval
                except redis.exceptions.WatchError:
                    continue
