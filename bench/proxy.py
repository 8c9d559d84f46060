"""Round-trip latency of a tools/call through `mcp-policy proxy`, beside the same call made
straight to the MCP server, over stdio, in one run.

Run with `.venv/bin/python -m bench.proxy` (needs `opa` on PATH). Both paths use the real
MCP SDK client and the fixture server `tests.fixtures.imaging_server` (a stand-in for the
AWS HealthImaging server: `copy_image_set` answering a fake result at once), so the
difference is what the proxy adds: one more stdio hop each way, the decision (embedded:
translate, OPA, the rate-limit store; the decision log off unless `--decision-log on`) and
the outcome report. The proxy runs with the shipped policy, except that copy_image_set's
limit (10 per 60 s) becomes 1,000,000 per 0.1 s: every call is allowed and forwarded,
and the store still checks and records each one, reading as few hits per check as under
the shipped limit. A refused call (`delete_datastore`, not in the catalog: decided, never
forwarded) is measured too.

Calls are sequential (one agent waits for each answer), as an agent makes them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from mcp import ClientSession, StdioServerParameters, stdio_client

from bench.common import ARGUMENTS, percentiles
from engine.settings import PROJECT_ROOT

SERVER = [sys.executable, "-m", "tests.fixtures.imaging_server"]


def bench_policy(tmp: Path) -> list[Path]:
    """The shipped policy with copy_image_set's limit out of the way (1,000,000 per 0.1 s)."""
    rego, data = tmp / "rego", tmp / "policies"
    shutil.copytree(PROJECT_ROOT / "rego", rego)
    shutil.copytree(PROJECT_ROOT / "policies", data)
    rules_file = data / "rules.yaml"
    rules = yaml.safe_load(rules_file.read_text())
    # Every call passes, yet each is checked and recorded; the short window keeps the hits
    # a check reads as few as under the shipped 10 per 60 s.
    rules["mcp_policy"]["rules"]["copy_image_set"]["rate_limit"].update(
        {"max": 1_000_000, "window": 0.1}
    )
    rules_file.write_text(yaml.safe_dump(rules))
    return [rego, data]


async def measure(
    params: StdioServerParameters, calls: int, warmup: int, errlog: Any, *, proxied: bool
) -> dict[str, list[float]]:
    """Latencies (seconds) of copy_image_set and delete_datastore calls over one session
    (through the proxy, delete_datastore is refused and never reaches the server)."""
    out: dict[str, list[float]] = {"allowed": [], "refused": []}
    async with stdio_client(params, errlog=errlog) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()

            async def timed(call: Callable[[], Awaitable[Any]], into: list[float]) -> None:
                started = time.perf_counter()
                await call()
                into.append(time.perf_counter() - started)

            async def allowed() -> None:
                result = await session.call_tool("copy_image_set", ARGUMENTS)
                assert not result.is_error, result

            async def refused() -> None:
                result = await session.call_tool("delete_datastore", {"datastore_id": "x"})
                assert result.is_error is proxied, result

            scratch: list[float] = []
            for _ in range(warmup):
                await timed(allowed, scratch)
            for _ in range(calls):
                await timed(allowed, out["allowed"])
            for _ in range(calls // 4):
                await timed(refused, out["refused"])
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--store", choices=["sqlite", "memory"], default="sqlite", help="the proxy's state store"
    )
    parser.add_argument(
        "--decision-log",
        choices=["off", "on"],
        default="off",
        help="off: neither the JSONL log nor the decision database (default); on: both, as "
        "a proxy started without options keeps them",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mcp-policy-bench-proxy-") as tmp_name:
        tmp = Path(tmp_name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
        env["MCP_POLICY_STATE_STORE"] = args.store
        if args.decision_log == "off":
            env["MCP_POLICY_DECISION_LOG"] = "off"
            env["MCP_POLICY_DECISION_DB"] = "false"
        direct = StdioServerParameters(
            command=SERVER[0], args=SERVER[1:], env=env, cwd=str(PROJECT_ROOT)
        )
        proxy_args = [
            "-m",
            "engine.proxy.cli",
            "proxy",
            "--embedded",
            "--state-dir",
            str(tmp / "state"),
        ]
        for path in bench_policy(tmp):
            proxy_args += ["--policy", str(path)]
        proxied = StdioServerParameters(
            command=sys.executable,
            args=[*proxy_args, "--agent-id", "bench-" + uuid.uuid4().hex[:6], "--", *SERVER],
            env=env,
            cwd=str(PROJECT_ROOT),
        )
        with (tmp / "stderr.log").open("w") as errlog:
            straight = await measure(direct, args.calls, args.warmup, errlog, proxied=False)
            through = await measure(proxied, args.calls, args.warmup, errlog, proxied=True)

    base_p50, base_p99 = percentiles(straight["allowed"])
    print(
        f"\nmcp-policy proxy benchmark — {args.calls} sequential tools/call over stdio "
        f"(after {args.warmup} warm-up), embedded decisions ({args.store} store, decision "
        f"log {args.decision_log}), {os.cpu_count()} cores"
    )
    print(f"{'path':<46}{'p50 ms':>9}{'p99 ms':>9}{'p50 vs direct':>15}")
    rows = [
        ("direct to the server (baseline)", straight["allowed"]),
        ("through the proxy, allowed + forwarded", through["allowed"]),
        ("direct, delete_datastore (the server runs it)", straight["refused"]),
        ("through the proxy, refused (not forwarded)", through["refused"]),
    ]
    for name, latencies in rows:
        p50, p99 = percentiles(latencies)
        print(f"{name:<46}{p50:>9.2f}{p99:>9.2f}{p50 / base_p50:>14.2f}x")
    added = percentiles(through["allowed"])[0] - base_p50
    print(
        f"\nthe proxy adds {added:.2f} ms at p50 to an allowed call (p99 direct {base_p99:.2f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
