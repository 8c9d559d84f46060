"""What approval webhooks cost: how fast an approval reaches a receiver, and what
delivering them takes from decisions.

`make bench-approvals` runs this (`python -m bench.approvals`; `make bench-tools` builds
ghz). Everything runs on loopback and stops again whatever happens. Three services,
`mcp-policy serve` each (in-process OPA, memory state store, decision log in a temp dir,
pending-approval caps raised out of reach), all loading one copy of the shipped policy
(copy_image_set's rate limit raised, as bench/load.py does); the call is a copy into an
existing image set, which the policy sends for approval (copy_image_set.existing_destination).

1. Latency. The `latency` service has two webhook endpoints: a receiver in this process
   (aiohttp) that verifies every request with `standardwebhooks.Webhook(secret).verify`
   and notes when each approval's approval.requested arrived, and one that never answers
   (its worker stays on its first event, its queue fills). `--calls` (300) calls, one at a
   time, each of its own session and agent, so each opens an approval; for each: sent ->
   answered (approval_required), and the webhook's arrival, verified, counted from the
   answer (negative: the webhook came first) and from the send. `--warmup` calls first.

2. Throughput. `none` (no webhooks) and `hooks` (5 endpoints: 4 answering 204 at once, 1
   never answering), driven with ghz (gRPC Decide, `--concurrency` 16) in the same run,
   alternately none, hooks, hooks, none so that drift in the machine falls on both, in
   two mixes of calls:
   - `1 in 100 opens`: calls come in groups of 100 identical calls of one session and
     agent: the first opens an approval (1 event, 5 deliveries), the other 99 are answered
     approval_required for that same pending approval (no event). At the rates measured
     here this is some 10 new approvals a second, far more than people can decide;
   - `every call opens`: every call has a session and agent of its own, so every decision
     publishes an event (5 deliveries each): the worst case, far past any human scale.
   The ratio is hooks' decisions/s over none's, per mix (the issue's goal: >= 0.95; it
   is printed, not asserted). The receivers answering here are a minimal HTTP/1.1
   responder (an asyncio protocol, no parsing beyond the framing) so that they take as
   little as possible of the CPU the services share with them; their CPU shows in the
   `other` column. Every decision must be approval_required (the service's own
   /metrics), else the case fails and shows no figures.

Exit status 1 when a case failed, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from google.protobuf import json_format, struct_pb2
from standardwebhooks import Webhook, WebhookVerificationError

from bench.common import (
    ARGUMENTS,
    busy_cpu_seconds,
    children_cpu_seconds,
    cpu_seconds,
    descendants,
    machine,
    percentiles,
    prometheus_counters,
    run_main,
)
from bench.load import (
    DECIDE_CALL,
    REQUEST_TIMEOUT_SECONDS,
    SERVER,
    TOOL,
    BenchError,
    copy_policy,
    find_tool,
    http_ok,
    parse_ghz,
    protoset,
    run_tool,
    spawn,
    stop,
    tool_version,
    wait_for,
)
from engine.policy.opa_process import free_loopback_port
from mcppolicy.v1 import decision_pb2, types_pb2

RULE = "copy_image_set.existing_destination"
# A copy into an existing image set: the shipped policy asks a human for it.
APPROVAL_ARGUMENTS: dict[str, Any] = {
    **ARGUMENTS,
    "copy_image_set_information": {
        "sourceImageSet": {"latestVersionId": "1"},
        "destinationImageSet": {
            "imageSetId": "ffeeddccbbaa99887766554433221100",
            "latestVersionId": "1",
        },
    },
}
CAP = 1_000_000_000  # pending approvals per agent and per session: never reached
GROUP = 100  # calls per session in the `1 in 100 opens` mix
MIXES = {
    # mix name: (session id, agent id) as ghz templates; {run} is this case's own prefix
    f"1 in {GROUP} opens": (
        f"{{run}}-{{{{div .RequestNumber {GROUP}}}}}",
        f"a-{{run}}-{{{{div .RequestNumber {GROUP}}}}}",
    ),
    "every call opens": ("{run}-{{.UUID}}", "a-{run}-{{.UUID}}"),
}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


# ---------------------------------------------------------------------------- receivers


class Verifying:
    """An aiohttp receiver that verifies every request (401 if it does not) and notes
    when each approval's approval.requested arrived."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.arrived: dict[str, float] = {}
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.rejected = 0
        self.accepted = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = self.webhook.verify(body, dict(request.headers))
        except (WebhookVerificationError, ValueError):
            self.rejected += 1
            return web.Response(status=401)
        at = time.perf_counter()
        self.accepted += 1
        if payload["type"] == "approval.requested":
            approval_id = payload["data"]["approval"]["id"]
            self.arrived[approval_id] = at
            waiter = self.waiting.pop(approval_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(at)
        return web.Response(status=204)

    async def arrival(self, approval_id: str, timeout: float = 10.0) -> float:
        if approval_id in self.arrived:
            return self.arrived[approval_id]
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[approval_id] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise BenchError(
                f"no verified webhook for {approval_id} within {timeout:g} s"
            ) from None


class Responder(asyncio.Protocol):
    """A minimal HTTP/1.1 receiver: reads each request's head and Content-Length body and
    answers 204 (or, `hang`, never answers). Counts the requests it read."""

    count = 0

    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            Responder.count += 1
            if not self.hang and self.transport is not None:
                self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")


async def responder(hang: bool = False) -> tuple[asyncio.Server, str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Responder(hang), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/hook"


# ---------------------------------------------------------------------------- services


@dataclass
class Service:
    name: str
    proc: Any
    http: str
    grpc: str
    log: Path

    def tree(self) -> list[int]:
        return descendants(self.proc.pid)


async def start_service(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    name: str,
    policy: list[Path],
    work: Path,
    endpoints: list[dict[str, Any]],
    secret: str,
) -> Service:
    home = work / name
    home.mkdir()
    http_port, grpc_port = free_loopback_port(), free_loopback_port()
    script = Path(sys.executable).with_name("mcp-policy")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "engine.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    env.update(
        MCP_POLICY_ENGINE="inprocess",
        MCP_POLICY_STATE_STORE="memory",
        MCP_POLICY_APPROVER_TOKEN=secrets.token_hex(16),
        MCP_POLICY_APPROVAL_MAX_PENDING_PER_AGENT=str(CAP),
        MCP_POLICY_APPROVAL_MAX_PENDING_PER_SESSION=str(CAP),
    )
    if endpoints:
        file = home / "webhooks.yaml"
        file.write_text(yaml.safe_dump({"endpoints": endpoints}))
        env.update(MCP_POLICY_APPROVAL_WEBHOOK_FILE=str(file))
        env.update(MCP_POLICY_APPROVAL_WEBHOOK_SECRET=secret)
    log = home / "service.log"
    argv = [*command, "serve", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    argv += ["--state-dir", str(home / "state"), "--decision-log", str(home / "decisions.jsonl")]
    argv += [flag for path in policy for flag in ("--policy", str(path))]
    argv += ["--log-level", "WARNING"]
    proc = spawn(argv, log=log, env=env)
    stack.callback(stop, proc)
    url = f"http://127.0.0.1:{http_port}"

    async def ready() -> bool:
        return "HTTP on" in log.read_text(errors="replace") and await http_ok(
            session, f"{url}/readyz"
        )

    await wait_for(f"the {name} service", ready, proc, log)
    return Service(name, proc, url, f"127.0.0.1:{grpc_port}", log)


def decide_body(session_id: str, agent_id: str) -> dict[str, Any]:
    return {
        "server": SERVER,
        "tool": TOOL,
        "arguments": APPROVAL_ARGUMENTS,
        "principal": {"agent_id": agent_id, "session_id": session_id},
    }


async def scrape(session: aiohttp.ClientSession, service: Service) -> str:
    async with session.get(f"{service.http}/metrics") as response:
        return await response.text()


def decisions(text: str) -> tuple[float, dict[str, float]]:
    """(approval_required by the copy rule, {anything else: count}) from /metrics."""
    expected, other = 0.0, {}
    for labels, value in prometheus_counters(text, "mcp_policy_decisions_total"):
        if labels.get("verdict") == "approval_required" and labels.get("rule") == RULE:
            expected += value
        else:
            kind = f"{labels.get('verdict')} by rule {labels.get('rule')}"
            other[kind] = other.get(kind, 0.0) + value
    return expected, other


def deliveries(text: str) -> dict[str, float]:
    """Webhook deliveries by result, summed over endpoints."""
    out: dict[str, float] = {}
    for labels, value in prometheus_counters(text, "mcp_policy_webhook_deliveries_total"):
        out[labels["result"]] = out.get(labels["result"], 0.0) + value
    return out


# ---------------------------------------------------------------------------- 1. latency


@dataclass
class Latency:
    answered: list[float] = field(default_factory=list)  # sent -> approval_required
    from_answer: list[float] = field(default_factory=list)  # answer -> webhook verified
    from_send: list[float] = field(default_factory=list)  # sent -> webhook verified


async def measure_latency(
    session: aiohttp.ClientSession, service: Service, receiver: Verifying, calls: int, warmup: int
) -> Latency:
    result = Latency()
    run = uuid.uuid4().hex[:8]
    for i in range(warmup + calls):
        body = decide_body(f"lat-{run}-{i}", f"a-lat-{run}-{i}")
        sent = time.perf_counter()
        async with session.post(f"{service.http}/v1/decide", json=body) as response:
            decision = await response.json()
        answered = time.perf_counter()
        if decision.get("verdict") != "approval_required":
            raise BenchError(f"the latency service answered {json.dumps(decision)[:300]}")
        arrived = await receiver.arrival(decision["approval"]["id"])
        if i >= warmup:
            result.answered.append(answered - sent)
            result.from_answer.append(arrived - answered)
            result.from_send.append(arrived - sent)
    return result


# ---------------------------------------------------------------------------- 2. throughput


@dataclass
class Case:
    mix: str
    service: str
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    answered: int = 0
    server_cpu: float = 0.0
    other_cpu: float = 0.0
    server_us: float = 0.0  # service CPU per decision answered
    delivered: float = 0.0
    dropped: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.problems) or self.answered == 0


@dataclass(frozen=True)
class Options:
    ghz: str
    duration: float
    warmup: float
    concurrency: int
    client_cpus: int


def ghz_argv(
    options: Options, service: Service, files: Path, mix: str, seconds: float, report: Path
) -> list[str]:
    session_template, agent_template = MIXES[mix]
    run = "r" + uuid.uuid4().hex[:10]  # no two cases (or warm-ups) share a session
    arguments = struct_pb2.Struct()
    arguments.update(APPROVAL_ARGUMENTS)
    request = decision_pb2.DecideRequest(
        server=SERVER,
        tool=TOOL,
        arguments=arguments,
        principal=types_pb2.Principal(agent_id="AGENT", session_id="SESSION"),
    )
    text = json.dumps(json_format.MessageToDict(request))
    text = text.replace('"AGENT"', json.dumps(agent_template.replace("{run}", run)))
    text = text.replace('"SESSION"', json.dumps(session_template.replace("{run}", run)))
    data = files / f"decide-{run}.json"
    data.write_text(text)
    proto = files / "decision.protoset"
    if not proto.exists():
        proto.write_bytes(protoset(decision_pb2.DESCRIPTOR))
    argv = [options.ghz, "--insecure", "-c", str(options.concurrency), "-z", f"{seconds:g}s"]
    argv += ["--format", "json", "--output", str(report), "--connections", "1"]
    argv += ["--cpus", str(options.client_cpus), "--timeout", f"{REQUEST_TIMEOUT_SECONDS}s"]
    argv += ["--protoset", str(proto), "--call", DECIDE_CALL, "-D", str(data), service.grpc]
    return argv


async def run_case(
    session: aiohttp.ClientSession, options: Options, service: Service, mix: str, work: Path
) -> Case:
    print(f"  {mix}: {service.name} …", file=sys.stderr, flush=True)
    case = Case(mix, service.name)
    files, out, report = work / "files", work / "ghz.out", work / "ghz.json"
    files.mkdir(exist_ok=True)
    if options.warmup > 0:
        await run_tool(ghz_argv(options, service, files, mix, options.warmup, report), out)
    report.unlink(missing_ok=True)
    before = await scrape(session, service)
    server_before, client_before = cpu_seconds(service.tree()), children_cpu_seconds()
    busy_before, started = busy_cpu_seconds(), time.perf_counter()
    code, stderr = await run_tool(
        ghz_argv(options, service, files, mix, options.duration, report), out
    )
    wall = time.perf_counter() - started
    server = cpu_seconds(service.tree()) - server_before
    client = children_cpu_seconds() - client_before
    other = max(0.0, busy_cpu_seconds() - busy_before - server - client)
    after = await scrape(session, service)
    if code != 0:
        case.problems.append(f"ghz exited {code}: {stderr[-300:]}")
    try:
        sample = parse_ghz(report.read_text(errors="replace"), options.duration)
    except (OSError, ValueError, KeyError) as exc:
        case.problems.append(f"unreadable ghz output: {exc}")
        return case
    case.problems += [f"{n} × {kind}" for kind, n in sorted(sample.kinds.items())]
    expected_before, _ = decisions(before)
    expected_after, other_after = decisions(after)
    _, other_before = decisions(before)
    for kind, count in sorted(other_after.items()):
        wrong = int(count - other_before.get(kind, 0.0))
        if wrong > 0:
            case.problems.append(f"{wrong} × {kind} (the service's own count)")
    if len(sample.latencies) > expected_after - expected_before:
        case.problems.append("answers the service did not count as approval_required")
    case.answered = len(sample.latencies)
    case.rate = case.answered / sample.span if sample.span > 0 else 0.0
    case.p50_ms, case.p99_ms = percentiles(sample.latencies) if sample.latencies else (0, 0)
    case.server_cpu, case.other_cpu = server / wall * 100, other / wall * 100
    case.server_us = server / case.answered * 1e6 if case.answered else 0.0
    hooks_before, hooks_after = deliveries(before), deliveries(after)
    case.delivered = hooks_after.get("delivered", 0) - hooks_before.get("delivered", 0)
    case.dropped = hooks_after.get("dropped", 0) - hooks_before.get("dropped", 0)
    return case


# ---------------------------------------------------------------------------- report


def print_latency(result: Latency, calls: int) -> None:
    print(f"1. approval_required -> signed webhook verified at a loopback receiver ({calls} calls)")
    head = f"{'':<44}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
    print(head)
    print("-" * len(head))
    for name, values in (
        ("call sent -> decision answered", result.answered),
        ("decision answered -> webhook verified", result.from_answer),
        ("call sent -> webhook verified", result.from_send),
    ):
        p50, p99 = percentiles(values)
        print(f"{name:<44}{p50:>9.2f}{p99:>9.2f}{statistics.fmean(values) * 1000:>9.2f}")
    first = sum(1 for v in result.from_answer if v < 0)
    print(
        f"  the webhook was verified before the agent had its answer in {first} of {calls} "
        "calls (negative 'answered -> webhook'): delivery starts when the approval opens"
    )


def print_throughput(cases: list[Case]) -> None:
    print("\n2. decisions/s with 5 webhook endpoints (1 never answering) against none")
    head = (
        f"{'mix':<22}{'service':<9}{'decisions/s':>12}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'delivered':>10}{'dropped':>9}{'srv CPU':>8}{'µs/dec':>8}{'other':>7}"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        if c.failed:
            print(f"{c.mix:<22}{c.service:<9}{'FAILED':>12}")
            continue
        print(
            f"{c.mix:<22}{c.service:<9}{c.rate:>12.0f}{c.p50_ms:>8.2f}{c.p99_ms:>8.2f}"
            f"{c.delivered:>10.0f}{c.dropped:>9.0f}{c.server_cpu:>7.0f}%{c.server_us:>8.0f}"
            f"{c.other_cpu:>6.0f}%"
        )
    for c in cases:
        for problem in c.problems:
            print(f"  ! {c.mix}, {c.service}: {problem}")
    print("\nGoal (issue 21): decisions/s with webhooks >= 0.95 x without, same run:")
    for mix in MIXES:
        rates = {
            name: [c.rate for c in cases if c.mix == mix and c.service == name]
            for name in ("none", "hooks")
        }
        broken = any(c.failed for c in cases if c.mix == mix)
        if broken or not rates["none"] or not rates["hooks"]:
            print(f"  {mix:<22} FAILED")
            continue
        none, hooks = statistics.fmean(rates["none"]), statistics.fmean(rates["hooks"])
        ratio = hooks / none
        verdict = "met" if ratio >= 0.95 else "NOT met"
        print(
            f"  {mix:<22} {hooks:.0f} / {none:.0f} decisions/s = {ratio:.3f}  {verdict} "
            f"(rounds: none {', '.join(f'{r:.0f}' for r in rates['none'])}; "
            f"hooks {', '.join(f'{r:.0f}' for r in rates['hooks'])})"
        )


def print_header(
    info: dict[str, str], ghz: str, options: Options, args: argparse.Namespace
) -> None:
    print("mcp-policy-engine approvals benchmark (bench/approvals.py)")
    for key, value in info.items():
        print(f"  {key}: {value}")
    print(f"  ghz: {tool_version(ghz)}")
    print(
        "  services: mcp-policy serve, in-process OPA, memory store, decision log in a temp "
        f"dir, pending caps {CAP}; the call: {TOOL} into an existing image set ({RULE})"
    )
    print(
        f"  1: {args.calls} calls one at a time after {args.warmup_calls} discarded; endpoints: "
        "an aiohttp receiver verifying each request (standardwebhooks) + one never answering"
    )
    print(
        f"  2: ghz gRPC Decide, {options.concurrency} concurrent, --cpus {options.client_cpus}, "
        f"{options.warmup:g} s warm-up + {options.duration:g} s per case, rounds none, hooks, "
        "hooks, none per mix; hooks = 4 endpoints answering 204 (a minimal HTTP/1.1 "
        "responder in this process) + 1 never answering (queue 1000, then drops the oldest)"
    )
    print(
        "  columns: srv CPU = the service process, other = the rest of the machine "
        "(this process's receivers included), in % of one core; µs/dec = the service's CPU "
        "time per decision answered (delivery included); delivered / dropped = webhook "
        "deliveries during the case, all endpoints (the hanging one drops once its queue "
        "of 1000 is full)"
    )
    print()


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.approvals",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=300, help="latency calls (300; >= 200)")
    parser.add_argument("--warmup-calls", type=int, default=30, help="discarded first (30)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per case (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per case (2)")
    parser.add_argument("--concurrency", type=int, default=16, help="ghz -c (16)")
    parser.add_argument("--client-cpus", type=int, default=1, help="ghz --cpus (1)")
    args = parser.parse_args(argv)
    if args.calls < 200:
        parser.error("--calls must be at least 200 (p99 of fewer means little)")
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.warmup_calls < 0:
        parser.error("--duration > 0, --warmup >= 0, --warmup-calls >= 0, --concurrency >= 1")
    return args


async def run(args: argparse.Namespace) -> int:
    ghz = find_tool("ghz")
    if ghz is None:
        raise BenchError("ghz is needed: run `make bench-tools` (builds it into .tools/bin)")
    options = Options(ghz, args.duration, args.warmup, args.concurrency, args.client_cpus)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="mcp-policy-approvals-"))
    secret = new_secret()
    cases: list[Case] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        )
        policy = copy_policy(work / "policy")
        hanging, hanging_url = await responder(hang=True)
        stack.callback(hanging.close)
        print_header(info, ghz, options, args)
        print("running:", file=sys.stderr)

        # 1. latency
        verifying = Verifying(secret)
        await verifying.start()
        stack.push_async_callback(verifying.stop)
        async with contextlib.AsyncExitStack() as latency_stack:
            endpoints = [{"url": verifying.url}, {"url": hanging_url, "timeout_seconds": 300}]
            service = await start_service(
                latency_stack, session, "latency", policy, work, endpoints, secret
            )
            print("  latency …", file=sys.stderr, flush=True)
            latency = await measure_latency(
                session, service, verifying, args.calls, args.warmup_calls
            )
        if verifying.rejected:
            raise BenchError(f"{verifying.rejected} webhooks did not verify")

        # 2. throughput
        fast = [await responder() for _ in range(4)]
        for server, _ in fast:
            stack.callback(server.close)
        hooks_endpoints = [{"url": url} for _, url in fast]
        hooks_endpoints.append({"url": hanging_url, "timeout_seconds": 300, "attempts": 1})
        none = await start_service(stack, session, "none", policy, work, [], secret)
        hooks = await start_service(stack, session, "hooks", policy, work, hooks_endpoints, secret)
        for mix in MIXES:
            for service in (none, hooks, hooks, none):
                cases.append(await run_case(session, options, service, mix, work))
    print_latency(latency, args.calls)
    print_throughput(cases)
    return 1 if any(c.failed for c in cases) else 0


def main(argv: list[str] | None = None) -> int:
    return run_main("bench.approvals", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
