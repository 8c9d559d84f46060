"""The decision log: one record per decision, in a JSONL file and in SQLite, written off
the event loop.

A record carries who, what, the verdict and why, the policy revision, the latency and the
approval id. Tool arguments are stored as the SHA-256 of their canonical JSON by default;
`raw` keeps them, `redacted` keeps them with the named fields' values replaced. Lines are
JSON with every non-ASCII and control character escaped, so a newline in a tool name or an
argument can never start a forged record.

Writes go through a queue to one writer thread (a slow disk never stalls a decision):
the JSONL file is rotated by size with a number of backups kept; SQLite rows older than
the retention are deleted as new ones arrive. The SQLite copy answers queries
(`GET /v1/decisions`, `ListDecisions`) and the status summary.
"""

from __future__ import annotations

import asyncio
import json
import logging.handlers
import queue
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from engine import jsonstrict
from engine.errors import StateUnavailable
from engine.models import DecideRequest, Decision, ToolCall

REDACTED = "[redacted]"
BATCH_WAIT_SECONDS = 0.01
ArgumentMode = Literal["hash", "raw", "redacted"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    decision_id TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    session_id TEXT,
    agent_id TEXT,
    user_id TEXT,
    server TEXT NOT NULL,
    tool TEXT NOT NULL,
    verdict TEXT NOT NULL,
    rule TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts);
CREATE INDEX IF NOT EXISTS decisions_session ON decisions (session_id, seq);
CREATE INDEX IF NOT EXISTS decisions_agent ON decisions (agent_id, seq);
CREATE INDEX IF NOT EXISTS decisions_tool ON decisions (tool, seq);
CREATE INDEX IF NOT EXISTS decisions_verdict ON decisions (verdict, seq);
"""


@dataclass(frozen=True)
class LogSettings:
    jsonl: str  # a path, "-" for standard error, or "off"
    database: Path | None
    arguments: ArgumentMode = "hash"
    redact: tuple[str, ...] = ()
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    retention_days: float = 30


@dataclass(frozen=True)
class DecisionQuery:
    session_id: str | None = None
    agent_id: str | None = None
    tool: str | None = None
    verdict: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    cursor: int | None = None  # the `seq` of the last record of the previous page


def redact(value: Any, fields: frozenset[str]) -> Any:
    """`value` with the values of every object key in `fields` replaced, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if k in fields else redact(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item, fields) for item in value]
    return value


def line(record: dict[str, Any]) -> str:
    """One record as one line: ASCII-only JSON, so no byte of it can end the line."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class DecisionLog:
    def __init__(self, settings: LogSettings) -> None:
        self.settings = settings
        self._redact = frozenset(settings.redact)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stream: TextIO | None = None
        self._file: logging.handlers.RotatingFileHandler | None = None
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decision-log-read")
        self._writer: threading.Thread | None = None
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self.settings.jsonl != "off" or self.settings.database is not None

    def open(self) -> None:
        """Open the sinks (raises StateUnavailable naming a file that cannot be used)."""
        target = self.settings.jsonl
        if target == "-":
            self._stream = sys.stderr
        elif target != "off":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._file = logging.handlers.RotatingFileHandler(
                target,
                maxBytes=self.settings.max_bytes,
                backupCount=self.settings.backups,
                encoding="utf-8",
                delay=False,
            )
            self._file.setFormatter(logging.Formatter("%(message)s"))
        if self.settings.database is not None:
            try:
                self._db = self._connect(self.settings.database)
                self._db.executescript(SCHEMA)
                self._reader = self._connect(self.settings.database)
            except sqlite3.Error as exc:
                raise StateUnavailable(f"decision log {self.settings.database}: {exc}") from exc
        if self.enabled:
            self._writer = threading.Thread(target=self._drain, name="decision-log", daemon=True)
            self._writer.start()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None
        self._reads.shutdown(wait=True)

    async def flush(self) -> None:
        """Wait until every record so far is written."""
        if self._writer is not None:
            await asyncio.to_thread(self._queue.join)

    # Writing (event loop side: build the record, enqueue; never blocks).

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._queue.put(record)

    def decision(
        self,
        decision: Decision,
        request: DecideRequest,
        call: ToolCall,
        *,
        time: str,
        transport: str,
        latency_ms: float,
        matched: list[str],
        shadow: list[dict[str, Any]] | None = None,
        dry_run: bool = False,
    ) -> None:
        if not self.enabled:
            return
        principal = request.principal
        record: dict[str, Any] = {
            "event": "decision",
            "decision_id": decision.decision_id,
            "time": time,
            "transport": transport,
            "principal": {
                "agent_id": principal.agent_id,
                "session_id": principal.session_id,
                "user_id": principal.user_id,
            },
            "server": call.server,
            "tool": call.name,
            "arguments_sha256": jsonstrict.sha256_hex(call.arguments),
            "verdict": decision.verdict.value,
            "rule": decision.rule,
            "reason": decision.reason,
            "matched": matched,
            "policy_revision": decision.policy_revision,
            "approval_id": decision.approval.id if decision.approval else None,
            "latency_ms": round(latency_ms, 3),
        }
        if self.settings.arguments == "raw":
            record["arguments"] = call.arguments
        elif self.settings.arguments == "redacted":
            record["arguments"] = redact(call.arguments, self._redact)
        if shadow:
            record["shadow"] = shadow
        if dry_run:
            record["dry_run"] = True
        self._queue.put(record)

    # The writer thread.

    def _drain(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Let a few more records arrive: one wake-up and one transaction for many
            # decisions costs the event loop's thread far less than one per decision.
            time.sleep(BATCH_WAIT_SECONDS)
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            records = [r for r in batch if r is not None]
            try:
                self._store(records)
            except Exception:  # noqa: BLE001 - a sink failure must not kill the writer
                self.dropped += len(records)
                logging.getLogger(__name__).exception("decision log write failed")
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _store(self, records: list[dict[str, Any]]) -> None:
        lines = [line(r) for r in records]
        if self._stream is not None:
            self._stream.write("".join(text + "\n" for text in lines))
            self._stream.flush()
        if self._file is not None:
            for text in lines:
                self._file.emit(logging.makeLogRecord({"msg": text}))
        decisions = [
            (r, text)
            for r, text in zip(records, lines, strict=True)
            if r.get("event") == "decision"
        ]
        if self._db is not None and decisions:
            now = time.time()
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO decisions (decision_id, ts, session_id, agent_id, "
                "user_id, server, tool, verdict, rule, record) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r["decision_id"],
                        _epoch(r["time"]),
                        r["principal"]["session_id"],
                        r["principal"]["agent_id"],
                        r["principal"]["user_id"],
                        r["server"],
                        r["tool"],
                        r["verdict"],
                        r["rule"],
                        text,
                    )
                    for r, text in decisions
                ],
            )
            self._db.execute(
                "DELETE FROM decisions WHERE ts < ?", (now - self.settings.retention_days * 86400,)
            )
            self._db.execute("COMMIT")

    # Reading (off the event loop, on its own connection).

    async def query(self, q: DecisionQuery) -> tuple[list[dict[str, Any]], int | None]:
        """Records newest first, and the cursor of the next page (None at the end)."""
        await self.flush()
        page: tuple[list[dict[str, Any]], int | None] = await self._read(self._query, q)
        return page

    async def summary(self, since: datetime) -> dict[str, Any]:
        await self.flush()
        summary: dict[str, Any] = await self._read(self._summary, since)
        return summary

    async def _read(self, fn: Any, arg: Any) -> Any:
        if self._reader is None:
            raise StateUnavailable("the decision log has no database (MCP_POLICY_DECISION_DB)")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reads, fn, arg)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"decision log: {exc}") from exc

    def _query(self, q: DecisionQuery) -> tuple[list[dict[str, Any]], int | None]:
        assert self._reader is not None
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("session_id", q.session_id),
            ("agent_id", q.agent_id),
            ("tool", q.tool),
            ("verdict", q.verdict),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if q.since is not None:
            where.append("ts >= ?")
            params.append(q.since.timestamp())
        if q.until is not None:
            where.append("ts < ?")
            params.append(q.until.timestamp())
        if q.cursor is not None:
            where.append("seq < ?")
            params.append(q.cursor)
        sql = "SELECT seq, record FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._reader.execute(sql, (*params, q.limit + 1)).fetchall()
        records = [json.loads(row[1]) for row in rows[: q.limit]]
        cursor = rows[q.limit - 1][0] if len(rows) > q.limit else None
        return records, cursor

    def _summary(self, since: datetime) -> dict[str, Any]:
        assert self._reader is not None
        db, ts = self._reader, since.timestamp()
        total = db.execute("SELECT COUNT(*) FROM decisions WHERE ts >= ?", (ts,)).fetchone()[0]
        verdicts = dict(
            db.execute(
                "SELECT verdict, COUNT(*) FROM decisions WHERE ts >= ? GROUP BY verdict", (ts,)
            ).fetchall()
        )
        denials = db.execute(
            "SELECT rule, COUNT(*) AS n FROM decisions WHERE ts >= ? AND verdict != 'allow' "
            "GROUP BY rule ORDER BY n DESC, rule LIMIT 10",
            (ts,),
        ).fetchall()
        tools = db.execute(
            "SELECT tool, COUNT(*) AS n FROM decisions WHERE ts >= ? GROUP BY tool "
            "ORDER BY n DESC, tool LIMIT 10",
            (ts,),
        ).fetchall()
        recent = db.execute(
            "SELECT record FROM decisions WHERE ts >= ? AND verdict != 'allow' "
            "ORDER BY seq DESC LIMIT 10",
            (ts,),
        ).fetchall()
        return {
            "since": since.isoformat(),
            "calls": total,
            "verdicts": verdicts,
            "denials_by_rule": [{"rule": r, "count": n} for r, n in denials],
            "top_tools": [{"tool": t, "count": n} for t, n in tools],
            "recent_denials": [json.loads(row[0]) for row in recent],
        }


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC).timestamp()
