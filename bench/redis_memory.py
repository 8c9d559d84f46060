"""Redis memory per session key: one Redis against a three-node Redis Cluster.

Fills each with `--sessions` distinct session keys (default 1,000,000), each one call
through the rate-limit store as the service makes it (a counter with a live window, and
the reservation the decision holds), then prints the growth of used_memory: with the
reservations held, and after their outcomes were reported (counters only). For the
cluster, the sum over its nodes and each node's share. The window is an hour so no key
lapses while the store fills (its length does not change the memory a key takes).

A call's counters share a hash tag made from its server and tool (its session and user
limits are checked in one script), so the counters of one tool sit on one node of the
cluster and only the reservations spread; `--tools N` spreads the sessions over N tools.

Run with `python -m bench.redis_memory` (`--sessions 100000` for a quick look).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from bench.common import drive
from engine.state.ratelimit import Limit, RedisGate, RedisRateLimitStore, cluster_client
from tests.kv import KvCluster, KvServer

PREFIX = "mcp-policy:"
SERVER = "awslabs.healthimaging-mcp-server"
TOOL = "copy_image_set"


@dataclass(frozen=True)
class Growth:
    held: list[int]  # used_memory growth per node, reservations held
    counters: list[int]  # ... after the outcomes were reported


def used_memory(ports: list[int]) -> list[int]:
    out = []
    for port in ports:
        client = redis.Redis(port=port)
        try:
            out.append(int(client.info("memory")["used_memory"]))
        finally:
            client.close()
    return out


def drop_reservations(ports: list[int]) -> None:
    """What reporting every outcome does: the reservations go, the counters stay."""
    for port in ports:
        client = redis.Redis(port=port)
        try:
            pipe = client.pipeline(transaction=False)
            for key in client.scan_iter(match=f"{PREFIX}held:*", count=10_000):
                pipe.unlink(key)  # one key a command: a cluster node refuses keys of two slots
                if len(pipe) == 10_000:
                    pipe.execute()
            pipe.execute()
        finally:
            client.close()


async def fill(client: Any, gate: RedisGate | None, args: argparse.Namespace) -> float:
    store = RedisRateLimitStore(client, PREFIX, gate=gate)
    await store.open()
    run = uuid.uuid4().hex[:8]

    async def one(i: int) -> None:
        tool = TOOL if args.tools == 1 else f"{TOOL}_{i % args.tools}"
        key = (f"catalog.rule.{tool}", "session", f"s-{run}-{i}", SERVER, tool)
        limit = Limit(key=key, max=10, window=3600)
        assert (await store.acquire([limit], f"rsv_{run}_{i}")).allowed

    return (await drive(one, args.sessions, args.concurrency)).rate


async def measure(
    ports: list[int], client: Any, gate: RedisGate | None, args: argparse.Namespace
) -> tuple[Growth, float]:
    before = used_memory(ports)
    try:
        rate = await fill(client, gate, args)
    finally:
        await client.aclose()
    held = [after - base for after, base in zip(used_memory(ports), before, strict=True)]
    drop_reservations(ports)
    counters = [after - base for after, base in zip(used_memory(ports), before, strict=True)]
    return Growth(held, counters), rate


def line(name: str, values: list[int], sessions: int) -> str:
    total = sum(values)
    shares = " + ".join(f"{v / 2**20:.1f}" for v in values) if len(values) > 1 else ""
    per = f"{total / sessions:>7.0f} B/session"
    return f"  {name:<34}{total / 2**20:>9.1f} MiB {per}" + (
        f"   (nodes: {shares} MiB)" if shares else ""
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--tools",
        type=int,
        default=1,
        help="spread the sessions over this many tools (default 1: the shipped policy's "
        "one limited tool, whose counters all share one slot, hence one node)",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mcp-policy-bench-"))
    single = KvServer("redis", tmp / "single")
    (tmp / "single").mkdir()
    cluster = KvCluster(tmp / "cluster")
    rows = []
    try:
        single.start()
        started = time.monotonic()
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            single.url, decode_responses=True, max_connections=64
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        growth, rate = await measure([single.port], client, None, args)
        rows.append(("one Redis", growth, rate, time.monotonic() - started))
        single.kill()

        cluster.start()
        started = time.monotonic()
        client = cluster_client(cluster.url, decode_responses=True, max_connections=64)
        ports = [node.port for node in cluster.nodes]
        growth, rate = await measure(ports, client, RedisGate(64), args)
        rows.append(("Redis Cluster, 3 primaries", growth, rate, time.monotonic() - started))
    finally:
        single.kill()
        cluster.stop()

    tools = "one tool" if args.tools == 1 else f"{args.tools} tools"
    print(f"\nRedis used_memory growth for {args.sessions:,} session keys of {tools} (window 1 h):")
    for name, growth, rate, elapsed in rows:
        print(f"{name} — filled at {rate:,.0f} calls/s in {elapsed:.0f} s")
        print(line("counter + reservation (held)", growth.held, args.sessions))
        print(line("counter only (outcome reported)", growth.counters, args.sessions))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
