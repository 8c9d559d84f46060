"""`mcp-policy serve` as a separate process, the way users and replicas run it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from engine.policy.opa_process import free_loopback_port

CLI = [sys.executable, "-m", "engine.cli"]
PORT_ATTEMPTS = 3


class Serve:
    def __init__(
        self,
        tmp: Path,
        policy: list[Path],
        env: dict[str, str],
        *extra: str,
        measured: bool = True,
    ) -> None:
        """`measured=False`: no coverage in this process (replicas under load, whose code
        the in-process tests cover, would spend the run's CPU on tracing it).

        The ports are free ones found just before; another process on a busy machine may
        take one first, and then the service refuses to start: it is started again on
        other ports (a few times), nothing else being retried."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
        if not measured:
            environment.pop("COVERAGE_PROCESS_CONFIG", None)
        for attempt in range(PORT_ATTEMPTS):
            self.http_port = free_loopback_port()
            self.grpc_port = free_loopback_port()
            args = [
                *CLI,
                "serve",
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--state-dir",
                str(tmp / "state"),
                "--decision-log",
                str(tmp / "decisions.jsonl"),
            ]
            for path in policy:
                args += ["--policy", str(path)]
            args += extra
            self.proc = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**environment, **env},
            )
            self.lines: list[str] = []
            # The log is read all along (a full pipe would block the service on a write),
            # into `lines` and, for `wait_for`, a queue.
            self._unread: queue.Queue[str | None] = queue.Queue()
            self._reader = threading.Thread(target=self._read, name="serve-log", daemon=True)
            self._reader.start()
            try:
                self.wait_for("HTTP on")
            except AssertionError:
                taken = any("cannot listen" in line for line in self.lines)
                if not taken or attempt == PORT_ATTEMPTS - 1:
                    raise
                self.proc.wait(timeout=20)
                continue
            break
        self.url = f"http://127.0.0.1:{self.http_port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._unread.put(line)
        self._unread.put(None)  # the end of the output

    def wait_for(self, words: str, timeout: float = 30) -> str:
        """The next line of the log that holds `words` (lines before it are passed)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._unread.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._unread.put(None)
                raise AssertionError(f"serve exited: {''.join(self.lines)}")
            if words in line:
                return line
        raise AssertionError(f"no {words!r} in {''.join(self.lines)}")

    def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/v1/decide", json=body, timeout=10)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def stop(self) -> int:
        """SIGTERM, then collect the rest of the output."""
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=20)
        self._reader.join(timeout=10)  # the output is read to its end
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return status
