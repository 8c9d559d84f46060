"""Run both transports on one event loop around one Runtime.

Both HTTP listeners (the decision service's API and the proxy's MCP endpoint) are uvicorn
with its pure-Python h11 protocol plus deadlines uvicorn lacks: a connection must send a
complete request head within `HEADER_TIMEOUT` of opening or of its previous response, and
a request body must be complete within `BODY_TIMEOUT` of its head, or it is closed. Idle
keep-alive connections are closed after `KEEP_ALIVE_TIMEOUT`.

The same protocol refuses requests whose body could be framed two ways (request
smuggling: a front end and this server disagreeing on where a request ends), before the
application sees them: 400 with `Connection: close`, and nothing after it on that
connection is read (RFC 9112 sections 6.1 and 6.3). What h11 already refuses (a
Transfer-Encoding other than `chunked`, several of them, differing Content-Lengths) gets
the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import grpc
import h11
import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from engine.errors import MAX_MESSAGE_CHARS, bounded
from engine.runtime import Runtime
from engine.settings import Settings
from engine.transports.grpc_server import create_server
from engine.transports.http_app import create_app
from engine.transports.tls import (
    ClientNameMiddleware,
    StartupRefused,
    check_exposure,
    exposed_without_tls,
    is_loopback,
    load_server_tls,
    with_peer_certificate,
)

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
KEEP_ALIVE_TIMEOUT = 5


def framing_problem(request: h11.Request) -> str | None:
    """Why the body of `request` (as h11 parsed its head) cannot be framed one way only."""
    names = {name for name, _ in request.headers}
    if b"transfer-encoding" not in names:
        return None
    if b"content-length" in names:
        return (
            "a request with both Content-Length and Transfer-Encoding is refused: its end "
            "could be read two ways (RFC 9112 section 6.3; request smuggling)"
        )
    if request.http_version != b"1.1":
        return (
            "Transfer-Encoding on an HTTP/1.0 request is refused: its framing is faulty "
            "(RFC 9112 section 6.1)"
        )
    return None


class StrictH11Connection(h11.Connection):
    """h11's connection, also refusing the request framings of `framing_problem`.

    A refused request raises RemoteProtocolError as h11's own refusals do (the protocol
    answers 400 and closes the connection), with `refusal` saying why.
    """

    refusal: str | None = None

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = f"invalid HTTP/1.1 request: {bounded(str(exc), 200)}"
            raise
        if isinstance(event, h11.Request):
            problem = framing_problem(event)
            if problem is not None:
                self.refusal = problem
                raise h11.RemoteProtocolError(problem)
        return event


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with deadlines for the request head and the request body.

    uvicorn arms its keep-alive timer only after a response and cancels it at the first
    byte received, so a connection that never sends a request, or trickles its head or
    body (slowloris), is held forever. Here, whenever the client is due a request head
    (h11's IDLE: a new connection, or after a response) it has `header_timeout` to finish
    it, and once the head is in, `body_timeout` to finish the body; else the connection is
    closed, which the application sees as a disconnect. The deadline runs from the state
    change, not from the last byte, so trickling does not extend it.

    Its h11 connection is a `StrictH11Connection`: a request whose framing is ambiguous
    is answered 400 (`send_400_response`, which also answers what h11 itself refuses)
    and the connection closed before anything behind it is read.
    """

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None
    _deadline_state: object = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        size = config.h11_max_incomplete_event_size
        self.conn = StrictH11Connection(
            h11.SERVER, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if size is None else size
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 (or `StrictH11Connection`) refused, in this
        service's error shape and saying why; the connection is closed after it, so
        nothing sent behind the request is read."""
        reason = getattr(self.conn, "refusal", None) or msg
        error = {"code": "BadRequest", "message": bounded(reason, MAX_MESSAGE_CHARS)}
        body = json.dumps({"error": error}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
        self.transport.write(self.conn.send(response) or b"")
        self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._track_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._track_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track_deadline()

    def _track_deadline(self) -> None:
        state = self.conn.their_state
        if self._deadline is not None and state is self._deadline_state:
            return  # still in the phase the running deadline bounds
        self._cancel_deadline()
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closing, or upgraded to a WebSocket protocol that has its own timers
        if state is h11.IDLE:
            timeout, what = self.header_timeout, "request head"
        elif state is h11.SEND_BODY:
            timeout, what = self.body_timeout, "request body"
        else:
            return
        self._deadline_state = state
        self._deadline = self.loop.call_later(timeout, self._expire, what, timeout)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._deadline_state = None

    def _expire(self, what: str, timeout: float) -> None:
        self._deadline = None
        self._deadline_state = None
        if not self.transport.is_closing():
            log.debug(
                "closing HTTP connection from %s: no %s within %s s", self.client, what, timeout
            )
            self.transport.close()


def bounded_h11(
    header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT
) -> type[BoundedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...) with these deadlines."""

    class Configured(BoundedH11Protocol):
        pass

    Configured.header_timeout = header_timeout
    Configured.body_timeout = body_timeout
    return Configured


class QuietUvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: whoever runs it stops it."""

    def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


def quiet_disconnects(app: ASGIApp) -> ASGIApp:
    """`app`, with a client gone mid-body (starlette's ClientDisconnect, raised by
    `Request.stream()`) ending its request quietly instead of as uvicorn's "Exception in
    ASGI application" traceback: there is nobody left to answer."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        except* ClientDisconnect:
            log.debug("client disconnected before its request was read: %s", scope.get("path"))

    return guarded


@dataclass
class HttpListener:
    server: QuietUvicornServer
    port: int
    task: asyncio.Task[Any]


async def listen_http(
    app: Any,
    host: str,
    port: int,
    name: str,
    *,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    **config: Any,
) -> HttpListener:
    """Serve the ASGI `app` on host:port (0 picks a free port) once it is listening.

    The protocol is always `BoundedH11Protocol` (never httptools, which uvicorn's "auto"
    would pick whenever it is installed), with these deadlines; `config` is passed on to
    uvicorn.Config (TLS: `ssl_certfile`, `ssl_keyfile`, `ssl_ca_certs`, `ssl_cert_reqs`).
    A client that disconnects mid-request is not logged as an error. On a TLS connection
    each request's scope carries the ASGI TLS extension with the verified client
    certificate (`engine.transports.tls.with_peer_certificate`).

    The socket is made here so the port is known before serving; it is created with
    IPPROTO_TCP explicitly, because asyncio sets TCP_NODELAY only on sockets that say
    so, and without it every response waits out a delayed ACK (~40 ms).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        config.setdefault("timeout_keep_alive", KEEP_ALIVE_TIMEOUT)
        server = QuietUvicornServer(
            uvicorn.Config(
                quiet_disconnects(app),
                log_level="warning",
                access_log=False,
                lifespan="off",
                http=with_peer_certificate(bounded_h11(header_timeout, body_timeout)),
                **config,
            )
        )
        task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
    except BaseException:
        sock.close()
        raise
    return HttpListener(server, bound, task)


@dataclass
class Servers:
    runtime: Runtime
    grpc_server: grpc.aio.Server
    grpc_port: int
    http_server: QuietUvicornServer
    http_port: int
    _http_task: asyncio.Task[Any]

    @property
    def http_url(self) -> str:
        scheme = "https" if self.runtime.settings.tls_cert is not None else "http"
        return f"{scheme}://{self.runtime.settings.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.runtime.settings.host}:{self.grpc_port}"

    async def stop(self) -> None:
        self.http_server.should_exit = True
        await self._http_task
        await self.grpc_server.stop(grace=1.0)
        await self.runtime.stop()


async def start_servers(settings: Settings) -> Servers:
    """Start the runtime (OPA, policy, stores) and both listeners; ports 0 pick free ones.

    Raises StartupRefused, before anything starts, when a TLS file does not load or the
    host is beyond loopback without TLS and without `insecure`.
    """
    refusal = check_exposure(settings)
    if refusal is not None:
        raise StartupRefused(refusal)
    tls = load_server_tls(settings)
    if exposed_without_tls(settings):
        log.warning(
            "serving on %s WITHOUT TLS (--insecure): anyone who can reach it can ask for "
            "decisions and read them in transit",
            settings.host,
        )
    elif tls is not None and tls.client_ca is None and not is_loopback(settings.host):
        log.warning("TLS without MCP_POLICY_TLS_CLIENT_CA: callers are not known by certificate")
    runtime = Runtime(settings)
    grpc_server: grpc.aio.Server | None = None
    try:
        await runtime.start()
        grpc_server, grpc_port = create_server(
            runtime, f"{settings.host}:{settings.grpc_port}", tls=tls
        )
        await grpc_server.start()
        app: ASGIApp = create_app(runtime)
        http_tls: dict[str, Any] = {}
        if tls is not None:
            http_tls = tls.uvicorn_config()
            if tls.client_ca is not None:
                app = ClientNameMiddleware(app, tls.client_names)
        http = await listen_http(
            app,
            settings.host,
            settings.http_port,
            "http",
            header_timeout=settings.http_header_timeout_seconds,
            body_timeout=settings.http_body_timeout_seconds,
            **http_tls,
        )
    except BaseException:
        if grpc_server is not None:
            await grpc_server.stop(grace=None)
        await runtime.stop()
        raise
    return Servers(runtime, grpc_server, grpc_port, http.server, http.port, http.task)
