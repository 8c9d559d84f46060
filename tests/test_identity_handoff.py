"""What a proxy proved arrives at the decision service as proven, in every documented
pairing, or the pair refuses to work.

The reference proxy's HTTP listener with `--auth-*` verifies each agent's token. Asking a
service over `--decision-url`, it marks the principal `principal_verified`: the service
believes it only from a caller it authenticated (client token or certificate), naming that
caller in `principal.asserted_by`; a service that knows no caller makes the proxy refuse to
start (one line, with the fix) and denies any such call that reaches it
(`identity.unproven_caller`), consuming nothing. The same holds for gateways that pass the
principal in headers (forward-auth: tests/test_gateway_http.py; ext_authz here).

Every pairing is run as a user runs it: the `mcp-policy proxy` command, a real issuer on
loopback, the real MCP SDK client, and the shipped pack's rule that only an imaging-admin
may force an overwrite once callers are identified.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from engine.identity import add_entry
from engine.settings import PROJECT_ROOT
from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc, types_pb2
from tests.conftest import APPROVER_TOKEN, copy_call, copy_policy, session, settings_for
from tests.fixtures.issuer import Issuer
from tests.fixtures.proxy_harness import (
    FIXTURE,
    PROXY,
    clean_env,
    copy_args,
    decision_of,
    embedded_args,
    http_session,
    proxy_process,
)
from tests.test_callers import WHOAMI, policy_saw
from tests.test_faults import add_rule_package

AUDIENCE = "https://mcp.example.test/mcp"
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
PROXY_NAME = "proxy-a"
CERT_NAME = "proxy-a.example"


def forced_copy() -> dict[str, Any]:
    """A copy_image_set call as the real tool takes it, asking to overwrite (force)."""
    return {
        **copy_args(),
        "copy_image_set_information": {"sourceImageSet": {"latestVersionId": "1"}},
        "force": True,
    }


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    running = Issuer(audience=AUDIENCE)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("handoff-pki")
    ca = trustme.CA()
    files = {"ca": where / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, identity in (("server", "127.0.0.1"), ("client", CERT_NAME)):
        leaf = ca.issue_cert(identity)
        files[name] = where / f"{name}.pem"
        files[f"{name}_key"] = where / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(files[name]))
        leaf.private_key_pem.write_to_path(str(files[f"{name}_key"]))
    return files


def policy(tmp: Path) -> list[Path]:
    rego, data = copy_policy(tmp)
    add_rule_package(rego, "whoami", WHOAMI)
    return [rego, data]


@contextlib.asynccontextmanager
async def service(tmp: Path, **overrides: Any) -> AsyncIterator[Servers]:
    tmp.mkdir(parents=True, exist_ok=True)
    running = await start_servers(settings_for(tmp, policy_paths=policy(tmp), **overrides))
    try:
        yield running
    finally:
        await running.stop()


def auth_args(issuer: Issuer) -> list[str]:
    return ["--auth-issuer", issuer.issuer, "--auth-audience", AUDIENCE]


async def through(url: str, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the policy saw of the principal (the whoami tool), and the decision on a
    forced copy by the same agent."""
    headers = {"Authorization": f"Bearer {token}"}
    async with http_session(url, headers) as session:
        seen = await session.call_tool("whoami", {})
        forced = await session.call_tool("copy_image_set", forced_copy())
    assert seen.is_error and forced.is_error
    return policy_saw(decision_of(seen)["reason"]), decision_of(forced)


def viewer(issuer: Issuer) -> str:
    agent = "agent-" + uuid.uuid4().hex[:8]
    return issuer.token(sub="viewer-" + agent, client_id=agent, roles=["viewer"])


# -- the pairings -------------------------------------------------------------------------


async def test_embedded(tmp_path: Path, issuer: Issuer) -> None:
    """In one process: the token's principal is the decision's, proven."""
    args = [*embedded_args(tmp_path, policy(tmp_path)), *auth_args(issuer)]
    async with proxy_process(args, clean_env()) as url:
        seen, forced = await through(url, viewer(issuer))
    assert seen["authenticated"] is True and seen["method"] == "jwt"
    assert seen["roles"] == ["viewer"]
    assert forced["rule"] == "copy_image_set.force_needs_role"


async def test_grpc_with_a_client_token(tmp_path: Path, issuer: Issuer) -> None:
    clients = tmp_path / "clients.yaml"
    token = add_entry(clients, "client_token", PROXY_NAME)
    async with service(tmp_path, clients_file=clients) as running:
        args = ["--decision-url", running.grpc_target, *auth_args(issuer)]
        async with proxy_process(args, clean_env(MCP_POLICY_CLIENT_TOKEN=token)) as url:
            seen, forced = await through(url, viewer(issuer))
    assert seen["asserted_by"] == PROXY_NAME and seen["authenticated"] is False
    assert seen["roles"] == ["viewer"]
    assert forced["verdict"] == "deny"
    assert forced["rule"] == "copy_image_set.force_needs_role"


async def test_grpc_with_mtls(tmp_path: Path, issuer: Issuer, pki: dict[str, Path]) -> None:
    tls = {"tls_cert": pki["server"], "tls_key": pki["server_key"], "tls_client_ca": pki["ca"]}
    async with service(tmp_path, **tls) as running:
        args = [
            "--decision-url", running.grpc_target, "--decision-ca", str(pki["ca"]),
            "--decision-cert", str(pki["client"]), "--decision-key", str(pki["client_key"]),
            *auth_args(issuer),
        ]  # fmt: skip
        async with proxy_process(args, clean_env()) as url:
            seen, forced = await through(url, viewer(issuer))
    assert seen["asserted_by"] == f"tls:{CERT_NAME}"
    assert forced["rule"] == "copy_image_set.force_needs_role"


async def test_grpc_over_loopback_to_a_service_that_knows_no_caller_refuses_to_start(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The README's single-user service (nothing configured) cannot tell the proxy from any
    other local process: the proxy does not start, and says how to fix it in one line."""
    async with service(tmp_path) as running:
        args = ["--decision-url", running.grpc_target, "--listen", "127.0.0.1:0"]
        done = await asyncio.to_thread(
            subprocess.run,
            [*PROXY, "proxy", *args, *auth_args(issuer), "--", *FIXTURE],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
            cwd=str(PROJECT_ROOT),
        )
        log = await logged(running)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "does not know this proxy" in lines[0]
    assert "mcp-policy clients add" in lines[0] and "MCP_POLICY_CLIENT_TOKEN" in lines[0]
    assert done.stdout == ""
    assert log == [], "nothing was decided"


async def test_a_proxy_that_cannot_reach_its_service_does_not_start(
    tmp_path: Path, issuer: Issuer
) -> None:
    args = ["--decision-url", "127.0.0.1:1", "--decision-timeout", "1"]
    done = await asyncio.to_thread(
        subprocess.run,
        [*PROXY, "proxy", *args, "--listen", "127.0.0.1:0", *auth_args(issuer), "--", *FIXTURE],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=str(PROJECT_ROOT),
    )
    assert done.returncode == 1
    assert "could not say who it takes this proxy for" in done.stderr


# -- the service side: a verified principal from an unknown caller -------------------------


async def logged(running: Servers, sid: str | None = None) -> list[dict[str, Any]]:
    await running.runtime.decision_log.flush()
    query = f"?session_id={sid}" if sid else ""
    async with httpx.AsyncClient(base_url=running.http_url) as raw:
        answer = await raw.get(f"/v1/decisions{query}", headers=AUTH)
    records: list[dict[str, Any]] = answer.json()["decisions"]
    return [r for r in records if r.get("event") == "decision"]


async def test_a_verified_principal_from_an_unknown_caller_is_denied_and_costs_nothing(
    tmp_path: Path,
) -> None:
    """HTTP and gRPC alike: denied with the fix in the reason, past the tool's limit (nothing
    counted), and the same call without the claim is decided as the caller's own."""
    async with service(tmp_path) as running:
        sid = session()
        plain_body = copy_call(sid)
        plain_body["arguments"] = {k: v for k, v in forced_copy().items() if k != "force"}
        body = {**plain_body, "principal_verified": True}
        body["principal"] = {**body["principal"], "roles": ["imaging-admin"]}
        async with httpx.AsyncClient(base_url=running.http_url) as raw:
            answers = [(await raw.post("/v1/decide", json=body)).json() for _ in range(11)]
        channel = grpc.aio.insecure_channel(running.grpc_target)
        try:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            message = decision_pb2.DecideRequest(
                server=body["server"],
                tool=body["tool"],
                principal=types_pb2.Principal(agent_id="a-1", session_id=sid),
                principal_verified=True,
            )
            message.arguments.update(body["arguments"])
            by_grpc = await stub.Decide(message)
            who = await stub.WhoAmI(decision_pb2.WhoAmIRequest())
        finally:
            await channel.close()
        async with httpx.AsyncClient(base_url=running.http_url) as raw:
            plain = (await raw.post("/v1/decide", json=plain_body)).json()
        records = await logged(running, sid)
    assert {(a["verdict"], a["rule"]) for a in answers} == {("deny", "identity.unproven_caller")}
    assert "mcp-policy clients add" in answers[0]["reason"]
    assert by_grpc.verdict == types_pb2.VERDICT_DENY
    assert by_grpc.rule == "identity.unproven_caller" and not by_grpc.outcome_token
    assert (who.caller, who.callers_required) == ("", False)
    assert plain["verdict"] == "allow" and plain["rate_limit"]["remaining"] == 9
    assert len(records) == 13, "every refusal is logged"


async def test_whoami_names_the_proven_caller(tmp_path: Path) -> None:
    clients = tmp_path / "clients.yaml"
    token = add_entry(clients, "client_token", PROXY_NAME)
    async with service(tmp_path, clients_file=clients) as running:
        async with httpx.AsyncClient(base_url=running.http_url) as raw:
            known = await raw.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
            stranger = await raw.get("/v1/whoami")
            forged = await raw.get("/v1/whoami", headers={"Authorization": "Bearer forged"})
        channel = grpc.aio.insecure_channel(running.grpc_target)
        try:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            who = await stub.WhoAmI(
                decision_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.WhoAmI(decision_pb2.WhoAmIRequest())
        finally:
            await channel.close()
    assert known.json() == {"caller": PROXY_NAME, "callers_required": True}
    assert stranger.status_code == 401 and forged.status_code == 401
    assert (who.caller, who.callers_required) == (PROXY_NAME, True)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- gateways: ext_authz ----------------------------------------------------------------------


def check_request(sid: str, **headers: str) -> Any:
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "copy_image_set", "arguments": forced_copy()},
    }
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host = "POST", "/mcp", "awslabs.healthimaging-mcp-server"
    http.headers.update({"content-type": "application/json", "mcp-session-id": sid, **headers})
    http.body = json.dumps(call)
    return request


async def ext_authz(running: Servers, request: Any, token: str | None = None) -> str:
    """Envoy's Check; the decision's rule, read from the refusal it returns."""
    channel = grpc.aio.insecure_channel(running.grpc_target)
    try:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        answer = await stub.Check(request, metadata=metadata)
    finally:
        await channel.close()
    body = json.loads(answer.denied_response.body)
    rule: str = body["result"]["_meta"]["mcp-policy/decision"]["rule"]
    return rule


async def test_ext_authz_principal_headers_need_a_known_gateway(tmp_path: Path) -> None:
    """Envoy after its jwt_authn check: the agent and roles it names are believed from a
    gateway the service knows, and refused from one it does not."""
    clients = tmp_path / "clients.yaml"
    token = add_entry(clients, "client_token", "envoy-1")
    headers = {"x-mcp-agent-id": "agent-e", "x-mcp-user-id": "viewer-e"}
    async with service(tmp_path / "open") as running:
        unknown = await ext_authz(running, check_request(session(), **headers))
    async with service(tmp_path / "known", clients_file=clients) as running:
        known = await ext_authz(running, check_request(session(), **headers), token)
    assert unknown == "identity.unproven_caller"
    assert known == "copy_image_set.force_needs_role"


async def test_principal_verified_takes_only_a_boolean(tmp_path: Path) -> None:
    """A claim of verification is a JSON boolean, nothing that converts to one: anything
    else is a 422 naming the field, decided as nothing and counted as nothing."""
    async with service(tmp_path) as running:
        sid = session()
        body = copy_call(sid)
        body["arguments"] = {k: v for k, v in forced_copy().items() if k != "force"}
        async with httpx.AsyncClient(base_url=running.http_url) as raw:
            answers = [  # as JSON text: the lone surrogate travels as its \ud800 escape
                await raw.post(
                    "/v1/decide",
                    content=json.dumps({**body, "principal_verified": value}),
                    headers={"content-type": "application/json"},
                )
                for value in ("true", 1, 0, None, [], {}, "\ud800")
            ]
            duplicate = await raw.post(
                "/v1/decide",
                content=json.dumps(body)[:-1].encode()
                + b', "principal_verified": false, "principal_verified": true}',
                headers={"content-type": "application/json"},
            )
        records = await logged(running, sid)
    assert [a.status_code for a in answers] == [422] * 6 + [400]  # the surrogate: not JSON
    assert all("principal_verified" in a.text for a in answers), [a.text for a in answers]
    assert duplicate.status_code == 400 and "principal_verified" in duplicate.text
    assert records == []
