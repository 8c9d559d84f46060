"""The supervised OPA dies with its parent: a SIGKILLed service (an OOM kill, a crash) or
embedded proxy leaves no orphaned `opa run --server` behind (Linux: PR_SET_PDEATHSIG)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from tests.conftest import copy_policy
from tests.fixtures.proxy_harness import FIXTURE, RawProxy, clean_env, embedded_args
from tests.processes import Serve

GONE_WITHIN = 10.0


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after it.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == parent:
                found.append(int(entry.name))
    return found


def _is_opa(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return Path(os.fsdecode(argv[0])).name == "opa" and b"--server" in argv


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for whoever inherited it to reap it."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _opa_child_of(parent: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        opa = [pid for pid in _children(parent) if _is_opa(pid)]
        if opa:
            assert len(opa) == 1, f"more than one OPA under {parent}: {opa}"
            return opa[0]
        time.sleep(0.05)
    raise AssertionError(f"no OPA child of {parent} within {timeout} s")


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _reap_leftover(pids: list[int]) -> None:
    """After a failure, kill what the test left running, so it cannot outlive the run."""
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_opa_dies_when_the_service_is_sigkilled(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    server = Serve(tmp_path, [rego, data], {"MCP_POLICY_ENGINE": "opa"})
    opa: list[int] = []
    try:
        opa.append(_opa_child_of(server.proc.pid))
        assert _alive(opa[0])
        server.proc.kill()
        server.proc.wait(timeout=10)
        assert _wait_gone(opa[0]), f"OPA {opa[0]} still runs {GONE_WITHIN} s after its service"
    finally:
        _reap_leftover(opa)
        if server.proc.poll() is None:
            server.stop()
        elif server.proc.stdout is not None:
            server.proc.stdout.close()


async def test_opa_dies_when_the_embedded_proxy_is_sigkilled(tmp_path: Path) -> None:
    proxy = await RawProxy.start(
        [*embedded_args(tmp_path), "--", *FIXTURE],
        {**clean_env(), "MCP_POLICY_ENGINE": "opa"},
        tmp_path / "proxy.log",
    )
    children: list[int] = []
    try:
        # It answers only once the decider (its Runtime, so its OPA) has started.
        await proxy.initialize()
        opa = await asyncio.to_thread(_opa_child_of, proxy.proc.pid)
        children += _children(proxy.proc.pid)
        assert opa in children and _alive(opa)
        proxy.proc.kill()
        await proxy.wait(10)
        gone = await asyncio.to_thread(_wait_gone, opa)
        assert gone, f"OPA {opa} still runs {GONE_WITHIN} s after its proxy"
    finally:
        _reap_leftover(children)
        await proxy.close()
