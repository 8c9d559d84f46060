"""`mcp-policy approvals list|show|approve|deny` against a real service, as an approver in a
terminal would run it: the same credentials and rules as the API (four eyes, already
decided, unknown ids), the identical call going through once approved, a denial's comment
reaching the agent, and nothing hostile in a call reaching the terminal raw."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine.identity import add_entry
from engine.transports.server import Servers, start_servers
from tests.clients import HttpClient
from tests.conftest import approval_call, copy_policy, settings_for

MCP_POLICY = Path(sys.executable).with_name("mcp-policy")


@dataclass
class Service:
    servers: Servers
    http: HttpClient
    tokens: dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    tmp = tmp_path_factory.mktemp("approvals-cli")
    path = tmp / "approvers.yaml"
    tokens = {
        "alice": add_entry(path, "approver", "alice", user_id="alice"),
        "uma": add_entry(path, "approver", "uma", user_id="user-1"),  # the calls' user
    }
    rego, data = copy_policy(tmp)
    servers = await start_servers(settings_for(tmp, policy_paths=[rego, data], approvers_file=path))
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
        yield Service(servers, HttpClient(raw), tokens, tmp)
    await servers.stop()


async def cli(
    service: Service, *args: str, token: str | None = None, token_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    if token is not None:
        env["MCP_POLICY_APPROVER_TOKEN"] = token
    command = [str(MCP_POLICY), "approvals", *args, "--url", service.servers.http_url]
    if token_file is not None:
        command += ["--token-file", str(token_file)]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, env=env, check=False
    )


async def test_list_show_approve_and_the_call_goes_through(service: Service) -> None:
    call = approval_call()
    approval_id = (await service.http.decide(call))["approval"]["id"]
    alice = service.tokens["alice"]

    listed = await cli(service, "list", token=alice)
    assert listed.returncode == 0, listed.stderr
    assert approval_id in listed.stdout
    assert "copy_image_set" in listed.stdout
    as_json = json.loads((await cli(service, "list", "--json", token=alice)).stdout)
    assert approval_id in [a["id"] for a in as_json]

    shown = await cli(service, "show", approval_id, token=alice)
    assert shown.returncode == 0, shown.stderr
    assert "copy_image_set.existing_destination" in shown.stdout
    assert "destinationImageSet" in shown.stdout
    assert "asserted, not proven" in shown.stdout

    secret = service.tmp / "alice.token"
    secret.write_text(alice + "\n")
    approved = await cli(service, "approve", approval_id, "--comment", "ok", token_file=secret)
    assert approved.returncode == 0, approved.stderr
    assert f"{approval_id}: approved by alice" in approved.stdout
    assert (await service.http.decide(call))["verdict"] == "allow"
    used = await cli(service, "show", approval_id, token=alice)
    assert "used" in used.stdout.splitlines()[0]
    again = await cli(service, "approve", approval_id, token=alice)
    assert again.returncode == 1
    assert "409" in again.stderr and "not pending" in again.stderr


async def test_deny_with_a_comment_reaches_the_agent(service: Service) -> None:
    call = approval_call()
    approval_id = (await service.http.decide(call))["approval"]["id"]
    denied = await cli(
        service, "deny", approval_id, "--comment", "wrong datastore", token=service.tokens["alice"]
    )
    assert denied.returncode == 0, denied.stderr
    again = await service.http.decide({**call, "approval_id": approval_id})
    assert again["verdict"] == "deny"
    assert "wrong datastore" in again["reason"]


async def test_the_same_rules_as_the_api(service: Service) -> None:
    """Four eyes (uma is the calls' user), a wrong credential, an unknown id, no credential:
    refused with the service's reason, and nothing decided."""
    approval_id = (await service.http.decide(approval_call()))["approval"]["id"]
    own = await cli(service, "approve", approval_id, token=service.tokens["uma"])
    assert own.returncode == 1
    assert "own behalf" in own.stderr
    listed = await cli(service, "list", "--json", token=service.tokens["uma"])
    assert approval_id not in [a["id"] for a in json.loads(listed.stdout)]
    wrong = await cli(service, "approve", approval_id, token="mcpa_not-a-real-secret")
    assert (wrong.returncode, "401" in wrong.stderr) == (1, True)
    unknown = await cli(service, "show", "apr_" + "0" * 32, token=service.tokens["alice"])
    assert (unknown.returncode, "404" in unknown.stderr) == (1, True)
    hostile = await cli(service, "show", "../../v1/status", token=service.tokens["alice"])
    assert hostile.returncode == 1
    missing = await cli(service, "list")
    assert missing.returncode == 3
    assert "MCP_POLICY_APPROVER_TOKEN" in missing.stderr
    gone = await asyncio.to_thread(
        subprocess.run,
        [str(MCP_POLICY), "approvals", "list", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MCP_POLICY_APPROVER_TOKEN": "x"},
        check=False,
    )
    assert gone.returncode == 4
    status = await service.http.get_approval(service.tokens["alice"], approval_id)
    assert status["status"] == "pending"


async def test_nothing_in_a_call_reaches_the_terminal_raw(service: Service) -> None:
    """A terminal escape sequence and a very long value in the arguments are shown
    escaped and folded."""
    call = approval_call()
    call["arguments"]["note"] = "\x1b]0;pwned\x07" + "A" * 5000
    approval_id = (await service.http.decide(call))["approval"]["id"]
    shown = await cli(service, "show", approval_id, token=service.tokens["alice"])
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "(5010 characters)" in shown.stdout
    assert "A" * 1000 not in shown.stdout
