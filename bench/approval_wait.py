"""From the approver's click to the waiting proxy forwarding the call: p50 and p99.

Run with `.venv/bin/python -m bench.approval_wait` (needs the in-process OPA library,
`make tools`). Everything runs on loopback and is stopped at the end: a decision service
(`mcp-policy serve`: gRPC for the proxy, HTTP for the approver; memory state store, no
decision log) and, per mode, one `mcp-policy proxy --decision-url` over stdio in front of
bench/proxy.py's minimal MCP server, driven by a raw JSON-RPC agent in this process.

Each of `--calls` (100) rounds, one after the other: the agent sends a copy_image_set call
into an existing image set (the shipped policy asks a human for it); the proxy holds it;
once the approval is pending, and a random pause later (uniform over `--pause`, so that the
click falls anywhere in a polling period), the "click" is `POST /v1/approvals/{id}/approve`
with the approver token; the time runs from just before that POST until the agent has the
call's result (the minimal server answers at once, so that is the proxy forwarding the
call, plus its answer's way back). The modes, side by side:

- `await`: `--approval-wait`, the proxy waiting on AwaitApproval (the service answers the
  moment the approval is decided), then deciding the identical call once;
- `elicitation`: the agent declared URL-mode elicitation (protocol 2025-11-25) and answers
  the proxy's `elicitation/create` with accept; the proxy waits the same way, sends
  `notifications/elicitation/complete`, then decides once;
- `poll S` (each of `--poll`, default 0.5 s, the old `--approval-poll` default): the old way,
  the proxy deciding the call again every S seconds until it is approved; the baseline.

Beside the latencies, the decisions the service made per approved call (its
mcp_policy_decisions_total for the tool): 2 when waiting (the approval_required, then the
allow), one more per poll in the baseline, each a decision-log record.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ARGUMENTS, machine, percentiles, prometheus_counters
from bench.proxy import (
    UPSTREAM,
    BenchError,
    StdioClient,
    policy_flags,
    shipped_policy,
    spawn,
    stop,
    wait_line,
)

TOOL = "copy_image_set"
PROTOCOL = "2025-11-25"
# A copy into an existing image set: the shipped policy asks a human for it.
INTO_EXISTING = {
    "sourceImageSet": {"latestVersionId": "1"},
    "destinationImageSet": {
        "imageSetId": "ffeeddccbbaa99887766554433221100",
        "latestVersionId": "1",
    },
}
HOLD = 120.0  # how long the proxy holds a call for its approval (never reached)
PENDING_POLL = 0.005  # how often the bench looks for the new pending approval (not timed)


class Agent(StdioClient):
    """The raw JSON-RPC agent, able to answer the proxy's own requests (elicitation)."""

    def send(self, message: dict[str, Any]) -> None:
        os.write(self._in, json.dumps(message).encode() + b"\n")

    def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self._line())
        return message

    def initialize(self, elicitation: bool) -> None:
        capabilities = {"elicitation": {"url": {}}} if elicitation else {}
        params = {
            "protocolVersion": PROTOCOL,
            "capabilities": capabilities,
            "clientInfo": {"name": "bench-approval-wait", "version": "1"},
        }
        answer = self.request("initialize", params)
        if answer.get("result", {}).get("protocolVersion") != PROTOCOL:
            raise BenchError(f"initialize: {answer}")
        self.notify("notifications/initialized")

    def call(self, image_set: str) -> int:
        """Send the call (not waiting for its answer); its request id."""
        self._ids += 1
        arguments = {
            **ARGUMENTS,
            "source_image_set_id": image_set,
            "copy_image_set_information": INTO_EXISTING,
        }
        params = {"name": TOOL, "arguments": arguments}
        self.send({"jsonrpc": "2.0", "id": self._ids, "method": "tools/call", "params": params})
        return self._ids

    def answer_to(self, request_id: int) -> dict[str, Any]:
        """The answer to `request_id` (notifications on the way are passed over)."""
        while True:
            message = self.receive()
            if message.get("id") == request_id and "method" not in message:
                return message


@dataclass
class Service:
    grpc_target: str
    http: http.client.HTTPConnection
    token: str

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self.http.request(method, path, payload, headers)
                response = self.http.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                # The service closes a connection idle for 5 s (between modes): again, anew.
                self.http.close()
                if attempt == 2:
                    raise
        if response.status != 200:
            raise BenchError(f"{method} {path}: HTTP {response.status} {data[:300]!r}")
        return json.loads(data) if data.startswith((b"{", b"[")) else data.decode()

    def pending(self, image_set: str) -> str:
        """The id of the pending approval of the call for `image_set` (waits for it)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for approval in self._request("GET", "/v1/approvals?status=pending&limit=50"):
                if approval["arguments"].get("source_image_set_id") == image_set:
                    return str(approval["id"])
            time.sleep(PENDING_POLL)
        raise BenchError("no pending approval appeared")

    def approve(self, approval_id: str) -> None:
        self._request("POST", f"/v1/approvals/{approval_id}/approve", {"comment": "bench"})

    def decisions(self) -> float:
        """Decisions the service made for TOOL so far."""
        text = self._request("GET", "/metrics")
        return sum(
            value
            for labels, value in prometheus_counters(text, "mcp_policy_decisions_total")
            if labels.get("tool") == TOOL
        )


@dataclass
class Row:
    mode: str
    calls: int
    p50_ms: float
    p99_ms: float
    decisions: float  # per approved call
    failed: str | None = None


def run_mode(
    mode: str,
    flags: list[str],
    service: Service,
    args: argparse.Namespace,
    work: Path,
    env: dict[str, str],
) -> Row:
    elicitation = mode.startswith("elicitation")
    command = [sys.executable, "-m", "engine.proxy.cli", "proxy", "--decision-url"]
    command += [service.grpc_target, "--agent-id", "bench", *flags, "--", *UPSTREAM, "stdio"]
    slug = "".join(c if c.isalnum() else "-" for c in mode)
    agent = Agent(command, env, work / f"proxy-{slug}.log")
    latencies: list[float] = []
    rng = random.Random(7)
    try:
        agent.initialize(elicitation)
        before = service.decisions()
        for _ in range(args.calls):
            image_set = uuid.uuid4().hex
            request_id = agent.call(image_set)
            if elicitation:
                asked = agent.receive()
                if asked.get("method") != "elicitation/create":
                    raise BenchError(f"expected elicitation/create, got {asked}")
                agent.send({"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept"}})
                approval_id = asked["params"]["url"].rsplit("/", 1)[-1]
            else:
                approval_id = service.pending(image_set)
            time.sleep(rng.uniform(*args.pause))
            started = time.perf_counter()
            service.approve(approval_id)
            answer = agent.answer_to(request_id)
            elapsed = time.perf_counter() - started
            if answer.get("result", {}).get("isError") is not False:
                raise BenchError(f"the approved call was not forwarded: {answer}")
            latencies.append(elapsed)
        made = (service.decisions() - before) / args.calls
    except BenchError as exc:
        return Row(mode, len(latencies), 0, 0, 0, failed=str(exc)[:300])
    finally:
        agent.close()
    p50, p99 = percentiles(latencies)
    return Row(mode, args.calls, p50, p99, made)


def start_service(work: Path, env: dict[str, str], stack: contextlib.ExitStack) -> Service:
    log = work / "serve.log"
    command = [sys.executable, "-m", "engine.cli", "serve", "--http-port", "0", "--grpc-port", "0"]
    command += ["--state-dir", str(work / "state"), *policy_flags(shipped_policy(work))]
    proc = spawn(command, log=log, env=env, stdout=subprocess.PIPE)
    stack.callback(stop, proc)
    line = wait_line(proc, "gRPC on", log, "mcp-policy serve")
    grpc_target = line.split("gRPC on ", 1)[1].split(",", 1)[0].strip()
    http_url = line.split("HTTP on ", 1)[1].split()[0].rstrip(",")
    host, _, port = http_url.removeprefix("http://").rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    stack.callback(connection.close)
    return Service(grpc_target, connection, env["MCP_POLICY_APPROVER_TOKEN"])


def print_report(rows: list[Row], args: argparse.Namespace) -> None:
    print("mcp-policy-engine approval wait benchmark (bench/approval_wait.py)")
    for key, value in machine().items():
        print(f"  {key}: {value}")
    print(
        f"  {args.calls} approved calls per mode, one at a time, over stdio: the click "
        f"(POST approve) a random {args.pause[0]:g}-{args.pause[1]:g} s after the approval "
        "opened; timed from just before the POST to the agent reading the call's result"
    )
    print(
        "  service: mcp-policy serve, shipped policy (copy_image_set's limits raised), memory "
        "store, no decision log; the proxy with --decision-url (gRPC)"
    )
    print(
        "  decisions/call: what the service decided per approved call (its "
        "mcp_policy_decisions_total); polling adds one per period the human takes, each a "
        "decision-log record"
    )
    print()
    head = f"{'mode':<44}{'calls':>6}{'p50 ms':>9}{'p99 ms':>9}{'decisions/call':>16}"
    print(head)
    print("-" * len(head))
    for row in rows:
        if row.failed:
            print(f"{row.mode:<44}{row.calls:>6}{'FAILED':>9}")
            print(f"  ! {row.failed}")
            continue
        print(
            f"{row.mode:<44}{row.calls:>6}{row.p50_ms:>9.1f}{row.p99_ms:>9.1f}"
            f"{row.decisions:>16.2f}"
        )
    print()


def _pause(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    pause = (float(low), float(high or low))
    if not 0 <= pause[0] <= pause[1]:
        raise argparse.ArgumentTypeError("expected LOW-HIGH seconds, 0 <= LOW <= HIGH")
    return pause


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=100, help="approved calls per mode")
    parser.add_argument(
        "--poll",
        default="0.5",
        help="comma-separated seconds: one baseline row (the old polling wait) each; "
        "empty for none (default 0.5, the old default)",
    )
    parser.add_argument(
        "--pause",
        type=_pause,
        default=(0.05, 1.05),
        help="LOW-HIGH: seconds between the approval opening and the click (default "
        "0.05-1.05: the click falls anywhere in two of the baseline's polling periods)",
    )
    parser.add_argument(
        "--modes",
        default="await,elicitation,poll",
        help="comma-separated: await, elicitation, poll",
    )
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    env.update(
        MCP_POLICY_STATE_STORE="memory",
        MCP_POLICY_APPROVER_TOKEN=uuid.uuid4().hex,
        MCP_POLICY_DECISION_LOG="off",
        MCP_POLICY_DECISION_DB="false",
        MCP_POLICY_APPROVAL_MAX_PENDING_PER_AGENT="100000",
        MCP_POLICY_APPROVAL_MAX_PENDING_PER_SESSION="100000",
    )
    modes = args.modes.split(",")
    plan: list[tuple[str, list[str]]] = []
    if "await" in modes:
        plan.append(("await (--approval-wait, AwaitApproval)", ["--approval-wait", str(HOLD)]))
    if "elicitation" in modes:
        plan.append(
            ("elicitation (2025-11-25 URL mode, accept)", ["--elicitation-wait", str(HOLD)])
        )
    if "poll" in modes:
        for every in filter(None, args.poll.split(",")):
            flags = ["--approval-wait", str(HOLD), "--approval-poll", every, "--no-elicitation"]
            plan.append((f"poll every {float(every):g} s (old wait)", flags))
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-approval-wait-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        service = start_service(work, env, stack)
        for mode, flags in plan:
            print(f"  {mode} …", file=sys.stderr, flush=True)
            rows.append(run_mode(mode, flags, service, args, work, env))
    print_report(rows, args)
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
