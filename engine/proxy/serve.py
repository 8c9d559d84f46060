"""Run the proxy: the agent over stdio or streamable HTTP, the upstream a child or a URL."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from engine.proxy.auth import ResourceServer
from engine.proxy.core import ProxyOptions, ProxySession, Upstream
from engine.proxy.decider import Decider
from engine.proxy.listing import ToolFilter
from engine.proxy.stdio import stdio_agent
from engine.proxy.upstream import exit_code, open_child, open_http

log = logging.getLogger(__name__)

# Signals passed on to a child server (the terminal's and a supervisor's).
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
EXIT_CANNOT_START = 127


@dataclass(frozen=True)
class SessionLimits:
    """How many sessions the HTTP listener keeps open, in all and for one principal, and
    how long one may idle (None: the listener's defaults)."""

    max_sessions: int | None = None
    max_sessions_per_principal: int | None = None
    idle_timeout: float | None = None

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of `start_http_proxy` that are set."""
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass(frozen=True)
class UpstreamSpec:
    """Where the real MCP server is: a command to run, or a URL (with headers)."""

    command: list[str] = field(default_factory=list)
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def opener(self) -> Callable[[], AbstractAsyncContextManager[Upstream]]:
        if self.url is not None:
            url, headers = self.url, self.headers
            return lambda: open_http(url, headers)
        command = self.command
        return lambda: open_child(command)


class _Signals:
    """Install handlers for a set of signals on the running loop, and remove them again."""

    def __init__(self, signals: tuple[signal.Signals, ...], handler: Callable[[int], None]) -> None:
        self._signals = signals
        self._handler = handler

    def __enter__(self) -> _Signals:
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.add_signal_handler(signum, self._handler, signum)
        return self

    def __exit__(self, *_: object) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)


async def run_stdio(decider: Decider, options: ProxyOptions, upstream: UpstreamSpec) -> int:
    """Serve one agent on stdin/stdout; the exit status is the child's, when there is one.

    Signals the proxy receives are passed to the child, whose exit ends the proxy. With
    an upstream URL, SIGINT or SIGTERM stops the proxy (status 128 + signal).
    """
    session = ProxySession(
        decider,
        options,
        session_id="stdio-" + uuid.uuid4().hex,
        tool_filter=ToolFilter(decider),
    )
    async with stdio_agent(max_depth=options.max_json_depth) as (messages, output):
        if upstream.url is None:
            started = False
            try:
                async with open_child(upstream.command) as child:
                    started = True
                    with _Signals(FORWARDED_SIGNALS, child.send_signal):
                        await session.run(messages, output, child)
            except OSError as exc:
                if started:
                    raise
                print(
                    f"mcp-policy proxy: cannot start the MCP server {upstream.command[0]!r}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_CANNOT_START
            return exit_code(child.returncode)
        stopped: list[int] = []
        task = asyncio.current_task()
        assert task is not None

        def stop(signum: int) -> None:
            stopped.append(signum)
            task.cancel()

        try:
            with _Signals((signal.SIGINT, signal.SIGTERM), stop):
                async with open_http(upstream.url, upstream.headers) as http:
                    await session.run(messages, output, http)
        except asyncio.CancelledError:
            if not stopped:
                raise
            task.uncancel()
        return 128 + stopped[0] if stopped else 0


async def run_http(
    decider: Decider,
    options: ProxyOptions,
    upstream: UpstreamSpec,
    *,
    host: str,
    port: int,
    path: str = "/mcp",
    auth: ResourceServer | None = None,
    insecure: bool = False,
    sessions: SessionLimits | None = None,
    allowed_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
) -> int:
    """Serve MCP over streamable HTTP until SIGINT or SIGTERM.

    With `auth` every request needs a bearer credential (see auth.py): it is started (the
    keys file and the issuer's keys loaded: IdentityUnavailable when they cannot be)
    before the listener opens, and closed after. Without it only loopback is served,
    unless `insecure` (ListenRefused). `sessions`: the caps on open sessions and their
    idle timeout (default: the listener's). `allowed_origins` and `allowed_hosts` extend
    what the listener's HTTP guard accepts (engine/transports/guard.py)."""
    from engine.proxy.http import start_http_proxy  # the listener only when it is wanted

    resource = auth
    if resource is not None:
        await resource.start()
        try:
            await decider.require_known()
        except BaseException:
            await resource.close()
            raise
    try:
        proxy = await start_http_proxy(
            host,
            port,
            decider=decider,
            options=options,
            open_upstream=upstream.opener(),
            path=path,
            auth=resource,
            insecure=insecure,
            max_depth=options.max_json_depth,
            **(sessions or SessionLimits()).arguments(),
            allowed_origins=allowed_origins,
            allowed_hosts=allowed_hosts,
        )
        where = upstream.url or " ".join(upstream.command)
        how = " (bearer credentials required)" if resource is not None else ""
        print(f"mcp-policy proxy: MCP on {proxy.url} -> {where}{how}", flush=True)
        stop = asyncio.Event()
        with _Signals((signal.SIGINT, signal.SIGTERM), lambda _: stop.set()):
            await stop.wait()
        print("mcp-policy proxy: stopping", flush=True)
        await proxy.stop()
    finally:
        if resource is not None:
            await resource.close()
    return 0
