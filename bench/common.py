"""What every benchmark here shares: driving calls at a concurrency and reading latencies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import resource
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A valid copy_image_set call, as the real tool takes it: the shipped policy allows it
# (within its limits).
ARGUMENTS = {
    "datastore_id": "0123456789abcdef0123456789abcdef",
    "source_image_set_id": "00112233445566778899aabbccddeeff",
    "copy_image_set_information": {"sourceImageSet": {"latestVersionId": "1"}},
}

# The shipped per-agent copy limit (20 per 60 s per agent): a file of its own in the
# copy_image_set rule package.
AGENT_LIMIT_MODULE = Path("mcp", "rules", "copy_image_set", "agent_limit.rego")


def drop_agent_limit(rego: Path) -> None:
    """In a copy of rego/, remove the shipped per-agent copy limit, so that it never blocks
    a benchmark (the per-session limit, raised, still counts every call)."""
    (rego / AGENT_LIMIT_MODULE).unlink()


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


# What the Go-tool benchmark (bench/load.py) shares with others: machine facts, the CPU
# time of processes, and counters read from a Prometheus text page.

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine() -> dict[str, str]:
    """Cores, load average and processor, as printed beside the figures."""
    info = {"nproc": str(os.cpu_count())}
    if hasattr(os, "sched_getaffinity"):
        info["usable cores"] = str(len(os.sched_getaffinity(0)))
    load = os.getloadavg()
    info["load average (1/5/15 min)"] = " ".join(f"{x:.2f}" for x in load)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["python"] = platform.python_version()
    return info


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc; only `pid` elsewhere)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                if fields is not None:
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the running processes `pids` have used so far."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU time of this process's finished (waited-for) children, e.g. a load tool."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def prometheus_counters(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` in a Prometheus text page, with their labels."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        if metric != name:
            continue
        pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)
        out.append((dict(pairs), float(value)))
    return out


def busy_cpu_seconds() -> float:
    """CPU time all processes on the machine have used so far (Linux /proc/stat), so
    that what others ran during a measurement can be told apart from ours."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class BenchError(Exception):
    """A benchmark that cannot run (a tool missing, a service answering wrongly): its
    message is the one line printed."""


def run_main(name: str, run: Coroutine[Any, Any, int]) -> int:
    """Run a benchmark's `run` coroutine to its exit status: Ctrl-C (or SIGTERM) cancels it,
    so that every process it started is stopped on the way out; a BenchError is one line."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(run)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print(f"{name}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    finally:
        loop.close()
