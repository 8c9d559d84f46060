"""`mcp-policy proxy --listen` as an OAuth 2.1 resource server, end to end: a small issuer
on loopback serves its metadata and JWKS, tokens are minted with real RSA and EC keys
(PyJWT), API keys live in a real keys file, and the real MCP SDK client goes through the
authenticated proxy to the fixture server (a stdio child, or over HTTP), whose records
show what reached it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from engine.identity import Identity, add_entry, revoke_entry
from engine.models import DecideRequest, Decision
from engine.proxy.auth import (
    AuthConfig,
    ListenRefused,
    ResourceServer,
    check_exposure,
    looks_like_jwt,
)
from engine.proxy.core import ProxyOptions
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.grpc_decider import GrpcDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child, open_http
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from engine.transports.server import Servers, start_servers
from tests.conftest import HEALTHIMAGING, add_tools, settings_for
from tests.fixtures.imaging_server import ENV_ENV, HEADERS_ENV, INBOUND_ENV
from tests.fixtures.issuer import Issuer as RealIssuer
from tests.fixtures.issuer import Key, b64, unsigned
from tests.fixtures.proxy_harness import (
    FIXTURE,
    MODE_ENV,
    PROXY,
    RECORD_ENV,
    HttpFixture,
    calls,
    clean_env,
    copy_args,
    decision_of,
    embedded_args,
    http_session,
    proxy_policy,
)

AUDIENCE = "https://mcp.example.test/mcp"
METADATA_URL = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
SCOPE = "mcp:tools"
COPY_LIMIT = 3  # copy_image_set: calls per minute per agent (this module's policy)
LIST_TOOL = "list_datastores"
LIST_LIMIT = 2  # list_datastores: calls per minute per user
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
VERSION = {"mcp-protocol-version": "2025-11-25"}


# -- keys, tokens and the issuer ------------------------------------------------------------


class Issuer(RealIssuer):
    """The test issuer with an RSA and an EC key published, and one it does not publish."""

    def __init__(self) -> None:
        super().__init__(audience=AUDIENCE)
        self.rsa = self.key
        self.ec = Key("ec-1", "ES256")
        self.stranger = Key("rsa-x", "RS256")  # signs, but is not in the JWKS
        self.jwks = [self.rsa.jwk, self.ec.jwk]

    def agent_claims(self, agent: str, user: str, **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"exp": int(time.time()) + 600, "jti": uuid.uuid4().hex}
        fields.update(extra)
        return self.claims(sub=user, client_id=agent, **fields)

    def token(  # type: ignore[override]
        self, agent: str, user: str, *, key: Key | None = None, **extra: Any
    ) -> str:
        return (key or self.rsa).sign(self.agent_claims(agent, user, **extra))


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    running = Issuer()
    await running.start()
    yield running
    await running.stop()


def auth_policy(tmp: Path) -> list[Path]:
    """The proxy tests' policy, with copy_image_set limited per agent (COPY_LIMIT a
    minute) and list_datastores in the catalog, limited per user (LIST_LIMIT a minute)."""
    rego, data = proxy_policy(tmp)
    add_tools(
        data,
        catalog=[{"server": HEALTHIMAGING, "tool": LIST_TOOL, "category": "read", "risk": "low"}],
        rules={
            "copy_image_set": {
                "action": "rate_limit",
                "rate_limit": {"max": COPY_LIMIT, "window": 60, "scope": "agent"},
            },
            LIST_TOOL: {
                "action": "rate_limit",
                "rate_limit": {"max": LIST_LIMIT, "window": 60, "scope": "user"},
            },
        },
    )
    return [rego, data]


@pytest.fixture(scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    tmp = tmp_path_factory.mktemp("proxy-auth")
    running = Runtime(settings_for(tmp, policy_paths=auth_policy(tmp)))
    await running.start()
    yield running
    await running.stop()


class Recording(EmbeddedDecider):
    """The embedded decider, keeping what it was asked and with which identity."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.asked: list[tuple[DecideRequest, Identity | None]] = []

    async def decide(self, request: DecideRequest, identity: Identity | None = None) -> Decision:
        self.asked.append((request, identity))
        return await super().decide(request, identity)

    def calls(self) -> list[tuple[DecideRequest, Identity | None]]:
        """The tools/call decisions (not the dry runs tools/list makes)."""
        return [(r, i) for r, i in self.asked if not r.dry_run]


class Upstream:
    """What the fixture server behind the proxy received: calls, messages, environment."""

    def __init__(self, tmp: Path) -> None:
        self.record = tmp / "calls.jsonl"
        self.inbound = tmp / "inbound.jsonl"
        self.environment = tmp / "environment.json"
        self.headers = tmp / "headers.jsonl"
        self.mode = ""  # IMAGING_FIXTURE_MODE: "hang" never answers copy_image_set

    def env(self) -> dict[str, str]:
        return clean_env(
            **{
                MODE_ENV: self.mode,
                RECORD_ENV: str(self.record),
                INBOUND_ENV: str(self.inbound),
                ENV_ENV: str(self.environment),
                HEADERS_ENV: str(self.headers),
            }
        )

    def calls(self) -> list[dict[str, Any]]:
        return calls(self.record)

    def reached(self) -> bool:
        """Whether anything at all reached the server (it was even started)."""
        return self.inbound.exists() or self.environment.exists() or self.headers.exists()

    def http_requests(self) -> list[dict[str, Any]]:
        return calls(self.headers)


@pytest.fixture
def upstream(tmp_path: Path) -> Upstream:
    return Upstream(tmp_path)


@contextlib.asynccontextmanager
async def guarded(
    runtime: Runtime,
    upstream: Upstream,
    *,
    issuer: Issuer | None = None,
    keys_file: Path | None = None,
    scopes: tuple[str, ...] = (),
    url: str | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[tuple[HttpProxy, Recording]]:
    """The proxy with --auth-* on a free loopback port, before a fixture child (or `url`)."""
    config = AuthConfig(
        issuer=issuer.issuer if issuer is not None else None,
        audience=AUDIENCE if issuer is not None else None,
        required_scopes=scopes,
        keys_file=keys_file,
        keys_check_interval=0.2,
    )
    resource = ResourceServer(config)
    await resource.start()
    decider = Recording(runtime)
    env = upstream.env()

    def open_upstream() -> Any:
        if url is not None:
            return open_http(url, headers)
        return open_child(FIXTURE, env)

    try:
        running = await start_http_proxy(
            "127.0.0.1",
            0,
            decider=decider,
            options=ProxyOptions(),
            open_upstream=open_upstream,
            auth=resource,
        )
        try:
            yield running, decider
        finally:
            await running.stop()
    finally:
        await resource.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def initialize(request_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw-test-client", "version": "1"},
        },
    }


def tools_call(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def answer_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message of a response (a JSON body, or the last SSE data line)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        body: dict[str, Any] = response.json()
        return body
    data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    message: dict[str, Any] = json.loads([d for d in data if d][-1])
    return message


def only_mcp_error(exc: BaseException) -> MCPError:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    assert isinstance(exc, MCPError), repr(exc)
    return exc


async def opening_error(url: str, headers: dict[str, str]) -> MCPError:
    """The error the SDK client gets when it tries to open a session."""
    try:
        async with http_session(url, headers):
            pass
    except BaseException as exc:  # an MCPError, in the SDK's task group
        return only_mcp_error(exc)
    raise AssertionError("the session opened")


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def assert_refused(
    response: httpx.Response, error: str | None, *, status: int = 401, metadata: str = METADATA_URL
) -> str:
    """A 401 (or `status`) with the RFC 6750 challenge and a JSON-RPC error; its text."""
    assert response.status_code == status, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith(f'Bearer resource_metadata="{metadata}"'), challenge
    if error is None:
        assert "error=" not in challenge
    else:
        assert f'error="{error}"' in challenge
        assert 'error_description="' in challenge
    body = response.json()
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert body["error"]["code"] == -32600
    assert body["error"]["data"]["resource_metadata"] == metadata
    if error is not None:
        assert body["error"]["data"]["error"] == error
    return challenge


# -- JWTs -----------------------------------------------------------------------------------


async def test_a_valid_token_works_and_is_the_principal(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent, user = "agent-" + uuid.uuid4().hex[:8], "user-" + uuid.uuid4().hex[:8]
    rsa_token = issuer.token(agent, user, roles=["imaging-admin"])
    ec_token = issuer.token(agent, user, key=issuer.ec)
    args = copy_args()
    async with guarded(runtime, upstream, issuer=issuer) as (running, decider):
        async with http_session(running.url, bearer(rsa_token)) as session:
            listed = await session.list_tools()
            first = await session.call_tool("copy_image_set", args)
        async with http_session(running.url, bearer(ec_token)) as session:
            second = await session.call_tool("copy_image_set", args)

    assert "copy_image_set" in [tool.name for tool in listed.tools]
    assert first.is_error is False
    assert second.is_error is False
    assert upstream.calls() == [{"tool": "copy_image_set", "arguments": args}] * 2
    decided = decider.calls()
    assert len(decided) == 2
    for request, identity in decided:
        assert identity is not None
        assert identity.method == "jwt"
        assert (identity.agent_id, identity.user_id) == (agent, user)
        assert request.principal.agent_id == agent
        assert request.principal.user_id == user
    assert decided[0][0].principal.roles == ["imaging-admin"]
    # The stdio child never sees the agent's credential.
    environment = upstream.environment.read_text()
    assert rsa_token not in environment
    assert ec_token not in environment


def bad_tokens(issuer: Issuer) -> list[tuple[str, str | None, str]]:
    """(what, the Authorization header value or None, the RFC 6750 error expected)."""
    agent, user = "agent-bad", "user-bad"
    now = int(time.time())
    good = issuer.agent_claims(agent, user)
    valid = issuer.token(agent, user)
    header, _, signature = valid.split(".")
    tampered = f"{header}.{b64(json.dumps({**good, 'client_id': 'admin'}).encode())}.{signature}"
    hs_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, good)
    hs_signature = hmac.new(issuer.rsa.public_pem(), hs_input.encode(), hashlib.sha256).digest()
    return [
        ("no token", None, ""),
        ("expired", "Bearer " + issuer.token(agent, user, iat=now - 900, exp=now - 300), "exp"),
        ("not yet valid", "Bearer " + issuer.token(agent, user, nbf=now + 600), "nbf"),
        ("wrong issuer", "Bearer " + issuer.token(agent, user, iss="https://evil.test"), "iss"),
        ("wrong audience", "Bearer " + issuer.token(agent, user, aud="https://x.test/mcp"), "aud"),
        ("unknown kid", "Bearer " + issuer.token(agent, user, key=issuer.stranger), "kid"),
        ("alg none", "Bearer " + unsigned({"alg": "none", "kid": "rsa-1"}, good) + ".", "alg"),
        ("HS256 with the public key", f"Bearer {hs_input}.{b64(hs_signature)}", "alg"),
        ("tampered", "Bearer " + tampered, "signature"),
        ("not a token", "Bearer not-a-jwt", "malformed"),
        ("another scheme", "Basic " + b64(b"agent:secret"), "request"),
    ]


EXPECTED_ERROR = {"": None, "request": "invalid_request"}


async def test_bad_tokens_get_401_and_reach_nothing(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    cases = bad_tokens(issuer)
    valid = issuer.token("agent-q", "user-q")
    answers: dict[str, httpx.Response] = {}
    async with (
        guarded(runtime, upstream, issuer=issuer) as (running, decider),
        httpx.AsyncClient(timeout=10) as raw,
    ):
        for what, authorization, _ in cases:
            headers = dict(ACCEPT)
            if authorization is not None:
                headers["authorization"] = authorization
            answers[what] = await raw.post(running.url, json=initialize(), headers=headers)
        # A valid token in the URL is refused, with or without a header.
        answers["token in the query"] = await raw.post(
            running.url, params={"access_token": valid}, json=initialize(), headers=ACCEPT
        )
        answers["token in the query too"] = await raw.post(
            running.url,
            params={"access_token": valid},
            json=initialize(),
            headers={**ACCEPT, **bearer(valid)},
        )
        # The SDK client sees the refusal as an error from its first request.
        expired = cases[1][1]
        assert expired is not None
        refused = await opening_error(running.url, {"Authorization": expired})
        sessions = dict(running.app.sessions)

    for what, _, hint in cases:
        challenge = assert_refused(answers[what], EXPECTED_ERROR.get(hint, "invalid_token"))
        if hint in ("exp", "nbf", "iss", "aud", "kid", "alg", "signature", "malformed"):
            description = challenge.split('error_description="', 1)[1]
            assert {
                "exp": "expired",
                "nbf": "not yet valid",
                "iss": "another issuer",
                "aud": "not for this resource",
                "kid": "unknown signing key",
                "alg": "algorithm",
                "signature": "signature",
                "malformed": "malformed",
            }[hint] in description, (what, challenge)
    for what in ("token in the query", "token in the query too"):
        assert_refused(answers[what], "invalid_request")
        assert "URL" in answers[what].headers["www-authenticate"]
    assert "Unauthorized" in refused.error.message
    assert "expired" in refused.error.message
    assert sessions == {}
    assert decider.asked == []
    assert upstream.calls() == []
    assert not upstream.reached()


async def test_a_bad_token_on_an_open_session_reaches_nothing(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent, user = "agent-" + uuid.uuid4().hex[:8], "user-o"
    now = int(time.time())
    expired = issuer.token(agent, user, iat=now - 900, exp=now - 300)
    args = copy_args()
    async with (
        guarded(runtime, upstream, issuer=issuer) as (running, decider),
        http_session(running.url, bearer(issuer.token(agent, user))) as session,
        httpx.AsyncClient(timeout=10) as raw,
    ):
        (session_id,) = running.app.sessions
        headers = {**ACCEPT, **VERSION, "mcp-session-id": session_id}
        refused = await raw.post(
            running.url,
            json=tools_call(90, "copy_image_set", args),
            headers={**headers, **bearer(expired)},
        )
        missing = await raw.post(
            running.url, json=tools_call(91, "copy_image_set", args), headers=headers
        )
        stream = await raw.get(running.url, headers={**headers, **bearer(expired)})
        still = await session.call_tool("copy_image_set", args)

    assert_refused(refused, "invalid_token")
    assert_refused(missing, None)
    assert_refused(stream, "invalid_token")
    assert still.is_error is False
    assert upstream.calls() == [{"tool": "copy_image_set", "arguments": args}]
    assert len(decider.calls()) == 1


async def test_insufficient_scope_is_403(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent = "agent-" + uuid.uuid4().hex[:8]
    without = issuer.token(agent, "user-s", scope="profile email")
    with_scope = issuer.token(agent, "user-s", scope=f"profile {SCOPE}")
    args = copy_args()
    async with (
        guarded(runtime, upstream, issuer=issuer, scopes=(SCOPE,)) as (running, decider),
        httpx.AsyncClient(timeout=10) as raw,
    ):
        forbidden = await raw.post(
            running.url, json=initialize(), headers={**ACCEPT, **bearer(without)}
        )
        unauthenticated = await raw.post(running.url, json=initialize(), headers=ACCEPT)
        refused_sessions = dict(running.app.sessions)
        async with http_session(running.url, bearer(with_scope)) as session:
            allowed = await session.call_tool("copy_image_set", args)

    challenge = assert_refused(forbidden, "insufficient_scope", status=403)
    assert f'scope="{SCOPE}"' in challenge
    assert forbidden.json()["error"]["message"].startswith("Forbidden")
    # The 401 tells the client which scope to ask for.
    assert f'scope="{SCOPE}"' in assert_refused(unauthenticated, None)
    assert refused_sessions == {}
    assert allowed.is_error is False
    assert upstream.calls() == [{"tool": "copy_image_set", "arguments": args}]
    assert len(decider.calls()) == 1


async def test_protected_resource_metadata(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    async with (
        guarded(runtime, upstream, issuer=issuer, scopes=(SCOPE,)) as (running, _),
        httpx.AsyncClient(timeout=10) as raw,
    ):
        base = running.url.removesuffix("/mcp")
        root = await raw.get(base + "/.well-known/oauth-protected-resource")
        suffixed = await raw.get(base + "/.well-known/oauth-protected-resource/mcp")
        posted = await raw.post(base + "/.well-known/oauth-protected-resource/mcp", json={})
        other = await raw.get(base + "/.well-known/oauth-protected-resource/other")

    for response in (root, suffixed):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        document = response.json()
        assert document["resource"] == AUDIENCE
        assert document["authorization_servers"] == [issuer.issuer]
        assert document["scopes_supported"] == [SCOPE]
        assert document["bearer_methods_supported"] == ["header"]
    assert posted.status_code == 405
    assert other.status_code == 404
    assert not upstream.reached()


# -- API keys -------------------------------------------------------------------------------


async def test_api_keys_and_revocation(
    runtime: Runtime, issuer: Issuer, upstream: Upstream, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    agent = "agent-" + uuid.uuid4().hex[:8]
    secret = add_entry(keys, "api_key", "key-1", agent_id=agent, user_id="kim", roles=["ops"])
    args = copy_args()
    async with (
        guarded(runtime, upstream, keys_file=keys) as (running, decider),
        httpx.AsyncClient(timeout=10) as raw,
    ):
        origin = running.url.removesuffix("/mcp")
        unknown = await raw.post(
            running.url, json=initialize(), headers={**ACCEPT, **bearer("mcpk_" + "x" * 43)}
        )
        metadata = await raw.get(origin + "/.well-known/oauth-protected-resource/mcp")
        async with http_session(running.url, bearer(secret)) as session:
            before = await session.call_tool("copy_image_set", args)
            revoke_entry(keys, "key-1")
            # The keys file is checked again within seconds (here: 0.2 s).
            for _ in range(100):
                probe = await raw.post(
                    running.url, json=initialize(), headers={**ACCEPT, **bearer(secret)}
                )
                if probe.status_code == 401:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(MCPError) as after:
                await session.call_tool("copy_image_set", copy_args())

    own_metadata = f"{origin}/.well-known/oauth-protected-resource/mcp"
    assert_refused(unknown, "invalid_token", metadata=own_metadata)
    assert "unknown or revoked API key" in unknown.headers["www-authenticate"]
    assert metadata.json()["resource"] == running.url
    assert "authorization_servers" not in metadata.json()
    assert before.is_error is False
    assert_refused(probe, "invalid_token", metadata=own_metadata)
    assert "Unauthorized" in after.value.error.message
    assert upstream.calls() == [{"tool": "copy_image_set", "arguments": args}]
    ((request, identity),) = decider.calls()
    assert identity is not None and identity.method == "api_key"
    assert (request.principal.agent_id, request.principal.user_id) == (agent, "kim")
    assert request.principal.roles == ["ops"]


async def test_jwt_and_api_key_together(
    runtime: Runtime, issuer: Issuer, upstream: Upstream, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    key_agent, jwt_agent = "agent-k" + uuid.uuid4().hex[:6], "agent-j" + uuid.uuid4().hex[:6]
    secret = add_entry(keys, "api_key", "key-1", agent_id=key_agent)
    token = issuer.token(jwt_agent, "user-j")
    async with guarded(runtime, upstream, issuer=issuer, keys_file=keys) as (running, decider):
        async with http_session(running.url, bearer(secret)) as session:
            by_key = await session.call_tool("copy_image_set", copy_args())
        async with http_session(running.url, bearer(token)) as session:
            by_jwt = await session.call_tool("copy_image_set", copy_args())
        async with httpx.AsyncClient(timeout=10) as raw:
            neither = await raw.post(
                running.url, json=initialize(), headers={**ACCEPT, **bearer("mcpk_nothing")}
            )

    assert by_key.is_error is False
    assert by_jwt.is_error is False
    assert [i.method for _, i in decider.calls() if i is not None] == ["api_key", "jwt"]
    assert [r.principal.agent_id for r, _ in decider.calls()] == [key_agent, jwt_agent]
    assert_refused(neither, "invalid_token")
    assert looks_like_jwt(token) and not looks_like_jwt(secret)


# -- the upstream keeps its own credentials ---------------------------------------------------


async def test_the_upstream_never_sees_the_agents_token(
    runtime: Runtime, issuer: Issuer, upstream: Upstream, tmp_path: Path
) -> None:
    token = issuer.token("agent-" + uuid.uuid4().hex[:8], "user-h")
    server = HttpFixture.start(upstream.env(), tmp_path / "server.log")
    args = copy_args()
    try:
        async with (
            guarded(
                runtime,
                upstream,
                issuer=issuer,
                url=server.url,
                headers={"Authorization": "Bearer upstream-secret"},
            ) as (running, _),
            http_session(running.url, bearer(token)) as session,
        ):
            listed = await session.list_tools()
            allowed = await session.call_tool("copy_image_set", args)
    finally:
        server.stop()

    assert "copy_image_set" in [tool.name for tool in listed.tools]
    assert allowed.is_error is False
    assert upstream.calls() == [
        {"tool": "copy_image_set", "arguments": args, "authorization": "Bearer upstream-secret"}
    ]
    requests = upstream.http_requests()
    assert {r["method"] for r in requests} >= {"POST"}
    for request in requests:
        values = [value for _, value in request["headers"]]
        assert all(token not in value for value in values), request
        authorization = [v for k, v in request["headers"] if k.lower() == "authorization"]
        assert authorization == ["Bearer upstream-secret"], request
    assert token not in upstream.environment.read_text()


# -- sessions belong to the credential that opened them ---------------------------------------


async def test_a_session_is_only_used_by_its_opener(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent, user = "agent-a" + uuid.uuid4().hex[:6], "user-a"
    owner = issuer.token(agent, user)
    renewed = issuer.token(agent, user, key=issuer.ec)  # the same principal, a new token
    stranger = issuer.token("agent-b" + uuid.uuid4().hex[:6], "user-b")
    args, stolen_args = copy_args(), copy_args()
    async with (
        guarded(runtime, upstream, issuer=issuer) as (running, decider),
        http_session(running.url, bearer(owner)) as session,
        httpx.AsyncClient(timeout=10) as raw,
    ):
        (session_id,) = running.app.sessions
        headers = {**ACCEPT, **VERSION, "mcp-session-id": session_id}
        stolen = await raw.post(
            running.url,
            json=tools_call(70, "copy_image_set", stolen_args),
            headers={**headers, **bearer(stranger)},
        )
        stolen_stream = await raw.get(running.url, headers={**headers, **bearer(stranger)})
        stolen_delete = await raw.delete(running.url, headers={**headers, **bearer(stranger)})
        by_renewed = await raw.post(
            running.url,
            json=tools_call(71, "copy_image_set", args),
            headers={**headers, **bearer(renewed)},
        )
        by_owner = await session.call_tool("copy_image_set", copy_args())
        still_open = session_id in running.app.sessions

    for response in (stolen, stolen_stream, stolen_delete):
        assert response.status_code == 404
        assert response.json()["error"]["message"] == "Session not found"
    assert by_renewed.status_code == 200
    assert answer_of(by_renewed)["result"]["isError"] is False
    assert by_owner.is_error is False
    assert still_open
    assert stolen_args not in [c["arguments"] for c in upstream.calls()]
    assert len(upstream.calls()) == 2
    assert {i.agent_id for _, i in decider.calls() if i is not None} == {agent}


# -- limits key on the proven principal ------------------------------------------------------


async def test_agent_and_user_limits_follow_the_token(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent_a, agent_b = "agent-a" + uuid.uuid4().hex[:6], "agent-b" + uuid.uuid4().hex[:6]
    user_a, user_b = "user-a" + uuid.uuid4().hex[:6], "user-b" + uuid.uuid4().hex[:6]
    token_a = issuer.token(agent_a, user_a)
    token_b = issuer.token(agent_b, user_b)
    token_c = issuer.token("agent-c" + uuid.uuid4().hex[:6], user_a)  # user_a's other agent
    listing = {"max_results": 5}
    async with guarded(runtime, upstream, issuer=issuer) as (running, _):
        # Agent A: two sessions (a reconnect) share its agent-scoped copy limit.
        async with http_session(running.url, bearer(token_a)) as session:
            first = [await session.call_tool("copy_image_set", copy_args()) for _ in range(2)]
            listed_a = await session.call_tool(LIST_TOOL, listing)
        async with http_session(running.url, bearer(issuer.token(agent_a, user_a))) as session:
            second = [await session.call_tool("copy_image_set", copy_args()) for _ in range(2)]
        # Agent B has a counter of its own.
        async with http_session(running.url, bearer(token_b)) as session:
            other = [
                await session.call_tool("copy_image_set", copy_args()) for _ in range(COPY_LIMIT)
            ]
            listed_b = await session.call_tool(LIST_TOOL, listing)
        # Another agent of user A shares user A's list limit.
        async with http_session(running.url, bearer(token_c)) as session:
            listed_c = [await session.call_tool(LIST_TOOL, listing) for _ in range(2)]

    assert [r.is_error for r in first] == [False, False]
    assert [r.is_error for r in second] == [False, True]
    limited = decision_of(second[1])
    assert limited["verdict"] == "rate_limited"
    assert limited["rate_limit"]["scope"] == "agent"
    assert [r.is_error for r in other] == [False] * COPY_LIMIT
    assert listed_a.is_error is False and listed_b.is_error is False
    assert [r.is_error for r in listed_c] == [False, True]
    assert decision_of(listed_c[1])["rate_limit"]["scope"] == "user"

    await runtime.decision_log.flush()
    log_file = Path(runtime.settings.decision_log)
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    decisions = [r for r in records if r.get("event") == "decision" and not r.get("dry_run")]
    mine = [r for r in decisions if r["principal"]["agent_id"] == agent_a]
    assert len(mine) == 2 + 1 + 2
    assert {r["principal"]["user_id"] for r in mine} == {user_a}
    session_ids = {r["principal"]["session_id"] for r in mine}
    assert len(session_ids) == 2  # the limit held across two MCP sessions
    theirs = [r for r in decisions if r["principal"]["agent_id"] == agent_b]
    assert {r["principal"]["user_id"] for r in theirs} == {user_b}
    assert len(theirs) == COPY_LIMIT + 1


# -- the gRPC decider -------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Servers, str]]:
    """A decision service that knows one proxy (its client token comes along)."""
    tmp = tmp_path_factory.mktemp("proxy-auth-grpc")
    token = add_entry(tmp / "clients.yaml", "client_token", "proxy-a")
    settings = settings_for(tmp, policy_paths=auth_policy(tmp), clients_file=tmp / "clients.yaml")
    running = await start_servers(settings)
    yield running, token
    await running.stop()


async def test_grpc_decider_sends_the_proven_principal(
    service: tuple[Servers, str], issuer: Issuer, upstream: Upstream
) -> None:
    running_service, token = service
    agent, user = "agent-g" + uuid.uuid4().hex[:6], "user-g" + uuid.uuid4().hex[:6]
    resource = ResourceServer(AuthConfig(issuer=issuer.issuer, audience=AUDIENCE))
    await resource.start()
    decider = GrpcDecider(running_service.grpc_target, client_token=token)
    env = upstream.env()
    try:
        running = await start_http_proxy(
            "127.0.0.1",
            0,
            decider=decider,
            # What the proxy's options assert is overridden by what the token proves.
            options=ProxyOptions(agent_id="asserted-agent", user_id="asserted-user"),
            open_upstream=lambda: open_child(FIXTURE, env),
            auth=resource,
        )
        try:
            async with http_session(running.url, bearer(issuer.token(agent, user))) as session:
                results = [
                    await session.call_tool("copy_image_set", copy_args())
                    for _ in range(COPY_LIMIT + 1)
                ]
        finally:
            await running.stop()
    finally:
        await decider.close()
        await resource.close()

    assert [r.is_error for r in results] == [False] * COPY_LIMIT + [True]
    await running_service.runtime.decision_log.flush()
    log_file = Path(running_service.runtime.settings.decision_log)
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    mine = [
        r
        for r in records
        if r.get("event") == "decision"
        and not r.get("dry_run")
        and r["principal"]["agent_id"] == agent
    ]
    assert len(mine) == COPY_LIMIT + 1
    assert {r["principal"]["user_id"] for r in mine} == {user}
    assert not [r for r in records if r.get("principal", {}).get("agent_id") == "asserted-agent"]


# -- exposure and the command line ------------------------------------------------------------


async def test_without_auth_only_loopback_is_served(runtime: Runtime, upstream: Upstream) -> None:
    with pytest.raises(ListenRefused, match="--insecure"):
        await start_http_proxy(
            "0.0.0.0",
            0,
            decider=EmbeddedDecider(runtime),
            options=ProxyOptions(),
            open_upstream=lambda: open_child(FIXTURE, upstream.env()),
        )
    assert check_exposure("10.1.2.3", authenticated=False, insecure=True) is None
    assert check_exposure("10.1.2.3", authenticated=True, insecure=False) is None
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
        assert check_exposure(host, authenticated=False, insecure=False) is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "mcp.example.test"):
        assert check_exposure(host, authenticated=False, insecure=False) is not None


def run_proxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROXY, "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or clean_env(),
        cwd=str(PROJECT_ROOT),
    )


def test_the_command_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    child = ["--", *FIXTURE]
    exposed = run_proxy("--decision-url", "127.0.0.1:1", "--listen", "0.0.0.0:0", *child)
    half = run_proxy(
        "--decision-url", "127.0.0.1:1", "--listen", "127.0.0.1:0", "--auth-issuer",
        "https://issuer.test", *child,
    )  # fmt: skip
    stdio = run_proxy("--decision-url", "127.0.0.1:1", "--auth-keys", "keys.yaml", *child)
    no_file = run_proxy(
        "--decision-url", "127.0.0.1:1", "--listen", "127.0.0.1:0",
        "--auth-keys", str(tmp_path / "missing.yaml"), *child,
    )  # fmt: skip

    assert exposed.returncode == 2
    assert exposed.stderr.strip().splitlines() == [
        "mcp-policy proxy: refusing to serve MCP on 0.0.0.0 without authentication: give "
        "--auth-issuer and --auth-audience, or --auth-keys, or pass --insecure"
    ]
    assert half.returncode == 2
    assert "--auth-issuer and --auth-audience go together" in half.stderr
    assert stdio.returncode == 2
    assert "go with --listen" in stdio.stderr
    assert no_file.returncode == 1
    assert "cannot check credentials" in no_file.stderr
    assert "no such file" in no_file.stderr


async def test_the_listen_command_with_auth(
    tmp_path: Path, issuer: Issuer, upstream: Upstream
) -> None:
    policy = auth_policy(tmp_path)
    token = issuer.token("agent-" + uuid.uuid4().hex[:8], "user-cli", scope=SCOPE)
    args = copy_args()
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "proxy",
        *embedded_args(tmp_path, policy),
        "--listen",
        "127.0.0.1:0",
        "--auth-issuer",
        issuer.issuer,
        "--auth-audience",
        AUDIENCE,
        "--auth-required-scope",
        SCOPE,
        "--",
        *FIXTURE,
        stdout=asyncio.subprocess.PIPE,
        env=upstream.env(),
        cwd=str(PROJECT_ROOT),
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert "MCP on http://127.0.0.1:" in line, line
        assert "bearer credentials required" in line
        url = line.split("MCP on ", 1)[1].split(" ", 1)[0]
        async with httpx.AsyncClient(timeout=10) as raw:
            refused = await raw.post(url, json=initialize(), headers=ACCEPT)
        async with http_session(url, bearer(token)) as session:
            result = await session.call_tool("copy_image_set", args)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(proc.wait(), 30)

    assert_refused(refused, None)
    assert result.is_error is False
    assert upstream.calls() == [{"tool": "copy_image_set", "arguments": args}]
    assert status == 0


def test_auth_config_problems() -> None:
    assert AuthConfig(issuer="https://i.test").problem() is not None
    assert AuthConfig().problem() is not None
    assert AuthConfig(keys_file=Path("k"), required_scopes=("a",)).problem() is not None
    assert (
        AuthConfig(issuer="https://i.test", audience="not a url").problem()
        == "--auth-audience must be this resource's URL, got 'not a url'"
    )
    bad_scope = AuthConfig(issuer="https://i.test", audience=AUDIENCE, required_scopes=("a b",))
    assert bad_scope.problem() is not None
    assert AuthConfig(issuer="https://i.test", audience=AUDIENCE).problem() is None
    assert AuthConfig(keys_file=Path("k")).problem() is None


# -- the stateless protocol (2026-07-28) ------------------------------------------------------

MODERN = "2026-07-28"


@contextlib.asynccontextmanager
async def stateless_client(
    url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    """The SDK client pinned to 2026-07-28 (no handshake), sending `headers` every time."""
    async with (
        create_mcp_http_client(headers=headers) as http,
        Client(streamable_http_client(url, http_client=http), mode=MODERN) as client,
    ):
        yield client


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": method}
    if name is not None:
        headers["mcp-name"] = name
    return headers


def modern_call(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    call = tools_call(request_id, name, arguments)
    call["params"]["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return call


async def test_a_stateless_client_lists_and_calls_tools(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent, user = "agent-m" + uuid.uuid4().hex[:6], "user-m" + uuid.uuid4().hex[:6]
    token = issuer.token(agent, user, roles=["reader"])
    args = copy_args()
    async with guarded(runtime, upstream, issuer=issuer) as (running, decider):
        async with stateless_client(running.url, bearer(token)) as client:
            listed = await client.list_tools()
            allowed = await client.call_tool("copy_image_set", args)
            denied = await client.call_tool("delete_datastore", {"datastore_id": "x"})
            version = client.protocol_version
        refused = await stateless_error(running.url, None)
        handshake_sessions = dict(running.app.sessions)

    assert version == MODERN
    assert {"copy_image_set", LIST_TOOL} <= {tool.name for tool in listed.tools}
    assert "delete_datastore" not in {tool.name for tool in listed.tools}
    assert allowed.is_error is False
    assert allowed.structured_content is not None
    assert denied.is_error is True
    assert decision_of(denied)["rule"] == "catalog.default"
    assert "Unauthorized" in refused.error.message
    assert handshake_sessions == {}  # no Mcp-Session-Id at 2026-07-28
    (recorded,) = upstream.calls()
    assert (recorded["tool"], recorded["arguments"]) == ("copy_image_set", args)
    decided = decider.calls()
    assert len(decided) == 2
    for request, identity in decided:
        assert identity is not None and identity.agent_id == agent
        assert (request.principal.agent_id, request.principal.user_id) == (agent, user)
        assert request.principal.roles == ["reader"]


async def stateless_error(url: str, headers: dict[str, str] | None) -> MCPError:
    try:
        async with stateless_client(url, headers) as client:
            await client.list_tools()
    except BaseException as exc:
        return only_mcp_error(exc)
    raise AssertionError("the request was answered")


def sessions_of(decider: Recording) -> list[str]:
    return [request.principal.session_id for request, _ in decider.calls()]


async def test_stateless_sessions_for_limits(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent, user = "agent-s" + uuid.uuid4().hex[:6], "user-s" + uuid.uuid4().hex[:6]
    other = "agent-t" + uuid.uuid4().hex[:6]
    sid = "idp-session-" + uuid.uuid4().hex[:8]
    token = issuer.token(agent, user)
    async with guarded(runtime, upstream, issuer=issuer) as (running, decider):
        # The token's sid claim is the session, whichever token carries it.
        for _ in range(2):
            async with stateless_client(
                running.url, bearer(issuer.token(other, user, sid=sid))
            ) as client:
                await client.call_tool(LIST_TOOL, {})
        by_sid = sessions_of(decider)
        decider.asked.clear()
        # Without one: the client's Mcp-Policy-Session header, else one per principal.
        for header in ("one", "two", None, None):
            headers = (
                bearer(token) if header is None else {**bearer(token), "mcp-policy-session": header}
            )
            async with stateless_client(running.url, headers) as client:
                await client.call_tool("copy_image_set", copy_args())
        named_one, named_two, unnamed, unnamed_again = sessions_of(decider)
        decider.asked.clear()
        # Another principal naming the same session gets a session of its own.
        async with stateless_client(
            running.url, {**bearer(issuer.token(other, "user-u")), "mcp-policy-session": "one"}
        ) as client:
            await client.call_tool("copy_image_set", copy_args())
        (theirs,) = sessions_of(decider)
        async with httpx.AsyncClient(timeout=10) as raw:
            bad_name = await raw.post(
                running.url,
                json=modern_call(5, "copy_image_set", copy_args()),
                headers={
                    **modern_headers("tools/call", "copy_image_set"),
                    **bearer(token),
                    "mcp-policy-session": "no spaces allowed",
                },
            )

    assert by_sid == [sid, sid]
    assert len({named_one, named_two, unnamed}) == 3
    assert named_one.startswith("one@") and named_two.startswith("two@")
    assert unnamed == unnamed_again
    assert theirs.startswith("one@") and theirs != named_one
    assert bad_name.status_code == 400
    assert "mcp-policy-session" in bad_name.json()["error"]["message"]


async def test_agent_limits_hold_across_protocols(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    agent = "agent-x" + uuid.uuid4().hex[:6]
    async with guarded(runtime, upstream, issuer=issuer) as (running, _):
        async with http_session(running.url, bearer(issuer.token(agent, "u1"))) as session:
            legacy = [await session.call_tool("copy_image_set", copy_args()) for _ in range(2)]
        async with stateless_client(running.url, bearer(issuer.token(agent, "u1"))) as client:
            modern = [await client.call_tool("copy_image_set", copy_args()) for _ in range(2)]

    assert [r.is_error for r in legacy + modern] == [False, False, False, True]
    assert decision_of(modern[1])["verdict"] == "rate_limited"
    assert len(upstream.calls()) == COPY_LIMIT


async def test_stateless_requests_are_screened(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    token = issuer.token("agent-r" + uuid.uuid4().hex[:6], "user-r")
    call = modern_call(1, "copy_image_set", copy_args())
    headers = {**modern_headers("tools/call", "copy_image_set"), **bearer(token)}
    async with (
        guarded(runtime, upstream, issuer=issuer) as (running, decider),
        httpx.AsyncClient(timeout=10) as raw,
    ):
        unauthenticated = await raw.post(
            running.url, json=call, headers=modern_headers("tools/call")
        )
        get = await raw.get(running.url, headers=headers)
        notification = await raw.post(
            running.url,
            json={
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": 1},
            },
            headers={**headers, "mcp-method": "notifications/cancelled"},
        )
        mismatch = await raw.post(
            running.url, json=call, headers={**headers, "mcp-name": "delete_datastore"}
        )
        no_envelope = await raw.post(
            running.url, json=tools_call(2, "copy_image_set", copy_args()), headers=headers
        )
        not_json = await raw.post(running.url, content=b"{", headers=headers)
        rebinding = await raw.post(running.url, json=call, headers={**headers, "host": "evil.test"})
        answered = await raw.post(running.url, json=call, headers=headers)

    assert_refused(unauthenticated, None)
    assert get.status_code == 405
    assert notification.status_code == 202
    assert mismatch.status_code == 400
    assert mismatch.json()["error"]["code"] == -32020
    assert no_envelope.status_code == 400
    assert no_envelope.json()["error"]["code"] == -32602
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == -32700
    assert rebinding.status_code == 421
    assert answered.status_code == 200
    assert answer_of(answered)["id"] == 1
    assert answer_of(answered)["result"]["isError"] is False
    assert len(upstream.calls()) == 1
    assert len(decider.calls()) == 1


async def test_stateless_on_loopback_without_auth(runtime: Runtime, upstream: Upstream) -> None:
    decider = Recording(runtime)
    env = upstream.env()
    running = await start_http_proxy(
        "127.0.0.1",
        0,
        decider=decider,
        options=ProxyOptions(agent_id="local-agent"),
        open_upstream=lambda: open_child(FIXTURE, env),
    )
    try:
        async with stateless_client(running.url) as client:
            first = await client.call_tool("copy_image_set", copy_args())
            second = await client.call_tool("copy_image_set", copy_args())
        async with stateless_client(running.url, {"mcp-policy-session": "mine"}) as client:
            named = await client.call_tool("copy_image_set", copy_args())
    finally:
        await running.stop()

    assert [r.is_error for r in (first, second, named)] == [False] * 3
    connection, again, mine = sessions_of(decider)
    assert connection.startswith("connection-127.0.0.1-")
    assert again == connection  # one connection, kept alive
    assert mine == "mine"
    assert {r.principal.agent_id for r, _ in decider.calls()} == {"local-agent"}


async def test_a_stateless_client_that_hangs_up_cancels_its_call(
    runtime: Runtime, issuer: Issuer, upstream: Upstream
) -> None:
    upstream.mode = "hang"
    token = issuer.token("agent-h" + uuid.uuid4().hex[:6], "user-h")
    headers = {**modern_headers("tools/call", "copy_image_set"), **bearer(token)}
    async with guarded(runtime, upstream, issuer=issuer) as (running, _):
        async with httpx.AsyncClient(timeout=10) as raw:
            post = asyncio.create_task(
                raw.post(
                    running.url, json=modern_call(7, "copy_image_set", copy_args()), headers=headers
                )
            )
            # Once the call has reached the server (however long the decision took on a
            # busy machine), the client gives up and hangs up.
            for _ in range(200):
                if any(line["method"] == "tools/call" for line in calls(upstream.inbound)):
                    break
                await asyncio.sleep(0.05)
            post.cancel()
            with pytest.raises(asyncio.CancelledError):
                await post
        inbound: list[dict[str, Any]] = []
        for _ in range(100):
            inbound = calls(upstream.inbound)
            if any(line["method"] == "notifications/cancelled" for line in inbound):
                break
            await asyncio.sleep(0.1)
        (relay,) = running.app._stateless.values()
        in_flight = dict(relay._exchanges)

    forwarded = [line for line in inbound if line["method"] == "tools/call"]
    cancelled = [line for line in inbound if line["method"] == "notifications/cancelled"]
    assert len(forwarded) == 1
    assert [c["params"]["requestId"] for c in cancelled] == [forwarded[0]["id"]]
    assert in_flight == {}
