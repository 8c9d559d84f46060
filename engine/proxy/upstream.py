"""Connections to the real MCP server: a child process over stdio, or a streamable HTTP URL.

Both yield an `Upstream` (see core.py): the server's messages, a way to send, and why it
ended. The child transport is the proxy's own rather than the SDK's `stdio_client`
because the proxy must see the child's exit status (to exit with it) and signal it; it
frames messages exactly as the SDK does (one JSON-RPC message per line). A line is parsed
once (`pydantic_core.from_json`, the parser the SDK's models use) and relayed as it came
when the SDK's models would read it as exactly what was parsed (see `core.kind_of`);
otherwise the models read it (`mcp_types.jsonrpc_message_adapter`) and the agent gets
what they write. The HTTP one is the SDK's `streamable_http_client`, with upstream
headers (`--header`) on every request and the per-message protocol headers a
message-level relay has to supply itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import anyio
import httpx2
import pydantic_core
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
)
from mcp.shared.message import ClientMessageMetadata, SessionMessage
from mcp_types import (
    PROTOCOL_VERSION_META_KEY,
    JSONRPCMessage,
    JSONRPCNotification,
    JSONRPCRequest,
    jsonrpc_message_adapter,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from engine.proxy.core import Frame, MessageWriter, UpstreamClosed

log = logging.getLogger(__name__)

# After the child's stdin closes: how long it gets to exit, then after SIGTERM to its group.
EXIT_GRACE = 2.0
KILL_GRACE = 2.0
GROUP_POLL = 0.05
UPSTREAM_UNREACHABLE = -32000
READ_SIZE = 64 * 1024


def encode(message: JSONRPCMessage) -> bytes:
    """One message as a line of the stdio transport."""
    return (message.model_dump_json(by_alias=True, exclude_unset=True) + "\n").encode()


def parse_line(line: bytes) -> Frame | Exception:
    """One line from the server: the frame, or why it is not a JSON-RPC message."""
    try:
        value = pydantic_core.from_json(line, allow_inf_nan=False)
    except ValueError:
        pass  # (NaN and the like: the models read it, as they always have)
    else:
        frame = Frame.parsed(value, line)
        if frame is not None:
            return frame
    try:
        return Frame.of(jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        return exc


async def read_lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited lines of `stream` until it ends (a last unterminated line too),
    in time linear in a line's length however many reads it takes."""
    pending: list[bytes] = []
    while chunk := await stream.read(READ_SIZE):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            line = chunk[start:end]
            if pending:
                pending.append(line)
                line = b"".join(pending)
                pending.clear()
            start = end + 1
            if line and not line.isspace():
                yield line
        if start < len(chunk):
            pending.append(chunk[start:] if start else chunk)
    line = b"".join(pending)
    if line and not line.isspace():
        yield line


def exit_code(returncode: int | None) -> int:
    """A process status as a shell reports it: 128 + N for death by signal N."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode


def describe_status(returncode: int | None) -> str:
    if returncode is None:
        return "closed its stdout"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class ChildUpstream:
    """An MCP server run as a child process, spoken to over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._messages: AsyncIterator[Frame | Exception] | None = None

    @property
    def messages(self) -> AsyncIterable[Frame | Exception]:
        """The child's lines, read as they come (one reader: the first to ask)."""
        if self._messages is None:
            self._messages = self._read()
        return self._messages

    async def _read(self) -> AsyncIterator[Frame | Exception]:
        stdout = self.process.stdout
        assert stdout is not None
        with contextlib.suppress(OSError):
            async for line in read_lines(stdout):
                yield parse_line(line)
        # Its stdout is closed: let it finish exiting, so the status can be reported.
        await self.wait_exit(EXIT_GRACE)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def send(self, message: Frame) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        if stdin.is_closing():
            raise UpstreamClosed(self.ended())
        try:
            # Into the pipe's buffer in order; drain() waits only while the child does
            # not read.
            stdin.write(message.line())
            await stdin.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise UpstreamClosed(self.ended()) from exc

    def negotiated(self, protocol_version: str) -> None:
        """Nothing to do: stdio carries no per-message headers."""

    def ended(self) -> str:
        return describe_status(self.process.returncode)

    def send_signal(self, signum: int) -> None:
        """Pass a signal the proxy received on to the child."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.Signals(signum))

    async def wait_exit(self, timeout: float) -> bool:
        """Wait until the child has exited (at most `timeout` s); whether it did."""
        with anyio.move_on_after(timeout):
            await self.process.wait()
        return self.process.returncode is not None


@contextlib.asynccontextmanager
async def open_child(
    command: list[str], env: dict[str, str] | None = None
) -> AsyncIterator[ChildUpstream]:
    """Run `command` (with the proxy's environment, or `env`) and relay its stdio.

    On exit its stdin is closed; it gets EXIT_GRACE seconds to exit, then its process
    group is terminated. Raises OSError when the command cannot be started.
    """
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        env=dict(os.environ) if env is None else env,
        start_new_session=True,
        limit=READ_SIZE,
    )
    child = ChildUpstream(process)
    try:
        yield child
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(child)


async def _stop(child: ChildUpstream) -> None:
    process = child.process
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    if not await child.wait_exit(EXIT_GRACE):
        await _terminate_group(process, KILL_GRACE)
        if not await child.wait_exit(KILL_GRACE):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _terminate_group(process: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM the child's process group (it leads one: start_new_session), wait up to
    `timeout` for it to go, then SIGKILL what is left (as the SDK's stdio client does)."""
    pgid = process.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        log.warning("no permission to signal some of process group %d", pgid)
    with anyio.move_on_after(timeout):
        while _group_alive(pgid):
            await anyio.sleep(GROUP_POLL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _ErrorsAsResponses(httpx2.AsyncBaseTransport):
    """Turns a failure to reach the upstream into an HTTP 502 carrying a JSON-RPC error.

    The SDK's streamable HTTP client lets a connection error escape from the request's
    task and take the whole client down; as a 502 with a JSON-RPC error body it answers
    just that request (with its own id), and the next request tries again.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            return await self._inner.handle_async_request(request)
        except httpx2.TransportError as exc:
            log.warning("upstream %s unreachable: %s", self._url, exc)
            body = {
                "jsonrpc": "2.0",
                "id": None,
                "error": {
                    "code": UPSTREAM_UNREACHABLE,
                    "message": f"upstream MCP server {self._url} unreachable: "
                    f"{type(exc).__name__}: {exc}",
                },
            }
            return httpx2.Response(502, json=body, request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class HttpUpstream:
    """An MCP server at a streamable HTTP URL."""

    url: str
    _read: AsyncIterable[SessionMessage | Exception]
    _write: MessageWriter
    _version: str | None = None

    @property
    def messages(self) -> AsyncIterable[SessionMessage | Exception]:
        return self._read

    def negotiated(self, protocol_version: str) -> None:
        self._version = protocol_version

    def headers_for(self, message: JSONRPCMessage) -> dict[str, str]:
        """MCP-Protocol-Version (and, on 2026-07-28, Mcp-Method / Mcp-Name) for `message`.

        The SDK's client session stamps these itself; a relay has only the message, so
        the version comes from the handshake or from the message's own `_meta`.
        """
        headers: dict[str, str] = {}
        if not isinstance(message, JSONRPCRequest | JSONRPCNotification):
            if self._version is not None:
                headers[MCP_PROTOCOL_VERSION_HEADER] = self._version
            return headers
        params = message.params or {}
        meta = params.get("_meta")
        version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
        if not isinstance(version, str):
            version = self._version
        if version is None or message.method == "initialize":
            return headers
        headers[MCP_PROTOCOL_VERSION_HEADER] = version
        if version in MODERN_PROTOCOL_VERSIONS:
            headers[MCP_METHOD_HEADER] = message.method
            name_key = NAME_BEARING_METHODS.get(message.method)
            name = params.get(name_key) if name_key is not None else None
            if isinstance(name, str):
                headers[MCP_NAME_HEADER] = encode_header_value(name)
        return headers

    async def send(self, message: Frame) -> None:
        model = message.model
        metadata = ClientMessageMetadata(headers=self.headers_for(model))
        try:
            await self._write.send(SessionMessage(model, metadata))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise UpstreamClosed(self.ended()) from exc

    def ended(self) -> str:
        return f"at {self.url} closed the connection"


@contextlib.asynccontextmanager
async def open_http(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[HttpUpstream]:
    """Connect to the MCP server at `url`, sending `headers` (upstream auth) every time."""
    client = httpx2.AsyncClient(
        headers=headers or {},
        # The SDK's defaults: 30 s, and 300 s to read (a response stream may stay open).
        timeout=httpx2.Timeout(30.0, read=300.0),
        transport=_ErrorsAsResponses(url),
    )
    async with client, streamable_http_client(url, http_client=client) as (read, write):
        yield HttpUpstream(url, read, write)
