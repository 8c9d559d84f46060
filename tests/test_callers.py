"""The decision service knows its callers: decision clients prove themselves with a
client token (or a client certificate, tests/test_tls.py), and a decision may carry the
agent's own credential, which the service verifies itself.

Tokens are minted with real keys; the issuer's metadata and JWKS are served over real
HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest

from engine.identity import add_entry, revoke_entry
from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc, types_pb2
from tests.conftest import APPROVER_TOKEN, copy_call, copy_policy, session, settings_for
from tests.fixtures.issuer import Issuer
from tests.test_faults import add_rule_package

AUDIENCE = "https://decisions.example/"
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
# Tells the test what the policy saw of the principal, as the deny reason.
WHOAMI = """deny contains {"rule": "test.whoami", "reason": reason} if {
	input.tool.name == "whoami"
	p := input.principal
	reason := json.marshal({
		"agent_id": p.agent_id, "user_id": p.user_id, "roles": p.roles,
		"authenticated": p.authenticated, "method": p.method,
		"asserted_by": p.asserted_by, "scopes": p.scopes,
	})
}
"""


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    running = Issuer(audience=AUDIENCE)
    await running.start()
    yield running
    await running.stop()


@dataclass
class Guarded:
    servers: Servers
    clients: Path
    token_a: str  # proxy-a's client token (a test revokes it)
    token_b: str  # proxy-b's
    api_key: str  # agent-k's


@pytest.fixture(scope="module")
async def guarded(
    tmp_path_factory: pytest.TempPathFactory, issuer: Issuer
) -> AsyncIterator[Guarded]:
    """A service that answers only callers in its clients file, and verifies agent
    credentials (JWTs of the issuer, and API keys)."""
    tmp = tmp_path_factory.mktemp("callers")
    rego, data = copy_policy(tmp)
    add_rule_package(rego, "whoami", WHOAMI)
    clients = tmp / "clients.yaml"
    client_token = add_entry(clients, "client_token", "proxy-a")
    other_token = add_entry(clients, "client_token", "proxy-b")
    keys = tmp / "keys.yaml"
    api_key = add_entry(keys, "api_key", "agent-k", agent_id="agent-k", user_id="kim")
    settings = settings_for(
        tmp,
        policy_paths=[rego, data],
        clients_file=clients,
        agent_issuer=issuer.issuer,
        agent_audience=AUDIENCE,
        agent_keys_file=keys,
    )
    running = await start_servers(settings)
    yield Guarded(running, clients, client_token, other_token, api_key)
    await running.stop()


def policy_saw(reason: str) -> dict[str, Any]:
    """The principal as the whoami rule wrote it into the (joined) deny reason."""
    seen: dict[str, Any] = json.loads(reason[reason.index('{"agent_id"') :])
    return seen


def decide_body(sid: str, **extra: Any) -> dict[str, Any]:
    return {**copy_call(sid), **extra}


def whoami(sid: str, **extra: Any) -> dict[str, Any]:
    body = decide_body(sid, **extra)
    body.update(tool="whoami", arguments={})
    return body


async def logged(servers: Servers, sid: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=servers.http_url) as raw:
        answer = await raw.get(f"/v1/decisions?session_id={sid}", headers=AUTH)
    records: list[dict[str, Any]] = answer.json()["decisions"]
    return records


async def test_a_caller_that_proves_nothing_gets_no_decision(
    guarded: Guarded,
) -> None:
    servers = guarded.servers
    sid = session()
    async with httpx.AsyncClient(base_url=servers.http_url) as raw:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
            answer = await raw.post("/v1/decide", json=decide_body(sid), headers=headers)
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"]["code"] in ("Unauthenticated", "CredentialRejected")
            report = await raw.post(
                "/v1/decisions/dec_x/outcome",
                json={"succeeded": False, "outcome_token": "t"},
                headers=headers,
            )
            assert report.status_code == 401
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        request = decision_pb2.DecideRequest(
            server="awslabs.healthimaging-mcp-server",
            tool="copy_image_set",
            principal=types_pb2.Principal(session_id=sid),
        )
        for metadata in (None, (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Decide(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await logged(servers, sid) == [], "nothing was decided or logged"


async def test_a_known_client_is_answered_and_named_to_the_policy(
    guarded: Guarded,
) -> None:
    servers, clients, token = guarded.servers, guarded.clients, guarded.token_a
    sid = session()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=servers.http_url, headers=headers) as raw:
        allowed = (await raw.post("/v1/decide", json=decide_body(sid))).json()
        assert allowed["verdict"] == "allow"
        seen = policy_saw((await raw.post("/v1/decide", json=whoami(sid))).json()["reason"])
    assert seen["asserted_by"] == "proxy-a"
    assert seen["authenticated"] is False, "the principal itself was only asserted"
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        reply = await stub.Decide(
            decision_pb2.DecideRequest(
                server="awslabs.healthimaging-mcp-server",
                tool="whoami",
                principal=types_pb2.Principal(session_id=sid),
            ),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    assert policy_saw(reply.reason)["asserted_by"] == "proxy-a"
    revoke_entry(clients, "proxy-a")
    async with httpx.AsyncClient(base_url=servers.http_url, headers=headers) as raw:
        for _ in range(60):  # the file is looked at again within a second or so
            answer = await raw.post("/v1/decide", json=decide_body(sid))
            if answer.status_code == 401:
                break
            await asyncio.sleep(0.05)
    assert answer.status_code == 401, "a revoked client token stops working"


@pytest.fixture
def client_headers(guarded: Guarded) -> dict[str, str]:
    return {"Authorization": f"Bearer {guarded.token_b}"}


async def test_the_agent_credential_decides_who_is_calling(
    guarded: Guarded,
    issuer: Issuer,
    client_headers: dict[str, str],
) -> None:
    servers, api_key = guarded.servers, guarded.api_key
    sid = session()
    liar = {"agent_id": "admin", "session_id": sid, "user_id": "root", "roles": ["imaging-admin"]}
    token = issuer.token(sub="u-7", client_id="agent-7", roles=["viewer"], scope="mcp:tools")
    async with httpx.AsyncClient(base_url=servers.http_url, headers=client_headers) as raw:
        answer = await raw.post(
            "/v1/decide", json={**whoami(sid), "principal": liar, "credential": token}
        )
        assert answer.status_code == 200, answer.text
        seen = policy_saw(answer.json()["reason"])
        assert seen == {
            "agent_id": "agent-7",
            "user_id": "u-7",
            "roles": ["viewer"],
            "authenticated": True,
            "method": "jwt",
            "asserted_by": None,
            "scopes": ["mcp:tools"],
        }
        keyed = await raw.post(
            "/v1/decide", json={**whoami(sid), "principal": liar, "credential": api_key}
        )
        assert policy_saw(keyed.json()["reason"])["agent_id"] == "agent-k"
        assert policy_saw(keyed.json()["reason"])["method"] == "api_key"
        copied = await raw.post("/v1/decide", json={**decide_body(sid), "credential": token})
        assert copied.json()["verdict"] == "allow"
    records = await logged(servers, sid)
    assert {r["principal"]["agent_id"] for r in records} == {"agent-7", "agent-k"}
    assert token not in json.dumps(records) and api_key not in json.dumps(records)


@pytest.mark.parametrize(
    "make",
    [
        lambda i: i.token(sub="u", client_id="a", exp=int(time.time()) - 3600),
        lambda i: i.token(sub="u", client_id="a", aud="https://other.example/"),
        lambda i: i.token(sub="u", client_id="a", iss="http://127.0.0.1:1"),
        lambda i: i.token(sub="u", client_id="a")[:-4] + "AAAA",
        lambda i: jwt.encode(
            {"sub": "u", "iss": i.issuer, "aud": AUDIENCE}, None, algorithm="none"
        ),
        lambda i: "mcpk_not-a-key",
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "tampered", "alg-none", "unknown-key"],
)
async def test_a_credential_that_does_not_verify_is_denied(
    guarded: Guarded,
    issuer: Issuer,
    client_headers: dict[str, str],
    make: Any,
) -> None:
    servers = guarded.servers
    sid = session()
    async with httpx.AsyncClient(base_url=servers.http_url, headers=client_headers) as raw:
        answer = await raw.post("/v1/decide", json={**decide_body(sid), "credential": make(issuer)})
        decision = answer.json()
        assert answer.status_code == 200
        assert decision["verdict"] == "deny"
        assert decision["rule"] == "identity.invalid_credential"
        assert decision["mcp_result"]["isError"] is True
        # Nothing was taken: a call without a credential still has the whole quota.
        fresh = (await raw.post("/v1/decide", json=decide_body(sid))).json()
        assert fresh["rate_limit"]["remaining"] == 9


async def test_no_agent_credentials_configured_means_any_credential_is_denied(
    tmp_path: Path,
) -> None:
    servers = await start_servers(settings_for(tmp_path))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            answer = await raw.post("/v1/decide", json={**copy_call(), "credential": "x.y.z"})
        assert answer.json()["rule"] == "identity.invalid_credential"
        assert "verifies no agent credentials" in answer.json()["reason"]
    finally:
        await servers.stop()


async def test_the_proxy_presents_its_client_token(guarded: Guarded) -> None:
    """The reference proxy's gRPC decider sends its client token; without one the
    service refuses it, and the proxy fails closed (no decision, an error it turns into
    a refusal)."""
    from engine.models import DecideRequest
    from engine.proxy.decider import DecisionUnavailable
    from engine.proxy.grpc_decider import GrpcDecider

    request = DecideRequest.model_validate(copy_call(session()))
    known = GrpcDecider(guarded.servers.grpc_target, client_token=guarded.token_b)
    stranger = GrpcDecider(guarded.servers.grpc_target)
    try:
        decision = await known.decide(request)
        assert decision.verdict == "allow" and decision.outcome_token
        assert await known.report_outcome(
            decision.decision_id, decision.outcome_token, succeeded=False
        )
        with pytest.raises(DecisionUnavailable) as refused:
            await stranger.decide(request)
        assert "UNAUTHENTICATED" in refused.value.message
    finally:
        await known.close()
        await stranger.close()


async def test_only_an_imaging_admin_may_force_once_callers_are_known(
    guarded: Guarded, issuer: Issuer, client_headers: dict[str, str]
) -> None:
    """The shipped pack: with identified callers, force=true needs the imaging-admin role
    (proven by the token, or asserted by an authenticated proxy); it then still needs a
    human's approval."""
    sid = session()
    admin = issuer.token(sub="u-1", client_id="agent-1", roles=["imaging-admin"])
    viewer = issuer.token(sub="u-2", client_id="agent-2", roles=["viewer"])
    forced = decide_body(sid, arguments={**copy_call()["arguments"], "force": True})
    async with httpx.AsyncClient(base_url=guarded.servers.http_url, headers=client_headers) as raw:
        asserted = (await raw.post("/v1/decide", json=forced)).json()
        by_viewer = (await raw.post("/v1/decide", json={**forced, "credential": viewer})).json()
        by_admin = (await raw.post("/v1/decide", json={**forced, "credential": admin})).json()
        claimed = {**forced["principal"], "roles": ["imaging-admin"]}
        by_proxy = (await raw.post("/v1/decide", json={**forced, "principal": claimed})).json()
    assert (asserted["verdict"], asserted["rule"]) == ("deny", "copy_image_set.force_needs_role")
    assert (by_viewer["verdict"], by_viewer["rule"]) == ("deny", "copy_image_set.force_needs_role")
    assert by_admin["verdict"] == "approval_required"
    assert by_proxy["verdict"] == "approval_required", "the authenticated proxy vouches"
