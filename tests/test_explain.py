"""`mcp-policy explain` and GET /v1/decisions/{id}/explain: why a call gets its decision.

A real service keeps the input of its decisions; a logged decision is explained from its
SQLite copy and its JSONL log, by the CLI (in a process of its own) against a changed
policy and by the service itself over HTTP (operator only). A call given on standard input
is explained too. What the explanation says comes from the policy (data.mcp.explain): the
tests check it against the decision the service made. Hostile input (not JSON, the wrong
shape, terminal escapes, forged and foreign ids, records without input) gives one clear
line or a 4xx, never a traceback or a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

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

AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    return {**env, **extra}


async def explain(
    *args: str | Path, stdin: bytes = b"", **env: str
) -> subprocess.CompletedProcess[bytes]:
    """`mcp-policy explain` in a process of its own (off the event loop)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "explain", *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        env=clean_env(**env),
    )
    assert b"Traceback" not in done.stdout + done.stderr, done.stderr
    return done


def as_json(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    explained: dict[str, Any] = json.loads(done.stdout)
    return explained


@dataclass
class World:
    servers: Servers
    http: httpx.AsyncClient
    jsonl: Path
    db: Path
    live: list[Path]
    candidate: list[Path]
    copy_id: str
    approval_id: str


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("explain")
    live = copy_policy(tmp / "live")
    candidate = copy_policy(tmp / "candidate")
    add_tools(candidate[1], rules={"copy_image_set": {"action": "deny", "reason": "no copies"}})
    settings = settings_for(
        tmp,
        policy_paths=list(live),
        decision_log_input=True,
        decision_log_arguments="redacted",
        decision_log_redact=["comment"],
    )
    running = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
            copied = (await http.post("/v1/decide", json=copy_call())).json()
            approval = (await http.post("/v1/decide", json=approval_call())).json()
            await running.runtime.decision_log.flush()
            yield World(
                running,
                http,
                tmp / "decisions.jsonl",
                settings.state_dir / "decisions.sqlite3",
                list(live),
                list(candidate),
                copied["decision_id"],
                approval["decision_id"],
            )
    finally:
        await running.stop()


def policy_args(paths: list[Path]) -> list[str]:
    return [arg for path in paths for arg in ("--policy", str(path))]


def statuses(explained: dict[str, Any]) -> dict[str, str]:
    return {c["rule"]: c["status"] for c in explained["explanation"]["contributions"]}


async def test_explain_a_call_from_stdin(world: World) -> None:
    call = json.dumps(copy_call()).encode()
    done = await explain(*policy_args(world.live), "--json", stdin=call)
    explained = as_json(done)
    e = explained["explanation"]
    assert e["decision"]["action"] == "rate_limit"
    assert e["winner"] == {
        "level": "rate_limit",
        "rule": "catalog.rule.copy_image_set",
        "why": "rate_limit is the most restrictive level with an enforced contribution "
        "(deny > require_approval > rate_limit > allow); of the 2 enforced contributions "
        "at that level, catalog.rule.copy_image_set comes first by rule id",
    }
    assert statuses(explained) == {
        "catalog.rule.copy_image_set": "won",
        "copy_image_set.agent_limit": "at the winning level",
    }
    first = e["contributions"][0]
    assert first["package"] == "mcp.rules.catalog" and first["shadow"] is False
    assert [s["status"] for s in e["yaml"]["walk"]] == [
        "enforced: ends the walk",
        "not reached: the walk ended before it",
        "skipped: the tool is in the catalog",
    ]
    assert e["yaml"]["tool"] == {"known": True, "category": "write", "risk": "medium"}
    assert [lim["max"] for lim in e["limits"]] == [10, 20]
    assert e["approval"] is None
    assert explained["input"]["tool"]["name"] == "copy_image_set"
    assert explained["input"]["request"]["transport"] == "offline"
    # The same for a person, from a file.
    text = await explain(*policy_args(world.live), stdin=call)
    out = text.stdout.decode()
    assert text.returncode == 0
    for said in (
        "decision: rate_limit by rule catalog.rule.copy_image_set",
        "[won] rate_limit catalog.rule.copy_image_set (mcp.rules.catalog, enforced)",
        "YAML chain walked for the tool (catalogued: write, medium risk)",
        'rules["copy_image_set"]',
        "catalog.rule.copy_image_set: at most 10 per 60 s, scope session",
        "input document",
    ):
        assert said in out, (said, out)


async def test_explain_an_approval_and_a_tool_not_in_the_catalog(world: World) -> None:
    approval = as_json(
        await explain(
            *policy_args(world.live), "--json", stdin=json.dumps(approval_call()).encode()
        )
    )
    e = approval["explanation"]
    assert e["winner"]["level"] == "require_approval"
    assert e["approval"]["rule"] == "copy_image_set.existing_destination"
    # The catalog's limit applies beside the approval.
    assert statuses(approval)["catalog.rule.copy_image_set"] == "applies"
    unknown = {"server": "files.example", "tool": "read_file", "principal": {"session_id": "s"}}
    explained = as_json(
        await explain(
            *policy_args(world.live),
            "--json",
            "--time",
            "2026-01-05T09:00:00Z",
            stdin=json.dumps(unknown).encode(),
        )
    )
    e = explained["explanation"]
    assert e["decision"]["rule"] == "catalog.default"
    assert [s["status"] for s in e["yaml"]["walk"]] == [
        "skipped: the tool is not in the catalog",
        "skipped: the tool is not in the catalog",
        "enforced: ends the walk",
    ]
    assert explained["input"]["request"]["time"] == "2026-01-05T09:00:00.000Z"


async def test_explain_a_logged_decision_against_a_changed_policy(world: World) -> None:
    for source in (["--db", world.db], ["--log", world.jsonl]):
        explained = as_json(
            await explain(
                "--decision-id", world.copy_id, *source, *policy_args(world.candidate), "--json"
            )
        )
        assert explained["logged"]["verdict"] == "allow"
        assert explained["logged"]["policy"]["action"] == "rate_limit"
        assert explained["input"]["request"]["id"] == world.copy_id
        assert explained["input"]["tool"]["server"] == HEALTHIMAGING
        e = explained["explanation"]
        assert e["winner"]["level"] == "deny"
        assert e["decision"]["reason"] == "no copies"
        assert statuses(explained) == {
            "catalog.rule.copy_image_set": "won",
            "copy_image_set.agent_limit": "outranked",
        }
        # Logged redacted: explained, and said so.
        assert any("redacted" in note for note in explained["notes"])
        assert e["limits"] == []
    text = await explain(
        "--decision-id", world.copy_id, "--db", world.db, *policy_args(world.candidate)
    )
    out = text.stdout.decode()
    assert "logged: allow by rule catalog.rule.copy_image_set" in out
    assert "decision: deny by rule catalog.rule.copy_image_set" in out
    assert "[outranked] rate_limit copy_image_set.agent_limit" in out


async def test_explain_over_http_for_operators(world: World) -> None:
    http = world.http
    response = await http.get(f"/v1/decisions/{world.approval_id}/explain", headers=AUTH)
    assert response.status_code == 200, response.text
    explained = response.json()
    logged = (await http.get(f"/v1/decisions/{world.approval_id}", headers=AUTH)).json()
    e = explained["explanation"]
    # The running policy explains the decision it made.
    assert e["decision"]["action"] == logged["policy"]["action"] == "require_approval"
    assert e["winner"]["rule"] == logged["rule"]
    assert explained["policy_revision"] == logged["policy_revision"]
    assert explained["logged"]["decision_id"] == world.approval_id
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer not-the-token"}, 403),
        ({"Authorization": "Basic x"}, 401),
    ):
        refused = await http.get(f"/v1/decisions/{world.copy_id}/explain", headers=headers)
        assert refused.status_code == status, refused.text
        assert "explanation" not in refused.text
    for decision_id, status in (
        ("dec_" + "0" * 32, 404),
        ("dec_%00%0a%1b[31m", 404),
        ("' OR 1=1 --", 404),
        ("x" * 300, 422),
    ):
        answer = await http.get(f"/v1/decisions/{decision_id}/explain", headers=AUTH)
        assert answer.status_code == status, (decision_id, answer.text)
        assert answer.json()["error"]["code"]


async def test_records_without_input_are_refused_with_what_to_change(tmp_path: Path) -> None:
    """A record with no input (the default), and one with only the arguments' hash: 409
    over HTTP, exit 1 from the CLI, each naming the setting; nothing explained."""
    for overrides, said in (
        ({}, "MCP_POLICY_DECISION_LOG_INPUT=true"),
        ({"decision_log_input": True}, "SHA-256"),
    ):
        directory = tmp_path / str(len(overrides))
        running = await start_servers(settings_for(directory, **overrides))
        try:
            async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
                decided = (await http.post("/v1/decide", json=copy_call())).json()
                answer = await http.get(
                    f"/v1/decisions/{decided['decision_id']}/explain", headers=AUTH
                )
            assert answer.status_code == 409, answer.text
            assert said in answer.json()["error"]["message"]
            assert answer.json()["error"]["code"] == "Conflict"
        finally:
            await running.stop()
        done = await explain(
            "--decision-id", decided["decision_id"], "--db", directory / "state/decisions.sqlite3"
        )
        assert done.returncode == 1, done.stderr
        assert said in done.stderr.decode()
        assert done.stdout == b""


async def test_forged_records_are_not_explained(tmp_path: Path, world: World) -> None:
    """A record edited in either store no longer matches its hash: refused, not explained."""
    forged_db = tmp_path / "forged.sqlite3"
    with sqlite3.connect(world.db) as source, sqlite3.connect(forged_db) as target:
        source.backup(target)
    with sqlite3.connect(forged_db) as db:
        (record,) = db.execute(
            "SELECT record FROM decisions WHERE decision_id = ?", (world.copy_id,)
        ).fetchone()
        db.execute(
            "UPDATE decisions SET record = ? WHERE decision_id = ?",
            (record.replace('"rate_limit"', '"allow"'), world.copy_id),
        )
    db_done = await explain("--decision-id", world.copy_id, "--db", forged_db)
    forged_log = tmp_path / "forged.jsonl"
    forged_log.write_text(
        world.jsonl.read_text().replace('"action":"rate_limit"', '"action":"allow"')
    )
    log_done = await explain("--decision-id", world.copy_id, "--log", forged_log)
    for done in (db_done, log_done):
        assert done.returncode == 1, done.stderr
        assert b"does not match its hash" in done.stderr
        assert done.stdout == b""
    missing = await explain("--decision-id", "dec_nope", "--db", world.db)
    assert missing.returncode == 1 and b"no decision" in missing.stderr
    not_db = await explain("--decision-id", "dec_nope", "--db", world.jsonl)
    assert not_db.returncode == 1 and b"not a decision log database" in not_db.stderr


async def test_hostile_calls_get_one_clear_line(tmp_path: Path, world: World) -> None:
    policy = policy_args(world.live)
    for stdin, said in (
        (b"not json", b"the call"),
        (b"[1, 2]", b"must be a JSON object"),
        (b'{"tool": "copy_image_set"}', b"server"),
        (b'{"a": 1, "a": 2}', b"duplicate"),
        (b"\xff\xfe", b"UTF-8"),
        (b"[" * 5000 + b"]" * 5000, b"deeper than"),
        (b" " * (1024 * 1024 + 10), b"over"),
    ):
        done = await explain(*policy, stdin=stdin)
        assert done.returncode == 3, (stdin[:40], done.stderr)
        assert said in done.stderr, (stdin[:40], done.stderr)
        assert done.stdout == b""
    for args, said in (
        (["--time", "tomorrow"], b"--time"),
        (["--decision-id", world.copy_id, "--time", "1h"], b"give no FILE or --time"),
        (["--db", world.db], b"only with --decision-id"),
        (["--decision-id", "x" * 300], b"1 to 256"),
        (["--policy", tmp_path / "nothing"], b"not a directory"),
        ([tmp_path / "missing.json"], b"cannot read"),
    ):
        done = await explain(*args, *policy, stdin=json.dumps(copy_call()).encode())
        assert done.returncode == 3, (args, done.stderr)
        assert said in done.stderr, (args, done.stderr)
    # An input document of the wrong shape is explained as the policy sees it: denied.
    odd = as_json(await explain(*policy, "--json", stdin=b'{"tool": {"name": 7}}'))
    assert odd["explanation"]["decision"]["action"] == "deny"
    # Terminal escapes in what a caller sent never reach the terminal as escapes.
    escaping = {
        "server": "srv\u001b[2J",
        "tool": "copy_image_set",
        "arguments": {"x": "\u001b]0;owned\u0007"},
        "principal": {"session_id": session(), "agent_id": "\u202eevil"},
    }
    shown = await explain(*policy, stdin=json.dumps(escaping).encode())
    assert shown.returncode == 0, shown.stderr
    assert b"\x1b" not in shown.stdout and b"\x07" not in shown.stdout
    assert "\u202e".encode() not in shown.stdout
    assert b"srv\\x1b[2J" in shown.stdout


def test_a_teams_repository_is_explained_on_the_installed_framework(
    tmp_path: Path,
) -> None:
    """In a repository `mcp-policy init` wrote (no framework of its own), --policy rego
    --policy policies is explained with the installed framework added (replay too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    subprocess.run([*CLI, "init", str(tmp_path / "repo")], check=True, env=env, timeout=60)
    call = {
        "server": "mail",
        "tool": "send_email",
        "arguments": {"to": ["eve@elsewhere.org"]},
        "principal": {"agent_id": "a", "session_id": "s", "user_id": "ana"},
    }
    done = subprocess.run(
        [*CLI, "explain", "--json", "--policy", "rego", "--policy", "policies"],
        input=json.dumps(call),
        capture_output=True,
        text=True,
        cwd=tmp_path / "repo",
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "outbound_mail.external_recipient" in done.stdout
