"""`mcp-policy log verify`: check the decision log's hash chains.

engine/state/decision_log.py says how the chains are made. Here each store is read once,
in order, in constant memory (one record at a time, and at most LOOKAHEAD records ahead
where the chain breaks, to tell a reordering from a removal):

- the JSONL log: the rotated files, oldest first (`decisions.jsonl.5` … `.1`), then the
  file itself; the chain starts at the anchor file beside it (`<stem>.anchor.json`: the
  seq and hash of the last record rotation or retention removed), or at seq 1 when there
  is none. The files are opened before the anchor is read, so a rotation while this runs
  leaves at most the anchored file's records before the anchor ("left over", skipped).
- the SQLite copy: the rows by seq, from the `anchor` table's seq and hash, in one read
  transaction (a snapshot: the service may go on writing).

Every record must match its own hash, follow the anchor or the record before it (its seq
one more, its prev that record's hash), and nothing may stand between. The first record
that does not is named, as what it looks like:

- changed: its text (or a column) does not match its hash; or its hash is not the one the
  next record holds (it was changed and its hash recomputed, or replaced);
- removed: records are missing before it (its seq jumps);
- reordered: the record that should come next comes later (within LOOKAHEAD), or an
  earlier seq comes after a later one.

A line cut short at the very end of the newest JSONL file (a write a crash interrupted,
never answered) is reported, not counted, and not an error; the service removes it when
it next opens the log. Records written before the chain existed verify as "unchained" up
to where the chain starts.

What the chain cannot show: records removed from the newest end (compare the head printed
here with one noted earlier), and the oldest removed together with the anchor moved over
them, which is what retention does. A log rewritten whole, chain and all, verifies: keep
the head somewhere else (or ship the log) when that matters.

Exit status: 0 every store verifies, 1 a store does not, 2 a store to check is missing or
cannot be read as a decision log (the message names it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.state.decision_log import (
    GENESIS,
    LINE_MAX,
    Anchor,
    Link,
    LogSettings,
    anchor_path,
    read_anchor,
    read_link,
    rotated_files,
    row_hash,
)

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_MISSING = 2
# How far past a break the walk looks for the record that should have come next.
LOOKAHEAD = 256
# A rotation under way: how often, and how long apart, the files are listed again.
OPEN_ATTEMPTS = 20
OPEN_RETRY_SECONDS = 0.01

VERIFY_HELP = (
    "check the decision log's hash chains (exit 1 when a record was changed, removed or reordered)"
)
VERIFY_DESCRIPTION = (
    "Read the JSONL log (its rotated files, oldest first) and the SQLite copy, and check "
    'that their hash chains are whole. Prints "ok: N records, chain from ..." per store, '
    "or the first record that was changed, removed or reordered. Without --db and --jsonl "
    "it checks the stores `mcp-policy serve` is configured to write (MCP_POLICY_*)."
)


class Unverifiable(Exception):  # noqa: N818 - a message for the user, not a fault
    """A store that is missing or is not a decision log."""


@dataclass(frozen=True)
class Item:
    """One record of a store as the walk sees it."""

    where: str  # file:line, or "seq N"
    name: str  # the decision id, or the event
    state: str  # "linked" (its hash matches it), "unchained" (no hash), "changed"
    seq: int | None = None  # its place in the chain (the row's seq in SQLite)
    prev: str | None = None
    hash: str | None = None

    def named(self) -> str:
        seq = f", seq {self.seq}" if self.seq is not None else ""
        return f"{self.where} ({self.name}{seq})"


@dataclass(frozen=True)
class Finding:
    kind: str  # changed, removed, reordered
    item: Item
    detail: str


@dataclass
class Report:
    store: str  # "jsonl" or "database"
    path: Path
    start: str  # where the chain starts, in words
    records: int = 0  # linked records
    head: tuple[int, str] | None = None
    finding: Finding | None = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        where = f"{self.store} {self.path}"
        if self.finding is not None:
            f = self.finding
            return f"{where}: NOT OK: record {f.kind} at {f.item.named()}: {f.detail}"
        head = f"; head seq {self.head[0]} {self.head[1]}" if self.head else ""
        notes = "".join(f"; {note}" for note in self.notes)
        return f"{where}: ok: {self.records} records, chain from {self.start}{head}{notes}"


@dataclass
class _Walk:
    """The chain check over a stream of items (see the module docstring)."""

    anchor_seq: int
    anchor_hash: str
    leftovers_allowed: bool  # records up to the anchor may still be there (JSONL)
    records: int = 0
    unchained: int = 0
    leftover: int = 0
    last: Item | None = None

    def run(self, items: Iterator[Item]) -> Finding | None:
        ahead: deque[Item] = deque()

        def pull() -> Item | None:
            return ahead.popleft() if ahead else next(items, None)

        def find_ahead(wanted: Callable[[Item], bool]) -> Item | None:
            for seen in ahead:
                if wanted(seen):
                    return seen
            while len(ahead) < LOOKAHEAD and (coming := next(items, None)) is not None:
                ahead.append(coming)
                if wanted(coming):
                    return coming
            return None

        expected_seq, expected_prev = self.anchor_seq + 1, self.anchor_hash
        previous_leftover: Item | None = None
        while (item := pull()) is not None:
            if item.state == "changed":
                return Finding("changed", item, "its content does not match its hash")
            if item.state == "unchained":
                if (
                    self.last is None
                    and previous_leftover is None
                    and (item.seq is None or item.seq <= self.anchor_seq)
                ):
                    self.unchained += 1  # written before the chain began
                    continue
                return Finding("changed", item, "it carries no hash, inside the chain")
            assert item.seq is not None and item.prev is not None
            if self.last is None and item.seq <= self.anchor_seq:
                if not self.leftovers_allowed:
                    return Finding(
                        "changed",
                        item,
                        f"the anchor says the records up to seq {self.anchor_seq} were "
                        "removed, but this one is still here: the anchor was changed",
                    )
                self.leftover += 1
                previous_leftover = item
                continue
            if (
                previous_leftover is not None
                and self.last is None
                and (
                    (previous_leftover.seq, previous_leftover.hash)
                    != (self.anchor_seq, self.anchor_hash)
                )
            ):
                return Finding(
                    "changed",
                    previous_leftover,
                    "records before the anchor are still here, but not up to the anchored "
                    "one: the anchor was changed",
                )
            if item.seq == expected_seq and item.prev == expected_prev:
                self.records += 1
                self.last = item
                expected_seq, expected_prev = item.seq + 1, item.hash or GENESIS
                continue
            return self._broken(item, expected_seq, expected_prev, find_ahead)
        return None

    def _broken(
        self,
        item: Item,
        expected_seq: int,
        expected_prev: str,
        find_ahead: Callable[[Callable[[Item], bool]], Item | None],
    ) -> Finding:
        """What a break in the chain at `item` looks like."""
        assert item.seq is not None
        after = f"after {self.last.named()}" if self.last else "at the start of the chain"
        if self.last is not None and item.hash == self.last.hash:
            return Finding("reordered", item, "it is a second copy of the record before it")
        successor = find_ahead(lambda x: x.state == "linked" and x.prev == expected_prev)
        if successor is not None:
            return Finding(
                "reordered",
                item,
                f"it stands where the record {after} belongs, which comes later, at "
                f"{successor.named()}",
            )
        if item.seq < expected_seq:
            return Finding("reordered", item, f"seq {item.seq} comes after seq {expected_seq - 1}")
        if item.seq > expected_seq:
            missing = item.seq - expected_seq
            seqs = f"seq {expected_seq}" if missing == 1 else f"seq {expected_seq}-{item.seq - 1}"
            return Finding(
                "removed", item, f"{missing} record(s) ({seqs}) are missing before it, {after}"
            )
        if self.last is None:
            return Finding(
                "changed",
                item,
                f"it does not follow the anchor (seq {self.anchor_seq}, hash "
                f"{self.anchor_hash[:16]}…): it or the anchor was changed",
            )
        return Finding(
            "changed",
            self.last,
            f"its hash is not the one the next record ({item.named()}) holds: it was changed "
            "and its hash recomputed, or replaced",
        )


def _start(anchor: Anchor, removed: str) -> str:
    """Where a chain starts, in words."""
    if anchor.seq == 0:
        return "the start (seq 1)"
    detail = anchor.detail
    why = detail.get("reason")
    if why == "unchained":
        return f"seq {anchor.seq} (the records up to it were written before the chain)"
    said = f" by {why}" if isinstance(why, str) else ""
    if isinstance(detail.get("file"), str):
        said += f" with {detail['file']}"
    if removed:
        said += f", {removed}"
    return f"the anchor: seq {anchor.seq} {anchor.hash[:16]}… (older records removed{said})"


def _summarise(report: Report, walk: _Walk) -> None:
    report.records = walk.records
    if walk.last is not None and walk.last.seq is not None and walk.last.hash is not None:
        report.head = (walk.last.seq, walk.last.hash)
    if walk.unchained:
        report.notes.append(f"{walk.unchained} earlier records unchained (before the chain)")
    if walk.leftover:
        report.notes.append(f"{walk.leftover} records before the anchor still there")


# The JSONL log.


def _lines(f: io.BufferedReader) -> Iterator[tuple[bytes, bool]]:
    """The lines of a file, without newlines, and whether each was ended by one; a line
    over LINE_MAX is cut there (its rest skipped): constant memory."""
    while True:
        text = f.readline(LINE_MAX + 1)
        if not text:
            return
        if text.endswith(b"\n"):
            yield text[:-1], True
            continue
        if len(text) <= LINE_MAX:  # the end of the file
            yield text, False
            return
        ended = False
        while rest := f.readline(LINE_MAX):  # a line longer than any of ours
            if rest.endswith(b"\n"):
                ended = True
                break
        yield text, ended


def _name(text: bytes) -> str:
    """A record's decision id or event, as far as it can be read."""
    with contextlib.suppress(ValueError, RecursionError):
        record = json.loads(text)
        if isinstance(record, dict):
            for key in ("decision_id", "event"):
                value = record.get(key)
                if isinstance(value, str):
                    return value[:80]
    return "unreadable"


def _jsonl_items(files: list[tuple[Path, io.BufferedReader]], report: Report) -> Iterator[Item]:
    for position, (path, f) in enumerate(files):
        newest = position == len(files) - 1
        for number, (text, ended) in enumerate(_lines(f), 1):
            where = f"{path.name}:{number}"
            link = read_link(text) if len(text) <= LINE_MAX else "changed"
            if not ended and newest and not isinstance(link, Link):
                report.notes.append(
                    f"the last line ({where}, {len(text)} bytes) is cut short: a write a crash "
                    "interrupted, not counted"
                )
                return
            if isinstance(link, Link):
                name = link.record.get("decision_id") or link.record.get("event") or "?"
                yield Item(where, str(name)[:80], "linked", link.seq, link.prev, link.hash)
            else:
                yield Item(where, _name(text), link)


def _listing(path: Path) -> list[tuple[Path, int, int]]:
    """The log's files, oldest first, with their inode and device."""
    found = []
    for p in [*(p for _, p in reversed(rotated_files(path))), path]:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(p)
            found.append((p, st.st_ino, st.st_dev))
    return found


def _settled(path: Path, listing: list[tuple[Path, int, int]]) -> bool:
    """Whether the files are as a finished rotation leaves them: the log itself and
    `.1` … `.N` without a gap (a rotation under way renames them one by one)."""
    names = [p.name for p, _, _ in listing]
    numbered = [f"{path.name}.{n}" for n in range(len(names) - 1, 0, -1)]
    return names == [*numbered, path.name]


def _open_files(stack: contextlib.ExitStack, path: Path) -> list[tuple[Path, io.BufferedReader]]:
    """The log's files, oldest first, all open, as one rotation left them: listed, opened
    and listed again (the same files, and the same inodes as those opened) until they are
    settled, or the same twice OPEN_ATTEMPTS times (a file deleted by hand: verification
    reports the gap). Unverifiable when there is none."""
    for attempt in range(OPEN_ATTEMPTS):
        listing = _listing(path)
        if not listing:
            # None, or the log renamed to .1 between listing the rotated files and it.
            if attempt == OPEN_ATTEMPTS - 1:
                raise Unverifiable(f"{path}: no such file (nor rotated ones beside it)")
            time.sleep(OPEN_RETRY_SECONDS)
            continue
        with contextlib.ExitStack() as opening:
            files = []
            try:
                for p, inode, device in listing:
                    f = opening.enter_context(open(p, "rb"))
                    st = os.fstat(f.fileno())
                    if (st.st_ino, st.st_dev) != (inode, device):
                        raise FileNotFoundError(p)  # replaced meanwhile: again
                    files.append((p, f))
                stable = _listing(path) == listing
            except FileNotFoundError:
                stable = False
            except OSError as exc:
                raise Unverifiable(f"{exc.filename or path}: {exc.strerror or exc}") from exc
            if stable and (_settled(path, listing) or attempt == OPEN_ATTEMPTS - 1):
                stack.enter_context(opening.pop_all())
                return files
        time.sleep(OPEN_RETRY_SECONDS)
    raise Unverifiable(f"{path}: the files kept rotating while being opened; try again")


def verify_jsonl(path: Path) -> Report:
    """Check the JSONL log `path` and its rotated files. Unverifiable when there is none."""
    with contextlib.ExitStack() as stack:
        files = _open_files(stack, path)
        where = anchor_path(path)
        report = Report("jsonl", path, "the start (seq 1)")
        try:
            anchor = read_anchor(where) or Anchor(0, GENESIS, {})
        except (ValueError, RecursionError) as exc:
            report.finding = Finding(
                "changed", Item(where.name, "anchor", "changed"), f"not an anchor: {exc}"
            )
            return report
        except OSError as exc:
            raise Unverifiable(f"{where}: {exc.strerror or exc}") from exc
        report.start = _start(anchor, "")
        walk = _Walk(anchor.seq, anchor.hash, leftovers_allowed=True)
        report.finding = walk.run(_jsonl_items(files, report))
        _summarise(report, walk)
        if len(files) > 1:
            report.notes.insert(0, f"{len(files)} files")
        return report


# The SQLite copy.

_ROWS = (
    "SELECT seq, decision_id, ts, session_id, agent_id, user_id, server, tool, verdict, "
    "rule, record, prev, hash FROM decisions ORDER BY seq"
)


def _row_items(rows: Iterator[tuple[Any, ...]]) -> Iterator[Item]:
    for seq, *columns, prev, digest in rows:
        where = f"seq {seq}"
        name = columns[0] if isinstance(columns[0], str) else "?"
        if prev is None and digest is None:
            yield Item(where, name[:80], "unchained", seq)
            continue
        try:
            matches = isinstance(prev, str) and row_hash(prev, columns) == digest
        except (TypeError, ValueError, UnicodeEncodeError):  # a column of the wrong type
            matches = False
        yield Item(where, name[:80], "linked" if matches else "changed", seq, prev, digest)


def verify_database(path: Path) -> Report:
    """Check the SQLite copy `path` (read only). Unverifiable when it is missing or not a
    decision log database."""
    if not path.is_file():
        raise Unverifiable(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise Unverifiable(f"{path}: {exc}") from exc
    report = Report("database", path, "the start (seq 1)")
    try:
        db.execute("BEGIN")  # one snapshot for the anchor and the rows
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "decisions" not in tables:
            raise Unverifiable(f"{path}: not a decision log database (no decisions table)")
        columns = {row[1] for row in db.execute("PRAGMA table_info(decisions)")}
        if "anchor" not in tables or "hash" not in columns:
            raise Unverifiable(
                f"{path}: written before hash chains (no anchor): the service starts a chain "
                "when it next opens it"
            )
        found = db.execute("SELECT seq, hash, removed, reason FROM anchor WHERE id = 1").fetchone()
        if found is None or type(found[0]) is not int or not isinstance(found[1], str):
            report.finding = Finding(
                "changed",
                Item("table anchor", "anchor", "changed"),
                "the anchor is gone: the chain's start cannot be checked",
            )
            return report
        seq, digest, removed, reason = found
        anchor = Anchor(seq, digest, {"reason": reason})
        report.start = _start(anchor, f"{removed} so far" if removed else "")
        walk = _Walk(seq, digest, leftovers_allowed=False)
        report.finding = walk.run(_row_items(iter(db.execute(_ROWS))))
        _summarise(report, walk)
        return report
    except sqlite3.DatabaseError as exc:
        raise Unverifiable(f"{path}: {exc}") from exc
    finally:
        db.close()


# The command.


def configured(logs: LogSettings) -> tuple[Path | None, Path | None, list[str]]:
    """The stores `mcp-policy serve` writes with these settings: the database, the JSONL
    file, and notes on what is not kept where it could be checked."""
    notes = []
    jsonl = None
    if logs.jsonl == "-":
        notes.append(
            "the JSONL log goes to standard error (MCP_POLICY_DECISION_LOG=-): not checked"
        )
    elif logs.jsonl == "off":
        notes.append("no JSONL log is kept (MCP_POLICY_DECISION_LOG=off)")
    else:
        jsonl = Path(logs.jsonl)
    if logs.database is None:
        notes.append("no SQLite copy is kept (MCP_POLICY_DECISION_DB=false)")
    return logs.database, jsonl, notes


def run(
    db: Path | None,
    jsonl: Path | None,
    configured: Callable[[], tuple[Path | None, Path | None, list[str]]],
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """`mcp-policy log verify`: the stores named, or else those `configured()` names
    (database, JSONL, and notes on the ones not kept in a file). The exit status."""
    notes: list[str] = []
    if db is None and jsonl is None:
        db, jsonl, notes = configured()
    for note in notes:
        print(f"mcp-policy log verify: {note}", file=err)
    if db is None and jsonl is None:
        print("mcp-policy log verify: no decision log to verify", file=err)
        return EXIT_MISSING
    status = EXIT_OK
    missing = False
    for check, target in ((verify_jsonl, jsonl), (verify_database, db)):
        if target is None:
            continue
        try:
            report = check(target)
        except Unverifiable as exc:
            print(f"mcp-policy log verify: {exc}", file=err)
            missing = True
            continue
        print(report.text(), file=out)
        if report.finding is not None:
            status = EXIT_BROKEN
    if status == EXIT_OK and missing:
        return EXIT_MISSING
    return status
