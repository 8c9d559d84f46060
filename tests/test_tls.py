"""TLS and mTLS on both listeners, the client-name allow-list, the proxy's TLS client, and
the refusal to serve beyond loopback without TLS.

Certificates come from `trustme`: one CA for the service and its callers, and a second,
unrelated CA whose client certificate must be refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from engine.models import DecideRequest
from engine.policy.opa_process import free_loopback_port
from engine.proxy import cli as proxy_cli
from engine.proxy.decider import DecisionUnavailable
from engine.proxy.grpc_decider import GrpcDecider
from engine.settings import Settings
from engine.transports.server import Servers, listen_http, start_servers
from engine.transports.tls import (
    ClientNameInterceptor,
    ClientNameMiddleware,
    StartupRefused,
    check_exposure,
    current_peer,
    is_loopback,
    load_server_tls,
    peer_identity,
)
from tests.clients import ApiError, GrpcClient
from tests.conftest import APPROVER_TOKEN, copy_call, session, settings_for
from tests.fixtures.proxy_harness import (
    FIXTURE,
    RECORD_ENV,
    calls,
    clean_env,
    copy_args,
    proxy_policy,
    stdio_session,
)
from tests.processes import CLI, Serve

ALLOWED = "proxy-a.example"
NOT_LISTED = "proxy-b.example"
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}


@dataclass
class Pki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # "a", "b", "stranger": (certificate, key)

    def ssl_context(self, client: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client is not None:
            cert, key = self.clients[client]
            context.load_cert_chain(cert, key)
        return context

    def channel_credentials(self, client: str | None = None) -> grpc.ChannelCredentials:
        cert = key = None
        if client is not None:
            cert_file, key_file = self.clients[client]
            cert, key = cert_file.read_bytes(), key_file.read_bytes()
        return grpc.ssl_channel_credentials(self.ca_file.read_bytes(), key, cert)

    def settings(self, tmp: Path, *, mtls: bool = True, **overrides: Any) -> Settings:
        tls: dict[str, Any] = {"tls_cert": self.server_cert, "tls_key": self.server_key}
        if mtls:
            tls["tls_client_ca"] = self.ca_file
        return settings_for(tmp, **tls, **overrides)


def _leaf(ca: trustme.CA, where: Path, name: str, *identities: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*identities)
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    server_cert, server_key = _leaf(ca, where, "server", "127.0.0.1", "localhost")
    return Pki(
        ca_file=where / "ca.pem",
        server_cert=server_cert,
        server_key=server_key,
        clients={
            "a": _leaf(ca, where, "proxy-a", ALLOWED),
            "b": _leaf(ca, where, "proxy-b", NOT_LISTED),
            # The allowed name, but signed by a CA the service does not trust.
            "stranger": _leaf(other_ca, where, "stranger", ALLOWED),
        },
    )


@pytest.fixture(scope="module")
async def mtls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """The service with mTLS, only proxy-a.example allowed."""
    tmp = tmp_path_factory.mktemp("mtls")
    running = await start_servers(
        pki.settings(tmp, tls_client_names=[ALLOWED], policy_paths=proxy_policy(tmp))
    )
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def tls_only(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """The service with TLS and no client CA: it proves itself, callers need no cert."""
    running = await start_servers(pki.settings(tmp_path_factory.mktemp("tls"), mtls=False))
    yield running
    await running.stop()


def https(servers: Servers) -> str:
    return f"https://127.0.0.1:{servers.http_port}"


def target(servers: Servers) -> str:
    return f"127.0.0.1:{servers.grpc_port}"


def https_client(pki: Pki, servers: Servers, client: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=https(servers), verify=pki.ssl_context(client), timeout=10)


async def grpc_decide(pki: Pki, servers: Servers, client: str | None, body: Any) -> Any:
    credentials = pki.channel_credentials(client)
    async with grpc.aio.secure_channel(target(servers), credentials) as channel:
        return await GrpcClient(channel).decide(body)


async def logged_sessions(pki: Pki, servers: Servers, session_id: str) -> list[Any]:
    """The decision log's records for `session_id`, read over mTLS as the allowed client."""
    await servers.runtime.decision_log.flush()
    async with https_client(pki, servers, "a") as client:
        response = await client.get(
            "/v1/decisions", params={"session_id": session_id}, headers=AUTH
        )
    assert response.status_code == 200, response.text
    records: list[Any] = response.json()["decisions"]
    return records


# --- TLS without client certificates ------------------------------------------------------


async def test_https_and_grpc_over_tls_verified_with_the_ca(pki: Pki, tls_only: Servers) -> None:
    async with https_client(pki, tls_only) as client:
        health = await client.get("/healthz")
        decided = await client.post("/v1/decide", json=copy_call())
    over_grpc = await grpc_decide(pki, tls_only, None, copy_call())

    assert health.status_code == 200
    assert decided.status_code == 200, decided.text
    assert decided.json()["verdict"] == "allow"
    assert over_grpc["verdict"] == "allow"


async def test_plain_text_to_a_tls_port_fails(tls_only: Servers) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"http://127.0.0.1:{tls_only.http_port}/healthz")
    async with grpc.aio.insecure_channel(target(tls_only)) as channel:
        with pytest.raises(ApiError) as caught:
            await GrpcClient(channel).decide(copy_call())
    assert caught.value.status == "UNAVAILABLE"


async def test_a_client_that_does_not_trust_the_ca_refuses_the_service(tls_only: Servers) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{https(tls_only)}/healthz")


# --- mTLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no-certificate", "other-ca"])
async def test_mtls_refuses_the_handshake(pki: Pki, mtls: Servers, client: str | None) -> None:
    sid = session()
    async with https_client(pki, mtls, client) as http:
        with pytest.raises(httpx.TransportError):
            await http.post("/v1/decide", json=copy_call(sid))
    with pytest.raises(ApiError) as caught:
        await grpc_decide(pki, mtls, client, copy_call(sid))

    assert caught.value.status == "UNAVAILABLE"
    assert await logged_sessions(pki, mtls, sid) == []


async def test_an_allowed_client_certificate_gets_decisions(pki: Pki, mtls: Servers) -> None:
    sid = session()
    async with https_client(pki, mtls, "a") as http:
        over_http = await http.post("/v1/decide", json=copy_call(sid))
    over_grpc = await grpc_decide(pki, mtls, "a", copy_call(sid))

    assert over_http.status_code == 200, over_http.text
    assert over_http.json()["verdict"] == "allow"
    assert over_grpc["verdict"] == "allow"
    assert len(await logged_sessions(pki, mtls, sid)) == 2


async def test_a_certificate_not_on_the_list_is_unauthenticated(pki: Pki, mtls: Servers) -> None:
    sid = session()
    async with https_client(pki, mtls, "b") as http:
        over_http = await http.post("/v1/decide", json=copy_call(sid))
        decisions = await http.get("/v1/decisions", headers=AUTH)
    with pytest.raises(ApiError) as caught:
        await grpc_decide(pki, mtls, "b", copy_call(sid))

    assert over_http.status_code == 401
    error = over_http.json()["error"]
    assert error["code"] == "Unauthenticated"
    assert NOT_LISTED in error["message"]
    assert decisions.status_code == 401  # even with the approver token
    assert caught.value.status == "UNAUTHENTICATED"
    assert NOT_LISTED in caught.value.message
    assert await logged_sessions(pki, mtls, sid) == []  # nothing was decided


async def test_health_is_open_to_any_certificate_the_ca_signed(pki: Pki, mtls: Servers) -> None:
    async with https_client(pki, mtls, "b") as http:
        live = await http.get("/healthz")
        ready = await http.get("/readyz")
        metrics = await http.get("/metrics")
    credentials = pki.channel_credentials("b")
    async with grpc.aio.secure_channel(target(mtls), credentials) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    assert (live.status_code, ready.status_code) == (200, 200)
    assert metrics.status_code == 401
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# --- the proxy's TLS client ---------------------------------------------------------------


async def test_grpc_decider_over_mtls(pki: Pki, mtls: Servers) -> None:
    cert, key = pki.clients["a"]
    allowed = GrpcDecider(target(mtls), tls_ca=pki.ca_file, tls_cert=cert, tls_key=key)
    other_cert, other_key = pki.clients["b"]
    refused = GrpcDecider(
        target(mtls),
        tls_ca=pki.ca_file.read_bytes(),
        tls_cert=other_cert.read_bytes(),
        tls_key=other_key.read_bytes(),
    )
    anonymous = GrpcDecider(target(mtls), tls_ca=pki.ca_file, timeout=5)
    request = DecideRequest.model_validate(copy_call())
    try:
        decision = await allowed.decide(request)
        with pytest.raises(DecisionUnavailable) as not_listed:
            await refused.decide(request)
        with pytest.raises(DecisionUnavailable) as no_cert:
            await anonymous.decide(request)
    finally:
        for decider in (allowed, refused, anonymous):
            await decider.close()

    assert decision.verdict.value == "allow"
    assert "UNAUTHENTICATED" in not_listed.value.message
    assert "UNAVAILABLE" in no_cert.value.message
    with pytest.raises(ValueError, match="together"):
        GrpcDecider(target(mtls), tls_cert=cert)


async def test_stdio_proxy_gets_decisions_over_mtls(
    pki: Pki, mtls: Servers, tmp_path: Path
) -> None:
    record = tmp_path / "calls.jsonl"
    cert, key = pki.clients["a"]
    args = copy_args()
    proxy_args = [
        "--decision-url",
        target(mtls),
        "--decision-ca",
        str(pki.ca_file),
        "--decision-cert",
        str(cert),
        "--decision-key",
        str(key),
        "--",
        *FIXTURE,
    ]
    env = clean_env(**{RECORD_ENV: str(record)})
    async with stdio_session(proxy_args, env, tmp_path / "proxy.log") as session_:
        allowed = await session_.call_tool("copy_image_set", args)
        denied = await session_.call_tool("delete_datastore", {"datastore_id": "x"})

    assert allowed.is_error is False
    assert denied.is_error is True
    assert [(c["tool"], c["arguments"]) for c in calls(record)] == [("copy_image_set", args)]


def test_proxy_tls_flags_are_checked(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.clients["a"]
    base = ["proxy", "--decision-url", "127.0.0.1:1"]
    alone = proxy_cli.main([*base, "--decision-cert", str(cert), "--", "true"])
    embedded = proxy_cli.main(
        ["proxy", "--embedded", "--decision-ca", str(pki.ca_file), "--", "true"]
    )
    with pytest.raises(SystemExit) as missing:
        proxy_cli.main([*base, "--decision-ca", str(tmp_path / "absent.pem"), "--", "true"])

    assert alone == proxy_cli.EXIT_USAGE
    assert embedded == proxy_cli.EXIT_USAGE
    assert missing.value.code == 2


# --- who the caller is --------------------------------------------------------------------


async def _who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return json.dumps([peer_identity(context), current_peer()]).encode()


async def _who_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield json.dumps([peer_identity(context), current_peer()]).encode()


async def test_grpc_peer_identity(pki: Pki, tmp_path: Path) -> None:
    tls = load_server_tls(pki.settings(tmp_path))
    assert tls is not None
    server = grpc.aio.server(interceptors=[ClientNameInterceptor([NOT_LISTED, ALLOWED])])
    handlers = {
        "Am": grpc.unary_unary_rpc_method_handler(_who),
        "Stream": grpc.unary_stream_rpc_method_handler(_who_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Who", handlers),))
    port = server.add_secure_port("127.0.0.1:0", tls.grpc_credentials())
    await server.start()
    seen: dict[str, Any] = {}
    try:
        for client in ("a", "b"):
            credentials = pki.channel_credentials(client)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                unary = await channel.unary_unary("/test.Who/Am")(b"")
                streamed = [m async for m in channel.unary_stream("/test.Who/Stream")(b"")]
                seen[client] = [json.loads(unary), *(json.loads(m) for m in streamed)]
    finally:
        await server.stop(grace=None)

    assert seen["a"] == [[ALLOWED, ALLOWED]] * 3
    assert seen["b"] == [[NOT_LISTED, NOT_LISTED]] * 3
    assert current_peer() is None  # nothing leaks out of a call


async def test_grpc_names_not_on_the_list_are_refused_for_streams_too(
    pki: Pki, tmp_path: Path
) -> None:
    tls = load_server_tls(pki.settings(tmp_path))
    assert tls is not None
    server = grpc.aio.server(interceptors=[ClientNameInterceptor([ALLOWED])])
    handlers = {"Stream": grpc.unary_stream_rpc_method_handler(_who_stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Who", handlers),))
    port = server.add_secure_port("127.0.0.1:0", tls.grpc_credentials())
    await server.start()
    try:
        credentials = pki.channel_credentials("b")
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [m async for m in channel.unary_stream("/test.Who/Stream")(b"")]
    finally:
        await server.stop(grace=None)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_http_peer_identity(pki: Pki, tmp_path: Path) -> None:
    """The ASGI TLS extension the listener adds, and the name the middleware proves."""
    tls = load_server_tls(pki.settings(tmp_path))
    assert tls is not None

    async def app(scope: Any, receive: Any, send: Any) -> None:
        extension = scope["extensions"]["tls"]
        body = json.dumps(
            {
                "current_peer": current_peer(),
                "state": scope["state"].get("tls_client"),
                "names": extension["client_cert_names"],
                "subject": extension["client_cert_name"],
                "chain": len(extension["client_cert_chain"]),
                "tls_version": extension["tls_version"],
            }
        ).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    listener = await listen_http(
        ClientNameMiddleware(app, []), "127.0.0.1", 0, "who", **tls.uvicorn_config()
    )
    try:
        answers = {}
        for client in ("a", "b"):
            async with httpx.AsyncClient(verify=pki.ssl_context(client), timeout=10) as http:
                response = await http.get(f"https://127.0.0.1:{listener.port}/")
                assert response.status_code == 200, response.text
                answers[client] = response.json()
    finally:
        listener.server.should_exit = True
        await listener.task

    assert answers["a"]["current_peer"] == answers["a"]["state"] == ALLOWED
    assert answers["a"]["names"] == [ALLOWED]
    assert "O=trustme" in answers["a"]["subject"]
    assert answers["a"]["chain"] == 1
    assert answers["a"]["tls_version"] in (0x0303, 0x0304)
    assert answers["b"]["current_peer"] == NOT_LISTED  # an empty list allows any name


async def test_tls_connections_keep_the_header_deadline(pki: Pki, tmp_path: Path) -> None:
    """BoundedH11Protocol still bounds a TLS connection that never sends a request."""
    tls = load_server_tls(pki.settings(tmp_path, mtls=False))
    assert tls is not None

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("no request was sent")

    listener = await listen_http(
        app, "127.0.0.1", 0, "idle", header_timeout=0.2, **tls.uvicorn_config()
    )
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.port, ssl=pki.ssl_context()
        )
        async with asyncio.timeout(20):
            closed = await reader.read()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
    finally:
        listener.server.should_exit = True
        await listener.task

    assert closed == b""


# --- settings and files -------------------------------------------------------------------


def test_tls_settings_come_together(pki: Pki, tmp_path: Path, monkeypatch: Any) -> None:
    with pytest.raises(ValidationError, match="go together"):
        settings_for(tmp_path, tls_cert=pki.server_cert)
    with pytest.raises(ValidationError, match="tls_client_ca needs"):
        settings_for(tmp_path, tls_client_ca=pki.ca_file)
    with pytest.raises(ValidationError, match="tls_client_names needs"):
        pki.settings(tmp_path, mtls=False, tls_client_names=[ALLOWED])
    monkeypatch.setenv("MCP_POLICY_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("MCP_POLICY_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("MCP_POLICY_TLS_CLIENT_CA", str(pki.ca_file))
    monkeypatch.setenv("MCP_POLICY_TLS_CLIENT_NAMES", '["a.example", "spiffe://example.org/p"]')
    monkeypatch.setenv("MCP_POLICY_INSECURE", "true")
    from_env = Settings()
    assert from_env.tls_client_ca == pki.ca_file
    assert from_env.tls_client_names == ["a.example", "spiffe://example.org/p"]
    assert from_env.insecure is True


@pytest.mark.parametrize("broken", ["cert", "key", "client_ca"])
@pytest.mark.parametrize("how", ["missing", "garbage", "mismatch"])
def test_tls_files_that_do_not_load_are_named(
    pki: Pki, tmp_path: Path, broken: str, how: str
) -> None:
    files = {"cert": pki.server_cert, "key": pki.server_key, "client_ca": pki.ca_file}
    if how == "missing":
        files[broken] = tmp_path / "absent.pem"
    elif how == "garbage":
        files[broken] = tmp_path / "garbage.pem"
        files[broken].write_text("not a certificate\n")
    else:  # a real certificate or key, but not the one that belongs here
        other_cert, other_key = pki.clients["a"]
        files[broken] = {"cert": other_cert, "key": other_key, "client_ca": other_key}[broken]
    settings = settings_for(
        tmp_path, tls_cert=files["cert"], tls_key=files["key"], tls_client_ca=files["client_ca"]
    )
    with pytest.raises(StartupRefused) as caught:
        load_server_tls(settings)
    assert str(files[broken]) in caught.value.message
    assert "\n" not in caught.value.message


def test_serve_names_a_tls_file_it_cannot_read(pki: Pki, tmp_path: Path) -> None:
    absent = tmp_path / "absent.key"
    result = _serve(
        tmp_path, {"MCP_POLICY_TLS_CERT": str(pki.server_cert), "MCP_POLICY_TLS_KEY": str(absent)}
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert str(absent) in result.stderr
    assert "Traceback" not in result.stderr


# --- exposure -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("service.example", False),
        ("127.0.0.1.example", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_check_exposure(pki: Pki, tmp_path: Path) -> None:
    refusal = check_exposure(settings_for(tmp_path, host="10.1.2.3"))
    assert refusal is not None
    assert "MCP_POLICY_TLS_CERT" in refusal
    assert "--insecure" in refusal
    assert check_exposure(settings_for(tmp_path, host="10.1.2.3", insecure=True)) is None
    assert check_exposure(pki.settings(tmp_path, host="10.1.2.3")) is None
    assert check_exposure(settings_for(tmp_path, host="::1")) is None


def _serve(tmp: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        *CLI,
        "serve",
        "--http-port",
        str(free_loopback_port()),
        "--grpc-port",
        str(free_loopback_port()),
        "--state-dir",
        str(tmp / "state"),
        "--decision-log",
        "off",
        *args,
    ]
    return subprocess.run(
        command, env=clean_env(**env), capture_output=True, text=True, timeout=60, check=False
    )


def test_serve_beyond_loopback_needs_tls_or_insecure(tmp_path: Path) -> None:
    refused = _serve(tmp_path, {}, "--host", "0.0.0.0")

    assert refused.returncode != 0
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert "MCP_POLICY_TLS_CERT" in refused.stderr
    assert "--insecure" in refused.stderr

    serve = Serve(tmp_path, [], {}, "--host", "0.0.0.0", "--insecure")
    try:
        started = "".join(serve.lines)
        health = httpx.get(f"{serve.url}/healthz", timeout=10)
    finally:
        serve.stop()
    assert "WITHOUT TLS (--insecure)" in started
    assert health.status_code == 200
