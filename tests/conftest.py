"""Fixtures: a real OPA (supervised by the service) and the real servers on loopback.

Nothing here is mocked: the service runs in-process on the test event loop with its own
`opa run --server`, bound to free ports, and is stopped after the session.
"""

from __future__ import annotations

import copy
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
        # One service serves a whole test process, every test calling as agent-1: the
        # default caps on pending approvals (20 per agent) would fill up with the
        # approvals of earlier tests. tests/test_approval_caps.py tests the caps.
        "approval_max_pending_per_agent": 100_000,
        "approval_max_pending_per_session": 100_000,
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


# What the real copy_image_set requires besides the ids: a plain copy (a new image set).
COPY_INFORMATION: dict[str, Any] = {"sourceImageSet": {"latestVersionId": "1"}}
# A copy into an existing image set instead (the shipped policy asks for approval).
INTO_EXISTING: dict[str, Any] = {
    "sourceImageSet": {"latestVersionId": "1"},
    "destinationImageSet": {
        "imageSetId": "ffeeddccbbaa99887766554433221100",
        "latestVersionId": "1",
    },
}


def copy_call(session_id: str | None = None, **arguments: Any) -> dict[str, Any]:
    """A copy_image_set call as the real tool takes it; an argument given replaces the
    default (None leaves it out). The agent is the session's own, so that tests never share
    the shipped per-agent copy limit by accident."""
    sid = session_id or session()
    args: dict[str, Any] = {
        "datastore_id": DATASTORE,
        "source_image_set_id": IMAGE_SET,
        "copy_image_set_information": copy.deepcopy(COPY_INFORMATION),
    }
    args.update(arguments)
    return {
        "server": HEALTHIMAGING,
        "tool": "copy_image_set",
        "arguments": {k: v for k, v in args.items() if v is not None},
        "principal": {"agent_id": f"agent-{sid}", "session_id": sid, "user_id": "user-1"},
    }


def approval_call(session_id: str | None = None, **arguments: Any) -> dict[str, Any]:
    """A copy_image_set call that needs a human's approval: a copy into an existing image
    set (copy_image_set.existing_destination)."""
    return copy_call(
        session_id, copy_image_set_information=copy.deepcopy(INTO_EXISTING), **arguments
    )


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


# The per-agent copy limit: a file of its own in the copy_image_set rule package.
AGENT_LIMIT_MODULE = Path("mcp", "rules", "copy_image_set", "agent_limit.rego")


def without_agent_limit(rego: Path) -> Path:
    """A copy of rego/ (copy_policy) without the shipped per-agent copy limit (20 per
    minute per agent; calls that name no agent share one counter): for services many
    tests share, and for tests that raise copy_image_set's per-session limit."""
    (rego / AGENT_LIMIT_MODULE).unlink()
    return rego


def shared_policy(tmp: Path) -> list[Path]:
    """The policy of the shared service (`servers`): the shipped one, in a copy under
    `tmp`, without the per-agent copy limit."""
    rego, data = copy_policy(tmp)
    return [without_agent_limit(rego), data]


@pytest.fixture(scope="session")
async def servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """The service the tests of a worker share: the shipped policy, without the per-agent
    copy limit. Every test here has sessions (and agents) of its own, but the calls that
    name no agent (forward-auth, ext_authz) would all count against that limit's one
    counter, test after test. tests/test_ratelimit.py checks it on services of its own."""
    tmp = tmp_path_factory.mktemp("service")
    running = await start_servers(settings_for(tmp, policy_paths=shared_policy(tmp)))
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
