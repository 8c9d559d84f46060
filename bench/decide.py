"""Decide throughput and latency over gRPC and HTTP, beside raw OPA queries of the same input.

Run with `make bench`. One OPA process is started and loaded with the shipped policy;
the service runs as its own process (`mcp-policy serve --opa-url ...`, decision log off)
and is driven over gRPC and HTTP and as Envoy's ext_authz filter would call it (`Check`
with the tools/call body), and the same OPA is queried directly over its REST API with
the input document the service would build: the baseline. All run in the same run, on
the same machine, with the same client concurrency, so the ratio shows what the service
adds on top of OPA (translation, limits, approvals, the transports).

Each call uses a fresh session so the shipped 10-per-minute limit never blocks it (the
shipped per-agent limit, 20 per minute, is dropped from a copy of rego/ for the same
reason); the limiter still does its full work for every call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import struct_pb2

from bench.common import ARGUMENTS, drive, drop_agent_limit
from engine.policy.opa_process import OpaProcess, free_loopback_port
from engine.policy.rest import Opa
from engine.policy.source import read_bundle
from engine.settings import PROJECT_ROOT
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc, types_pb2

SERVER = "awslabs.healthimaging-mcp-server"


def input_document(session_id: str) -> dict[str, Any]:
    return {
        "tool": {"server": SERVER, "name": "copy_image_set", "arguments": ARGUMENTS},
        "principal": {"agent_id": "bench", "session_id": session_id, "user_id": None, "roles": []},
        "request": {
            "id": "dec_" + uuid.uuid4().hex,
            "time": "2026-01-01T00:00:00.000Z",
            "transport": "http",
            "jsonrpc_id": None,
        },
        "context": {},
    }


def decide_body(session_id: str) -> dict[str, Any]:
    return {
        "server": SERVER,
        "tool": "copy_image_set",
        "arguments": ARGUMENTS,
        "principal": {"agent_id": "bench", "session_id": session_id},
    }


def check_request(session_id: str) -> Any:
    """What Envoy's ext_authz filter sends for one MCP tools/call with its body."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "copy_image_set", "arguments": ARGUMENTS},
        }
    )
    headers = {
        ":method": "POST",
        ":path": "/mcp",
        ":authority": "imaging.internal",
        "content-type": "application/json",
        "content-length": str(len(body)),
        "mcp-session-id": session_id,
    }
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.body = "POST", "/mcp", "imaging.internal", body
    http.headers.update(headers)
    request.attributes.context_extensions["mcp_server"] = SERVER
    return request


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()

    opa = OpaProcess("opa")
    await opa.start()
    loader = Opa(opa.url, timeout=10)
    await loader.open()
    policy = Path(tempfile.mkdtemp(prefix="mcp-policy-bench-policy-"))
    shutil.copytree(PROJECT_ROOT / "rego", policy / "rego")
    drop_agent_limit(policy / "rego")
    await loader.load(read_bundle([policy / "rego", PROJECT_ROOT / "policies"]))
    await loader.close()

    http_port, grpc_port = free_loopback_port(), free_loopback_port()
    state = tempfile.mkdtemp(prefix="mcp-policy-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--opa-url",
            opa.url,
            "--policy",
            str(policy / "rego"),
            "--policy",
            str(PROJECT_ROOT / "policies"),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--state-dir",
            state,
            "--decision-log",
            "off",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**env, "MCP_POLICY_APPROVER_TOKEN": "bench"},
    )
    assert service.stdout is not None
    while "HTTP on" not in (line := service.stdout.readline()):
        if not line:
            raise SystemExit("the service did not start")

    results = []
    try:
        async with (
            aiohttp.ClientSession() as session,
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
        ):
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            arguments = struct_pb2.Struct()
            arguments.update(ARGUMENTS)
            run_id = uuid.uuid4().hex[:8]

            async def raw_opa(i: int) -> None:
                async with session.post(
                    f"{opa.url}/v1/data/mcp/decision",
                    json={"input": input_document(f"{run_id}-o{i}")},
                ) as r:
                    body = await r.json()
                    assert body["result"]["action"] == "rate_limit", body

            async def via_http(i: int) -> None:
                async with session.post(
                    f"http://127.0.0.1:{http_port}/v1/decide", json=decide_body(f"{run_id}-h{i}")
                ) as r:
                    body = await r.json()
                    assert body["verdict"] == "allow", body

            async def via_grpc(i: int) -> None:
                response = await stub.Decide(
                    decision_pb2.DecideRequest(
                        server=SERVER,
                        tool="copy_image_set",
                        arguments=arguments,
                        principal=types_pb2.Principal(
                            agent_id="bench", session_id=f"{run_id}-g{i}"
                        ),
                    )
                )
                assert response.verdict == types_pb2.VERDICT_ALLOW, response

            authz = external_auth_pb2_grpc.AuthorizationStub(channel)

            async def via_extauthz(i: int) -> None:
                response = await authz.Check(check_request(f"{run_id}-e{i}"))
                assert response.status.code == 0, response  # OK: allowed

            for name, call in (
                ("raw OPA REST (baseline)", raw_opa),
                ("Decide over gRPC", via_grpc),
                ("Decide over HTTP", via_http),
                ("ext_authz Check (gRPC)", via_extauthz),
            ):
                await drive(lambda i, c=call: c(10_000_000 + i), args.warmup, args.concurrency)
                for concurrency in (1, args.concurrency):
                    count = args.requests if concurrency > 1 else args.requests // 4
                    run = await drive(call, count, concurrency)
                    results.append((concurrency, name, run.rate, run.p50_ms, run.p99_ms))
    finally:
        service.terminate()
        service.wait(timeout=20)
        await opa.stop()

    baseline = {c: rate for c, name, rate, *_ in results if name.startswith("raw OPA")}
    print(
        f"\nmcp-policy-engine decide benchmark — {args.requests} calls at concurrency "
        f"{args.concurrency} ({args.requests // 4} at 1), {os.cpu_count()} cores, "
        f"OPA {opa.binary}"
    )
    print(f"{'path':<26}{'conc':>5}{'decisions/s':>13}{'p50 ms':>9}{'p99 ms':>9}{'vs OPA':>8}")
    for concurrency, name, rate, p50, p99 in results:
        print(
            f"{name:<26}{concurrency:>5}{rate:>13.0f}{p50:>9.2f}{p99:>9.2f}"
            f"{rate / baseline[concurrency]:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
