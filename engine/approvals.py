"""Human approvals, stored in SQLite under the state directory.

An approval is bound to a fingerprint of (server, tool, canonical arguments, session).
While one is open (pending, or approved and not yet used) the same call gets the same
approval back. An approved grant lets exactly one matching call through, once, before it
expires: `consume` flips it from approved to used in one conditional write.

SQLite is blocking, so every operation runs on one dedicated thread; the event loop only
awaits it. WAL mode lets other processes read while one writes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from engine import jsonstrict
from engine.errors import Conflict, NotFound, StateUnavailable
from engine.models import Approval, ApprovalStatus, Principal, ToolCall

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL,
    server TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,
    principal TEXT NOT NULL,
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    decided_at REAL,
    approver TEXT,
    comment TEXT,
    used_at REAL,
    used_by_decision TEXT
);
CREATE INDEX IF NOT EXISTS approvals_fingerprint ON approvals (fingerprint, status);
CREATE INDEX IF NOT EXISTS approvals_status_created ON approvals (status, created_at);
"""

OPEN = (ApprovalStatus.PENDING.value, ApprovalStatus.APPROVED.value)


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


class ApprovalStore(Protocol):
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

    async def close(self) -> None: ...


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


class SqliteApprovalStore:
    """Approvals in one SQLite file; safe for several processes on one host."""

    def __init__(self, path: Path, clock: Callable[[], float] | None = None) -> None:
        self.path = path
        self._clock = clock or time.time
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="approvals")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(_close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"approval store ({self.path}): {exc}") from exc

    def _tx(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        db = self._db
        if db is None:
            raise sqlite3.ProgrammingError("approval store is not open")
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, self._clock())
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    @staticmethod
    def _row(row: sqlite3.Row, now: float) -> Approval:
        status = ApprovalStatus(row["status"])
        if status.value in OPEN and row["expires_at"] <= now:
            status = ApprovalStatus.EXPIRED
        return Approval(
            id=row["id"],
            status=status,
            server=row["server"],
            tool=row["tool"],
            arguments=json.loads(row["arguments"]),
            principal=Principal.model_validate_json(row["principal"]),
            rule=row["rule"],
            reason=row["reason"],
            decision_id=row["decision_id"],
            fingerprint=row["fingerprint"],
            created_at=datetime.fromtimestamp(row["created_at"], tz=UTC),
            expires_at=datetime.fromtimestamp(row["expires_at"], tz=UTC),
            decided_at=_ts(row["decided_at"]),
            approver=row["approver"],
            comment=row["comment"],
        )

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
                "SELECT * FROM approvals WHERE fingerprint = ? AND status IN (?, ?) "
                "AND expires_at > ? ORDER BY created_at DESC LIMIT 1",
                (fp, *OPEN, now),
            ).fetchone()
            if row is not None:
                return self._row(row, now)
            approval_id = "apr_" + uuid.uuid4().hex
            db.execute(
                "INSERT INTO approvals (id, fingerprint, status, server, tool, arguments, "
                "principal, rule, reason, decision_id, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    approval_id,
                    fp,
                    ApprovalStatus.PENDING.value,
                    call.server,
                    call.name,
                    jsonstrict.canonical(call.arguments),
                    principal.model_dump_json(),
                    rule,
                    reason,
                    decision_id,
                    now,
                    now + ttl,
                ),
            )
            new = db.execute("SELECT * FROM approvals WHERE id = ?", (approval_id,)).fetchone()
            return self._row(new, now)

        return await self._run(self._tx, work)

    async def consume(self, approval_id: str, fp: str, *, decision_id: str) -> UseResult:
        def work(db: sqlite3.Connection, now: float) -> UseResult:
            row = db.execute("SELECT * FROM approvals WHERE id = ?", (approval_id,)).fetchone()
            if row is None:
                return UseResult(Use.NOT_FOUND, None)
            approval = self._row(row, now)
            if row["fingerprint"] != fp:
                return UseResult(Use.MISMATCH, approval)
            if approval.status is ApprovalStatus.APPROVED:
                db.execute(
                    "UPDATE approvals SET status = ?, used_at = ?, used_by_decision = ? "
                    "WHERE id = ? AND status = ?",
                    (
                        ApprovalStatus.USED.value,
                        now,
                        decision_id,
                        approval_id,
                        ApprovalStatus.APPROVED.value,
                    ),
                )
                return UseResult(
                    Use.GRANTED, approval.model_copy(update={"status": ApprovalStatus.USED})
                )
            return UseResult(Use(approval.status.value), approval)

        return await self._run(self._tx, work)

    async def release(self, approval_id: str) -> None:
        """Undo a `consume` whose call did not go through after all."""

        def work(db: sqlite3.Connection, now: float) -> None:
            db.execute(
                "UPDATE approvals SET status = ?, used_at = NULL, used_by_decision = NULL "
                "WHERE id = ? AND status = ?",
                (ApprovalStatus.APPROVED.value, approval_id, ApprovalStatus.USED.value),
            )

        await self._run(self._tx, work)

    async def get(self, approval_id: str) -> Approval:
        def work(db: sqlite3.Connection, now: float) -> Approval:
            row = db.execute("SELECT * FROM approvals WHERE id = ?", (approval_id,)).fetchone()
            if row is None:
                raise NotFound(f"no approval {approval_id!r}")
            return self._row(row, now)

        return await self._run(self._tx, work)

    async def list(self, status: ApprovalStatus | None, limit: int) -> list[Approval]:
        def work(db: sqlite3.Connection, now: float) -> list[Approval]:
            if status is None:
                rows = db.execute(
                    "SELECT * FROM approvals ORDER BY created_at DESC LIMIT ?", (limit,)
                ).fetchall()
            elif status is ApprovalStatus.EXPIRED:
                rows = db.execute(
                    "SELECT * FROM approvals WHERE status = ? OR (status IN (?, ?) "
                    "AND expires_at <= ?) ORDER BY created_at DESC LIMIT ?",
                    (status.value, *OPEN, now, limit),
                ).fetchall()
            elif status.value in OPEN:
                rows = db.execute(
                    "SELECT * FROM approvals WHERE status = ? AND expires_at > ? "
                    "ORDER BY created_at DESC LIMIT ?",
                    (status.value, now, limit),
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM approvals WHERE status = ? ORDER BY created_at DESC LIMIT ?",
                    (status.value, limit),
                ).fetchall()
            return [self._row(row, now) for row in rows]

        return await self._run(self._tx, work)

    async def decide(
        self, approval_id: str, *, approve: bool, approver: str, comment: str, grant_ttl: float
    ) -> Approval:
        def work(db: sqlite3.Connection, now: float) -> Approval:
            row = db.execute("SELECT * FROM approvals WHERE id = ?", (approval_id,)).fetchone()
            if row is None:
                raise NotFound(f"no approval {approval_id!r}")
            current = self._row(row, now)
            if current.status is not ApprovalStatus.PENDING:
                raise Conflict(f"approval {approval_id} is {current.status.value}, not pending")
            status = ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED
            expires_at = now + grant_ttl if approve else row["expires_at"]
            db.execute(
                "UPDATE approvals SET status = ?, decided_at = ?, approver = ?, comment = ?, "
                "expires_at = ? WHERE id = ?",
                (status.value, now, approver, comment, expires_at, approval_id),
            )
            updated = db.execute("SELECT * FROM approvals WHERE id = ?", (approval_id,)).fetchone()
            return self._row(updated, now)

        return await self._run(self._tx, work)
