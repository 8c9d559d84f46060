"""What every benchmark here shares: driving calls at a concurrency and reading latencies."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# A valid copy_image_set call: the shipped policy allows it (within its limit).
ARGUMENTS = {
    "datastore_id": "0123456789abcdef0123456789abcdef",
    "source_image_set_id": "00112233445566778899aabbccddeeff",
}


@dataclass(frozen=True)
class Run:
    rate: float  # calls per second
    p50_ms: float
    p99_ms: float


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 of `latencies` (seconds), in milliseconds."""
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def drive(call: Callable[[int], Awaitable[Any]], count: int, concurrency: int) -> Run:
    """Make `count` calls, `call(0)` … `call(count - 1)`, `concurrency` at a time."""
    latencies: list[float] = []
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    return Run(count / elapsed, *percentiles(latencies))
