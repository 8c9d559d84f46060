"""`mcp-policy replay`: what a candidate policy would have decided for logged calls.

Every logged decision that kept its policy input (`MCP_POLICY_DECISION_LOG_INPUT=true`)
is evaluated again, in this process, with the candidate policy (`OfflinePolicy`: the
directories checked and compiled as `serve` loads them), and the policy's answer then
(the `policy` a record keeps beside its input: action, rule, rate limits) is compared with
its answer now. Counters and approvals are the service's and play no part: a call that
was rate limited because its counter was full is compared as the policy's `rate_limit`.

What a change is: the action changed (`allow-to-deny`, `rate-limit-to-require-approval`,
...), else the deciding rule (`rule-changed`), else the limits, compared by rule, max,
window, scope and cost (`limits-changed`). The report counts each (old -> new) change
with the tools and rules it touched and example decision ids; `--fail-on` names the
changes a team does not want (exit 1 when any happened).

Where the decisions come from:

- `--log FILE`: the JSONL decision log, its rotated files (`FILE.N` ... `FILE.1`, oldest
  first) read before it, one line at a time. Each chained line must match its own hash
  (a line that does not was changed or forged: skipped, and counted); a line whose prev
  is not the hash of the line before is counted as a break in the chain, and a record
  without chain fields after the chain started (inserted) is skipped (`mcp-policy log
  verify` says more). The same option reads OPA-format decision logs, the events the
  fleet uploads (`input`, and `result.policy`, the policy's answer): one event per line,
  or JSON arrays of events (what an upload body holds), gzip-compressed or not.
- `--db FILE`: the SQLite copy, rows by seq (each checked against its hash).
- `--from-service URL`: a running service's GET /v1/decisions, page by page, with the
  operator token (MCP_POLICY_APPROVER_TOKEN).

Nothing read is trusted: a line that is not JSON, a record without input, one whose
arguments were logged only as their hash (they cannot be evaluated exactly), a record
the policy gave no answer to, a line longer than any the service writes: each is skipped
and counted by reason (with where the first few were), never a traceback.

Fast: the logged input is handed to OPA as JSON text (`evaluate_json`), files are
streamed, evaluations run on as many threads as there are CPUs (OPA's evaluator
releases the interpreter while it works), and Go's collector runs less often than by
default (GOGC=400 unless set). `python -m bench.replay` prints the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import gzip
import json
import os
import re
import sqlite3
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TextIO, cast

from engine.errors import EngineError, PolicyRejected, PolicyUnavailable
from engine.models import PolicyResult
from engine.policy.fleet import RESULT_DECISION_PATH
from engine.policy.opa_process import ToolMissing
from engine.policy.source import with_framework
from engine.state.decision_log import (
    LINE_MAX,
    Link,
    read_link,
    rotated_files,
    row_hash,
)

EXIT_OK = 0
EXIT_CHANGED = 1  # a change named by --fail-on happened
EXIT_POLICY_REJECTED = 2  # the candidate policy has problems (and: no OPA library)
EXIT_INVALID = 3  # a bad argument
EXIT_UNAVAILABLE = 4  # the decisions cannot be read

ACTIONS = ("allow", "deny", "rate_limit", "require_approval")
# A change's name: the actions as words joined by "-" (rate_limit -> rate-limit).
CHANGE_WORDS = {action: action.replace("_", "-") for action in ACTIONS}
OTHER_CHANGES = ("rule-changed", "limits-changed")
# What --fail-on takes besides <old>-to-<new>: any change at all, an evaluation that
# failed, a record that was skipped.
FAIL_ON_EXTRA = ("any", "error", "skipped")
EXAMPLES = 5  # decision ids kept per change, places per skip reason
NAMES_MAX = 1000  # tools and rules counted one by one per change; the rest as OTHERS
OTHERS = "(others)"
BATCH = 256  # logged decisions per evaluation task
VALUE_MAX = 64 * 1024 * 1024  # a JSON value of an OPA-format file larger than this: refused
READ_CHUNK = 1024 * 1024
PAGE = 1000  # decisions per page from a service (its maximum)
HTTP_TIMEOUT = 30.0
# Go's garbage collector for a replay (unless GOGC is set): a batch job trades some memory
# (about 200 MB for 100,000 decisions) for a quarter less CPU than at Go's default of 100.
REPLAY_GOGC = "400"
GZIP_MAGIC = b"\x1f\x8b"

HELP = "re-evaluate logged decisions with a candidate policy and report what would change"
DESCRIPTION = """\
Evaluate every logged decision that kept its policy input (MCP_POLICY_DECISION_LOG_INPUT=
true) with the candidate policy (--policy DIR, repeatable; checked as serve checks it),
and compare the policy's answer then with its answer now: the action, the deciding rule
and the rate limits (not counters or approvals). Prints the counts per change (old -> new
action), with the tools and rules each touched and example decision ids. --fail-on names
changes that fail the run (exit 1): <old>-to-<new> with actions allow, deny, rate-limit,
require-approval or any (e.g. allow-to-deny, any-to-allow), rule-changed, limits-changed,
any, error, skipped.

Exit status: 0 done, 1 a --fail-on change happened, 2 the policy was rejected (or OPA's
library is missing), 3 a bad argument, 4 the decisions could not be read.
"""


class ReplayError(EngineError):
    """The decisions cannot be read (a missing file, a database that is not a decision
    log, a service that refuses): one line for the user."""


class BadArgument(EngineError):
    """A command-line value that cannot be used."""


# --- one logged decision ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the policy answered, as replay compares it."""

    action: str
    rule: str
    limits: frozenset[tuple[str, float, float, str, float]]

    @classmethod
    def of(cls, result: PolicyResult) -> Answer:
        return cls(
            result.action,
            result.rule,
            frozenset(
                (lim.rule, float(lim.max), float(lim.window_seconds), lim.scope, float(lim.cost))
                for lim in result.rate_limits
            ),
        )


@dataclass(frozen=True)
class Logged:
    """A logged decision to replay: its input as JSON text and the answer it got."""

    decision_id: str
    where: str
    server: str
    tool: str
    old: Answer
    input_json: bytes
    redacted: bool = False


@dataclass(frozen=True)
class Skip:
    """A record that cannot be replayed, and why."""

    reason: str
    where: str


Item = Logged | Skip

NO_INPUT = (
    "the record holds no policy input (the service kept none: set "
    "MCP_POLICY_DECISION_LOG_INPUT=true)"
)
HASHED = (
    "its arguments were logged only as their SHA-256 (MCP_POLICY_DECISION_LOG_ARGUMENTS="
    "hash): it cannot be replayed exactly (set it to raw or redacted)"
)


class NoInput(EngineError):
    """A logged decision whose input cannot be evaluated (the message says why)."""


def text_of(value: Any, limit: int = 256) -> str:
    """A value from a record as bounded, printable text."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "\u2026"


def logged_input(record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The policy input a decision record (ours, or an OPA-format event) holds, and
    whether its arguments were redacted; NoInput saying why it holds none usable."""
    doc = record.get("input")
    if doc is None:
        truncated = record.get("truncated")
        if isinstance(truncated, dict) and isinstance(truncated.get("input"), dict):
            size = truncated["input"].get("bytes")
            raise NoInput(
                f"the input was not kept: at {text_of(size)} bytes it would have made the record "
                "larger than a decision log line may be"
            )
        raise NoInput(NO_INPUT)
    if not isinstance(doc, dict):
        raise NoInput("the record's input is not a JSON object")
    tool = doc.get("tool")
    mode = record.get("input_arguments")
    if mode == "hash" or (
        isinstance(tool, dict) and "arguments" not in tool and "arguments_sha256" in tool
    ):
        raise NoInput(HASHED)
    if mode not in (None, "raw", "redacted"):
        raise NoInput(f"the record's input_arguments {text_of(mode, 40)} is not one replay knows")
    return doc, mode == "redacted"


def _policy_answer(record: dict[str, Any]) -> Any:
    """The policy's answer a record keeps: ours under `policy`, an OPA-format event's
    under `result.policy`."""
    if "event" in record:
        return record.get("policy")
    result = record.get("result")
    return result.get("policy") if isinstance(result, dict) else None


def _record_item(record: Any, where: str) -> Item | None:
    """A parsed record as something to replay or skip; None for records that are not
    decisions (events of the log: they are not counted)."""
    if not isinstance(record, dict):
        return Skip("not a JSON object", where)
    event = record.get("event")
    if event is not None and event != "decision":
        return None
    if event is None and record.get("path") == RESULT_DECISION_PATH:
        return None  # a collector's event of a decision on a result: no call to replay
    if event is None and not ("input" in record or "result" in record):
        return Skip("neither a decision record nor an OPA decision-log event", where)
    decision_id = record.get("decision_id")
    if not isinstance(decision_id, str) or not decision_id:
        return Skip("the record has no decision_id", where)
    try:
        doc, redacted = logged_input(record)
    except NoInput as exc:
        return Skip(exc.message, where)
    answer = _policy_answer(record)
    truncated = record.get("truncated")
    if isinstance(truncated, dict) and any(str(k).startswith("policy.") for k in truncated):
        return Skip("the logged policy answer was cut to the record's bounds", where)
    if answer is None:
        rule = record.get("rule") if event else None
        said = f" (rule {text_of(rule, 80)})" if isinstance(rule, str) else ""
        return Skip(f"the policy gave this call no answer{said}: nothing to compare", where)
    try:
        old = Answer.of(PolicyResult.model_validate(answer))
    except ValueError:
        return Skip("the logged policy answer is malformed", where)
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, TypeError, RecursionError):
        return Skip("the record's input cannot be written as JSON", where)
    tool = doc.get("tool")
    if not isinstance(tool, dict):
        tool = {}
    return Logged(
        decision_id=text_of(decision_id),
        where=where,
        server=text_of(tool.get("server", "?")),
        tool=text_of(tool.get("name", "?")),
        old=old,
        input_json=text,
        redacted=redacted,
    )


# --- time filters ----------------------------------------------------------------------

_AGO = re.compile(r"([0-9]{1,9})([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, flag: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time with its timezone, or a duration ago (90m, 24h, 7d, 2w)."""
    text = value.strip()
    ago = _AGO.fullmatch(text)
    if ago is not None:
        now = now or datetime.now(UTC)
        return now - timedelta(seconds=int(ago[1]) * _UNIT[ago[2]])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise BadArgument(
            f"{flag} {text_of(value, 64)!r}: give an RFC 3339 time with its timezone "
            "(2026-01-05T09:00:00Z) or a duration ago (90m, 24h, 7d, 2w)"
        )
    return when.astimezone(UTC)


@dataclass(frozen=True)
class Window:
    since: datetime | None = None
    until: datetime | None = None

    def holds(self, stamp: Any) -> bool:
        """Whether a record's time is in the window (all are when there is none; a time
        that cannot be read is not when there is one)."""
        if self.since is None and self.until is None:
            return True
        if not isinstance(stamp, str):
            return False
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            return False
        if when.tzinfo is None:
            return False
        if self.since is not None and when < self.since:
            return False
        return self.until is None or when < self.until


def _record_time(record: Any) -> Any:
    if not isinstance(record, dict):
        return None
    return record.get("time") if "event" in record else record.get("timestamp")


# --- sources ---------------------------------------------------------------------------


@dataclass
class Chain:
    """How the JSONL hash chain looked while reading (replay only notes it)."""

    breaks: int = 0
    first_break: str | None = None
    unchained: int = 0
    last: str | None = None

    def link(self, link: Link, where: str) -> None:
        if self.last is not None and link.prev != self.last:
            self.breaks += 1
            if self.first_break is None:
                self.first_break = where
        self.last = link.hash


def bounded_lines(f: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
    """The lines of a file without their newline, each with whether it is within
    LINE_MAX (a longer line is not read into memory: only skipped)."""
    while True:
        text = f.readline(LINE_MAX + 1)
        if not text:
            return
        if text.endswith(b"\n"):
            yield text[:-1], True
            continue
        if len(text) <= LINE_MAX:
            yield text, True  # the last line, without a newline
            return
        while rest := f.readline(LINE_MAX):
            if rest.endswith(b"\n"):
                break
        yield b"", False


def _log_files(path: Path) -> list[Path]:
    """The JSONL log and its rotated files, oldest first; ReplayError when none exists."""
    files = [p for _, p in reversed(rotated_files(path))]
    if path.exists():
        files.append(path)
    if not files:
        raise ReplayError(f"{path}: no such file (nor rotated ones beside it)")
    for p in files:
        if p.is_dir():
            raise ReplayError(f"{p}: is a directory; give the decision log file")
    return files


def _open(path: Path) -> IO[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise ReplayError(f"{path}: {exc.strerror or exc}") from exc
    if f.peek(2)[:2] != GZIP_MAGIC:
        return f
    f.close()
    try:
        return cast(IO[bytes], gzip.open(path, "rb"))  # (owns its file: closed with it)
    except OSError as exc:
        raise ReplayError(f"{path}: {exc.strerror or exc}") from exc


def _first_byte(f: IO[bytes]) -> bytes:
    """The first byte that is not white space (without consuming anything)."""
    peek: Callable[[int], bytes] | None = getattr(f, "peek", None)
    head = peek(4096) if peek is not None else b""
    stripped = head.lstrip()
    return stripped[:1]


def read_log(path: Path, window: Window, chain: Chain) -> Iterator[Item]:
    """The decisions of a JSONL log (with its rotated files) or of an OPA-format file."""
    for file in _log_files(path):
        with contextlib.closing(_open(file)) as f:
            if isinstance(f, gzip.GzipFile) or _first_byte(f) == b"[":
                yield from _read_values(f, file, window)
            else:
                yield from _read_lines(f, file, window, chain)


def _read_lines(f: IO[bytes], file: Path, window: Window, chain: Chain) -> Iterator[Item]:
    for number, (text, fits) in enumerate(bounded_lines(f), 1):
        where = f"{file.name}:{number}"
        if not fits:
            yield Skip(f"a line longer than {LINE_MAX} bytes (none of the log's is)", where)
            continue
        if not text.strip():
            continue
        link = read_link(text)
        if isinstance(link, Link):
            chain.link(link, where)
            record: Any = link.record
        else:
            try:
                record = json.loads(text)
            except (ValueError, RecursionError):
                yield Skip("not JSON", where)
                continue
            # (an object without chain fields is "unchained": one with them is "changed")
            if link == "changed" and isinstance(record, dict):
                yield Skip(
                    "the line does not match its hash: changed or forged "
                    "(mcp-policy log verify says more)",
                    where,
                )
                continue
            if isinstance(record, dict) and "event" in record:
                if chain.last is not None:
                    yield Skip(
                        "a record without chain fields after the chain started: inserted "
                        "(mcp-policy log verify says more)",
                        where,
                    )
                    continue
                chain.unchained += 1
        if isinstance(record, list):  # an upload's events on one line
            for i, event in enumerate(record):
                if window.holds(_record_time(event)):
                    item = _record_item(event, f"{where}[{i}]")
                    if item is not None:
                        yield item
            continue
        if not window.holds(_record_time(record)):
            continue
        item = _record_item(record, where)
        if item is not None:
            yield item


def _read_values(f: IO[bytes], file: Path, window: Window) -> Iterator[Item]:
    """The events of an OPA-format file: JSON values one after another, each an event or
    an array of events (gzip-compressed or not), read a chunk at a time."""
    for index, value in enumerate(_json_values(f, file)):
        where = f"{file.name}#{index + 1}"
        events = value if isinstance(value, list) else [value]
        for i, event in enumerate(events):
            if window.holds(_record_time(event)):
                item = _record_item(event, f"{where}[{i}]" if isinstance(value, list) else where)
                if item is not None:
                    yield item


def _json_values(f: IO[bytes], file: Path) -> Iterator[Any]:
    """Top-level JSON values of a stream; the elements of a top-level array one by one
    (an array of events need not fit in memory; one event must, within VALUE_MAX)."""
    decoder = json.JSONDecoder()
    reader = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    at = 0
    ended = False
    in_array = False

    def fill() -> bool:
        nonlocal buffer, at, ended
        if ended:
            return False
        try:  # (growing with the buffer: a large value is parsed a few times, not n)
            chunk = f.read(max(READ_CHUNK, len(buffer) - at))
        except (OSError, EOFError, zlib.error) as exc:
            raise ReplayError(f"{file}: cannot be read: {exc}") from exc
        try:
            text = reader.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise ReplayError(f"{file}: not UTF-8 text") from exc
        buffer = buffer[at:] + text
        at = 0
        ended = not chunk
        if len(buffer) > VALUE_MAX:
            raise ReplayError(
                f"{file}: a JSON value larger than {VALUE_MAX // (1024 * 1024)} MiB: "
                "not a decision-log file replay reads"
            )
        return True

    def skip_space() -> bool:
        """Skip white space; False at the end of the stream."""
        nonlocal at
        while True:
            while at < len(buffer) and buffer[at] in " \t\r\n":
                at += 1
            if at < len(buffer):
                return True
            if not fill():
                return False

    while skip_space():
        if not in_array and buffer[at] == "[":
            at += 1
            in_array = True
            if skip_space() and buffer[at] == "]":
                at += 1
                in_array = False
            continue
        while True:
            try:
                value, end = decoder.raw_decode(buffer, at)
            except (ValueError, RecursionError) as exc:
                if fill():
                    continue
                raise ReplayError(f"{file}: not JSON ({exc})") from exc
            break
        at = end
        yield value
        if in_array:
            if not skip_space():
                raise ReplayError(f"{file}: an array that does not end")
            if buffer[at] == ",":
                at += 1
            elif buffer[at] == "]":
                at += 1
                in_array = False
            else:
                raise ReplayError(f"{file}: not JSON (expected , or ] between events)")
    if in_array:
        raise ReplayError(f"{file}: an array that does not end")


_DB_COLUMNS = (
    "seq, decision_id, ts, session_id, agent_id, user_id, server, tool, verdict, rule, "
    "record, prev, hash"
)


def read_database(path: Path, window: Window) -> Iterator[Item]:
    """The decisions of the SQLite copy, by seq, each row checked against its hash."""
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise ReplayError(f"{path}: {exc}") from exc
    try:
        where, params = [], []
        if window.since is not None:
            where.append("ts >= ?")
            params.append(window.since.timestamp())
        if window.until is not None:
            where.append("ts < ?")
            params.append(window.until.timestamp())
        sql = f"SELECT {_DB_COLUMNS} FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        try:
            rows = db.execute(sql + " ORDER BY seq", params)
        except sqlite3.Error as exc:
            raise ReplayError(f"{path}: not a decision log database ({exc})") from exc
        try:
            for seq, *columns, prev, digest in rows:
                place = f"seq {seq}"
                if digest is not None and (
                    not isinstance(prev, str) or row_hash(prev, columns) != digest
                ):
                    yield Skip(
                        "the row does not match its hash: changed or forged "
                        "(mcp-policy log verify says more)",
                        place,
                    )
                    continue
                try:
                    record = json.loads(columns[-1])
                except (ValueError, TypeError, RecursionError):
                    yield Skip("not JSON", place)
                    continue
                item = _record_item(record, place)
                if item is not None:
                    yield item
        except sqlite3.Error as exc:
            raise ReplayError(f"{path}: {exc}") from exc
    finally:
        db.close()


def read_service(url: str, token: str, window: Window) -> Iterator[Item]:
    """The decisions of a running service, page by page from GET /v1/decisions."""
    base = url.rstrip("/")
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BadArgument(f"--from-service {text_of(url, 80)!r}: give the service's http(s) URL")
    query: dict[str, str] = {"limit": str(PAGE)}
    if window.since is not None:
        query["since"] = window.since.isoformat()
    if window.until is not None:
        query["until"] = window.until.isoformat()
    page = 0
    while True:
        page += 1
        body = _get_json(f"{base}/v1/decisions?{urllib.parse.urlencode(query)}", token)
        records = body.get("decisions") if isinstance(body, dict) else None
        if not isinstance(records, list):
            raise ReplayError(f"{base}: GET /v1/decisions did not answer a page of decisions")
        for i, record in enumerate(records):
            item = _record_item(record, f"page {page} #{i + 1}")
            if item is not None:
                yield item
        cursor = body.get("next_cursor")
        if not isinstance(cursor, str) or not cursor:
            return
        query["cursor"] = cursor


def _get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:  # noqa: S310 - operator's URL
            return json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2048).decode("utf-8", "replace")
        raise ReplayError(f"the service answered {exc.code}: {text_of(detail, 300)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ReplayError(f"cannot reach the service: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise ReplayError("the service did not answer JSON") from exc


# --- the comparison --------------------------------------------------------------------


def change_of(old: Answer, new: Answer) -> str | None:
    """The name of the change from `old` to `new`; None when there is none."""
    if old.action != new.action:
        return f"{CHANGE_WORDS.get(old.action, old.action)}-to-{CHANGE_WORDS[new.action]}"
    if old.rule != new.rule:
        return "rule-changed"
    if old.limits != new.limits:
        return "limits-changed"
    return None


def fail_on(value: str) -> frozenset[str]:
    """The --fail-on names, checked: BadArgument naming one that is not known."""
    words = [*CHANGE_WORDS.values(), "any"]
    known = {f"{a}-to-{b}" for a in words for b in words if a != b or a == "any"}
    known |= {*OTHER_CHANGES, *FAIL_ON_EXTRA}
    names = {part.strip() for part in value.split(",") if part.strip()}
    if not names:
        raise BadArgument("--fail-on: name at least one change")
    for name in sorted(names):
        if name.replace("_", "-") not in known:
            raise BadArgument(
                f"--fail-on: unknown change {text_of(name, 64)!r}; use <old>-to-<new> with "
                f"{', '.join(words)} (e.g. allow-to-deny, any-to-allow), "
                f"{', '.join(OTHER_CHANGES)}, {', '.join(FAIL_ON_EXTRA)}"
            )
    return frozenset(name.replace("_", "-") for name in names)


def _matches(name: str, change: str) -> bool:
    """Whether the --fail-on `name` covers `change`."""
    if name in ("any", change):
        return True
    if "-to-" in name and "-to-" in change:
        old, new = name.split("-to-")
        was, now = change.split("-to-")
        return old in ("any", was) and new in ("any", now)
    return False


def _bump(counts: dict[str, int], key: str) -> None:
    if key not in counts and len(counts) >= NAMES_MAX:
        key = OTHERS
    counts[key] = counts.get(key, 0) + 1


@dataclass
class Change:
    name: str
    old: str  # action
    new: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    tools: dict[str, int] = field(default_factory=dict)
    rules: dict[str, int] = field(default_factory=dict)

    def add(self, item: Logged, new: Answer) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(item.decision_id)
        _bump(self.tools, f"{item.server}/{item.tool}")
        _bump(self.rules, f"{item.old.rule} -> {new.rule}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "change": self.name,
            "from": self.old,
            "to": self.new,
            "count": self.count,
            "examples": self.examples,
            "tools": dict(sorted(self.tools.items(), key=lambda kv: (-kv[1], kv[0]))),
            "rules": dict(sorted(self.rules.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


@dataclass
class Report:
    revision: str
    source: str
    read: int = 0
    replayed: int = 0
    unchanged: int = 0
    redacted: int = 0
    transitions: Counter[str] = field(default_factory=Counter)
    changes: dict[str, Change] = field(default_factory=dict)
    skipped: dict[str, list[Any]] = field(default_factory=dict)  # reason -> [count, places]
    errors: dict[str, list[Any]] = field(default_factory=dict)  # message -> [count, ids]
    chain: Chain = field(default_factory=Chain)
    seconds: float = 0.0
    failed_on: list[str] = field(default_factory=list)

    def skip(self, item: Skip) -> None:
        self.read += 1
        entry = self.skipped.setdefault(item.reason, [0, []])
        entry[0] += 1
        if len(entry[1]) < EXAMPLES:
            entry[1].append(item.where)

    def error(self, item: Logged, message: str) -> None:
        self.read += 1
        entry = self.errors.setdefault(text_of(message, 300), [0, []])
        entry[0] += 1
        if len(entry[1]) < EXAMPLES:
            entry[1].append(item.decision_id)

    def compare(self, item: Logged, new: Answer) -> None:
        self.read += 1
        self.replayed += 1
        self.redacted += item.redacted
        self.transitions[f"{item.old.action} -> {new.action}"] += 1
        name = change_of(item.old, new)
        if name is None:
            self.unchanged += 1
            return
        key = f"{name}:{item.old.action}:{new.action}"
        change = self.changes.get(key)
        if change is None:
            change = self.changes[key] = Change(name, item.old.action, new.action)
        change.add(item, new)

    def check(self, names: frozenset[str]) -> None:
        """Note which of the --fail-on `names` happened."""
        happened = {c.name for c in self.changes.values()}
        failed = []
        for name in sorted(names):
            if name == "error":
                hit = bool(self.errors)
            elif name == "skipped":
                hit = bool(self.skipped)
            else:
                hit = any(_matches(name, change) for change in happened)
            if hit:
                failed.append(name)
        self.failed_on = failed

    @property
    def changed(self) -> int:
        return sum(c.count for c in self.changes.values())

    def as_dict(self) -> dict[str, Any]:
        changes = sorted(self.changes.values(), key=lambda c: (-c.count, c.name))
        return {
            "policy_revision": self.revision,
            "source": self.source,
            "read": self.read,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "changed": self.changed,
            "redacted": self.redacted,
            "transitions": dict(sorted(self.transitions.items())),
            "changes": [c.as_dict() for c in changes],
            "skipped": [
                {"reason": reason, "count": n, "examples": places}
                for reason, (n, places) in sorted(self.skipped.items(), key=lambda kv: -kv[1][0])
            ],
            "errors": [
                {"error": message, "count": n, "examples": ids}
                for message, (n, ids) in sorted(self.errors.items(), key=lambda kv: -kv[1][0])
            ],
            "chain": {
                "breaks": self.chain.breaks,
                "first_break": self.chain.first_break,
                "unchained_records": self.chain.unchained,
            },
            "seconds": round(self.seconds, 3),
            "decisions_per_second": round(self.replayed / self.seconds) if self.seconds else None,
            "failed_on": self.failed_on,
        }


# --- replaying -------------------------------------------------------------------------


Evaluate = Callable[[bytes], PolicyResult]


def _evaluate_batch(evaluate: Evaluate, batch: list[Logged]) -> list[Answer | str]:
    """Each decision's new answer, or why it could not be had (on a worker thread)."""
    out: list[Answer | str] = []
    for item in batch:
        try:
            out.append(Answer.of(evaluate(item.input_json)))
        except PolicyUnavailable as exc:
            out.append(exc.message)
    return out


def replay(
    items: Iterable[Item],
    evaluate: Evaluate,
    report: Report,
    *,
    workers: int | None = None,
) -> Report:
    """Evaluate every logged decision of `items` with `evaluate`, into `report`."""
    started = time.perf_counter()
    workers = max(1, workers or os.cpu_count() or 1)
    pending: deque[tuple[list[Logged], Future[list[Answer | str]]]] = deque()

    def settle(limit: int) -> None:
        while len(pending) > limit:
            batch, future = pending.popleft()
            for item, answer in zip(batch, future.result(), strict=True):
                if isinstance(answer, str):
                    report.error(item, answer)
                else:
                    report.compare(item, answer)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="replay") as pool:
        batch: list[Logged] = []
        for item in items:
            if isinstance(item, Skip):
                report.skip(item)
                continue
            batch.append(item)
            if len(batch) >= BATCH:
                pending.append((batch, pool.submit(_evaluate_batch, evaluate, batch)))
                batch = []
                settle(workers * 2)
        if batch:
            pending.append((batch, pool.submit(_evaluate_batch, evaluate, batch)))
        settle(0)
    report.seconds = time.perf_counter() - started
    return report


# --- output ----------------------------------------------------------------------------

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe for a terminal: control and bidirectional characters as escapes."""
    if text.isascii() and text.isprintable():
        return text
    out = _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return "".join(ch if unicodedata.category(ch) != "Cs" else f"\\u{ord(ch):04x}" for ch in out)


def render(report: Report) -> str:
    d = report.as_dict()
    rate = f", {d['decisions_per_second']}/s" if d["decisions_per_second"] else ""
    lines = [
        f"replay of {printable(report.source)} against policy {report.revision}",
        f"  {d['read']} decisions read, {d['replayed']} replayed in {d['seconds']:.1f} s{rate}: "
        f"{d['unchanged']} unchanged, {d['changed']} changed",
    ]
    if report.redacted:
        lines.append(
            f"  {report.redacted} replayed with redacted arguments (rules that read those "
            "fields saw [redacted])"
        )
    if d["transitions"]:
        lines += ["", "policy action then -> now"]
        lines += [f"  {k:<40} {v:>8}" for k, v in d["transitions"].items()]
    lines += ["", "changes" if d["changes"] else "changes: none"]
    for change in d["changes"]:
        lines.append(
            f"  {change['change']} ({change['from']} -> {change['to']}): {change['count']}"
        )
        top = list(change["tools"].items())[:10]
        lines.append("    tools: " + ", ".join(f"{printable(t)} {n}" for t, n in top))
        rules = list(change["rules"].items())[:10]
        lines.append("    rules: " + ", ".join(f"{printable(r)} {n}" for r, n in rules))
        lines.append("    e.g. " + ", ".join(printable(x) for x in change["examples"]))
    if d["skipped"]:
        lines += ["", "skipped"]
        for entry in d["skipped"]:
            places = ", ".join(printable(p) for p in entry["examples"])
            lines.append(f"  {entry['count']:>8}  {printable(entry['reason'])} (at {places})")
    if d["errors"]:
        lines += ["", "could not be evaluated"]
        for entry in d["errors"]:
            ids = ", ".join(printable(x) for x in entry["examples"])
            lines.append(f"  {entry['count']:>8}  {printable(entry['error'])} (e.g. {ids})")
    chain = d["chain"]
    if chain["breaks"]:
        lines += [
            "",
            f"warning: the log's hash chain breaks {chain['breaks']} time(s), first at "
            f"{printable(chain['first_break'] or '?')}: run mcp-policy log verify",
        ]
    if report.read and not report.replayed and NO_INPUT in report.skipped:
        lines += [
            "",
            "no decision could be replayed: the log keeps no policy input; set "
            "MCP_POLICY_DECISION_LOG_INPUT=true on the service (and arguments raw or redacted)",
        ]
    if report.failed_on:
        lines += ["", f"FAILED: {', '.join(report.failed_on)} (--fail-on)"]
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--log",
        type=Path,
        help="the JSONL decision log (its rotated files beside it read too), or a file of "
        "OPA-format decision-log events (one per line, or arrays; gzip or not)",
    )
    source.add_argument("--db", type=Path, help="the decision log's SQLite copy")
    source.add_argument(
        "--from-service",
        metavar="URL",
        help="a running service's HTTP URL (GET /v1/decisions with MCP_POLICY_APPROVER_TOKEN)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        action="append",
        required=True,
        metavar="DIR",
        help="the candidate policy: a directory of Rego and YAML; repeat for several (as "
        "serve --policy)",
    )
    parser.add_argument("--since", help="only decisions at or after: RFC 3339, or ago (24h, 7d)")
    parser.add_argument("--until", help="only decisions before: RFC 3339, or ago (24h, 7d)")
    parser.add_argument(
        "--fail-on",
        help="exit 1 when any of these changes happened (comma-separated): allow-to-deny, "
        "deny-to-allow, any-to-allow, rule-changed, limits-changed, any, error, skipped, ...",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--workers", type=int, help="evaluation threads (default: the number of CPUs)"
    )


def _items(args: argparse.Namespace, window: Window, chain: Chain) -> tuple[Iterator[Item], str]:
    """What to replay (its files checked first: before the policy is compiled)."""
    if args.log is not None:
        _log_files(args.log)
        return read_log(args.log, window, chain), str(args.log)
    if args.db is not None:
        if not args.db.is_file():
            raise ReplayError(f"{args.db}: no such file")
        return read_database(args.db, window), str(args.db)
    token = os.environ.get("MCP_POLICY_APPROVER_TOKEN")
    if not token:
        raise BadArgument(
            "--from-service: set MCP_POLICY_APPROVER_TOKEN to the service's operator token"
        )
    return read_service(args.from_service, token, window), str(args.from_service)


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    from engine.authoring.offline import OfflinePolicy
    from engine.settings import Settings

    names = fail_on(args.fail_on) if args.fail_on is not None else frozenset()
    window = Window(
        parse_time(args.since, "--since") if args.since else None,
        parse_time(args.until, "--until") if args.until else None,
    )
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise BadArgument("--workers: between 1 and 64")
    chain = Chain()
    items, source = _items(args, window, chain)
    defaults: dict[str, Any] = {}
    schema = Settings(**defaults).policy_schema  # MCP_POLICY_*: as serve checks it
    # A team's directories: the installed framework's Rego added when none holds it.
    paths = with_framework(list(args.policy))
    async with await OfflinePolicy.load(paths, schema=schema) as policy:
        report = Report(policy.revision, source, chain=chain)
        await asyncio.to_thread(replay, items, policy.evaluate_json, report, workers=args.workers)
    report.check(names)
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report), file=out)
    return EXIT_CHANGED if report.failed_on else EXIT_OK


def tune_go_gc() -> None:
    """GOGC=REPLAY_GOGC unless set: read once, when OPA's library is first loaded."""
    os.environ.setdefault("GOGC", REPLAY_GOGC)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`mcp-policy replay`; the exit status."""
    tune_go_gc()
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    for flag, path in (("--policy", p) for p in args.policy):
        if not path.is_dir():
            print(f"mcp-policy replay: {flag} {path}: not a directory", file=err)
            return EXIT_INVALID
    try:
        return asyncio.run(_run(args, out))
    except BadArgument as exc:
        print(f"mcp-policy replay: {exc.message}", file=err)
        return EXIT_INVALID
    except ReplayError as exc:
        print(f"mcp-policy replay: {printable(exc.message)}", file=err)
        return EXIT_UNAVAILABLE
    except PolicyRejected as exc:
        print(f"mcp-policy replay: policy rejected: {exc.message}", file=err)
        for line in exc.errors:
            print(f"  {line}", file=err)
        return EXIT_POLICY_REJECTED
    except ToolMissing as exc:
        print(f"mcp-policy replay: {exc.message}", file=err)
        return EXIT_POLICY_REJECTED
