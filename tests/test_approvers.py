"""Approvers are people: named approver credentials (the approvers file) and approver JWTs
(real keys; issuer metadata and JWKS served on 127.0.0.1 here), through HTTP and gRPC.

The record names the approver the credential proves, never the body's; nobody approves a
call made on their own behalf; a limited approver decides only its servers and tools; a
revoked credential stops working; the operator token keeps the operator routes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from engine.identity import add_entry
from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    DATASTORE,
    HEALTHIMAGING,
    VALKEY,
    add_tools,
    approval_call,
    copy_call,
    copy_policy,
    session,
    settings_for,
)
from tests.fixtures.issuer import Issuer, Key

Client = HttpClient | GrpcClient
AUDIENCE = "https://mcp-policy.example.test/approvals"
MCP_POLICY = Path(sys.executable).with_name("mcp-policy")
# A second tool that needs approval (high risk), added to a private copy of the catalog.
OTHER_TOOL = "delete_image_set"
EXTRA_CATALOG = {"server": HEALTHIMAGING, "tool": OTHER_TOOL, "category": "delete", "risk": "high"}


def status_of(client: Client, http: int, grpc_code: str) -> int | str:
    return http if client.name == "http" else grpc_code


# -- the issuer -----------------------------------------------------------------------------


STRANGER = Key("rsa-1", "RS256")  # the published key's kid, another key: a forged signature


def approver_token(issuer: Issuer, sub: str, *, stranger: bool = False, **claims: Any) -> str:
    """An approver's access token (no client_id: a person, not an agent)."""
    return issuer.token(key=STRANGER if stranger else None, sub=sub, client_id=None, **claims)


# -- a service with named approvers ---------------------------------------------------------


def mcp_policy(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MCP_POLICY_STATE_DIR": str(state)}
    return subprocess.run(
        [str(MCP_POLICY), *args], capture_output=True, text=True, env=env, timeout=60
    )


@dataclass
class World:
    servers: Servers
    issuer: Issuer
    approvers_file: Path
    state: Path
    tokens: dict[str, str]  # approver name -> its secret


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("approvers")
    state = tmp / "state"
    path = tmp / "approvers.yaml"
    tokens = {
        # Anyone's calls but their own.
        "alice": add_entry(path, "approver", "alice", user_id="alice"),
        # The person the test calls are made for (principal.user_id "user-1").
        "uma": add_entry(path, "approver", "uma", user_id="user-1"),
        # An approver who may also use the operator routes.
        "olga": add_entry(path, "approver", "olga", user_id="olga", roles=["operator"]),
        # Revoked by a test.
        "rex": add_entry(path, "approver", "rex", user_id="rex"),
    }
    # Limited to copy_image_set on the HealthImaging server, made by the console command.
    added = mcp_policy(
        "approvers",
        "add",
        "carol",
        "--server",
        HEALTHIMAGING,
        "--tool",
        "copy_image_set",
        "--file",
        str(path),
        state=state,
    )
    assert added.returncode == 0, added.stderr
    tokens["carol"] = added.stdout.strip()

    rego, data = copy_policy(tmp)
    add_tools(data, catalog=[EXTRA_CATALOG])
    issuer = Issuer(audience=AUDIENCE)
    await issuer.start()
    servers = await start_servers(
        settings_for(
            tmp,
            policy_paths=[rego, data],
            approvers_file=path,
            approver_issuer=issuer.issuer,
            approver_audience=AUDIENCE,
        )
    )
    yield World(servers, issuer, path, state, tokens)
    await servers.stop()
    await issuer.stop()


@pytest.fixture(scope="module")
async def named_http(world: World) -> AsyncIterator[HttpClient]:
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=10) as raw:
        yield HttpClient(raw)


@pytest.fixture(scope="module")
async def named_grpc(world: World) -> AsyncIterator[GrpcClient]:
    async with grpc.aio.insecure_channel(world.servers.grpc_target) as channel:
        yield GrpcClient(channel)


@pytest.fixture(params=["http", "grpc"])
def named(request: pytest.FixtureRequest, named_http: HttpClient, named_grpc: GrpcClient) -> Client:
    """A client of the service with named approvers, through each transport."""
    return named_http if request.param == "http" else named_grpc


async def pending(client: Client, call: dict[str, Any] | None = None) -> str:
    decision = await client.decide(call or approval_call())
    assert decision["verdict"] == "approval_required", decision
    approval_id: str = decision["approval"]["id"]
    return approval_id


def other_tool_call() -> dict[str, Any]:
    call = copy_call()
    return {**call, "tool": OTHER_TOOL, "arguments": {"datastore_id": DATASTORE}}


async def refused(attempt: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await attempt
    return caught.value


async def approval_events(world: World, approval_id: str) -> list[dict[str, Any]]:
    await world.servers.runtime.decision_log.flush()
    path = Path(world.servers.runtime.settings.decision_log_settings.jsonl)
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [
        r for r in records if r.get("event") == "approval" and r.get("approval_id") == approval_id
    ]


# -- the record names the credential's approver ---------------------------------------------


async def test_the_record_names_the_approver_from_the_file(named: Client, world: World) -> None:
    call = approval_call()
    approval_id = await pending(named, call)
    approved = await named.act_as(world.tokens["alice"], approval_id, "approve", "ok once")
    assert (approved["status"], approved["approver"]) == ("approved", "alice")
    assert approved["comment"] == "ok once"
    granted = await named.decide({**call, "approval_id": approval_id})
    assert granted["verdict"] == "allow"
    assert "approved by alice" in granted["reason"]
    [event] = await approval_events(world, approval_id)
    assert event["approver"] == "alice"
    assert event["approver_method"] == "approvers_file"
    assert event["status"] == "approved"

    # The body may still name the approver, if it names the same one.
    second = await pending(named)
    denied = await named.act_as(
        world.tokens["alice"], second, "deny", "not today", approver="alice"
    )
    assert (denied["status"], denied["approver"]) == ("denied", "alice")


async def test_a_body_approver_that_differs_is_refused(named: Client, world: World) -> None:
    approval_id = await pending(named)
    for verb in ("approve", "deny"):
        error = await refused(
            named.act_as(world.tokens["alice"], approval_id, verb, approver="dr-ops")
        )
        assert error.status == status_of(named, 422, "INVALID_ARGUMENT")
        assert "approver is taken from your credential" in error.message
        assert "'alice'" in error.message
    still = await named.get_approval(world.tokens["alice"], approval_id)
    assert still["status"] == "pending" and not still.get("approver")


# -- four eyes ------------------------------------------------------------------------------


async def test_nobody_approves_a_call_made_on_their_own_behalf(named: Client, world: World) -> None:
    # uma's user_id is the calls' user: she can neither approve nor deny them.
    approval_id = await pending(named)
    for verb in ("approve", "deny"):
        error = await refused(named.act_as(world.tokens["uma"], approval_id, verb))
        assert error.status == status_of(named, 403, "PERMISSION_DENIED")
        assert f"cannot {verb} a call made on their own behalf" in error.message
        assert "user_id is 'user-1'" in error.message
    # ...nor see it, while alice does.
    assert approval_id not in [a["id"] for a in await named.approvals(world.tokens["uma"])]
    assert approval_id in [a["id"] for a in await named.approvals(world.tokens["alice"])]
    error = await refused(named.get_approval(world.tokens["uma"], approval_id))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")

    # An approver named like the calling agent is that agent.
    by_alice = approval_call()
    by_alice["principal"] = {"agent_id": "alice", "session_id": session(), "user_id": "user-9"}
    own = await pending(named, by_alice)
    error = await refused(named.act_as(world.tokens["alice"], own, "approve"))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")
    assert "'alice' cannot approve a call made on their own behalf" in error.message
    assert "agent_id is 'alice'" in error.message

    # Another approver may decide it.
    approved = await named.act_as(world.tokens["uma"], own, "approve")
    assert approved["approver"] == "uma"
    assert (await named.get_approval(world.tokens["alice"], approval_id))["status"] == "pending"


# -- approvers limited to some servers and tools --------------------------------------------


async def test_a_limited_approver_decides_only_its_tool_on_its_server(
    named: Client, world: World
) -> None:
    carol = world.tokens["carol"]
    mine = await pending(named)
    other_tool = await pending(named, other_tool_call())
    other_server = await pending(named, {**approval_call(), "server": VALKEY})

    error = await refused(named.act_as(carol, other_tool, "approve"))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")
    assert f"may not approve calls of tool '{OTHER_TOOL}'" in error.message
    assert "copy_image_set" in error.message  # what it may approve
    error = await refused(named.act_as(carol, other_tool, "deny"))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")
    assert OTHER_TOOL in error.message

    error = await refused(named.act_as(carol, other_server, "approve"))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")
    assert f"server '{VALKEY}'" in error.message and "copy_image_set" in error.message

    # Listing shows carol only what she may act on; alice sees all three.
    seen = {a["id"]: a for a in await named.approvals(carol, status="pending")}
    assert mine in seen and other_tool not in seen and other_server not in seen
    assert {(a["server"], a["tool"]) for a in seen.values()} == {(HEALTHIMAGING, "copy_image_set")}
    everything = {a["id"] for a in await named.approvals(world.tokens["alice"], status="pending")}
    assert {mine, other_tool, other_server} <= everything
    error = await refused(named.get_approval(carol, other_tool))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")

    approved = await named.act_as(carol, mine, "approve")
    assert (approved["status"], approved["approver"]) == ("approved", "carol")
    denied = await named.act_as(world.tokens["alice"], other_tool, "deny", "no deletes")
    assert denied["approver"] == "alice"


# -- revocation -----------------------------------------------------------------------------


async def test_a_revoked_approver_token_is_refused_within_seconds(
    named_http: HttpClient, named_grpc: GrpcClient, world: World
) -> None:
    rex = world.tokens["rex"]
    approval_id = await pending(named_http)
    assert (await named_http.get_approval(rex, approval_id))["status"] == "pending"

    revoked = mcp_policy(
        "approvers", "revoke", "rex", "--file", str(world.approvers_file), state=world.state
    )
    assert revoked.returncode == 0, revoked.stderr

    deadline = time.monotonic() + 30  # a bound for a slow machine, not a measurement
    while True:
        try:
            await named_http.get_approval(rex, approval_id)
        except ApiError as gone:
            assert gone.status == 401, gone
            assert "unknown, revoked or expired" in gone.message
            break
        assert time.monotonic() < deadline, "the revoked token was still accepted"
        await asyncio.sleep(0.1)

    for client, code in ((named_http, 401), (named_grpc, "UNAUTHENTICATED")):
        error = await refused(client.act_as(rex, approval_id, "approve"))
        assert error.status == code
    # A token nobody issued is refused the same way.
    error = await refused(named_grpc.approvals("mcpa_" + "x" * 43))
    assert error.status == "UNAUTHENTICATED"
    assert (await named_http.get_approval(world.tokens["alice"], approval_id))["status"] == (
        "pending"
    )


# -- JWT approvers --------------------------------------------------------------------------


async def test_jwt_approver_with_the_approver_role(named: Client, world: World) -> None:
    token = approver_token(world.issuer, "jane", roles=["approver", "imaging"])
    call = approval_call()
    approval_id = await pending(named, call)
    assert approval_id in [a["id"] for a in await named.approvals(token, status="pending")]
    approved = await named.act_as(token, approval_id, "approve", approver="jane")
    assert (approved["status"], approved["approver"]) == ("approved", "jane")
    assert (await named.decide({**call, "approval_id": approval_id}))["verdict"] == "allow"
    [event] = await approval_events(world, approval_id)
    assert (event["approver"], event["approver_method"]) == ("jane", "jwt")

    # The body cannot rename a JWT approver either.
    other = await pending(named)
    error = await refused(named.act_as(token, other, "approve", approver="alice"))
    assert error.status == status_of(named, 422, "INVALID_ARGUMENT")


async def test_jwt_without_the_approver_role_or_badly_signed(named: Client, world: World) -> None:
    approval_id = await pending(named)
    for token in (
        approver_token(world.issuer, "jim", roles=["imaging"]),
        approver_token(world.issuer, "jim"),
    ):
        for attempt in (
            named.act_as(token, approval_id, "approve"),
            named.approvals(token),
            named.get_approval(token, approval_id),
        ):
            error = await refused(attempt)
            assert error.status == status_of(named, 403, "PERMISSION_DENIED")
            assert "does not include 'approver'" in error.message

    forged = approver_token(world.issuer, "jim", stranger=True, roles=["approver"])
    error = await refused(named.act_as(forged, approval_id, "approve"))
    assert error.status == status_of(named, 401, "UNAUTHENTICATED")
    assert "signature" in error.message
    expired = approver_token(world.issuer, "jim", roles=["approver"], exp=int(time.time()) - 3600)
    error = await refused(named.act_as(expired, approval_id, "approve"))
    assert error.status == status_of(named, 401, "UNAUTHENTICATED")
    assert (await named.get_approval(world.tokens["alice"], approval_id))["status"] == "pending"


async def test_jwt_approver_four_eyes_and_tool_claims(named: Client, world: World) -> None:
    approval_id = await pending(named)
    own = approver_token(world.issuer, "user-1", roles=["approver"])
    error = await refused(named.act_as(own, approval_id, "deny"))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")
    assert "'user-1' cannot deny a call made on their own behalf" in error.message

    limited = approver_token(world.issuer, "jo", roles=["approver"], mcp_policy_tools=OTHER_TOOL)
    error = await refused(named.act_as(limited, approval_id, "approve"))
    assert error.status == status_of(named, 403, "PERMISSION_DENIED")
    assert "may not approve calls of tool 'copy_image_set'" in error.message
    other = await pending(named, other_tool_call())
    seen = await named.approvals(limited, status="pending")
    assert other in [a["id"] for a in seen] and approval_id not in [a["id"] for a in seen]
    assert {a["tool"] for a in seen} == {OTHER_TOOL}
    assert (await named.act_as(limited, other, "approve"))["approver"] == "jo"


# -- the operator token and the operator routes ---------------------------------------------


async def test_operator_routes_need_the_operator_credential(
    named_http: HttpClient, named_grpc: GrpcClient, world: World
) -> None:
    raw = named_http.raw

    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    jwt_approver = approver_token(world.issuer, "jane", roles=["approver"])
    for token, expected in (
        (APPROVER_TOKEN, 200),  # the legacy approver token is the operator credential
        (world.tokens["olga"], 200),  # an approver with role "operator"
        (world.tokens["alice"], 403),
        (world.tokens["carol"], 403),
        (jwt_approver, 403),
    ):
        answers = [
            await raw.get("/v1/decisions", headers=auth(token)),
            await raw.get("/v1/status", headers=auth(token)),
            await raw.post("/v1/policy/reload", headers=auth(token)),
        ]
        assert [a.status_code for a in answers] == [expected] * 3, [a.text for a in answers]
        if expected == 403:
            assert "not an operator" in answers[0].json()["error"]["message"]

    stub = decision_pb2_grpc.DecisionLogServiceStub(named_grpc.channel)
    listed = await stub.ListDecisions(
        decision_pb2.ListDecisionsRequest(page_size=1),
        metadata=(("authorization", f"Bearer {APPROVER_TOKEN}"),),
    )
    assert len(listed.decisions) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListDecisions(
            decision_pb2.ListDecisionsRequest(page_size=1),
            metadata=(("authorization", f"Bearer {world.tokens['alice']}"),),
        )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (await raw.get("/v1/decisions")).status_code == 401


async def test_with_named_approvers_the_operator_token_reads_but_does_not_decide(
    named: Client, world: World
) -> None:
    approval_id = await pending(named)
    assert (await named.get_approval(APPROVER_TOKEN, approval_id))["status"] == "pending"
    assert approval_id in [a["id"] for a in await named.approvals(APPROVER_TOKEN)]
    for verb in ("approve", "deny"):
        error = await refused(named.act(APPROVER_TOKEN, approval_id, verb, "operator"))
        assert error.status == status_of(named, 403, "PERMISSION_DENIED")
        assert "operator credential cannot approve or deny" in error.message
    # The olga entry is an operator *and* an approver.
    approved = await named.act_as(world.tokens["olga"], approval_id, "approve")
    assert approved["approver"] == "olga"


# -- single-token mode: the legacy approver token as before ---------------------------------


async def test_single_token_mode_approver_is_the_operator(client: Client) -> None:
    """No approvers file, no issuer: the approver token approves, as "operator"; a body
    approver (clients of this mode always sent one) is accepted and not recorded."""
    call = approval_call()
    approval_id = await pending(client, call)
    approved = await client.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops", "ok")
    assert (approved["status"], approved["approver"]) == ("approved", "operator")
    assert (await client.decide({**call, "approval_id": approval_id}))["verdict"] == "allow"
    other = await pending(client)
    denied = await client.act_as(APPROVER_TOKEN, other, "deny", "no")
    assert (denied["status"], denied["approver"]) == ("denied", "operator")
    error = await refused(client.act_as("mcpa_unknown", other, "approve"))
    assert error.status == status_of(client, 403, "PERMISSION_DENIED")
