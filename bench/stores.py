"""State stores side by side: memory (the baseline) vs SQLite vs Redis, in one run.

Two measurements per store:
- `acquire`: the rate-limit store alone (check and record one limit), 16 callers at once;
- `decide`: whole decisions through the service core with that store, against one OPA
  loaded with the shipped policy, 16 at once (the rate limit is the store work per call).
Then Redis memory per 100k session keys: the used_memory growth after 100,000 sessions
each made one limited call (a counter and a reservation each), and after their outcomes
were reported (counters only).

Run with `make bench`. Each call uses a fresh session, so limits never block.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from dataclasses import astuple
from pathlib import Path

import redis.asyncio

from bench.common import ARGUMENTS, drive
from engine.models import DecideRequest
from engine.policy.opa_process import OpaProcess
from engine.policy.rest import Opa
from engine.policy.source import read_bundle
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT, Settings
from engine.state.ratelimit import Limit
from tests.kv import KvServer


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=100_000)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mcp-policy-bench-"))
    kv = KvServer("redis", tmp)
    kv.start()
    opa = OpaProcess("opa")
    await opa.start()
    loader = Opa(opa.url, timeout=10)
    await loader.open()
    await loader.load(read_bundle([PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"]))
    await loader.close()

    rows = []
    try:
        for store in ("memory", "sqlite", "redis"):
            settings = Settings(
                opa_url=opa.url,
                state_store=store,
                state_dir=tmp / store,
                decision_log="off",
                redis_url=kv.url,
                redis_prefix=f"bench-{store}:",
                approver_token="bench",
                opa_timeout_ms=5000,
            )
            runtime = Runtime(settings)
            await runtime.start()
            try:
                run = uuid.uuid4().hex[:8]

                async def acquire(i: int, rt: Runtime = runtime, run: str = run) -> None:
                    limit = Limit(key=("bench", run, str(i)), max=10, window=60)
                    assert (await rt.rate_limits.acquire([limit], f"{run}-{i}")).allowed

                async def decide(i: int, rt: Runtime = runtime, run: str = run) -> None:
                    request = DecideRequest(
                        server="awslabs.healthimaging-mcp-server",
                        tool="copy_image_set",
                        arguments=ARGUMENTS,
                        principal={"session_id": f"{run}-d{i}"},
                    )
                    decision = await rt.service.decide(request, transport="bench")
                    assert decision.verdict.value == "allow", decision

                await drive(acquire, 200, args.concurrency)
                run = await drive(acquire, args.requests, args.concurrency)
                rows.append((store, "acquire", *astuple(run)))
                await drive(lambda i: decide(10_000_000 + i), 200, args.concurrency)
                run = await drive(decide, args.requests, args.concurrency)
                rows.append((store, "decide", *astuple(run)))
            finally:
                await runtime.stop()
        memory = await redis_memory(kv, args.sessions)
    finally:
        await opa.stop()
        kv.kill()

    base = {kind: rate for store, kind, rate, *_ in rows if store == "memory"}
    print(
        f"\nstate stores — {args.requests} operations each at concurrency "
        f"{args.concurrency}, {os.cpu_count()} cores"
    )
    print(f"{'store':<8}{'operation':<10}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs memory':>11}")
    for store, kind, rate, p50, p99 in rows:
        print(f"{store:<8}{kind:<10}{rate:>10.0f}{p50:>9.2f}{p99:>9.2f}{rate / base[kind]:>11.2f}")
    held, counters = memory
    print(
        f"\nRedis used_memory for {args.sessions:,} session keys: "
        f"{held / 2**20:.1f} MiB with reservations held "
        f"({held / args.sessions:.0f} B/session), "
        f"{counters / 2**20:.1f} MiB after outcomes reported "
        f"({counters / args.sessions:.0f} B/session)"
    )
    return 0


async def redis_memory(kv: KvServer, sessions: int) -> tuple[int, int]:
    from engine.state.ratelimit import RedisRateLimitStore

    client = redis.asyncio.Redis.from_url(kv.url, decode_responses=True)
    try:
        await client.flushall()
        before = (await client.info("memory"))["used_memory"]
        store = RedisRateLimitStore(client, "mcp-policy:")
        run = uuid.uuid4().hex[:8]

        async def fill(i: int) -> None:
            key = (
                "catalog.rule.copy_image_set",
                "session",
                f"{run}-{i}",
                "awslabs.healthimaging-mcp-server",
                "copy_image_set",
            )
            await store.acquire([Limit(key=key, max=10, window=60)], f"dec_{uuid.uuid4().hex}-{i}")

        await drive(fill, sessions, 64)
        held = (await client.info("memory"))["used_memory"] - before
        async for key in client.scan_iter(match="mcp-policy:held:*", count=1000):
            await client.delete(key)
        counters = (await client.info("memory"))["used_memory"] - before
        return held, counters
    finally:
        await client.aclose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
