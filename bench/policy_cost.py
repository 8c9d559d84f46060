"""What the policy itself costs per decision, at several catalog sizes: `opa bench`.

    python -m bench.policy_cost [--tools 2,100,1000,10000] [--servers 500]

For each size a policy directory is generated in a temporary directory (never committed):
the shipped `rego/` and `policies/`, plus a catalog file with that many extra tools spread
over `--servers` servers, each tool with a rule of its own (the kinds of rule cycle through
allow, rate limits in both forms, require_approval and deny). Every size is timed with
`opa bench` on the same input, a valid copy_image_set call, against OPA's own RBAC example
as the baseline in the same run, and with the service's in-process engine (the p50 of
3,000 `evaluate()` calls, and how long loading that policy takes; then the p50 again with
caches cold: between calls this process writes one byte per cache line of COLD_BYTES, as
the service's own work between decisions evicts the evaluator's memory). Printed: µs/op,
allocations/op, the ratio to the shipped pack and to the RBAC example, and the expression
evaluations of one decision (from `opa eval --profile`: the count does not depend on how
busy the machine is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ARGUMENTS, machine
from engine.policy.inprocess import InProcessOpa
from engine.policy.opa_process import find_opa
from engine.policy.source import read_bundle
from engine.settings import PROJECT_ROOT

SERVER = "awslabs.healthimaging-mcp-server"

INPUT = {
    "tool": {"server": SERVER, "name": "copy_image_set", "arguments": ARGUMENTS},
    "principal": {
        "agent_id": "agent-1",
        "session_id": "session-1",
        "user_id": "user-1",
        "roles": [],
        "authenticated": False,
    },
    "request": {"id": "d-1", "time": "2026-01-01T00:00:00Z", "transport": "grpc"},
    "context": {},
}

# OPA's RBAC example (its documentation's policy and data), the baseline.
RBAC_POLICY = """package app.rbac

default allow := false

allow if user_is_admin

allow if {
	some grant in user_is_granted
	input.action == grant.action
	input.type == grant.type
}

user_is_admin if "admin" in data.user_roles[input.user]

user_is_granted contains grant if {
	some role in data.user_roles[input.user]
	some grant in data.role_grants[role]
}
"""
RBAC_DATA = {
    "user_roles": {"alice": ["admin"], "bob": ["employee", "billing"], "eve": ["customer"]},
    "role_grants": {
        "customer": [{"action": a, "type": t} for a in ("read", "adopt") for t in ("dog", "cat")],
        "employee": [{"action": a, "type": t} for a in ("read", "update") for t in ("dog", "cat")],
        "billing": [{"action": "read", "type": "finance"}, {"action": "update", "type": "finance"}],
    },
}
RBAC_INPUT = {"user": "bob", "action": "read", "type": "finance"}

RULES: list[Any] = [
    "allow",
    {"action": "rate_limit", "rate_limit": {"max": 100, "window": 60, "scope": "user"}},
    {"action": "allow", "rate_limit": "50/minute"},
    {"action": "require_approval", "approval": {"ttl": 600}},
    {"action": "deny", "reason": "not through agents"},
]


def generated_policy(tools: int, servers: int) -> dict[str, Any]:
    """`tools` catalogued tools over `servers` servers, each with a rule of its own."""
    catalog: dict[str, dict[str, Any]] = {}
    rules: dict[str, Any] = {}
    for i in range(tools):
        server = f"generated-server-{i % servers:04d}"
        name = f"tool_{i:05d}"
        catalog.setdefault(server, {})[name] = {
            "category": "write",
            "risk": ("low", "medium", "high", "critical")[i % 4],
            "description": f"generated tool {i}",
        }
        rules[name] = RULES[i % len(RULES)]
    return {"mcp_policy": {"catalog": catalog, "rules": rules}}


def opa_bench(opa: str, dirs: list[Path], input_path: Path, query: str) -> dict[str, float]:
    args = [opa, "bench", "--format", "json", "--count", "3", "-i", str(input_path), query]
    for d in dirs:
        args[2:2] = ["-d", str(d)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    # --count 3 prints one JSON document per run; keep the fastest (least disturbed).
    runs = [json.loads(doc) for doc in _documents(out)]
    best = min(runs, key=lambda r: r["T"] / r["N"])
    return {"ns": best["T"] / best["N"], "allocs": best["MemAllocs"] / best["N"]}


def _documents(text: str) -> list[str]:
    decoder = json.JSONDecoder()
    docs, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, end = decoder.raw_decode(text, i)
        docs.append(json.dumps(obj))
        i = end
    return docs


def evaluations(opa: str, dirs: list[Path], input_path: Path, query: str) -> int:
    args = [opa, "eval", "--profile", "--profile-limit", "100000", "--format", "json"]
    for d in dirs:
        args += ["-d", str(d)]
    args += ["-i", str(input_path), query]
    out = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    return sum(row["num_eval"] for row in out.get("profile", []))


# What a decision's surroundings touch between two evaluations, in this stand-in: 2 MiB
# (half the L2 cache of a core on the 2-core machines this is measured on).
COLD_BYTES = 2 * 1024 * 1024
CACHE_LINE = 64


async def in_process(dirs: list[Path], calls: int = 3000) -> dict[str, float]:
    """p50 of `calls` in-process evaluations of INPUT, warm then with caches cold, and the
    load time, in µs."""
    engine = InProcessOpa(timeout=5)
    await engine.open()
    try:
        started = time.perf_counter()
        await engine.load(read_bundle(dirs))
        load = time.perf_counter() - started
        for _ in range(300):
            await engine.evaluate(INPUT)
        times, cold = [], []
        for _ in range(calls):
            started = time.perf_counter()
            await engine.evaluate(INPUT)
            times.append(time.perf_counter() - started)
        other = bytearray(COLD_BYTES)
        ones = b"\x01" * (COLD_BYTES // CACHE_LINE)
        for _ in range(calls):
            other[::CACHE_LINE] = ones
            started = time.perf_counter()
            await engine.evaluate(INPUT)
            cold.append(time.perf_counter() - started)
    finally:
        await engine.close()
    return {
        "p50": statistics.median(times) * 1e6,
        "cold": statistics.median(cold) * 1e6,
        "load": load * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tools", default="2,100,1000,10000")
    parser.add_argument("--servers", type=int, default=500)
    args = parser.parse_args()
    opa = str(find_opa())
    sizes = [int(n) for n in args.tools.split(",")]
    print(" ".join(f"{k}={v}" for k, v in machine().items()))
    with tempfile.TemporaryDirectory(prefix="mcp-policy-cost-") as tmp:
        root = Path(tmp)
        input_path = root / "input.json"
        input_path.write_text(json.dumps(INPUT))
        rbac = root / "rbac"
        rbac.mkdir()
        (rbac / "rbac.rego").write_text(RBAC_POLICY)
        (rbac / "data.json").write_text(json.dumps(RBAC_DATA))
        (root / "rbac-input.json").write_text(json.dumps(RBAC_INPUT))
        baseline = opa_bench(opa, [rbac], root / "rbac-input.json", "data.app.rbac.allow")
        rows = []
        for size in sizes:
            extra = max(0, size - 2)  # the shipped pack catalogues 2 (server, tool) pairs
            policies = root / f"policies-{size}"
            shutil.copytree(PROJECT_ROOT / "policies", policies)
            if extra:
                text = yaml.safe_dump(generated_policy(extra, args.servers), sort_keys=False)
                (policies / "generated.yaml").write_text(text)
            dirs = [PROJECT_ROOT / "rego", policies]
            got = opa_bench(opa, dirs, input_path, "data.mcp.decision")
            got["evals"] = evaluations(opa, dirs, input_path, "data.mcp.decision")
            got |= {f"inproc_{k}": v for k, v in asyncio.run(in_process(dirs)).items()}
            rows.append((size, got))
            shutil.rmtree(policies)
    shipped = rows[0][1]["ns"]
    shipped_inproc = rows[0][1]["inproc_p50"]
    print(
        f"\n{'case (opa bench, then in-process)':<40}{'µs/op':>9}{'allocs/op':>11}{'evals':>7}"
        f"{'× shipped':>11}{'× RBAC':>8}{'in-proc p50 µs':>16}{'× shipped':>11}{'cold µs':>9}"
        f"{'load ms':>9}"
    )
    print(
        f"{'OPA RBAC example (baseline)':<40}{baseline['ns'] / 1000:>9.1f}"
        f"{baseline['allocs']:>11.0f}{'':>7}{'':>11}{1:>8.2f}"
    )
    for size, got in rows:
        label = f"data.mcp.decision, {size} tools" + (" (shipped)" if size == sizes[0] else "")
        print(
            f"{label:<40}{got['ns'] / 1000:>9.1f}{got['allocs']:>11.0f}{got['evals']:>7}"
            f"{got['ns'] / shipped:>11.2f}{got['ns'] / baseline['ns']:>8.2f}"
            f"{got['inproc_p50']:>16.0f}{got['inproc_p50'] / shipped_inproc:>11.2f}"
            f"{got['inproc_cold']:>9.0f}{got['inproc_load'] / 1000:>9.0f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
