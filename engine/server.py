"""Run both transports on one event loop around one Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

import grpc
import uvicorn

from engine.grpc_server import create_server
from engine.http_app import create_app
from engine.runtime import Runtime
from engine.settings import Settings

log = logging.getLogger(__name__)


class QuietUvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: whoever runs it stops it."""

    def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


@dataclass
class HttpListener:
    server: QuietUvicornServer
    port: int
    task: asyncio.Task[Any]


async def listen_http(app: Any, host: str, port: int, name: str, **config: Any) -> HttpListener:
    """Serve the ASGI `app` on host:port (0 picks a free port) once it is listening.

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
        server = QuietUvicornServer(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **config)
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
        return f"http://{self.runtime.settings.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.runtime.settings.host}:{self.grpc_port}"

    async def stop(self) -> None:
        self.http_server.should_exit = True
        await self._http_task
        await self.grpc_server.stop(grace=1.0)
        await self.runtime.stop()


async def start_servers(settings: Settings) -> Servers:
    """Start the runtime (OPA, policy, stores) and both listeners; ports 0 pick free ones."""
    runtime = Runtime(settings)
    grpc_server: grpc.aio.Server | None = None
    try:
        await runtime.start()
        grpc_server, grpc_port = create_server(runtime, f"{settings.host}:{settings.grpc_port}")
        await grpc_server.start()
        http = await listen_http(create_app(runtime), settings.host, settings.http_port, "http")
    except BaseException:
        if grpc_server is not None:
            await grpc_server.stop(grace=None)
        await runtime.stop()
        raise
    return Servers(runtime, grpc_server, grpc_port, http.server, http.port, http.task)
