"""Human approvals, with three stores: memory, SQLite and Redis.

An approval is bound to a fingerprint of (server, tool, canonical arguments, session) and
to the principal that opened it (its agent_id and user_id, as the call carried them).
While one is open (pending, or approved and not yet used) the same call of the same
principal gets the same approval back; so it does once denied, until the approval would
have expired (the agent asking again reads the denial, and the approver is not asked again
at once). An approved grant lets exactly one matching call
of that principal through, once, before it expires.

What may happen to an approval is decided here once, by pure functions over one record
(`use_of`, `_consume`, `_decide`); each store only supplies an atomic read-modify-write
of one record (`_update`) and of the fingerprint index (`open_or_get`): memory by not
awaiting, SQLite by an IMMEDIATE transaction, Redis by a compare-and-set script on keys
of one hash tag (so a Redis Cluster runs it on one node).

Binding. Using a grant (`consume`) checks, in that same atomic step, that the call's
agent_id and user_id are the ones the approval recorded (exactly: a call without one
matches only an approval opened without it) as well as its fingerprint. Anyone else gets
`Use.NOT_YOURS`, whatever the approval's state, learns nothing of it and spends nothing:
the grant still lets its own principal through. The fingerprint index is kept per agent
and user likewise: an agent that names another agent's session, or the agent calling for
another user, and repeats the call gets an approval of its own, never the other's id.

Caps. Opening a new approval is refused (`TooManyPending`) when as many as `PendingCaps`
allows are already pending for the call's agent (over all its sessions; calls without an
agent_id count as one agent) or for that session of the agent. The check is part of the
store's one atomic create, so under any concurrency exactly the cap is opened; a call that
matches an open approval gets it back whatever the count (it opens nothing). Approvals that
were decided or have expired no longer count.

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
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel

from engine import jsonstrict
from engine.errors import Conflict, InvalidRequest, NotFound
from engine.models import (
    ApprovableBy,
    Approval,
    ApprovalStatus,
    Principal,
    PrincipalProof,
    ToolCall,
)
from engine.state.ratelimit import RedisGate, SqliteDb, is_cluster, open_cluster

T = TypeVar("T")

OPEN = (ApprovalStatus.PENDING, ApprovalStatus.APPROVED)
FINISHED_RETENTION_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_PENDING_PER_AGENT = 20
DEFAULT_MAX_PENDING_PER_SESSION = 10


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


def agent_key(principal: Principal) -> str:
    """Whose pending approvals a call counts against: its agent ("" for calls without an
    agent_id, which share one count; an agent_id is never empty)."""
    return principal.agent_id or ""


CapScope = Literal["agent", "session"]


class TooManyPending(Exception):  # noqa: N818 - a refusal the service answers, not a fault
    """`open_or_get` opened nothing: `pending` approvals of the call's agent (or of its
    session) already wait for a human, and the cap is `cap`."""

    def __init__(self, scope: CapScope, pending: int, cap: int, agent_id: str | None) -> None:
        super().__init__(f"{pending} pending approvals of this {scope}, cap {cap}")
        self.scope: CapScope = scope
        self.pending = pending
        self.cap = cap
        self.agent_id = agent_id

    @property
    def reason(self) -> str:
        """What the agent is told."""
        if self.scope == "session":
            whose = "of this session"
        elif self.agent_id is None:
            whose = "of callers without an agent_id"
        else:
            whose = "of this agent"
        return (
            f"{self.pending} approvals {whose} are already waiting for a human (at most "
            f"{self.cap} may wait at once); wait for them to be decided or expire"
        )


@dataclass(frozen=True)
class PendingCaps:
    """How many approvals may wait for a human at once, per agent and per session of an
    agent (both at least 1: there is no "no cap")."""

    per_agent: int = DEFAULT_MAX_PENDING_PER_AGENT
    per_session: int = DEFAULT_MAX_PENDING_PER_SESSION

    def __post_init__(self) -> None:
        for name in ("per_agent", "per_session"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PendingCaps.{name} must be an integer >= 1, not {value!r}")

    def refusal(
        self, principal: Principal, agent_pending: int, session_pending: int
    ) -> TooManyPending | None:
        """Why one more approval may not be opened, given the pending counts; None: it may."""
        if agent_pending >= self.per_agent:
            return TooManyPending("agent", agent_pending, self.per_agent, principal.agent_id)
        if session_pending >= self.per_session:
            return TooManyPending("session", session_pending, self.per_session, principal.agent_id)
        return None


class Use(StrEnum):
    """What happened when a call presented an approval id."""

    GRANTED = "granted"
    NOT_FOUND = "not_found"
    NOT_YOURS = "not_yours"  # opened for another agent or user: nothing of it is shown
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
    # Its expiry was announced (one approval.expired event, by whichever process claimed it).
    expiry_announced: bool = False

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
    terms: tuple[ApprovableBy, PrincipalProof, str | None] = ("approvers", "none", None),
) -> Stored:
    approvable_by, proof, asserted_by = terms
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
            approvable_by=approvable_by,
            principal_proof=proof,
            asserted_by=asserted_by,
        )
    )


def owns(approval: Approval, principal: Principal) -> bool:
    """Whether `principal` is the one `approval` was opened for: the same agent_id and the
    same user_id, compared exactly (None only matches None). The session is the
    fingerprint's to check."""
    opened = approval.principal
    return opened.agent_id == principal.agent_id and opened.user_id == principal.user_id


def use_of(approval: Approval, fp: str, principal: Principal) -> Use:
    """What presenting `approval` (as it reads now) does for a call of `principal` whose
    fingerprint is `fp`: GRANTED only for its own principal's identical call while approved.
    Another principal is told NOT_YOURS before anything else (not the state, not whether
    the call matches)."""
    if not owns(approval, principal):
        return Use.NOT_YOURS
    if approval.fingerprint != fp:
        return Use.MISMATCH
    if approval.status is ApprovalStatus.APPROVED:
        return Use.GRANTED
    return Use(approval.status.value)


def _consume(
    stored: Stored | None, fp: str, principal: Principal, decision_id: str, now: float
) -> tuple[UseResult, Stored | None]:
    if stored is None:
        return UseResult(Use.NOT_FOUND, None), None
    current = stored.effective(now)
    use = use_of(current, fp, principal)
    if use is Use.NOT_YOURS:
        return UseResult(use, None), None
    if use is Use.GRANTED:
        used = current.model_copy(
            update={
                "status": ApprovalStatus.USED,
                "used_at": _epoch(now),
                "used_by_decision": decision_id,
            }
        )
        return UseResult(Use.GRANTED, used), Stored(
            approval=used, used_at=now, used_by_decision=decision_id
        )
    return UseResult(use, current), None


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


def _standing(current: Stored | None, now: float) -> bool:
    """Whether the identical call of the same principal gets `current` back: while it is
    open (pending, or granted and unused), and once denied until it would have expired
    (the agent asking again reads the denial and its comment instead of opening a new
    approval at once)."""
    if current is None:
        return False
    status = current.effective(now).status
    if status is ApprovalStatus.DENIED:
        return current.approval.expires_at.timestamp() > now
    return status in OPEN


class ApprovalStore(Protocol):
    caps: PendingCaps  # read on every open_or_get

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
        approvable_by: ApprovableBy = "approvers",
        proof: PrincipalProof = "none",
        asserted_by: str | None = None,
    ) -> Approval:
        """The standing approval of this principal (agent and user) for this call (open, or
        denied and not past its expiry), or a new pending one; raises TooManyPending
        (opening nothing) when a new one would pass a cap."""
        ...

    async def consume(
        self, approval_id: str, fp: str, *, principal: Principal, decision_id: str
    ) -> UseResult:
        """Use the grant `approval_id` for a call of `principal` with fingerprint `fp`, in one
        atomic step with the checks of `use_of`; only a GRANTED use changes the record."""
        ...

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

    async def claim_expiry(self, approval_id: str) -> tuple[Approval, bool]:
        """The approval as it reads now, and whether this caller is the one to announce its
        expiry: True once, to the first caller after it expired (atomically, so replicas
        sharing the store announce it once between them). NotFound when it is gone."""
        ...


def _claim_expiry(
    stored: Stored | None, approval_id: str, now: float
) -> tuple[tuple[Approval, bool], Stored | None]:
    if stored is None:
        raise NotFound(f"no approval {jsonstrict.quote(approval_id)}")
    current = stored.effective(now)
    if current.status is not ApprovalStatus.EXPIRED or stored.expiry_announced:
        return (current, False), None
    return (current, True), stored.model_copy(update={"expiry_announced": True})


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

    async def consume(
        self, approval_id: str, fp: str, *, principal: Principal, decision_id: str
    ) -> UseResult:
        return await self._update(
            approval_id, lambda stored, now: _consume(stored, fp, principal, decision_id, now)
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

    async def claim_expiry(self, approval_id: str) -> tuple[Approval, bool]:
        return await self._update(
            approval_id, lambda stored, now: _claim_expiry(stored, approval_id, now)
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

    def __init__(
        self, clock: Callable[[], float] = time.time, *, caps: PendingCaps | None = None
    ) -> None:
        self.clock = clock
        self.caps = caps or PendingCaps()
        self._by_id: dict[str, Stored] = {}
        # The newest approval per (agent key, user_id, fingerprint).
        self._open_by_fp: dict[tuple[str, str | None, str], str] = {}
        # The ids that were pending when opened, per ("agent", agent) and ("session",
        # agent, session); pruned of those no longer pending whenever counted.
        self._waiting: dict[tuple[str, ...], set[str]] = {}

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

    def _pending(self, key: tuple[str, ...], now: float) -> int:
        ids = self._waiting.pop(key, set())
        still = {i for i in ids if self._by_id[i].effective(now).status is ApprovalStatus.PENDING}
        if still:
            self._waiting[key] = still
        return len(still)

    async def open_or_get(
        self,
        call: ToolCall,
        principal: Principal,
        *,
        rule: str,
        reason: str,
        decision_id: str,
        ttl: float,
        approvable_by: ApprovableBy = "approvers",
        proof: PrincipalProof = "none",
        asserted_by: str | None = None,
    ) -> Approval:
        now = self.clock()
        agent = agent_key(principal)
        fp = fingerprint(call, principal.session_id)
        owner = (agent, principal.user_id, fp)
        current = self._by_id.get(self._open_by_fp.get(owner, ""))
        if current is not None and _standing(current, now):
            return current.effective(now)
        keys = (("agent", agent), ("session", agent, principal.session_id))
        by_agent, by_session = (self._pending(key, now) for key in keys)
        refused = self.caps.refusal(principal, by_agent, by_session)
        if refused is not None:
            raise refused
        stored = _new(
            call,
            principal,
            rule=rule,
            reason=reason,
            decision_id=decision_id,
            ttl=ttl,
            now=now,
            terms=(approvable_by, proof, asserted_by),
        )
        self._by_id[stored.approval.id] = stored
        self._open_by_fp[owner] = stored.approval.id
        for key in keys:
            self._waiting.setdefault(key, set()).add(stored.approval.id)
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

# Columns added to approval_records by `SqliteApprovalStore.open` (a file made before any
# of them gets them there, filled from the records): the agent key (`agent_key()`), the
# session, the user_id (NULL for none), and, while the approval is pending, its expiry
# (NULL once it is not), so the pending approvals of an agent or a session are an index
# range, and a principal's approval for a call is found by its agent, user and fingerprint.
SQLITE_CAP_COLUMNS = {
    "agent_key": "TEXT",
    "session_id": "TEXT",
    "pending_until": "REAL",
    "user_id": "TEXT",
}
SQLITE_CAP_INDEXES = """
DROP INDEX IF EXISTS approval_records_agent_fp;
CREATE INDEX IF NOT EXISTS approval_records_owner_fp
    ON approval_records (agent_key, fingerprint, user_id, created_at);
CREATE INDEX IF NOT EXISTS approval_records_agent_pending
    ON approval_records (agent_key, pending_until);
CREATE INDEX IF NOT EXISTS approval_records_session_pending
    ON approval_records (agent_key, session_id, pending_until);
"""


def _pending_until(stored: Stored) -> float | None:
    approval = stored.approval
    if approval.status is not ApprovalStatus.PENDING:
        return None
    return approval.expires_at.timestamp()


class SqliteApprovalStore(_RecordStore):
    """Approvals in a SQLite file (WAL): safe for several processes on one host."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = 500,
        clock: Callable[[], float] = time.time,
        caps: PendingCaps | None = None,
    ) -> None:
        self.clock = clock
        self.caps = caps or PendingCaps()
        self.db = SqliteDb(path, SQLITE_SCHEMA, busy_timeout_ms=busy_timeout_ms, clock=clock)

    async def open(self) -> None:
        await self.db.open()
        await self.db.transaction(self._add_cap_columns)

    async def close(self) -> None:
        await self.db.close()

    @classmethod
    def _add_cap_columns(cls, db: sqlite3.Connection, now: float) -> None:
        """Add the cap columns and their indexes if missing, filling them from the records
        (once per file: the IMMEDIATE transaction makes a second process wait, then see them)."""
        present = {row[1] for row in db.execute("PRAGMA table_info(approval_records)")}
        missing = [name for name in SQLITE_CAP_COLUMNS if name not in present]
        for name in missing:
            db.execute(f"ALTER TABLE approval_records ADD COLUMN {name} {SQLITE_CAP_COLUMNS[name]}")
        if missing:
            rows = db.execute("SELECT record FROM approval_records").fetchall()
            for row in rows:
                stored = Stored.model_validate_json(row[0])
                db.execute(
                    "UPDATE approval_records SET agent_key = ?, session_id = ?, "
                    "pending_until = ?, user_id = ? WHERE id = ?",
                    (*cls._cap_fields(stored), stored.approval.id),
                )
        for statement in SQLITE_CAP_INDEXES.split(";"):
            if statement.strip():
                db.execute(statement)

    @staticmethod
    def _cap_fields(stored: Stored) -> tuple[str, str, float | None, str | None]:
        principal = stored.approval.principal
        return (
            agent_key(principal),
            principal.session_id,
            _pending_until(stored),
            principal.user_id,
        )

    @staticmethod
    def _load(db: sqlite3.Connection, approval_id: str) -> Stored | None:
        row = db.execute(
            "SELECT record FROM approval_records WHERE id = ?", (approval_id,)
        ).fetchone()
        return None if row is None else Stored.model_validate_json(row[0])

    @classmethod
    def _save(cls, db: sqlite3.Connection, stored: Stored) -> None:
        approval = stored.approval
        db.execute(
            "INSERT INTO approval_records (id, fingerprint, created_at, record, agent_key, "
            "session_id, pending_until, user_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
            "(id) DO UPDATE SET record = excluded.record, pending_until = excluded.pending_until",
            (
                approval.id,
                approval.fingerprint,
                approval.created_at.timestamp(),
                stored.model_dump_json(),
                *cls._cap_fields(stored),
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
        approvable_by: ApprovableBy = "approvers",
        proof: PrincipalProof = "none",
        asserted_by: str | None = None,
    ) -> Approval:
        fp = fingerprint(call, principal.session_id)
        agent = agent_key(principal)

        def work(db: sqlite3.Connection, now: float) -> Approval:
            row = db.execute(
                "SELECT record FROM approval_records WHERE agent_key = ? AND fingerprint = ? "
                "AND user_id IS ? ORDER BY created_at DESC LIMIT 1",
                (agent, fp, principal.user_id),
            ).fetchone()
            current = None if row is None else Stored.model_validate_json(row[0])
            if current is not None and _standing(current, now):
                return current.effective(now)
            (by_agent,) = db.execute(
                "SELECT COUNT(*) FROM approval_records WHERE agent_key = ? AND pending_until > ?",
                (agent, now),
            ).fetchone()
            (by_session,) = db.execute(
                "SELECT COUNT(*) FROM approval_records WHERE agent_key = ? AND session_id = ? "
                "AND pending_until > ?",
                (agent, principal.session_id, now),
            ).fetchone()
            refused = self.caps.refusal(principal, by_agent, by_session)
            if refused is not None:
                raise refused
            stored = _new(
                call,
                principal,
                rule=rule,
                reason=reason,
                decision_id=decision_id,
                ttl=ttl,
                now=now,
                terms=(approvable_by, proof, asserted_by),
            )
            self._save(db, stored)
            return stored.approval

        return await self.db.transaction(work)


# Redis keys (under the configured prefix). <t> is the first two hex digits of <a>, the
# SHA-256 of the call's agent key, so everything one open_or_get touches (and every
# pending approval an agent's cap counts) shares a hash tag, one slot on a Redis Cluster;
# agents spread over 256 tags:
#   apr:{<t>}:<id>          the record (JSON). Ids made here are "apr_" + <t> + 30 random
#                           hex digits, so an id names its slot (callers treat ids as opaque).
#   apr-fp:{<t>}:<h>        the id of the principal's newest approval for a fingerprint
#                           (<h>: the SHA-256 of agent key, fingerprint and, when the call
#                           has one, user_id: keys of calls without a user are as before)
#   apr-index:{<t>}         a sorted set of ids by creation time: one of 256 index shards
#   apr-wait:{<t>}:agent:<a>        the agent's pending approvals, scored by expiry
#   apr-wait:{<t>}:session:<s>      those of one session of the agent (<s>: the SHA-256 of
#                                   agent key and session)
# Each change is one script that writes only if what was read is unchanged (compare and
# set), which a cluster runs like one Redis; a lost race reads again. (Approvals made
# before the caps were tagged by their fingerprint; they are read, decided and used as
# ever, but are not counted and not found again by their call.)
TAGS = tuple(f"{i:02x}" for i in range(256))

# KEYS: a record, then (when the change ends its pending) the pending sets it is in.
# ARGV: the record as read ('' when there was none), the new record, its TTL in ms, its id.
# Writes only if the record still reads as given; 1 if it wrote.
REDIS_SWAP = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[4]) end
return 1
"""

# KEYS: the fingerprint key, the new record, the index shard, the agent's and the
# session's pending sets, then the record the fingerprint named when read (if it named
# one). ARGV: that id and that record as read ('' for none), the new id, the new record,
# its TTL in ms, now (its index score), the index horizon (older entries are dropped), its
# expiry (its pending score), the agent's and the session's cap, and the pending sets' TTL
# in ms. Writes only if both still read as given and both caps leave room. Answers {1}
# if it wrote, {0} if something changed since it was read, {2, n} when the agent has n
# pending and {3, n} when the session has (nothing written).
REDIS_OPEN = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return {0} end
if KEYS[6] and (redis.call('GET', KEYS[6]) or '') ~= ARGV[2] then return {0} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[6])
local by_agent = redis.call('ZCARD', KEYS[4])
if by_agent >= tonumber(ARGV[9]) then return {2, by_agent} end
local by_session = redis.call('ZCARD', KEYS[5])
if by_session >= tonumber(ARGV[10]) then return {3, by_session} end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[7])
for i = 4, 5 do
  redis.call('ZADD', KEYS[i], ARGV[8], ARGV[3])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[11]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[11])
  end
end
return {1}
"""
_REFUSED: dict[int, CapScope] = {2: "agent", 3: "session"}


class RedisApprovalStore(_RecordStore):
    """Approvals in Redis (or Valkey), or a Redis Cluster, shared by every replica.

    Records and fingerprint keys expire a week after the approval itself does, pending
    sets when their last entry does. Listing merges the newest entries of the 256 index
    shards, reading more from a shard only while it could still hold one of the newest
    asked for.
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        clock: Callable[[], float] = time.time,
        *,
        gate: RedisGate | None = None,
        caps: PendingCaps | None = None,
    ) -> None:
        self.clock = clock
        self.caps = caps or PendingCaps()
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

    @staticmethod
    def _agent_hash(principal: Principal) -> str:
        return jsonstrict.sha256_hex({"agent": agent_key(principal)})

    def record_key(self, approval_id: str) -> str:
        return f"{self._prefix}apr:{{{approval_id[4:6]}}}:{approval_id}"

    def fingerprint_key(self, principal: Principal, fp: str) -> str:
        tag = self._agent_hash(principal)[:2]
        owner: dict[str, str] = {"agent": agent_key(principal), "fingerprint": fp}
        if principal.user_id is not None:
            owner["user"] = principal.user_id
        return f"{self._prefix}apr-fp:{{{tag}}}:{jsonstrict.sha256_hex(owner)}"

    def index_key(self, tag: str) -> str:
        return f"{self._prefix}apr-index:{{{tag}}}"

    def waiting_keys(self, principal: Principal) -> tuple[str, str]:
        """The pending sets a new approval of `principal` goes in: its agent's, its session's."""
        agent = self._agent_hash(principal)
        session = jsonstrict.sha256_hex(
            {"agent": agent_key(principal), "session": principal.session_id}
        )
        base = f"{self._prefix}apr-wait:{{{agent[:2]}}}"
        return f"{base}:agent:{agent}", f"{base}:session:{session}"

    def _ttl_ms(self, stored: Stored, now: float) -> int:
        until = stored.approval.expires_at.timestamp() + FINISHED_RETENTION_SECONDS
        return max(1000, int((until - now) * 1000))

    @staticmethod
    def _horizon(now: float) -> float:
        """Index entries older than this name records that have surely expired."""
        return now - FINISHED_RETENTION_SECONDS - 86400 * 30

    def _settled(self, old: Stored | None, new: Stored) -> list[str]:
        """The pending sets to take `new` out of: those it was in, if it stops pending
        (none for an approval made before the caps: it is in none, on another slot)."""
        if old is None or old.approval.status is not ApprovalStatus.PENDING:
            return []
        if new.approval.status is ApprovalStatus.PENDING:
            return []
        principal = new.approval.principal
        if new.approval.id[4:6] != self._agent_hash(principal)[:2]:
            return []
        return list(self.waiting_keys(principal))

    async def _update(
        self, approval_id: str, change: Callable[[Stored | None, float], tuple[T, Stored | None]]
    ) -> T:
        key = self.record_key(approval_id)
        while True:
            raw = await self._gate.run(self._client.get(key))
            now = self.clock()
            old = None if raw is None else Stored.model_validate_json(raw)
            result, new = change(old, now)
            if new is None:
                return result
            keys = [key, *self._settled(old, new)]
            args = [raw or "", new.model_dump_json(), self._ttl_ms(new, now), approval_id]
            if int(await self._gate.run(self._swap(keys=keys, args=args))):
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
        approvable_by: ApprovableBy = "approvers",
        proof: PrincipalProof = "none",
        asserted_by: str | None = None,
    ) -> Approval:
        fp = fingerprint(call, principal.session_id)
        fp_key = self.fingerprint_key(principal, fp)
        tag = self._agent_hash(principal)[:2]
        waiting = self.waiting_keys(principal)
        caps = self.caps
        while True:
            current_id = await self._gate.run(self._client.get(fp_key))
            raw = None
            if current_id is not None:
                raw = await self._gate.run(self._client.get(self.record_key(current_id)))
                current = None if raw is None else Stored.model_validate_json(raw)
                now = self.clock()
                if current is not None and _standing(current, now):
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
                approval_id="apr_" + tag + secrets.token_hex(15),
                terms=(approvable_by, proof, asserted_by),
            )
            new_id = stored.approval.id
            keys = [fp_key, self.record_key(new_id), self.index_key(tag), *waiting]
            if current_id is not None:
                keys.append(self.record_key(current_id))
            expires = stored.approval.expires_at.timestamp()
            args = [
                current_id or "",
                raw or "",
                new_id,
                stored.model_dump_json(),
                self._ttl_ms(stored, now),
                repr(now),
                repr(self._horizon(now)),
                repr(expires),
                caps.per_agent,
                caps.per_session,
                max(1000, int((expires - now) * 1000) + 1000),
            ]
            answer = await self._gate.run(self._open(keys=keys, args=args))
            code = int(answer[0])
            if code == 1:
                return stored.approval
            if code in _REFUSED:
                scope = _REFUSED[code]
                cap = caps.per_agent if scope == "agent" else caps.per_session
                raise TooManyPending(scope, int(answer[1]), cap, principal.agent_id)
