"""Fixtures: a real OPA (supervised by the service) and the real servers on loopback.

Nothing here is mocked: the service runs in-process on the test event loop with its own
`opa run --server`, bound to free ports, and is stopped after the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from engine.settings import PROJECT_ROOT, Settings
from engine.transports.server import Servers, start_servers
from tests.clients import GrpcClient, HttpClient
from tests.fixtures import forkserver
from tests.kv import KvPool, KvServer

APPROVER_TOKEN = "test-approver-token"
HEALTHIMAGING = "awslabs.healthimaging-mcp-server"
VALKEY = "awslabs.valkey-mcp-server"
DATASTORE = "0123456789abcdef0123456789abcdef"
DATASTORE_2 = "fedcba9876543210fedcba9876543210"
IMAGE_SET = "00112233445566778899aabbccddeeff"


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("opa") is None:
        raise pytest.UsageError("no `opa` on PATH: run the tests with `make test`")


def settings_for(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "state_dir": tmp / "state",
        "approver_token": APPROVER_TOKEN,
        "decision_log": str(tmp / "decisions.jsonl"),
        "reload_interval_seconds": 0,  # tests that watch files turn it on
    }
    values.update(overrides)
    return Settings(**values)


def copy_policy(tmp: Path) -> tuple[Path, Path]:
    """A private copy of the shipped rego/ and policies/ that a test may edit."""
    rego = tmp / "rego"
    data = tmp / "policies"
    shutil.copytree(PROJECT_ROOT / "rego", rego)
    shutil.copytree(PROJECT_ROOT / "policies", data)
    return rego, data


def add_tools(
    data: Path,
    *,
    catalog: Iterable[dict[str, Any]] = (),
    rules: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """Add catalog entries and set per-tool rules in a copy of policies/ (copy_policy).

    Each entry is `{"server", "tool", "category", "risk", ...}` ("server" "*": any server);
    it is filed under its server and tool in the catalog map."""
    for name, edit in (("catalog.yaml", "catalog"), ("rules.yaml", "rules")):
        path = data / name
        doc = yaml.safe_load(path.read_text())
        if edit == "catalog":
            for entry in catalog:
                fields = {k: v for k, v in entry.items() if k not in ("server", "tool")}
                server = doc["mcp_policy"]["catalog"].setdefault(entry.get("server", "*"), {})
                server[entry["tool"]] = fields
        else:
            doc["mcp_policy"]["rules"].update(rules or {})
        path.write_text(yaml.safe_dump(doc))


def session() -> str:
    """A fresh agent session, so tests never share a rate-limit counter by accident."""
    return "s-" + uuid.uuid4().hex[:12]


def copy_call(session_id: str | None = None, **arguments: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"datastore_id": DATASTORE, "source_image_set_id": IMAGE_SET}
    args.update(arguments)
    return {
        "server": HEALTHIMAGING,
        "tool": "copy_image_set",
        "arguments": {k: v for k, v in args.items() if v is not None},
        "principal": {
            "agent_id": "agent-1",
            "session_id": session_id or session(),
            "user_id": "user-1",
        },
    }


@pytest.fixture(scope="session", autouse=True)
def fixture_fork_server() -> Iterator[None]:
    """This worker's fork server for the fixture MCP server (tests/fixtures/forkserver.py).
    It stops when its stdin closes, also when this process dies."""
    environment = {k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_CONFIG"}
    with subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.forkserver", "--serve", forkserver.socket_path()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environment,
        cwd=PROJECT_ROOT,
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        try:
            assert server.stdout.readline() == b"ready\n", "the fork server did not start"
            yield
        finally:
            server.stdin.close()
            server.wait(10)


@pytest.fixture(scope="session")
def kv_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvPool]:
    pool = KvPool(tmp_path_factory.mktemp("kv"))
    yield pool
    pool.stop()


@pytest.fixture(params=["redis", "valkey"])
def kv_server(request: pytest.FixtureRequest, kv_pool: KvPool) -> KvServer:
    """A private Redis and a private Valkey: every test using this runs against both."""
    return kv_pool.get(request.param)


@pytest.fixture(scope="session")
async def servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    running = await start_servers(settings_for(tmp_path_factory.mktemp("service")))
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def http(servers: Servers) -> AsyncIterator[HttpClient]:
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=10) as client:
        yield HttpClient(client)


@pytest.fixture(scope="session")
async def grpc_client(servers: Servers) -> AsyncIterator[GrpcClient]:
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        yield GrpcClient(channel)


@pytest.fixture(params=["http", "grpc"])
def client(
    request: pytest.FixtureRequest, http: HttpClient, grpc_client: GrpcClient
) -> HttpClient | GrpcClient:
    """The same test through both transports."""
    return http if request.param == "http" else grpc_client
