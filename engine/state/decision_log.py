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

Hostile input. Records come from callers nobody vouches for, so before a record is
written (by the writer thread, identically to every sink) it is made safe:

- Bounded fields. Every string outside `arguments` longer than its bound is cut to the
  bound and an ellipsis ("…") appended: `NAME_MAX` (256) characters for names and ids
  (tool, server, rule, principal ids, matched rule ids, shadow rules, ...), `TEXT_MAX`
  (1024) for prose (`reason`, `error`, `message`, `comment`). Lists keep at most
  `LIST_MAX` (32) entries and objects `KEYS_MAX` (64) keys. What was cut is named in the
  record's `truncated` object, keyed by the field's dotted path (list indexes are path
  parts): `"truncated": {"tool": {"length": 1048576, "sha256": "<hex>"},
  "principal.agent_id": {...}, "matched": {"items": 40}, "shadow.0.reason": {...}}` —
  `length` in characters of the original and `sha256` of its UTF-8 bytes (lone surrogates
  encoded as by Python's "surrogatepass"), so the original value can still be matched.
- Arguments (`raw`, `redacted`) whose JSON is over `LogSettings.max_argument_bytes` are
  left out: `"truncated": {"arguments": {"bytes": n, "sha256": <arguments_sha256>}}` (the
  hash of the call's canonical arguments, which every record carries anyway).
- Whole line. A line is never over `RECORD_MAX_BYTES` (64 KiB); a record that would be is
  cut to its identifying fields (event, ids, time, principal, server, tool, verdict, rule,
  reason, revision, argument hash) with `"truncated": {"record": {"bytes": n, "sha256":
  ...}}`.
- Sanitised strings. A string that cannot be encoded as UTF-8 (a lone UTF-16 surrogate,
  which Python's JSON parser makes of the escape "\\ud800") has each such character
  replaced by its escape as text (the six characters `\\ud800`), keys included; anything
  that is not JSON (bytes, a non-finite number, an object) is replaced by its text or
  null. Such a record carries `"sanitised": true`. The JSONL file and SQLite then only
  ever hold valid UTF-8 JSON.

Failures. A SQLite batch that fails is rolled back and its records are tried one by one,
so one bad record never costs the others; a record that cannot be stored is counted as
dropped. If a single record fails the way a failing database does (locked, full, I/O,
read-only) the rest of the batch is not tried again. A JSONL line that cannot be written
is tried once more on the file opened afresh (a cut line left behind is ended first);
standard error is not retried. The writer thread never stops on an error. Its health —
`health()`: healthy (the writer runs and every sink's last write succeeded), records
written, dropped, sanitised, truncated and suppressed, failed batches per sink, the last
error and when — is shown in `/readyz` (reported there, not gating readiness: a log that
cannot write must not stop decisions) and in `/metrics` (`mcp_policy_decision_log_*`),
and each kind of failure (sink and error type) is logged as one warning line without a
traceback, repeats of a kind at most once a minute (the next line says how many were held
back); a sink that writes again after failing is logged once too.

Event records (`write()`) that carry no `time` are given the time they were logged.

Floods. Decisions are all kept: they are the audit trail. `invalid_request` events, which
any caller can produce without limit, are written at most
`LogSettings.invalid_requests_per_second` per second (a token bucket holding as many);
the rest are counted and summarised about once a second, and when the log closes, in one
record `{"event": "invalid_requests_suppressed", "count": k, "first_at", "last_at",
"transports": {...}}`. The one kind of decision a caller can repeat without limit and
without cost, a call refused because its agent already has as many approvals waiting as
it may (the service passes `flood_key`, the agent), is kept the same way but per agent:
at most `LogSettings.too_many_pending_per_second` records per second for each agent (so
one agent's flood spends no one else's budget), the rest summarised in
`{"event": "decisions_suppressed", "count": k, "first_at", "last_at", "rules": {...},
"agents": {agent: count, ...}}` (at most 32 agents named, the rest under "(others)").

What bounds the history. The JSONL files hold at most max_bytes × (backups + 1) bytes, so
at least that divided by the largest record: a decision record with every field at its
bound is a few KiB (plus up to max_argument_bytes with raw arguments) and no line is ever
over RECORD_MAX_BYTES, so the defaults keep 10 MiB × 6 / 64 KiB ≈ 960 records at the very
least, and about 10^5 records of ordinary size (~500 bytes). Decisions are not
throttled, so a caller that makes very many of them does rotate the files, one bounded
record at a time. The SQLite copy is kept for retention_days and within db_max_bytes
(1 GiB by default): when its records take more pages than that, the oldest tenth of them
beyond it goes, oldest first (counted in `pruned_for_size`, /readyz), so heavy traffic
shortens the history instead of filling the disk. Deleted pages are reused; the file does
not shrink, and stays near the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import logging.handlers
import math
import queue
import sqlite3
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from engine import jsonstrict
from engine.errors import NotFound, StateUnavailable
from engine.models import DecideRequest, Decision, ToolCall

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
BATCH_WAIT_SECONDS = 0.01
BATCH_MAX = 500
# The writer wakes at least this often when idle, to write a due suppression summary.
IDLE_WAKE_SECONDS = 1.0
SUMMARY_SECONDS = 1.0
WARN_EVERY_SECONDS = 60.0
ArgumentMode = Literal["hash", "raw", "redacted"]

# Bounds of a record (see the module docstring).
NAME_MAX = 256
TEXT_MAX = 1024
LIST_MAX = 32
KEYS_MAX = 64
DEPTH_MAX = 16
RECORD_MAX_BYTES = 64 * 1024
ELLIPSIS = "\u2026"
TEXT_FIELDS = frozenset({"reason", "error", "message", "comment"})
# What a record over RECORD_MAX_BYTES is cut down to.
IDENTITY_FIELDS = (
    "event",
    "decision_id",
    "time",
    "transport",
    "principal",
    "server",
    "tool",
    "verdict",
    "rule",
    "reason",
    "policy_revision",
    "approval_id",
    "arguments_sha256",
    "latency_ms",
    "dry_run",
    "status",
    "approver",
    "count",
)
PRINCIPAL_FIELDS = ("agent_id", "session_id", "user_id")

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
INSERT = (
    "INSERT OR IGNORE INTO decisions (decision_id, ts, session_id, agent_id, "
    "user_id, server, tool, verdict, rule, record) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
Row = tuple[str, float, str | None, str | None, str | None, str, str, str, str, str]


@dataclass(frozen=True)
class LogSettings:
    jsonl: str  # a path, "-" for standard error, or "off"
    database: Path | None
    arguments: ArgumentMode = "hash"
    redact: tuple[str, ...] = ()
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    retention_days: float = 30
    db_max_bytes: int = 1024**3  # the SQLite copy's records, at most (oldest deleted first)
    max_argument_bytes: int = 16 * 1024  # logged arguments over this are left out
    invalid_requests_per_second: float = 20.0  # invalid_request events written; 0: none
    too_many_pending_per_second: float = 5.0  # such refusals written per agent; 0: none


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


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def safe_text(value: str) -> str:
    """`value` encodable as UTF-8: each lone surrogate replaced by its escape as text."""
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(exc: BaseException) -> str:
    """An exception as one bounded, printable line (its text may quote hostile input)."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - a __str__ that fails still names the type
        text = type(exc).__name__
    text = " ".join(text.split())
    if len(text) > TEXT_MAX:
        text = text[:TEXT_MAX] + ELLIPSIS
    return safe_text(text)


def _original(value: str) -> dict[str, Any]:
    """How a cut string is still identified: its length and the SHA-256 of its bytes."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return {"length": len(value), "sha256": digest}


def arguments_sha256(arguments: Any) -> str:
    """The SHA-256 of the canonical JSON of `arguments`, whatever strings they hold."""
    try:
        return jsonstrict.sha256_hex(arguments)
    except UnicodeEncodeError:  # a lone surrogate: hash the code units as they came
        text = jsonstrict.canonical(arguments)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class _Bounder:
    """Makes one record safe to write, noting what it cut and whether it sanitised."""

    def __init__(self) -> None:
        self.truncated: dict[str, dict[str, Any]] = {}
        self.sanitised = False

    def text(self, value: str) -> str:
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.sanitised = True
            return safe_text(value)
        return value

    def string(self, value: str, path: str, limit: int) -> str:
        if len(value) > limit:
            self.truncated[path] = _original(value)
            value = value[:limit] + ELLIPSIS
        return self.text(value)

    def key(self, key: object, parent: str, bounded: bool) -> tuple[str, str]:
        """The key as text, and the path of its value."""
        if isinstance(key, str) and key.isascii() and len(key) <= NAME_MAX:
            return key, f"{parent}.{key}" if parent else key
        if isinstance(key, str):
            name = key
        elif key is None or isinstance(key, bool | int | float):
            name = json.dumps(key)  # as json.dumps would write the key
        else:
            self.sanitised = True
            name = str(key)
        cut = bounded and len(name) > NAME_MAX
        original = _original(name) if cut else None
        if cut:
            name = name[:NAME_MAX] + ELLIPSIS
        name = self.text(name)
        path = f"{parent}.{name}" if parent else name
        if original is not None:
            self.truncated[path] = {"key_" + k: v for k, v in original.items()}
        return name, path

    def tree(self, value: Any, path: str, limit: int, depth: int, bounded: bool) -> Any:
        """`value` as JSON that encodes; `bounded`: strings, lists and objects cut too."""
        if isinstance(value, str):
            return self.string(value, path, limit) if bounded else self.text(value)
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            self.sanitised = True
            return None
        if isinstance(value, dict | list | tuple) and bounded and depth >= DEPTH_MAX:
            self.truncated[path] = {"depth": depth}
            return None
        if isinstance(value, dict):
            items = list(value.items())
            if bounded and len(items) > KEYS_MAX:
                self.truncated[path or "."] = {"keys": len(items)}
                items = items[:KEYS_MAX]
            out: dict[str, Any] = {}
            for key, item in items:
                name, child = self.key(key, path, bounded)
                child_limit = TEXT_MAX if name in TEXT_FIELDS else NAME_MAX
                out[name] = self.tree(item, child, child_limit, depth + 1, bounded)
            return out
        if isinstance(value, list | tuple):
            entries = list(value)
            if bounded and len(entries) > LIST_MAX:
                self.truncated[path] = {"items": len(entries)}
                entries = entries[:LIST_MAX]
            return [
                self.tree(item, f"{path}.{i}", limit, depth + 1, bounded)
                for i, item in enumerate(entries)
            ]
        self.sanitised = True  # not JSON (bytes, an object): its text
        try:
            text = str(value)
        except Exception:  # noqa: BLE001 - an unprintable object still leaves a record
            text = f"<{type(value).__name__}>"
        return self.string(text, path, limit) if bounded else self.text(text)


@dataclass
class Prepared:
    record: dict[str, Any]
    text: str
    sanitised: bool
    truncated: bool


def prepare(record: dict[str, Any], *, max_argument_bytes: int) -> Prepared:
    """`record` made safe to write (bounded, sanitised: see the module docstring)."""
    bounder = _Bounder()
    if not isinstance(record, dict):
        record = {"event": "unknown", "value": record}
    rest = {k: v for k, v in record.items() if k != "arguments"}
    out: dict[str, Any] = bounder.tree(rest, "", NAME_MAX, 0, True)
    if "arguments" in record:
        arguments = record["arguments"]
        try:
            size: int | None = len(
                json.dumps(arguments, separators=(",", ":"), allow_nan=False, default=str)
            )
        except (TypeError, ValueError, RecursionError):
            size = None
        if size is not None and size <= max_argument_bytes:
            out["arguments"] = bounder.tree(arguments, "arguments", NAME_MAX, 0, False)
        else:
            digest = out.get("arguments_sha256")
            if not isinstance(digest, str):
                try:
                    digest = arguments_sha256(arguments)
                except (TypeError, ValueError, RecursionError):
                    digest = None
            bounder.truncated["arguments"] = {"bytes": size, "sha256": digest}
    if bounder.truncated:
        out["truncated"] = bounder.truncated
    if bounder.sanitised:
        out["sanitised"] = True
    text = line(out)
    if len(text) > RECORD_MAX_BYTES:
        out = _identity(out, text)
        text = line(out)
    return Prepared(out, text, bounder.sanitised, bool(bounder.truncated))


def _identity(out: dict[str, Any], text: str) -> dict[str, Any]:
    """A record over RECORD_MAX_BYTES cut to the fields that identify it."""
    kept: dict[str, Any] = {}
    for name in IDENTITY_FIELDS:
        value = out.get(name)
        if name == "principal" and isinstance(value, dict):
            kept[name] = {k: value.get(k) for k in PRINCIPAL_FIELDS if k in value}
        elif isinstance(value, str):
            kept[name] = value[:NAME_MAX] + ELLIPSIS if len(value) > NAME_MAX else value
        elif value is None or isinstance(value, bool | int | float):
            if name in out:
                kept[name] = value
    truncated = out.get("truncated", {})
    notes = {p: v for p, v in truncated.items() if p.split(".", 1)[0] in kept}
    notes["record"] = {
        "bytes": len(text),
        "sha256": hashlib.sha256(text.encode("ascii")).hexdigest(),
    }
    kept["truncated"] = notes
    if out.get("sanitised"):
        kept["sanitised"] = True
    if len(line(kept)) > RECORD_MAX_BYTES:  # not reachable with the bounds above; a floor
        kept = {
            k: kept[k] for k in ("event", "decision_id", "time") if isinstance(kept.get(k), str)
        }
        kept = {k: v[:64] for k, v in kept.items()}
        kept["truncated"] = {"record": notes["record"]}
    return kept


def _row(record: dict[str, Any], text: str) -> Row:
    """The database columns of a prepared decision record, whatever it lacks."""
    principal = record.get("principal")
    if not isinstance(principal, dict):
        principal = {}

    def optional(value: Any) -> str | None:
        return None if value is None else value if isinstance(value, str) else line(value)

    def required(value: Any) -> str:
        return optional(value) or ""

    decision_id = record.get("decision_id")
    if not isinstance(decision_id, str) or not decision_id:
        decision_id = "dec_unidentified_" + uuid.uuid4().hex
    try:
        ts = _epoch(record["time"])
    except (KeyError, TypeError, ValueError, AttributeError):
        ts = time.time()
    return (
        decision_id,
        ts,
        optional(principal.get("session_id")),
        optional(principal.get("agent_id")),
        optional(principal.get("user_id")),
        required(record.get("server")),
        required(record.get("tool")),
        required(record.get("verdict")),
        required(record.get("rule")),
        text,
    )


def _sink_level(exc: BaseException) -> bool:
    """Whether `exc` says the database fails (locked, full, I/O, read-only, corrupt,
    closed), rather than one record being unstorable (a constraint, a value)."""
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return True
    return isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc)


class _Warnings:
    """One warning line per kind of failure; repeats within `every` seconds held back and
    counted in the next line of that kind."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            held = self._held.pop(kind, 0)
            self._last[kind] = now
        if held:
            message += " (and %d more like this since the last such warning)"
            args = (*args, held)
        log.warning(message, *args)


# Keys whose flood budget is remembered (the least recently refused is forgotten first),
# and values named one by one in a summary record's tallies.
FLOOD_KEYS_MAX = 4096
SUMMARY_KEYS_MAX = 32
OTHER_AGENTS = "(others)"
NO_AGENT = "(no agent_id)"


def _transport_name(transport: Any) -> str:
    """A record's transport as a summary tallies it (a caller may not name one at will)."""
    return transport if isinstance(transport, str) and len(transport) <= 32 else "other"


class _Flood:
    """Admits records at `rate` per second per key (a token bucket as deep as the rate for
    each; one key, "", when the records are not told apart), and counts what it holds
    back for a summary record `event`: how many, when, and a tally per field of the
    held-back records (each naming at most `SUMMARY_KEYS_MAX` values, the rest as
    `others`)."""

    def __init__(self, rate: float, event: str, *, rate_field: str, others: str) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.event = event
        self.rate_field = rate_field
        self.others = others
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._lock = threading.Lock()
        self.total = 0  # held back since the log was made
        self._count = 0  # held back since the last summary
        self._since = 0.0
        self._first_at: Any = None
        self._last_at: Any = None
        self._tallies: dict[str, dict[str, int]] = {}

    def admit(self, key: str, at: Any, tally: dict[str, str]) -> bool:
        """Whether the record (`at` its time) is written; else it is counted under `tally`
        (field -> value) for the summary."""
        with self._lock:
            now = time.monotonic()
            if self.rate > 0:
                tokens, then = self._buckets.pop(key, (self.capacity, now))
                tokens = min(self.capacity, tokens + (now - then) * self.rate)
                admitted = tokens >= 1
                self._buckets[key] = (tokens - 1 if admitted else tokens, now)
                if len(self._buckets) > FLOOD_KEYS_MAX:
                    self._buckets.popitem(last=False)
                if admitted:
                    return True
            if self._count == 0:
                self._since = now
                self._first_at = at
            self._count += 1
            self.total += 1
            self._last_at = at
            for field, value in tally.items():
                counts = self._tallies.setdefault(field, {})
                if value not in counts and len(counts) >= SUMMARY_KEYS_MAX:
                    value = self.others
                counts[value] = counts.get(value, 0) + 1
            return False

    def summary(self, *, force: bool) -> dict[str, Any] | None:
        """The summary record when one is due (`force`: whenever one is pending)."""
        with self._lock:
            if self._count == 0:
                return None
            if not force and time.monotonic() - self._since < SUMMARY_SECONDS:
                return None
            record: dict[str, Any] = {
                "event": self.event,
                "time": now_iso(),
                "count": self._count,
                "first_at": self._first_at,
                "last_at": self._last_at,
            }
            for field, counts in sorted(self._tallies.items()):
                record[field] = dict(sorted(counts.items()))
            record[self.rate_field] = self.rate
            self._count = 0
            self._tallies = {}
            return record


@dataclass
class SinkHealth:
    failing: bool = False
    failed_batches: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # epoch seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": not self.failing,
            "failed_batches": self.failed_batches,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
        }


class _JsonlFile(logging.handlers.RotatingFileHandler):
    """Size rotation from the standard library; a write that fails raises (to the writer,
    which counts and reports it) instead of printing a traceback to standard error."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - the API's name
        exc = sys.exception()
        if exc is not None:
            raise exc

    def reopen(self) -> None:
        """Drop the stream; the next write opens the file again (ending a cut line)."""
        stream = self.stream
        self.stream = None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        with contextlib.suppress(OSError), open(self.baseFilename, "rb+") as raw:
            if raw.seek(0, 2) > 0:
                raw.seek(-1, 2)
                if raw.read(1) != b"\n":
                    raw.write(b"\n")


class DecisionLog:
    def __init__(self, settings: LogSettings) -> None:
        self.settings = settings
        self._redact = frozenset(settings.redact)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stream: TextIO | None = None
        self._file: _JsonlFile | None = None
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decision-log-read")
        self._writer: threading.Thread | None = None
        self._flood = _Flood(
            settings.invalid_requests_per_second,
            "invalid_requests_suppressed",
            rate_field="limit_per_second",
            others="other",
        )
        self._decision_flood = _Flood(
            settings.too_many_pending_per_second,
            "decisions_suppressed",
            rate_field="limit_per_second_per_agent",
            others=OTHER_AGENTS,
        )
        self._warn = _Warnings(WARN_EVERY_SECONDS)
        self.sinks: dict[str, SinkHealth] = {}
        if settings.jsonl != "off":
            self.sinks["jsonl"] = SinkHealth()
        if settings.database is not None:
            self.sinks["database"] = SinkHealth()
        # Records, counted by the writer thread.
        self.written = 0  # written to every sink it goes to
        self.dropped = 0  # lost by at least one sink
        self.pruned_for_size = 0  # database records deleted to stay within db_max_bytes
        self.sanitised = 0
        self.truncated = 0

    @property
    def enabled(self) -> bool:
        return self.settings.jsonl != "off" or self.settings.database is not None

    @property
    def suppressed(self) -> int:
        """invalid_request events not written one by one (counted in summaries)."""
        return self._flood.total

    @property
    def suppressed_decisions(self) -> int:
        """Decisions not written one by one (`flood_key`: counted in summaries)."""
        return self._decision_flood.total

    def open(self) -> None:
        """Open the sinks (raises StateUnavailable naming a file that cannot be used)."""
        target = self.settings.jsonl
        if target == "-":
            self._stream = sys.stderr
        elif target != "off":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._file = _JsonlFile(
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
        if self._writer is not None and self._writer.is_alive():
            await asyncio.to_thread(self._queue.join)

    def health(self) -> dict[str, Any]:
        """What `/readyz` shows: whether the writer and every sink are writing, and counts."""
        running = self._writer is not None and self._writer.is_alive()
        last = max(
            (h for h in self.sinks.values() if h.last_error_at is not None),
            key=lambda h: h.last_error_at or 0.0,
            default=None,
        )
        return {
            "enabled": self.enabled,
            "healthy": (running or not self.enabled)
            and not any(h.failing for h in self.sinks.values()),
            "writer_running": running,
            "queued": self._queue.qsize(),
            "written": self.written,
            "dropped": self.dropped,
            "sanitised": self.sanitised,
            "truncated": self.truncated,
            "suppressed_invalid_requests": self.suppressed,
            "suppressed_decisions": self.suppressed_decisions,
            "pruned_for_size": self.pruned_for_size,
            "failed_batches": sum(h.failed_batches for h in self.sinks.values()),
            "last_error": last.last_error if last else None,
            "last_error_at": _iso(last.last_error_at) if last else None,
            "sinks": {name: h.as_dict() for name, h in self.sinks.items()},
        }

    # Writing (event loop side: build the record, enqueue; never blocks).

    def write(self, record: dict[str, Any]) -> None:
        """Log an event record; invalid_request events are flood-controlled."""
        if not self.enabled:
            return
        if "time" not in record:
            record = {**record, "time": now_iso()}
        if record.get("event") == "invalid_request" and not self._flood.admit(
            "", record.get("time"), {"transports": _transport_name(record.get("transport"))}
        ):
            return
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
        flood_key: str | None = None,
    ) -> None:
        """Log a decision. With `flood_key` (a refusal its caller can repeat at no cost:
        the key is its agent, "" for none) at most `too_many_pending_per_second` such
        records per key are written each second; the rest go into a summary record."""
        if not self.enabled:
            return
        if flood_key is not None and not self._decision_flood.admit(
            flood_key, time, {"agents": flood_key or NO_AGENT, "rules": decision.rule}
        ):
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
            "arguments_sha256": arguments_sha256(call.arguments),
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

    # The writer thread: it never stops on an error (each is counted, shown, logged).

    def _drain(self) -> None:
        stopping = False
        while not stopping:
            batch = self._next_batch()
            stopping = any(r is None for r in batch)
            records = [r for r in batch if r is not None]
            try:
                for flood in (self._flood, self._decision_flood):
                    summary = flood.summary(force=stopping)
                    if summary is not None:
                        records.append(summary)
                if records:
                    self._store(records)
            except Exception as exc:  # noqa: BLE001 - not expected; the writer outlives it
                self.dropped += len(records)
                self._warn(
                    "writer", "decision log: %d records lost: %s", len(records), describe(exc)
                )
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _next_batch(self) -> list[dict[str, Any] | None]:
        try:
            first = self._queue.get(timeout=IDLE_WAKE_SECONDS)
        except queue.Empty:
            return []
        batch = [first]
        if first is not None:
            # Let a few more records arrive: one wake-up and one transaction for many
            # decisions costs the event loop's thread far less than one per decision.
            time.sleep(BATCH_WAIT_SECONDS)
        while len(batch) < BATCH_MAX:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _store(self, records: list[dict[str, Any]]) -> None:
        prepared = [self._prepare(r) for r in records]
        lost = [False] * len(prepared)
        if self._stream is not None or self._file is not None:
            for i in self._write_jsonl([p.text for p in prepared]):
                lost[i] = True
        if self._db is not None:
            rows: list[tuple[int, Row]] = []
            for i, p in enumerate(prepared):
                if p.record.get("event") != "decision":
                    continue
                try:
                    rows.append((i, _row(p.record, p.text)))
                except Exception as exc:  # noqa: BLE001 - not expected: _row takes anything
                    lost[i] = True
                    self._warn("row", "decision log database: record not stored: %s", describe(exc))
            if rows:
                for i in self._write_db(rows):
                    lost[i] = True
        dropped = sum(lost)
        self.dropped += dropped
        self.written += len(lost) - dropped

    def _prepare(self, record: dict[str, Any]) -> Prepared:
        try:
            prepared = prepare(record, max_argument_bytes=self.settings.max_argument_bytes)
        except Exception as exc:  # noqa: BLE001 - a record we cannot read still leaves a trace
            self._warn("unreadable", "decision log: a record could not be read: %s", describe(exc))
            stub = {"event": "unreadable_record", "time": now_iso(), "error": describe(exc)}
            prepared = Prepared(stub, line(stub), sanitised=True, truncated=False)
        if prepared.sanitised:
            self.sanitised += 1
            self._warn(
                "sanitised",
                "decision log: record %s held text that is not valid Unicode; stored "
                'sanitised (marked "sanitised": true)',
                prepared.record.get("decision_id") or prepared.record.get("event"),
            )
        if prepared.truncated:
            self.truncated += 1
        return prepared

    def _write_jsonl(self, lines: list[str]) -> set[int]:
        """Write the lines; the indexes of those that could not be written."""
        failed: set[int] = set()
        error: Exception | None = None
        if self._stream is not None:
            try:
                self._stream.write("".join(text + "\n" for text in lines))
                self._stream.flush()
            except Exception as exc:  # noqa: BLE001 - reported below
                failed, error = set(range(len(lines))), exc
        elif self._file is not None:
            for i, text in enumerate(lines):
                try:
                    self._emit(text)
                except Exception as exc:  # noqa: BLE001 - once more on a fresh file handle
                    error = exc
                    self._file.reopen()
                    try:
                        self._emit(text)
                    except Exception as again:  # noqa: BLE001 - reported below
                        error = again
                        failed.add(i)
                        self._file.reopen()
        self._report("jsonl", error, recovered=not failed)
        return failed

    def _emit(self, text: str) -> None:
        assert self._file is not None
        self._file.emit(logging.makeLogRecord({"msg": text}))

    def _write_db(self, rows: list[tuple[int, Row]]) -> set[int]:
        """Insert the rows in one transaction or, if that fails, one by one."""
        try:
            self._insert([row for _, row in rows], prune=True)
        except Exception as exc:  # noqa: BLE001 - rolled back, then record by record
            self._rollback()
            batch_error = exc
        else:
            self._report("database", None, recovered=True)
            return set()
        failed: set[int] = set()
        sink_failing = _sink_level(batch_error)
        for position, (i, row) in enumerate(rows):
            try:
                self._insert([row], prune=False)
            except Exception as exc:  # noqa: BLE001 - this record alone is lost
                self._rollback()
                failed.add(i)
                sink_failing = _sink_level(exc)
                if sink_failing:  # the database fails, not the record: stop trying
                    failed.update(j for j, _ in rows[position + 1 :])
                    break
                self._warn(
                    f"record:{type(exc).__name__}",
                    "decision log database: record %s not stored: %s",
                    row[0],
                    describe(exc),
                )
            else:
                sink_failing = False
        self._report("database", batch_error, recovered=not sink_failing)
        return failed

    def _insert(self, rows: list[Row], *, prune: bool) -> None:
        db = self._db
        assert db is not None
        if db.in_transaction:  # never left open, but a stuck one must not block every batch
            db.execute("ROLLBACK")
        db.execute("BEGIN")
        db.executemany(INSERT, rows)
        if prune:
            cutoff = time.time() - self.settings.retention_days * 86400
            db.execute("DELETE FROM decisions WHERE ts < ?", (cutoff,))
            self._cap_size(db)
        db.execute("COMMIT")

    def _cap_size(self, db: sqlite3.Connection) -> None:
        """Delete the oldest records while they take more than db_max_bytes: a share of the
        seq range as large as the excess plus a tenth of the cap (so it is not done on
        every batch), found from the primary key's ends (no count of the rows)."""
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        used, cap = (pages - free) * page_size, self.settings.db_max_bytes
        if used <= cap:
            return
        first, last = db.execute("SELECT MIN(seq), MAX(seq) FROM decisions").fetchone()
        if first is None:
            return
        share = min(1.0, (used - cap * 0.9) / used)
        below = first + max(1, math.ceil(share * (last - first + 1)))
        deleted = db.execute("DELETE FROM decisions WHERE seq < ?", (below,)).rowcount
        self.pruned_for_size += deleted
        log.warning(
            "decision log database: %d oldest records deleted to stay within %d bytes "
            "(MCP_POLICY_DECISION_LOG_DB_MAX_BYTES)",
            deleted,
            cap,
        )

    def _rollback(self) -> None:
        db = self._db
        if db is not None and db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    def _report(self, sink: str, error: Exception | None, *, recovered: bool) -> None:
        """Note how a batch went for `sink`: `error` if it (or part of it) failed;
        `recovered`: whether the sink's last write succeeded."""
        health = self.sinks[sink]
        if error is not None:
            health.failed_batches += 1
            health.last_error = describe(error)
            health.last_error_at = time.time()
            self._warn(
                f"{sink}:{type(error).__name__}",
                "decision log %s: write failed: %s",
                sink,
                health.last_error,
            )
        if recovered and health.failing:
            log.warning(
                "decision log %s: writing again (%d failed batches so far)",
                sink,
                health.failed_batches,
            )
        health.failing = not recovered

    # Reading (off the event loop, on its own connection).

    async def query(self, q: DecisionQuery) -> tuple[list[dict[str, Any]], int | None]:
        """Records newest first, and the cursor of the next page (None at the end)."""
        await self.flush()
        page: tuple[list[dict[str, Any]], int | None] = await self._read(self._query, q)
        return page

    async def get(self, decision_id: str) -> dict[str, Any]:
        """The logged record of one decision; NotFound when none has this id."""
        await self.flush()
        found: dict[str, Any] | None = await self._read(self._get, decision_id)
        if found is None:
            raise NotFound(f"no decision {jsonstrict.quote(decision_id)} in the decision log")
        return found

    def _get(self, decision_id: str) -> dict[str, Any] | None:
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT record FROM decisions WHERE decision_id = ?", (decision_id,)
        ).fetchone()
        record: dict[str, Any] | None = None if row is None else json.loads(row[0])
        return record

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
        # Calls waiting for a human are not denials: they are counted apart, by rule.
        denials, approvals = (
            db.execute(
                f"SELECT rule, COUNT(*) AS n FROM decisions WHERE ts >= ? AND verdict {which} "
                "GROUP BY rule ORDER BY n DESC, rule LIMIT 10",
                (ts,),
            ).fetchall()
            for which in (_DENIED, "= 'approval_required'")
        )
        tools = db.execute(
            "SELECT tool, COUNT(*) AS n FROM decisions WHERE ts >= ? GROUP BY tool "
            "ORDER BY n DESC, tool LIMIT 10",
            (ts,),
        ).fetchall()
        recent = db.execute(
            f"SELECT record FROM decisions WHERE ts >= ? AND verdict {_DENIED} "
            "ORDER BY seq DESC LIMIT 10",
            (ts,),
        ).fetchall()
        return {
            "since": since.isoformat(),
            "calls": total,
            "verdicts": verdicts,
            "denials_by_rule": [{"rule": r, "count": n} for r, n in denials],
            "approvals_required_by_rule": [{"rule": r, "count": n} for r, n in approvals],
            "top_tools": [{"tool": t, "count": n} for t, n in tools],
            "recent_denials": [json.loads(row[0]) for row in recent],
        }


_DENIED = "IN ('deny', 'rate_limited')"


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
