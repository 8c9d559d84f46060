"""The agent side over stdio: the agent speaks MCP on the proxy's stdin and stdout.

One JSON-RPC message per line, as the SDK's `stdio_server` frames them. The proxy reads
stdin with non-blocking pipes instead of `stdio_server`'s worker thread because it must
be able to stop while the agent still holds stdin open (when the upstream exits, the
proxy exits with its status), and because every line is screened (`screen.py`, the same
rules as the HTTP listener's) and one that is not a JSON-RPC message the proxy may relay
gets an answer naming the problem: -32700 for text that is not strict JSON, -32600 for a
batch (MCP removed them), a tools/call without a usable id, or anything else that is not
a message, with the request's id when it has one. Like `stdio_server`, fd 1 is pointed
at stderr while serving, so stray output can never corrupt the wire.

Lines that pass go to the core as frames (no SDK model is built for them); what the core
sends back is written as one line each, the server's own text when it is relayed as it
came, straight into the pipe's buffer (a write waits only while the agent does not read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from mcp.shared.message import SessionMessage

from engine.proxy.core import Frame, MalformedMessage
from engine.proxy.screen import MAX_DEPTH, screen_agent_message, screen_line

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024 * 1024


def parse_agent_line(
    line: bytes, *, max_depth: int = MAX_DEPTH
) -> SessionMessage | MalformedMessage:
    """One line from the agent: a message, or the error to answer it with (see screen.py)."""
    return screen_agent_message(line, max_depth=max_depth)


class _Output:
    """Writes messages to the agent, one line each."""

    def __init__(self, writer: asyncio.StreamWriter | None, fd: int) -> None:
        self._writer = writer
        self._fd = fd
        self._lock = asyncio.Lock()

    async def send(self, item: SessionMessage, /) -> None:
        await self._write(
            (item.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n").encode()
        )

    async def send_frame(self, frame: Frame, /) -> None:
        await self._write(frame.line())

    async def _write(self, data: bytes) -> None:
        try:
            if self._writer is not None:
                # Into the pipe's buffer in the order written; drain() waits only while
                # the buffer is above its limit (the agent is not reading).
                self._writer.write(data)
                await self._writer.drain()
                return
            async with self._lock:
                await anyio.to_thread.run_sync(os.write, self._fd, data)
        except (ConnectionError, OSError) as exc:
            raise anyio.BrokenResourceError from exc


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                yield exc.partial
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            yield b"<message too large>"
            continue
        if line.strip():
            yield line


async def _thread_lines(fd: int) -> AsyncIterator[bytes]:
    """For a stdin that is a regular file (no pipe transport for those)."""
    with os.fdopen(os.dup(fd), "rb") as source:
        while line := await anyio.to_thread.run_sync(source.readline, abandon_on_cancel=True):
            if line.strip():
                yield line


async def _messages(
    lines: AsyncIterator[bytes], max_depth: int
) -> AsyncIterator[Frame | Exception]:
    async for line in lines:
        yield screen_line(line, max_depth=max_depth)


@contextlib.asynccontextmanager
async def stdio_agent(
    *, max_depth: int = MAX_DEPTH
) -> AsyncIterator[tuple[AsyncIterator[Frame | Exception], _Output]]:
    """The agent's messages from stdin (screened: see screen.py), and a writer to stdout."""
    loop = asyncio.get_running_loop()
    sys.stdout.flush()
    wire_fd = os.dup(1)
    os.dup2(2, 1)
    stdin_blocking = os.get_blocking(0)
    closers: list[Any] = []
    try:
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        lines: AsyncIterator[bytes]
        try:
            read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", 0)
            )
            closers.append(read_transport)
            lines = _lines(reader)
        except ValueError:
            lines = _thread_lines(0)
        writer: asyncio.StreamWriter | None = None
        try:
            write_transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, os.fdopen(os.dup(wire_fd), "wb", 0)
            )
            writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
            closers.append(write_transport)
        except ValueError:
            writer = None
        yield _messages(lines, max_depth), _Output(writer, wire_fd)
    finally:
        for transport in closers:
            transport.close()
        await asyncio.sleep(0)
        with contextlib.suppress(OSError):
            os.set_blocking(wire_fd, True)
        os.dup2(wire_fd, 1)
        os.close(wire_fd)
        with contextlib.suppress(OSError):
            os.set_blocking(0, stdin_blocking)
