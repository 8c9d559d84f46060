"""What durable allows cost: MCP_POLICY_DECISION_LOG_SYNC=batch beside =always.

`make bench-decision-log` runs this (`python -m bench.decision_log_sync`). In one run, the
same service (`mcp-policy serve`, the engine of `--engine`, a memory state store, so the
decision log is all it writes to disk: JSONL and SQLite in a directory of `--dir`) is
started once per mode and driven with `hey` over HTTP Decide, one copy_image_set call
that the policy allows (bench/load.py's policy copy, its rate limit raised), at each
concurrency, after a discarded warm-up:

- batch (the default): an allow is answered at once; the writer thread writes batches
  about every 10 ms (a crash loses what is queued);
- always: an allow is answered once its record is on disk: the writer writes what has
  arrived, fsyncs the JSONL file, commits SQLite with synchronous=FULL, then answers
  every decision of the batch (group commit).

Printed side by side per concurrency: decisions/s, p50 and p99 (from hey's per-request
CSV, as bench/load.py reads it), the service's CPU, and the service's own time in its log
stage (mcp_policy_stage_seconds{stage="log"}: in always mode, the wait for the disk).
A case fails, and shows no figures, on any non-2xx answer or any decision other than
allow in the service's own metrics. After each mode the service is stopped and both
stores are checked with `mcp-policy log verify`'s code (engine/state/audit.py). Figures
depend on the disk's fsync latency: the header names the directory's filesystem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.common import BenchError, machine, prometheus_counters, run_main
from bench.load import (
    TOOL,
    Counts,
    Options,
    Result,
    Service,
    Stages,
    Target,
    build_inputs,
    case_options,
    copy_policy,
    find_tool,
    parsed_cases,
    run_case,
    tool_version,
)
from bench.load import (
    start_service as load_service,
)
from engine.state import audit

MODES = ("batch", "always")


@dataclass
class Mode:
    """One mode's results: per concurrency, and what its log held afterwards."""

    name: str
    results: dict[int, Result]
    stores: list[str]
    health: dict[str, object]


async def start_service(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    policy: list[Path],
    work: Path,
    engine: str,
    sync: str,
) -> Service:
    """`mcp-policy serve` as bench/load.py starts it, with MCP_POLICY_DECISION_LOG_SYNC."""
    return await load_service(
        stack,
        session,
        policy,
        work,
        engine,
        env={"MCP_POLICY_DECISION_LOG_SYNC": sync},
        name=f"the service (sync={sync})",
    )


def target(session: aiohttp.ClientSession, service: Service, body: Path, sync: str) -> Target:
    decide_body = json.loads(body.read_text())

    async def probe() -> str | None:
        try:
            async with session.post(f"{service.http}/v1/decide", json=decide_body) as response:
                answer = await response.json()
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"HTTP Decide failed: {exc!r}"
        if answer.get("verdict") != "allow":
            return f"HTTP Decide answered {json.dumps(answer)[:200]}"
        return None

    async def metrics() -> str:
        async with session.get(f"{service.http}/metrics") as response:
            return await response.text()

    async def counts() -> Counts:
        allowed, other = 0.0, {}
        for labels, value in prometheus_counters(await metrics(), "mcp_policy_decisions_total"):
            if labels.get("verdict") == "allow" and labels.get("tool") == TOOL:
                allowed += value
            else:
                kind = f"{labels.get('verdict')} by rule {labels.get('rule')}"
                other[kind] = other.get(kind, 0.0) + value
        return allowed, other

    async def stages() -> Stages:
        text = await metrics()
        sums = {
            labels["stage"]: value
            for labels, value in prometheus_counters(text, "mcp_policy_stage_seconds_sum")
        }
        count = max(
            (v for _, v in prometheus_counters(text, "mcp_policy_stage_seconds_count")), default=0.0
        )
        return count, sums

    post = ["-m", "POST", "-T", "application/json", "-D", str(body)]
    return Target(
        f"HTTP Decide, sync={sync}",
        "hey",
        [*post, f"{service.http}/v1/decide"],
        probe,
        counts,
        service.tree,
        stages=stages,
    )


async def run_mode(
    session: aiohttp.ClientSession,
    policy: list[Path],
    work: Path,
    body: Path,
    options: Options,
    args: argparse.Namespace,
    sync: str,
) -> Mode:
    home = work / sync
    results: dict[int, Result] = {}
    health: dict[str, object] = {}
    async with contextlib.AsyncExitStack() as stack:
        service = await start_service(stack, session, policy, home, args.engine, sync)
        case = target(session, service, body, sync)
        for concurrency in args.levels:
            results[concurrency] = await run_case(case, options, home, concurrency)
        async with session.get(f"{service.http}/readyz") as response:
            health = (await response.json()).get("decision_log", {})
    # Stopped (SIGTERM: the writer drains its queue): both stores checked whole.
    stores = []
    for check, path in (
        (audit.verify_jsonl, home / "decisions.jsonl"),
        (audit.verify_database, home / "state" / "decisions.sqlite3"),
    ):
        try:
            report = check(path)
        except audit.Unverifiable as exc:
            stores.append(f"cannot verify: {exc}")
            continue
        verdict = "verifies" if report.finding is None else f"DOES NOT VERIFY: {report.text()}"
        stores.append(f"{report.store}: {report.records} records, chain {verdict}")
    return Mode(sync, results, stores, health)


def filesystem(path: Path) -> str:
    """The type and device of the filesystem holding `path` (Linux /proc/mounts)."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        target = str(path.resolve())
        for row in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind, *_ = row.split()
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                best[0]
            ):
                best = (mount, kind, device)
    return f"{best[1]} ({best[2]} on {best[0] or '?'})"


def print_table(modes: list[Mode], levels: list[int]) -> None:
    batch, always = modes
    cell = f"{'decisions/s':>12}{'p50 ms':>8}{'p99 ms':>8}{'srv CPU':>8}{'log µs':>8}"
    print(f"{'':>5} | {'sync=batch':^44} | {'sync=always':^44} |")
    print(f"{'conc':>5} | {cell} | {cell} | {'rate':>6}{'Δp50 ms':>9}{'Δp99 ms':>9}")
    print("-" * 126)
    for concurrency in levels:
        a, b = batch.results[concurrency], always.results[concurrency]
        row = f"{concurrency:>5} | {figures(a)} | {figures(b)} |"
        if a.failed or b.failed or a.rate == 0:
            print(f"{row}{'-':>6}{'-':>9}{'-':>9}")
        else:
            print(
                f"{row}{b.rate / a.rate:>5.2f}x{b.p50_ms - a.p50_ms:>+9.2f}"
                f"{b.p99_ms - a.p99_ms:>+9.2f}"
            )
    print(
        "  rate: always / batch decisions/s; Δ: always minus batch. log µs: the service's "
        "own time per decision in its log stage (always: the wait for the disk)"
    )
    for mode in modes:
        for concurrency, result in mode.results.items():
            for problem in result.problems:
                print(f"  ! sync={mode.name}, {concurrency} concurrent: {problem}")
        log = mode.health
        print(
            f"  sync={mode.name}: decision log written {log.get('written')}, dropped "
            f"{log.get('dropped')}, healthy {log.get('healthy')}; after stop: "
            + "; ".join(mode.stores)
        )


def figures(result: Result) -> str:
    if result.failed:
        return f"{'FAILED':>12}{'-':>8}{'-':>8}{result.server_cpu:>7.0f}%{'-':>8}"
    log_us = result.stage_us.get("log", 0.0)
    return (
        f"{result.rate:>12.0f}{result.p50_ms:>8.2f}{result.p99_ms:>8.2f}"
        f"{result.server_cpu:>7.0f}%{log_us:>8.0f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decision_log_sync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    case_options(parser)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the decision logs are written (a temporary directory under it; default: "
        "the system's temporary directory): its disk's fsync is what sync=always pays",
    )
    return parsed_cases(parser, argv)


async def run(args: argparse.Namespace) -> int:
    info = machine()
    hey = find_tool("hey")
    if hey is None:
        raise BenchError("hey is needed: run `make bench-tools` (builds it into .tools/bin)")
    options = Options(args.duration, args.warmup, args.client_cpus, 1, hey, "")
    work = Path(tempfile.mkdtemp(prefix="mcp-policy-log-sync-", dir=args.dir))
    print("mcp-policy-engine decision log durability benchmark (bench/decision_log_sync.py)")
    for key, value in info.items():
        print(f"  {key}: {value}")
    print(f"  hey: {tool_version(hey)}, -cpus {args.client_cpus}")
    print(f"  decision logs in {work}: {filesystem(work)}")
    print(
        f"  service: mcp-policy serve, engine {args.engine}, memory state store, JSONL and "
        "SQLite decision log; one allowed copy_image_set call, one session (limit raised)"
    )
    print(
        f"  each case: {options.warmup:g} s warm-up (discarded), then {options.duration:g} s; "
        "batch first, then always, each on a service of its own"
    )
    print()
    modes: list[Mode] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            policy = copy_policy(work / "policy")
            body = work / "decide.json"
            body.write_text(json.dumps(build_inputs().decide_body))
            print("running:", file=sys.stderr)
            for sync in MODES:
                modes.append(await run_mode(session, policy, work, body, options, args, sync))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(modes, args.levels)
    failed = any(r.failed for m in modes for r in m.results.values())
    unverified = any("verifies" not in s for m in modes for s in m.stores)
    return 1 if failed or unverified else 0


def main(argv: list[str] | None = None) -> int:
    return run_main("bench.decision_log_sync", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
