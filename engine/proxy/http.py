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

Before anything here sees a request, the HTTP guard every listener shares
(engine/transports/guard.py) checks it, whatever the --listen address: a foreign
`Origin` is 403 (the MCP transport's MUST), on loopback or without --auth-* a `Host` that
is not a loopback name, the listener's address or an `--allowed-host` is 421 (DNS
rebinding), and a POST that is not `application/json` is 415.

With a `ResourceServer` (`--auth-*`, see auth.py) every request to the endpoint is
authenticated first, and answered 401/403 there without a credential that passes; the
identity it proves is the principal of the session's decisions. A session belongs to the
principal that opened it: with any other credential its Mcp-Session-Id is "not found"
(404). A renewed token of the same principal goes on with the session.

Sessions speak the initialize handshake (protocol 2024-11-05 to 2025-11-25) or, with
`MCP-Protocol-Version: 2026-07-28`, the stateless protocol: every request a POST of its
own, answered on its response (JSON, or SSE when the upstream sends progress for it), no
Mcp-Session-Id. Those requests are relayed by a `StatelessRelay` per decision session:
the token's `sid` claim, else the client's `Mcp-Policy-Session` header (bound to its
credential), else one per authenticated principal, else (unauthenticated, on loopback)
one per connection. An SDK client in `auto` mode now finds 2026-07-28 (server/discover is
relayed to the upstream). Any other version gets -32022 naming the supported ones.

When the upstream ends (the child exits, or never started), a handshake session stays open
and answers every request with a JSON-RPC error saying so, until the agent deletes it or
it idles out; a stateless relay ends with it, and the next request opens a new one. The
proxy itself keeps serving new sessions.

Every open session holds an upstream (a child process each, with a command), so there are
caps, both checked before anything is started: `max_sessions` in all (then 503), and
`max_sessions_per_principal` for each principal (then 429, with a JSON-RPC error naming
the cap and how to free a place), so that one caller cannot take every place. Handshake
sessions and stateless relays count alike; the principal is the one the credential proved
(its agent and user), else, without --auth-*, the client's address. A session with no
request in flight for `idle_timeout` seconds is closed (a handshake session's id is then
404), and its place is free again; a DELETE frees it at once.

Within a handshake session a request id is one request's until it is answered: the SDK
transport keeps one response stream per id (by its text, so 7 and "7" are one id), and a
second POST with an id in use would take the first one's stream and lose its answer. Such
a POST is refused here (400, -32600 naming the id), before the transport or the relay
sees it, as is one whose id the relay still holds (see `ProxySession.in_use`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncIterable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.streamable_http import (
    GET_STREAM_KEY,
    MCP_SESSION_ID_HEADER,
    StreamableHTTPServerTransport,
    check_accept_headers,
)
from mcp.server.transport_security import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    RequestBodyLimitMiddleware,
)
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PROTOCOL_VERSION_HEADER,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    HEADER_MISMATCH,
    INVALID_REQUEST,
    PROTOCOL_VERSION_META_KEY,
    UNSUPPORTED_PROTOCOL_VERSION,
    ErrorData,
    JSONRPCError,
    JSONRPCMessage,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from engine.identity.base import Identity
from engine.proxy.auth import (
    ListenRefused,
    Owner,
    ResourceServer,
    check_exposure,
    owner_of,
)
from engine.proxy.core import (
    REQUEST,
    UPSTREAM_CLOSED,
    Frame,
    MalformedMessage,
    MessageWriter,
    ProxyOptions,
    ProxySession,
    Upstream,
    error_response,
    id_in_use,
    id_key,
)
from engine.proxy.decider import Decider
from engine.proxy.listing import ToolFilter
from engine.proxy.screen import MAX_DEPTH, screen_line
from engine.transports.guard import HttpGuard, listener_guard
from engine.transports.server import QuietUvicornServer, listen_http
from engine.transports.tls import is_loopback

log = logging.getLogger(__name__)

SESSION_IDLE_TIMEOUT = 30 * 60.0
MAX_SESSIONS = 1000
MAX_SESSIONS_PER_PRINCIPAL = 10

OpenUpstream = Callable[[], AbstractAsyncContextManager[Upstream]]
# Whose sessions a new one counts against (see `session_principal`).
SessionPrincipal = tuple[str, ...]

# 2026-07-28: the header a client may send to name its decision session (see
# `stateless_session`), and how its value may look.
STATELESS_SESSION_HEADER = "mcp-policy-session"
_SESSION_VALUE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
SSE_PING_INTERVAL = 15.0
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]
STATELESS_ONLY_REQUESTS = (
    "Invalid Request: at 2026-07-28 a POST carries one request (or a notification); "
    "there is no server request for a response to answer"
)


def _json_error(status: int, code: int, message: str, data: Any = None) -> Response:
    body = JSONRPCError(
        jsonrpc="2.0", id=None, error=ErrorData(code=code, message=message, data=data)
    )
    content = body.model_dump(mode="json", by_alias=True, exclude_none=True)
    content["id"] = None  # JSON-RPC 2.0: an error that answers no request says id null
    return Response(json.dumps(content), status_code=status, media_type="application/json")


def session_principal(scope: Scope, identity: Identity | None) -> SessionPrincipal:
    """Whose place a new session takes (`max_sessions_per_principal`): the principal the
    credential proved, its agent and user (every credential of theirs counts together),
    or the credential when it proves neither; without one (no --auth-*: loopback, or
    --insecure) the client's address."""
    if identity is not None:
        if identity.agent_id or identity.user_id:
            return ("principal", identity.agent_id or "", identity.user_id or "")
        return ("credential", identity.method, identity.subject)
    client = scope.get("client") or ("?", 0)
    return ("address", str(client[0]))


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` (read already), then the connection's own messages."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _malformed(malformed: MalformedMessage) -> Response:
    """HTTP 400 with the JSON-RPC error for a POST body that did not pass the screen."""
    body = JSONRPCError(jsonrpc="2.0", id=malformed.request_id, error=malformed.error)
    return Response(
        body.model_dump_json(by_alias=True, exclude_unset=True),
        status_code=HTTPStatus.BAD_REQUEST,
        media_type="application/json",
    )


async def _read_body(
    scope: Scope, receive: Receive, send: Send, *, max_body: int, max_depth: int
) -> tuple[bytes, Frame] | None:
    """Read a POST body and screen it: the bytes and the message, or None when it did not
    pass and was answered here (or the client went away)."""
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
    screened = screen_line(body, max_depth=max_depth)
    if isinstance(screened, MalformedMessage):
        log.warning("malformed message from the agent: %s", screened.error.message)
        await _malformed(screened)(scope, receive, send)
        return None
    return body, screened


async def read_screened(
    scope: Scope, receive: Receive, send: Send, *, max_body: int, max_depth: int
) -> Frame | None:
    """The screened message of a POST body, or None when it was answered here."""
    read = await _read_body(scope, receive, send, max_body=max_body, max_depth=max_depth)
    return None if read is None else read[1]


async def screen_post(
    scope: Scope, receive: Receive, send: Send, *, max_body: int, max_depth: int
) -> Receive | None:
    """Read a POST body and screen it; answer it here when it does not pass.

    Returns the `receive` to hand on (it replays the same bytes, then the connection's
    own messages), or None when the request was answered (or the client went away)."""
    read = await _read_body(scope, receive, send, max_body=max_body, max_depth=max_depth)
    if read is None:
        return None
    return _replaying(read[0], receive)


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


def _rejection(rejection: InboundLadderRejection, request_id: RequestId) -> Response:
    """A 2026-07-28 envelope rejection, with the HTTP status the SDK's servers give it."""
    return _message_response(
        JSONRPCError(
            jsonrpc="2.0",
            id=request_id,
            error=ErrorData(code=rejection.code, message=rejection.message, data=rejection.data),
        )
    )


def _message_response(message: JSONRPCResponse | JSONRPCError) -> Response:
    status = 200
    if isinstance(message, JSONRPCError):
        status = ERROR_CODE_HTTP_STATUS.get(message.error.code, 200)
    return Response(
        message.model_dump_json(by_alias=True, exclude_unset=True),
        status_code=status,
        media_type="application/json",
    )


def _sse_event(message: JSONRPCMessage) -> bytes:
    data = message.model_dump_json(by_alias=True, exclude_unset=True)
    return f"event: message\r\ndata: {data}\r\n\r\n".encode()


def _digest(owner: Owner) -> str:
    return hashlib.sha256(json.dumps(owner).encode()).hexdigest()[:16]


def stateless_session(
    scope: Scope, headers: dict[str, str], identity: Identity | None
) -> str | None:
    """The decision session of a 2026-07-28 request (what session-scoped limits and
    approvals are bound to); None when the client's session header is unusable.

    1. the token's `sid` claim (the issuer's session), when it has one;
    2. else the client's `Mcp-Policy-Session` header, bound to the credential's owner
       (one principal can never name another's session);
    3. else one session per authenticated principal;
    4. else (unauthenticated, on loopback) one per connection.
    """
    if identity is not None and identity.session_id:
        return identity.session_id
    owner = owner_of(identity)
    value = headers.get(STATELESS_SESSION_HEADER)
    if value is not None:
        if not _SESSION_VALUE.fullmatch(value):
            return None
        return value if owner is None else f"{value}@{_digest(owner)}"
    if owner is not None:
        return f"principal-{_digest(owner)}"
    client = scope.get("client") or ("?", 0)
    return f"connection-{client[0]}-{client[1]}"


@dataclass
class _Exchange:
    """One 2026-07-28 request in flight: its own id, and what comes back for it."""

    own_id: str
    request_id: RequestId
    send: MemoryObjectSendStream[JSONRPCMessage]
    receive: MemoryObjectReceiveStream[JSONRPCMessage]


class StatelessRelay:
    """The 2026-07-28 requests of one decision session, relayed by one `ProxySession` to
    one upstream connection (opened with the first request, closed after it idles).

    Each request goes in under an id of the relay's own (clients may reuse ids across
    their connections) and its answer comes back with the client's id. Notifications the
    upstream sends about a request (progress) go on that request's response as SSE, when
    the client accepts it; others have no stream to go on at 2026-07-28 and are dropped.
    A client that closes its response cancels the request.
    """

    def __init__(
        self,
        app: ProxyApp,
        key: tuple[Owner | None, str],
        session_id: str,
        identity: Identity | None,
        version: str,
        principal: SessionPrincipal,
    ) -> None:
        self.app = app
        self.key = key
        self.principal = principal
        self.version = version
        options = app.options
        if options.server_name is None and app.server_name is not None:
            options = replace(options, server_name=app.server_name)
        self.session = ProxySession(
            app.decider,
            options,
            session_id=session_id,
            tool_filter=app.tool_filter,
            identity=identity,
        )
        self._to_session, self._messages = anyio.create_memory_object_stream[
            SessionMessage | Exception
        ](math.inf)
        self._exchanges: dict[RequestId, _Exchange] = {}
        self._ids = itertools.count(1)
        self.ready = anyio.Event()
        self.closing = False
        self.closed: str | None = None
        self._in_flight = 0
        self._used = anyio.current_time()

    @property
    def server_name(self) -> str | None:
        return self.session.server_name

    async def run(self) -> None:
        reason = "stopped"
        try:
            async with self.app.open_upstream() as upstream, anyio.create_task_group() as tg:
                tg.start_soon(self._learn_server_name)
                tg.start_soon(self._close_when_idle)
                await self.session.run(self._messages, self, upstream)
                reason = f"upstream MCP server {upstream.ended()}"
                tg.cancel_scope.cancel()
        except Exception as exc:
            log.exception("stateless session %s: upstream failed", self.session.session_id)
            reason = f"upstream MCP server could not be reached: {type(exc).__name__}: {exc}"
        finally:
            self.closing = True
            self.closed = reason
            self.ready.set()
            self.app._forget(self)
            self._to_session.close()
            self._messages.close()
            for exchange in list(self._exchanges.values()):
                error = error_response(exchange.request_id, UPSTREAM_CLOSED, reason)
                exchange.send.send_nowait(error)
                exchange.send.close()
            self._exchanges.clear()
            log.info("stateless session %s: %s", self.session.session_id, reason)

    async def _close_when_idle(self) -> None:
        timeout = self.app.idle_timeout
        if timeout is None:
            return
        while True:
            await anyio.sleep(min(timeout, 30.0))
            if self._in_flight == 0 and anyio.current_time() - self._used >= timeout:
                self.closing = True
                self.app._forget(self)
                self._to_session.close()  # ends the session, then its upstream
                return

    async def _learn_server_name(self) -> None:
        """Ready once the server's name is known (a call cannot be decided without it):
        when neither the options nor another session know it, the upstream is asked
        `server/discover` first, as a client that never sends it would not."""
        try:
            if self.server_name is None:
                await self._discover()
        finally:
            self.ready.set()

    async def _discover(self) -> None:
        version = self.version
        request = JSONRPCRequest(
            jsonrpc="2.0",
            id="discover",
            method="server/discover",
            params={
                "_meta": {
                    PROTOCOL_VERSION_META_KEY: version,
                    CLIENT_CAPABILITIES_META_KEY: {},
                }
            },
        )
        exchange = self._start(request)
        if exchange is None:
            return
        with anyio.move_on_after(self.app.options.upstream_timeout):
            async for _ in exchange.receive:
                pass
        self._finish(exchange)

    def _start(self, request: JSONRPCRequest) -> _Exchange | None:
        if self.closed is not None:
            return None
        own_id = f"mcp-policy-{next(self._ids)}"
        send, receive = anyio.create_memory_object_stream[JSONRPCMessage](math.inf)
        exchange = _Exchange(own_id, request.id, send, receive)
        self._exchanges[own_id] = exchange
        self._in_flight += 1
        self._used = anyio.current_time()
        try:
            self._to_session.send_nowait(SessionMessage(request.model_copy(update={"id": own_id})))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            del self._exchanges[own_id]
            self._in_flight -= 1
            return None
        return exchange

    def _finish(self, exchange: _Exchange) -> None:
        if self._exchanges.get(exchange.own_id) is exchange:
            del self._exchanges[exchange.own_id]  # (an answer that never came)
        exchange.send.close()
        exchange.receive.close()
        self._in_flight -= 1
        self._used = anyio.current_time()
        if self.app.server_name is None and self.server_name is not None:
            self.app.server_name = self.server_name

    def _cancel(self, own_id: RequestId) -> None:
        """The client closed its response: the request is cancelled."""
        if self._exchanges.pop(own_id, None) is None:
            return
        cancelled = JSONRPCNotification(
            jsonrpc="2.0",
            method="notifications/cancelled",
            params={"requestId": own_id, "reason": "the client closed the request"},
        )
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._to_session.send_nowait(SessionMessage(cancelled))

    async def send(self, item: SessionMessage, /) -> None:
        """What the session sends the agent: to the exchange it belongs to."""
        message = item.message
        if isinstance(message, JSONRPCResponse | JSONRPCError):
            exchange = self._exchanges.pop(message.id, None) if message.id is not None else None
            if exchange is None:
                log.debug("dropped an answer nobody waits for: %r", message.id)
                return
            exchange.send.send_nowait(message.model_copy(update={"id": exchange.request_id}))
            exchange.send.close()
            return
        if isinstance(message, JSONRPCNotification):
            related = (
                item.metadata.related_request_id
                if isinstance(item.metadata, ServerMessageMetadata)
                else None
            )
            exchange = self._exchanges.get(related) if related is not None else None
            if exchange is not None:
                exchange.send.send_nowait(message)
            else:
                log.debug("dropped %s: no request to send it with", message.method)
            return
        log.warning(
            "dropped a %s request from the upstream: 2026-07-28 has no way to ask the client",
            message.method,
        )

    async def answer(
        self,
        request: JSONRPCRequest,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        has_json: bool,
        has_sse: bool,
    ) -> None:
        """Relay `request` and answer it: JSON, or SSE once a notification for it comes
        (or, with SSE accepted, once it has taken SSE_PING_INTERVAL: pings keep it open)."""
        exchange = self._start(request)
        if exchange is None:
            reason = self.closed or "the session is closing; send the request again"
            await _message_response(error_response(request.id, UPSTREAM_CLOSED, reason))(
                scope, receive, send
            )
            return
        own_id = exchange.own_id
        answered = False
        streaming = False
        try:
            async with anyio.create_task_group() as tg:

                async def hang_up() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(hang_up)
                while not answered:
                    item: JSONRPCMessage | None = None
                    with anyio.move_on_after(SSE_PING_INTERVAL if has_sse else math.inf):
                        try:
                            item = await exchange.receive.receive()
                        except anyio.EndOfStream:
                            item = error_response(
                                request.id, UPSTREAM_CLOSED, self.closed or "session closed"
                            )
                    if isinstance(item, JSONRPCResponse | JSONRPCError):
                        if streaming:
                            await send(
                                {
                                    "type": "http.response.body",
                                    "body": _sse_event(item),
                                    "more_body": False,
                                }
                            )
                        else:
                            await _message_response(item)(scope, receive, send)
                        answered = True
                        continue
                    if item is not None and not has_sse:
                        continue  # a notification the client cannot take
                    if not streaming:
                        await send(
                            {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                        )
                        streaming = True
                    body = _sse_event(item) if item is not None else b": ping\r\n\r\n"
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                tg.cancel_scope.cancel()
        finally:
            if not answered:
                self._cancel(own_id)
            self._finish(exchange)


class ProxyApp:
    """The ASGI app: MCP sessions at `path`, each relayed to its own upstream."""

    def __init__(
        self,
        *,
        path: str,
        decider: Decider,
        options: ProxyOptions,
        open_upstream: OpenUpstream,
        idle_timeout: float | None = SESSION_IDLE_TIMEOUT,
        max_body: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        max_depth: int = MAX_DEPTH,
        auth: ResourceServer | None = None,
        stateless: bool = True,
        max_sessions: int = MAX_SESSIONS,
        max_sessions_per_principal: int = MAX_SESSIONS_PER_PRINCIPAL,
    ) -> None:
        self.path = path
        self.max_sessions = max_sessions
        self.max_sessions_per_principal = max_sessions_per_principal
        self.auth = auth
        self.stateless = stateless
        self.decider = decider
        self.options = options
        self.open_upstream = open_upstream
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.max_depth = max_depth
        self.tool_filter = ToolFilter(decider)
        self.sessions: dict[str, StreamableHTTPServerTransport] = {}
        # Who opened each session (None: nobody authenticated), and its relay.
        self._owners: dict[str, Owner | None] = {}
        self._relays: dict[str, ProxySession] = {}
        # Whose place each session takes, and the ids of its POSTs in the transport.
        self._principals: dict[str, SessionPrincipal] = {}
        self._in_flight: dict[str, set[str]] = {}
        # 2026-07-28: one relay per (owner, decision session), see StatelessRelay.
        self._stateless: dict[tuple[Owner | None, str], StatelessRelay] = {}
        self.server_name = options.server_name  # learnt from any session, for new ones
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
        if self.auth is not None and self.auth.serves(scope["path"]):
            await self.auth.metadata_response(scope)(scope, receive, send)
            return
        if scope["path"].rstrip("/") != self.path.rstrip("/"):
            await Response("Not Found", status_code=404)(scope, receive, send)
            return
        identity: Identity | None = None
        if self.auth is not None:
            checked = await self.auth.authenticate(scope)
            if isinstance(checked, Response):
                await checked(scope, receive, send)
                return
            identity = checked
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        version = headers.get(MCP_PROTOCOL_VERSION_HEADER)
        if version is not None and version in MODERN_PROTOCOL_VERSIONS and self.stateless:
            await self._stateless_request(scope, receive, send, identity)
            return
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            supported = list(HANDSHAKE_PROTOCOL_VERSIONS)
            if self.stateless:
                supported += MODERN_PROTOCOL_VERSIONS
            response = _json_error(
                HTTPStatus.BAD_REQUEST,
                UNSUPPORTED_PROTOCOL_VERSION,
                f"protocol version {version} is not supported by this proxy",
                {"supported": supported, "requested": version},
            )
            await response(scope, receive, send)
            return
        session_id = headers.get(MCP_SESSION_ID_HEADER)
        if session_id is not None:
            transport = self.sessions.get(session_id)
            if transport is not None and self._owners.get(session_id) != owner_of(identity):
                # A session is only ever used with the credential (the principal) that
                # opened it: to anyone else it does not exist.
                log.warning("refused session %s to another credential", session_id[:64])
                transport = None
            if transport is None:
                await _json_error(404, INVALID_REQUEST, "Session not found")(scope, receive, send)
                return
            relay = self._relays.get(session_id)
            if relay is not None:
                relay.identity = identity  # the same principal, maybe a renewed token
            held: str | None = None
            if scope["method"] == "POST":
                read = await _read_body(
                    scope, receive, send, max_body=self.max_body, max_depth=self.max_depth
                )
                if read is None:
                    return
                body, frame = read
                if frame.kind == REQUEST:
                    held = self._hold_id(session_id, frame)
                    if held is None:
                        log.warning("refused a POST whose request id is in use in its session")
                        refused = MalformedMessage(
                            ErrorData(code=INVALID_REQUEST, message=id_in_use(frame.id)), frame.id
                        )
                        await _malformed(refused)(scope, receive, send)
                        return
                receive = _replaying(body, receive)
            try:
                await transport.handle_request(scope, receive, send)
            finally:
                if held is not None and session_id in self._in_flight:
                    self._in_flight[session_id].discard(held)
            if transport.is_terminated:
                self._unlist(session_id)
            return
        if scope["method"] != "POST":
            response = _json_error(400, INVALID_REQUEST, "Bad Request: Missing session ID")
            await response(scope, receive, send)
            return
        screened = await self._screen(scope, receive, send)
        if screened is None:
            return
        await self._open_session(scope, screened, send, identity)

    # 2026-07-28: every request a self-contained POST.

    async def _stateless_request(
        self, scope: Scope, receive: Receive, send: Send, identity: Identity | None
    ) -> None:
        request = Request(scope, receive)
        if scope["method"] != "POST":
            response = Response(status_code=405, headers={"Allow": "POST"})
            await response(scope, receive, send)
            return
        has_json, has_sse = check_accept_headers(request)
        if not (has_json or has_sse):
            await Response(status_code=406)(scope, receive, send)
            return
        screened = await read_screened(
            scope, receive, send, max_body=self.max_body, max_depth=self.max_depth
        )
        if screened is None:
            return
        message = screened.model
        if isinstance(message, JSONRPCNotification):
            # No client-to-server notification means anything at 2026-07-28 (a client
            # cancels by closing its request's response): acknowledged, as the SDK does.
            await Response(status_code=202)(scope, receive, send)
            return
        if not isinstance(message, JSONRPCRequest):
            await _json_error(400, INVALID_REQUEST, STATELESS_ONLY_REQUESTS)(scope, receive, send)
            return
        raw_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        duplicated = find_duplicated_routing_header(raw_headers)
        if duplicated is not None:
            rejection = InboundLadderRejection(
                code=HEADER_MISMATCH, message=f"{duplicated} header appears more than once"
            )
            await _rejection(rejection, message.id)(scope, receive, send)
            return
        verdict = classify_inbound_request(screened.value, headers=dict(raw_headers))
        if isinstance(verdict, InboundLadderRejection):
            await _rejection(verdict, message.id)(scope, receive, send)
            return
        session_id = stateless_session(scope, dict(raw_headers), identity)
        if session_id is None:
            await _json_error(
                400,
                INVALID_REQUEST,
                f"{STATELESS_SESSION_HEADER} must be 1-128 letters, digits or ._:@-",
            )(scope, receive, send)
            return
        principal = session_principal(scope, identity)
        relay = await self._stateless_relay(
            session_id, identity, verdict.protocol_version, principal
        )
        if isinstance(relay, Response):
            await relay(scope, receive, send)
            return
        await relay.answer(message, scope, receive, send, has_json=has_json, has_sse=has_sse)

    async def _stateless_relay(
        self, session_id: str, identity: Identity | None, version: str, principal: SessionPrincipal
    ) -> StatelessRelay | Response:
        """The relay of (this credential's owner, `session_id`), started when new."""
        key = (owner_of(identity), session_id)
        relay = self._stateless.get(key)
        if relay is None or relay.closing:
            refused = self._refuse_new(principal)
            if refused is not None:
                return refused
            relay = StatelessRelay(self, key, session_id, identity, version, principal)
            self._stateless[key] = relay
            assert self._tg is not None
            self._tg.start_soon(relay.run, name=f"stateless session {session_id[:64]}")
        await relay.ready.wait()
        relay.session.identity = identity  # the same owner, maybe a renewed token
        return relay

    def _forget(self, relay: StatelessRelay) -> None:
        if self._stateless.get(relay.key) is relay:
            del self._stateless[relay.key]

    def _refuse_new(self, principal: SessionPrincipal) -> Response | None:
        """The answer that refuses `principal` a new session (or stateless relay), or None
        when it may open one. The caller opens it with no await in between, so that
        concurrent requests can never open more than the caps allow."""
        if self._stop.is_set():
            return _json_error(503, INVALID_REQUEST, "The proxy is stopping")
        cap = self.max_sessions_per_principal
        held = sum(1 for p in self._principals.values() if p == principal) + sum(
            1 for r in self._stateless.values() if r.principal == principal
        )
        if held >= cap:
            idle = self.idle_timeout
            waiting = f"{idle:g} s" if idle is not None else "ever"
            log.warning("refused a new session: %s has %d of %d open", principal[0], held, cap)
            return _json_error(
                HTTPStatus.TOO_MANY_REQUESTS,
                INVALID_REQUEST,
                f"Too many open sessions: at most {cap} per principal at once "
                f"(--max-sessions-per-principal), and this one has {held}. To free a place, "
                "close a session you no longer use (HTTP DELETE with its Mcp-Session-Id), or "
                f"wait until one idles out (no request for {waiting}; a 2026-07-28 decision "
                "session has no id to DELETE and closes only so, so reuse one: the same "
                "Mcp-Policy-Session header). Nothing was started for this request.",
                {
                    "max_sessions_per_principal": cap,
                    "open_sessions": held,
                    "idle_timeout_seconds": idle,
                },
            )
        if len(self.sessions) + len(self._stateless) >= self.max_sessions:
            return _json_error(503, INVALID_REQUEST, "Too many open sessions")
        return None

    def _hold_id(self, session_id: str, frame: Frame) -> str | None:
        """Take the request id of a POST in session `session_id` for as long as the
        transport serves it; None when it is in use (its key otherwise)."""
        in_flight = self._in_flight.get(session_id)
        if in_flight is None:  # the session ended while the body was read
            in_flight = set()
        key = id_key(frame.id)
        relay = self._relays.get(session_id)
        if (
            key == GET_STREAM_KEY  # the transport's key for the GET stream
            or key in in_flight
            or (relay is not None and relay.in_use(frame.id))
        ):
            return None
        in_flight.add(key)
        return key

    def _unlist(self, session_id: str) -> None:
        """A terminated (deleted) session takes no new requests, nor a place."""
        self.sessions.pop(session_id, None)
        self._principals.pop(session_id, None)

    async def _screen(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        return await screen_post(
            scope, receive, send, max_body=self.max_body, max_depth=self.max_depth
        )

    async def _open_session(
        self, scope: Scope, receive: Receive, send: Send, identity: Identity | None
    ) -> None:
        principal = session_principal(scope, identity)
        refused = self._refuse_new(principal)
        if refused is not None:
            await refused(scope, receive, send)
            return
        session_id = uuid.uuid4().hex
        transport = StreamableHTTPServerTransport(
            mcp_session_id=session_id,
            idle_timeout=self.idle_timeout,
        )
        self.sessions[session_id] = transport
        self._owners[session_id] = owner_of(identity)
        self._principals[session_id] = principal
        self._in_flight[session_id] = set()
        assert self._tg is not None
        status: int | None = None

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._tg.start(self._serve, transport, identity)
            await transport.handle_request(scope, receive, watch)
        finally:
            if status is None or status >= 400:
                await self._discard(transport)

    async def _serve(
        self,
        transport: StreamableHTTPServerTransport,
        identity: Identity | None,
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
                    reason = await self._relay(session_id, read, write, identity)
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
        identity: Identity | None,
    ) -> str:
        """Relay the session; why it can serve nothing more once the upstream is gone."""
        session = ProxySession(
            self.decider,
            self.options,
            session_id=session_id,
            tool_filter=self.tool_filter,
            identity=identity,
        )
        self._relays[session_id] = session
        try:
            async with self.open_upstream() as upstream:
                await session.run(read, write, upstream)
                return f"upstream MCP server {upstream.ended()}; start a new session"
        except Exception as exc:
            log.exception("session %s: upstream failed", session_id)
            return f"upstream MCP server could not be reached: {type(exc).__name__}: {exc}"

    async def _discard(self, transport: StreamableHTTPServerTransport) -> None:
        if transport.mcp_session_id is not None:
            self._unlist(transport.mcp_session_id)
            self._owners.pop(transport.mcp_session_id, None)
            self._relays.pop(transport.mcp_session_id, None)
            self._in_flight.pop(transport.mcp_session_id, None)
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
    auth: ResourceServer | None = None,
    insecure: bool = False,
    stateless: bool = True,
    idle_timeout: float = SESSION_IDLE_TIMEOUT,
    max_sessions: int = MAX_SESSIONS,
    max_sessions_per_principal: int = MAX_SESSIONS_PER_PRINCIPAL,
    allowed_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
) -> HttpProxy:
    """Listen on host:port (0 picks a free port) and serve MCP sessions at `path`.

    Every request passes the HTTP guard first (engine/transports/guard.py), whatever the
    address: an `Origin` must be the listener's own or in `allowed_origins`; on loopback
    or without `auth`, `Host` must be a loopback name, the listener's address or in
    `allowed_hosts`; a POST must be `application/json`.

    With `auth` (started) every request needs the bearer credential it checks. Without
    it only a loopback host is served, unless `insecure` (ListenRefused otherwise). At
    most `max_sessions` sessions are open at once, `max_sessions_per_principal` of them
    for one principal; a session idle for `idle_timeout` seconds is closed."""
    refused = check_exposure(host, authenticated=auth is not None, insecure=insecure)
    if refused is not None:
        raise ListenRefused(refused)
    if insecure and auth is None and not is_loopback(host):
        log.warning("serving MCP on %s without authentication (--insecure)", host)
    app = ProxyApp(
        path=path,
        decider=decider,
        options=options,
        open_upstream=open_upstream,
        max_depth=max_depth,
        auth=auth,
        stateless=stateless,
        idle_timeout=idle_timeout,
        max_sessions=max_sessions,
        max_sessions_per_principal=max_sessions_per_principal,
    )
    app_task = asyncio.create_task(app.run(), name="proxy-sessions")
    await app._ready.wait()
    try:
        guard = listener_guard(
            host,
            authenticated=auth is not None,
            allowed_origins=allowed_origins,
            allowed_hosts=allowed_hosts,
            origins_setting="--allowed-origin",
            hosts_setting="--allowed-host",
        )
        http = await listen_http(
            HttpGuard(RequestBodyLimitMiddleware(app, DEFAULT_MAX_REQUEST_BODY_SIZE), guard),
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
