"""The decision log under hostile input: poisoned text, failing sinks, huge fields, floods.

Each case is checked where a user would look: the JSONL files, the SQLite copy (through
GET /v1/decisions or DecisionLog.query), /readyz, /metrics and the service log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.models import DecideRequest, Decision, Principal, ToolCall, Verdict
from engine.state.decision_log import (
    ELLIPSIS,
    NAME_MAX,
    RECORD_MAX_BYTES,
    TEXT_MAX,
    DecisionLog,
    DecisionQuery,
    LogSettings,
)
from engine.transports.server import Servers, start_servers
from tests.clients import HttpClient
from tests.conftest import APPROVER_TOKEN, HEALTHIMAGING, copy_call, session, settings_for

AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
SURROGATE = "\ud800"


# Helpers.


def jsonl_lines(directory: Path, name: str = "decisions.jsonl") -> list[str]:
    """Every line of the JSONL file and its backups, read as strict UTF-8."""
    files = sorted(directory.glob(name + "*"))
    return [text for f in files for text in f.read_bytes().decode("utf-8").splitlines()]


def jsonl_records(directory: Path, name: str = "decisions.jsonl") -> list[dict[str, Any]]:
    records = []
    for text in jsonl_lines(directory, name):
        record = json.loads(text)
        # Valid Unicode all the way down: any consumer (jq, Go, a SIEM) can read it.
        json.dumps(record, ensure_ascii=False).encode("utf-8")
        records.append(record)
    return records


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_decision(
    log: DecisionLog,
    decision_id: str,
    *,
    tool: str = "copy_image_set",
    server: str = HEALTHIMAGING,
    agent_id: str = "agent-1",
    session_id: str = "s-1",
    arguments: dict[str, Any] | None = None,
    reason: str = "allowed",
    rule: str = "catalog.rule.copy_image_set",
    matched: list[str] | None = None,
    shadow: list[dict[str, Any]] | None = None,
) -> None:
    """A decision as the service logs it; built without validation, as another path might."""
    principal = Principal.model_construct(
        agent_id=agent_id, session_id=session_id, user_id="user-1", roles=[]
    )
    request = DecideRequest.model_construct(
        server=server, tool=tool, principal=principal, dry_run=False
    )
    call = ToolCall.model_construct(
        server=server, name=tool, arguments=arguments or {}, jsonrpc_id=None
    )
    decision = Decision.model_construct(
        decision_id=decision_id,
        verdict=Verdict.ALLOW,
        reason=reason,
        rule=rule,
        policy_revision="sha256:test",
        approval=None,
    )
    log.decision(
        decision,
        request,
        call,
        time=stamp(),
        transport="test",
        latency_ms=1.0,
        matched=matched or [rule],
        shadow=shadow,
    )


@pytest.fixture
async def direct(tmp_path: Path) -> AsyncIterator[DecisionLog]:
    """A DecisionLog of its own (JSONL and SQLite under tmp_path), raw arguments."""
    log = DecisionLog(
        LogSettings(
            jsonl=str(tmp_path / "decisions.jsonl"),
            database=tmp_path / "decisions.sqlite3",
            arguments="raw",
        )
    )
    log.open()
    try:
        yield log
    finally:
        log.close()


async def all_records(log: DecisionLog) -> dict[str, dict[str, Any]]:
    records, _ = await log.query(DecisionQuery(limit=1000))
    return {r["decision_id"]: r for r in records}


async def page_all(http: HttpClient, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": 500, **({"cursor": cursor} if cursor else {})}
        response = await http.raw.get("/v1/decisions", params=query, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        out += body["decisions"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[Servers, HttpClient]]:
    servers = await start_servers(
        settings_for(tmp_path, decision_log=None, decision_log_arguments="raw")
    )
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            yield servers, HttpClient(raw)
    finally:
        await servers.stop()


# (a) Poisoned text.


async def test_a_poisoned_record_is_kept_sanitised_and_costs_no_later_record(
    direct: DecisionLog, tmp_path: Path
) -> None:
    log_decision(
        direct,
        "dec_poisoned",
        tool=f"copy{SURROGATE}image",
        agent_id=f"agent{SURROGATE}",
        arguments={"datastore_id": f"d{SURROGATE}", f"key{SURROGATE}": 1},
    )
    # Records from other paths, each wrong in its own way.
    direct.write({"event": "outcome", "decision_id": f"dec_{SURROGATE}", "succeeded": False})
    direct.write({"event": "decision", "decision_id": "dec_bare"})  # every column missing
    direct.write({"event": "approval", "approver": b"bytes", "score": float("nan")})
    for i in range(20):
        log_decision(direct, f"dec_after_{i}")
    await direct.flush()

    stored = await all_records(direct)
    assert {f"dec_after_{i}" for i in range(20)} <= set(stored), "every later decision"
    poisoned = stored["dec_poisoned"]
    assert poisoned["sanitised"] is True
    assert poisoned["tool"] == "copy\\ud800image", "the surrogate kept as its escape, as text"
    assert poisoned["principal"]["agent_id"] == "agent\\ud800"
    assert poisoned["arguments"] == {"datastore_id": "d\\ud800", "key\\ud800": 1}
    assert "dec_bare" in stored
    assert "sanitised" not in stored["dec_after_0"], "only what needed it is marked"

    in_file = {r.get("decision_id"): r for r in jsonl_records(tmp_path)}
    assert {f"dec_after_{i}" for i in range(20)} <= set(in_file)
    assert in_file["dec_poisoned"] == poisoned, "both sinks hold the same record"
    assert in_file["dec_\\ud800"]["sanitised"] is True
    approval = next(r for r in in_file.values() if r.get("event") == "approval")
    assert approval["score"] is None and approval["sanitised"] is True
    health = direct.health()
    assert health["healthy"] is True
    assert health["dropped"] == 0
    assert health["sanitised"] == 3


async def test_poisoned_requests_through_the_service_cost_no_later_decision(
    service: tuple[Servers, HttpClient],
) -> None:
    servers, http = service
    sid = session()
    body = copy_call(sid)
    body["tool"] = "copy_image_set" + SURROGATE
    body["arguments"]["source_image_set_id"] = "x" + SURROGATE
    # A JSON text with the escapes "\ud800" in it, as a hostile client would send it.
    raw = json.dumps(body).encode("ascii")
    assert b"\\ud800" in raw
    poisoned = await http.raw.post(
        "/v1/decide", content=raw, headers={"content-type": "application/json"}
    )
    later = [(await http.decide(copy_call(sid)))["decision_id"] for _ in range(10)]

    listed = {r["decision_id"]: r for r in await page_all(http, session_id=sid)}
    assert set(later) <= set(listed), "every later decision is in the database"
    await servers.runtime.decision_log.flush()
    in_file = {r.get("decision_id") for r in jsonl_records(servers.runtime.settings.state_dir)}
    assert set(later) <= in_file, "and in the JSONL file"
    if poisoned.status_code == 200:  # logged: kept, sanitised
        record = listed[poisoned.json()["decision_id"]]
        assert record["sanitised"] is True
        assert record["tool"] == "copy_image_set\\ud800"
    else:  # refused at the door (400): nothing of it can poison the log
        assert poisoned.status_code in (400, 422), poisoned.text
    ready = (await http.raw.get("/readyz")).json()["decision_log"]
    assert ready["healthy"] is True
    assert ready["dropped"] == 0


async def test_a_failing_batch_is_rolled_back_and_its_other_records_kept(
    direct: DecisionLog, tmp_path: Path
) -> None:
    """A row the database itself refuses (a trigger) fails its batch; the batch is rolled
    back, retried record by record, and the writer goes on."""
    assert direct._db is not None
    direct._db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON decisions WHEN NEW.tool = 'refused' "
        "BEGIN SELECT RAISE(ABORT, 'this row is refused'); END"
    )
    for i in range(5):
        log_decision(direct, f"dec_before_{i}")
    log_decision(direct, "dec_refused", tool="refused")
    for i in range(5):
        log_decision(direct, f"dec_same_batch_{i}")
    await direct.flush()
    for i in range(5):
        log_decision(direct, f"dec_next_batch_{i}")
    await direct.flush()

    stored = set(await all_records(direct))
    expected = {
        f"dec_{kind}_{i}" for kind in ("before", "same_batch", "next_batch") for i in range(5)
    }
    assert expected <= stored
    assert "dec_refused" not in stored
    assert "dec_refused" in {r.get("decision_id") for r in jsonl_records(tmp_path)}
    health = direct.health()
    assert health["dropped"] == 1
    assert health["sinks"]["database"]["failed_batches"] == 1
    assert "this row is refused" in health["last_error"]
    assert health["healthy"] is True, "the database writes again"
    assert health["writer_running"] is True


# (b) Failing sinks are visible, and so is their recovery.


async def test_a_full_database_shows_in_readyz_metrics_and_the_log_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="engine.state.decision_log")
    servers = await start_servers(settings_for(tmp_path, decision_log=None))
    log = servers.runtime.decision_log
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            http = HttpClient(raw)
            sid = session()
            await http.decide(copy_call(sid))
            await log.flush()
            assert log._db is not None
            pages = log._db.execute("PRAGMA page_count").fetchone()[0]
            log._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
            lost = []
            for _ in range(40):
                lost.append((await http.decide(copy_call(sid)))["decision_id"])
                await log.flush()  # one batch each
            ready = await raw.get("/readyz")
            assert ready.status_code == 200, "decisions go on: the service stays ready"
            state = ready.json()["decision_log"]
            assert state["healthy"] is False
            assert state["sinks"]["database"]["healthy"] is False
            assert state["sinks"]["jsonl"]["healthy"] is True
            assert state["dropped"] >= 1
            assert state["failed_batches"] >= 2
            assert "full" in state["last_error"]
            assert state["last_error_at"].endswith("Z")
            m = scrape((await raw.get("/metrics")).text)
            assert m[("mcp_policy_decision_log_healthy", ())] == 0
            assert m[("mcp_policy_decision_log_records_total", (("result", "dropped"),))] >= 1
            assert (
                m[("mcp_policy_decision_log_failed_batches_total", (("sink", "database"),))]
                == state["sinks"]["database"]["failed_batches"]
            )
            failures = [r for r in caplog.records if "database: write failed" in r.getMessage()]
            assert len(failures) == 1, "one warning for the kind, not one per batch"
            assert failures[0].exc_info is None, "a line, not a traceback"
            # The JSONL copy has every decision the database could not take.
            in_file = {r.get("decision_id") for r in jsonl_records(settings_dir(servers))}
            assert set(lost) <= in_file

            log._db.execute("PRAGMA max_page_count = 1073741823")  # space again
            after = (await http.decide(copy_call(sid)))["decision_id"]
            assert after in [r["decision_id"] for r in await page_all(http, session_id=sid)]
            state = (await raw.get("/readyz")).json()["decision_log"]
            assert state["healthy"] is True
            assert state["sinks"]["database"]["healthy"] is True
            assert "full" in state["last_error"], "the last error stays on record"
            m = scrape((await raw.get("/metrics")).text)
            assert m[("mcp_policy_decision_log_healthy", ())] == 1
            assert any("writing again" in r.getMessage() for r in caplog.records)
    finally:
        await servers.stop()


def settings_dir(servers: Servers) -> Path:
    return servers.runtime.settings.state_dir


async def test_a_jsonl_file_that_cannot_be_written_is_reported_then_recovers(
    direct: DecisionLog, tmp_path: Path
) -> None:
    path = tmp_path / "decisions.jsonl"
    log_decision(direct, "dec_first")
    await direct.flush()
    # The file is replaced by a directory under the writer: nothing can be appended.
    assert direct._file is not None
    direct._file.stream.close()
    path.unlink()
    path.mkdir()
    log_decision(direct, "dec_while_broken")
    await direct.flush()
    health = direct.health()
    assert health["healthy"] is False
    assert health["sinks"]["jsonl"]["healthy"] is False
    assert health["dropped"] == 1
    assert "IsADirectoryError" in health["sinks"]["jsonl"]["last_error"]
    assert "dec_while_broken" in await all_records(direct), "the database still has it"

    shutil.rmtree(path)
    log_decision(direct, "dec_after")
    await direct.flush()
    health = direct.health()
    assert health["healthy"] is True
    assert [r["decision_id"] for r in jsonl_records(tmp_path)] == ["dec_after"]


# (c) Long fields are cut, and what was cut stays identifiable.


async def test_long_fields_are_cut_with_their_length_and_hash(
    direct: DecisionLog, tmp_path: Path
) -> None:
    tool = "t" * (1024 * 1024)
    agent = "a" * 5000
    reason = "why " * 1000
    rules = [f"rule.{i}" for i in range(40)]
    long_rule = "r" * 300
    log_decision(
        direct,
        "dec_long",
        tool=tool,
        server="s" * 300,
        agent_id=agent,
        reason=reason,
        rule=long_rule,
        matched=[long_rule, *rules],
        shadow=[{"level": "deny", "rule": "shadow.x", "reason": "w" * 5000, "would": "deny"}],
        arguments={"blob": "b" * 100_000},
    )
    error = "x" * 1_000_000
    direct.write({"event": "invalid_request", "decision_id": "dec_bad", "error": error})
    await direct.flush()

    record = (await all_records(direct))["dec_long"]
    cut = record["truncated"]
    assert record["tool"] == tool[:NAME_MAX] + ELLIPSIS
    assert cut["tool"] == {"length": len(tool), "sha256": sha256(tool)}
    assert record["server"] == "s" * NAME_MAX + ELLIPSIS
    assert record["principal"]["agent_id"] == agent[:NAME_MAX] + ELLIPSIS
    assert cut["principal.agent_id"] == {"length": 5000, "sha256": sha256(agent)}
    assert record["reason"] == reason[:TEXT_MAX] + ELLIPSIS
    assert cut["reason"]["length"] == len(reason)
    assert record["rule"] == long_rule[:NAME_MAX] + ELLIPSIS
    assert len(record["matched"]) == 32
    assert cut["matched"] == {"items": 41}
    assert cut["matched.0"] == {"length": 300, "sha256": sha256(long_rule)}
    assert record["shadow"][0]["reason"] == "w" * TEXT_MAX + ELLIPSIS
    assert cut["shadow.0.reason"]["length"] == 5000
    assert "arguments" not in record, "arguments over the cap are left out"
    assert cut["arguments"]["sha256"] == record["arguments_sha256"]
    assert cut["arguments"]["bytes"] > 100_000
    assert "sanitised" not in record

    [bad] = [r for r in jsonl_records(tmp_path) if r.get("decision_id") == "dec_bad"]
    assert bad["error"] == error[:TEXT_MAX] + ELLIPSIS
    assert bad["truncated"]["error"] == {"length": len(error), "sha256": sha256(error)}
    assert all(len(text) <= 8192 for text in jsonl_lines(tmp_path)), "a few KiB at most"
    assert direct.health()["truncated"] == 2


async def test_no_line_is_ever_over_the_record_cap(direct: DecisionLog, tmp_path: Path) -> None:
    """Many fields, each at its bound and in characters JSON escapes to 12 bytes: the
    record is cut to the fields that identify it."""
    wide = "\U0001f600" * 2000
    record: dict[str, Any] = {"event": "decision", "decision_id": "dec_wide", "time": stamp()}
    record.update({f"field_{i}": {"reason": wide, "note": wide} for i in range(50)})
    record.update({"tool": wide, "verdict": "deny", "rule": "r", "principal": {"agent_id": wide}})
    direct.write(record)
    await direct.flush()
    [text] = [t for t in jsonl_lines(tmp_path) if "dec_wide" in t]
    assert len(text) <= RECORD_MAX_BYTES
    stored = json.loads(text)
    assert stored["verdict"] == "deny"
    assert stored["tool"] == wide[:NAME_MAX] + ELLIPSIS
    assert stored["truncated"]["record"]["bytes"] > RECORD_MAX_BYTES
    assert stored["truncated"]["tool"] == {"length": 2000, "sha256": sha256(wide)}
    assert "field_0" not in stored
    assert "dec_wide" in await all_records(direct)


async def test_long_tool_names_and_arguments_through_the_service(
    service: tuple[Servers, HttpClient],
) -> None:
    servers, http = service
    sid = session()
    body = copy_call(sid)
    body["tool"] = "t" * 1_000_000
    denied = await http.decide(body)
    assert denied["verdict"] == "deny"
    big = copy_call(sid, source_image_set_id="i" * 100_000)
    decided = await http.decide(big)
    listed = {r["decision_id"]: r for r in await page_all(http, session_id=sid)}
    long_tool = listed[denied["decision_id"]]
    assert long_tool["tool"] == "t" * NAME_MAX + ELLIPSIS
    assert long_tool["truncated"]["tool"] == {"length": 1_000_000, "sha256": sha256(body["tool"])}
    big_args = listed[decided["decision_id"]]
    assert "arguments" not in big_args
    assert big_args["truncated"]["arguments"]["sha256"] == big_args["arguments_sha256"]
    await servers.runtime.decision_log.flush()
    assert all(len(t) <= 4096 for t in jsonl_lines(settings_dir(servers)))


# (d) A flood of invalid requests cannot flush the history.


async def test_a_flood_of_invalid_requests_keeps_earlier_decisions(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        decision_log=None,
        decision_log_max_bytes=16 * 1024,
        decision_log_backups=2,
        decision_log_invalid_requests_per_second=0.5,
    )
    servers = await start_servers(settings)
    flood = 300
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=60) as raw:
            http = HttpClient(raw)
            sid = session()
            earlier = [(await http.decide(copy_call(sid)))["decision_id"] for _ in range(20)]
            # Each ~1 MB: a JSON-RPC message whose method is a megabyte of text.
            message = {"jsonrpc": "2.0", "id": 1, "method": "m" * 1_000_000, "params": {}}
            junk = json.dumps(
                {"server": HEALTHIMAGING, "principal": {"session_id": "x"}, "message": message}
            ).encode()

            async def invalid() -> int:
                response = await raw.post(
                    "/v1/decide", content=junk, headers={"content-type": "application/json"}
                )
                return response.status_code

            statuses: list[int] = []
            for _ in range(flood // 25):
                statuses += await asyncio.gather(*[invalid() for _ in range(25)])
            assert all(400 <= s < 500 for s in statuses), statuses
            await servers.runtime.decision_log.flush()
            m = scrape((await raw.get("/metrics")).text)
            suppressed = m[("mcp_policy_decision_log_records_total", (("result", "suppressed"),))]
            ready = (await raw.get("/readyz")).json()["decision_log"]
            assert ready["suppressed_invalid_requests"] == suppressed
            assert ready["healthy"] is True
            assert [r["decision_id"] for r in await page_all(http, session_id=sid)] == earlier[::-1]
    finally:
        await servers.stop()  # writes the summary of what is still pending

    records = jsonl_records(settings.state_dir)
    kept = {r.get("decision_id") for r in records if r.get("event") == "decision"}
    assert set(earlier) <= kept, "no earlier decision was rotated out"
    written = [r for r in records if r.get("event") == "invalid_request"]
    summaries = [r for r in records if r.get("event") == "invalid_requests_suppressed"]
    assert summaries, "what was held back is summarised"
    assert sum(s["count"] for s in summaries) == suppressed > 0
    assert len(written) + suppressed == flood, "every invalid request is accounted for"
    assert all(s["transports"] == {"http": s["count"]} for s in summaries)
    assert all(s["first_at"] <= s["last_at"] for s in summaries)
