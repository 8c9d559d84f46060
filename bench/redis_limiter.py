"""Our Redis limiter (one Lua script) against the `limits` library's moving window.

Both on one private redis-server, in one run: exactness (1,000 concurrent calls on one
key with a limit of 100 must allow exactly 100) and speed (5,000 calls on distinct keys,
16 at once). `limits` is the established library the issue suggested; ours is kept
because it also does what `limits` does not: several stacked limits checked and recorded
all-or-nothing, slots held per decision and given back on a failed upstream call, and
costs taken from arguments.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from bench.common import drive
from engine.state.ratelimit import Limit, RedisRateLimitStore
from tests.kv import KvServer

Hit = Callable[[int, str], Awaitable[bool]]


async def measure(name: str, hit: Hit) -> str:
    key = uuid.uuid4().hex
    allowed = sum(await asyncio.gather(*[hit(i, key) for i in range(1000)]))
    run = await drive(lambda i: hit(i, f"{key}-{i}"), 5000, 16)
    return f"{name:<28}{allowed:>9}/1000{run.rate:>10.0f}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}"


async def main() -> int:
    server = KvServer("redis", Path(tempfile.mkdtemp(prefix="mcp-policy-bench-")))
    server.start()
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        server.url, decode_responses=True, max_connections=32
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    try:
        library = MovingWindowRateLimiter(RedisStorage(f"async+{server.url}"))
        item = RateLimitItemPerMinute(100)
        ours = RedisRateLimitStore(client, "bench-limiter:")

        async def with_library(i: int, key: str) -> bool:
            return await library.hit(item, key)

        async def with_ours(i: int, key: str) -> bool:
            limit = Limit(key=(key,), max=100, window=60)
            return (await ours.acquire([limit], f"dec_{i}_{uuid.uuid4().hex[:8]}")).allowed

        rows = [
            await measure("limits MovingWindow", with_library),
            await measure("mcp-policy Lua script", with_ours),
        ]
    finally:
        await client.aclose(close_connection_pool=True)
        server.kill()
    print(
        "\nRedis limiter — exactness (allowed of 1000 at once, limit 100) and speed "
        "(5000 calls, 16 at once)"
    )
    print(f"{'limiter':<28}{'allowed':>14}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
