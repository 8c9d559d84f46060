"""The agent side over streamable HTTP: `--listen HOST:PORT` serves MCP at `/mcp`.

Each MCP session the agent opens (an `initialize` without `Mcp-Session-Id`) gets its own
SDK `StreamableHTTPServerTransport` and its own upstream connection (a child process, or
a client session to the upstream URL), relayed by one `ProxySession` whose decision
session id is the MCP session id.

Every POST body is screened before the SDK transport sees it (`screen.py`, the same rules
as the stdio side's): text that is not strict JSON, anything that is not one JSON-RPC
message, and a tools/call without a usable id are answered with HTTP 400 and the JSON-RPC
error (-32700 or -32600), and never reach a session; what passes is handed to the SDK
transport as the very same bytes. The SDK transport answers the rest of what is malformed
itself (missing session ids, wrong content types or Accept headers).

Sessions speak the initialize handshake (protocol 2024-11-05 to 2025-11-25). A request
for the stateless 2026-07-28 protocol is refused with -32022 naming the supported
versions, so an SDK client in `auto` mode falls back to the handshake.

When the upstream ends (the child exits, or never started), the session stays open and
answers every request with a JSON-RPC error saying so, until the agent deletes it or it
idles out; the proxy itself keeps serving new sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER, StreamableHTTPServerTransport
from mcp.server.transport_security import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    RequestBodyLimitMiddleware,
    TransportSecuritySettings,
)
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp.shared.message import SessionMessage
from mcp_types import (
    INVALID_REQUEST,
    UNSUPPORTED_PROTOCOL_VERSION,
    ErrorData,
    JSONRPCError,
    JSONRPCRequest,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from engine.proxy.core import (
    UPSTREAM_CLOSED,
    MalformedMessage,
    MessageWriter,
    ProxyOptions,
    ProxySession,
    Upstream,
    error_response,
)
from engine.proxy.decider import Decider
from engine.proxy.listing import ToolFilter
from engine.proxy.screen import MAX_DEPTH, screen_agent_message
from engine.server import QuietUvicornServer, listen_http

log = logging.getLogger(__name__)

SESSION_IDLE_TIMEOUT = 30 * 60.0
MAX_SESSIONS = 1000
LOOPBACK = ("127.0.0.1", "localhost", "::1")

OpenUpstream = Callable[[], AbstractAsyncContextManager[Upstream]]


def _json_error(status: int, code: int, message: str, data: Any = None) -> Response:
    body = JSONRPCError(
        jsonrpc="2.0", id=None, error=ErrorData(code=code, message=message, data=data)
    )
    content = body.model_dump(mode="json", by_alias=True, exclude_none=True)
    content["id"] = None  # JSON-RPC 2.0: an error that answers no request says id null
    return Response(json.dumps(content), status_code=status, media_type="application/json")


def _malformed(malformed: MalformedMessage) -> Response:
    """HTTP 400 with the JSON-RPC error for a POST body that did not pass the screen."""
    body = JSONRPCError(jsonrpc="2.0", id=malformed.request_id, error=malformed.error)
    return Response(
        body.model_dump_json(by_alias=True, exclude_unset=True),
        status_code=HTTPStatus.BAD_REQUEST,
        media_type="application/json",
    )


async def screen_post(
    scope: Scope, receive: Receive, send: Send, *, max_body: int, max_depth: int
) -> Receive | None:
    """Read a POST body and screen it; answer it here when it does not pass.

    Returns the `receive` to hand on (it replays the same bytes, then the connection's
    own messages), or None when the request was answered (or the client went away)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            await Response("Request body too large", status_code=413)(scope, receive, send)
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    screened = screen_agent_message(body, max_depth=max_depth)
    if isinstance(screened, MalformedMessage):
        log.warning("malformed message from the agent: %s", screened.error.message)
        await _malformed(screened)(scope, receive, send)
        return None
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def security_for(host: str) -> TransportSecuritySettings | None:
    """DNS-rebinding protection on loopback, as the SDK's own servers set it up."""
    if host not in LOOPBACK:
        return None
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )


async def refuse_all(
    messages: AsyncIterable[SessionMessage | Exception], agent: MessageWriter, reason: str
) -> None:
    """Answer every request of a session whose upstream is gone with `reason`."""
    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        async for item in messages:
            if isinstance(item, SessionMessage) and isinstance(item.message, JSONRPCRequest):
                await agent.send(
                    SessionMessage(error_response(item.message.id, UPSTREAM_CLOSED, reason))
                )


class ProxyApp:
    """The ASGI app: MCP sessions at `path`, each relayed to its own upstream."""

    def __init__(
        self,
        *,
        path: str,
        decider: Decider,
        options: ProxyOptions,
        open_upstream: OpenUpstream,
        security: TransportSecuritySettings | None,
        idle_timeout: float | None = SESSION_IDLE_TIMEOUT,
        max_body: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self.path = path
        self.decider = decider
        self.options = options
        self.open_upstream = open_upstream
        self.security = security
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.max_depth = max_depth
        self.tool_filter = ToolFilter(decider)
        self.sessions: dict[str, StreamableHTTPServerTransport] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Hold the task group the sessions run in, until `close()`."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._ready.set()
            await self._stop.wait()
            tg.cancel_scope.cancel()

    async def close(self) -> None:
        self._stop.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].rstrip("/") != self.path.rstrip("/"):
            await Response("Not Found", status_code=404)(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        version = headers.get(MCP_PROTOCOL_VERSION_HEADER)
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            response = _json_error(
                HTTPStatus.BAD_REQUEST,
                UNSUPPORTED_PROTOCOL_VERSION,
                f"protocol version {version} is not supported by this proxy; it speaks the "
                "initialize handshake",
                {"supported": list(HANDSHAKE_PROTOCOL_VERSIONS), "requested": version},
            )
            await response(scope, receive, send)
            return
        session_id = headers.get(MCP_SESSION_ID_HEADER)
        if session_id is not None:
            transport = self.sessions.get(session_id)
            if transport is None:
                await _json_error(404, INVALID_REQUEST, "Session not found")(scope, receive, send)
                return
            if scope["method"] == "POST":
                screened = await self._screen(scope, receive, send)
                if screened is None:
                    return
                receive = screened
            await transport.handle_request(scope, receive, send)
            if transport.is_terminated:
                self.sessions.pop(session_id, None)
            return
        if scope["method"] != "POST":
            response = _json_error(400, INVALID_REQUEST, "Bad Request: Missing session ID")
            await response(scope, receive, send)
            return
        screened = await self._screen(scope, receive, send)
        if screened is None:
            return
        await self._open_session(scope, screened, send)

    async def _screen(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        return await screen_post(
            scope, receive, send, max_body=self.max_body, max_depth=self.max_depth
        )

    async def _open_session(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._stop.is_set():
            await _json_error(503, INVALID_REQUEST, "The proxy is stopping")(scope, receive, send)
            return
        if len(self.sessions) >= MAX_SESSIONS:
            await _json_error(503, INVALID_REQUEST, "Too many open sessions")(scope, receive, send)
            return
        session_id = uuid.uuid4().hex
        transport = StreamableHTTPServerTransport(
            mcp_session_id=session_id,
            security_settings=self.security,
            idle_timeout=self.idle_timeout,
        )
        self.sessions[session_id] = transport
        assert self._tg is not None
        status: int | None = None

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._tg.start(self._serve, transport)
            await transport.handle_request(scope, receive, watch)
        finally:
            if status is None or status >= 400:
                await self._discard(transport)

    async def _serve(
        self,
        transport: StreamableHTTPServerTransport,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        session_id = transport.mcp_session_id
        assert session_id is not None
        try:
            async with transport.connect() as (read, write):
                task_status.started()
                idle = transport.idle_scope or anyio.CancelScope()
                with idle:
                    reason = await self._relay(session_id, read, write)
                    log.info("session %s: %s", session_id, reason)
                    await refuse_all(read, write, reason)
                if idle.cancelled_caught:
                    log.info("session %s idle timeout", session_id)
        finally:
            await self._discard(transport)

    async def _relay(
        self,
        session_id: str,
        read: AsyncIterable[SessionMessage | Exception],
        write: MessageWriter,
    ) -> str:
        """Relay the session; why it can serve nothing more once the upstream is gone."""
        session = ProxySession(
            self.decider, self.options, session_id=session_id, tool_filter=self.tool_filter
        )
        try:
            async with self.open_upstream() as upstream:
                await session.run(read, write, upstream)
                return f"upstream MCP server {upstream.ended()}; start a new session"
        except Exception as exc:
            log.exception("session %s: upstream failed", session_id)
            return f"upstream MCP server could not be reached: {type(exc).__name__}: {exc}"

    async def _discard(self, transport: StreamableHTTPServerTransport) -> None:
        if transport.mcp_session_id is not None:
            self.sessions.pop(transport.mcp_session_id, None)
        if not transport.is_terminated:
            with anyio.CancelScope(shield=True):
                await transport.terminate()


@dataclass
class HttpProxy:
    app: ProxyApp
    host: str
    port: int
    _server: QuietUvicornServer
    _serve_task: asyncio.Task[Any]
    _app_task: asyncio.Task[None]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.app.path}"

    async def stop(self) -> None:
        """End every session (their upstreams with them), then the listener."""
        await self.app.close()
        await self._app_task
        self._server.should_exit = True
        await self._serve_task


async def start_http_proxy(
    host: str,
    port: int,
    *,
    decider: Decider,
    options: ProxyOptions,
    open_upstream: OpenUpstream,
    path: str = "/mcp",
    max_depth: int = MAX_DEPTH,
) -> HttpProxy:
    """Listen on host:port (0 picks a free port) and serve MCP sessions at `path`."""
    app = ProxyApp(
        path=path,
        decider=decider,
        options=options,
        open_upstream=open_upstream,
        security=security_for(host),
        max_depth=max_depth,
    )
    app_task = asyncio.create_task(app.run(), name="proxy-sessions")
    await app._ready.wait()
    try:
        http = await listen_http(
            RequestBodyLimitMiddleware(app, DEFAULT_MAX_REQUEST_BODY_SIZE),
            host,
            port,
            "proxy-http",
            timeout_graceful_shutdown=2,
        )
    except BaseException:
        await app.close()
        await app_task
        raise
    return HttpProxy(app, host, http.port, http.server, http.task, app_task)
