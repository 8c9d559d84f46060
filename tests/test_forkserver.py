"""The fixture's launcher behaves as the fixture process would (tests/fixtures/forkserver.py):
the proxy tests rely on its exit status, its signals and its death being the fixture's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.settings import PROJECT_ROOT
from tests.fixtures import forkserver
from tests.fixtures.imaging_server import CRASH_STATUS, MODE_ENV, NAME
from tests.fixtures.proxy_harness import FIXTURE

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "forkserver-test", "version": "1"},
    },
}
COPY = {
    "jsonrpc": "2.0",
    "id": 2,
    "method": "tools/call",
    "params": {
        "name": "copy_image_set",
        "arguments": {
            "datastore_id": "0" * 32,
            "source_image_set_id": "1" * 32,
            "copy_image_set_information": {"sourceImageSet": {"latestVersionId": "1"}},
        },
    },
}


# How long a step may take on a loaded machine before the test fails (no timing assertion).
WAIT = 30.0


def _stat(pid: int) -> list[str] | None:
    """The fields after `pid (comm)` of /proc/PID/stat, or None for no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return None


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _gone_soon(pid: int) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.01)
    return False


def _children(parent: int) -> list[int]:
    return [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and (_stat(int(pid)) or ["", ""])[1] == str(parent)
    ]


def _fork_server() -> int:
    """This process's fork server (a launcher's command line names the socket too)."""
    wanted = [b"--serve", forkserver.socket_path().encode()]
    for pid in _children(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if any(argv[i : i + 2] == wanted for i in range(len(argv))):
            return pid
    raise AssertionError("no fork server runs for this test process")


def _send(proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message).encode() + b"\n")
    proc.stdin.flush()


def _ask(proc: subprocess.Popen[bytes], message: dict[str, Any]) -> dict[str, Any]:
    assert proc.stdout is not None
    _send(proc, message)
    return dict(json.loads(proc.stdout.readline()))


def _start(command: list[str], **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
    )


@pytest.fixture
def launched() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A fixture started as the proxies start it, initialized, and the pid that serves."""
    before = set(_children(_fork_server()))
    with _start(FIXTURE, **{MODE_ENV: "crash"}) as proc:
        try:
            assert _ask(proc, INITIALIZE)["result"]["serverInfo"]["name"] == NAME
            (child,) = set(_children(_fork_server())) - before
            yield proc, child
        finally:
            proc.kill()


def test_the_fixture_runs_in_a_child_of_the_fork_server(
    launched: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, child = launched
    assert child != proc.pid and _alive(child) and _alive(proc.pid)


def test_its_exit_status_is_the_fixtures(launched: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, child = launched
    _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    _send(proc, COPY)  # crash mode: the fixture exits with CRASH_STATUS before answering
    assert proc.wait(WAIT) == CRASH_STATUS
    assert _gone_soon(child)


def test_the_end_of_its_stdin_ends_both(launched: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, child = launched
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(WAIT) == 0
    assert _gone_soon(child)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_is_passed_on_and_ends_it_the_same_way(
    launched: tuple[subprocess.Popen[bytes], int], signum: signal.Signals
) -> None:
    proc, child = launched
    proc.send_signal(signum)
    assert proc.wait(WAIT) == -signum
    assert _gone_soon(child)


def test_the_child_dies_with_a_killed_launcher(
    launched: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, child = launched
    proc.kill()
    assert proc.wait(WAIT) == -signal.SIGKILL
    assert _gone_soon(child), "the fixture outlived its launcher"


def test_without_a_fork_server_the_launcher_becomes_the_fixture(tmp_path: Path) -> None:
    command = [*FIXTURE[:-1], str(tmp_path / "no-such.sock")]
    with _start(command) as proc:
        try:
            assert _ask(proc, INITIALIZE)["result"]["serverInfo"]["name"] == NAME
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert b"tests.fixtures.imaging_server" in argv
        finally:
            proc.kill()
