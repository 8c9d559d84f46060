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
    try:
        await runtime.start()
        grpc_server, grpc_port = create_server(runtime, f"{settings.host}:{settings.grpc_port}")
        await grpc_server.start()
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
        # without it every response waits out a delayed ACK (~40 ms).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.http_port))
        http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(runtime), log_level="warning", access_log=False, lifespan="off"
        )
        http_server = QuietUvicornServer(config)
        http_task = asyncio.create_task(http_server.serve(sockets=[sock]), name="http")
        while not http_server.started:
            if http_task.done():
                http_task.result()
            await asyncio.sleep(0.01)
    except BaseException:
        await runtime.stop()
        raise
    return Servers(runtime, grpc_server, grpc_port, http_server, http_port, http_task)
