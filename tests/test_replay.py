"""`mcp-policy replay`: a real service logs the exact input of its decisions, and the
logged traffic is replayed against a changed policy from every place it is kept: the
JSONL log, the SQLite copy, the running service, OPA-format decision-log files.

Everything runs as a user runs it (the `mcp-policy` CLI in a process of its own). Hostile
logs (lines that are not JSON, records without input, forged and inserted records, lines
longer than any the service writes, a huge value, garbage that calls itself gzip) and bad
arguments give counted skips or one clear line and a documented exit status, never a
traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.state import audit
from engine.state.decision_log import LINE_MAX
from engine.transports.server import Servers, start_servers
from tests.conftest import (
    APPROVER_TOKEN,
    HEALTHIMAGING,
    add_tools,
    approval_call,
    copy_call,
    copy_policy,
    session,
    settings_for,
)
from tests.processes import CLI

UNKNOWN_TOOL = {"server": "files.example", "tool": "read_file", "arguments": {"path": "/a"}}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    return {**env, **extra}


async def mcp_policy(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own (off the event loop: the service answers meanwhile)."""
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=clean_env(**env),
    )


def assert_clean(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert_clean(done)
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@dataclass
class World:
    servers: Servers
    jsonl: Path
    db: Path
    candidate: list[Path]
    shipped: list[Path]
    ids: dict[str, list[str]] = field(default_factory=dict)


async def decide(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/v1/decide", json=body)
    assert response.status_code == 200, response.text
    decision: dict[str, Any] = response.json()
    return decision


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    """A service keeping each decision's input (raw arguments), a few calls of each kind
    decided by it, and a candidate policy in which copy_image_set is denied."""
    tmp = tmp_path_factory.mktemp("replay")
    live = copy_policy(tmp / "live")
    candidate = copy_policy(tmp / "candidate")
    add_tools(candidate[1], rules={"copy_image_set": {"action": "deny", "reason": "no copies"}})
    settings = settings_for(
        tmp,
        policy_paths=list(live),
        decision_log_input=True,
        decision_log_arguments="raw",
    )
    running = await start_servers(settings)
    try:
        ids: dict[str, list[str]] = {}
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
            calls = {
                "copy": [copy_call() for _ in range(3)],
                "dry": [{**copy_call(), "dry_run": True}],
                "approval": [approval_call()],
                "bad_copy": [copy_call(datastore_id="not-an-id")],
                "unknown": [{**UNKNOWN_TOOL, "principal": {"session_id": session()}}],
            }
            for kind, bodies in calls.items():
                ids[kind] = [(await decide(http, body))["decision_id"] for body in bodies]
        await running.runtime.decision_log.flush()
        yield World(
            running,
            tmp / "decisions.jsonl",
            settings.state_dir / "decisions.sqlite3",
            list(candidate),
            list(live),
            ids,
        )
    finally:
        await running.stop()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("ascii").splitlines()]


def policy_args(paths: list[Path]) -> list[str]:
    return [arg for path in paths for arg in ("--policy", str(path))]


async def test_the_log_keeps_the_exact_input_and_the_policys_answer(world: World) -> None:
    logged = {r["decision_id"]: r for r in records(world.jsonl) if r.get("event") == "decision"}
    copy_id = world.ids["copy"][0]
    record = logged[copy_id]
    assert record["input_arguments"] == "raw"
    doc = record["input"]
    assert doc["request"]["id"] == copy_id
    assert doc["request"]["time"] == record["time"]
    assert doc["tool"]["server"] == HEALTHIMAGING
    assert doc["tool"]["arguments"] == record["arguments"]
    assert set(doc) == {"tool", "principal", "request", "context"}
    assert doc["principal"]["authenticated"] is False
    assert record["policy"]["action"] == "rate_limit"
    assert record["policy"]["rule"] == record["rule"] == "catalog.rule.copy_image_set"
    assert {lim["rule"] for lim in record["policy"]["rate_limits"]} == {
        "catalog.rule.copy_image_set",
        "copy_image_set.agent_limit",
    }
    approval = logged[world.ids["approval"][0]]
    assert approval["policy"]["action"] == "require_approval"
    assert approval["policy"]["approval"]["rule"] == approval["rule"]
    # The SQLite copy holds the same record, and both chains still verify.
    response = await world.servers.runtime.service.get_decision(copy_id)
    assert response["input"] == doc and response["policy"] == record["policy"]
    assert audit.verify_jsonl(world.jsonl).finding is None
    assert audit.verify_database(world.db).finding is None


def change(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in report["changes"] if c["change"] == name]
    assert len(found) == 1, report["changes"]
    return found[0]


def assert_replayed_changes(world: World, report: dict[str, Any]) -> None:
    """What the candidate (copy_image_set denied) changes in the world's traffic."""
    copies = world.ids["copy"] + world.ids["dry"]
    assert report["replayed"] == report["read"] == 7
    assert report["skipped"] == [] and report["errors"] == []
    to_deny = change(report, "rate-limit-to-deny")
    assert to_deny["count"] == len(copies)
    assert set(to_deny["examples"]) == set(copies)
    assert to_deny["rules"] == {"catalog.rule.copy_image_set -> catalog.rule.copy_image_set": 4}
    assert to_deny["tools"] == {f"{HEALTHIMAGING}/copy_image_set": 4}
    approval = change(report, "require-approval-to-deny")
    assert approval["examples"] == world.ids["approval"]
    # The malformed copy stays denied, now by the tool's rule (first by rule id).
    bad = change(report, "rule-changed")
    assert bad["examples"] == world.ids["bad_copy"]
    assert bad["rules"] == {"copy_image_set.datastore_id_invalid -> catalog.rule.copy_image_set": 1}
    assert report["unchanged"] == 1  # the unknown tool: denied as before
    assert report["transitions"] == {
        "deny -> deny": 2,
        "rate_limit -> deny": 4,
        "require_approval -> deny": 1,
    }
    assert report["changed"] == 6


async def test_replay_the_jsonl_log_against_a_changed_policy(world: World) -> None:
    done = await mcp_policy("replay", "--log", world.jsonl, *policy_args(world.candidate), "--json")
    assert done.returncode == 0, done.stderr
    report = report_of(done)
    assert_replayed_changes(world, report)
    assert report["chain"]["breaks"] == 0
    assert report["policy_revision"].startswith("sha256:")


async def test_replay_the_sqlite_copy(world: World) -> None:
    done = await mcp_policy("replay", "--db", world.db, *policy_args(world.candidate), "--json")
    assert done.returncode == 0, done.stderr
    assert_replayed_changes(world, report_of(done))


async def test_replay_from_the_running_service(world: World) -> None:
    args = ["replay", "--from-service", world.servers.http_url, *policy_args(world.candidate)]
    done = await mcp_policy(*args, "--json", MCP_POLICY_APPROVER_TOKEN=APPROVER_TOKEN)
    assert done.returncode == 0, done.stderr
    assert_replayed_changes(world, report_of(done))
    refused = await mcp_policy(*args, MCP_POLICY_APPROVER_TOKEN="not-the-token")
    assert refused.returncode == 4 and "answered 403" in refused.stderr
    assert_clean(refused)
    missing = await mcp_policy(*args)
    assert missing.returncode == 3 and "MCP_POLICY_APPROVER_TOKEN" in missing.stderr


async def test_fail_on_names_the_unwanted_changes(world: World) -> None:
    base = ["replay", "--log", world.jsonl, *policy_args(world.candidate)]
    failed = await mcp_policy(*base, "--fail-on", "deny-to-allow,rate-limit-to-deny")
    assert failed.returncode == 1, failed.stderr
    assert "FAILED: rate-limit-to-deny (--fail-on)" in failed.stdout
    assert "rate-limit-to-deny (rate_limit -> deny): 4" in failed.stdout
    wildcard = await mcp_policy(*base, "--fail-on", "any-to-deny", "--json")
    assert wildcard.returncode == 1 and report_of(wildcard)["failed_on"] == ["any-to-deny"]
    fine = await mcp_policy(*base, "--fail-on", "deny-to-allow,any-to-allow,limits-changed")
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "FAILED" not in fine.stdout
    # The policy the traffic was decided by changes nothing.
    same = await mcp_policy(
        "replay", "--log", world.jsonl, *policy_args(world.shipped), "--fail-on", "any", "--json"
    )
    assert same.returncode == 0, same.stdout
    report = report_of(same)
    assert report["changed"] == 0 and report["unchanged"] == 7


async def test_time_window(world: World) -> None:
    base = ["replay", "--log", world.jsonl, *policy_args(world.candidate), "--json"]
    future = await mcp_policy(*base, "--since", "2999-01-01T00:00:00Z")
    assert report_of(future)["read"] == 0
    recent = await mcp_policy(*base, "--since", "1h")
    assert report_of(recent)["read"] == 7
    past = await mcp_policy(*base, "--until", "1h")
    assert report_of(past)["read"] == 0
    db = await mcp_policy(
        "replay",
        "--db",
        world.db,
        *policy_args(world.candidate),
        "--json",
        "--since",
        "2999-01-01T00:00:00+00:00",
    )
    assert report_of(db)["read"] == 0


async def test_records_with_hashed_arguments_are_not_replayed(tmp_path: Path, world: World) -> None:
    settings = settings_for(tmp_path, decision_log_input=True)  # arguments: hash
    running = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
            decided = await decide(http, copy_call())
        await running.runtime.decision_log.flush()
    finally:
        await running.stop()
    (record,) = [r for r in records(tmp_path / "decisions.jsonl") if r.get("event") == "decision"]
    assert record["input_arguments"] == "hash"
    assert record["input"]["tool"]["arguments"] == record["arguments_sha256"]
    assert "arguments" not in record
    done = await mcp_policy(
        "replay", "--log", tmp_path / "decisions.jsonl", *policy_args(world.candidate), "--json"
    )
    report = report_of(done)
    assert report["replayed"] == 0 and report["changed"] == 0
    (skip,) = report["skipped"]
    assert "SHA-256" in skip["reason"] and "cannot be replayed exactly" in skip["reason"]
    assert decided["decision_id"]
    failing = await mcp_policy(
        "replay",
        "--log",
        tmp_path / "decisions.jsonl",
        *policy_args(world.candidate),
        "--fail-on",
        "skipped",
    )
    assert failing.returncode == 1 and "FAILED: skipped" in failing.stdout


async def test_a_log_without_inputs_says_how_to_keep_them(tmp_path: Path, world: World) -> None:
    settings = settings_for(tmp_path)  # the default: no input kept
    running = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
            await decide(http, copy_call())
        await running.runtime.decision_log.flush()
    finally:
        await running.stop()
    (record,) = [r for r in records(tmp_path / "decisions.jsonl") if r.get("event") == "decision"]
    assert "input" not in record and "policy" not in record
    done = await mcp_policy(
        "replay", "--log", tmp_path / "decisions.jsonl", *policy_args(world.candidate)
    )
    assert done.returncode == 0, done.stderr
    assert_clean(done)
    assert "MCP_POLICY_DECISION_LOG_INPUT=true" in done.stdout
    assert "1 decisions read, 0 replayed" in done.stdout


# -- OPA-format decision logs (the events the fleet uploads) ------------------------------


def opa_event(record: dict[str, Any], *, hashed: bool = False) -> dict[str, Any]:
    """A decision as the fleet uploads it (engine/policy/fleet.py `_event`): the input
    (arguments as set) and the decision with the policy's answer under result.policy."""
    tool = dict(record["input"]["tool"])
    if hashed:
        tool.pop("arguments")
        tool["arguments_sha256"] = record["arguments_sha256"]
    return {
        "decision_id": record["decision_id"],
        "path": "mcp/decision",
        "input": {**record["input"], "tool": tool},
        "result": {
            "decision_id": record["decision_id"],
            "verdict": record["verdict"],
            "rule": record["rule"],
            "reason": record["reason"],
            "policy_revision": record["policy_revision"],
            "policy": {**record["policy"], "reason": record["reason"], "matched": []},
        },
        "timestamp": record["time"],
        "metrics": {"timer_mcp_policy_decision_ns": 1000},
    }


async def test_replay_opa_format_decision_logs(tmp_path: Path, world: World) -> None:
    logged = [r for r in records(world.jsonl) if r.get("event") == "decision"]
    events = [opa_event(r) for r in logged]
    # As uploads hold them: gzip-compressed arrays, two uploads in one file.
    body = (json.dumps(events[:3]) + "\n" + json.dumps(events[3:])).encode()
    (tmp_path / "uploads.json.gz").write_bytes(gzip.compress(body))
    # One event per line, plus one whose arguments went up as a hash.
    lines = [json.dumps(e) for e in events] + [json.dumps(opa_event(logged[0], hashed=True))]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    # One plain JSON array, pretty-printed over many lines.
    (tmp_path / "events.json").write_text(json.dumps(events, indent=2))
    for name in ("uploads.json.gz", "events.jsonl", "events.json"):
        done = await mcp_policy(
            "replay", "--log", tmp_path / name, *policy_args(world.candidate), "--json"
        )
        assert done.returncode == 0, (name, done.stderr)
        report = report_of(done)
        if name == "events.jsonl":
            (skip,) = report["skipped"]
            assert skip["count"] == 1 and "SHA-256" in skip["reason"]
            report["skipped"] = []
            report["read"] -= 1
        assert_replayed_changes(world, report)


# -- hostile logs and arguments ------------------------------------------------------------


async def test_hostile_lines_are_counted_never_replayed(tmp_path: Path, world: World) -> None:
    lines = world.jsonl.read_text("ascii").splitlines()
    decisions = [i for i, text in enumerate(lines) if '"event":"decision"' in text]
    first = json.loads(lines[decisions[0]])
    forged = lines[decisions[1]].replace('"action":"rate_limit"', '"action":"allow"', 1)
    assert forged != lines[decisions[1]]
    inserted = {k: v for k, v in first.items() if k not in ("seq", "prev", "hash")}
    inserted["decision_id"] = "dec_inserted"
    inserted["policy"] = {"action": "allow", "rule": "made.up", "rate_limits": []}
    hostile = [
        *lines[: decisions[1]],
        "this is not JSON",
        forged,  # its text no longer matches its hash
        json.dumps(inserted),  # no chain fields, after the chain started
        "x" * (3 * LINE_MAX),  # longer than any line the service writes
        "[1, 2, 3]",
        '{"event": "decision", "decision_id": "dec_x"',
        *lines[decisions[1] + 1 :],
    ]
    log = tmp_path / "hostile.jsonl"
    log.write_text("\n".join(hostile) + "\n")
    done = await mcp_policy("replay", "--log", log, *policy_args(world.candidate), "--json")
    assert done.returncode == 0, done.stderr
    report = report_of(done)
    reasons = {s["reason"]: s["count"] for s in report["skipped"]}
    assert reasons.pop("not JSON") == 2
    assert any("does not match its hash" in r for r in reasons)
    assert any("without chain fields after the chain started" in r for r in reasons)
    assert any("longer than" in r for r in reasons)
    assert any("not a JSON object" in r for r in reasons)
    # Only the genuine records were replayed; nothing forged reached the counts.
    assert report["replayed"] == 6
    every_example = [x for c in report["changes"] for x in c["examples"]]
    assert "dec_inserted" not in every_example
    assert world.ids["copy"][1] not in every_example
    # The forged line is skipped, the chain after it noted as broken.
    assert report["chain"]["breaks"] >= 1
    text = await mcp_policy("replay", "--log", log, *policy_args(world.candidate))
    assert "run mcp-policy log verify" in text.stdout
    assert_clean(text)


async def test_a_record_whose_input_is_not_what_it_should_be(tmp_path: Path, world: World) -> None:
    """Unchained (legacy) records, as a forger would write them: each is read, the odd
    ones skipped with their reason, and an input of the wrong shape is evaluated as the
    service would (the policy denies it), never allowed by replay."""
    base = {"event": "decision", "time": "2026-01-05T12:00:00Z", "verdict": "allow"}
    answer = {"action": "allow", "rule": "r", "rate_limits": []}
    rows = [
        {**base, "decision_id": "d1", "input": "a string", "policy": answer},
        {**base, "decision_id": "d2", "input": {"tool": 7}, "policy": answer},
        {**base, "decision_id": "d3", "input": {"tool": {}}, "policy": {"action": "maybe"}},
        {**base, "decision_id": "d4", "input": {"tool": {}}},
        {
            **base,
            "decision_id": "d5",
            "input": {"tool": {}},
            "input_arguments": "???",
            "policy": answer,
        },
        {**base, "input": {"tool": {}}, "policy": answer},
        {**base, "decision_id": "d7", "truncated": {"input": {"bytes": 99999}}, "policy": answer},
        {"event": "invalid_request", "time": "2026-01-05T12:00:00Z"},
        {"neither": "kind"},
    ]
    log = tmp_path / "odd.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = await mcp_policy("replay", "--log", log, *policy_args(world.candidate), "--json")
    assert done.returncode == 0, done.stderr
    report = report_of(done)
    assert report["replayed"] == 1
    assert report["transitions"] == {"allow -> deny": 1}
    assert change(report, "allow-to-deny")["examples"] == ["d2"]
    reasons = " | ".join(s["reason"] for s in report["skipped"])
    for said in (
        "not a JSON object",
        "malformed",
        "no answer",
        "input_arguments",
        "no decision_id",
        "would have made the record larger",
        "neither a decision record",
    ):
        assert said in reasons, (said, reasons)
    assert sum(s["count"] for s in report["skipped"]) == 7


async def test_bad_arguments_and_unreadable_sources(tmp_path: Path, world: World) -> None:
    policy = policy_args(world.candidate)
    cases: list[tuple[list[str | Path], int, str]] = [
        (
            ["--log", world.jsonl, "--fail-on", "allow-to-maybe"],
            3,
            "unknown change 'allow-to-maybe'",
        ),
        (["--log", world.jsonl, "--fail-on", ","], 3, "name at least one change"),
        (["--log", world.jsonl, "--since", "yesterday"], 3, "--since 'yesterday'"),
        (["--log", world.jsonl, "--until", "2026-01-05T12:00:00"], 3, "timezone"),
        (["--log", world.jsonl, "--workers", "0"], 3, "--workers"),
        (["--log", tmp_path / "nothing.jsonl"], 4, "no such file"),
        (["--log", tmp_path], 4, "is a directory"),
        (["--db", tmp_path / "nothing.sqlite3"], 4, "no such file"),
        (["--db", world.jsonl], 4, "not a decision log database"),
        (["--from-service", "file:///etc/passwd"], 3, "http(s) URL"),
    ]
    for args, status, said in cases:
        done = await mcp_policy("replay", *args, *policy, MCP_POLICY_APPROVER_TOKEN="t")
        assert done.returncode == status, (args, done.stdout, done.stderr)
        assert said in done.stderr, (args, done.stderr)
        assert_clean(done)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + os.urandom(512))
    (tmp_path / "open.json").write_text('[{"decision_id": "a"}, ')
    (tmp_path / "glued.json").write_text('[{"decision_id": "a"} {"decision_id": "b"}]')
    for name, said in (
        ("bad.gz", "cannot be read"),
        ("open.json", "does not end"),
        ("glued.json", "expected , or ]"),
    ):
        done = await mcp_policy("replay", "--log", tmp_path / name, *policy)
        assert done.returncode == 4, (name, done.stderr)
        assert said in done.stderr, (name, done.stderr)
        assert_clean(done)
    broken = tmp_path / "broken-policy"
    broken.mkdir()
    (broken / "x.rego").write_text("package mcp.rules.x\n\ndeny contains if {\n")
    done = await mcp_policy("replay", "--log", world.jsonl, "--policy", broken)
    assert done.returncode == 2 and "policy rejected" in done.stderr
    assert_clean(done)
    unknown = await mcp_policy("replay", "--log", world.jsonl, *policy, "--no-such-flag")
    assert unknown.returncode == 2 and "unrecognized arguments" in unknown.stderr


async def test_a_huge_value_is_refused_without_reading_it_all(tmp_path: Path, world: World) -> None:
    """An OPA-format file whose one value is larger than replay reads (64 MiB): refused in
    one line, read in growing chunks (not re-parsed chunk by chunk)."""
    huge = tmp_path / "huge.json.gz"
    with gzip.open(huge, "wt", compresslevel=1) as f:
        f.write('[{"decision_id": "a", "input": {"pad": "')
        block = "y" * (1024 * 1024)
        for _ in range(70):
            f.write(block)
        f.write('"}}]')
    done = await mcp_policy("replay", "--log", huge, *policy_args(world.candidate))
    assert done.returncode == 4, done.stderr
    assert "larger than 64 MiB" in done.stderr
    assert_clean(done)


async def test_an_input_too_large_for_a_line_is_left_out(tmp_path: Path, world: World) -> None:
    """Raw arguments of 40 KB fit in the record once, not twice: the record keeps them
    and the rest of itself, and names the input it left out; replay says why it skips it."""
    settings = settings_for(
        tmp_path,
        decision_log_input=True,
        decision_log_arguments="raw",
        decision_log_max_argument_bytes=60_000,
    )
    running = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
            body = {**UNKNOWN_TOOL, "arguments": {"blob": "x" * 40_000}}
            decided = await decide(http, {**body, "principal": {"session_id": session()}})
        await running.runtime.decision_log.flush()
    finally:
        await running.stop()
    (record,) = [r for r in records(tmp_path / "decisions.jsonl") if r.get("event") == "decision"]
    assert record["decision_id"] == decided["decision_id"]
    assert record["arguments"] == {"blob": "x" * 40_000}
    assert "input" not in record
    assert record["truncated"]["input"]["bytes"] > 40_000
    assert record["policy"]["rule"] == "catalog.default"
    assert audit.verify_jsonl(tmp_path / "decisions.jsonl").finding is None
    done = await mcp_policy(
        "replay", "--log", tmp_path / "decisions.jsonl", *policy_args(world.candidate), "--json"
    )
    (skip,) = report_of(done)["skipped"]
    assert "would have made the record larger" in skip["reason"]
