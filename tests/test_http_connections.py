"""HTTP connections that never finish a request are closed; real clients are unaffected.

Raw sockets against the decision service (started in-process, with short deadlines so the
tests are quick) and against a bare `listen_http` listener (the proxy's path): a silent
connection, a slowloris head, a stalled body, a client gone mid-body (no traceback logged),
and a keep-alive client making several requests on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest

from engine.transports.server import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    BoundedH11Protocol,
    Servers,
    listen_http,
    start_servers,
)
from tests.conftest import copy_call, settings_for

HEADER = 1.0  # the deadlines configured for these tests, in seconds
BODY = 1.0
CLOSED_WITHIN = 10.0  # generous: fails only if the server never closes

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    settings = settings_for(
        tmp_path_factory.mktemp("connections"),
        http_header_timeout_seconds=HEADER,
        http_body_timeout_seconds=BODY,
    )
    running = await start_servers(settings)
    yield running
    await running.stop()


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[Stream]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, within: float = CLOSED_WITHIN) -> bytes:
    """Everything the server sent until it closed the connection; fails if it never does."""
    received = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {within} s") from None
    return received


def request_head(method: str, path: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: raw-test"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def one_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Read one complete response (status and body) off a kept-alive connection."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    body = b""
    async with asyncio.timeout(CLOSED_WITHIN):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                assert data, "the server closed the connection before its response"
                client.receive_data(data)
            elif isinstance(event, h11.Response):
                assert event.status_code == 200, event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return body


async def slowloris(port: int, before: bytes = b"") -> None:
    """Trickle a request head, a byte every 0.3 s: far slower than HEADER allows, but
    quick enough that an idle timer restarted by every byte would never fire."""
    head = request_head("GET", "/healthz")[:-2] + b"X-Padding: " + b"a" * 200
    async with connection(port) as (reader, writer):
        if before:
            writer.write(before)
            await one_response(reader, writer)
        try:
            async with asyncio.timeout(CLOSED_WITHIN):
                for byte in head:
                    try:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        data = await asyncio.wait_for(reader.read(65536), 0.3)
                    except TimeoutError:
                        continue  # still open: send the next byte
                    except ConnectionError:
                        return
                    assert data == b"", f"the server answered an incomplete head: {data!r}"
                    return
        except TimeoutError:
            raise AssertionError(
                f"a slowloris head kept its connection {CLOSED_WITHIN} s"
            ) from None
        raise AssertionError("the whole slowloris head was accepted")


async def test_a_silent_connection_is_closed(service: Servers) -> None:
    async with connection(service.http_port) as (reader, _):
        assert await closed_by_server(reader) == b""


async def test_a_slowloris_head_is_closed(service: Servers) -> None:
    await slowloris(service.http_port)


async def test_a_slowloris_head_after_a_first_request_is_closed(service: Servers) -> None:
    # uvicorn's keep-alive timer stops at the first byte of the next request; the head
    # deadline still runs.
    await slowloris(service.http_port, before=request_head("GET", "/healthz"))


async def test_a_stalled_body_is_closed(service: Servers) -> None:
    body = json.dumps(copy_call()).encode()
    async with connection(service.http_port) as (reader, writer):
        writer.write(request_head("POST", "/v1/decide", len(body)) + body[:10])
        await writer.drain()
        received = await closed_by_server(reader)
    assert b"200 OK" not in received


async def test_a_keep_alive_client_makes_several_requests_on_one_connection(
    service: Servers,
) -> None:
    """Spread over more than HEADER: each request gets its own head deadline."""
    async with connection(service.http_port) as (reader, writer):
        client = h11.Connection(h11.CLIENT)
        for n in range(6):
            if n % 2:
                body = json.dumps(copy_call()).encode()
                head = [("Host", "127.0.0.1"), ("Content-Type", "application/json")]
                head.append(("Content-Length", str(len(body))))
                request = h11.Request(method="POST", target="/v1/decide", headers=head)
                writer.write(client.send(request) + client.send(h11.Data(data=body)))
            else:
                request = h11.Request(
                    method="GET", target="/healthz", headers=[("Host", "127.0.0.1")]
                )
                writer.write(client.send(request))
            writer.write(client.send(h11.EndOfMessage()))
            await writer.drain()
            status, body = 0, b""
            async with asyncio.timeout(CLOSED_WITHIN):
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        assert data, f"the server closed the connection at request {n}"
                        client.receive_data(data)
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
            assert status == 200, body
            if n % 2:
                assert json.loads(body)["verdict"] == "allow"
            client.start_next_cycle()
            await asyncio.sleep(HEADER * 0.4)


async def test_a_client_gone_mid_body_logs_no_traceback(
    service: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn's own loggers do not propagate to the root logger caplog listens on.
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            body = json.dumps(copy_call()).encode()
            async with connection(service.http_port) as (_, writer):
                writer.write(request_head("POST", "/v1/decide", len(body)) + body[:10])
                await writer.drain()
                await asyncio.sleep(0.2)  # the request is in the application, reading
            async with asyncio.timeout(CLOSED_WITHIN):
                while service.http_server.server_state.tasks:
                    await asyncio.sleep(0.02)
            async with httpx.AsyncClient(base_url=service.http_url, timeout=10) as client:
                answer = await client.post("/v1/decide", json=copy_call())
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert answer.status_code == 200
    assert answer.json()["verdict"] == "allow"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers 200."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_listen_http_bounds_every_listener() -> None:
    """The path the proxy's MCP listener takes: listen_http's own keywords and defaults."""
    listener = await listen_http(
        bare_app, "127.0.0.1", 0, "test-http", header_timeout=HEADER, body_timeout=BODY
    )
    try:
        protocol = listener.server.config.http_protocol_class
        assert issubclass(protocol, BoundedH11Protocol)  # never httptools, even if installed
        assert (protocol.header_timeout, protocol.body_timeout) == (HEADER, BODY)
        assert listener.server.config.timeout_keep_alive == 5
        async with connection(listener.port) as (reader, writer):
            writer.write(request_head("GET", "/"))
            assert await one_response(reader, writer) == b"ok"
            assert await closed_by_server(reader) == b""  # no next request in time
        async with connection(listener.port) as (reader, _):
            assert await closed_by_server(reader) == b""
        async with connection(listener.port) as (reader, writer):
            writer.write(request_head("POST", "/", 100) + b"x")
            assert await closed_by_server(reader) == b""
    finally:
        listener.server.should_exit = True
        await listener.task


def test_the_settings_defaults_are_the_listeners(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert settings.http_header_timeout_seconds == HEADER_TIMEOUT
    assert settings.http_body_timeout_seconds == BODY_TIMEOUT
