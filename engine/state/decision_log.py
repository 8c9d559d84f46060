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

Hash chains (tamper-evident). Each store is a chain: every record carries the SHA-256 of
the one before it, so an edit, a deletion or a reordering shows (`mcp-policy log verify`,
engine/state/audit.py, checks either store streaming, in constant memory).

- JSONL: each line ends with `"seq": n, "prev": "<hex>", "hash": "<hex>"`: its place in
  the chain (1, 2, ...), the hash of the line before, and the SHA-256 of the line's own
  ASCII text up to `,"hash"` (closed with `}`), which holds seq and prev. The first line
  of a new file carries the last hash of the file before, so rotation never breaks the
  chain. When a file goes (the oldest backup at rotation, or a rotated file whose newest
  record is past the retention), the seq and hash of its last record are written first to
  the anchor, `<stem>.anchor.json` beside the log (written atomically): a log that lost
  its oldest records still verifies, from the anchor; one that lost its first kept record
  does not. A record's own `seq`, `prev` or `hash` keys are replaced by the chain's.
  Standard error ("-") gets no chain (nothing can be read back from it).
- SQLite: columns `prev` and `hash` of each row, the hash over prev and every other column
  but seq (`row_hash`); rows follow each other by seq without gaps. Records leave only
  from the oldest end, and the same transaction records the last one removed in table
  `anchor`. Each batch reads the head (the last row) inside its write transaction (BEGIN
  IMMEDIATE), so replicas sharing one database extend one chain.
- The record a decision has in SQLite is its JSONL line, chain fields and all (the same
  record in both stores); its SQLite link is in the columns.
- The chain continues across restarts: the JSONL head is read back from the last line at
  open; a line cut by a crash (no newline) is removed then and the next record,
  `{"event": "cut_line_removed", "bytes", "sha256"}`, says so. Logs written before the
  chain existed verify as "unchained" up to where the chain starts.
- Cost on the writer thread: one SHA-256 per record and store; on the event loop, none.

Durability. `sync="batch"` (the default): a decision is answered at once and written
within about BATCH_WAIT_SECONDS; a crash can lose the records still queued. `"always"`:
an allow (not a dry run) is answered only once its record is in every sink. The writer
writes a batch, fsyncs the JSONL file (and the directory when a file is created or
rotated) and commits SQLite with synchronous=FULL, then settles every waiting decision of
the batch with one `call_soon_threadsafe` per event loop (group commit). A record that
could not be written, or not within SYNC_WAIT_SECONDS, raises StateUnavailable to the
waiting decision, which the service then denies (`engine.state_unavailable`); such an
allow record is not put into SQLite when the JSONL file refused it, so the deny logged
next is the decision's row there (the JSONL may hold both: the later line is the answer).

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
- The policy input (`LogSettings.input`: `"input"`, the exact document the policy was
  given, its `tool.arguments` as the argument setting says: raw, redacted, or for hash
  their SHA-256 as a string, named by `"input_arguments"`; beside it `"policy"`, what the
  policy answered: action, rule, rate_limits, approval) is kept exactly as it was, never
  cut field by field: only sanitised like the arguments. A record it would take over the
  line's bound is written without it: `"truncated": {"input": {"bytes": n, "sha256":
  <of its JSON>}}` (replay and explain then say the input was not kept).
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
is tried once more on the file opened afresh (a cut part of it left behind is removed
first, so the chain never holds half a line);
standard error is not retried. The writer thread never stops on an error. Its health —
`health()`: healthy (the writer runs and every sink's last write succeeded), records
written, dropped, sanitised, truncated and suppressed, failed batches per sink, the last
error and when — is shown in `/readyz` (reported there, not gating readiness: a log that
cannot write must not stop decisions) and in `/metrics` (`mcp_policy_decision_log_*`),
and each kind of failure (sink and error type) is logged as one warning line without a
traceback, repeats of a kind at most once a minute (the next line says how many were held
back); a sink that writes again after failing is logged once too.

Event records (`write()`) that carry no `time` are given the time they were logged.

Decisions on tool results (`result_decision()`, event `result_decision`) are records of
the JSONL log like its other events (chained, rotated, kept by the same bounds): they name
the call's decision, what was decided and redacted (rules, paths or patterns, counts) and
the SHA-256 and size of the result, never the result nor a value of it. The SQLite copy
keeps call decisions only, so GET /v1/decisions, ListDecisions and the status summary
never count a result decision as a call.

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

What bounds the history. The JSONL files hold at most max_bytes × (backups + 1) bytes
(with backups 0 the file is emptied when full, its last hash anchored), so
at least that divided by the largest record: a decision record with every field at its
bound is a few KiB (plus up to max_argument_bytes with raw arguments) and no line is ever
over RECORD_MAX_BYTES, so the defaults keep 10 MiB × 6 / 64 KiB ≈ 960 records at the very
least, and about 10^5 records of ordinary size (~600 bytes). Rotated files whose newest
record is older than retention_days are deleted too (checked at open, at each rotation and
every PRUNE_EVERY_SECONDS). Decisions are not throttled, so a caller that makes very many
of them does rotate the files, one bounded record at a time. The SQLite copy is kept for
retention_days and within db_max_bytes (1 GiB by default): when its records take more
pages than that, the oldest tenth of them beyond it goes, oldest first (counted in
`pruned_for_size`, /readyz), so heavy traffic shortens the history instead of filling the
disk. Both stores delete from the oldest end only (a record is kept until every record
before it is past the retention), so the chain stays whole. Deleted pages are reused; the
file does not shrink, and stays near the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import queue
import re
import sqlite3
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from engine import jsonstrict
from engine.errors import NotFound, StateUnavailable
from engine.models import (
    CallRequest,
    DecideRequest,
    Decision,
    PolicyResult,
    ResultAction,
    ResultDecision,
    ToolCall,
    Verdict,
)

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
BATCH_WAIT_SECONDS = 0.01
BATCH_MAX = 500
# The writer wakes at least this often when idle, to write a due suppression summary.
IDLE_WAKE_SECONDS = 1.0
SUMMARY_SECONDS = 1.0
WARN_EVERY_SECONDS = 60.0
# How often the writer looks for rotated JSONL files past the retention (also at each
# rotation and at open).
PRUNE_EVERY_SECONDS = 60.0
# sync="always": how long an allow waits for its record to be written before it is denied.
SYNC_WAIT_SECONDS = 10.0
ArgumentMode = Literal["hash", "raw", "redacted"]
SyncMode = Literal["batch", "always"]

# The hash chains (see the module docstring).
GENESIS = "0" * 64  # the prev of a chain's first record
CHAIN_KEYS = frozenset({"seq", "prev", "hash"})
# Room kept in every JSONL line for the chain: ',"seq":<digits>,"prev":"<64>","hash":"<64>"'.
CHAIN_BYTES = 192
_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}\Z')
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
TAIL_BLOCK = 64 * 1024

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
    "action",
    "rule",
    "reason",
    "policy_revision",
    "approval_id",
    "call_decision_id",
    "arguments_sha256",
    "result_sha256",
    "size_bytes",
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
    record TEXT NOT NULL,
    prev TEXT,
    hash TEXT
);
CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts);
CREATE INDEX IF NOT EXISTS decisions_session ON decisions (session_id, seq);
CREATE INDEX IF NOT EXISTS decisions_agent ON decisions (agent_id, seq);
CREATE INDEX IF NOT EXISTS decisions_tool ON decisions (tool, seq);
CREATE INDEX IF NOT EXISTS decisions_verdict ON decisions (verdict, seq);
CREATE TABLE IF NOT EXISTS anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    removed INTEGER NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
# The anchor: the seq and hash of the last record removed (the first kept one's prev);
# `removed` counts them, `reason` says why the anchor last moved: "start" (a new chain),
# "unchained" (rows written before the chain, up to seq), "retention" or "size".
INSERT = (
    "INSERT OR IGNORE INTO decisions (seq, decision_id, ts, session_id, agent_id, "
    "user_id, server, tool, verdict, rule, record, prev, hash) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
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
    sync: SyncMode = "batch"  # "always": an allow waits until its record is on disk
    input: bool = False  # keep each decision's exact policy input (and the policy's answer)


# A decision waiting for its record to be written (sync="always"): its event loop, and
# the future the writer settles (None: written; else why not).
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[str | None]"]
_Entry = tuple[dict[str, Any], _Waiter | None]


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


def line(record: dict[str, Any] | list[Any]) -> str:
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


def _call_fields(request: CallRequest, call: ToolCall) -> dict[str, Any]:
    """Who called what, as a decision record (a call's or a result's) names it: the
    principal's ids, server, tool and the hash of the arguments (never the arguments)."""
    principal = request.principal
    return {
        "principal": {
            "agent_id": principal.agent_id,
            "session_id": principal.session_id,
            "user_id": principal.user_id,
        },
        "server": call.server,
        "tool": call.name,
        "arguments_sha256": arguments_sha256(call.arguments),
    }


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
    unreadable: bool = False  # the record could not be read: `record` is a stub naming why


def prepare(record: dict[str, Any], *, max_argument_bytes: int) -> Prepared:
    """`record` made safe to write (bounded, sanitised: see the module docstring)."""
    bounder = _Bounder()
    if not isinstance(record, dict):
        record = {"event": "unknown", "value": record}
    # The chain's fields are the writer's to set: a record's own are left out.
    rest = {k: v for k, v in record.items() if k not in _EXACT_FIELDS and k not in CHAIN_KEYS}
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
    if "input" in record:  # exact: sanitised only, never cut
        out["input"] = bounder.tree(record["input"], "input", NAME_MAX, 0, False)
    if bounder.truncated:
        out["truncated"] = bounder.truncated
    if bounder.sanitised:
        out["sanitised"] = True
    text = line(out)
    if "input" in out and len(text) > RECORD_MAX_BYTES - CHAIN_BYTES:
        # The input goes first: the rest of the record is what the audit needs.
        kept = line(out.pop("input"))
        out["truncated"] = {
            **out.get("truncated", {}),
            "input": {
                "bytes": len(kept),
                "sha256": hashlib.sha256(kept.encode("ascii")).hexdigest(),
            },
        }
        text = line(out)
    if len(text) > RECORD_MAX_BYTES - CHAIN_BYTES:  # room for the chain's fields
        out = _identity(out, text)
        text = line(out)
    return Prepared(out, text, bounder.sanitised, bool(bounder.truncated))


# Fields of a record kept exactly (not cut field by field; see the module docstring).
_EXACT_FIELDS = frozenset({"arguments", "input"})


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
    # Not reachable with the bounds above; a floor.
    if len(line(kept)) > RECORD_MAX_BYTES - CHAIN_BYTES:
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


# The hash chains (see the module docstring): what the writer and `mcp-policy log verify`
# (engine/state/audit.py) share.


def chain_line(text: str, seq: int, prev: str) -> tuple[str, str]:
    """The JSONL line of the record `text` (a prepared line: a JSON object) as link `seq`
    of the chain after `prev`, and the link's hash."""
    fields = f'"seq":{seq},"prev":"{prev}"'
    body = f"{text[:-1]}{',' if text != '{}' else ''}{fields}}}"
    digest = hashlib.sha256(body.encode("ascii")).hexdigest()
    return f'{body[:-1]},"hash":"{digest}"}}', digest


@dataclass(frozen=True)
class Link:
    """A JSONL line read back as a link of its chain."""

    seq: int
    prev: str
    hash: str
    record: dict[str, Any]


def read_link(text: bytes) -> Link | str:
    """A JSONL line (without its newline) as a link, or why it is not one: "unchained" (a
    JSON object without chain fields: written before the chain) or "changed" (anything
    else, a line whose text does not match its hash among them)."""
    found = _HASH_SUFFIX.search(text)
    if found is None:
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            return "changed"
        if isinstance(record, dict) and not CHAIN_KEYS & record.keys():
            return "unchained"
        return "changed"
    body = text[: found.start()] + b"}"
    digest = found.group(1).decode("ascii")
    if hashlib.sha256(body).hexdigest() != digest:
        return "changed"
    try:
        record = json.loads(body)
    except (ValueError, RecursionError):
        return "changed"
    if not isinstance(record, dict):
        return "changed"
    seq, prev = record.get("seq"), record.get("prev")
    if type(seq) is not int or seq < 1 or not isinstance(prev, str) or not _HEX64.match(prev):
        return "changed"
    return Link(seq, prev, digest, record)


def row_hash(prev: str, row: Sequence[Any]) -> str:
    """The hash of a SQLite row: over `prev` and its columns but seq (a Row, in order)."""
    return hashlib.sha256(f"{prev}\n{line(list(row))}".encode("ascii")).hexdigest()


def rotated_files(path: Path) -> list[tuple[int, Path]]:
    """The rotated files of the JSONL log `path` (`path.1`, `path.2`, ...), by number."""
    prefix = path.name + "."
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            number = entry.name[len(prefix) :]
            if (
                entry.name.startswith(prefix)
                and number.isascii()
                and number.isdigit()
                and not number.startswith("0")
            ):
                found.append((int(number), path.parent / entry.name))
    return sorted(found)


def anchor_path(path: Path) -> Path:
    """Where the JSONL log `path` keeps its anchor: `<stem>.anchor.json` beside it (which
    `<name>*` never matches)."""
    return path.with_name(f"{path.stem}.anchor.json")


@dataclass(frozen=True)
class Anchor:
    """Where a chain starts: the seq and hash of the last record removed (0 and GENESIS:
    nothing removed), and what else the anchor says (why, when, which file)."""

    seq: int
    hash: str
    detail: dict[str, Any]


def read_anchor(path: Path) -> Anchor | None:
    """The JSONL log's anchor file; None when there is none. ValueError: not an anchor."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    doc = json.loads(text)
    seq = doc.get("seq") if isinstance(doc, dict) else None
    digest = doc.get("hash") if isinstance(doc, dict) else None
    if type(seq) is not int or seq < 0 or not isinstance(digest, str) or not _HEX64.match(digest):
        raise ValueError(f"{path}: not an anchor (an object with seq and hash)")
    return Anchor(seq, digest, doc)


# A longer line is none of the writer's (RECORD_MAX_BYTES at most): read no more of it.
LINE_MAX = RECORD_MAX_BYTES + 1024


def _newline_before(f: io.BufferedReader, end: int) -> int:
    """The offset of the last newline before `end` in `f`; -1 when there is none."""
    pos = end
    while pos > 0:
        step = min(pos, TAIL_BLOCK)
        pos -= step
        f.seek(pos)
        found = f.read(step).rfind(b"\n")
        if found != -1:
            return pos + found
    return -1


def tail(path: Path) -> tuple[bytes | None, int, int]:
    """The last whole line of a file (without its newline; None when it has none), where
    what follows it starts (a line cut short when that is before the size), and the size."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        last = _newline_before(f, size)
        if last == -1:
            return None, 0, size
        start = _newline_before(f, last) + 1
        f.seek(start)
        return f.read(min(last - start, LINE_MAX)), last + 1, size


def _newest_time(path: Path) -> float | None:
    """The time of a JSONL file's last record (epoch seconds); None when unknown."""
    last, _, _ = tail(path)
    if last is None:
        return None
    try:
        record = json.loads(last)
        return _epoch(record["time"])
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None


def _sync_directory(directory: Path) -> None:
    """Make the creation, renaming or removal of a file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class _JsonlFile:
    """The JSONL log: appends chained lines, rotates by size (the oldest backup dropped
    with its last hash anchored), deletes rotated files past the retention. A write that
    fails raises, to the writer, which counts and reports it; the chain's head moves only
    with a line written whole."""

    def __init__(self, path: Path, settings: LogSettings, warn: _Warnings) -> None:
        self.path = path
        self.anchor = anchor_path(path)
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.retention = settings.retention_days * 86400
        self._warn = warn
        self.stream: io.FileIO | None = None
        self.size = 0
        self.seq = 0  # the chain's head: the last line written
        self.head = GENESIS

    def open(self) -> dict[str, Any] | None:
        """Open for appending where the chain left off. Returns the note of a line cut by a
        crash that was removed (a record to log), if there was one."""
        cut = self._mend()
        self.seq, self.head = self._head()
        self._open_stream()
        self.prune_expired()
        return cut

    def _mend(self) -> dict[str, Any] | None:
        """Remove what follows the file's last newline (a write a crash cut short): the
        file then ends with a whole line, so the chain goes on from it. A whole record
        that lacks only its newline gets it."""
        if not self.path.is_file():
            return None
        _, start, size = tail(self.path)
        if start == size:
            return None
        with open(self.path, "rb+") as f:
            f.seek(start)
            if size - start <= LINE_MAX and isinstance(read_link(f.read()), Link):
                f.seek(size)
                f.write(b"\n")
                return None
            digest = hashlib.sha256()
            f.seek(start)
            while block := f.read(TAIL_BLOCK):
                digest.update(block)
            f.truncate(start)
        return {
            "event": "cut_line_removed",
            "file": self.path.name,
            "bytes": size - start,
            "sha256": digest.hexdigest(),
        }

    def _head(self) -> tuple[int, str]:
        """The seq and hash of the last line written: the newest file's last line, or the
        anchor's when no file holds a line (or the newest line has no chain: a new chain)."""
        for path in [self.path, *(p for _, p in rotated_files(self.path))]:
            if not path.is_file():
                continue
            last, _, _ = tail(path)
            if last is None:
                continue
            link = read_link(last)
            if isinstance(link, Link):
                return link.seq, link.hash
            break
        try:
            anchor = read_anchor(self.anchor)
        except ValueError:
            anchor = None
        return (anchor.seq, anchor.hash) if anchor else (0, GENESIS)

    def _open_stream(self) -> None:
        created = not self.path.exists()
        self.stream = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open
        self.size = os.fstat(self.stream.fileno()).st_size
        if created:
            _sync_directory(self.path.parent)

    def append(self, text: str) -> str:
        """Write the record `text` as the chain's next line (rotating first when the file
        would grow past max_bytes); the line written."""
        if self.stream is None:
            self._open_stream()
        full, digest = chain_line(text, self.seq + 1, self.head)
        data = full.encode("ascii") + b"\n"
        if self.size > 0 and self.size + len(data) > self.max_bytes:
            self._rotate()
        stream = self.stream
        assert stream is not None
        view = memoryview(data)
        while view:
            written = stream.write(view)
            if not written:
                raise OSError("the decision log file took no bytes")
            view = view[written:]
        self.size += len(data)
        self.seq, self.head = self.seq + 1, digest
        return full

    def sync(self) -> None:
        """Make what was written durable (fsync)."""
        if self.stream is not None:
            os.fsync(self.stream.fileno())

    def _rotate(self) -> None:
        """Rotate; one that fails is reported and the file written on past max_bytes
        (records are not dropped for it)."""
        try:
            self._close_stream(sync=True)
            if self.backups == 0:
                self._drop(self.path, "rotation")
            else:
                for number, path in reversed(rotated_files(self.path)):
                    if number >= self.backups:
                        self._drop(path, "rotation")
                for number in range(self.backups - 1, 0, -1):
                    older = Path(f"{self.path}.{number}")
                    if older.exists():
                        os.replace(older, f"{self.path}.{number + 1}")
                os.replace(self.path, f"{self.path}.1")
            _sync_directory(self.path.parent)
            self._open_stream()
            self.prune_expired()
        except OSError as exc:
            self._warn("rotate", "decision log %s: rotation failed: %s", self.path, describe(exc))
        if self.stream is None:
            self._open_stream()

    def prune_expired(self) -> None:
        """Delete rotated files whose newest record is older than the retention, oldest
        first (anchoring each), and stop at the first that is not."""
        cutoff = time.time() - self.retention
        dropped = False
        for _, path in reversed(rotated_files(self.path)):
            newest = _newest_time(path)
            if newest is None or newest >= cutoff:
                break
            self._drop(path, "retention")
            dropped = True
        if dropped:
            _sync_directory(self.path.parent)

    def _drop(self, path: Path, reason: str) -> None:
        """Delete one file, its last record's seq and hash anchored first."""
        last, _, _ = tail(path)
        link = read_link(last) if last is not None else None
        if isinstance(link, Link):
            self._set_anchor(link, path.name, reason)
        path.unlink()

    def _set_anchor(self, link: Link, file: str, reason: str) -> None:
        try:
            current = read_anchor(self.anchor)
        except ValueError:
            current = None
        if current is not None and current.seq >= link.seq:
            return
        doc = {
            "seq": link.seq,
            "hash": link.hash,
            "time": link.record.get("time"),
            "file": file,
            "reason": reason,
            "at": now_iso(),
        }
        temporary = self.anchor.with_name(self.anchor.name + ".tmp")
        with open(temporary, "wb") as f:
            f.write(line(doc).encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.anchor)
        _sync_directory(self.anchor.parent)

    def reopen(self) -> None:
        """Drop the stream after a failed write; the next write opens the file again. A
        part of a line the failed write left is removed (the line is written again)."""
        self._close_stream(sync=False)
        with contextlib.suppress(OSError):
            _, start, size = tail(self.path)
            if start < size:
                os.truncate(self.path, start)

    def _close_stream(self, *, sync: bool) -> None:
        stream, self.stream = self.stream, None
        if stream is None:
            return
        try:
            if sync and not stream.closed:
                os.fsync(stream.fileno())
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    def close(self) -> None:
        self._close_stream(sync=True)


class DecisionLog:
    def __init__(self, settings: LogSettings) -> None:
        self.settings = settings
        self._redact = frozenset(settings.redact)
        # Records, each with the decision waiting for it to be written (sync="always");
        # None: the writer stops.
        self._queue: queue.Queue[_Entry | None] = queue.Queue()
        self._stream: TextIO | None = None
        self._file: _JsonlFile | None = None
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decision-log-read")
        self._writer: threading.Thread | None = None
        self._next_prune = 0.0  # when the writer next looks for JSONL files to delete
        self._waiting: list[bool] = []  # the writer's batch: which records a decision awaits
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
        """Open the sinks (raises StateUnavailable naming a file that cannot be used),
        each chain continuing where it left off."""
        target = self.settings.jsonl
        if target == "-":
            self._stream = sys.stderr
        elif target != "off":
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = _JsonlFile(path, self.settings, self._warn)
            cut = self._file.open()
            if cut is not None:
                log.warning(
                    "decision log %s: removed a last line cut short (%d bytes; a crash during "
                    "a write): recorded in the next record",
                    path,
                    cut["bytes"],
                )
                self._queue.put(({**cut, "time": now_iso()}, None))
        if self.settings.database is not None:
            try:
                self._db = self._connect(self.settings.database, sync=self.settings.sync)
                self._db.executescript(SCHEMA)
                _migrate(self._db)
                self._reader = self._connect(self.settings.database)
            except sqlite3.Error as exc:
                raise StateUnavailable(f"decision log {self.settings.database}: {exc}") from exc
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        if self.enabled:
            self._writer = threading.Thread(target=self._drain, name="decision-log", daemon=True)
            self._writer.start()

    @staticmethod
    def _connect(path: Path, *, sync: SyncMode = "batch") -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit returns once the WAL is on disk (sync="always").
        db.execute(f"PRAGMA synchronous={'FULL' if sync == 'always' else 'NORMAL'}")
        return db

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._file is not None:
            with contextlib.suppress(OSError):
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
        self._queue.put((record, None))

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
        bundles: dict[str, str] | None = None,
        input_doc: dict[str, Any] | None = None,
        result: PolicyResult | None = None,
    ) -> Coroutine[Any, Any, None] | None:
        """Log a decision. With `flood_key` (a refusal its caller can repeat at no cost:
        the key is its agent, "" for none) at most `too_many_pending_per_second` such
        records per key are written each second; the rest go into a summary record.

        With sync="always", an allow (not a dry run) returns what to await before the
        allow may be given: it returns once the record is written to every sink, and
        raises StateUnavailable saying why when it was not (or not within
        SYNC_WAIT_SECONDS). Otherwise None: the record is written shortly.

        With `LogSettings.input`, the record keeps `input_doc` (the policy's input, its
        arguments as the argument setting says) and what the policy answered (`result`:
        none when it gave no answer)."""
        if not self.enabled:
            return None
        if flood_key is not None and not self._decision_flood.admit(
            flood_key, time, {"agents": flood_key or NO_AGENT, "rules": decision.rule}
        ):
            return None
        record: dict[str, Any] = {
            "event": "decision",
            "decision_id": decision.decision_id,
            "time": time,
            "transport": transport,
            **_call_fields(request, call),
            "verdict": decision.verdict.value,
            "rule": decision.rule,
            "reason": decision.reason,
            "matched": matched,
            "policy_revision": decision.policy_revision,
            "approval_id": decision.approval.id if decision.approval else None,
            "latency_ms": round(latency_ms, 3),
        }
        if bundles:
            record["bundles"] = bundles  # which bundles (name: revision) made the revision
        if self.settings.arguments == "raw":
            record["arguments"] = call.arguments
        elif self.settings.arguments == "redacted":
            record["arguments"] = redact(call.arguments, self._redact)
        if self.settings.input and input_doc is not None:
            record.update(self._input_fields(input_doc, record["arguments_sha256"], result))
        if shadow:
            record["shadow"] = shadow
        if dry_run:
            record["dry_run"] = True
        if self.settings.sync != "always" or decision.verdict is not Verdict.ALLOW or dry_run:
            self._queue.put((record, None))
            return None
        loop = asyncio.get_running_loop()
        written: asyncio.Future[str | None] = loop.create_future()
        self._queue.put((record, (loop, written)))
        return _until_written(written)

    def result_decision(
        self,
        decision: ResultDecision,
        request: CallRequest,
        call: ToolCall,
        *,
        call_decision_id: str | None,
        time: str,
        transport: str,
        latency_ms: float,
        result_sha256: str,
        size_bytes: int,
        bundles: dict[str, str] | None = None,
        input_doc: dict[str, Any] | None = None,
    ) -> Coroutine[Any, Any, None] | None:
        """Log a decision on a tool's result: event `result_decision`, with the call's ids
        (`call_decision_id` as the caller gave it), principal, server, tool and argument
        hash as a call's record has them, the action, rule, reason, matched and shadow
        rules, each redaction (rule, path or pattern, how many values it replaced), and
        the result's SHA-256 and size (of its compact JSON). Never the result nor any
        value of it: with `LogSettings.input`, `input` is the policy's input without
        `result` (its arguments as the argument setting says). JSONL only, like the
        log's other events: the SQLite copy (GET /v1/decisions, ListDecisions, status)
        holds call decisions.

        With sync="always", a result handed on (pass or redact, not a dry run) returns
        what to await before it may be: as `decision` does for an allow."""
        if not self.enabled:
            return None
        record: dict[str, Any] = {
            "event": "result_decision",
            "decision_id": decision.decision_id,
            "call_decision_id": call_decision_id,
            "time": time,
            "transport": transport,
            **_call_fields(request, call),
            "action": decision.action.value,
            "rule": decision.rule,
            "reason": decision.reason,
            "matched": decision.matched,
            "redactions": [r.model_dump(exclude_none=True) for r in decision.redactions],
            "result_sha256": result_sha256,
            "size_bytes": size_bytes,
            "policy_revision": decision.policy_revision,
            "latency_ms": round(latency_ms, 3),
        }
        if bundles:
            record["bundles"] = bundles
        if decision.shadow:
            record["shadow"] = [spec.model_dump() for spec in decision.shadow]
        if decision.dry_run:
            record["dry_run"] = True
        if self.settings.input and input_doc is not None:
            fields = self._input_fields(
                {k: v for k, v in input_doc.items() if k != "result"},
                record["arguments_sha256"],
                None,
            )
            fields["policy"] = {"action": decision.action.value, "rule": decision.rule}
            record.update(fields)
        forwarded = decision.action is not ResultAction.BLOCK
        if self.settings.sync != "always" or not forwarded or decision.dry_run:
            self._queue.put((record, None))
            return None
        loop = asyncio.get_running_loop()
        written: asyncio.Future[str | None] = loop.create_future()
        self._queue.put((record, (loop, written)))
        return _until_written(written)

    def _input_fields(
        self, input_doc: dict[str, Any], digest: str, result: PolicyResult | None
    ) -> dict[str, Any]:
        """The record's `input` (its arguments as the argument setting says), how they
        were kept, and what the policy answered."""
        mode = self.settings.arguments
        tool = input_doc.get("tool")
        tool = dict(tool) if isinstance(tool, dict) else {}
        arguments = tool.get("arguments")
        if mode == "hash":
            tool["arguments"] = digest
        elif mode == "redacted":
            tool["arguments"] = redact(arguments, self._redact)
        fields: dict[str, Any] = {"input": {**input_doc, "tool": tool}, "input_arguments": mode}
        if result is not None:
            answer = result.model_dump(
                mode="json", include={"action", "rule", "rate_limits", "approval"}
            )
            fields["policy"] = {k: v for k, v in answer.items() if v is not None}
        return fields

    # The writer thread: it never stops on an error (each is counted, shown, logged).

    def _drain(self) -> None:
        stopping = False
        while not stopping:
            batch = self._next_batch()
            stopping = any(entry is None for entry in batch)
            entries = [entry for entry in batch if entry is not None]
            records = [record for record, _ in entries]
            waiters = [waiter for _, waiter in entries]
            why: list[str | None] = []
            try:
                for flood in (self._flood, self._decision_flood):
                    summary = flood.summary(force=stopping)
                    if summary is not None:
                        records.append(summary)
                        waiters.append(None)
                self._prune_files()
                self._waiting = [w is not None for w in waiters]
                if records:
                    why = self._store(records) or []  # (none: as if none was written)
            except Exception as exc:  # noqa: BLE001 - not expected; the writer outlives it
                self.dropped += len(records)
                why = [f"not written: {describe(exc)}"] * len(records)
                self._warn(
                    "writer", "decision log: %d records lost: %s", len(records), describe(exc)
                )
            finally:
                _settle(waiters, why)
                for _ in batch:
                    self._queue.task_done()

    def _next_batch(self) -> list[_Entry | None]:
        try:
            first = self._queue.get(timeout=IDLE_WAKE_SECONDS)
        except queue.Empty:
            return []
        batch = [first]
        if first is not None and first[1] is None:
            # Let a few more records arrive: one wake-up and one transaction for many
            # decisions costs the event loop's thread far less than one per decision. (A
            # decision waiting to be written is not kept waiting for that: what arrives
            # while its batch is written goes into the next one.)
            time.sleep(BATCH_WAIT_SECONDS)
        while len(batch) < BATCH_MAX:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _prune_files(self) -> None:
        """Every PRUNE_EVERY_SECONDS: rotated JSONL files past the retention go."""
        if self._file is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        try:
            self._file.prune_expired()
        except Exception as exc:  # noqa: BLE001 - reported; the files are tried again later
            self._warn(
                "retention", "decision log: old files could not be deleted: %s", describe(exc)
            )

    def _store(self, records: list[dict[str, Any]]) -> list[str | None]:
        """Write the records to every sink; for each, None when every sink it goes to
        took it, else why not. A record a decision waits for (`_waiting`) that the JSONL
        file refused is not put into SQLite (its decision is denied, and that is logged)."""
        waiting = self._waiting + [False] * (len(records) - len(self._waiting))
        prepared = [self._prepare(r) for r in records]
        why: list[str | None] = [
            "the record could not be read" if p.unreadable else None for p in prepared
        ]
        lost = [False] * len(prepared)
        texts = [p.text for p in prepared]
        if self._stream is not None or self._file is not None:
            failed, texts = self._write_jsonl(texts)
            for i in failed:
                lost[i] = True
                why[i] = f"file: {self.sinks['jsonl'].last_error}"
        if self._db is not None:
            rows: list[tuple[int, Row]] = []
            for i, p in enumerate(prepared):
                if p.record.get("event") != "decision" or (waiting[i] and lost[i]):
                    continue
                try:
                    rows.append((i, _row(p.record, texts[i])))
                except Exception as exc:  # noqa: BLE001 - not expected: _row takes anything
                    lost[i] = True
                    why[i] = f"database: {describe(exc)}"
                    self._warn("row", "decision log database: record not stored: %s", describe(exc))
            if rows:
                for i in self._write_db(rows):
                    lost[i] = True
                    why[i] = why[i] or f"database: {self.sinks['database'].last_error}"
        dropped = sum(lost)
        self.dropped += dropped
        self.written += len(lost) - dropped
        return why

    def _prepare(self, record: dict[str, Any]) -> Prepared:
        try:
            prepared = prepare(record, max_argument_bytes=self.settings.max_argument_bytes)
        except Exception as exc:  # noqa: BLE001 - a record we cannot read still leaves a trace
            self._warn("unreadable", "decision log: a record could not be read: %s", describe(exc))
            stub = {"event": "unreadable_record", "time": now_iso(), "error": describe(exc)}
            prepared = Prepared(stub, line(stub), sanitised=True, truncated=False, unreadable=True)
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

    def _write_jsonl(self, texts: list[str]) -> tuple[set[int], list[str]]:
        """Write the records; the indexes of those that could not be written, and each
        record's line as written (chained, to the file)."""
        failed: set[int] = set()
        error: Exception | None = None
        lines = list(texts)
        if self._stream is not None:
            try:
                self._stream.write("".join(text + "\n" for text in texts))
                self._stream.flush()
            except Exception as exc:  # noqa: BLE001 - reported below
                failed, error = set(range(len(texts))), exc
        elif self._file is not None:
            for i, text in enumerate(texts):
                try:
                    lines[i] = self._file.append(text)
                except Exception as exc:  # noqa: BLE001 - once more on a fresh file handle
                    error = exc
                    self._file.reopen()
                    try:
                        lines[i] = self._file.append(text)
                    except Exception as again:  # noqa: BLE001 - reported below
                        error = again
                        failed.add(i)
                        self._file.reopen()
            if self.settings.sync == "always" and len(failed) < len(texts):
                try:
                    self._file.sync()
                except Exception as exc:  # noqa: BLE001 - not known to be on disk: lost
                    failed, error = set(range(len(texts))), exc
                    self._file.reopen()
        self._report("jsonl", error, recovered=not failed)
        return failed, lines

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
        """Insert the rows as the next links of the chain, in one transaction that holds
        the write lock from its start (the head it reads is still the head when it
        commits, whoever else writes this database)."""
        db = self._db
        assert db is not None
        if db.in_transaction:  # never left open, but a stuck one must not block every batch
            db.execute("ROLLBACK")
        db.execute("BEGIN IMMEDIATE")
        seq, prev = _db_head(db)
        for row in rows:
            digest = row_hash(prev, row)
            if db.execute(INSERT, (seq + 1, *row, prev, digest)).rowcount == 1:
                seq, prev = seq + 1, digest  # (a decision id already stored is no link)
        if prune:
            self._prune(db)
        db.execute("COMMIT")

    def _prune(self, db: sqlite3.Connection) -> None:
        """Delete the records past the retention, from the oldest end only: up to the
        first (by seq) that is not (a record is kept until all before it are past it)."""
        cutoff = time.time() - self.settings.retention_days * 86400
        oldest = db.execute("SELECT ts FROM decisions ORDER BY seq LIMIT 1").fetchone()
        if oldest is not None and oldest[0] < cutoff:
            # In seq order from the oldest (no index: the scan stops at the first kept).
            kept = db.execute(
                "SELECT seq FROM decisions NOT INDEXED WHERE ts >= ? ORDER BY seq LIMIT 1",
                (cutoff,),
            ).fetchone()
            if kept is None:
                kept = db.execute("SELECT MAX(seq) + 1 FROM decisions").fetchone()
            _remove_before(db, kept[0], "retention")
        self._cap_size(db)

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
        deleted = _remove_before(db, below, "size")
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


async def _until_written(written: asyncio.Future[str | None]) -> None:
    """Return once the writer wrote the record; StateUnavailable saying why it did not."""
    try:
        why = await asyncio.wait_for(asyncio.shield(written), SYNC_WAIT_SECONDS)
    except TimeoutError:
        raise StateUnavailable(
            f"the record was not written within {SYNC_WAIT_SECONDS:g} s"
        ) from None
    if why is not None:
        raise StateUnavailable(why)


def _settle(waiters: list[_Waiter | None], why: list[str | None]) -> None:
    """Tell the decisions waiting for a batch's records how their writes went (None:
    written; else why not): one wake-up per event loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[str | None], str | None]]]
    by_loop = {}
    for i, waiter in enumerate(waiters):
        if waiter is not None:
            loop, written = waiter
            reason = why[i] if i < len(why) else "not written"
            by_loop.setdefault(loop, []).append((written, reason))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve, settled)


def _resolve(settled: list[tuple[asyncio.Future[str | None], str | None]]) -> None:
    for written, why in settled:
        if not written.done():  # (one that gave up waiting is cancelled)
            written.set_result(why)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database written before the chain up to it: the chain's columns, and an
    anchor after the rows it holds (which verify as unchained). A database whose rows are
    chained but whose anchor is gone is left so (verify reports it). Replicas opening one
    database at once do this one at a time."""
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(decisions)")}
        for name in ("prev", "hash"):
            if name not in columns:
                db.execute(f"ALTER TABLE decisions ADD COLUMN {name} TEXT")
        if (
            db.execute("SELECT 1 FROM anchor WHERE id = 1").fetchone() is None
            and db.execute("SELECT 1 FROM decisions WHERE hash IS NOT NULL LIMIT 1").fetchone()
            is None
        ):
            (last,) = db.execute("SELECT MAX(seq) FROM decisions").fetchone()
            counter = db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'decisions'"
            ).fetchone()
            db.execute(
                "INSERT INTO anchor (id, seq, hash, removed, at, reason) VALUES (1, ?, ?, 0, ?, ?)",
                (
                    max(last or 0, counter[0] if counter else 0),
                    GENESIS,
                    time.time(),
                    "start" if last is None else "unchained",
                ),
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _db_head(db: sqlite3.Connection) -> tuple[int, str]:
    """The seq and hash of the chain's last link: the last row, or the anchor when no
    row is after it."""
    last = db.execute("SELECT seq, hash FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
    anchor = db.execute("SELECT seq, hash FROM anchor WHERE id = 1").fetchone()
    start: tuple[int, str] = (anchor[0], anchor[1]) if anchor else (0, GENESIS)
    if last is None or last[0] <= start[0]:
        return start
    return last[0], last[1] if last[1] is not None else GENESIS


def _remove_before(db: sqlite3.Connection, below: int, reason: str) -> int:
    """Delete the records before seq `below`, the last of them becoming the anchor (in
    the caller's transaction); how many were deleted."""
    last = db.execute(
        "SELECT seq, hash FROM decisions WHERE seq < ? ORDER BY seq DESC LIMIT 1", (below,)
    ).fetchone()
    if last is None:
        return 0
    deleted: int = db.execute("DELETE FROM decisions WHERE seq < ?", (below,)).rowcount
    if last[1] is None:  # rows from before the chain: the anchor is already after them
        db.execute("UPDATE anchor SET removed = removed + ? WHERE id = 1", (deleted,))
    else:
        db.execute(
            "INSERT INTO anchor (id, seq, hash, removed, at, reason) VALUES (1, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
            "removed = anchor.removed + excluded.removed, at = excluded.at, "
            "reason = excluded.reason WHERE excluded.seq > anchor.seq",
            (last[0], last[1], deleted, time.time(), reason),
        )
    return deleted


_DENIED = "IN ('deny', 'rate_limited')"


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
