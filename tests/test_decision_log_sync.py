"""MCP_POLICY_DECISION_LOG_SYNC=always: an allow is answered only once its record is on disk.

A real service under load is killed with SIGKILL: every allow a client received is in
the JSONL file and in SQLite, and both chains verify. A store that refuses the record
turns the allow into a deny (engine.state_unavailable) that holds no rate-limit slot;
refusals are not held back, dry runs do not wait, and the default (batch) still answers
first. Each case uses the real sinks: a database made read-only, a log file replaced by
a directory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.state import audit
from engine.transports.server import Servers, start_servers
from tests.clients import HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    copy_call,
    copy_policy,
    session,
    settings_for,
    without_agent_limit,
)
from tests.processes import CLI, Serve

AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
CALLS = 600
CLIENTS = 6
KILL_AFTER = 300
STATE_UNAVAILABLE = "engine.state_unavailable"


def jsonl_records(path: Path) -> list[dict[str, Any]]:
    """Every whole record of the JSONL log and its rotated files, oldest first (a last
    line the kill cut short is not a record)."""
    files = [p for _, p in reversed(audit.rotated_files(path))] + [path]
    records = []
    for f in files:
        for text in f.read_bytes().split(b"\n"):
            try:
                records.append(json.loads(text))
            except ValueError:
                continue  # the cut last line, or the empty string after the last newline
    return records


async def test_every_allow_answered_is_on_disk_when_the_service_is_killed(
    tmp_path: Path,
) -> None:
    rego, data = copy_policy(tmp_path)
    serve = Serve(
        tmp_path,
        [without_agent_limit(rego), data],
        {"MCP_POLICY_DECISION_LOG_SYNC": "always", "MCP_POLICY_STATE_STORE": "memory"},
    )
    answered: list[dict[str, Any]] = []
    numbers = iter(range(CALLS))
    failed = 0

    async def client() -> None:
        nonlocal failed
        async with httpx.AsyncClient(base_url=serve.url, timeout=30) as http:
            for _ in numbers:
                try:
                    response = await http.post("/v1/decide", json=copy_call())
                except httpx.TransportError:  # the service is gone
                    failed += 1
                    continue
                assert response.status_code == 200, response.text
                answered.append(response.json())
                if len(answered) == KILL_AFTER:
                    serve.proc.kill()  # SIGKILL: no shutdown, no flush

    try:
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    finally:
        serve.proc.kill()
        serve.proc.wait(timeout=30)
        serve._reader.join(timeout=10)  # its output read to the end
        if serve.proc.stdout is not None:
            serve.proc.stdout.close()
    assert serve.proc.returncode == -9
    assert KILL_AFTER <= len(answered) < CALLS and failed > 0, "killed in the middle"
    assert {a["verdict"] for a in answered} == {"allow"}
    allowed = {a["decision_id"] for a in answered}

    jsonl = tmp_path / "decisions.jsonl"
    in_file = {r["decision_id"] for r in jsonl_records(jsonl) if r.get("verdict") == "allow"}
    assert allowed <= in_file, f"{len(allowed - in_file)} allows answered, not in the file"
    db = sqlite3.connect(tmp_path / "state" / "decisions.sqlite3")
    try:
        in_db = {
            row[0]
            for row in db.execute("SELECT decision_id FROM decisions WHERE verdict = 'allow'")
        }
    finally:
        db.close()
    assert allowed <= in_db, f"{len(allowed - in_db)} allows answered, not in the database"
    for report in (
        audit.verify_jsonl(jsonl),
        audit.verify_database(tmp_path / "state" / "decisions.sqlite3"),
    ):
        assert report.finding is None, report.text()
        assert report.records >= len(allowed)


@pytest.fixture(params=["batch", "always"])
async def service(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Servers, HttpClient, str]]:
    sync = request.param
    servers = await start_servers(settings_for(tmp_path, decision_log_sync=sync))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            yield servers, HttpClient(raw), sync
    finally:
        await servers.stop()


async def test_an_allow_the_database_refuses_is_denied_and_holds_no_slot(
    service: tuple[Servers, HttpClient, str],
) -> None:
    """The database refuses writes (read-only): with sync=always the allow is not given
    and its slot goes back; refusals and dry runs are answered as ever. With the default
    (batch) the allow is given first and its record lost: the difference is the point."""
    servers, http, sync = service
    log = servers.runtime.decision_log
    assert log._db is not None
    sid = session()
    assert (await http.decide(copy_call(sid)))["verdict"] == "allow"
    await log.flush()
    log._db.execute("PRAGMA query_only = ON")  # e.g. a read-only mount
    try:
        during = [await http.decide(copy_call(sid)) for _ in range(3)]
        refused = await http.decide(copy_call(sid, datastore_id="bad"))
        dry = await http.decide({**copy_call(sid), "dry_run": True})
        await log.flush()
        state = (await http.raw.get("/readyz")).json()["decision_log"]
    finally:
        log._db.execute("PRAGMA query_only = OFF")
    assert state["sinks"]["database"]["healthy"] is False
    assert "readonly" in state["sinks"]["database"]["last_error"]
    assert (refused["verdict"], refused["rule"]) == ("deny", "copy_image_set.datastore_id_invalid")
    assert dry["verdict"] == "allow", "a dry run gives nothing: it does not wait"
    if sync == "batch":
        assert [d["verdict"] for d in during] == ["allow"] * 3
    else:
        for decision in during:
            assert (decision["verdict"], decision["rule"]) == ("deny", STATE_UNAVAILABLE)
            assert decision["reason"].startswith(
                "decision log unavailable, so the allow was not given: database: "
            )
            assert "readonly" in decision["reason"]
            assert "outcome_token" not in decision
            assert decision["mcp_result"]["isError"] is True
    # The session's 10 copies a minute: what the refused allows took was given back.
    left = 10 - 1 - (3 if sync == "batch" else 0)
    later = [await http.decide(copy_call(sid)) for _ in range(left + 1)]
    assert [d["verdict"] for d in later] == ["allow"] * left + ["rate_limited"]

    await log.flush()
    for decision in during:  # SQLite: never an allow that was not given (nor one at all)
        response = await http.raw.get(f"/v1/decisions/{decision['decision_id']}", headers=AUTH)
        assert response.status_code == 404
    lines = jsonl_records(Path(servers.runtime.settings.decision_log_settings.jsonl))
    for decision in during:  # the JSONL: the allow written, then (always) the deny
        mine = [r for r in lines if r.get("decision_id") == decision["decision_id"]]
        expected = ["allow"] if sync == "batch" else ["allow", "deny"]
        assert [r["verdict"] for r in mine] == expected
        assert mine[-1]["rule"] == decision["rule"]
    settings = servers.runtime.settings.decision_log_settings
    assert settings.database is not None
    for report in (  # (read while the service runs)
        audit.verify_jsonl(Path(settings.jsonl)),
        audit.verify_database(settings.database),
    ):
        assert report.finding is None, report.text()


async def test_an_allow_the_log_file_refuses_is_denied_and_its_deny_is_the_row(
    tmp_path: Path,
) -> None:
    """The JSONL file cannot be written (replaced by a directory): the allow is denied,
    and SQLite gets the deny, not the allow nobody was given."""
    servers = await start_servers(settings_for(tmp_path, decision_log_sync="always"))
    log = servers.runtime.decision_log
    path = Path(servers.runtime.settings.decision_log_settings.jsonl)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            http = HttpClient(raw)
            sid = session()
            assert (await http.decide(copy_call(sid)))["verdict"] == "allow"
            await log.flush()
            assert log._file is not None and log._file.stream is not None
            log._file.stream.close()
            path.unlink()
            path.mkdir()
            denied = await http.decide(copy_call(sid))
            assert (denied["verdict"], denied["rule"]) == ("deny", STATE_UNAVAILABLE)
            assert denied["reason"].startswith(
                "decision log unavailable, so the allow was not given: file: "
            )
            assert "IsADirectoryError" in denied["reason"]
            await log.flush()
            row = (await raw.get(f"/v1/decisions/{denied['decision_id']}", headers=AUTH)).json()
            assert (row["verdict"], row["rule"]) == ("deny", STATE_UNAVAILABLE)
            shutil.rmtree(path)
            again = await http.decide(copy_call(sid))
            assert again["verdict"] == "allow", "the file is written again"
    finally:
        await servers.stop()
    settings = servers.runtime.settings.decision_log_settings
    assert settings.database is not None
    report = audit.verify_database(settings.database)
    assert report.finding is None, report.text()
    assert report.records == 3


async def test_many_allows_at_once_are_all_written_before_they_are_answered(
    tmp_path: Path,
) -> None:
    """Concurrent allows share a group commit; each is answered after its record is in
    both stores (read back the moment its answer arrives)."""
    servers = await start_servers(settings_for(tmp_path, decision_log_sync="always"))
    settings = servers.runtime.settings.decision_log_settings
    assert settings.database is not None
    db = sqlite3.connect(settings.database)
    found: list[tuple[bool, bool]] = []
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            http = HttpClient(raw)

            async def one() -> None:
                decision = await http.decide(copy_call())
                assert decision["verdict"] == "allow"
                decision_id = decision["decision_id"]
                row = db.execute(
                    "SELECT verdict FROM decisions WHERE decision_id = ?", (decision_id,)
                ).fetchone()
                in_file = decision_id in Path(settings.jsonl).read_text()
                found.append((row == ("allow",), in_file))

            await asyncio.gather(*(one() for _ in range(60)))
    finally:
        db.close()
        await servers.stop()
    assert found == [(True, True)] * 60


def test_an_unknown_sync_mode_is_refused_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--http-port", "0", "--grpc-port", "0", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")},
            "MCP_POLICY_DECISION_LOG_SYNC": "sometimes",
        },
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(
        "mcp-policy serve: invalid settings: MCP_POLICY_DECISION_LOG_SYNC: "
    )
    assert "'sometimes'" in result.stderr and "Traceback" not in result.stderr
