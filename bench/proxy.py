"""What `mcp-policy proxy` adds to a tools/call, beside the same call made straight to the
same MCP server: over stdio and over streamable HTTP, with decisions embedded
(`--embedded`) and over gRPC (`--decision-url`, a `mcp-policy serve` started here), in
one run.

Run with `.venv/bin/python -m bench.proxy` (`make bench` runs it too; needs the in-process
OPA library, `make tools`). Every process is on loopback and stopped at the end.

The upstream is a minimal MCP server of this module's own (`--upstream-server stdio|http`,
one JSON answer per request, no SDK) and the agent a raw JSON-RPC client in this process
(one line or one POST per message, blocking reads), so that the figures are the proxy's
and not a framework's. Calls are sequential (one agent waits for each answer, as an agent
does): `--calls` (1,500) copy_image_set calls after `--warmup` (200), then `--refused`
(500) calls with a malformed datastore id, which the policy denies (never forwarded).

Each proxied path runs with two policies:

- `shipped`: the shipped policy (the two 32-hex id checks, the catalog, a rate limit),
  with copy_image_set's limit (10 per 60 s) raised to 1,000,000 per 0.1 s, so every call
  is allowed, yet checked and recorded by the rate-limit store;
- `trivial`: one Rego rule (allow, deny for the one malformed id the refused calls send)
  and no rate limit, so what is left is the proxy's own cost: reading, screening,
  relaying, the decision service's bookkeeping around a policy that costs next to nothing.

Beside the latencies (p50, p99, and what the proxy adds to each: proxied minus direct),
the CPU time per allowed call of the proxy process and, over gRPC, of the decision
service: a figure the other processes sharing the machine disturb less than latency.

`--breakdown` runs the stdio proxy once more per decider and policy with timing probes
around its stages (screen, decide and its parts, forward, the upstream's answer, the
answer to the agent, the outcome report) and prints the time each takes per call.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import http.client
import inspect
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import ARGUMENTS, cpu_seconds, drop_agent_limit, machine, percentiles
from engine.policy.opa_process import die_with_parent
from engine.settings import PROJECT_ROOT

SERVER_NAME = "awslabs.healthimaging-mcp-server"
PROTOCOL = "2025-11-25"
REFUSED_ARGUMENTS = {**ARGUMENTS, "datastore_id": "not-a-32-hex-id"}
START_TIMEOUT = 60.0
READ_TIMEOUT = 30.0
# The targets (2 cores): what the stdio proxy adds, embedded and over gRPC, in ms.
GOALS = [("--embedded", 0, 0.25), ("--embedded", 1, 1.0), ("gRPC", 0, 0.5)]

TRIVIAL_REGO = f"""\
package mcp

# METADATA
# entrypoint: true
default decision := {{"action": "allow", "rule": "bench.allow"}}

decision := {{"action": "deny", "rule": "bench.deny", "reason": "malformed datastore id"}} if {{
\tinput.tool.arguments.datastore_id == "{REFUSED_ARGUMENTS["datastore_id"]}"
}}
"""


class BenchError(Exception):
    """Something the benchmark needs did not start or answered wrongly."""


# The minimal upstream MCP server: `python -m bench.proxy --upstream-server stdio|http`.

TOOLS = [
    {"name": "copy_image_set", "inputSchema": {"type": "object"}},
    {"name": "delete_datastore", "inputSchema": {"type": "object"}},
]


def _result(message: dict[str, Any]) -> dict[str, Any]:
    method = message.get("method")
    if method == "initialize":
        version = (message.get("params") or {}).get("protocolVersion", PROTOCOL)
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": SERVER_NAME, "version": "0"},
        }
    if method == "tools/list":
        return {"tools": TOOLS}
    if method == "tools/call":
        return {"content": [{"type": "text", "text": "copied"}], "isError": False}
    return {}


def _answer(message: Any) -> bytes | None:
    """The answer line to one message (None for notifications and responses)."""
    if not isinstance(message, dict) or "method" not in message or "id" not in message:
        return None
    answer = {"jsonrpc": "2.0", "id": message["id"], "result": _result(message)}
    return json.dumps(answer, separators=(",", ":")).encode()


def serve_stdio() -> int:
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        answer = _answer(json.loads(line))
        if answer is not None:
            out.write(answer + b"\n")
            out.flush()
    return 0


def serve_http() -> int:
    """Streamable HTTP at /mcp: JSON answers, 202 for notifications, no GET stream."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ", 1)[0]
                headers = {}
                for text in lines[1:]:
                    name, sep, value = text.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, extra, payload = "405 Method Not Allowed", "", b""
                if method == "POST":
                    message = json.loads(body)
                    answer = _answer(message)
                    if answer is None:
                        status = "202 Accepted"
                    else:
                        status, payload = "200 OK", answer
                        extra = "Content-Type: application/json\r\n"
                        if message.get("method") == "initialize":
                            extra += f"Mcp-Session-Id: {uuid.uuid4().hex}\r\n"
                elif method == "DELETE":
                    status = "200 OK"
                writer.write(
                    f"HTTP/1.1 {status}\r\n{extra}Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"listening on http://127.0.0.1:{port}/mcp", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


UPSTREAM = [sys.executable, "-m", "bench.proxy", "--upstream-server"]


# Processes.


def spawn(argv: list[str], *, log: Path, env: dict[str, str], stdout: Any = None) -> Any:
    """Start a process in its own session, killed by the kernel if this one dies."""
    with log.open("ab") as err:
        return subprocess.Popen(
            [*die_with_parent(), *argv],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else err,
            stderr=err,
            env=env,
            cwd=str(PROJECT_ROOT),
            start_new_session=True,
        )


def stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_line(proc: Any, marker: str, log: Path, what: str) -> str:
    """The first line of `proc`'s stdout (a pipe) holding `marker`."""
    deadline = time.monotonic() + START_TIMEOUT
    fd = proc.stdout.fileno()
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
            for line in buffer.decode(errors="replace").splitlines():
                if marker in line:
                    return line
        elif proc.poll() is not None:
            break
    raise BenchError(f"{what} did not start:\n{tail(log)}")


# Clients: one JSON-RPC message at a time, as an agent sends them.


class StdioClient:
    """An agent running `argv` as its MCP server, over the child's stdin and stdout."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*die_with_parent(), *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=str(PROJECT_ROOT),
                bufsize=0,
            )
        self.log = log
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        self._buffer = b""
        self._ids = 0

    def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
                return line
            ready, _, _ = select.select([self._out], [], [], READ_TIMEOUT)
            chunk = os.read(self._out, 1 << 20) if ready else b""
            if not chunk:
                raise BenchError(f"the stdio server went away or hung:\n{tail(self.log)}")
            self._buffer += chunk

    def notify(self, method: str) -> None:
        os.write(self._in, json.dumps({"jsonrpc": "2.0", "method": method}).encode() + b"\n")

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._ids += 1
        message = {"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params}
        os.write(self._in, json.dumps(message).encode() + b"\n")
        while True:
            answer: dict[str, Any] = json.loads(self._line())
            if answer.get("id") == self._ids:
                return answer

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HttpClient:
    """An agent speaking streamable HTTP to `url` over one keep-alive connection."""

    def __init__(self, url: str) -> None:
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.rpartition(":")
        self.path = "/" + path
        self.connection = http.client.HTTPConnection(host, int(port), timeout=READ_TIMEOUT)
        self.session: str | None = None
        self._ids = 0

    def _post(self, message: dict[str, Any]) -> tuple[int, bytes, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        if self.session is not None:
            headers["Mcp-Session-Id"] = self.session
            headers["MCP-Protocol-Version"] = PROTOCOL
        self.connection.request("POST", self.path, json.dumps(message).encode(), headers)
        response = self.connection.getresponse()
        body = response.read()
        if self.session is None:
            self.session = response.getheader("mcp-session-id")
        return response.status, body, response.getheader("content-type") or ""

    def notify(self, method: str) -> None:
        status, body, _ = self._post({"jsonrpc": "2.0", "method": method})
        if status != 202:
            raise BenchError(f"notification {method}: HTTP {status} {body[:200]!r}")

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._ids += 1
        status, body, kind = self._post(
            {"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params}
        )
        if status != 200:
            raise BenchError(f"{method}: HTTP {status} {body[:200]!r}")
        if kind.startswith("text/event-stream"):
            for line in body.splitlines():
                if line.startswith(b"data:"):
                    answer: dict[str, Any] = json.loads(line[5:])
                    if answer.get("id") == self._ids:
                        return answer
            raise BenchError(f"{method}: no answer in the event stream {body[:200]!r}")
        answer = json.loads(body)
        return answer

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                self.connection.request(
                    "DELETE", self.path, headers={"Mcp-Session-Id": self.session}
                )
                self.connection.getresponse().read()
        self.connection.close()


Client = StdioClient | HttpClient


@dataclass
class Figures:
    allowed: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    # CPU seconds per allowed call: of the proxy process, and of the decision service.
    proxy_cpu: float | None = None
    service_cpu: float | None = None


def measure(
    client: Client,
    calls: int,
    warmup: int,
    refused: int,
    *,
    proxied: bool,
    proxy: list[int] | None = None,
    service: list[int] | None = None,
) -> Figures:
    """Latencies (seconds) of allowed copy_image_set calls, then of refused ones; with
    `proxy` (and `service`) pids, the CPU time they spend per allowed call too."""
    client.request(
        "initialize",
        {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "bench.proxy", "version": "0"},
        },
    )
    client.notify("notifications/initialized")
    out = Figures()
    clock = time.perf_counter

    def call(arguments: dict[str, Any], into: list[float] | None, refusal: bool) -> None:
        started = clock()
        answer = client.request("tools/call", {"name": "copy_image_set", "arguments": arguments})
        elapsed = clock() - started
        if answer.get("result", {}).get("isError") is not refusal:
            raise BenchError(f"unexpected answer: {json.dumps(answer)[:300]}")
        if into is not None:
            into.append(elapsed)

    for _ in range(warmup):
        call(ARGUMENTS, None, False)
    proxy_cpu = cpu_seconds(proxy) if proxy else 0.0
    service_cpu = cpu_seconds(service) if service else 0.0
    for _ in range(calls):
        call(ARGUMENTS, out.allowed, False)
    if proxy:
        out.proxy_cpu = (cpu_seconds(proxy) - proxy_cpu) / calls
    if service:
        out.service_cpu = (cpu_seconds(service) - service_cpu) / calls
    for _ in range(refused):
        call(REFUSED_ARGUMENTS, out.refused, proxied)
    return out


# Policies.


def shipped_policy(tmp: Path) -> list[Path]:
    """The shipped policy with copy_image_set's limits out of the way (1,000,000 per 0.1 s)."""
    rego, data = tmp / "shipped" / "rego", tmp / "shipped" / "policies"
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
    drop_agent_limit(rego)  # and the per-agent one out of the way
    return [rego, data]


def trivial_policy(tmp: Path) -> list[Path]:
    """One rule: allow, except the refused calls' malformed id. No rate limit."""
    where = tmp / "trivial"
    where.mkdir(parents=True)
    (where / "decision.rego").write_text(TRIVIAL_REGO)
    return [where]


POLICIES: dict[str, Callable[[Path], list[Path]]] = {
    "shipped": shipped_policy,
    "trivial": trivial_policy,
}


def policy_flags(paths: list[Path]) -> list[str]:
    return [flag for path in paths for flag in ("--policy", str(path))]


# Stage probes (--breakdown): the proxy run with timers around its stages.

# (module, attribute, label, parent label): the attribute is wrapped where the code
# looks it up. Probes whose attribute does not exist are skipped.
PROBES: list[tuple[str, str, str, str | None]] = [
    ("engine.proxy.stdio", "screen_agent_message", "read: screen the agent's line", None),
    ("engine.proxy.stdio", "screen_line", "read: screen the agent's line", None),
    ("engine.proxy.core", "ProxySession._handle_call", "tools/call task (to the answer)", None),
    ("engine.proxy.decider", "EmbeddedDecider.decide", "decide", "tools/call task (to the answer)"),
    ("engine.proxy.decider", "GrpcDecider.decide", "decide", "tools/call task (to the answer)"),
    ("engine.proxy.decider", "decide_message", "request as protobuf", "decide"),
    ("engine.proxy.decider", "decision_from_message", "protobuf as Decision", "decide"),
    ("engine.translate", "tool_call", "translate", "decide"),
    ("engine.translate", "input_document", "input document", "decide"),
    ("engine.policy.inprocess", "InProcessOpa.evaluate_json", "OPA evaluation", "decide"),
    ("engine.policy.inprocess", "_encode", "input as JSON", "OPA evaluation"),
    ("engine.policy.inprocess", "_decision", "result as PolicyResult", "OPA evaluation"),
    ("engine.state.ratelimit", "MemoryRateLimitStore.acquire", "rate-limit store", "decide"),
    ("engine.state.ratelimit", "SqliteRateLimitStore.acquire", "rate-limit store", "decide"),
    ("engine.state.decision_log", "DecisionLog.decision", "decision log (enqueue)", "decide"),
    ("engine.proxy.upstream", "ChildUpstream.send", "forward: write to the server", None),
    ("engine.proxy.upstream", "parse_line", "the server's answer: parse", None),
    ("engine.proxy.stdio", "_Output.send", "answer: write to the agent", None),
    ("engine.proxy.stdio", "_Output.send_frame", "answer: write to the agent", None),
    ("engine.proxy.core", "ProxySession._report", "outcome report (after answering)", None),
]
PROBE_OUT_ENV = "BENCH_PROXY_PROBES"


def _probe(owner: Any, name: str, label: str, stats: dict[str, list[float]]) -> None:
    fn = getattr(owner, name)
    slot = stats.setdefault(label, [0, 0.0])
    clock = time.perf_counter
    wrapped: Any
    if inspect.iscoroutinefunction(fn):

        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                slot[0] += 1
                slot[1] += clock() - started

        wrapped = wrapped_async
    else:

        def wrapped_sync(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                slot[0] += 1
                slot[1] += clock() - started

        wrapped = wrapped_sync
    setattr(owner, name, functools.wraps(fn)(wrapped))


def probed_proxy(argv: list[str]) -> int:
    """`mcp-policy proxy` with the probes installed; their totals go to $BENCH_PROXY_PROBES."""
    import importlib

    from engine.proxy.cli import main

    stats: dict[str, list[float]] = {}
    for module_name, attribute, label, _ in PROBES:
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        try:
            for part in path:
                owner = getattr(owner, part)
            getattr(owner, name)
        except AttributeError:
            continue
        _probe(owner, name, label, stats)

    @atexit.register
    def dump() -> None:
        Path(os.environ[PROBE_OUT_ENV]).write_text(json.dumps(stats))

    return main(argv)


# The run.


@dataclass
class Row:
    transport: str
    path: str
    policy: str
    figures: Figures


@dataclass
class Run:
    args: argparse.Namespace
    tmp: Path
    env: dict[str, str]
    stack: contextlib.ExitStack
    policies: dict[str, list[Path]] = field(default_factory=dict)
    services: dict[str, str] = field(default_factory=dict)
    service_pids: dict[str, int] = field(default_factory=dict)
    upstream_url: str | None = None
    counter: int = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        where = self.tmp / f"{self.counter:02d}-{name}"
        where.mkdir()
        return where

    def policy(self, name: str) -> list[Path]:
        if name not in self.policies:
            self.policies[name] = POLICIES[name](self.tmp / "policies")
        return self.policies[name]

    def service(self, policy: str) -> str:
        """The gRPC target of a `mcp-policy serve` with `policy` (started once)."""
        if policy not in self.services:
            work = self.fresh(f"serve-{policy}")
            log = work / "serve.log"
            command = [sys.executable, "-m", "engine.cli", "serve", "--http-port", "0"]
            command += ["--grpc-port", "0", "--state-dir", str(work / "state")]
            command += policy_flags(self.policy(policy))
            proc = spawn(command, log=log, env=self.env, stdout=subprocess.PIPE)
            self.stack.callback(stop, proc)
            self.service_pids[policy] = proc.pid
            line = wait_line(proc, "gRPC on", log, f"mcp-policy serve ({policy})")
            target = line.split("gRPC on ", 1)[1].split(",", 1)[0].strip()
            self.services[policy] = target.removeprefix("http://")
        return self.services[policy]

    def http_upstream(self) -> str:
        if self.upstream_url is None:
            log = self.fresh("upstream-http") / "upstream.log"
            proc = spawn([*UPSTREAM, "http"], log=log, env=self.env, stdout=subprocess.PIPE)
            self.stack.callback(stop, proc)
            line = wait_line(proc, "listening on", log, "the HTTP MCP server")
            self.upstream_url = line.split("listening on ", 1)[1].strip()
        return self.upstream_url

    def decision_flags(self, decider: str, policy: str, work: Path) -> list[str]:
        if decider == "embedded":
            return [
                "--embedded",
                "--state-dir",
                str(work / "state"),
                *policy_flags(self.policy(policy)),
            ]
        return ["--decision-url", self.service(policy)]

    def proxy_command(self, flags: list[str]) -> list[str]:
        return [sys.executable, "-m", "engine.proxy.cli", "proxy", *flags]

    def measure(
        self, client: Client, *, proxy: int | None = None, service: str | None = None
    ) -> Figures:
        args = self.args
        pids = [proxy] if proxy is not None else None
        service_pids = [self.service_pids[service]] if service is not None else None
        try:
            return measure(
                client,
                args.calls,
                args.warmup,
                args.refused,
                proxied=proxy is not None,
                proxy=pids,
                service=service_pids,
            )
        finally:
            client.close()

    def stdio(self, decider: str | None, policy: str) -> Figures:
        work = self.fresh(f"stdio-{decider or 'direct'}-{policy}")
        if decider is None:
            return self.measure(StdioClient([*UPSTREAM, "stdio"], self.env, work / "err.log"))
        flags = [*self.decision_flags(decider, policy, work), "--agent-id", "bench"]
        command = self.proxy_command([*flags, "--", *UPSTREAM, "stdio"])
        client = StdioClient(command, self.env, work / "proxy.log")
        return self.measure(client, proxy=client.proc.pid, service=self.grpc(decider, policy))

    def grpc(self, decider: str, policy: str) -> str | None:
        return policy if decider == "grpc" else None

    def http(self, decider: str | None, policy: str) -> Figures:
        upstream = self.http_upstream()
        if decider is None:
            return self.measure(HttpClient(upstream))
        work = self.fresh(f"http-{decider}-{policy}")
        log = work / "proxy.log"
        flags = [*self.decision_flags(decider, policy, work), "--agent-id", "bench"]
        flags += ["--listen", "127.0.0.1:0", "--upstream", upstream]
        proc = spawn(self.proxy_command(flags), log=log, env=self.env, stdout=subprocess.PIPE)
        try:
            line = wait_line(proc, "MCP on", log, "the HTTP proxy")
            url = line.split("MCP on ", 1)[1].split(" ", 1)[0]
            return self.measure(HttpClient(url), proxy=proc.pid, service=self.grpc(decider, policy))
        finally:
            stop(proc)

    def breakdown(self, decider: str, policy: str) -> tuple[dict[str, list[float]], Figures]:
        work = self.fresh(f"breakdown-{decider}-{policy}")
        out = work / "probes.json"
        env = {**self.env, PROBE_OUT_ENV: str(out)}
        flags = [*self.decision_flags(decider, policy, work), "--agent-id", "bench"]
        command = [sys.executable, "-m", "bench.proxy", "--probed-proxy", "proxy", *flags]
        command += ["--", *UPSTREAM, "stdio"]
        client = StdioClient(command, env, work / "proxy.log")
        figures = self.measure(client, proxy=client.proc.pid, service=self.grpc(decider, policy))
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats: dict[str, list[float]] = json.loads(out.read_text()) if out.exists() else {}
        return stats, figures


def ms(value: float) -> str:
    return f"{value:7.3f}"


def print_rows(rows: list[Row]) -> None:
    print(
        f"{'':<45}{'allowed, ms':^31} {'refused, ms':^23} {'CPU ms/call':^15}\n"
        f"{'transport':<9} {'path':<26} {'policy':<8}"
        f"{'p50':>7} {'p99':>7} {'+p50':>7} {'+p99':>7} {'p50':>7} {'p99':>7} {'+p50':>7}"
        f" {'proxy':>7} {'service':>7}"
    )
    base: dict[str, Figures] = {}
    for row in rows:
        p50, p99 = percentiles(row.figures.allowed)
        r50, r99 = percentiles(row.figures.refused)
        if row.path == "direct":
            base[row.transport] = row.figures
            print(f"{row.transport:<9} {'direct to the server':<26} {'-':<8}{ms(p50)} {ms(p99)}")
            continue
        b50, b99 = percentiles(base[row.transport].allowed)
        cpu = " ".join(
            ms(value * 1000) if value is not None else f"{'-':>7}"
            for value in (row.figures.proxy_cpu, row.figures.service_cpu)
        )
        print(
            f"{row.transport:<9} {row.path:<26} {row.policy:<8}{ms(p50)} {ms(p99)} "
            f"{ms(p50 - b50)} {ms(p99 - b99)} {ms(r50)} {ms(r99)} {ms(r50 - b50)} {cpu}"
        )


def print_goals(rows: list[Row]) -> None:
    base = [r.figures for r in rows if r.transport == "stdio" and r.path == "direct"]
    if not base:
        return
    direct = percentiles(base[0].allowed)
    for decider, which, goal in GOALS:
        found = [
            f"{r.policy} {percentiles(r.figures.allowed)[which] - direct[which]:.3f}"
            for r in rows
            if r.transport == "stdio" and decider in r.path
        ]
        if found:
            name = "p99" if which else "p50"
            print(f"  stdio, {decider}: added {name} <= {goal} ms? " + ", ".join(found))


def print_breakdown(
    runs: list[tuple[str, str, dict[str, list[float]], Figures]], base: Figures
) -> None:
    """Mean time per call of each probed stage, one column per (decider, policy)."""
    b50, _ = percentiles(base.allowed)
    print(
        "\nstages of the stdio proxy, probes on: mean us per call of each stage "
        "(a stage's time includes the stages under it; writes include waking the reader)"
    )
    heads = [f"{decider}/{policy}" for decider, policy, _, _ in runs]
    print(f"  {'stage':<46}" + "".join(f"{head:>18}" for head in heads))
    parents = {label: parent for _, _, label, parent in PROBES}

    def depth(label: str) -> int:
        parent = parents.get(label)
        return 0 if parent is None else 1 + depth(parent)

    seen: set[str] = set()
    for _, _, label, _ in PROBES:
        if label in seen or not any(stats.get(label, [0])[0] for _, _, stats, _ in runs):
            continue
        seen.add(label)
        cells = []
        for _, _, stats, _ in runs:
            count, total = stats.get(label, [0, 0.0])
            cells.append(f"{total / count * 1e6:18.1f}" if count else f"{'-':>18}")
        print(f"  {'  ' * depth(label) + label:<46}" + "".join(cells))
    added = [percentiles(figures.allowed)[0] - b50 for _, _, _, figures in runs]
    print(f"  {'added p50 with the probes on (ms)':<46}" + "".join(f"{a:18.3f}" for a in added))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--upstream-server"]:
        return serve_http() if argv[1:2] == ["http"] else serve_stdio()
    if argv[:1] == ["--probed-proxy"]:
        return probed_proxy(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--refused", type=int, default=500)
    parser.add_argument(
        "--store",
        choices=["memory", "sqlite"],
        default="memory",
        help="the decision service's rate-limit store (default memory: an in-process "
        "limiter, as the peers keep theirs; sqlite is the proxy's default store)",
    )
    parser.add_argument(
        "--decision-log",
        choices=["off", "on"],
        default="off",
        help="off: neither the JSONL log nor the decision database (default); on: both, as "
        "a proxy started without options keeps them",
    )
    parser.add_argument(
        "--transports", default="stdio,http", help="comma-separated: stdio, http (default both)"
    )
    parser.add_argument(
        "--deciders", default="embedded,grpc", help="comma-separated: embedded, grpc (default both)"
    )
    parser.add_argument(
        "--policies", default="shipped,trivial", help="comma-separated: shipped, trivial"
    )
    parser.add_argument("--breakdown", action="store_true", help="also time the proxy's stages")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    env["MCP_POLICY_STATE_STORE"] = args.store
    env["MCP_POLICY_APPROVER_TOKEN"] = uuid.uuid4().hex
    if args.decision_log == "off":
        env["MCP_POLICY_DECISION_LOG"] = "off"
        env["MCP_POLICY_DECISION_DB"] = "false"
    transports = args.transports.split(",")
    deciders = args.deciders.split(",")
    policies = args.policies.split(",")

    info = machine()
    print(
        f"\nmcp-policy proxy benchmark: {args.calls} sequential tools/call after {args.warmup} "
        f"warm-up, then {args.refused} refused (malformed id); {args.store} rate-limit store, "
        f"decision log {args.decision_log}"
    )
    print("  " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    rows: list[Row] = []
    breakdowns: list[tuple[str, str, dict[str, list[float]], Figures]] = []
    with (
        tempfile.TemporaryDirectory(prefix="mcp-policy-bench-proxy-") as tmp_name,
        contextlib.ExitStack() as stack,
    ):
        run = Run(args, Path(tmp_name), env, stack)
        for transport in transports:
            measure_path = run.stdio if transport == "stdio" else run.http
            rows.append(Row(transport, "direct", "-", measure_path(None, "-")))
            for decider in deciders:
                name = "--embedded" if decider == "embedded" else "gRPC"
                for policy in policies:
                    rows.append(
                        Row(transport, f"proxy, {name}", policy, measure_path(decider, policy))
                    )
        if args.breakdown:
            for decider in deciders:
                for policy in policies:
                    breakdowns.append((decider, policy, *run.breakdown(decider, policy)))
    print()
    print_rows(rows)
    print(
        "\nadded = proxied minus direct (p50 from p50, p99 from p99); refused calls are "
        "answered by the proxy, never forwarded."
    )
    print("\ntargets (the issue's, on 2 cores):")
    print_goals(rows)
    stdio_direct = [r.figures for r in rows if r.transport == "stdio" and r.path == "direct"]
    if breakdowns and stdio_direct:
        print_breakdown(breakdowns, stdio_direct[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
