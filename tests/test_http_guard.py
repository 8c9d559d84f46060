"""The HTTP guard (engine/transports/guard.py) and the protocol's framing rules, as an
attacker's web page and a smuggling front end would meet them, on real listeners: the
decision service (its API and its gateway endpoints) and the proxy's MCP listener, on
127.0.0.1 and on 127.0.0.2.

Every refused request is checked for its status and error, for never being a 5xx, and for
having cost nothing: no decision logged or counted, no rate-limit slot taken (a dry run
afterwards still sees the whole quota), no approval opened, no session opened and nothing
relayed to the upstream MCP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.proxy.core import ProxyOptions
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child
from engine.runtime import Runtime
from engine.state.decision_log import DecisionQuery
from engine.transports.guard import (
    GuardConfig,
    check_request,
    listener_guard,
    parse_host,
    parse_origin,
)
from engine.transports.server import Servers, start_servers
from tests.conftest import (
    APPROVER_TOKEN,
    HEALTHIMAGING,
    add_tools,
    copy_policy,
    session,
    settings_for,
)
from tests.fixtures.imaging_server import INBOUND_ENV
from tests.fixtures.proxy_harness import (
    FIXTURE,
    RECORD_ENV,
    calls,
    http_session,
    proxy_policy,
)
from tests.strategies import FUZZ, hostile_strings

CONSOLE = "https://console.example"  # an origin the configured service allows
POLICY_HOST = "policy.internal"  # a host it answers on any port
ENVOY_HOST = "imaging.gateway.example:8443"  # a host it answers on that port only
EVIL = "https://evil.example"
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
# The tools these tests call, added to a copy of the shipped policy: the fixture MCP
# server's list_datastores, limited per session, and a tool that always needs approval.
PROBE = "list_datastores"
APPROVAL = "guard_approval"
LIMIT = 10
ERRORS = {400: "BadRequest", 403: "OriginNotAllowed", 415: "UnsupportedMediaType"}
MCP_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "guard-test", "version": "1"},
    },
}


# --------------------------------------------------------------------------------------
# The decision service, and what a refused request must not have changed.


def guard_policy(tmp: Path, base: list[Path] | None = None) -> list[Path]:
    rego, data = base if base is not None else copy_policy(tmp)
    add_tools(
        data,
        catalog=[
            {"server": HEALTHIMAGING, "tool": PROBE, "category": "read", "risk": "low"},
            {"server": HEALTHIMAGING, "tool": APPROVAL, "category": "write", "risk": "high"},
        ],
        rules={
            PROBE: {"action": "rate_limit", "rate_limit": {"max": LIMIT, "window": 60}},
            APPROVAL: {"action": "require_approval"},
        },
    )
    return [rego, data]


def probe_call(sid: str | None = None, tool: str = PROBE) -> dict[str, Any]:
    """A decision request for `tool` in session `sid` (a new one by default)."""
    return {
        "server": HEALTHIMAGING,
        "tool": tool,
        "arguments": {},
        "principal": {"agent_id": "agent-1", "session_id": sid or session()},
    }


def probe_message(jsonrpc_id: int = 7) -> dict[str, Any]:
    """The JSON-RPC tools/call of the probe tool, as a gateway or an agent sends it."""
    return {
        "jsonrpc": "2.0",
        "id": jsonrpc_id,
        "method": "tools/call",
        "params": {"name": PROBE, "arguments": {}},
    }


@pytest.fixture(scope="module")
async def configured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """The service on loopback with an allowed origin and allowed hosts configured."""
    tmp = tmp_path_factory.mktemp("guard")
    settings = settings_for(
        tmp,
        policy_paths=guard_policy(tmp),
        allowed_origins=[CONSOLE],
        allowed_hosts=[POLICY_HOST, ENVOY_HOST],
        gateway_servers={ENVOY_HOST.split(":")[0]: HEALTHIMAGING},
    )
    running = await start_servers(settings)
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def http(configured: Servers) -> AsyncIterator[httpx.AsyncClient]:
    # Pooled connections are dropped before the service closes an idle one (5 s): a
    # module-long client never races that close.
    limits = httpx.Limits(keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=configured.http_url, timeout=30, limits=limits) as client:
        yield client


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


@dataclass(frozen=True)
class Footprint:
    """What a request that was decided, counted or logged leaves behind."""

    logged: int
    approvals: int
    decisions: float
    invalid: float


async def footprint(servers: Servers) -> Footprint:
    runtime = servers.runtime
    await runtime.decision_log.flush()
    records, _ = await runtime.decision_log.query(DecisionQuery(limit=1000))
    approvals = await runtime.approvals.list(None, 1000)
    metrics = runtime.metrics.render().decode()
    return Footprint(
        logged=len(records),
        approvals=len(approvals),
        decisions=_metric(metrics, "mcp_policy_decisions_total"),
        invalid=_metric(metrics, "mcp_policy_invalid_requests_total"),
    )


async def assert_untouched(
    servers: Servers, client: httpx.AsyncClient, before: Footprint, sid: str | None
) -> None:
    """Nothing was logged, counted or opened since `before`, and `sid` (unless None) has
    its whole quota."""
    assert await footprint(servers) == before, "a refused request left a trace"
    if sid is None:
        return
    probe = await client.post("/v1/decide", json={**probe_call(sid), "dry_run": True})
    assert probe.status_code == 200, probe.text
    assert probe.json()["rate_limit"]["remaining"] == LIMIT - 1, "a refused request took a slot"


def assert_refused(response: httpx.Response, status: int, field: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["field"] == field
    assert error["code"] == {421: "HostNotAllowed"}.get(status, ERRORS.get(status))
    assert len(response.content) < 4096


def own_origin(servers: Servers) -> str:
    return f"http://127.0.0.1:{servers.http_port}"


# --------------------------------------------------------------------------------------
# Origin.


FOREIGN_ORIGINS = [
    EVIL,
    "null",
    "NULL",
    "http://127.0.0.1:1",  # another loopback port is another origin
    "http://localhost",
    "https://console.example:8443",  # the allowed origin's host on another port
    "http://console.example",  # and with another scheme
    "https://console.example/",  # not a serialised origin
    "https://console.example.evil.example",
    "https://user@console.example",
    "file://",
    "chrome-extension://abcdefghijklmnop",
    "",  # present, and not an origin
    "https://console.example, https://evil.example",
]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
async def test_a_foreign_origin_is_refused_and_takes_nothing(
    configured: Servers, http: httpx.AsyncClient, origin: str
) -> None:
    sid = session()
    before = await footprint(configured)
    answer = await http.post("/v1/decide", json=probe_call(sid), headers={"Origin": origin})
    assert_refused(answer, 403, "Origin")
    assert "Origin rule" in answer.json()["error"]["message"]
    assert "MCP_POLICY_ALLOWED_ORIGINS" in answer.json()["error"]["message"]
    await assert_untouched(configured, http, before, sid)


async def test_a_foreign_origin_opens_no_approval(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    """A cross-site request must not open an approval."""
    sid = session()
    before = await footprint(configured)
    call = probe_call(sid, APPROVAL)
    refused = await http.post("/v1/decide", json=call, headers={"Origin": EVIL})
    assert_refused(refused, 403, "Origin")
    assert await footprint(configured) == before
    opened = await http.post("/v1/decide", json=call)  # control: the same call, same-site
    assert opened.json()["verdict"] == "approval_required", opened.text


async def test_several_origin_headers_are_refused(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    sid = session()
    before = await footprint(configured)
    answer = await http.post(
        "/v1/decide",
        json=probe_call(sid),
        headers=[("Origin", own_origin(configured)), ("Origin", CONSOLE)],
    )
    assert_refused(answer, 403, "Origin")
    await assert_untouched(configured, http, before, sid)


async def test_the_own_origin_and_a_configured_one_pass(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    port = configured.http_port
    for origin, host in (
        (own_origin(configured), None),
        (f"http://localhost:{port}", f"localhost:{port}"),
        (f"http://[::1]:{port}", f"[::1]:{port}"),
        (f"http://{POLICY_HOST}:{port}", f"{POLICY_HOST}:{port}"),
        (CONSOLE, None),
        (CONSOLE.upper(), None),
        (CONSOLE + ":443", None),
    ):
        headers = {"Origin": origin, **({"Host": host} if host else {})}
        answer = await http.post("/v1/decide", json=probe_call(), headers=headers)
        assert answer.status_code == 200, (origin, answer.text)
        assert answer.json()["verdict"] == "allow"


async def test_an_origin_is_refused_on_every_endpoint(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    """Reads too (the operator's token would be the browser's to send), and health."""
    before = await footprint(configured)
    for method, path in (
        ("GET", "/v1/approvals"),
        ("GET", "/v1/decisions"),
        ("GET", "/v1/status"),
        ("POST", "/v1/policy/reload"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/.well-known/authzen-configuration"),
        ("OPTIONS", "/v1/decide"),  # a CORS preflight: never granted
        ("OPTIONS", "/v1/check"),
        ("HEAD", "/healthz"),
    ):
        answer = await http.request(method, path, headers={**AUTH, "Origin": EVIL})
        assert answer.status_code == 403, (method, path, answer.status_code)
        assert "access-control-allow-origin" not in answer.headers
        if method != "HEAD":
            assert answer.json()["error"]["field"] == "Origin"
    assert await footprint(configured) == before


# --------------------------------------------------------------------------------------
# Content type.


NOT_JSON = [
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    None,  # no Content-Type at all
    "application/jsonx",
    "application/json-seq",
    "application/problem+json",
    "text/json",
    "application/json; charset=latin-1",
    "",
    "application/json, text/plain",
]


@pytest.mark.parametrize("content_type", NOT_JSON, ids=[str(c) for c in NOT_JSON])
@pytest.mark.parametrize(
    "path",
    [
        "/v1/decide",
        "/v1/decisions/dec_x/outcome",
        "/v1/approvals/apr_x/approve",
        "/access/v1/evaluation",
        "/access/v1/evaluations",
    ],
)
async def test_a_json_endpoint_refuses_other_content_types_unparsed(
    configured: Servers, http: httpx.AsyncClient, path: str, content_type: str | None
) -> None:
    sid = session()
    before = await footprint(configured)
    body = json.dumps(probe_call(sid)).encode()
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    answer = await http.post(path, content=body, headers=headers)
    assert_refused(answer, 415, "Content-Type")
    assert "application/json" in answer.json()["error"]["message"]
    await assert_untouched(configured, http, before, sid)


async def test_two_content_type_headers_are_refused(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    sid = session()
    before = await footprint(configured)
    answer = await http.post(
        "/v1/decide",
        content=json.dumps(probe_call(sid)).encode(),
        headers=[("Content-Type", "application/json"), ("Content-Type", "text/plain")],
    )
    assert_refused(answer, 415, "Content-Type")
    await assert_untouched(configured, http, before, sid)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        'application/json;charset="UTF-8"',
        "application/json ; charset=utf8",
    ],
)
async def test_json_with_its_parameters_passes(http: httpx.AsyncClient, content_type: str) -> None:
    answer = await http.post(
        "/v1/decide",
        content=json.dumps(probe_call()).encode(),
        headers={"Content-Type": content_type},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["verdict"] == "allow"


async def test_reload_takes_no_body_and_needs_no_content_type(http: httpx.AsyncClient) -> None:
    answer = await http.post("/v1/policy/reload", headers=AUTH)
    assert answer.status_code == 200, answer.text


# --------------------------------------------------------------------------------------
# Host (DNS rebinding).


REBOUND_HOSTS = [
    "attacker.example",
    "attacker.example:{port}",
    "0.0.0.0:{port}",  # reaches local listeners on Linux
    "127.0.0.1.attacker.example:{port}",
    "localhost.:{port}",
    "sub.localhost:{port}",
    "127.1:{port}",
    "2130706433:{port}",
    "[::ffff:127.0.0.1]:{port}",
    "imaging.gateway.example",  # configured with :8443 only
    "imaging.gateway.example:443",
    "policy.internal.attacker.example",
]


@pytest.mark.parametrize("host", REBOUND_HOSTS)
async def test_a_rebinding_host_is_421_and_takes_nothing(
    configured: Servers, http: httpx.AsyncClient, host: str
) -> None:
    sid = session()
    before = await footprint(configured)
    value = host.format(port=configured.http_port)
    # The page is same-origin with the name it rebound: it may send anything.
    answer = await http.post(
        "/v1/decide",
        json=probe_call(sid, APPROVAL),
        headers={"Host": value, "Origin": f"http://{value}"},
    )
    assert_refused(answer, 421, "Host")
    assert "MCP_POLICY_ALLOWED_HOSTS" in answer.json()["error"]["message"]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/approvals"):
        probe = await http.get(path, headers={"Host": value, **AUTH})
        assert_refused(probe, 421, "Host")
    await assert_untouched(configured, http, before, sid)


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:{port}",
        "127.0.0.1",
        "127.0.0.2:1",
        "127.255.255.254:{port}",
        "[::1]",
        "[::1]:{port}",
        "[0:0:0:0:0:0:0:1]:{port}",
        "policy.internal",
        "POLICY.internal:9999",
        "imaging.gateway.example:8443",
    ],
)
async def test_loopback_names_and_configured_hosts_pass(
    configured: Servers, http: httpx.AsyncClient, host: str
) -> None:
    answer = await http.get("/healthz", headers={"Host": host.format(port=configured.http_port)})
    assert answer.status_code == 200, answer.text


async def test_a_host_is_checked_without_anything_configured(servers: Servers) -> None:
    """The default service (conftest's): loopback names only."""
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as client:
        refused = await client.get("/healthz", headers={"Host": POLICY_HOST})
        allowed = await client.get("/healthz", headers={"Host": "localhost"})
    assert_refused(refused, 421, "Host")
    assert allowed.status_code == 200


# --------------------------------------------------------------------------------------
# Raw HTTP: missing and repeated Host, framing (request smuggling).


@contextlib.asynccontextmanager
async def raw_connection(
    host: str, port: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(host: str, port: int, data: bytes, within: float = 20.0) -> bytes:
    """Send `data` in one write; everything the server sends until it closes."""
    received = b""
    async with raw_connection(host, port) as (reader, writer):
        writer.write(data)
        await writer.drain()
        try:
            async with asyncio.timeout(within):
                while chunk := await reader.read(65536):
                    received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open: {received!r}") from None
    return received


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def answers(data: bytes) -> list[Answer]:
    """Every complete response in `data`, in order (the connection ended after them)."""
    found: list[Answer] = []
    while data:
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        client.receive_data(data)
        client.receive_data(b"")
        answer = Answer(0, {}, b"")
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                answer = Answer(event.status_code, dict(event.headers), b"")
            elif isinstance(event, h11.Data):
                answer.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"an incomplete response: {data!r}")
        found.append(answer)
        data = client.trailing_data[0]
    return found


def head(method: str, target: str, *lines: str, version: str = "1.1") -> bytes:
    return ("\r\n".join([f"{method} {target} HTTP/{version}", *lines]) + "\r\n\r\n").encode()


def chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def assert_one_refusal(received: bytes) -> Answer:
    """Exactly one answer, a 400 that closes the connection (then EOF)."""
    found = answers(received)
    assert [a.status for a in found] == [400], received
    assert found[0].headers.get(b"connection") == b"close"
    return found[0]


async def test_a_missing_or_repeated_host_is_400(configured: Servers) -> None:
    port = configured.http_port
    no_host = await exchange("127.0.0.1", port, head("GET", "/healthz"))
    assert [a.status for a in answers(no_host)] == [400]
    old_no_host = await exchange("127.0.0.1", port, head("GET", "/healthz", version="1.0"))
    (answer,) = answers(old_no_host)
    assert answer.status == 400
    assert json.loads(answer.body)["error"]["field"] == "Host"
    twice = head(
        "GET", "/healthz", "Host: 127.0.0.1", "Host: attacker.example", "Connection: close"
    )
    (answer,) = answers(await exchange("127.0.0.1", port, twice))
    assert answer.status == 400
    assert "multiple Host" in json.loads(answer.body)["error"]["message"]  # (h11's words)
    bad = head("GET", "/healthz", "Host: exa mple", "Connection: close")
    (answer,) = answers(await exchange("127.0.0.1", port, bad))
    assert answer.status == 400


def decide_framed(sid: str, framing: list[str], body: bytes | None = None) -> bytes:
    payload = body if body is not None else json.dumps(probe_call(sid)).encode()
    lines = ["Host: 127.0.0.1", "Content-Type: application/json", *framing]
    wire = chunked(payload) if any("chunked" in f.lower() for f in framing) else payload
    return head("POST", "/v1/decide", *lines) + wire


NEXT = head("GET", "/healthz", "Host: 127.0.0.1", "Connection: close")
FRAMINGS = {
    "cl-and-te": lambda n: [f"Content-Length: {n}", "Transfer-Encoding: chunked"],
    "te-and-short-cl": lambda n: ["Transfer-Encoding: chunked", "Content-Length: 4"],
    "cl-and-te-mixed-case": lambda n: [f"content-length: {n}", "TRANSFER-ENCODING: Chunked"],
    "te-not-only-chunked": lambda n: ["Transfer-Encoding: chunked, identity"],
    "te-gzip-chunked": lambda n: ["Transfer-Encoding: gzip, chunked"],
    "two-te": lambda n: ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
    "differing-cl": lambda n: [f"Content-Length: {n}", f"Content-Length: {n + 1}"],
    "cl-list": lambda n: [f"Content-Length: {n}, {n + 1}"],
}


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_an_ambiguous_framing_is_refused_and_the_rest_unread(
    configured: Servers, http: httpx.AsyncClient, framing: str
) -> None:
    """RFC 9112 section 6.3: one 400 with Connection: close, then EOF; the request behind
    it in the same write is never answered, and the decide in the body never made."""
    sid = session()
    before = await footprint(configured)
    body = json.dumps(probe_call(sid)).encode()
    request = decide_framed(sid, FRAMINGS[framing](len(chunked(body))), body)
    received = await exchange("127.0.0.1", configured.http_port, request + NEXT)
    answer = assert_one_refusal(received)
    assert json.loads(answer.body)["error"]["code"] == "BadRequest"
    await assert_untouched(configured, http, before, sid)


async def test_transfer_encoding_on_http_1_0_is_refused(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    sid = session()
    before = await footprint(configured)
    body = json.dumps(probe_call(sid)).encode()
    request = head(
        "POST",
        "/v1/decide",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
        version="1.0",
    )
    received = await exchange("127.0.0.1", configured.http_port, request + chunked(body) + NEXT)
    answer = assert_one_refusal(received)
    assert "HTTP/1.0" in json.loads(answer.body)["error"]["message"]
    await assert_untouched(configured, http, before, sid)


async def test_sound_framings_are_answered_in_turn(configured: Servers) -> None:
    """The control: chunked alone, Content-Length alone and a repeated equal
    Content-Length are each decided, and the request behind them answered too."""
    for framing in (
        ["Transfer-Encoding: chunked"],
        ["Content-Length: {n}"],
        ["Content-Length: {n}", "Content-Length: {n}"],
    ):
        body = json.dumps(probe_call()).encode()
        n = len(chunked(body)) if "chunked" in framing[0] else len(body)
        request = decide_framed("", [line.format(n=n) for line in framing], body)
        received = await exchange("127.0.0.1", configured.http_port, request + NEXT)
        found = answers(received)
        assert [a.status for a in found] == [200, 200], (framing, received[:2000])
        assert json.loads(found[0].body)["verdict"] == "allow"


# --------------------------------------------------------------------------------------
# Gateways through the guard: Traefik forwardAuth, Envoy's HTTP ext_authz, AuthZEN.


def traefik(sid: str, **extra: str) -> dict[str, str]:
    """What Traefik's forwardAuth sends: Host is the address it dials (httpx sets ours),
    X-Forwarded-* describe the original request, and every original header is copied,
    its Origin and Content-Type included."""
    return {
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": HEALTHIMAGING,
        "X-Forwarded-Uri": "/mcp",
        "X-Forwarded-For": "203.0.113.7",
        "Mcp-Session-Id": sid,
        "Content-Type": "application/json",
        **extra,
    }


async def test_traefik_forward_auth_passes_with_the_original_origin(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    sid = session()
    body = json.dumps(probe_message()).encode()
    for headers in (
        traefik(sid),
        traefik(sid, Origin="https://agent-ui.example"),  # the original request's
        {k: v for k, v in traefik(sid).items() if k != "Content-Type"},
        traefik(sid, **{"Content-Type": "text/plain"}),  # whatever the original said
    ):
        answer = await http.post("/v1/check", content=body, headers=headers)
        assert answer.status_code == 200, (headers, answer.text)
        assert answer.headers["X-MCP-Policy-Decision-Id"].startswith("dec_")


async def test_forward_auth_from_a_browser_is_refused_and_takes_nothing(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    """A simple cross-site POST (text/plain, no X-Forwarded-Host: a page cannot add it
    without a preflight) to the check endpoint would be decided: refused by Origin."""
    sid = session()
    before = await footprint(configured)
    body = json.dumps(probe_message()).encode()
    for path in ("/v1/check", "/v1/check/mcp"):
        answer = await http.post(
            path,
            content=body,
            headers={"Content-Type": "text/plain", "Origin": EVIL, "Mcp-Session-Id": sid},
        )
        assert_refused(answer, 403, "Origin")
    # X-Forwarded-Host exempts the check endpoint only.
    answer = await http.post(
        "/v1/decide",
        json=probe_call(sid),
        headers={"Origin": EVIL, "X-Forwarded-Host": HEALTHIMAGING},
    )
    assert_refused(answer, 403, "Origin")
    await assert_untouched(configured, http, before, sid)


async def test_envoy_http_ext_authz_passes_with_a_configured_original_host(
    configured: Servers, http: httpx.AsyncClient
) -> None:
    """Envoy's HTTP ext_authz keeps the original :authority as Host and appends the
    original path: that host must be one the service answers (MCP_POLICY_ALLOWED_HOSTS)."""
    sid = session()
    body = json.dumps(probe_message()).encode()
    headers = {"Host": ENVOY_HOST, "Mcp-Session-Id": sid, "Content-Type": "application/json"}
    allowed = await http.post("/v1/check/mcp", content=body, headers=headers)
    assert allowed.status_code == 200, allowed.text
    listing = await http.request("GET", "/v1/check/mcp", headers=headers)  # no body: not MCP
    assert listing.status_code == 403
    assert listing.json()["error"]["code"] == "NotMcp"


async def test_envoy_http_ext_authz_from_an_unknown_host_is_421(servers: Servers) -> None:
    """The same request to a service that does not know the host: refused at the door."""
    sid = session()
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as client:
        before = await footprint(servers)
        answer = await client.post(
            "/v1/check/mcp",
            content=json.dumps(probe_message()).encode(),
            headers={"Host": ENVOY_HOST, "Mcp-Session-Id": sid, "Content-Type": "text/plain"},
        )
        assert_refused(answer, 421, "Host")
        await assert_untouched(servers, client, before, None)


async def test_authzen_takes_json_from_the_gateway(http: httpx.AsyncClient) -> None:
    evaluation = {
        "subject": {"type": "agent", "id": "agent-1", "properties": {"session_id": session()}},
        "action": {"name": "tools/call"},
        "resource": {"type": "mcp_tool", "id": f"{HEALTHIMAGING}/{PROBE}"},
        "context": {"arguments": {}},
    }
    answer = await http.post("/access/v1/evaluation", json=evaluation)
    assert answer.status_code == 200, answer.text
    assert answer.json()["decision"] is True
    metadata = await http.get("/.well-known/authzen-configuration")
    assert metadata.status_code == 200


# --------------------------------------------------------------------------------------
# The proxy's MCP listener.


@pytest.fixture(scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    tmp = tmp_path_factory.mktemp("guard-proxy")
    policy = guard_policy(tmp, proxy_policy(tmp))
    running = Runtime(settings_for(tmp, decision_log="off", policy_paths=policy))
    await running.start()
    yield running
    await running.stop()


@dataclass
class Rig:
    proxy: HttpProxy
    record: Path
    inbound: Path

    @property
    def origin(self) -> str:
        return self.proxy.url.removesuffix(self.proxy.app.path)

    def relayed(self) -> list[str]:
        if not self.inbound.exists():
            return []
        return [json.loads(line)["method"] for line in self.inbound.read_text().splitlines()]


@contextlib.asynccontextmanager
async def proxy_rig(
    runtime: Runtime, tmp: Path, host: str = "127.0.0.1", **guard: Any
) -> AsyncIterator[Rig]:
    record, inbound = tmp / "calls.jsonl", tmp / "inbound.jsonl"
    env = {**os.environ, RECORD_ENV: str(record), INBOUND_ENV: str(inbound)}
    running = await start_http_proxy(
        host,
        0,
        decider=EmbeddedDecider(runtime),
        options=ProxyOptions(),
        open_upstream=lambda: open_child(FIXTURE, env),
        **guard,
    )
    try:
        yield Rig(running, record, inbound)
    finally:
        await running.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
async def test_proxy_refuses_a_foreign_origin_whatever_the_loopback_address(
    runtime: Runtime, tmp_path: Path, host: str
) -> None:
    async with proxy_rig(runtime, tmp_path, host) as rig, httpx.AsyncClient(timeout=30) as raw:
        refused = {}
        for origin in (EVIL, "null", f"http://{host}:1", f"https://{host}:{rig.proxy.port}"):
            refused[origin] = await raw.post(
                rig.proxy.url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": origin}
            )
        modern = await raw.post(
            rig.proxy.url,
            json=probe_message(),
            headers={**MCP_HEADERS, "Origin": EVIL, "mcp-protocol-version": "2026-07-28"},
        )
        sessions = dict(rig.proxy.app.sessions)
        own = await raw.post(
            rig.proxy.url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": rig.origin}
        )
    for origin, answer in refused.items():
        assert_refused(answer, 403, "Origin")
        assert "--allowed-origin" in answer.json()["error"]["message"], origin
    assert_refused(modern, 403, "Origin")
    assert sessions == {}, "a refused initialize opened a session"
    assert own.status_code == 200, own.text
    assert rig.relayed() == ["initialize"], "only the own origin's initialize reached the server"


async def test_proxy_refuses_a_foreign_origin_in_an_open_session(
    runtime: Runtime, tmp_path: Path
) -> None:
    async with (
        proxy_rig(runtime, tmp_path) as rig,
        http_session(rig.proxy.url) as mcp,
        httpx.AsyncClient(timeout=30) as raw,
    ):
        (session_id,) = rig.proxy.app.sessions
        call = probe_message(99)
        refused = await raw.post(
            rig.proxy.url,
            json=call,
            headers={**MCP_HEADERS, "Origin": EVIL, "mcp-session-id": session_id},
        )
        as_text = await raw.post(
            rig.proxy.url,
            content=json.dumps(call).encode(),
            headers={**MCP_HEADERS, "content-type": "text/plain", "mcp-session-id": session_id},
        )
        allowed = await mcp.call_tool(PROBE, {})
    assert_refused(refused, 403, "Origin")
    assert_refused(as_text, 415, "Content-Type")
    assert allowed.is_error is False
    assert calls(rig.record) == [{"tool": PROBE, "arguments": {}}]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
async def test_proxy_refuses_a_rebinding_host_and_form_bodies(
    runtime: Runtime, tmp_path: Path, host: str
) -> None:
    async with proxy_rig(runtime, tmp_path, host) as rig, httpx.AsyncClient(timeout=30) as raw:
        port = rig.proxy.port
        rebound = await raw.post(
            rig.proxy.url,
            json=INITIALIZE,
            headers={
                **MCP_HEADERS,
                "Host": f"attacker.example:{port}",
                "Origin": f"http://attacker.example:{port}",
            },
        )
        forms = [
            await raw.post(
                rig.proxy.url,
                content=json.dumps(INITIALIZE).encode(),
                headers={**MCP_HEADERS, "content-type": content_type},
            )
            for content_type in ("text/plain", "application/x-www-form-urlencoded", "")
        ]
        sessions = dict(rig.proxy.app.sessions)
    assert_refused(rebound, 421, "Host")
    assert "--allowed-host" in rebound.json()["error"]["message"]
    for answer in forms:
        assert_refused(answer, 415, "Content-Type")
    assert sessions == {}
    assert rig.relayed() == []


async def test_proxy_allows_configured_origins_and_hosts(runtime: Runtime, tmp_path: Path) -> None:
    app_origin = "https://agent-ui.example"
    async with (
        proxy_rig(
            runtime,
            tmp_path,
            "127.0.0.2",
            allowed_origins=[app_origin],
            allowed_hosts=["mcp.internal"],
        ) as rig,
        httpx.AsyncClient(timeout=30) as raw,
    ):
        by_origin = await raw.post(
            rig.proxy.url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": app_origin}
        )
        by_host = await raw.post(
            rig.proxy.url,
            json=INITIALIZE,
            headers={
                **MCP_HEADERS,
                "Host": f"mcp.internal:{rig.proxy.port}",
                "Origin": f"http://mcp.internal:{rig.proxy.port}",
            },
        )
    assert by_origin.status_code == 200, by_origin.text
    assert by_host.status_code == 200, by_host.text


async def test_proxy_refuses_an_ambiguous_framing_and_the_rest_unread(
    runtime: Runtime, tmp_path: Path
) -> None:
    async with proxy_rig(runtime, tmp_path) as rig:
        body = json.dumps(INITIALIZE).encode()
        lines = [
            f"Host: 127.0.0.1:{rig.proxy.port}",
            "Content-Type: application/json",
            "Accept: application/json, text/event-stream",
        ]
        smuggled = head(
            "POST",
            "/mcp",
            *lines,
            f"Content-Length: {len(chunked(body))}",
            "Transfer-Encoding: chunked",
        ) + chunked(body)
        behind = head("POST", "/mcp", *lines, f"Content-Length: {len(body)}", "Connection: close")
        received = await exchange("127.0.0.1", rig.proxy.port, smuggled + behind + body)
        sessions = dict(rig.proxy.app.sessions)
    assert_one_refusal(received)
    assert sessions == {}
    assert rig.relayed() == []


# --------------------------------------------------------------------------------------
# Configuration.


def test_settings_and_flags_refuse_what_is_not_an_origin_or_a_host(tmp_path: Path) -> None:
    for origin in ("null", "console.example", "https://console.example/path", "https://", "*"):
        with pytest.raises(ValueError, match="is not an origin"):
            parse_origin(origin)
        with pytest.raises(ValueError, match="not an origin"):
            settings_for(tmp_path, allowed_origins=[origin])
    for host in ("", "a b", "https://policy.internal", "policy.internal:0", "[::1", "*"):
        with pytest.raises(ValueError, match="is not a host"):
            parse_host(host)
        with pytest.raises(ValueError, match="not a host"):
            settings_for(tmp_path, allowed_hosts=[host])
    assert parse_origin("HTTPS://Console.Example/") == parse_origin("https://console.example:443")


def test_the_host_rule_applies_on_loopback_or_without_authentication() -> None:
    for listen, authenticated, applies in (
        ("127.0.0.1", True, True),
        ("127.0.0.2", False, True),
        ("::1", True, True),
        ("localhost", True, True),
        ("0.0.0.0", False, True),
        ("10.0.0.5", False, True),
        ("0.0.0.0", True, False),
        ("10.0.0.5", True, False),
    ):
        assert listener_guard(listen, authenticated=authenticated).check_host is applies


def test_an_authenticated_exposed_listener_still_checks_origin() -> None:
    guard = listener_guard("0.0.0.0", authenticated=True)
    host = (b"host", b"policy.example:8080")
    own = scope_of([host, (b"origin", b"http://policy.example:8080")], "GET", "/healthz")
    assert check_request(guard, own) is None
    foreign = scope_of([host, (b"origin", EVIL.encode())], "GET", "/healthz")
    refusal = check_request(guard, foreign)
    assert refusal is not None and refusal.status == 403


# --------------------------------------------------------------------------------------
# Fuzz: header values.


HEADER_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])  # what HTTP/1.1 allows
NOT_IN_HEADERS = bytes(b for b in range(256) if b not in HEADER_BYTES)
LOCAL = ("127.0.0.1", 8080)
GOOD_HOSTS = ["localhost", "127.0.0.1:8080", "[::1]:8080", "policy.internal:1", "127.9.9.9"]
BAD_HOSTS = ["attacker.example", "0.0.0.0:8080", "localhost.", "policy.internal.", "[::2]"]
GOOD_ORIGINS = [CONSOLE, "https://console.example:443"]
BAD_ORIGINS = [EVIL, "null", "http://localhost", "https://console.example/", "http://127.0.0.1"]
_AUTHORITY = re.compile(r"(?P<name>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[0-9]{1,5}))?")


def header_value(text: str | bytes) -> bytes:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return data.translate(None, NOT_IN_HEADERS).strip(b" \t")


def values(good: list[str], bad: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(good).map(str.encode),
        st.sampled_from(bad).map(str.encode),
        hostile_strings(max_long=300).map(header_value),
        st.binary(max_size=80).map(header_value),
    )


def _name(text: str) -> str | None:
    """A host name as this test reads it: IP literals normalised, names lower case."""
    bracketed = text.startswith("[") and text.endswith("]")
    try:
        address = ipaddress.ip_address(text[1:-1] if bracketed else text)
    except ValueError:
        return None if bracketed or not text else text.lower()
    return str(address) if bracketed == (address.version == 6) else None


def oracle_authority(text: str) -> tuple[str, int] | None:
    match = _AUTHORITY.fullmatch(text)
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else 80
    name = _name(match["name"])
    return None if name is None or not 0 < port <= 65535 else (name, port)


def oracle_host(value: bytes) -> tuple[str, int] | None:
    """The (name, port) a Host value may stand for when it is a loopback name, this
    test's local address or policy.internal; None for anything else (an independent
    reading of the rule)."""
    authority = oracle_authority(value.decode("latin-1"))
    if authority is None:
        return None
    name = authority[0]
    if name in ("localhost", "policy.internal"):
        return authority
    try:
        return authority if ipaddress.ip_address(name).is_loopback else None
    except ValueError:
        return None


def oracle_origin_allowed(origin: bytes, host: tuple[str, int] | None) -> bool:
    scheme, sep, rest = origin.decode("latin-1").lower().partition("://")
    authority = oracle_authority(rest) if sep and "/" not in rest and "@" not in rest else None
    if authority is None:
        return False
    if scheme == "https" and authority == ("console.example", 443 if ":" in rest else 80):
        return True
    return scheme == "http" and authority == host


def scope_of(
    headers: list[tuple[bytes, bytes]], method: str = "POST", path: str = "/v1/decide"
) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "server": LOCAL,
        "headers": headers,
    }


FUZZ_GUARD: GuardConfig = listener_guard(
    "127.0.0.1",
    authenticated=False,
    allowed_origins=[CONSOLE],
    allowed_hosts=[POLICY_HOST],
    raw_body_paths=("/v1/check",),
    forwarded_paths=("/v1/check",),
)


@FUZZ
@given(
    host=st.one_of(st.none(), values(GOOD_HOSTS, BAD_HOSTS)),
    origin=st.one_of(st.none(), values(GOOD_ORIGINS, BAD_ORIGINS)),
    content_type=st.one_of(
        st.none(), values(["application/json", "application/json; charset=utf-8"], ["text/plain"])
    ),
    target=st.sampled_from([("POST", "/v1/decide"), ("GET", "/healthz"), ("POST", "/v1/check")]),
    forwarded=st.booleans(),
)
def test_fuzzed_headers_are_judged_by_the_rules(
    host: bytes | None,
    origin: bytes | None,
    content_type: bytes | None,
    target: tuple[str, str],
    forwarded: bool,
) -> None:
    """Any header values: never an exception; a request passes only when its Host is one
    the listener answers, its Origin (unless a gateway's check carries it) its own or an
    allowed one, and a POST's body (unless forward-auth) declared JSON."""
    method, path = target
    headers = [
        (name, value)
        for name, value in (
            (b"host", host),
            (b"origin", origin),
            (b"content-type", content_type),
            (b"x-forwarded-host", b"imaging.example" if forwarded else None),
        )
        if value is not None
    ]
    refusal = check_request(FUZZ_GUARD, scope_of(headers, method, path))
    if refusal is not None:
        assert refusal.status in (400, 403, 415, 421)
        assert len(refusal.body()) < 4096
        assert json.loads(refusal.body())["error"]["field"] == refusal.field
        return
    authority = oracle_host(host or b"")
    assert authority is not None, host
    if origin is not None and not (forwarded and path == "/v1/check"):
        assert oracle_origin_allowed(origin, authority), (origin, host)
    if method == "POST" and path != "/v1/check":
        assert content_type is not None
        assert content_type.lower().split(b";")[0].strip() == b"application/json"


@pytest.fixture
def sync_http(configured: Servers) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=configured.http_url, timeout=30) as client:
        yield client


async def test_fuzzed_hosts_and_origins_through_the_service(
    configured: Servers, http: httpx.AsyncClient, sync_http: httpx.Client
) -> None:
    """The same header values against the running service (modestly: these are real
    decisions): never a 5xx, a decision only for what the rules let in, and exactly one
    log record per decision."""
    before = await footprint(configured)
    port = configured.http_port
    decided: list[int] = []

    @FUZZ
    @given(
        host=values([*GOOD_HOSTS, f"127.0.0.1:{port}"], BAD_HOSTS),
        origin=st.one_of(
            st.none(), values([*GOOD_ORIGINS, f"http://127.0.0.1:{port}"], BAD_ORIGINS)
        ),
    )
    def examples(host: bytes, origin: bytes | None) -> None:
        headers: dict[str, bytes] = {"Host": host}
        if origin is not None:
            headers["Origin"] = origin
        try:
            answer = sync_http.post("/v1/decide", json=probe_call(), headers=headers)
        except httpx.LocalProtocolError:
            return  # a value the client itself will not send
        assert answer.status_code < 500, answer.text
        assert answer.status_code in (200, 400, 403, 421), answer.text
        authority = oracle_host(host)
        if answer.status_code == 200:
            assert authority is not None, host
            assert origin is None or oracle_origin_allowed(origin, authority), (origin, host)
            decided.append(1)
        elif authority is not None and origin is None:
            raise AssertionError(f"a good Host without an Origin was refused: {answer.text}")

    await asyncio.to_thread(examples)
    after = await footprint(configured)
    assert after.logged - before.logged == len(decided)
    assert after.decisions - before.decisions == len(decided)
    assert after.invalid == before.invalid
