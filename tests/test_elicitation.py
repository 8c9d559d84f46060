"""The agent's MCP client asks its own user: URL-mode elicitation through the proxy, and
the AwaitApproval wait it rests on.

Real parts only: one decision service for the module (`mcp-policy serve` in-process: OPA,
the shipped policy, the HTTP approval API, gRPC), the fixture MCP server as the upstream,
and real MCP clients with an elicitation handler: the Python SDK (`mcp` 2.3.0) at protocol
2025-11-25 (the initialize handshake, `elicitation/create` in URL mode while the call is
held) and at 2026-07-28 (an input-required result, the retry with `inputResponses` and the
signed `requestState`), and the TypeScript SDK (1.32.2, tests/interop/elicit.mjs) at
2025-11-25. Through both proxy transports: stdio (`mcp-policy proxy --decision-url`, the
gRPC decider) and `--listen` (in-process, with the embedded decider around the service's
own runtime, or the gRPC decider).

In each, the handler receives the approval's console URL (public_url + /console/approvals/
<id>), the test approves or denies it through `POST /v1/approvals/{id}/approve|deny` with
the approver token (the console's own form does the same), and the call completes and
reaches the server exactly once, or the agent reads the approver's comment. A client that
declines gets the approval_required refusal at once. A forged, altered, expired, replayed
or foreign requestState is refused: nothing forwarded, nothing used. AwaitApproval itself
is attacked over HTTP and gRPC (unknown ids, hostile timeouts, bad types, a caller that is
not a decision client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import mcp_types
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.client.session import ClientRequestContext, IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from buf.validate import validate_pb2
from engine import models
from engine.identity import add_entry
from engine.models import ApprovalStatus, Principal
from engine.proxy.auth import AuthConfig, ResourceServer
from engine.proxy.core import ProxyOptions
from engine.proxy.elicitation import (
    INPUT_KEY,
    CallBinding,
    ElicitationOptions,
    RequestStates,
    StateRefused,
    handshake_url_mode,
    message_for,
    retry_of,
    stateless_url_mode,
    url_mode,
)
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.grpc_decider import GrpcDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child
from engine.settings import PROJECT_ROOT
from engine.transports import wire
from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc
from tests.conftest import (
    APPROVER_TOKEN,
    HEALTHIMAGING,
    INTO_EXISTING,
    approval_call,
    copy_policy,
    session,
    settings_for,
    shared_policy,
)
from tests.fixtures.proxy_harness import (
    FIXTURE,
    PROXY,
    RECORD_ENV,
    RawProxy,
    calls,
    clean_env,
    copy_args,
)

PUBLIC = "https://policy.example.test/approvals-base"
COPY = "copy_image_set"
DECISION_KEY = "mcp-policy/decision"
INBOUND_ENV = "IMAGING_FIXTURE_INBOUND"
SECRET_ENV = "MCP_POLICY_ELICITATION_SECRET"
INTEROP_DIR = PROJECT_ROOT / "tests" / "interop"
ELICIT_MJS = INTEROP_DIR / "elicit.mjs"
TS_SDK_PACKAGE = INTEROP_DIR / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json"
WAIT = 30.0  # how long a test waits for what must come (never a timing assertion)
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}


# The service.


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """The decision service of the module: the shipped policy (a copy into an existing image
    set needs approval), its console links under PUBLIC."""
    tmp = tmp_path_factory.mktemp("elicitation")
    running = await start_servers(
        settings_for(tmp, policy_paths=shared_policy(tmp), public_url=PUBLIC)
    )
    yield running
    await running.stop()


def page_of(approval_id: str) -> str:
    return f"{PUBLIC}/console/approvals/{approval_id}"


def approval_in(url: str) -> str:
    """The approval id of a console page's URL (which must be exactly that page)."""
    approval_id = url.rsplit("/", 1)[-1]
    assert approval_id.startswith("apr_"), url
    assert url == page_of(approval_id), url
    return approval_id


async def act(servers: Servers, approval_id: str, verb: str, comment: str = "") -> dict[str, Any]:
    """Approve or deny through the HTTP approval API, as an approver (the console's form
    does the same)."""
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=WAIT) as raw:
        answer = await raw.post(
            f"/v1/approvals/{approval_id}/{verb}", headers=AUTH, json={"comment": comment}
        )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def status_of(servers: Servers, approval_id: str) -> ApprovalStatus:
    return (await servers.runtime.service.get_approval(approval_id)).status


def needs_approval() -> dict[str, Any]:
    """copy_image_set arguments the shipped policy asks a human for (a copy into an
    existing image set), with an image set of their own."""
    return copy_args(copy_image_set_information=INTO_EXISTING)


def texts(result: mcp_types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def decision_in(result: mcp_types.CallToolResult) -> dict[str, Any]:
    assert result.structured_content is None
    decision: dict[str, Any] = (result.meta or {})[DECISION_KEY]
    return decision


def forwarded(record: Path) -> list[Any]:
    return [call["arguments"] for call in calls(record)]


# The user behind a Python client.


@dataclass
class User:
    """Answers every elicitation with `action`, noting what it was asked and the
    completions the server announced."""

    action: str = "accept"
    asked: list[mcp_types.ElicitRequestURLParams] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def elicit(
        self, context: ClientRequestContext, params: mcp_types.ElicitRequestParams
    ) -> mcp_types.ElicitResult:
        assert isinstance(params, mcp_types.ElicitRequestURLParams), params
        self.asked.append(params)
        self.arrived.set()
        return mcp_types.ElicitResult(action=self.action)  # type: ignore[arg-type]

    async def messages(self, message: IncomingMessage) -> None:
        if isinstance(message, mcp_types.ElicitCompleteNotification):
            self.completed.append(message.params.elicitation_id)
            self.done.set()

    async def approval(self) -> str:
        """The approval the user was sent to (waits for the elicitation)."""
        await asyncio.wait_for(self.arrived.wait(), WAIT)
        return approval_in(self.asked[-1].url)


# The proxies.


@dataclass(frozen=True)
class Way:
    """How the client reaches the proxy: stdio (a `mcp-policy proxy` process with the gRPC
    decider) or --listen in this process (the embedded decider, or the gRPC one)."""

    transport: str  # stdio | http
    decider: str  # grpc | embedded

    def __str__(self) -> str:
        return f"{self.transport}-{self.decider}"


STDIO = Way("stdio", "grpc")
HTTP = Way("http", "embedded")
HTTP_GRPC = Way("http", "grpc")


def cli_flags(options: dict[str, Any]) -> list[str]:
    """ProxyOptions keywords as the command line says them."""
    flags: list[str] = []
    for name, value in options.items():
        if name == "elicitation":
            if not value.enabled:
                flags.append("--no-elicitation")
            else:
                flags += ["--elicitation-wait", str(value.wait)]
        else:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


@dataclass
class Proxied:
    """A proxy before a fixture child: where the client goes, and what reached the server."""

    record: Path
    inbound: Path
    stdio: StdioServerParameters | None = None
    url: str | None = None


@contextlib.asynccontextmanager
async def proxy(
    way: Way, servers: Servers, tmp: Path, *, secret: str | None = None, **options: Any
) -> AsyncIterator[Proxied]:
    record, inbound = tmp / f"calls-{uuid.uuid4().hex}.jsonl", tmp / "inbound.jsonl"
    env = clean_env(**{RECORD_ENV: str(record), INBOUND_ENV: str(inbound)})
    if way.transport == "stdio":
        if secret is not None:
            env[SECRET_ENV] = secret
        args = [
            *PROXY[1:],
            "proxy",
            "--decision-url",
            servers.grpc_target,
            "--server-name",
            HEALTHIMAGING,
            *cli_flags(options),
            "--",
            *FIXTURE,
        ]
        params = StdioServerParameters(command=PROXY[0], args=args, env=env, cwd=str(PROJECT_ROOT))
        yield Proxied(record, inbound, stdio=params)
        return
    if secret is not None:
        options["elicitation"] = ElicitationOptions(states=RequestStates(secret.encode()))
    async with http_listener(servers, env, way.decider, ProxyOptions(**options)) as running:
        yield Proxied(record, inbound, url=running.url)


@contextlib.asynccontextmanager
async def http_listener(
    servers: Servers,
    env: dict[str, str],
    decider_kind: str,
    options: ProxyOptions,
    auth: ResourceServer | None = None,
) -> AsyncIterator[HttpProxy]:
    decider: EmbeddedDecider | GrpcDecider
    if decider_kind == "embedded":
        decider = EmbeddedDecider(servers.runtime)
    else:
        decider = GrpcDecider(servers.grpc_target)
    running = await start_http_proxy(
        "127.0.0.1",
        0,
        decider=decider,
        options=options,
        open_upstream=lambda: open_child(FIXTURE, env),
        auth=auth,
    )
    try:
        yield running
    finally:
        await running.stop()
        await decider.close()


@contextlib.asynccontextmanager
async def handshake_client(
    proxied: Proxied, user: User | None, log: Path
) -> AsyncIterator[ClientSession]:
    """A Python SDK ClientSession at 2025-11-25 (initialize), with `user` as its
    elicitation handler (None: a client without elicitation)."""
    callbacks: dict[str, Any] = {}
    if user is not None:
        callbacks = {"elicitation_callback": user.elicit, "message_handler": user.messages}
    async with contextlib.AsyncExitStack() as stack:
        if proxied.stdio is not None:
            errlog = stack.enter_context(log.open("a"))
            read, write = await stack.enter_async_context(
                stdio_client(proxied.stdio, errlog=errlog)
            )
        else:
            assert proxied.url is not None
            http = await stack.enter_async_context(create_mcp_http_client())
            read, write = await stack.enter_async_context(
                streamable_http_client(proxied.url, http_client=http)
            )
        client = await stack.enter_async_context(ClientSession(read, write, **callbacks))
        await client.initialize()
        assert client.protocol_version == "2025-11-25"
        yield client


@contextlib.asynccontextmanager
async def modern_client(
    proxied: Proxied, user: User, log: Path, headers: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    """A Python SDK Client pinned to 2026-07-28 (stateless: every request carries its
    version and capabilities in `_meta`), `user` its elicitation handler. Over HTTP it
    names its decision session (Mcp-Policy-Session), so that its retries are in it."""
    async with contextlib.AsyncExitStack() as stack:
        transport: Any
        if proxied.stdio is not None:
            errlog = stack.enter_context(log.open("a"))
            transport = stdio_client(proxied.stdio, errlog=errlog)
        else:
            assert proxied.url is not None
            named = {"Mcp-Policy-Session": "s-" + uuid.uuid4().hex[:12], **(headers or {})}
            http = await stack.enter_async_context(create_mcp_http_client(headers=named))
            transport = streamable_http_client(proxied.url, http_client=http)
        client = await stack.enter_async_context(
            Client(transport, mode="2026-07-28", elicitation_callback=user.elicit)
        )
        assert client.protocol_version == "2026-07-28"
        yield client


def check_asked(user: User, approval_id: str, *, with_id: bool) -> None:
    """The one elicitation: URL mode, the approval's page, a message naming the tool, the
    server and the policy's reason; an elicitationId at 2025-11-25, none at 2026-07-28."""
    (asked,) = user.asked
    assert asked.mode == "url"
    assert asked.url == page_of(approval_id)
    assert f"'{COPY}'" in asked.message and HEALTHIMAGING in asked.message
    assert "copies into the existing image set" in asked.message
    assert (asked.elicitation_id is not None) is with_id


# AwaitApproval: the service's wait.


async def open_approval(servers: Servers) -> tuple[str, dict[str, Any]]:
    """A new pending approval (a call asked for over HTTP): its id, and the call."""
    call = approval_call(session())
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=WAIT) as raw:
        decision = (await raw.post("/v1/decide", json=call)).json()
    assert decision["verdict"] == "approval_required", decision
    approval_id: str = decision["approval"]["id"]
    assert decision["approval"]["url"] == page_of(approval_id)
    return approval_id, call


async def await_http(
    servers: Servers, approval_id: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=WAIT + 10) as raw:
        return await raw.post(f"/v1/approvals/{approval_id}/await", json=body, headers=headers)


async def await_grpc(
    servers: Servers, approval_id: str, timeout: float, metadata: Any = None
) -> decision_pb2.AwaitApprovalResponse:
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        request = decision_pb2.AwaitApprovalRequest(
            approval_id=approval_id, timeout_seconds=timeout
        )
        response: decision_pb2.AwaitApprovalResponse = await stub.AwaitApproval(
            request, timeout=WAIT + 10, metadata=metadata
        )
        return response


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_await_approval_answers_once_the_approval_is_decided(
    service: Servers, transport: str
) -> None:
    """A wait answers when an approver decides (not at its timeout); a wait of 0 answers
    at once; a pending approval at the end of a short wait is answered pending."""
    approval_id, _ = await open_approval(service)

    async def wait(timeout: float) -> dict[str, Any]:
        if transport == "http":
            answer = await await_http(service, approval_id, {"timeout_seconds": timeout})
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body
        response = await await_grpc(service, approval_id, timeout)
        ref = wire.approval_ref_from_proto(response.approval)
        assert ref is not None
        return ref.model_dump(mode="json", exclude_none=True)

    still = await wait(0.2)
    assert still["status"] == "pending"
    waiting = asyncio.create_task(wait(WAIT))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await act(service, approval_id, "approve", "ok")
    decided = await waiting
    assert decided["id"] == approval_id
    assert decided["status"] == "approved"
    assert decided["url"] == page_of(approval_id)
    assert set(decided) == {"id", "status", "expires_at", "url"}  # nothing else of the call
    assert (await wait(0))["status"] == "approved"


HOSTILE_BODIES: list[tuple[Any, int]] = [
    ({"timeout_seconds": 301}, 422),
    ({"timeout_seconds": 1e308}, 422),
    ({"timeout_seconds": -1}, 422),
    ({"timeout_seconds": True}, 422),
    ({"timeout_seconds": "5"}, 422),
    ({"timeout_seconds": None}, 422),
    ({"timeout_seconds": [1]}, 422),
    ({"timeout_seconds": 1, "approval_id": "apr_other"}, 422),
    ([{"timeout_seconds": 1}], 422),
    ("5", 422),
]


async def test_await_approval_refuses_hostile_input_over_http(service: Servers) -> None:
    """Every hostile body, id and header is a 4xx naming the problem; the approval it named
    is unchanged."""
    approval_id, _ = await open_approval(service)
    for body, status in HOSTILE_BODIES:
        answer = await await_http(service, approval_id, body)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"]["message"], body
    async with httpx.AsyncClient(base_url=service.http_url, timeout=WAIT) as raw:
        url = f"/v1/approvals/{approval_id}/await"
        # Not JSON, NaN (JSON has none), duplicate keys, no body: 400.
        for content in (
            b"{",
            b'{"timeout_seconds": NaN}',
            b'{"timeout_seconds":1,"timeout_seconds":2}',
            b"",
        ):
            answer = await raw.post(
                url, content=content, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400, (content, answer.text)
        answer = await raw.post(url, content=b"{}", headers={"content-type": "text/plain"})
        assert answer.status_code == 415
        answer = await raw.get(url)
        assert answer.status_code == 405
    unknown = await await_http(service, "apr_" + uuid.uuid4().hex, {"timeout_seconds": 1})
    assert unknown.status_code == 404, unknown.text
    assert "no approval" in unknown.json()["error"]["message"]
    too_long = await await_http(service, "a" * 257, {"timeout_seconds": 1})
    assert too_long.status_code == 422, too_long.text
    for odd in ("%00", "..%2F..%2Fetc", "apr_%E2%80%AE", "%20"):
        answer = await await_http(service, odd, {"timeout_seconds": 0})
        assert 400 <= answer.status_code < 500, (odd, answer.text)
    assert await status_of(service, approval_id) is ApprovalStatus.PENDING


async def test_await_approval_refuses_hostile_input_over_grpc(service: Servers) -> None:
    approval_id, _ = await open_approval(service)
    cases: list[tuple[str, float, grpc.StatusCode, str]] = [
        ("apr_" + uuid.uuid4().hex, 1, grpc.StatusCode.NOT_FOUND, "no approval"),
        ("", 1, grpc.StatusCode.INVALID_ARGUMENT, "approval_id"),
        ("a" * 257, 1, grpc.StatusCode.INVALID_ARGUMENT, "approval_id"),
        (approval_id, 301, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        (approval_id, -0.5, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        (approval_id, math.inf, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        (approval_id, math.nan, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        (approval_id, 1e308, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
    ]
    for given, timeout, code, names in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await await_grpc(service, given, timeout)
        assert refused.value.code() == code, (given[:20], timeout, refused.value)
        assert names in (refused.value.details() or ""), refused.value.details()
    # Bytes that are no AwaitApprovalRequest (a string field that is not UTF-8; truncated).
    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        raw = channel.unary_unary("/mcppolicy.v1.DecisionService/AwaitApproval")
        for data in (b"\x0a\x02\xff\xfe", b"\x0a\x05ab"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw(data, timeout=WAIT)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await status_of(service, approval_id) is ApprovalStatus.PENDING


def test_await_approval_rules_agree_with_the_http_body() -> None:
    """The proto's buf.validate rules and the HTTP body's limits are one limit."""
    fields = decision_pb2.AwaitApprovalRequest.DESCRIPTOR.fields_by_name
    rules = fields["timeout_seconds"].GetOptions().Extensions[validate_pb2.field].double
    schema = models.ApprovalWait.model_json_schema()["properties"]["timeout_seconds"]
    assert (rules.gte, rules.lte, rules.finite) == (0, models.MAX_AWAIT_SECONDS, True)
    assert (schema["minimum"], schema["maximum"]) == (0, models.MAX_AWAIT_SECONDS)
    ids = fields["approval_id"].GetOptions().Extensions[validate_pb2.field].string
    assert (ids.min_len, ids.max_len) == (1, wire.MAX_ID_CHARS)


async def test_await_approval_answers_only_decision_clients(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With a clients file, AwaitApproval answers a decision client (its token) and no one
    else: not without a token, not a wrong one, not the approver's or an agent's."""
    tmp = tmp_path_factory.mktemp("await-callers")
    clients = tmp / "clients.yaml"
    token = add_entry(clients, "client_token", "proxy-a")
    running = await start_servers(
        settings_for(tmp, policy_paths=list(copy_policy(tmp)), clients_file=clients)
    )
    try:
        good = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=running.http_url, timeout=WAIT) as raw:
            decision = (await raw.post("/v1/decide", json=approval_call(), headers=good)).json()
        approval_id = decision["approval"]["id"]
        for headers in (None, {"Authorization": "Bearer nope"}, AUTH):
            answer = await await_http(running, approval_id, {"timeout_seconds": 0}, headers)
            assert answer.status_code == 401, (headers, answer.text)
            assert "pending" not in answer.text
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())
                await await_grpc(running, approval_id, 0, metadata or None)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = await await_http(running, approval_id, {"timeout_seconds": 0}, good)
        assert answer.status_code == 200 and answer.json()["status"] == "pending"
        metadata = (("authorization", f"Bearer {token}"),)
        response = await await_grpc(running, approval_id, 0, metadata)
        assert response.approval.id == approval_id
    finally:
        await running.stop()


# The Python client at 2025-11-25: elicitation/create while the call is held.


@pytest.mark.parametrize("way", [STDIO, HTTP, HTTP_GRPC], ids=str)
async def test_python_2025_client_is_sent_to_the_page_and_the_call_goes_through(
    service: Servers, tmp_path: Path, way: Way
) -> None:
    user = User("accept")
    args = needs_approval()
    async with (
        proxy(way, service, tmp_path) as proxied,
        handshake_client(proxied, user, tmp_path / "client.log") as client,
    ):
        call = asyncio.create_task(client.call_tool(COPY, args))
        approval_id = await user.approval()
        assert await status_of(service, approval_id) is ApprovalStatus.PENDING
        assert not call.done()
        await act(service, approval_id, "approve", "fine")
        result = await asyncio.wait_for(call, WAIT)

    assert result.is_error is False, texts(result)
    assert result.structured_content is not None
    assert result.structured_content["datastore_id"] == args["datastore_id"]
    check_asked(user, approval_id, with_id=True)
    assert user.completed == [user.asked[0].elicitation_id]
    assert forwarded(proxied.record) == [args]
    assert await status_of(service, approval_id) is ApprovalStatus.USED


@pytest.mark.parametrize("way", [STDIO, HTTP], ids=str)
async def test_python_2025_client_reads_the_approvers_denial(
    service: Servers, tmp_path: Path, way: Way
) -> None:
    user = User("accept")
    args = needs_approval()
    async with (
        proxy(way, service, tmp_path) as proxied,
        handshake_client(proxied, user, tmp_path / "client.log") as client,
    ):
        call = asyncio.create_task(client.call_tool(COPY, args))
        approval_id = await user.approval()
        await act(service, approval_id, "deny", "not into that image set, use a new one")
        result = await asyncio.wait_for(call, WAIT)

    assert result.is_error is True
    assert "approval denied by" in texts(result)
    assert "not into that image set, use a new one" in texts(result)
    assert decision_in(result)["verdict"] == "deny"
    assert user.completed == [user.asked[0].elicitation_id]
    assert forwarded(proxied.record) == []
    assert await status_of(service, approval_id) is ApprovalStatus.DENIED


@pytest.mark.parametrize(
    ("way", "action"), [(STDIO, "decline"), (HTTP, "cancel")], ids=["stdio", "http"]
)
async def test_python_2025_client_that_declines_gets_the_refusal_at_once(
    service: Servers, tmp_path: Path, way: Way, action: str
) -> None:
    """The client's answer is its word only: a decline (or cancel) answers the call with
    the approval_required refusal, and the approval stays pending for the approvers."""
    user = User(action)
    args = needs_approval()
    async with (
        proxy(way, service, tmp_path) as proxied,
        handshake_client(proxied, user, tmp_path / "client.log") as client,
    ):
        result = await asyncio.wait_for(client.call_tool(COPY, args), WAIT)

    approval_id = approval_in(user.asked[0].url)
    assert result.is_error is True
    decision = decision_in(result)
    assert decision["verdict"] == "approval_required"
    assert decision["approval"]["id"] == approval_id
    assert "call the same tool again unchanged once a human approves" in texts(result)
    assert user.completed == []
    assert forwarded(proxied.record) == []
    assert await status_of(service, approval_id) is ApprovalStatus.PENDING


async def test_an_accept_is_never_taken_for_an_approval(service: Servers, tmp_path: Path) -> None:
    """The client accepts and nobody approves: at the end of --elicitation-wait the agent
    gets the refusal; nothing reached the server and the approval is still pending."""
    user = User("accept")
    args = needs_approval()
    wait = ElicitationOptions(wait=0.5)
    async with (
        proxy(STDIO, service, tmp_path, elicitation=wait) as proxied,
        handshake_client(proxied, user, tmp_path / "client.log") as client,
    ):
        result = await asyncio.wait_for(client.call_tool(COPY, args), WAIT)

    approval_id = approval_in(user.asked[0].url)
    assert result.is_error is True
    assert decision_in(result)["verdict"] == "approval_required"
    assert user.completed == []
    assert forwarded(proxied.record) == []
    assert await status_of(service, approval_id) is ApprovalStatus.PENDING


@pytest.mark.parametrize("way", [STDIO, HTTP], ids=str)
async def test_no_elicitation_and_clients_without_it_keep_the_refusal_text(
    service: Servers, tmp_path: Path, way: Way
) -> None:
    """--no-elicitation: a client that can be asked is not; a client that declared no
    elicitation is never asked either. Both read the refusal with the approval's link."""
    user = User("accept")
    off = ElicitationOptions(enabled=False)
    async with (
        proxy(way, service, tmp_path, elicitation=off) as proxied,
        handshake_client(proxied, user, tmp_path / "client.log") as client,
    ):
        asked_off = await asyncio.wait_for(client.call_tool(COPY, needs_approval()), WAIT)
    async with (
        proxy(way, service, tmp_path) as plain,
        handshake_client(plain, None, tmp_path / "client.log") as client,
    ):
        without = await asyncio.wait_for(client.call_tool(COPY, needs_approval()), WAIT)

    assert user.asked == []
    for result in (asked_off, without):
        decision = decision_in(result)
        assert decision["verdict"] == "approval_required"
        assert page_of(decision["approval"]["id"]) in texts(result)
    assert forwarded(proxied.record) == forwarded(plain.record) == []


async def test_url_elicitation_required_error_when_the_proxy_holds_no_call(
    service: Servers, tmp_path: Path
) -> None:
    """--elicitation-wait 0: the spec's URLElicitationRequiredError (-32042) names the
    page; the proxy announces the completion once the approval is decided, and the
    client's identical retry then goes through, once."""
    user = User("accept")
    args = needs_approval()
    async with (
        proxy(STDIO, service, tmp_path, elicitation=ElicitationOptions(wait=0)) as proxied,
        handshake_client(proxied, user, tmp_path / "client.log") as client,
    ):
        with pytest.raises(MCPError) as required:
            await asyncio.wait_for(client.call_tool(COPY, args), WAIT)
        error = required.value.error
        assert error.code == -32042
        (elicitation,) = error.data["elicitations"]
        approval_id = approval_in(elicitation["url"])
        assert elicitation["mode"] == "url" and elicitation["elicitationId"]
        assert COPY in elicitation["message"]
        assert forwarded(proxied.record) == []
        await act(service, approval_id, "approve", "ok")
        await asyncio.wait_for(user.done.wait(), WAIT)
        retried = await asyncio.wait_for(client.call_tool(COPY, args), WAIT)
        # The grant was used: the same call again needs an approval of its own.
        with pytest.raises(MCPError) as again:
            await asyncio.wait_for(client.call_tool(COPY, args), WAIT)

    assert user.asked == []  # the error form sends no elicitation/create
    assert user.completed == [elicitation["elicitationId"]]
    assert retried.is_error is False
    assert again.value.error.code == -32042
    (second,) = again.value.error.data["elicitations"]
    assert approval_in(second["url"]) != approval_id
    assert forwarded(proxied.record) == [args]


async def test_approval_wait_waits_without_deciding_again(service: Servers, tmp_path: Path) -> None:
    """--approval-wait with a client that cannot be asked: the proxy waits on
    AwaitApproval, then decides the identical call once. Two decisions are logged (the
    approval_required and the allow), where the old polling logged one per poll."""
    agent = "agent-" + uuid.uuid4().hex[:10]
    args = needs_approval()
    async with (
        proxy(STDIO, service, tmp_path, approval_wait=WAIT, agent_id=agent) as proxied,
        handshake_client(proxied, None, tmp_path / "client.log") as client,
    ):
        call = asyncio.create_task(client.call_tool(COPY, args))
        approval_id = await pending_of(service, args)
        await asyncio.sleep(1.5)  # time the old way would have polled three times
        await act(service, approval_id, "approve", "ok")
        result = await asyncio.wait_for(call, WAIT)

    assert result.is_error is False
    assert forwarded(proxied.record) == [args]
    await service.runtime.decision_log.flush()
    async with httpx.AsyncClient(base_url=service.http_url, timeout=WAIT) as raw:
        query = {"agent_id": agent, "tool": COPY}
        logged = (await raw.get("/v1/decisions", params=query, headers=AUTH)).json()
    verdicts = [
        record["verdict"]
        for record in reversed(logged["decisions"])
        if not record.get("dry_run")  # (tools/list: each tool looked at, nothing decided)
    ]
    assert verdicts == ["approval_required", "allow"]


async def pending_of(servers: Servers, args: dict[str, Any]) -> str:
    """The pending approval of the call with these arguments (waits for it to open)."""
    for _ in range(int(WAIT / 0.05)):
        for approval in await servers.runtime.approvals.list(ApprovalStatus.PENDING, 1000):
            if approval.arguments == args:
                return approval.id
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


async def raw_agent(proxied: Proxied, log: Path) -> RawProxy:
    """The stdio proxy spoken to in raw JSON-RPC, initialized at 2025-11-25 by a client
    that declares URL-mode elicitation."""
    assert proxied.stdio is not None
    args = proxied.stdio.args
    agent = await RawProxy.start(args[args.index("proxy") + 1 :], proxied.stdio.env or {}, log)
    answer = await agent.request(
        "initialize",
        {
            "protocolVersion": "2025-11-25",
            "capabilities": {"elicitation": {"url": {}}},
            "clientInfo": {"name": "raw-elicitation-client", "version": "1"},
        },
    )
    assert answer["result"]["protocolVersion"] == "2025-11-25"
    await agent.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return agent


async def test_a_client_that_never_answers_or_refuses_the_elicitation(
    service: Servers, tmp_path: Path
) -> None:
    """A client that does not answer within --elicitation-wait: its request is cancelled
    and the call refused; its late answer (an accept) changes nothing. A client that
    answers with an error: the refusal, as to a client without elicitation. Either way
    the approval stays pending, nothing is forwarded, and the session goes on."""
    async with proxy(STDIO, service, tmp_path, elicitation=ElicitationOptions(wait=1)) as proxied:
        agent = await raw_agent(proxied, tmp_path / "proxy.log")
        try:
            call = {"name": COPY, "arguments": needs_approval()}
            await agent.send({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": call})
            asked = await agent.receive()
            assert asked["method"] == "elicitation/create"
            cancelled = await agent.receive()
            assert cancelled["method"] == "notifications/cancelled"
            assert cancelled["params"]["requestId"] == asked["id"]
            refused = await agent.answer_to(7)
            accept = {"action": "accept"}
            await agent.send({"jsonrpc": "2.0", "id": asked["id"], "result": accept})

            call = {"name": COPY, "arguments": needs_approval()}
            await agent.send({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": call})
            asked_again = await agent.receive()
            error = {"code": -32602, "message": "Client does not support URL-mode elicitation"}
            await agent.send({"jsonrpc": "2.0", "id": asked_again["id"], "error": error})
            errored = await agent.answer_to(8)
            ping = await agent.request("ping")  # the session goes on
        finally:
            await agent.close()

    assert "error" not in ping
    for answer in (refused, errored):
        decision = answer["result"]["_meta"][DECISION_KEY]
        assert decision["verdict"] == "approval_required"
        assert await status_of(service, decision["approval"]["id"]) is ApprovalStatus.PENDING
    assert forwarded(proxied.record) == []


# The Python client at 2026-07-28: an input-required result, and the retry.


@pytest.mark.parametrize("way", [STDIO, HTTP], ids=str)
async def test_python_2026_client_retries_with_the_signed_state_and_the_call_goes_through(
    service: Servers, tmp_path: Path, way: Way
) -> None:
    user = User("accept")
    args = needs_approval()
    async with (
        proxy(way, service, tmp_path) as proxied,
        modern_client(proxied, user, tmp_path / "client.log") as client,
    ):
        call = asyncio.create_task(client.call_tool(COPY, args))
        approval_id = await user.approval()
        await act(service, approval_id, "approve", "fine")
        result = await asyncio.wait_for(call, WAIT)

    assert result.is_error is False, texts(result)
    check_asked(user, approval_id, with_id=False)
    assert forwarded(proxied.record) == [args]
    # The retry's requestState and inputResponses were the proxy's: the server saw neither.
    (inbound,) = [
        line
        for line in map(json.loads, proxied.inbound.read_text().splitlines())
        if line["method"] == "tools/call"
    ]
    assert "requestState" not in inbound["params"] and "inputResponses" not in inbound["params"]
    assert await status_of(service, approval_id) is ApprovalStatus.USED


@pytest.mark.parametrize("way", [STDIO, HTTP], ids=str)
async def test_python_2026_client_reads_the_approvers_denial(
    service: Servers, tmp_path: Path, way: Way
) -> None:
    user = User("accept")
    args = needs_approval()
    async with (
        proxy(way, service, tmp_path) as proxied,
        modern_client(proxied, user, tmp_path / "client.log") as client,
    ):
        call = asyncio.create_task(client.call_tool(COPY, args))
        approval_id = await user.approval()
        await act(service, approval_id, "deny", "ask the data owner first")
        result = await asyncio.wait_for(call, WAIT)

    assert result.is_error is True
    assert "ask the data owner first" in texts(result)
    assert decision_in(result)["verdict"] == "deny"
    assert forwarded(proxied.record) == []


@pytest.mark.parametrize("way", [STDIO, HTTP], ids=str)
async def test_python_2026_client_that_declines_gets_the_refusal(
    service: Servers, tmp_path: Path, way: Way
) -> None:
    user = User("decline")
    args = needs_approval()
    async with (
        proxy(way, service, tmp_path) as proxied,
        modern_client(proxied, user, tmp_path / "client.log") as client,
    ):
        result = await asyncio.wait_for(client.call_tool(COPY, args), WAIT)

    approval_id = approval_in(user.asked[0].url)
    assert result.is_error is True
    decision = decision_in(result)
    assert decision["verdict"] == "approval_required"
    assert decision["rule"] == "proxy.elicitation_declined"
    assert decision["approval"]["id"] == approval_id
    assert decision["approval"]["status"] == "pending"
    assert forwarded(proxied.record) == []
    assert await status_of(service, approval_id) is ApprovalStatus.PENDING


ACCEPT = {INPUT_KEY: mcp_types.ElicitResult(action="accept")}


async def first_round(client: Client, args: dict[str, Any]) -> mcp_types.InputRequiredResult:
    first = await client.session.call_tool(COPY, args, allow_input_required=True)
    assert isinstance(first, mcp_types.InputRequiredResult), first
    assert first.request_state is not None and first.input_requests is not None
    request = first.input_requests[INPUT_KEY]
    assert isinstance(request, mcp_types.ElicitRequest)
    return first


async def retried(
    client: Client, args: dict[str, Any], state: str, responses: Any = None
) -> mcp_types.CallToolResult | mcp_types.InputRequiredResult:
    return await client.session.call_tool(
        COPY,
        args,
        input_responses=ACCEPT if responses is None else responses,
        request_state=state,
        allow_input_required=True,
    )


async def refused_state(client: Client, args: dict[str, Any], state: str, why: str) -> None:
    with pytest.raises(MCPError) as refused:
        await retried(client, args, state)
    assert refused.value.error.code == -32602
    assert refused.value.error.message.startswith("Invalid requestState")
    assert why in refused.value.error.message, refused.value.error.message


def altered(state: str, at: int) -> str:
    """`state` with the character at `at` changed (still base64url)."""
    swapped = "A" if state[at] != "A" else "B"
    return state[:at] + swapped + state[at + 1 :]


async def test_forged_altered_expired_foreign_and_replayed_states_are_refused(
    service: Servers, tmp_path: Path
) -> None:
    """Every requestState that is not exactly the one issued for this call, principal and
    session, unused and in time, is a JSON-RPC error: nothing is decided with it, nothing
    forwarded, no grant used. Then the real one goes through once, and never again."""
    secret = "x" * 40
    user = User("accept")
    args = needs_approval()
    session_header = "s-" + uuid.uuid4().hex[:12]
    async with (
        proxy(HTTP, service, tmp_path, secret=secret) as proxied,
        modern_client(
            proxied, user, tmp_path / "client.log", {"Mcp-Policy-Session": session_header}
        ) as client,
        modern_client(proxied, user, tmp_path / "client.log") as stranger,
    ):
        first = await first_round(client, args)
        state = first.request_state
        assert state is not None
        approval_id = approval_in(first.input_requests[INPUT_KEY].params.url)  # type: ignore[index,union-attr]
        await act(service, approval_id, "approve", "ok")

        head, _, mac = state.rpartition(".")
        binding = CallBinding.of(
            Principal(session_id=session_header),
            None,
            server=HEALTHIMAGING,
            tool=COPY,
            arguments=args,
        )
        assert binding is not None
        ours = RequestStates(secret.encode())
        other_key = RequestStates(b"y" * 40)
        await refused_state(client, args, "mcp-policy.1.e30.AAAA", "does not verify")
        await refused_state(
            client, args, altered(state, len("mcp-policy.1.") + 3), "does not verify"
        )
        await refused_state(client, args, f"{head}.{altered(mac, 0)}", "does not verify")
        await refused_state(client, args, state + "=", "does not verify")
        await refused_state(
            client, args, other_key.issue(binding, approval_id, time.time() + 60), "does not verify"
        )
        await refused_state(
            client, args, ours.issue(binding, approval_id, time.time() - 1), "expired"
        )
        other_call = {**args, "source_image_set_id": uuid.uuid4().hex}
        await refused_state(client, other_call, state, "another call")
        await refused_state(stranger, args, state, "another call")
        # None of that used the grant, nor reached the server.
        assert await status_of(service, approval_id) is ApprovalStatus.APPROVED
        assert forwarded(proxied.record) == []

        done = await retried(client, args, state)
        assert isinstance(done, mcp_types.CallToolResult) and done.is_error is False
        await refused_state(client, args, state, "already used")

    assert forwarded(proxied.record) == [args]
    assert await status_of(service, approval_id) is ApprovalStatus.USED


async def test_a_state_answered_with_decline_cannot_be_replayed_as_accept(
    service: Servers, tmp_path: Path
) -> None:
    user = User("accept")
    args = needs_approval()
    async with (
        proxy(STDIO, service, tmp_path) as proxied,
        modern_client(proxied, user, tmp_path / "client.log") as client,
    ):
        first = await first_round(client, args)
        assert first.request_state is not None
        approval_id = approval_in(first.input_requests[INPUT_KEY].params.url)  # type: ignore[index,union-attr]
        declined = await retried(
            client,
            args,
            first.request_state,
            {INPUT_KEY: mcp_types.ElicitResult(action="decline")},
        )
        assert isinstance(declined, mcp_types.CallToolResult) and declined.is_error is True
        await act(service, approval_id, "approve", "ok")
        await refused_state(client, args, first.request_state, "already used")
        # Another retry without the proxy's state is a call of its own: decided as one.
        fresh = await client.call_tool(COPY, args)

    assert fresh.is_error is False  # the identical call, granted: through once
    assert forwarded(proxied.record) == [args]


async def test_a_state_is_refused_to_another_principal(service: Servers, tmp_path: Path) -> None:
    """Over --listen with API keys: agent B cannot use agent A's requestState, even in a
    decision session of the same name; A's grant stays unused."""
    keys = tmp_path / "keys.yaml"
    key_a = add_entry(keys, "api_key", "key-a", agent_id="agent-a", user_id="ann")
    key_b = add_entry(keys, "api_key", "key-b", agent_id="agent-b", user_id="bob")
    resource = ResourceServer(AuthConfig(keys_file=keys))
    await resource.start()
    record = tmp_path / "calls.jsonl"
    env = clean_env(**{RECORD_ENV: str(record)})
    user = User("accept")
    args = needs_approval()
    name = {"Mcp-Policy-Session": "shared-name"}
    try:
        async with http_listener(service, env, "embedded", ProxyOptions(), resource) as running:
            proxied = Proxied(record, tmp_path / "inbound.jsonl", url=running.url)
            async with (
                modern_client(
                    proxied, user, tmp_path / "a.log", {**name, "Authorization": f"Bearer {key_a}"}
                ) as agent_a,
                modern_client(
                    proxied, user, tmp_path / "b.log", {**name, "Authorization": f"Bearer {key_b}"}
                ) as agent_b,
            ):
                first = await first_round(agent_a, args)
                assert first.request_state is not None
                url = first.input_requests[INPUT_KEY].params.url  # type: ignore[index,union-attr]
                approval_id = approval_in(url)
                await act(service, approval_id, "approve", "for ann's agent")
                await refused_state(agent_b, args, first.request_state, "another call")
                assert await status_of(service, approval_id) is ApprovalStatus.APPROVED
                done = await retried(agent_a, args, first.request_state)
                assert isinstance(done, mcp_types.CallToolResult) and done.is_error is False
    finally:
        await resource.close()
    assert forwarded(record) == [args]


# The TypeScript client at 2025-11-25 (tests/interop/elicit.mjs).


@pytest.fixture(scope="session")
def node() -> str:
    """`node`, with the pinned TypeScript SDK installed (tests/test_interop.py pins it)."""
    found = shutil.which("node")
    if found is None:
        pytest.fail("no `node` on PATH: the interop suite needs Node.js >= 18 (see `make test`)")
    if not TS_SDK_PACKAGE.exists():
        pytest.fail("the TypeScript SDK is not installed: run `make interop-deps`")
    return found


async def run_elicit_ts(
    node: str, plan: dict[str, Any], log: Path, when_asked: Callable[[str], Awaitable[None]]
) -> list[dict[str, Any]]:
    """elicit.mjs with `plan`, its lines as they come; `when_asked(url)` runs at the
    elicitation (before the client answers the call's result)."""
    with log.open("a") as errlog:
        proc = await asyncio.create_subprocess_exec(
            node,
            str(ELICIT_MJS),
            json.dumps(plan),
            stdout=asyncio.subprocess.PIPE,
            stderr=errlog,
            cwd=str(INTEROP_DIR),
        )
    assert proc.stdout is not None
    lines: list[dict[str, Any]] = []
    try:
        while raw := await asyncio.wait_for(proc.stdout.readline(), WAIT * 2):
            line = json.loads(raw)
            lines.append(line)
            if line.get("event") == "elicitation":
                await when_asked(line["params"]["url"])
        status = await asyncio.wait_for(proc.wait(), WAIT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert status == 0, f"elicit.mjs exited {status}; log:\n{log.read_text()}"
    return lines


TS_CASES = [
    ("stdio", "accept", "approve"),
    ("http", "accept", "approve"),
    ("stdio", "accept", "deny"),
    ("http", "decline", None),
]


@pytest.mark.parametrize(
    ("transport", "action", "verdict"),
    TS_CASES,
    ids=[f"{t}-{a}-{v or 'nobody'}" for t, a, v in TS_CASES],
)
async def test_typescript_client_is_sent_to_the_page(
    service: Servers,
    tmp_path: Path,
    node: str,
    transport: str,
    action: str,
    verdict: str | None,
) -> None:
    args = needs_approval()
    way = STDIO if transport == "stdio" else HTTP
    seen: list[str] = []

    async def when_asked(url: str) -> None:
        approval_id = approval_in(url)
        seen.append(approval_id)
        if verdict is not None:
            await act(service, approval_id, verdict, "the TypeScript user's approver")

    async with proxy(way, service, tmp_path) as proxied:
        if proxied.stdio is not None:
            spec: dict[str, Any] = {
                "type": "stdio",
                "command": proxied.stdio.command,
                "args": proxied.stdio.args,
                "env": proxied.stdio.env,
                "cwd": str(PROJECT_ROOT),
            }
        else:
            spec = {"type": "http", "url": proxied.url}
        plan = {
            "transport": spec,
            "action": action,
            "steps": [{"op": "callTool", "name": COPY, "arguments": args}],
        }
        lines = await run_elicit_ts(node, plan, tmp_path / "client.log", when_asked)

    connect, asked, *rest = lines
    assert connect == {"op": "connect", "ok": True, "result": {"negotiated": "2025-11-25"}}
    assert asked["event"] == "elicitation"
    (approval_id,) = seen
    params = asked["params"]
    assert params["mode"] == "url" and params["elicitationId"]
    assert f"'{COPY}'" in params["message"]
    called = rest[-1]
    assert called["op"] == "callTool" and called["ok"] is True, called
    result = called["result"]
    if verdict == "approve":
        assert rest[0] == {
            "event": "complete",
            "params": {"elicitationId": params["elicitationId"]},
        }
        assert result["isError"] is False
        assert forwarded(proxied.record) == [args]
        assert await status_of(service, approval_id) is ApprovalStatus.USED
        return
    assert result["isError"] is True
    decision = result["_meta"][DECISION_KEY]
    if verdict == "deny":
        assert "the TypeScript user's approver" in decision["reason"]
        assert decision["verdict"] == "deny"
    else:
        assert decision["verdict"] == "approval_required"
        assert [line for line in rest if line.get("event") == "complete"] == []
        assert await status_of(service, approval_id) is ApprovalStatus.PENDING
    assert forwarded(proxied.record) == []


# The pieces, without a service.


def binding(**changes: Any) -> CallBinding:
    values: dict[str, Any] = {
        "principal": Principal(agent_id="a-1", session_id="s-1", user_id="u-1"),
        "identity": None,
        "server": HEALTHIMAGING,
        "tool": COPY,
        "arguments": {"b": [1, 2.0], "a": "x"},
    }
    values.update(changes)
    principal, identity = values.pop("principal"), values.pop("identity")
    made = CallBinding.of(principal, identity, **values)
    assert made is not None
    return made


def test_a_state_verifies_once_for_exactly_its_call() -> None:
    states = RequestStates(b"k" * 32)
    good = binding()
    state = states.issue(good, "apr_1", time.time() + 60)
    # The same call with its arguments in another order, 2.0 written as 2: the same call.
    same = binding(arguments={"a": "x", "b": [1, 2]})
    assert states.redeem(state, same)[0] == "apr_1"
    with pytest.raises(StateRefused, match="already used"):
        states.redeem(state, good)
    foreign = [
        binding(principal=Principal(agent_id="a-2", session_id="s-1", user_id="u-1")),
        binding(principal=Principal(agent_id="a-1", session_id="s-2", user_id="u-1")),
        binding(principal=Principal(agent_id="a-1", session_id="s-1", user_id="u-2")),
        binding(server="another.server"),
        binding(tool="delete_datastore"),
        binding(arguments={"a": "x", "b": [1, 3]}),
        binding(arguments=None),
    ]
    for other in foreign:
        fresh = states.issue(good, "apr_1", time.time() + 60)
        with pytest.raises(StateRefused, match="another call"):
            states.redeem(fresh, other)


def test_states_that_do_not_verify() -> None:
    states = RequestStates(b"k" * 32)
    state = states.issue(binding(), "apr_1", time.time() + 60)
    prefix, payload_mac = state[: len("mcp-policy.1.")], state[len("mcp-policy.1.") :]
    payload, mac = payload_mac.split(".")
    for forged in (
        "",
        "mcp-policy.1.",
        "mcp-policy.1.abc",
        f"{prefix}{payload}",
        f"{prefix}{payload}.{mac}.x",
        f"{prefix}{payload[:-1]}.{mac}",
        f"{prefix}{altered(payload, 5)}.{mac}",
        f"{prefix}{payload}.{altered(mac, 2)}",
        f"{prefix}{payload}.{mac}\u00e9",
        state + "x" * 5000,
        RequestStates(b"j" * 32).issue(binding(), "apr_1", time.time() + 60),
    ):
        with pytest.raises(StateRefused):
            states.redeem(forged, binding())
    expired = states.issue(binding(), "apr_1", time.time() - 0.001)
    with pytest.raises(StateRefused, match="expired"):
        states.redeem(expired, binding())
    # Nothing of that spent the real one.
    assert states.redeem(state, binding()) == ("apr_1", pytest.approx(time.time() + 60, abs=5))


def test_a_state_lives_no_longer_than_its_approval_nor_an_hour() -> None:
    states = RequestStates(b"k" * 32)
    far = states.issue(binding(), "apr_1", time.time() + 10 * 3600)
    assert states.redeem(far, binding())[1] <= time.time() + 3600


async def test_the_proxy_refuses_to_start_with_a_short_secret(tmp_path: Path) -> None:
    env = clean_env(SHORT_SECRET="too-short")
    args = ["proxy", "--embedded", "--elicitation-secret-env", "SHORT_SECRET", "--", "true"]
    with (tmp_path / "err.log").open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            *PROXY, *args, env=env, stderr=err, cwd=str(PROJECT_ROOT)
        )
        assert await asyncio.wait_for(proc.wait(), WAIT) == 2
    assert "SHORT_SECRET" in (tmp_path / "err.log").read_text()
    assert "at least 32 bytes" in (tmp_path / "err.log").read_text()


def test_the_secret_is_long_enough_or_random(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        RequestStates(b"short")
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        RequestStates.from_environment()
    monkeypatch.setenv(SECRET_ENV, "z" * 32)
    shared = RequestStates.from_environment().issue(binding(), "apr_1", time.time() + 60)
    assert RequestStates(b"z" * 32).redeem(shared, binding())[0] == "apr_1"
    monkeypatch.delenv(SECRET_ENV)
    one, two = RequestStates.from_environment(), RequestStates.from_environment()
    with pytest.raises(StateRefused):
        two.redeem(one.issue(binding(), "apr_1", time.time() + 60), binding())


def test_spent_states_are_remembered_within_bounds() -> None:
    states = RequestStates(b"k" * 32, capacity=3)
    issued = [states.issue(binding(), f"apr_{i}", time.time() + 60) for i in range(5)]
    for state in issued:
        states.redeem(state, binding())
    assert len(states._spent) == 3


def test_which_clients_can_be_sent_a_url() -> None:
    url = {"elicitation": {"url": {}}}
    assert url_mode(url) and url_mode({"elicitation": {"form": {}, "url": {}}})
    for caps in (
        None,
        {},
        {"elicitation": {}},
        {"elicitation": {"form": {}}},
        {"elicitation": {"url": True}},
        [],
    ):
        assert not url_mode(caps)
    assert handshake_url_mode("2025-11-25", url)
    for version in ("2025-06-18", "2026-07-28", "2099-01-01", None):
        assert not handshake_url_mode(version, url)
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": url,
    }
    assert stateless_url_mode({"_meta": meta})
    assert not stateless_url_mode(
        {"_meta": {**meta, "io.modelcontextprotocol/protocolVersion": "2025-11-25"}}
    )
    assert not stateless_url_mode({"_meta": "x"}) and not stateless_url_mode({})


def test_a_retry_takes_the_proxys_fields_out_of_what_is_forwarded() -> None:
    params = {
        "name": COPY,
        "arguments": {"a": 1},
        "requestState": "mcp-policy.1.x.y",
        "inputResponses": {INPUT_KEY: {"action": "accept"}, "other": {}},
        "_meta": {"k": "v"},
    }
    retry = retry_of(params)
    assert retry is not None
    assert retry.action == "accept" and retry.state == "mcp-policy.1.x.y"
    assert retry.params == {"name": COPY, "arguments": {"a": 1}, "_meta": {"k": "v"}}
    for answer in ({"action": "maybe"}, "accept", None, {"action": ["accept"]}):
        odd = retry_of({**params, "inputResponses": {INPUT_KEY: answer}})
        assert odd is not None and odd.action is None
    # The upstream's own state is not the proxy's: it goes to the upstream untouched.
    assert retry_of({**params, "requestState": "upstream-state"}) is None
    assert retry_of({**params, "requestState": 7}) is None


def test_the_message_names_the_tool_the_server_and_the_policys_reason() -> None:
    decision = models.Decision(
        decision_id="d",
        verdict=models.Verdict.APPROVAL_REQUIRED,
        reason="copies into an existing image set; a human must approve this call first "
        "(approval apr_1, pending at https://x/console/approvals/apr_1); call the same tool "
        "again unchanged once a human approves",
        rule="r",
        policy_revision="p",
    )
    text = message_for(HEALTHIMAGING, COPY, decision)
    assert f"'{COPY}'" in text and HEALTHIMAGING in text
    assert "copies into an existing image set" in text
    assert "call the same tool again" not in text  # that is for the agent, not its user
