"""What uploading decisions to a collector costs a decision, side by side in one run.

`make bench-fleet` runs this (`python -m bench.fleet`); `make bench-tools` builds `hey`.
Three services, `mcp-policy serve` with the engine of `--engine`, the same policy copy
(bench/load.py's: rego/ without tests and policies/, the copy limit raised so it never
blocks), a memory state store and a local decision log each, all on loopback:

- plain: no --opa-config (the baseline);
- uploading: --opa-config with decision_logs to a collector on loopback (a thread of this
  process that reads, un-gzips, parses and counts each upload, and answers 200);
- collector down: the same configuration, the collector's port closed: every upload
  fails, decisions wait in the spool on disk (its default cap, 256 MiB).

For each concurrency, the three are driven in turn with `hey` over HTTP Decide for the same
duration after a discarded warm-up (bench/load.py's run_case: latencies from hey's
per-request CSV, a probe before and after, the service's own count of allowed decisions,
CPU of the driven service, the load tool and everything else). Then the books are checked:
the uploading service drains its spool and must count every decision it made sent (and
the collector must have received that many); the one without a collector must count every
decision queued or dropped. The exit status is 1 when a case failed or a count is off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.common import BenchError, machine, prometheus_counters, run_main
from bench.load import (
    OTHERS_WARN_PERCENT,
    REQUEST_TIMEOUT_SECONDS,
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
    start_service,
    tool_version,
)
from engine.policy.opa_process import free_loopback_port

DRAIN_SECONDS = 120.0  # the uploading service's spool must be sent within this, after the run
UPLOAD_DELAY = (1, 2)  # reporting.min/max_delay_seconds: uploads all along the run


class Collector:
    """A decision-log collector on loopback: counts the events it is sent, keeps none."""

    def __init__(self) -> None:
        self.events = 0
        self.uploads = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - the API's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                events = json.loads(raw)
                with collector.lock:
                    collector.uploads += 1
                    collector.events += len(events) if self.path.startswith("/logs") else 0
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def opa_config(path: Path, collector_url: str) -> Path:
    """OPA's configuration file at `path`: decisions to `collector_url`, nothing else."""
    config = {
        "services": {"collector": {"url": collector_url}},
        "decision_logs": {
            "service": "collector",
            "reporting": {
                "min_delay_seconds": UPLOAD_DELAY[0],
                "max_delay_seconds": UPLOAD_DELAY[1],
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def start(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    policy: list[Path],
    work: Path,
    engine: str,
    extra: list[str],
) -> Service:
    """`mcp-policy serve` as bench/load.py starts it, with `extra` arguments."""
    work.mkdir()
    return await start_service(
        stack, session, policy, work, engine, extra=extra, name=f"the service ({work.name})"
    )


async def scrape(session: aiohttp.ClientSession, service: Service) -> str:
    async with session.get(f"{service.http}/metrics") as response:
        return await response.text()


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in prometheus_counters(text, name)
        if all(found.get(k) == v for k, v in labels.items())
    )


def target(
    case: str, session: aiohttp.ClientSession, service: Service, body: Path, request: Any
) -> Target:
    """HTTP Decide of `service`, as bench/load.py drives it."""

    async def probe() -> str | None:
        try:
            async with session.post(f"{service.http}/v1/decide", json=request) as response:
                answer = await response.json()
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"HTTP Decide failed: {exc!r}"
        if answer.get("verdict") != "allow":
            return f"HTTP Decide answered {json.dumps(answer)[:200]}"
        return None

    async def counts() -> Counts:
        text = await scrape(session, service)
        allowed, other = 0.0, dict[str, float]()
        for labels, value in prometheus_counters(text, "mcp_policy_decisions_total"):
            if labels.get("verdict") == "allow" and labels.get("tool") == TOOL:
                allowed += value
            else:
                kind = f"{labels.get('verdict')} by rule {labels.get('rule')}"
                other[kind] = other.get(kind, 0.0) + value
        return allowed, other

    async def stages() -> Stages:
        text = await scrape(session, service)
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
        case,
        "hey",
        [*post, f"{service.http}/v1/decide"],
        probe,
        counts,
        service.tree,
        stages=stages,
    )


@dataclass
class Books:
    """The upload counts of one service after the run."""

    case: str
    decisions: float
    sent: float
    queued: float
    dropped: float
    received: float | None  # by the collector (None: there is none)
    problem: str | None = None


async def books(
    case: str,
    session: aiohttp.ClientSession,
    service: Service,
    collector: Collector | None,
) -> Books:
    """Wait for the spool to drain (with a collector), then read the counts."""
    deadline = time.monotonic() + (DRAIN_SECONDS if collector else 5.0)
    while True:
        text = await scrape(session, service)
        decisions = total(text, "mcp_policy_decisions_total")
        sent = total(text, "mcp_policy_decision_upload_events_total", result="sent")
        dropped = total(text, "mcp_policy_decision_upload_events_total", result="dropped")
        queued = total(text, "mcp_policy_decision_upload_queued")
        settled = sent + dropped == decisions if collector else queued + dropped == decisions
        if settled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    received = None
    if collector is not None:
        with collector.lock:
            received = float(collector.events)
    result = Books(case, decisions, sent, queued, dropped, received)
    if collector is not None and not (sent == decisions == received and dropped == 0):
        result.problem = "not every decision was sent once and received"
    if collector is None and queued + dropped != decisions:
        result.problem = "queued + dropped is not every decision"
    return result


def print_results(results: list[Result], ledger: list[Books]) -> None:
    plain = {r.concurrency: r for r in results if r.case == "plain" and not r.failed}
    head = (
        f"{'case':<18}{'conc':>5}{'decisions/s':>12}{'vs plain':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'p99 +ms':>8}{'errors':>7}{'srv CPU':>8}{'tool CPU':>9}{'other':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        cpu = f"{r.server_cpu:>7.0f}%{r.client_cpu:>8.0f}%{r.other_cpu:>5.0f}%"
        if r.failed:
            print(f"{r.case:<18}{r.concurrency:>5}{'FAILED':>12}{'':>33}{r.errors:>7}{cpu}")
            continue
        base = plain.get(r.concurrency)
        ratio = f"{r.rate / base.rate:.2f}" if base else "-"
        extra = f"{r.p99_ms - base.p99_ms:+.2f}" if base else "-"
        print(
            f"{r.case:<18}{r.concurrency:>5}{r.rate:>12.0f}{ratio:>9}{r.p50_ms:>8.2f}"
            f"{r.p99_ms:>8.2f}{extra:>8}{r.errors:>7}{cpu}"
        )
    staged = [r for r in results if r.stage_us and not r.failed]
    if staged:
        stages = list(staged[0].stage_us)
        print("\nµs per decision by stage (the service's own clock, mcp_policy_stage_seconds):")
        print(f"{'case':<18}{'conc':>5}" + "".join(f"{s:>10}" for s in stages))
        for r in staged:
            print(
                f"{r.case:<18}{r.concurrency:>5}"
                + "".join(f"{r.stage_us[s]:>10.0f}" for s in stages)
            )
    for r in results:
        for problem in r.problems:
            print(f"  ! {r.case} ({r.concurrency} concurrent): {problem}")
    busy = [r for r in results if r.other_cpu > OTHERS_WARN_PERCENT]
    if busy:
        print(
            f"  ! in {len(busy)} of {len(results)} cases other processes on this machine used "
            f"more than {OTHERS_WARN_PERCENT}% of a core (up to "
            f"{max(r.other_cpu for r in busy):.0f}%, the other column): those figures are "
            "disturbed; run again on a quiet machine"
        )
    print("\nUploads after the run (the service's /metrics; the collector's own count):")
    for b in ledger:
        received = "-" if b.received is None else f"{b.received:.0f}"
        print(
            f"  {b.case:<16} decisions {b.decisions:.0f}: sent {b.sent:.0f}, queued "
            f"{b.queued:.0f}, dropped {b.dropped:.0f}; the collector received {received}"
            + (f"  ! {b.problem}" if b.problem else "")
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    case_options(parser)
    return parsed_cases(parser, argv)


async def run(args: argparse.Namespace) -> int:
    hey = find_tool("hey")
    if hey is None:
        raise BenchError("hey is needed: run `make bench-tools` (builds it into .tools/bin)")
    options = Options(args.duration, args.warmup, args.client_cpus, 1, hey, "")
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="mcp-policy-fleet-"))
    results: list[Result] = []
    ledger: list[Books] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        policy = copy_policy(work / "policy")
        collector = Collector()
        stack.callback(collector.close)
        closed = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there
        services: dict[str, tuple[Service, Collector | None]] = {}
        for case, url in (
            ("plain", None),
            ("uploading", collector.url),
            ("collector down", closed),
        ):
            where = work / case.replace(" ", "-")
            extra = []
            if url is not None:
                extra = ["--opa-config", str(opa_config(work / f"{where.name}.yaml", url))]
            service = await start(stack, session, policy, where, args.engine, extra)
            services[case] = (service, collector if url == collector.url else None)
        inputs = build_inputs()
        body = work / "decide.json"
        body.write_text(json.dumps(inputs.decide_body))
        targets = [
            target(case, session, service, body, inputs.decide_body)
            for case, (service, _) in services.items()
        ]
        print_header(info, hey, options, args)
        print("running:", file=sys.stderr)
        for concurrency in args.levels:
            for driven in targets:
                results.append(await run_case(driven, options, work, concurrency))
        for case, (service, maybe) in services.items():
            if case != "plain":
                ledger.append(await books(case, session, service, maybe))
    print()
    print_results(results, ledger)
    failed = any(r.failed for r in results) or any(b.problem for b in ledger)
    return 1 if failed else 0


def print_header(
    info: dict[str, str], hey: str, options: Options, args: argparse.Namespace
) -> None:
    print("mcp-policy-engine fleet benchmark (bench/fleet.py): the cost of decision upload")
    for key, value in info.items():
        print(f"  {key}: {value}")
    print(f"  hey: {tool_version(hey)}, -cpus {options.client_cpus}")
    print(
        f"  services: mcp-policy serve, engine {args.engine}, memory state store, local "
        "decision log (JSONL and SQLite), HTTP Decide of one copy_image_set call (allowed)"
    )
    print(
        f"  uploading: decision_logs to a collector thread in this process (its CPU is in "
        f"'other'), reporting every {UPLOAD_DELAY[0]}-{UPLOAD_DELAY[1]} s; collector down: "
        "the same, to a closed port"
    )
    print(
        f"  each case: {options.warmup:g} s warm-up (discarded), then {options.duration:g} s; "
        "cases in turn at each concurrency; CPU in % of one core"
    )
    print()


def main(argv: list[str] | None = None) -> int:
    return run_main("bench.fleet", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
