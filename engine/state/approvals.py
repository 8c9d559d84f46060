"""Human approvals, with three stores: memory, SQLite and Redis.

An approval is bound to a fingerprint of (server, tool, canonical arguments, session).
While one is open (pending, or approved and not yet used) the same call gets the same
approval back. An approved grant lets exactly one matching call through, once, before it
expires.

What may happen to an approval is decided here once, by pure functions over one record
(`_consume`, `_decide`); each store only supplies an atomic read-modify-write
of one record (`_update`) and of the fingerprint index (`open_or_get`): memory by not
awaiting, SQLite by an IMMEDIATE transaction, Redis by a compare-and-set script on keys
of one hash tag (so a Redis Cluster runs it on one node).

Listing is newest first (ties by id), in pages: `page()` reads on from where the previous
page ended, an `ApprovalCursor` (the last approval's creation time and id), which the
transports hand out as an opaque page token (`ApprovalCursor.token`).
"""

from __future__ import annotations

import abc
import base64
import binascii
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from engine import jsonstrict
from engine.errors import Conflict, InvalidRequest, NotFound
from engine.models import Approval, ApprovalStatus, Principal, ToolCall
from engine.state.ratelimit import RedisGate, SqliteDb, is_cluster, open_cluster

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
    return datetime.fromtimestamp(seconds, tz=UTC)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_CURSOR = re.compile(r"a1:(-?[0-9]{1,19}):([A-Za-z0-9_-]{1,128})")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]{1,256}")


def _micros(moment: datetime) -> int:
    """`moment` as whole microseconds since the epoch (exact: no float on the way)."""
    return (moment - EPOCH) // _MICROSECOND


@dataclass(frozen=True, order=True)
class ApprovalCursor:
    """Where a page of the listing ended: the last approval's creation time and id.

    Listing order is newest first, ties by id descending, so the next page holds the
    approvals whose (created_us, id) is less than this one's (compared as a tuple)."""

    created_us: int
    id: str

    @classmethod
    def of(cls, approval: Approval) -> ApprovalCursor:
        return cls(_micros(approval.created_at), approval.id)

    @property
    def created_at(self) -> datetime:
        return EPOCH + self.created_us * _MICROSECOND

    def token(self) -> str:
        """The opaque page token for this position (base64url of a versioned text)."""
        raw = f"a1:{self.created_us}:{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def from_token(cls, token: str, *, field: str) -> ApprovalCursor:
        """The position a page token names; InvalidRequest for anything not made here."""
        invalid = InvalidRequest(f"{field}: not a token from a previous page", field=field)
        if not _BASE64URL.fullmatch(token):
            raise invalid
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        except (binascii.Error, ValueError) as exc:
            raise invalid from exc
        match = _CURSOR.fullmatch(raw)
        if match is None:
            raise invalid
        cursor = cls(int(match.group(1)), match.group(2))
        try:
            cursor.created_at.timestamp()
        except (OverflowError, ValueError, OSError) as exc:  # past what a datetime holds
            raise invalid from exc
        return cursor


@dataclass(frozen=True)
class ApprovalPage:
    """One page of a listing; `next` is where the following page starts (None: the last)."""

    approvals: list[Approval]
    next: ApprovalCursor | None


def _older(stored: Stored, after: ApprovalCursor | None) -> bool:
    return after is None or ApprovalCursor.of(stored.approval) < after


def _newest_first(records: list[Stored]) -> list[Stored]:
    return sorted(records, key=lambda s: ApprovalCursor.of(s.approval), reverse=True)


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

    async def get(self, approval_id: str) -> Approval: ...

    async def list(self, status: ApprovalStatus | None, limit: int) -> list[Approval]: ...

    async def page(
        self,
        status: ApprovalStatus | None,
        size: int,
        *,
        after: ApprovalCursor | None = None,
        keep: Callable[[Approval], bool] | None = None,
    ) -> ApprovalPage: ...

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
    async def _records(self, count: int, after: ApprovalCursor | None) -> list[Stored]:
        """At most `count` records older than `after` (all, if None), newest first."""

    async def consume(self, approval_id: str, fp: str, *, decision_id: str) -> UseResult:
        return await self._update(
            approval_id, lambda stored, now: _consume(stored, fp, decision_id, now)
        )

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
        return (await self.page(status, limit)).approvals

    async def page(
        self,
        status: ApprovalStatus | None,
        size: int,
        *,
        after: ApprovalCursor | None = None,
        keep: Callable[[Approval], bool] | None = None,
    ) -> ApprovalPage:
        """Up to `size` approvals older than `after`, newest first, in `status` (None:
        any) and, with `keep`, those it keeps (an approver's view).

        A status is a matter of time (open ones expire), so filters are applied after
        reading: unfiltered, `size + 1` records are read (the one more tells whether
        there is a next page); filtered, up to max(10 * size, 1000). A page that used up
        that many before `size` matched is cut short there and still has a `next`."""
        filtered = status is not None or keep is not None
        budget = max(size * 10, 1000) if filtered else size + 1
        records = await self._records(budget, after)
        read_all = len(records) < budget
        now = self.clock()
        out: list[Approval] = []
        for i, stored in enumerate(records):
            approval = stored.effective(now)
            if status is not None and approval.status is not status:
                continue
            if keep is not None and not keep(approval):
                continue
            out.append(approval)
            if len(out) == size:
                last = read_all and i + 1 == len(records)
                return ApprovalPage(out, None if last else ApprovalCursor.of(approval))
        if read_all:
            return ApprovalPage(out, None)
        return ApprovalPage(out, ApprovalCursor.of(records[-1].approval))


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

    async def _records(self, count: int, after: ApprovalCursor | None) -> list[Stored]:
        return _newest_first([s for s in self._by_id.values() if _older(s, after)])[:count]

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
CREATE INDEX IF NOT EXISTS approval_records_listing ON approval_records (created_at, id);
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

    async def _records(self, count: int, after: ApprovalCursor | None) -> list[Stored]:
        # created_at holds approval.created_at.timestamp(), and the cursor's time gives
        # the same float: the comparison is exact. The first page starts below +inf.
        if after is None:
            position: tuple[float, str] = (float("inf"), "")
        else:
            position = (after.created_at.timestamp(), after.id)

        def work(db: sqlite3.Connection, now: float) -> list[Stored]:
            rows = db.execute(
                "SELECT record FROM approval_records WHERE (created_at, id) < (?, ?) "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (*position, count),
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

    async def _records(self, count: int, after: ApprovalCursor | None) -> list[Stored]:
        ids = await self._newest(count, after)
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for approval_id in ids:
            pipe.get(self.record_key(approval_id))
        raws = await self._gate.run(pipe.execute())
        return _newest_first([Stored.model_validate_json(raw) for raw in raws if raw is not None])

    async def _newest(self, count: int, after: ApprovalCursor | None = None) -> list[str]:
        """The ids of the `count` newest approvals in the index older than `after`,
        newest first (by creation time to the microsecond, then id: as records compare).

        Each round reads the next page of every shard that could still hold one of them
        (it has more, and its last entry read is not older than the count-th newest seen
        so far), doubling the page: a shard is read past its share only as far as its
        entries are among the newest. An entry's score is the time its record's
        `created_at` was made from, so it gives the record's position exactly. With
        `after`, shards are read from a microsecond above the cursor's time, and the
        entries there that are not older than the cursor are passed over.
        """
        horizon = self._horizon(self.clock())
        top = "+inf" if after is None else repr((after.created_us + 1) / 1e6)
        page = max(4, -(-2 * count // len(TAGS)))
        offsets = dict.fromkeys(TAGS, 0)
        newest: list[ApprovalCursor] = []
        pending = list(TAGS)
        while pending:
            pipe = self._client.pipeline(transaction=False)
            for tag in pending:
                pipe.zrevrangebyscore(
                    self.index_key(tag), top, horizon, offsets[tag], page, withscores=True
                )
            pages = await self._gate.run(pipe.execute())
            more: list[tuple[str, int]] = []
            for tag, entries in zip(pending, pages, strict=True):
                for approval_id, score in entries:
                    position = ApprovalCursor(_micros(_epoch(float(score))), approval_id)
                    if after is None or position < after:
                        newest.append(position)
                offsets[tag] += len(entries)
                if len(entries) == page:
                    more.append((tag, _micros(_epoch(float(entries[-1][1])))))
            newest.sort(reverse=True)
            del newest[count:]
            cutoff = newest[-1].created_us if len(newest) == count else -(2**63)
            pending = [tag for tag, last in more if last >= cutoff]
            page *= 2
        return [position.id for position in newest]

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
