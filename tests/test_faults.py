"""Faults fail closed: OPA killed, slow, gone, or giving a bad answer never yields an allow,
a policy OPA rejects never replaces the running one, and the service keeps answering."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from engine.errors import PolicyRejected
from engine.policy.opa_process import OpaProcess
from engine.policy.source import read_bundle
from engine.transports.server import Servers, start_servers
from tests.clients import HttpClient
from tests.conftest import copy_call, copy_policy, settings_for

SLOW_RULE = """# Burns far more than the 250 ms evaluation deadline when the caller asks for it.
deny contains {"rule": "slow.never", "reason": "unreachable"} if {
	input.context.slow == true
	count([x | some x in numbers.range(1, 20000000)]) < 0
}
"""


def add_rule_package(rego: Path, name: str, body: str) -> None:
    """A user-style rule package rego/mcp/rules/<name>/<name>.rego."""
    folder = rego / "mcp" / "rules" / name
    folder.mkdir()
    (folder / f"{name}.rego").write_text(f"package mcp.rules.{name}\n\n{body}\n")


async def _wait_for(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_opa_killed_mid_run_fails_closed_then_recovers(tmp_path: Path) -> None:
    servers = await start_servers(settings_for(tmp_path, engine="opa"))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            revision = (await client.decide(copy_call()))["policy_revision"]
            process = servers.runtime.opa_process
            assert process is not None and process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            seen = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                decision = await client.decide(copy_call())
                seen.append(decision)
                if decision["verdict"] == "allow" and process.restarts >= 1:
                    break
            unavailable = [d for d in seen if d["rule"] == "engine.unavailable"]
            assert unavailable, "decisions while OPA was down must be answered with deny"
            assert all(d["verdict"] == "deny" for d in unavailable)
            assert "policy engine unavailable" in unavailable[0]["reason"]
            assert unavailable[0]["mcp_result"]["isError"] is True
            assert seen[-1]["verdict"] == "allow", "the supervisor restarts OPA and reloads"
            assert seen[-1]["policy_revision"] == revision
            assert process.restarts == 1
            assert (await raw.get("/readyz")).status_code == 200
    finally:
        await servers.stop()


@pytest.fixture(params=["inprocess", "opa"])
async def external_opa(request: pytest.FixtureRequest) -> OpaProcess | None:
    """Each engine: None for OPA in the service's process, else an OPA server of its own."""
    if request.param == "inprocess":
        yield None  # type: ignore[misc]
        return
    process = OpaProcess("opa")
    await process.start()
    try:
        yield process  # type: ignore[misc]
    finally:
        await process.stop()


async def _service_on(
    tmp: Path, opa: OpaProcess | None, rego: Path, data: Path, **overrides: object
) -> Servers:
    if opa is not None:
        overrides["opa_url"] = opa.url
    return await start_servers(settings_for(tmp, policy_paths=[rego, data], **overrides))


async def test_slow_policy_times_out_to_deny(
    tmp_path: Path, external_opa: OpaProcess | None
) -> None:
    rego, data = copy_policy(tmp_path)
    add_rule_package(rego, "slow", SLOW_RULE)
    servers = await _service_on(tmp_path, external_opa, rego, data)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            started = time.monotonic()
            slow = await client.decide({**copy_call(), "context": {"slow": True}})
            elapsed = time.monotonic() - started
            assert slow["verdict"] == "deny"
            assert slow["rule"] == "engine.unavailable"
            assert "did not answer within 250 ms" in slow["reason"]
            assert elapsed < 2, "the deadline cuts the wait short"
            assert (await client.decide(copy_call()))["verdict"] == "allow"
    finally:
        await servers.stop()


@pytest.mark.parametrize(
    ("module", "words"),
    [
        ('package mcp\n\ndecision := {"action": "maybe", "rule": "x"}\n', "malformed"),
        ('package mcp\n\ndecision := "allow"\n', "malformed"),
        ('package mcp\n\ndecision := {"action": "allow"}\n', "malformed"),
        ("package mcp\n\nsomething_else := 1\n", "undefined"),
        (
            'package mcp\n\ndecision := {"action": "allow"} if input.tool.name\n'
            'decision := {"action": "deny"} if input.tool.server\n',
            "conflict|HTTP 500",  # in-process: OPA's message; OPA's server: its status
        ),
    ],
)
async def test_bad_policy_result_is_denied(
    tmp_path: Path, external_opa: OpaProcess | None, module: str, words: str
) -> None:
    rego = tmp_path / "rego"
    rego.mkdir()
    (rego / "decision.rego").write_text(module)
    data = tmp_path / "policies"
    data.mkdir()
    servers = await _service_on(tmp_path, external_opa, rego, data)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            decision = await HttpClient(raw).decide(copy_call())
            assert decision["verdict"] == "deny"
            assert decision["rule"] == "engine.unavailable"
            assert any(word in decision["reason"] for word in words.split("|"))
    finally:
        await servers.stop()


async def test_external_opa_down_then_back(tmp_path: Path) -> None:
    opa = OpaProcess("opa")
    await opa.start()
    rego, data = copy_policy(tmp_path)
    servers = await _service_on(tmp_path, opa, rego, data)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            assert (await client.decide(copy_call()))["verdict"] == "allow"
            await opa.stop()
            down = await client.decide(copy_call())
            assert down["verdict"] == "deny"
            assert "unreachable" in down["reason"]
            assert (await raw.get("/readyz")).status_code == 503
            # The same OPA comes back empty; the service notices and loads the policy again.
            opa._stopping = False
            await opa.start()

            async def allowed() -> bool:
                return (await client.decide(copy_call()))["verdict"] == "allow"

            await _wait_for(allowed)
            assert (await raw.get("/readyz")).status_code == 200
    finally:
        await servers.stop()
        await opa.stop()


async def test_policy_that_does_not_compile_never_replaces_the_running_one(
    tmp_path: Path, servers: Servers, http: HttpClient
) -> None:
    rego, data = copy_policy(tmp_path)
    policy = servers.runtime.policy
    before = policy.revision
    decision_rego = rego / "mcp" / "decision.rego"
    decision_rego.write_text(decision_rego.read_text() + "\nbroken := {\n")
    with pytest.raises(PolicyRejected) as caught:
        await policy.load(read_bundle([rego, data]))
    assert "decision.rego" in caught.value.message
    assert policy.revision == before
    decision = await http.decide(copy_call())
    assert decision["verdict"] == "allow"
    assert decision["policy_revision"] == before


async def test_partial_policy_update_is_rolled_back(
    tmp_path: Path, servers: Servers, http: HttpClient
) -> None:
    """One good and one bad module in one change: neither is applied."""
    rego, data = copy_policy(tmp_path)
    policy = servers.runtime.policy
    before = policy.revision
    add_rule_package(rego, "extra", 'deny contains {"rule": "extra.all", "reason": "no"} if true')
    add_rule_package(rego, "zzz", "x := ")
    with pytest.raises(PolicyRejected):
        await policy.load(read_bundle([rego, data]))
    decision = await http.decide(copy_call())
    assert decision["verdict"] == "allow", "the good half of a rejected change is not live"
    assert policy.revision == before


async def test_new_policy_changes_the_revision(
    tmp_path: Path, servers: Servers, http: HttpClient
) -> None:
    rego, data = copy_policy(tmp_path)
    policy = servers.runtime.policy
    original = policy.bundle
    assert original is not None
    add_rule_package(
        rego,
        "extra",
        'deny contains {"rule": "extra.all", "reason": "frozen"} if input.context.freeze == true',
    )
    try:
        new_revision = await policy.load(read_bundle([rego, data]))
        assert new_revision != original.revision
        frozen = await http.decide({**copy_call(), "context": {"freeze": True}})
        assert frozen["verdict"] == "deny"
        assert frozen["rule"] == "extra.all"
        assert frozen["policy_revision"] == new_revision
    finally:
        await policy.load(original)
    assert (await http.decide({**copy_call(), "context": {"freeze": True}}))["verdict"] == "allow"


async def test_service_refuses_to_start_on_a_broken_policy(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    (rego / "mcp" / "decision.rego").write_text("package mcp\n\ndecision := {\n")
    with pytest.raises(PolicyRejected) as caught:
        await start_servers(settings_for(tmp_path, policy_paths=[rego, data]))
    assert caught.value.errors
    assert "decision.rego" in caught.value.errors[0]


async def test_load_errors_reject_a_change_in_both_engines(
    tmp_path: Path, external_opa: OpaProcess | None
) -> None:
    """A rule package reporting a load error stops the change whole; the running policy
    (and its revision) keeps deciding, in-process and in an OPA server alike."""
    rego, data = copy_policy(tmp_path)
    servers = await _service_on(tmp_path, external_opa, rego, data)
    try:
        policy = servers.runtime.policy
        before = policy.revision
        add_rule_package(
            rego,
            "checked",
            'load_errors contains "checked: always wrong"\n\n'
            'deny contains {"rule": "checked.all", "reason": "no"} if true',
        )
        with pytest.raises(PolicyRejected) as caught:
            await policy.load(read_bundle([rego, data]))
        assert "mcp.rules.checked: checked: always wrong" in caught.value.errors
        assert policy.revision == before
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            decision = await HttpClient(raw).decide(copy_call())
        assert decision["verdict"] == "allow", "the refused package is not live"
        assert decision["policy_revision"] == before
    finally:
        await servers.stop()
