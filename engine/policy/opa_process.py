"""Start, watch and stop the `opa run --server` process the service owns.

OPA listens on a free loopback port. When it dies, the supervisor starts it again on the
same port and calls `on_restart`, which reloads the last good policy; until then every
decision fails closed (OPA unreachable, or no decision defined).

OPA runs in its own session (a terminal's Ctrl-C reaches the service, which stops OPA), so
nothing would stop it if the service itself were SIGKILLed (an OOM kill, a crash). On Linux
it is started through util-linux's `setpriv --pdeathsig KILL`, which asks the kernel to
SIGKILL it when the service goes away (PR_SET_PDEATHSIG survives the exec into OPA), so
restarts never pile up orphaned OPAs. A `preexec_fn` could do the same, but it forces a
plain fork() of a process that runs gRPC threads, whose fork handlers then race: OPA was
seen to abort at start. PR_SET_PDEATHSIG fires when the thread that spawned the child ends:
that is the event loop's thread, which lives as long as the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from engine.errors import EngineError

log = logging.getLogger(__name__)

RestartHook = Callable[[], Awaitable[None]]


def die_with_parent() -> list[str]:
    """The command prefix that has the kernel kill the child when this process dies
    (empty where util-linux's setpriv is missing: elsewhere than Linux)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


# The OPA release `make` builds (Makefile OPA_VERSION); named in the hint when none is found.
OPA_VERSION = "1.22.2"
OPA_BINARY_ENV = "MCP_POLICY_OPA_BINARY"
# A checkout (not an installed copy) has the Makefile beside engine/, and `make tools`
# builds OPA into its .tools/bin/.
CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
IN_CHECKOUT = (CHECKOUT_ROOT / "Makefile").is_file() and (CHECKOUT_ROOT / "engine").is_dir()
CHECKOUT_OPA = CHECKOUT_ROOT / ".tools" / "bin" / "opa"
GO_INSTALL_OPA = f"go install github.com/open-policy-agent/opa@v{OPA_VERSION}"


class ToolMissing(EngineError):
    """A program the engine runs is not installed; the message says how to get it."""


def opa_hint() -> str:
    """How to get OPA, in one clause."""
    if IN_CHECKOUT:
        return f"run `make tools`, or `{GO_INSTALL_OPA}`, or set {OPA_BINARY_ENV}"
    return (
        f"install OPA {OPA_VERSION} on PATH (`{GO_INSTALL_OPA}`, or a release binary), "
        f"or set {OPA_BINARY_ENV} to it"
    )


def find_opa(binary: str = "opa") -> str:
    """The OPA to run, in this order: `binary` when it is not the default name "opa" (a
    flag or MCP_POLICY_OPA_BINARY, through Settings), else $MCP_POLICY_OPA_BINARY (for
    callers without Settings), else the checkout's `.tools/bin/opa` (what `make tools`
    builds), else `opa` on PATH. ToolMissing, one line saying how to get it, when none is
    there."""
    if binary == "opa":
        binary = os.environ.get(OPA_BINARY_ENV) or "opa"
    if binary == "opa" and CHECKOUT_OPA.is_file() and os.access(CHECKOUT_OPA, os.X_OK):
        return str(CHECKOUT_OPA)
    path = shutil.which(binary)
    if path is None:
        where = "not on PATH" if binary == "opa" else f"{binary!r} is not an executable"
        raise ToolMissing(f"OPA not found ({where}): {opa_hint()}")
    return path


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OpaProcess:
    """A supervised local OPA server."""

    def __init__(self, binary: str = "opa", *, start_timeout: float = 15.0) -> None:
        self.binary = find_opa(binary)
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.on_restart: RestartHook | None = None
        self.restarts = 0
        self._start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="opa-supervisor")

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            # It dies with the service, even when the service is SIGKILLed.
            *die_with_parent(),
            self.binary,
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--skip-version-check",
            "--log-level",
            "error",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal reaches the service, which then
            # stops OPA itself, instead of OPA dying first and being restarted.
            start_new_session=True,
        )
        await self._wait_healthy()
        log.info("OPA %s listening on %s (pid %s)", self.binary, self.url, self._proc.pid)

    async def _wait_healthy(self) -> None:
        import aiohttp  # here: a process with the in-process engine never needs it

        deadline = asyncio.get_running_loop().time() + self._start_timeout
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if self._proc is not None and self._proc.returncode is not None:
                    raise RuntimeError(f"OPA exited at start with status {self._proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"OPA did not become healthy on {self.url}")
                await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        backoff = 0.1
        while not self._stopping:
            assert self._proc is not None
            status = await self._proc.wait()
            if self._stopping:
                return
            log.error("OPA exited with status %s; restarting", status)
            while not self._stopping:
                try:
                    await self._spawn()
                except (OSError, RuntimeError):
                    log.exception("OPA restart failed; retrying in %.1f s", backoff)
                    await self._kill()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                self.restarts += 1
                backoff = 0.1
                if self.on_restart is not None:
                    try:
                        await self.on_restart()
                    except Exception:
                        log.exception("reloading the policy after an OPA restart failed")
                break

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._kill()
