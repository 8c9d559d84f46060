"""The decision log's hash chains: a log the service wrote verifies, in both stores, across
restarts, rotation, retention and the size cap; a record changed, removed or reordered
(by hand, or by someone who recomputes hashes) is named by `mcp-policy log verify`, and so
is an anchor moved over records still there. Each case tampers with real files and a
real database, as an attacker with write access would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.models import DecideRequest, Decision, Principal, ToolCall, Verdict
from engine.state import audit
from engine.state.decision_log import (
    SCHEMA,
    DecisionLog,
    LogSettings,
    anchor_path,
    line,
    row_hash,
)
from engine.transports.server import start_servers
from tests.clients import HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    HEALTHIMAGING,
    approval_call,
    copy_call,
    session,
    settings_for,
)
from tests.processes import CLI

AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
COUNT = 20  # records in the `chain` fixture's log


# Helpers.


def open_log(directory: Path, **fields: Any) -> DecisionLog:
    settings = LogSettings(
        jsonl=str(directory / "decisions.jsonl"),
        database=directory / "decisions.sqlite3",
        **fields,
    )
    log = DecisionLog(settings)
    log.open()
    return log


def stamp(at: float | None = None) -> str:
    moment = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + ".000Z"


def decide(
    log: DecisionLog,
    decision_id: str,
    *,
    verdict: Verdict = Verdict.DENY,
    tool: str = "copy_image_set",
    arguments: dict[str, Any] | None = None,
    at: float | None = None,
) -> None:
    """A decision as the service logs it (a deny, unless told: nothing waits for it)."""
    principal = Principal.model_construct(
        agent_id="agent-1", session_id="s-1", user_id="user-1", roles=[]
    )
    request = DecideRequest.model_construct(
        server=HEALTHIMAGING, tool=tool, principal=principal, dry_run=False
    )
    call = ToolCall.model_construct(
        server=HEALTHIMAGING, name=tool, arguments=arguments or {}, jsonrpc_id=None
    )
    decision = Decision.model_construct(
        decision_id=decision_id,
        verdict=verdict,
        reason="why",
        rule="catalog.rule.copy_image_set",
        policy_revision="sha256:test",
        approval=None,
    )
    log.decision(
        decision,
        request,
        call,
        time=stamp(at),
        transport="test",
        latency_ms=1.0,
        matched=["catalog.rule.copy_image_set"],
    )


def ids(count: int, prefix: str = "dec") -> list[str]:
    return [f"{prefix}_{i:02d}" for i in range(1, count + 1)]


def lines_of(path: Path) -> list[str]:
    return path.read_text("ascii").splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(text + "\n" for text in lines), "ascii")


def rehashed(text: str, **changes: Any) -> str:
    """A JSONL line edited by someone who recomputes its hash as the writer does."""
    record = json.loads(text)
    del record["hash"]
    record.update(changes)
    body = line(record)
    digest = hashlib.sha256(body.encode("ascii")).hexdigest()
    return f'{body[:-1]},"hash":"{digest}"}}'


def verify(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`mcp-policy log verify ARGS` as a user runs it (the environment: `env` only)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    return subprocess.run(
        [*CLI, "log", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**base, **env},
    )


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Path]:
    """A log of COUNT decisions dec_01 … dec_20, written and closed: line k and seq k are
    dec_k in both stores."""
    log = open_log(tmp_path)
    try:
        for decision_id in ids(COUNT):
            decide(log, decision_id)
        await log.flush()
    finally:
        log.close()
    yield tmp_path


def jsonl_report(directory: Path) -> audit.Report:
    return audit.verify_jsonl(directory / "decisions.jsonl")


def db_report(directory: Path) -> audit.Report:
    return audit.verify_database(directory / "decisions.sqlite3")


def assert_ok(report: audit.Report, records: int) -> None:
    assert report.finding is None, report.text()
    assert report.records == records, report.text()


# A log the service writes verifies, across a restart.


async def test_a_service_log_verifies_in_both_stores_and_across_a_restart(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, decision_log=None)  # both stores in the state dir
    decided: list[str] = []
    for run in range(2):
        servers = await start_servers(settings)
        try:
            async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
                http = HttpClient(raw)
                sid = session()
                calls = [copy_call(sid) for _ in range(12)]  # the last 2 are rate limited
                forged = {**copy_call(sid), "tool": 'x","seq":1,"hash":"' + "0" * 64 + '"}\n{'}
                calls += [copy_call(sid, datastore_id="bad"), forged, approval_call(sid)]
                answers = [await http.decide(call) for call in calls]
                decided += [a["decision_id"] for a in answers]
                pending = answers[-1]["approval"]["id"]
                await http.act(APPROVER_TOKEN, pending, "approve", "op", f"run {run}")
                allowed = next(a for a in answers if a["verdict"] == "allow")
                await http.report(allowed["decision_id"], False, allowed["outcome_token"])
        finally:
            await servers.stop()
    verdicts = {"allow", "rate_limited", "deny", "approval_required"}
    state = settings.state_dir
    result = verify(MCP_POLICY_STATE_DIR=str(state))
    assert result.returncode == 0, result.stdout + result.stderr
    jsonl, db = result.stdout.splitlines()
    assert jsonl.startswith(f"jsonl {state / 'decisions.jsonl'}: ok: ")
    assert db.startswith(f"database {state / 'decisions.sqlite3'}: ok: {len(decided)} records")
    assert "chain from the start (seq 1)" in jsonl and "chain from the start (seq 1)" in db

    records = [json.loads(text) for text in lines_of(state / "decisions.jsonl")]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert {r.get("event") for r in records} >= {"decision", "approval", "outcome"}
    assert f"ok: {len(records)} records" in jsonl
    logged = [r["decision_id"] for r in records if r["event"] == "decision"]
    assert logged == decided, "every decision, in order, across the restart"
    assert {r["verdict"] for r in records if r["event"] == "decision"} == verdicts
    # The second run's first record follows the first run's last: one chain.
    first_of_second = next(i for i, r in enumerate(records) if r.get("decision_id") == decided[15])
    before = records[first_of_second - 1]
    assert records[first_of_second]["prev"] == before["hash"]
    # The SQLite record of a decision is its JSONL line; its link is in the columns.
    db_ = sqlite3.connect(state / "decisions.sqlite3")
    try:
        rows = db_.execute("SELECT seq, decision_id, record, prev FROM decisions").fetchall()
    finally:
        db_.close()
    by_id = {r["decision_id"]: r for r in records if r["event"] == "decision"}
    assert [row[1] for row in rows] == decided
    assert all(json.loads(row[2]) == by_id[row[1]] for row in rows)
    assert rows[15][3] != by_id[decided[14]]["hash"], "two chains: the database's is its own"


# Each way of tampering is found, and named.


JSONL_CASES = {
    # how: (edit of the lines, kind, line named, decision named)
    "edited": (
        lambda lines: [*lines[:7], lines[7].replace('"why"', '"because"'), *lines[8:]],
        "changed",
        8,
        "dec_08",
    ),
    "edited and rehashed": (
        lambda lines: [*lines[:7], rehashed(lines[7], verdict="allow"), *lines[8:]],
        "changed",
        8,
        "dec_08",
    ),
    "removed": (lambda lines: [*lines[:7], *lines[8:]], "removed", 8, "dec_09"),
    "first removed": (lambda lines: lines[1:], "removed", 1, "dec_02"),
    "reordered": (
        lambda lines: [*lines[:7], lines[8], lines[7], *lines[9:]],
        "reordered",
        8,
        "dec_09",
    ),
    "moved far": (lambda lines: [*lines[:3], *lines[4:], lines[3]], "reordered", 4, "dec_05"),
    "duplicated": (lambda lines: [*lines[:8], lines[7], *lines[8:]], "reordered", 9, "dec_08"),
    "forged": (
        lambda lines: [*lines[:7], '{"event":"decision","decision_id":"dec_x"}', *lines[7:]],
        "changed",
        8,
        "dec_x",
    ),
    "half a line": (
        lambda lines: [*lines[:7], lines[7][:100], *lines[8:]],
        "changed",
        8,
        "unreadable",
    ),
}


@pytest.mark.parametrize("how", JSONL_CASES)
async def test_a_tampered_jsonl_record_is_named(chain: Path, how: str) -> None:
    edit, kind, number, name = JSONL_CASES[how]
    path = chain / "decisions.jsonl"
    assert_ok(jsonl_report(chain), COUNT)
    write_lines(path, edit(lines_of(path)))
    finding = jsonl_report(chain).finding
    assert finding is not None
    assert (finding.kind, finding.item.where, finding.item.name) == (
        kind,
        f"decisions.jsonl:{number}",
        name,
    ), finding


def swap(db: sqlite3.Connection, a: int, b: int) -> None:
    """Exchange the contents (every column but seq) of rows `a` and `b`."""
    rows = {
        seq: db.execute("SELECT * FROM decisions WHERE seq = ?", (seq,)).fetchone()
        for seq in (a, b)
    }
    db.execute("DELETE FROM decisions WHERE seq IN (?, ?)", (a, b))
    for seq, other in ((a, b), (b, a)):
        db.execute(
            "INSERT INTO decisions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", (seq, *rows[other][1:])
        )


def rehash_row(db: sqlite3.Connection, seq: int, **changes: Any) -> None:
    """Edit a row and recompute its hash as the writer does."""
    names = "decision_id, ts, session_id, agent_id, user_id, server, tool, verdict, rule, record"
    found = db.execute(f"SELECT {names}, prev FROM decisions WHERE seq = ?", (seq,)).fetchone()
    columns = dict(zip(names.split(", "), found[:-1], strict=True))
    columns.update(changes)
    digest = row_hash(found[-1], list(columns.values()))
    sets = ", ".join(f"{k} = ?" for k in columns)
    db.execute(
        f"UPDATE decisions SET {sets}, hash = ? WHERE seq = ?", (*columns.values(), digest, seq)
    )


def head_hash(db: sqlite3.Connection, seq: int) -> str:
    return str(db.execute("SELECT hash FROM decisions WHERE seq = ?", (seq,)).fetchone()[0])


DB_CASES = {
    # how: (edit, kind, seq named, decision named)
    "verdict column edited": (
        lambda db: db.execute("UPDATE decisions SET verdict = 'allow' WHERE seq = 8"),
        "changed",
        8,
        "dec_08",
    ),
    "record edited": (
        lambda db: db.execute(
            "UPDATE decisions SET record = replace(record, '\"why\"', '\"because\"') WHERE seq = 8"
        ),
        "changed",
        8,
        "dec_08",
    ),
    "edited and rehashed": (lambda db: rehash_row(db, 8, verdict="allow"), "changed", 8, "dec_08"),
    "removed": (
        lambda db: db.execute("DELETE FROM decisions WHERE seq = 8"),
        "removed",
        9,
        "dec_09",
    ),
    "first removed": (
        lambda db: db.execute("DELETE FROM decisions WHERE seq = 1"),
        "removed",
        2,
        "dec_02",
    ),
    "reordered": (lambda db: swap(db, 8, 9), "reordered", 8, "dec_09"),
    "hash removed": (
        lambda db: db.execute("UPDATE decisions SET prev = NULL, hash = NULL WHERE seq = 8"),
        "changed",
        8,
        "dec_08",
    ),
    "anchor moved over kept records": (
        lambda db: db.execute("UPDATE anchor SET seq = 5, hash = ?", (head_hash(db, 5),)),
        "changed",
        1,
        "dec_01",
    ),
    "anchor moved to hide a removal": (
        lambda db: (
            db.execute("UPDATE anchor SET seq = 5, hash = ?", (head_hash(db, 5),)),
            db.execute("DELETE FROM decisions WHERE seq <= 5 AND seq != 2"),
        ),
        "changed",
        2,
        "dec_02",
    ),
}


@pytest.mark.parametrize("how", DB_CASES)
async def test_a_tampered_database_record_is_named(chain: Path, how: str) -> None:
    edit, kind, seq, name = DB_CASES[how]
    assert_ok(db_report(chain), COUNT)
    db = sqlite3.connect(chain / "decisions.sqlite3", isolation_level=None)
    try:
        edit(db)
    finally:
        db.close()
    finding = db_report(chain).finding
    assert finding is not None
    assert (finding.kind, finding.item.where, finding.item.name) == (kind, f"seq {seq}", name), (
        finding
    )


async def test_verify_names_the_first_tampered_record_and_exits_1(chain: Path) -> None:
    """Through the command, as an operator runs it: which record, where, what happened."""
    path = chain / "decisions.jsonl"
    lines = lines_of(path)
    write_lines(path, [*lines[:4], *lines[5:11], rehashed(lines[11], verdict="allow"), *lines[12:]])
    db = sqlite3.connect(chain / "decisions.sqlite3", isolation_level=None)
    db.execute("DELETE FROM anchor")
    db.close()
    result = verify("--jsonl", str(path), "--db", str(chain / "decisions.sqlite3"))
    assert result.returncode == 1, result.stdout + result.stderr
    jsonl, database = result.stdout.splitlines()
    assert jsonl == (
        f"jsonl {path}: NOT OK: record removed at decisions.jsonl:5 (dec_06, seq 6): "
        "1 record(s) (seq 5) are missing before it, after decisions.jsonl:4 (dec_04, seq 4)"
    )
    assert database == (
        f"database {chain / 'decisions.sqlite3'}: NOT OK: record changed at table anchor "
        "(anchor): the anchor is gone: the chain's start cannot be checked"
    )
    # Only the database given: the JSONL file is not looked at.
    alone = verify("--db", str(chain / "decisions.sqlite3"))
    assert alone.returncode == 1 and alone.stdout.startswith("database ")


# What is removed on purpose (rotation, retention, the size cap) is anchored.


@pytest.mark.parametrize("backups", [0, 2])
async def test_rotation_anchors_what_it_drops_and_the_first_kept_record_is_checked(
    tmp_path: Path, backups: int
) -> None:
    log = open_log(tmp_path, max_bytes=4096, backups=backups)
    try:
        for decision_id in ids(60):
            decide(log, decision_id)
        await log.flush()
    finally:
        log.close()
    path = tmp_path / "decisions.jsonl"
    kept = [path, *(Path(f"{path}.{n}") for n in range(1, backups + 1))]
    assert sorted(tmp_path.glob("decisions.jsonl*")) == sorted(kept)
    assert all(p.stat().st_size <= 4096 for p in kept)
    anchor = json.loads(anchor_path(path).read_text())
    assert anchor["reason"] == "rotation"
    report = jsonl_report(tmp_path)
    assert_ok(report, 60 - anchor["seq"])
    assert f"the anchor: seq {anchor['seq']}" in report.start

    oldest = kept[-1]
    first = json.loads(lines_of(oldest)[0])
    assert first["seq"] == anchor["seq"] + 1 and first["prev"] == anchor["hash"]
    write_lines(oldest, lines_of(oldest)[1:])  # the first kept record goes
    finding = jsonl_report(tmp_path).finding
    assert finding is not None and finding.kind == "removed"
    assert finding.item.where == f"{oldest.name}:1"
    assert finding.item.seq == anchor["seq"] + 2
    assert "at the start of the chain" in finding.detail


async def test_a_rotated_file_deleted_by_hand_is_found(tmp_path: Path) -> None:
    log = open_log(tmp_path, max_bytes=4096, backups=3)
    try:
        for decision_id in ids(50):
            decide(log, decision_id)
        await log.flush()
    finally:
        log.close()
    assert_ok(
        jsonl_report(tmp_path),
        50 - json.loads(anchor_path(tmp_path / "decisions.jsonl").read_text())["seq"],
    )
    middle = tmp_path / "decisions.jsonl.2"
    first_after = json.loads(lines_of(tmp_path / "decisions.jsonl.1")[0])
    middle.unlink()
    finding = jsonl_report(tmp_path).finding
    assert finding is not None and finding.kind == "removed"
    assert (finding.item.where, finding.item.name) == (
        "decisions.jsonl.1:1",
        first_after["decision_id"],
    )
    # The oldest file too (the anchor says where the chain starts).
    (tmp_path / "decisions.jsonl.3").unlink()
    finding = jsonl_report(tmp_path).finding
    assert finding is not None and finding.kind == "removed"


async def test_retention_deletes_old_rotated_files_and_anchors_them(tmp_path: Path) -> None:
    """Rotated files whose newest record is past the retention go (here at the next open);
    the file being written stays; the chain verifies from the anchor."""
    log = open_log(tmp_path, max_bytes=4096, backups=10)
    try:
        for decision_id in ids(40):
            decide(log, decision_id, at=time.time() - 3600)  # an hour old
        await log.flush()
    finally:
        log.close()
    path = tmp_path / "decisions.jsonl"
    rotated = sorted(tmp_path.glob("decisions.jsonl.*"))
    assert len(rotated) >= 2
    newest_rotated = json.loads(lines_of(tmp_path / "decisions.jsonl.1")[-1])
    log = open_log(tmp_path, max_bytes=4096, backups=10, retention_days=0.5 / 24)
    try:
        assert sorted(tmp_path.glob("decisions.jsonl*")) == [path], "past the half hour"
        anchor = json.loads(anchor_path(path).read_text())
        assert (anchor["seq"], anchor["hash"], anchor["reason"]) == (
            newest_rotated["seq"],
            newest_rotated["hash"],
            "retention",
        )
        decide(log, "dec_new")
        await log.flush()
    finally:
        log.close()
    report = jsonl_report(tmp_path)
    assert_ok(report, len(lines_of(path)))
    assert "by retention" in report.start
    assert json.loads(lines_of(path)[-1])["decision_id"] == "dec_new"


async def test_database_pruning_is_anchored_and_the_first_kept_row_is_checked(
    tmp_path: Path,
) -> None:
    """Past the retention and past the size cap, the oldest rows go with the anchor moved
    over them in the same transaction; removing the first kept row afterwards shows."""
    log = open_log(tmp_path, retention_days=0.5 / 24, db_max_bytes=64 * 1024, arguments="raw")
    try:
        for decision_id in ids(10, "old"):
            decide(log, decision_id, at=time.time() - 3600)
        for decision_id in ids(40):
            decide(log, decision_id, arguments={"blob": "x" * 4000})
            await log.flush()  # a batch each: the cap is checked each time
        health = log.health()
    finally:
        log.close()
    assert health["pruned_for_size"] > 0
    db = sqlite3.connect(tmp_path / "decisions.sqlite3", isolation_level=None)
    try:
        anchor = db.execute("SELECT seq, hash, removed, reason FROM anchor").fetchone()
        first, count = db.execute("SELECT MIN(seq), COUNT(*) FROM decisions").fetchone()
        assert first == anchor[0] + 1
        assert anchor[2] == 50 - count and anchor[3] == "size"
        assert (
            db.execute("SELECT COUNT(*) FROM decisions WHERE decision_id LIKE 'old%'").fetchone()[0]
            == 0
        )
        report = db_report(tmp_path)
        assert_ok(report, count)
        assert f"seq {anchor[0]}" in report.start and "by size" in report.start
        db.execute("DELETE FROM decisions WHERE seq = ?", (first,))
    finally:
        db.close()
    finding = db_report(tmp_path).finding
    assert finding is not None and finding.kind == "removed"
    assert finding.item.seq == first + 1


async def test_database_retention_keeps_a_record_until_all_before_it_are_past_it(
    tmp_path: Path,
) -> None:
    """A fresh record before an expired one keeps the expired one: deleting it would cut
    the chain in the middle."""
    log = open_log(tmp_path, retention_days=0.5 / 24)
    try:
        decide(log, "dec_old_1", at=time.time() - 3600)
        decide(log, "dec_fresh", at=time.time())
        decide(log, "dec_old_2", at=time.time() - 3600)
        await log.flush()
        decide(log, "dec_next")
        await log.flush()
    finally:
        log.close()
    db = sqlite3.connect(tmp_path / "decisions.sqlite3")
    try:
        kept = [r[0] for r in db.execute("SELECT decision_id FROM decisions ORDER BY seq")]
    finally:
        db.close()
    assert kept == ["dec_fresh", "dec_old_2", "dec_next"]
    report = db_report(tmp_path)
    assert_ok(report, 3)
    assert "by retention" in report.start


# A crash, replicas, an older log, hostile text.


async def test_a_line_cut_by_a_crash_verifies_and_is_removed_at_the_next_open(
    chain: Path,
) -> None:
    path = chain / "decisions.jsonl"
    cut = b'{"event":"decision","decision_id":"dec_cut","ver'
    with path.open("ab") as f:
        f.write(cut)  # never ended
    result = verify("--jsonl", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok: {COUNT} records" in result.stdout
    assert f"decisions.jsonl:21, {len(cut)} bytes) is cut short" in result.stdout

    log = open_log(chain)
    try:
        decide(log, "dec_after")
        await log.flush()
    finally:
        log.close()
    records = [json.loads(text) for text in lines_of(path)]
    assert [r.get("decision_id") for r in records[-2:]] == [None, "dec_after"]
    removed = records[-2]
    assert (removed["event"], removed["bytes"]) == ("cut_line_removed", len(cut))
    assert removed["sha256"] == hashlib.sha256(cut).hexdigest()
    assert_ok(jsonl_report(chain), COUNT + 2)


async def test_a_whole_last_record_without_its_newline_is_kept(chain: Path) -> None:
    path = chain / "decisions.jsonl"
    path.write_bytes(path.read_bytes()[:-1])  # only the newline is missing
    assert_ok(jsonl_report(chain), COUNT)
    log = open_log(chain)
    try:
        decide(log, "dec_after")
        await log.flush()
    finally:
        log.close()
    assert_ok(jsonl_report(chain), COUNT + 1)


async def test_replicas_sharing_one_database_extend_one_chain(tmp_path: Path) -> None:
    """Two writers on one SQLite file (each with its own JSONL), writing at once."""
    logs = [
        DecisionLog(
            LogSettings(
                jsonl=str(tmp_path / f"decisions-{i}.jsonl"), database=tmp_path / "shared.sqlite3"
            )
        )
        for i in range(2)
    ]
    for log in logs:
        log.open()
    try:

        async def write(i: int, log: DecisionLog) -> None:
            for n in range(100):
                decide(log, f"dec_{i}_{n}")
                if n % 7 == 0:
                    await asyncio.sleep(0.005)
            await log.flush()

        await asyncio.gather(*(write(i, log) for i, log in enumerate(logs)))
    finally:
        for log in logs:
            log.close()
    assert_ok(audit.verify_database(tmp_path / "shared.sqlite3"), 200)
    for i in range(2):
        assert_ok(audit.verify_jsonl(tmp_path / f"decisions-{i}.jsonl"), 100)


async def test_a_log_from_before_the_chain_verifies_as_unchained_then_chained(
    tmp_path: Path,
) -> None:
    """An upgrade: the older rows and lines (no hashes) stay, the chain starts after them."""
    old_schema = SCHEMA.replace(
        "    record TEXT NOT NULL,\n    prev TEXT,\n    hash TEXT\n", "    record TEXT NOT NULL\n"
    )
    old_schema = old_schema[: old_schema.index("CREATE TABLE IF NOT EXISTS anchor")]
    db = sqlite3.connect(tmp_path / "decisions.sqlite3")
    db.executescript(old_schema)
    for i in range(3):
        record = {"event": "decision", "decision_id": f"dec_legacy_{i}", "time": stamp()}
        db.execute(
            "INSERT INTO decisions (decision_id, ts, server, tool, verdict, rule, record) "
            "VALUES (?, ?, 's', 't', 'deny', 'r', ?)",
            (record["decision_id"], time.time(), line(record)),
        )
    db.commit()
    db.close()
    write_lines(
        tmp_path / "decisions.jsonl",
        [line({"event": "decision", "decision_id": f"dec_legacy_{i}"}) for i in range(3)],
    )
    with pytest.raises(audit.Unverifiable, match="written before hash chains"):
        db_report(tmp_path)
    log = open_log(tmp_path)
    try:
        for decision_id in ids(5):
            decide(log, decision_id)
        await log.flush()
    finally:
        log.close()
    for report in (db_report(tmp_path), jsonl_report(tmp_path)):
        assert_ok(report, 5)
        assert "3 earlier records unchained" in report.text()
    assert "seq 3 (the records up to it were written before the chain)" in db_report(tmp_path).start
    # An unchained record after the chain began is not "older": it was changed.
    path = tmp_path / "decisions.jsonl"
    lines = lines_of(path)
    write_lines(path, [*lines[:5], line({"event": "decision", "decision_id": "dec_x"}), *lines[5:]])
    finding = jsonl_report(tmp_path).finding
    assert finding is not None and (finding.kind, finding.item.where) == (
        "changed",
        "decisions.jsonl:6",
    )


async def test_hostile_text_cannot_forge_or_hide_a_link(tmp_path: Path) -> None:
    """A tool name or argument that spells out chain fields, newlines and all, stays
    inside its record; a record naming its own seq, prev and hash gets the chain's."""
    fake = '","seq":1,"prev":"' + "0" * 64 + '","hash":"' + "f" * 64 + '"}\n{"seq":2'
    log = open_log(tmp_path, arguments="raw")
    try:
        decide(log, "dec_1", tool="copy" + fake)
        decide(log, "dec_2", arguments={"x": fake, "seq": 99, "hash": "0" * 64})
        log.write({"event": "outcome", "seq": 1, "prev": "x", "hash": "y", "decision_id": "dec_1"})
        decide(log, "dec_3")
        await log.flush()
    finally:
        log.close()
    records = [json.loads(text) for text in lines_of(tmp_path / "decisions.jsonl")]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["tool"] == "copy" + fake
    assert records[1]["arguments"]["seq"] == 99
    assert records[2]["prev"] == records[1]["hash"]
    assert_ok(jsonl_report(tmp_path), 4)
    assert_ok(db_report(tmp_path), 3)
    # Editing the hostile record is still found.
    path = tmp_path / "decisions.jsonl"
    lines = lines_of(path)
    write_lines(path, [lines[0].replace("copy", "kopy", 1), *lines[1:]])
    finding = jsonl_report(tmp_path).finding
    assert finding is not None and finding.item.where == "decisions.jsonl:1"


# The command's other answers.


def test_verify_says_what_is_missing_and_exits_2(tmp_path: Path) -> None:
    missing = verify("--db", str(tmp_path / "nope.sqlite3"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"mcp-policy log verify: {tmp_path / 'nope.sqlite3'}: no such file"
    )
    jsonl = verify("--jsonl", str(tmp_path / "nope.jsonl"))
    assert jsonl.returncode == 2
    assert "nope.jsonl: no such file (nor rotated ones beside it)" in jsonl.stderr
    not_a_db = tmp_path / "text.sqlite3"
    not_a_db.write_text("not a database\n")
    bad = verify("--db", str(not_a_db))
    assert bad.returncode == 2 and "text.sqlite3: file is not a database" in bad.stderr
    # Defaults: the stores serve would write under this state dir; none there yet.
    nothing = verify(MCP_POLICY_STATE_DIR=str(tmp_path / "state"))
    assert nothing.returncode == 2
    assert "decisions.jsonl: no such file" in nothing.stderr
    assert "decisions.sqlite3: no such file" in nothing.stderr
    off = verify(MCP_POLICY_DECISION_LOG="off", MCP_POLICY_DECISION_DB="false")
    assert off.returncode == 2
    assert "no decision log to verify" in off.stderr
    assert "MCP_POLICY_DECISION_LOG=off" in off.stderr


async def test_verify_reads_a_log_the_service_is_writing(tmp_path: Path) -> None:
    """While decisions keep coming (and files rotate), verify still passes: the SQLite
    rows are read in one snapshot, the JSONL files opened before the anchor is read."""
    log = open_log(tmp_path, max_bytes=8192, backups=3)
    stop = threading.Event()
    reports: list[audit.Report] = []

    def check() -> None:
        while not stop.is_set():
            reports.append(db_report(tmp_path))
            reports.append(jsonl_report(tmp_path))

    try:
        decide(log, "dec_first")
        await log.flush()
        checker = threading.Thread(target=check)
        checker.start()
        try:
            for n in range(300):
                decide(log, f"dec_{n}")
                if n % 20 == 0:
                    await log.flush()
        finally:
            stop.set()
            await asyncio.to_thread(checker.join)
        await log.flush()
    finally:
        log.close()
    assert len(reports) >= 2
    assert [r.text() for r in reports if r.finding is not None] == []
