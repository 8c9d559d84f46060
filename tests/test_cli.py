"""The console script as a user runs it: `mcp-policy decide` and `mcp-policy serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import APPROVER_TOKEN, approval_call, copy_call, copy_policy
from tests.processes import CLI, Serve


def run_decide(body: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "decide", *args],
        input=json.dumps(body),
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_decide_reads_json_and_prints_the_decision(tmp_path: Path) -> None:
    result = run_decide(copy_call(), "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["verdict"] == "allow"
    assert decision["rule"] == "catalog.rule.copy_image_set"
    denied = json.loads(
        run_decide(copy_call(datastore_id="x"), "--state-dir", str(tmp_path)).stdout
    )
    assert denied["verdict"] == "deny"
    assert "datastore_id" in denied["reason"]


def test_decide_rejects_bad_input_with_a_message(tmp_path: Path) -> None:
    result = run_decide({"server": "x"}, "--state-dir", str(tmp_path))
    assert result.returncode == 3
    assert "principal" in result.stderr


def test_decide_refuses_hostile_json_in_one_line(tmp_path: Path) -> None:
    """The console command parses as strictly as the service: surrogates, huge numbers,
    bytes that are not UTF-8 and odd field names are one JSON error line, exit 3."""
    good = json.dumps(copy_call())
    hostile = [
        good.replace('"copy_image_set"', '"copy\\ud800"').encode(),
        good.replace('"user-1"', '"\\udfff"').encode(),
        good.replace("{", '{"n": ' + "9" * 5000 + ", ", 1).encode(),
        good.replace("{", '{"n": 1e400, ', 1).encode(),
        good.encode() + b"\xff",
        good.replace("{", '{"' + "k" * 200_000 + '": 1, ', 1).encode(),
    ]
    for text in hostile:
        result = subprocess.run(
            [*CLI, "decide", "--state-dir", str(tmp_path)],
            input=text,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 3, result.stderr
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0], lines[:3]
        assert len(lines[0]) < 2048
        assert json.loads(lines[0])["error"]["message"]


def test_decide_finds_the_checkouts_opa_without_path(tmp_path: Path) -> None:
    """As the README runs it: a plain shell whose PATH lacks .tools/bin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(
        [*CLI, "decide", "--state-dir", str(tmp_path)],
        input=json.dumps(copy_call()),
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verdict"] == "allow"


@pytest.mark.parametrize(
    ("variables", "hint"),
    [
        (
            {"MCP_POLICY_ENGINE": "opa", "MCP_POLICY_OPA_BINARY": "no-opa"},
            "go install github.com/open-policy-agent/opa@v",
        ),
        (
            {"MCP_POLICY_ENGINE": "inprocess", "MCP_POLICY_OPA_LIBRARY": "no-library.so"},
            "make tools",
        ),
    ],
    ids=["opa-server", "in-process"],
)
def test_a_missing_engine_is_one_line_saying_how_to_get_it(
    tmp_path: Path, variables: dict[str, str], hint: str
) -> None:
    env = {
        **os.environ,
        **{k: str(tmp_path / v) if v.startswith("no-") else v for k, v in variables.items()},
    }
    for command in (["decide"], ["serve", "--http-port", "0", "--grpc-port", "0"]):
        result = subprocess.run(
            [*CLI, *command, "--state-dir", str(tmp_path)],
            input=json.dumps(copy_call()),
            text=True,
            capture_output=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert hint in lines[0]


def test_serve_reloads_on_sighup_and_stops_cleanly(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    server = Serve(tmp_path, [rego, data], {})
    try:
        token_line = server.wait_for("approver token")
        token = token_line.rsplit(" ", 1)[1].strip()
        pending = server.decide(approval_call())["approval"]["id"]
        listed = httpx.get(
            f"{server.url}/v1/approvals",
            params={"status": "pending"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert pending in [a["id"] for a in listed.json()]
        before = server.decide(copy_call())["policy_revision"]

        rules = data / "rules.yaml"
        rules.write_text(rules.read_text().replace("max: 10", "max: 2"))
        server.proc.send_signal(signal.SIGHUP)
        loaded = server.wait_for("loaded")
        after = server.decide(copy_call())
        assert after["policy_revision"] != before
        assert after["policy_revision"] in loaded
        assert after["rate_limit"]["limit"] == 2

        (rego / "mcp" / "decision.rego").write_text("package mcp\n\ndecision := {\n")
        server.proc.send_signal(signal.SIGHUP)
        rejected = server.wait_for("reload rejected")
        assert after["policy_revision"] in rejected
        still = server.decide(copy_call())
        assert still["policy_revision"] == after["policy_revision"]
        assert still["verdict"] == "allow"
    finally:
        assert server.stop() == 0
    assert "mcp-policy: stopping" in "".join(server.lines)


def test_serve_exits_with_opas_message_on_a_broken_policy(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    (rego / "mcp" / "decision.rego").write_text("package mcp\n\ndecision := {\n")
    result = subprocess.run(
        [
            *CLI,
            "serve",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--state-dir",
            str(tmp_path / "state"),
            "--policy",
            str(rego),
            "--policy",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "policy rejected" in result.stderr
    assert "decision.rego" in result.stderr


async def test_status_prints_a_summary_of_a_running_service(servers: Any, http: Any) -> None:
    import asyncio

    denied = await http.decide(copy_call(datastore_id="nope"))
    pending = await http.decide(approval_call())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    command = [*CLI, "status", "--url", servers.http_url]

    def run(extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, **extra_env},
            check=False,
        )

    result = await asyncio.to_thread(run, {"MCP_POLICY_APPROVER_TOKEN": APPROVER_TOKEN})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    denials = out.split("denials by rule", 1)[1].split("approvals required by rule", 1)[0]
    approvals = out.split("approvals required by rule", 1)[1].split("top tools", 1)[0]
    assert "copy_image_set.datastore_id_invalid" in denials
    assert "copy_image_set.existing_destination" in approvals, "counted apart from denials"
    assert "copy_image_set.existing_destination" not in denials
    assert pending["approval"]["id"] in out
    assert denied["reason"][:40] in out
    as_json = await asyncio.to_thread(run, {"MCP_POLICY_APPROVER_TOKEN": APPROVER_TOKEN}, "--json")
    assert json.loads(as_json.stdout)["calls"] >= 2
    wrong = await asyncio.to_thread(run, {"MCP_POLICY_APPROVER_TOKEN": "wrong"})
    assert wrong.returncode == 4
    assert "403" in wrong.stderr
    missing = await asyncio.to_thread(run, {})
    assert missing.returncode == 3
