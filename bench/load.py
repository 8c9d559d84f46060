"""Decision throughput and latency of the service beside raw OPA, driven by Go load tools.

`make bench` runs this (`python -m bench.load`); `make bench-tools` builds the tools at
the versions the Makefile pins: `hey` (HTTP), `ghz` (gRPC) and, for the peer,
opa-envoy-plugin. One run starts, all on loopback, and stops again whatever happens
(failures, Ctrl-C, SIGTERM; the kernel kills them if this process is killed):

- raw OPA, `opa run --server`, loaded with the policy: the baseline, queried with
  `POST /v1/data/mcp/decision` and the input document the service builds for the call;
- the service, `mcp-policy serve` with the engine of `--engine` (MCP_POLICY_ENGINE; with
  the OPA engine it starts its own OPA, as it does when deployed), a memory state store
  and a decision log in a temp dir, driven over HTTP Decide, gRPC Decide and Envoy
  ext_authz Check;
- the peer, when opa-envoy-plugin is built: OPA's own ext_authz server evaluating the same
  policy through a small wrapper rule (PEER_WRAPPER), driven with the same Check request;
  it must deny a call with a malformed id before it is measured.

Every case is one copy_image_set call with valid ids, the same for every request. The
policy is a copy of rego/ (tests left out) and policies/ with copy_image_set's rate limit
raised so that it never blocks: the limiter still counts every call. All three servers
load that copy.

For each concurrency, every case runs for the same duration after a discarded warm-up.
Latencies come from the tools' per-request output (hey's CSV, ghz's JSON details), never
their summaries. A case counts as failing, and shows no figures, when anything was wrong:
a non-2xx answer, a gRPC error, a probe before or after it that did not get the expected
answer, or (for the service) a decision other than allow in its own metrics, which
catches what the tools cannot see (a deny is an HTTP 200 and a gRPC OK). Then raw OPA's
rate at 16 concurrent is halved and every case is driven at that fixed rate, to compare
latencies when nothing is saturated. The exit status is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from envoy.service.auth.v3 import (  # type: ignore[import-untyped]
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from google.protobuf import descriptor_pb2, json_format, struct_pb2

from bench.common import (
    ARGUMENTS,
    BenchError,
    busy_cpu_seconds,
    children_cpu_seconds,
    cpu_seconds,
    descendants,
    drop_agent_limit,
    machine,
    percentiles,
    process_name,
    prometheus_counters,
    run_main,
)
from engine import translate
from engine.models import DecideRequest
from engine.policy.opa_process import OpaProcess, die_with_parent, free_loopback_port
from engine.policy.rest import Opa
from engine.policy.source import read_bundle
from engine.settings import PROJECT_ROOT
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc, types_pb2

SERVER = "awslabs.healthimaging-mcp-server"
TOOL = "copy_image_set"
AGENT = "bench-agent"
SESSION = "bench-session"
RAISED_LIMIT = 1_000_000_000  # calls per 60 s session window: never reached
TOOLS_BIN = PROJECT_ROOT / ".tools" / "bin"
DECIDE_CALL = "mcppolicy.v1.DecisionService.Decide"
CHECK_CALL = "envoy.service.auth.v3.Authorization.Check"
PEER_RULE = "envoy/mcp_bench/allow"
REQUEST_TIMEOUT_SECONDS = 10
START_TIMEOUT_SECONDS = 60.0
OTHERS_WARN_PERCENT = 20  # of one core, used by processes outside this run during a case

# The peer's policy entry point: Envoy's input turned into the decision input the service
# builds for a Check (engine/transports/extauthz.py, engine/translate.py), for the one shape sent
# here (a tools/call JSON-RPC body), then data.mcp.decision of the same modules and data.
# Allow and rate_limit allow (the peer keeps no counters); anything else denies.
PEER_WRAPPER = """\
package envoy.mcp_bench

import rego.v1

_http := input.attributes.request.http

_call := input.parsed_body

_decision_input := {
	"tool": {
		"server": input.attributes.contextExtensions.mcp_server,
		"name": _call.params.name,
		"arguments": object.get(_call.params, "arguments", {}),
	},
	"principal": {
		"agent_id": object.get(_http.headers, "x-mcp-agent-id", null),
		"session_id": _http.headers["mcp-session-id"],
		"user_id": object.get(_http.headers, "x-mcp-user-id", null),
		"roles": [],
		"authenticated": false,
		"method": null,
		"scopes": [],
		"claims": {},
		"asserted_by": null,
	},
	"request": {
		"id": "dec_peer",
		"time": time.format(time.now_ns()),
		"transport": "extauthz",
		"jsonrpc_id": _call.id,
	},
	"context": {},
}

default allow := false

allow if {
	_http.method == "POST"
	_call.jsonrpc == "2.0"
	_call.method == "tools/call"
	decision_input := _decision_input
	decision := data.mcp.decision with input as decision_input
	decision.action in {"allow", "rate_limit"}
}
"""


# ---------------------------------------------------------------------------- the tools


def find_tool(name: str) -> str | None:
    """The checkout's .tools/bin/NAME (what `make bench-tools` builds), else NAME on PATH."""
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def tool_version(path: str) -> str:
    """The module version a Go binary was built from (`go version -m`)."""
    go = shutil.which("go")
    if go is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info = subprocess.run(
                [go, "version", "-m", path], capture_output=True, text=True, timeout=30
            ).stdout
            for line in info.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "mod":
                    return f"{parts[1]}@{parts[2]}"
    return "version unknown"


def opa_version(path: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([path, "version"], capture_output=True, text=True, timeout=30)
        for line in out.stdout.splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "version unknown"


# ---------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Inputs:
    """One copy_image_set call in every shape the servers take it."""

    opa_body: dict[str, Any]  # {"input": …} for raw OPA
    decide_body: dict[str, Any]  # HTTP POST /v1/decide
    decide_grpc: Any  # mcppolicy.v1.DecideRequest
    check: Any  # envoy.service.auth.v3.CheckRequest


def build_inputs() -> Inputs:
    decide_body = {
        "server": SERVER,
        "tool": TOOL,
        "arguments": ARGUMENTS,
        "principal": {"agent_id": AGENT, "session_id": SESSION},
    }
    request = DecideRequest.model_validate(decide_body)
    call = translate.tool_call(request, max_depth=24)
    opa_input = translate.input_document(
        call,
        request,
        decision_id="dec_" + uuid.uuid4().hex,
        now=datetime.now(UTC),
        transport="http",
    )
    arguments = struct_pb2.Struct()
    arguments.update(ARGUMENTS)
    decide_grpc = decision_pb2.DecideRequest(
        server=SERVER,
        tool=TOOL,
        arguments=arguments,
        principal=types_pb2.Principal(agent_id=AGENT, session_id=SESSION),
    )
    return Inputs({"input": opa_input}, decide_body, decide_grpc, check_request(ARGUMENTS))


def check_request(arguments: dict[str, Any]) -> Any:
    """What Envoy's ext_authz filter sends (with_request_body) for one MCP tools/call.
    No principal headers: the service runs with no decision clients, and principal headers
    from a gateway it does not know are refused (identity.unproven_caller); the agent
    session is the Mcp-Session-Id."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": TOOL, "arguments": arguments},
        }
    )
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host, http.body = "POST", "/mcp", "imaging.internal", body
    http.headers.update(
        {
            ":method": "POST",
            ":path": "/mcp",
            ":authority": "imaging.internal",
            "content-type": "application/json",
            "content-length": str(len(body.encode())),
            "mcp-session-id": SESSION,
        }
    )
    check.attributes.context_extensions["mcp_server"] = SERVER
    return check


def protoset(file: Any) -> bytes:
    """A FileDescriptorSet of `file` and everything it imports (for ghz --protoset)."""
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: Any) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dependency in fd.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        out.file.append(proto)

    add(file)
    return out.SerializeToString()


def copy_policy(into: Path) -> list[Path]:
    """rego/ (without tests) and policies/ under `into`, copy_image_set's limit raised (and
    its per-agent one dropped)."""
    rego = shutil.copytree(
        PROJECT_ROOT / "rego", into / "rego", ignore=shutil.ignore_patterns("*_test.rego")
    )
    policies = shutil.copytree(PROJECT_ROOT / "policies", into / "policies")
    rules_file = policies / "rules.yaml"
    doc = yaml.safe_load(rules_file.read_text())
    rule = doc["mcp_policy"]["rules"][TOOL]
    if rule.get("action") != "rate_limit":
        raise BenchError(f"policies/rules.yaml: {TOOL} is no longer a rate_limit rule")
    rule["rate_limit"] = {"max": RAISED_LIMIT, "window": 60, "scope": "session"}
    rules_file.write_text(yaml.safe_dump(doc))
    drop_agent_limit(Path(rego))
    return [Path(rego), Path(policies)]


# ---------------------------------------------------------------------------- processes


def spawn(argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> Any:
    """Start a server: its own session (Ctrl-C reaches only us; we stop it), killed by
    the kernel if this process dies, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*die_with_parent(), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_for(what: str, ready: Callable[[], Awaitable[bool]], proc: Any, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not await ready():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited at start ({proc.returncode}):\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not start within {START_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(0.1)


async def http_ok(session: aiohttp.ClientSession, url: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        async with session.get(url) as response:
            return response.status == 200
    return False


@dataclass
class Service:
    proc: Any
    http: str
    grpc: str
    engine: str
    log: Path

    def tree(self) -> list[int]:
        return descendants(self.proc.pid)


async def start_service(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    policy: list[Path],
    work: Path,
    engine: str,
    *,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    name: str = "the service (mcp-policy serve)",
) -> Service:
    """`mcp-policy serve` on free loopback ports with a memory store, its log in `work`;
    `extra` arguments and `env` settings on top (the other benchmarks' variants)."""
    http_port, grpc_port = free_loopback_port(), free_loopback_port()
    script = Path(sys.executable).with_name("mcp-policy")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "engine.cli"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    environment.update(
        MCP_POLICY_ENGINE=engine,
        MCP_POLICY_STATE_STORE="memory",
        MCP_POLICY_APPROVER_TOKEN=secrets.token_hex(16),
    )
    environment.update(env or {})
    (work / "state").mkdir(parents=True)
    log = work / "service.log"
    argv = [*command, "serve", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    argv += ["--state-dir", str(work / "state"), "--decision-log", str(work / "decisions.jsonl")]
    argv += [flag for path in policy for flag in ("--policy", str(path))]
    proc = spawn([*argv, *(extra or []), "--log-level", "WARNING"], log=log, env=environment)
    stack.callback(stop, proc)
    url = f"http://127.0.0.1:{http_port}"

    async def ready() -> bool:
        return "HTTP on" in log.read_text(errors="replace") and await http_ok(
            session, f"{url}/readyz"
        )

    await wait_for(name, ready, proc, log)
    return Service(proc, url, f"127.0.0.1:{grpc_port}", engine, log)


@dataclass
class Peer:
    proc: Any
    grpc: str
    log: Path


async def start_peer(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    binary: str,
    policy: list[Path],
    work: Path,
) -> Peer:
    wrapper = work / "peer" / "mcp_bench.rego"
    wrapper.parent.mkdir()
    wrapper.write_text(PEER_WRAPPER)
    http_port, grpc_port = free_loopback_port(), free_loopback_port()
    log = work / "peer.log"
    proc = spawn(
        [
            binary,
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{http_port}",
            "--diagnostic-addr",
            f"127.0.0.1:{free_loopback_port()}",
            "--skip-version-check",
            "--log-level",
            "error",
            "--set",
            f"plugins.envoy_ext_authz_grpc.addr=127.0.0.1:{grpc_port}",
            "--set",
            f"plugins.envoy_ext_authz_grpc.path={PEER_RULE}",
            "--set",
            "decision_logs.console=false",
            *(str(path) for path in policy),
            str(wrapper),
        ],
        log=log,
    )
    stack.callback(stop, proc)

    async def ready() -> bool:
        return await http_ok(session, f"http://127.0.0.1:{http_port}/health?plugins")

    await wait_for("opa-envoy-plugin", ready, proc, log)
    peer = Peer(proc, f"127.0.0.1:{grpc_port}", log)
    await peer_denies_bad_ids(peer)
    return peer


async def peer_denies_bad_ids(peer: Peer) -> None:
    """The peer must deny what the policy denies (a malformed id), or its wrapper rule
    does not evaluate the policy and its figures would mean nothing."""
    bad = check_request({**ARGUMENTS, "datastore_id": "not-a-hex-id"})
    async with grpc.aio.insecure_channel(peer.grpc) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        try:
            response = await stub.Check(bad, timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"opa-envoy-plugin Check failed: {exc.code().name}") from exc
    if response.status.code == 0:
        raise BenchError(
            "opa-envoy-plugin allowed a copy_image_set with a malformed id, which the "
            f"policy denies: its wrapper rule does not evaluate the policy\n{tail(peer.log)}"
        )


# ---------------------------------------------------------------------------- one case


# Server-side answer counts: (as expected, {what else: how many}).
Counts = tuple[float, dict[str, float]]


@dataclass(frozen=True)
class Target:
    """One thing to drive: a server endpoint with the tool that drives it."""

    case: str
    tool: str  # "hey" or "ghz"
    endpoint: list[str]  # the tool arguments naming the call, its body and address
    probe: Callable[[], Awaitable[str | None]]  # None: answered as expected
    # Answers the server gave (as expected, otherwise): catches what the client cannot
    # see (a deny inside an HTTP 200 or a gRPC OK), or requests it never counted.
    counts: Callable[[], Awaitable[Counts]] | None
    pids: Callable[[], list[int]]
    role: str = "service"  # "baseline" (raw OPA), "service" or "peer"
    # The service's own time per stage (mcp_policy_stage_seconds: sums and a count).
    stages: Callable[[], Awaitable[Stages]] | None = None


@dataclass(frozen=True)
class Sample:
    latencies: list[float]  # seconds, of the answered-as-expected requests
    errors: int
    kinds: dict[str, int]
    span: float  # seconds from the first request's start to the last answer's end
    cut: int = 0  # calls in flight when the tool stopped, cut off by the tool itself


Stages = tuple[float, dict[str, float]]  # decisions counted, seconds per stage


@dataclass
class Result:
    case: str
    tool: str
    concurrency: int
    rate: float  # decisions/s
    p50_ms: float
    p99_ms: float
    answered: int
    errors: int
    client_cpu: float  # % of one core
    server_cpu: float
    other_cpu: float  # what everything else on the machine used meanwhile
    target_rate: float | None = None
    problems: list[str] = field(default_factory=list)
    cut: int = 0
    role: str = "service"
    stage_us: dict[str, float] = field(default_factory=dict)  # mean per decision

    @property
    def baseline(self) -> bool:
        return self.role == "baseline"

    @property
    def failed(self) -> bool:
        return self.errors > 0 or bool(self.problems) or self.answered == 0


def parse_hey(text: str) -> Sample:
    latencies: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    kinds: dict[str, int] = {}
    errors = 0
    for row in csv.DictReader(text.splitlines()):
        status = int(row["status-code"])
        latency, offset = float(row["response-time"]), float(row["offset"])
        starts.append(offset)
        ends.append(offset + latency)
        if 200 <= status < 300:
            latencies.append(latency)
        else:
            errors += 1
            kinds[f"HTTP {status}"] = kinds.get(f"HTTP {status}", 0) + 1
    span = max(ends) - min(starts) if starts else 0.0
    return Sample(latencies, errors, kinds, span)


_TIME = re.compile(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def go_time(text: str) -> float:
    """A Go RFC 3339 time with up to nanoseconds, as POSIX seconds."""
    match = _TIME.match(text)
    if match is None:
        raise ValueError(f"not a time: {text!r}")
    head, fraction, zone = match.groups()
    seconds = datetime.fromisoformat(head + ("+00:00" if zone == "Z" else zone)).timestamp()
    return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


# How a call in flight when ghz's -z duration ends fails: ghz closes its connection.
_CUT_OFF = ("use of closed network connection", "client connection is closing", "canceled")


def parse_ghz(text: str, duration: float) -> Sample:
    """ghz's JSON report. Calls that failed only because ghz closed its connection at the
    end of `duration` (at most one per worker) are counted apart, not as errors."""
    report = json.loads(text)
    details = report.get("details") or []
    if report.get("count") and len(details) < report["count"]:
        raise ValueError("ghz kept fewer details than calls; shorten --duration")
    calls = []
    for detail in details:
        latency = detail["latency"] / 1e9
        end = go_time(detail["timestamp"])  # ghz stamps a call when it ends
        calls.append((end - latency, end, latency, detail))
    first = min((start for start, *_ in calls), default=0.0)
    latencies: list[float] = []
    ends: list[float] = []
    kinds: dict[str, int] = {}
    errors = cut = 0
    for _start, end, latency, detail in calls:
        error = str(detail.get("error") or "")
        if detail.get("status") == "OK" and not error:
            latencies.append(latency)
            ends.append(end)
        elif end >= first + duration - 0.05 and any(c in error.lower() for c in _CUT_OFF):
            cut += 1
        else:
            errors += 1
            kind = f"{detail.get('status')}: {error}"[:160]
            kinds[kind] = kinds.get(kind, 0) + 1
    span = max(ends) - first if ends else 0.0
    return Sample(latencies, errors, kinds, span, cut)


@dataclass(frozen=True)
class Options:
    duration: float
    warmup: float
    client_cpus: int
    grpc_connections: int
    hey: str
    ghz: str


def tool_argv(
    target: Target,
    options: Options,
    concurrency: int,
    seconds: float,
    rate: float | None,
    report: Path,
) -> list[str]:
    """The command line of one run; hey writes its CSV to stdout, ghz its JSON to `report`."""
    duration = f"{seconds:g}s"
    if target.tool == "hey":
        argv = [options.hey, "-z", duration, "-c", str(concurrency), "-o", "csv"]
        argv += ["-cpus", str(options.client_cpus), "-t", str(REQUEST_TIMEOUT_SECONDS)]
        if rate is not None:  # hey's -q is per worker
            argv += ["-q", f"{rate / concurrency:.4f}"]
        return [*argv, *target.endpoint]
    argv = [options.ghz, "--insecure", "-c", str(concurrency), "-z", duration]
    argv += ["--format", "json", "--output", str(report)]
    argv += ["--connections", str(min(options.grpc_connections, concurrency))]
    argv += ["--cpus", str(options.client_cpus), "--timeout", f"{REQUEST_TIMEOUT_SECONDS}s"]
    argv += ["--disable-template-functions", "--disable-template-data"]
    if rate is not None:
        argv += ["--rps", str(max(1, round(rate)))]
    return [*argv, *target.endpoint]


async def run_tool(argv: list[str], out: Path) -> tuple[int, str]:
    """Run a load tool to the end; its output into `out`. Killed if we are cancelled."""
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *die_with_parent(),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return proc.returncode or 0, stderr.decode(errors="replace").strip()


async def run_case(
    target: Target,
    options: Options,
    work: Path,
    concurrency: int,
    rate: float | None = None,
) -> Result:
    label = target.case if rate is None else f"{target.case} @ {rate:.0f}/s"
    print(f"  {label}, {concurrency} concurrent …", file=sys.stderr, flush=True)
    stdout, report = work / "tool.out", work / "ghz.json"
    if options.warmup > 0:
        await run_tool(
            tool_argv(target, options, concurrency, options.warmup, rate, report), stdout
        )
    report.unlink(missing_ok=True)
    problems: list[str] = []
    if (problem := await target.probe()) is not None:
        problems.append(f"probe before: {problem}")
    nothing: Counts = (0.0, {})
    counts_before = await target.counts() if target.counts else nothing
    stages_before = await target.stages() if target.stages else None
    server_before, client_before = cpu_seconds(target.pids()), children_cpu_seconds()
    busy_before, started = busy_cpu_seconds(), time.perf_counter()
    argv = tool_argv(target, options, concurrency, options.duration, rate, report)
    code, stderr = await run_tool(argv, stdout)
    wall = time.perf_counter() - started
    server = cpu_seconds(target.pids()) - server_before
    client = children_cpu_seconds() - client_before
    other = max(0.0, busy_cpu_seconds() - busy_before - server - client)
    counts_after = await target.counts() if target.counts else nothing
    stage_us: dict[str, float] = {}
    if target.stages is not None and stages_before is not None:
        count_after, sums_after = await target.stages()
        decided_here = count_after - stages_before[0]
        if decided_here > 0:
            stage_us = {
                stage: (sums_after[stage] - stages_before[1].get(stage, 0.0)) / decided_here * 1e6
                for stage in sums_after
            }
    if (problem := await target.probe()) is not None:
        problems.append(f"probe after: {problem}")
    if code != 0:
        problems.append(f"{target.tool} exited {code}: {stderr[-300:]}")
    try:
        if target.tool == "hey":
            sample = parse_hey(stdout.read_text(errors="replace"))
        else:
            sample = parse_ghz(report.read_text(errors="replace"), options.duration)
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"unreadable {target.tool} output: {exc}")
        sample = Sample([], 0, {}, 0.0)
    errors = sample.errors
    problems += [f"{n} × {kind}" for kind, n in sorted(sample.kinds.items())]
    if target.counts is not None:
        decided = int(counts_after[0] - counts_before[0])
        for kind, after in sorted(counts_after[1].items()):
            wrong = int(after - counts_before[1].get(kind, 0.0))
            if wrong > 0:
                errors += wrong
                decided += wrong
                problems.append(f"{wrong} × {kind} (the server's own count)")
        if len(sample.latencies) > decided:  # answers that no decision stands behind
            missing = len(sample.latencies) - decided
            errors += missing
            problems.append(f"{missing} answers the server did not count as decided")
    p50, p99 = percentiles(sample.latencies) if sample.latencies else (0.0, 0.0)
    rate_seen = len(sample.latencies) / sample.span if sample.span > 0 else 0.0
    return Result(
        case=label,
        tool=target.tool,
        concurrency=concurrency,
        rate=rate_seen,
        p50_ms=p50,
        p99_ms=p99,
        answered=len(sample.latencies),
        errors=errors,
        client_cpu=client / wall * 100,
        server_cpu=server / wall * 100,
        other_cpu=other / wall * 100,
        target_rate=rate,
        problems=problems,
        cut=sample.cut,
        role=target.role,
        stage_us=stage_us,
    )


# ---------------------------------------------------------------------------- targets


def targets(
    session: aiohttp.ClientSession,
    opa: OpaProcess,
    service: Service,
    peer: Peer | None,
    channels: dict[str, grpc.aio.Channel],
    inputs: Inputs,
    files: Path,
) -> list[Target]:
    """The cases, raw OPA first; the bodies they send are written under `files`."""
    opa_body = files / "opa-input.json"
    opa_body.write_text(json.dumps(inputs.opa_body))
    decide_body = files / "decide.json"
    decide_body.write_text(json.dumps(inputs.decide_body))
    decide_grpc = files / "decide-grpc.json"
    decide_grpc.write_text(json.dumps(json_format.MessageToDict(inputs.decide_grpc)))
    check = files / "check.json"
    check.write_text(json.dumps(json_format.MessageToDict(inputs.check)))
    check_set = files / "external_auth.protoset"
    check_set.write_bytes(protoset(external_auth_pb2.DESCRIPTOR))
    post = ["-m", "POST", "-T", "application/json", "-D"]
    decide_set = files / "decision.protoset"
    decide_set.write_bytes(protoset(decision_pb2.DESCRIPTOR))
    decide_proto = ["--protoset", str(decide_set)]
    check_proto = ["--protoset", str(check_set), "--call", CHECK_CALL, "-D", str(check)]
    decision_url = f"{opa.url}/v1/data/mcp/decision"

    async def opa_probe() -> str | None:
        try:
            async with session.post(decision_url, json=inputs.opa_body) as response:
                body = await response.json()
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"raw OPA unreachable: {exc!r}"
        result = body.get("result") or {}
        if result.get("action") != "rate_limit":
            return f"raw OPA answered {json.dumps(body)[:200]}"
        return None

    async def opa_counts() -> Counts:
        async with session.get(f"{opa.url}/metrics") as response:
            text = await response.text()
        ok = 0.0
        for labels, value in prometheus_counters(text, "http_request_duration_seconds_count"):
            if labels.get("handler") == "v1/data" and labels.get("method") == "post":
                if labels.get("code") == "200":
                    ok += value
        return ok, {}  # a non-200 is an error hey sees itself

    async def service_counts() -> Counts:
        async with session.get(f"{service.http}/metrics") as response:
            text = await response.text()
        allowed = 0.0
        other: dict[str, float] = {}
        for labels, value in prometheus_counters(text, "mcp_policy_decisions_total"):
            if labels.get("verdict") == "allow" and labels.get("tool") == TOOL:
                allowed += value
            else:
                kind = f"{labels.get('verdict')} by rule {labels.get('rule')}"
                other[kind] = other.get(kind, 0.0) + value
        return allowed, other

    async def service_stages() -> Stages:
        async with session.get(f"{service.http}/metrics") as response:
            text = await response.text()
        sums = {
            labels["stage"]: value
            for labels, value in prometheus_counters(text, "mcp_policy_stage_seconds_sum")
        }
        count = max(
            (v for _, v in prometheus_counters(text, "mcp_policy_stage_seconds_count")), default=0.0
        )
        return count, sums

    async def http_probe() -> str | None:
        try:
            async with session.post(
                f"{service.http}/v1/decide", json=inputs.decide_body
            ) as response:
                body = await response.json()
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"HTTP Decide failed: {exc!r}"
        if body.get("verdict") != "allow":
            return f"HTTP Decide answered {json.dumps(body)[:200]}"
        return None

    decide_stub = decision_pb2_grpc.DecisionServiceStub(channels["service"])

    async def grpc_probe() -> str | None:
        try:
            response = await decide_stub.Decide(inputs.decide_grpc, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return f"gRPC Decide failed: {exc.code().name} {exc.details()}"
        if response.verdict != types_pb2.VERDICT_ALLOW:
            return f"gRPC Decide answered {response.verdict} {response.reason}"
        return None

    def check_probe(channel: grpc.aio.Channel) -> Callable[[], Awaitable[str | None]]:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)

        async def probe() -> str | None:
            try:
                response = await stub.Check(inputs.check, timeout=5)
            except grpc.aio.AioRpcError as exc:
                return f"Check failed: {exc.code().name} {exc.details()}"
            if response.status.code != 0 or response.HasField("denied_response"):
                return f"Check denied: {response.status.code} {response.status.message[:200]}"
            return None

        return probe

    found = [
        Target(
            "raw OPA REST /v1/data",
            "hey",
            [*post, str(opa_body), decision_url],
            opa_probe,
            opa_counts,
            lambda: [opa.pid] if opa.pid else [],
            role="baseline",
        ),
        Target(
            "service HTTP Decide",
            "hey",
            [*post, str(decide_body), f"{service.http}/v1/decide"],
            http_probe,
            service_counts,
            service.tree,
            stages=service_stages,
        ),
        Target(
            "service gRPC Decide",
            "ghz",
            [*decide_proto, "--call", DECIDE_CALL, "-D", str(decide_grpc), service.grpc],
            grpc_probe,
            service_counts,
            service.tree,
            stages=service_stages,
        ),
        Target(
            "service ext_authz Check",
            "ghz",
            [*check_proto, service.grpc],
            check_probe(channels["service"]),
            service_counts,
            service.tree,
            stages=service_stages,
        ),
    ]
    if peer is not None:
        peer_pid = peer.proc.pid
        found.append(
            Target(
                "opa-envoy-plugin Check",
                "ghz",
                [*check_proto, peer.grpc],
                check_probe(channels["peer"]),
                None,
                lambda: [peer_pid],
                role="peer",
            )
        )
    return found


# ---------------------------------------------------------------------------- report


def print_table(results: list[Result]) -> None:
    baseline = {
        (r.concurrency, r.target_rate): r.rate for r in results if r.baseline and not r.failed
    }
    head = (
        f"{'case':<38}{'tool':>5}{'conc':>5}{'decisions/s':>12}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'errors':>7}{'vs OPA':>7}{'tool CPU':>9}{'srv CPU':>8}{'other':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        cpu = f"{r.client_cpu:>8.0f}%{r.server_cpu:>7.0f}%{r.other_cpu:>5.0f}%"
        if r.failed:
            print(
                f"{r.case:<38}{r.tool:>5}{r.concurrency:>5}{'FAILED':>12}{'-':>8}{'-':>8}"
                f"{r.errors:>7}{'-':>7}{cpu}"
            )
            continue
        base = baseline.get((r.concurrency, r.target_rate))
        ratio = f"{r.rate / base:.2f}" if base else "-"
        print(
            f"{r.case:<38}{r.tool:>5}{r.concurrency:>5}{r.rate:>12.0f}{r.p50_ms:>8.2f}"
            f"{r.p99_ms:>8.2f}{r.errors:>7}{ratio:>7}{cpu}"
        )
    staged = [r for r in results if r.stage_us and not r.failed]
    if staged:
        stages = list(staged[0].stage_us)
        print(
            "\nWhere the service's time goes, µs per decision (its own clock, "
            "mcp_policy_stage_seconds; the rest of p50 is transport, queueing and the client):"
        )
        print(f"{'case':<38}{'conc':>5}" + "".join(f"{s:>10}" for s in stages) + f"{'sum':>9}")
        for r in staged:
            cells = "".join(f"{r.stage_us[s]:>10.0f}" for s in stages)
            print(f"{r.case:<38}{r.concurrency:>5}{cells}{sum(r.stage_us.values()):>9.0f}")
    for r in results:
        for problem in r.problems:
            print(f"  ! {r.case} ({r.concurrency} concurrent): {problem}")
    cut = [r for r in results if r.cut]
    if cut:
        most = max(r.cut / r.concurrency for r in cut)
        print(
            f"  ghz cut off the calls in flight when its duration ended ({sum(r.cut for r in cut)} "
            f"in {len(cut)} cases, at most {most:.0f} per worker): left out, not errors"
        )
    busy = [r for r in results if r.other_cpu > OTHERS_WARN_PERCENT]
    if busy:
        print(
            f"  ! in {len(busy)} of {len(results)} cases other processes on this machine used "
            f"more than {OTHERS_WARN_PERCENT}% of a core (up to "
            f"{max(r.other_cpu for r in busy):.0f}%, the other column): those figures are "
            "disturbed; run again on a quiet machine"
        )


def print_goals(results: list[Result], rate: float | None) -> None:
    raw16 = next(
        (r for r in results if r.baseline and r.concurrency == 16 and not r.target_rate), None
    )
    print("\nGoals (issue on decision cost):")
    if raw16 is None or raw16.failed:
        print("  no usable raw OPA figure at 16 concurrent: nothing to compare")
        return
    print(f"  1. at 16 concurrent, decisions/s >= 1.0x raw OPA REST ({raw16.rate:.0f}/s):")
    service16 = [
        r for r in results if r.role == "service" and r.concurrency == 16 and not r.target_rate
    ]
    if not service16:
        print("     the service did not run at 16 concurrent (add 16 to --concurrency)")
    for r in service16:
        if r.failed:
            print(f"     {r.case:<30} FAILED")
        else:
            ratio = r.rate / raw16.rate
            verdict = "met" if ratio >= 1.0 else "NOT met"
            print(f"     {r.case:<30} {ratio:.2f}x  {verdict}")
    fixed = [r for r in results if r.target_rate is not None]
    base = next((r for r in fixed if r.baseline), None)
    if rate is None or base is None or base.failed:
        print("  2. no usable fixed-rate raw OPA figure")
        return
    print(
        f"  2. at {rate:.0f}/s (half raw OPA's max), p99 <= raw OPA's p99 "
        f"({base.p99_ms:.2f} ms) + 1 ms:"
    )
    for r in fixed:
        if r.baseline:
            continue
        name = r.case.split(" @ ")[0]
        if r.failed:
            print(f"     {name:<30} FAILED")
            continue
        diff = r.p99_ms - base.p99_ms
        verdict = "met" if diff <= 1.0 else "NOT met"
        short = " (rate not reached)" if r.rate < 0.95 * rate else ""
        print(
            f"     {name:<30} p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms "
            f"({diff:+.2f} ms){short}  {verdict}"
        )


# ---------------------------------------------------------------------------- main


def case_options(parser: argparse.ArgumentParser) -> None:
    """The options every HTTP/gRPC load benchmark takes: --duration, --warmup,
    --concurrency, --engine, --client-cpus."""
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case (10)")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of discarded warm-up per case (2)"
    )
    parser.add_argument(
        "--concurrency", default="1,16", help="comma-separated concurrencies (1,16)"
    )
    parser.add_argument(
        "--engine",
        choices=["inprocess", "opa"],
        default=os.environ.get("MCP_POLICY_ENGINE", "inprocess"),
        help="the service's policy engine, passed as MCP_POLICY_ENGINE (default inprocess)",
    )
    parser.add_argument(
        "--client-cpus",
        type=int,
        default=1,
        help="GOMAXPROCS of the load tools (hey -cpus, ghz --cpus; default 1: a tool never "
        "takes more than one of the cores the servers need)",
    )


def parsed_cases(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with `levels` (the concurrencies) checked."""
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency: comma-separated whole numbers, e.g. 1,16")
    if not args.levels or min(args.levels) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("concurrencies must be >= 1, --duration > 0, --warmup >= 0")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    case_options(parser)
    parser.add_argument(
        "--grpc-connections", type=int, default=1, help="ghz --connections (default 1)"
    )
    parser.add_argument("--no-fixed-rate", action="store_true", help="skip the fixed-rate part")
    return parsed_cases(parser, argv)


async def run(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    info = machine()
    hey, ghz = find_tool("hey"), find_tool("ghz")
    if hey is None or ghz is None:
        raise BenchError(
            "hey and ghz are needed: run `make bench-tools` (builds them into .tools/bin)"
        )
    plugin = find_tool("opa-envoy-plugin")
    options = Options(args.duration, args.warmup, args.client_cpus, args.grpc_connections, hey, ghz)
    work = Path(tempfile.mkdtemp(prefix="mcp-policy-load-"))
    results: list[Result] = []
    fixed_rate: float | None = None
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        )
        policy = copy_policy(work / "policy")
        opa = OpaProcess("opa")
        await opa.start()
        stack.push_async_callback(opa.stop)
        loader = Opa(opa.url, timeout=10)
        await loader.open()
        try:
            await loader.load(read_bundle(policy))
        finally:
            await loader.close()
        service = await start_service(stack, session, policy, work, args.engine)
        peer = await start_peer(stack, session, plugin, policy, work) if plugin else None
        channels = {"service": grpc.aio.insecure_channel(service.grpc)}
        if peer is not None:
            channels["peer"] = grpc.aio.insecure_channel(peer.grpc)
        for channel in channels.values():
            stack.push_async_callback(channel.close)
        (work / "files").mkdir()
        cases = targets(session, opa, service, peer, channels, build_inputs(), work / "files")

        tree = ", ".join(f"{process_name(pid)} (pid {pid})" for pid in service.tree())
        evaluates = (
            "through an OPA child process (over REST)"
            if any(process_name(pid) == "opa" for pid in service.tree())
            else "in-process (no OPA child process)"
        )
        print_header(info, load_before, opa, hey, ghz, plugin, options, args, tree, evaluates)

        print("running:", file=sys.stderr)
        for concurrency in args.levels:
            for target in cases:
                results.append(await run_case(target, options, work, concurrency))
        if not args.no_fixed_rate:
            raw16 = next(
                (r for r in results if r.baseline and r.concurrency == 16 and not r.failed),
                None,
            )
            if raw16 is None and 16 not in args.levels:
                raw16 = await run_case(cases[0], options, work, 16)
                results.append(raw16)
            if raw16 is not None and not raw16.failed:
                fixed_rate = raw16.rate / 2
                for target in cases:
                    results.append(await run_case(target, options, work, 16, fixed_rate))
    print()
    print_table(results)
    print_goals(results, fixed_rate)
    return 1 if any(r.failed for r in results) else 0


def print_header(
    info: dict[str, str],
    load_before: tuple[float, float, float],
    opa: OpaProcess,
    hey: str,
    ghz: str,
    plugin: str | None,
    options: Options,
    args: argparse.Namespace,
    tree: str,
    evaluates: str,
) -> None:
    print("mcp-policy-engine load benchmark (bench/load.py)")
    for key, value in info.items():
        if key.startswith("load average"):
            value = " ".join(f"{x:.2f}" for x in load_before)
            key = "load average before start (1/5/15 min)"
        print(f"  {key}: {value}")
    print(f"  OPA: {opa.binary} {opa_version(opa.binary)}")
    print(f"  hey: {tool_version(hey)}; ghz: {tool_version(ghz)}")
    if plugin:
        print(f"  peer: {tool_version(plugin)}, {opa_version(plugin)}")
    else:
        print("  peer: opa-envoy-plugin not built (`make bench-tools`): its rows are left out")
    print(
        f"  service: mcp-policy serve, engine requested {args.engine} (MCP_POLICY_ENGINE); "
        f"it decides {evaluates}; processes: {tree}"
    )
    print(
        "  service settings: memory state store, decision log (JSONL and SQLite) in a temp "
        "dir, no callers' authentication"
    )
    print(
        f"  policy: rego/ (tests left out) + policies/, with {TOOL}'s rate limit raised to "
        f"{RAISED_LIMIT} per 60 s session so it never blocks; the limiter still counts every "
        "call; raw OPA, the service and the peer load that same copy"
    )
    print(
        f"  the call: {TOOL} on {SERVER}, valid 32-hex ids, one session; raw OPA gets the "
        "input document the service builds for it (engine/translate.py)"
    )
    if plugin:
        print(
            f"  the peer evaluates data.{PEER_RULE.replace('/', '.')}: the Envoy input turned "
            "into the decision input, then data.mcp.decision; allow or rate_limit allow (no "
            "counters, no decision log)"
        )
    cores = info.get("usable cores", info["nproc"])
    print(
        f"  each case: {options.warmup:g} s warm-up (discarded), then {options.duration:g} s; "
        f"hey -cpus {options.client_cpus}, ghz --cpus {options.client_cpus} --connections "
        f"{options.grpc_connections}"
    )
    print(
        f"  CPU: the load tool shares the {cores} cores with the server it drives (the other "
        "servers idle meanwhile). Its GOMAXPROCS is capped (--client-cpus) so it never runs "
        "on more than that many cores at once; no taskset, since pinning it to one core "
        "would pin the servers to the other, and raw OPA (Go) and the service (Python and "
        "its OPA) each use both. Columns, in % of one core: tool CPU = the load tool, "
        "srv CPU = the driven server (its OPA child included), other = the rest of the "
        "machine meanwhile"
    )
    print(
        "  figures: hey prints latencies in 0.1 ms steps, ghz in ns; p50/p99 are computed "
        "here from every request; decisions/s = answered requests / (first start to last "
        "end); vs OPA = decisions/s over raw OPA's in the same kind of case"
    )
    print(
        "  fixed rate: hey -q (per worker: rate / 16) and ghz --rps pace the requests but "
        "each worker waits for its answer, so a server slower than the rate is sent fewer "
        "(marked 'rate not reached') rather than queueing them"
    )
    print()


def main(argv: list[str] | None = None) -> int:
    return run_main("bench.load", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
