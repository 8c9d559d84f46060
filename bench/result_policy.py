"""What the result policy costs: tool results decided beside the call decision, in one run.

`make bench-results` runs this (`python -m bench.result_policy`); `make bench-tools` builds
`hey` and `ghz`. One service, `mcp-policy serve` as bench/load.py starts it (the engine of
`--engine`, a memory state store, bench/load.py's policy copy: rego/ without tests and
policies/, the copy limit raised so that it never blocks), is driven with `hey` over HTTP
and `ghz` over gRPC at each concurrency, every case for the same duration after a
discarded warm-up (bench/load.py's run_case: latencies from the tools' per-request output,
a probe before and after, the service's own count of what it decided, CPU of the service,
the load tool and everything else):

- call: the call decision, POST /v1/decide (gRPC Decide) of one copy_image_set call, as
  bench/load.py drives it: the baseline;
- metadata: POST /v1/decide-result (gRPC DecideResult with `result_json`) of what
  get_image_set_metadata answers, as the fixture server answers it like the real server
  (tests/fixtures/imaging_server.py): the image set's DICOM metadata (some 50 KB of JSON)
  as base64 of gzip in structuredContent and the same as JSON text, for an ordinary
  principal (no roles): the shipped rule redacts the patient attributes;
- plain ~30 KB: that metadata as plain JSON in structuredContent (fewer instances, no blob,
  no text content): the cost of redacting without decoding;
- 1 MiB: the same plain JSON of a large image set, cut to just under
  MCP_POLICY_RESULT_MAX_BYTES (its default, 1 MiB): evaluated and redacted, not blocked by
  size;
- floor: what list_datastores answers (the fixture's result), which the policy passes (only
  the secrets rule's patterns, searched by the engine, apply to it, and find nothing): the
  floor of the path. copy_image_set's own result is no floor: the phi rule covers that
  tool too (its paths are applied, and find nothing).

A case fails, and shows no figures, on any non-2xx answer or gRPC error, a probe (before
or after) that did not get the expected action and rule (and, on redact, values replaced),
or any other decision in the service's own metrics (mcp_policy_decisions_total for the
call, mcp_policy_result_decisions_total for results). Printed side by side: decisions/s,
p50, p99, the service's CPU per decision, and each result case's p50 over the call
decision's at 1 concurrent on the same transport; the service's own time per decision (its
OPA evaluation, and the whole decision) from its metrics.

Then, without the network, in this process (engine.policy.inprocess and
engine.policy.redaction, the same policy copy): the p50 of each step the service takes on a
result, one after the other as it does (translate.tool_result's check, the JSON encoding of
the input, the evaluation of data.mcp.result_decision, redaction.apply), beside the p50 of
a call decision's evaluation. Two more results there, not driven over the network: a
get_image_set_metadata answer of 1 MiB in the real server's form (base64 of gzip in
structuredContent and in the text: some ten times as much metadata, decoded and
re-encoded twice; at 16 concurrent it would take longer than the load tools' timeout), and
copy_image_set's result. The exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pydantic_core
from google.protobuf import json_format, struct_pb2

from bench.common import BenchError, machine, prometheus_counters, run_main
from bench.load import (
    AGENT,
    DECIDE_CALL,
    OTHERS_WARN_PERCENT,
    REQUEST_TIMEOUT_SECONDS,
    SERVER,
    SESSION,
    TOOL,
    Counts,
    Inputs,
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
    protoset,
    run_case,
    start_service,
    tool_version,
)
from engine import translate
from engine.models import DecideResultRequest
from engine.policy import redaction
from engine.policy.inprocess import DECISION_QUERY, RESULT_DECISION_QUERY, InProcessOpa
from engine.policy.source import read_bundle
from engine.service import DECODED_BYTES_PER_RESULT_BYTE
from engine.settings import Settings
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc, types_pb2
from tests.fixtures import imaging_server as fixture

DECIDE_RESULT_CALL = "mcppolicy.v1.DecisionService.DecideResult"
METADATA_TOOL = "get_image_set_metadata"
FLOOR_TOOL = "list_datastores"  # no result rule applies to it: its results pass
DATASTORE = "0123456789abcdef0123456789abcdef"
IMAGE_SET = "00112233445566778899aabbccddeeff"
PLAIN_BYTES = 30 * 1024  # the plain-JSON case: the largest cut of the metadata within this
MAX_BYTES: int = Settings.model_fields["result_max_bytes"].default  # the service's default
MAX_DEPTH: int = Settings.model_fields["max_json_depth"].default
RESULT_TIMEOUT_MS: int = Settings.model_fields["result_timeout_ms"].default
PRINCIPAL = {"agent_id": AGENT, "session_id": SESSION}  # ordinary: no roles, nothing proven
REDACT = ("redact", "phi.dicom_patient")
# Every result is searched for credentials where Rego cannot see (the shipped secrets
# rule's block_if_found patterns); one with nothing found passes under that rule id.
PASS = ("pass", "secrets.aws_access_key")
PASS_PHI = ("pass", "phi.dicom_patient")
ACTIONS = {
    "pass": decision_pb2.RESULT_ACTION_PASS,
    "redact": decision_pb2.RESULT_ACTION_REDACT,
    "block": decision_pb2.RESULT_ACTION_BLOCK,
}
INPROCESS_WARMUP = 3  # runs of each in-process measurement left out
INPROCESS_MIN_RUNS = 5


# ---------------------------------------------------------------------------- the results


def compact(value: Any) -> bytes:
    """The JSON the service sizes a result by: compact, UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


async def fixture_result(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """What the fixture server answers a call with (its MCPServer's own CallToolResult, as
    it goes on the wire), called in this process."""
    answer = await fixture.server.call_tool(tool, arguments)
    dumped: dict[str, Any] = answer.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


def blob_result(metadata: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """get_image_set_metadata's answer for `metadata`, built as the server's SDK builds it
    (structuredContent, and the same as JSON text): `like` is one of the server's own
    answers, whose other keys it keeps."""
    answer = fixture.GetImageSetMetadataResponse(
        image_set_metadata_blob=fixture.metadata_blob(metadata),
        content_type="application/json",
        content_encoding="gzip",
    )
    text = pydantic_core.to_json(answer, fallback=str, indent=2).decode()
    return {
        **like,
        "content": [{"type": "text", "text": text}],
        "structuredContent": answer.model_dump(mode="json", by_alias=True),
    }


def plain_result(metadata: dict[str, Any]) -> dict[str, Any]:
    return {"content": [], "structuredContent": metadata, "isError": False}


def cut(metadata: dict[str, Any], instances: int) -> dict[str, Any]:
    """`metadata` with only its first `instances` instances (shallow: the rest is shared)."""
    study = metadata["Study"]
    series = {}
    for uid, one in study["Series"].items():
        kept = dict(list(one["Instances"].items())[:instances])
        series[uid] = {**one, "Instances": kept}
    return {**metadata, "Study": {**study, "Series": series}}


def largest(
    metadata: dict[str, Any], build: Callable[[dict[str, Any]], dict[str, Any]], limit: int
) -> dict[str, Any]:
    """The result `build` makes of the most instances of `metadata` within `limit` bytes."""
    low, high = 1, max(len(s["Instances"]) for s in metadata["Study"]["Series"].values())
    if len(compact(build(cut(metadata, low)))) > limit:
        raise BenchError(f"no cut of the fixture's metadata is within {limit} bytes")
    while low < high:
        middle = (low + high + 1) // 2
        if len(compact(build(cut(metadata, middle)))) <= limit:
            low = middle
        else:
            high = middle - 1
    return build(cut(metadata, low))


@dataclass(frozen=True)
class Case:
    """One thing decided: the call (result None), or a tool's result."""

    name: str
    tool: str
    arguments: dict[str, Any]
    result: dict[str, Any] | None
    # The action and rule the policy should give (the call: verdict allow for its tool).
    expect: tuple[str, str]
    driven: bool = True  # over the network (else only in the in-process breakdown)

    @functools.cached_property
    def size(self) -> int:
        return len(compact(self.result)) if self.result is not None else 0


async def build_cases() -> list[Case]:
    fixture.use_image_set_tools()
    metadata_args = {"datastore_id": DATASTORE, "image_set_id": IMAGE_SET}
    typical = await fixture_result(METADATA_TOOL, metadata_args)
    metadata = fixture.image_set_metadata(DATASTORE, IMAGE_SET)
    if blob_result(metadata, typical) != typical:
        raise BenchError(
            "the fixture's get_image_set_metadata answer is no longer built as blob_result "
            "builds it: update bench/result_policy.py"
        )
    huge = fixture.image_set_metadata(DATASTORE, IMAGE_SET, "huge")
    copy_args = build_inputs().decide_body["arguments"]
    floor = await fixture_result(FLOOR_TOOL, {})
    copied = await fixture_result(TOOL, copy_args)
    plain = largest(metadata, plain_result, PLAIN_BYTES)
    plain_max = largest(huge, plain_result, MAX_BYTES)
    blob_max = largest(huge, lambda m: blob_result(m, typical), MAX_BYTES)
    return [
        Case("call (copy_image_set)", TOOL, copy_args, None, ("allow", TOOL)),
        Case("metadata, blob", METADATA_TOOL, metadata_args, typical, REDACT),
        Case("metadata, plain", METADATA_TOOL, metadata_args, plain, REDACT),
        Case("metadata, plain 1 MiB", METADATA_TOOL, metadata_args, plain_max, REDACT),
        Case("floor (passes)", FLOOR_TOOL, {}, floor, PASS),
        Case("metadata, blob 1 MiB", METADATA_TOOL, metadata_args, blob_max, REDACT, False),
        # The phi rule's paths are applied and find nothing: it passes under that rule.
        Case("copy_image_set result", TOOL, copy_args, copied, PASS_PHI, False),
    ]


# ---------------------------------------------------------------------------- the targets


async def scrape(session: aiohttp.ClientSession, service: Service) -> str:
    async with session.get(f"{service.http}/metrics") as response:
        return await response.text()


def total(text: str, name: str) -> float:
    """The sum of every sample of metric `name` (all its labels)."""
    return sum(value for _, value in prometheus_counters(text, name))


def counter(
    session: aiohttp.ClientSession, service: Service, case: Case
) -> Callable[[], Awaitable[Counts]]:
    """The service's own count of what it decided: `case.expect`, and anything else."""
    metric, keys = "mcp_policy_result_decisions_total", ("action", "rule")
    if case.result is None:
        metric, keys = "mcp_policy_decisions_total", ("verdict", "tool")
    expected = case.expect

    async def counts() -> Counts:
        right, other = 0.0, dict[str, float]()
        for labels, value in prometheus_counters(await scrape(session, service), metric):
            got = tuple(labels.get(k) for k in keys)
            if got == expected:
                right += value
            else:
                kind = f"{got[0]} by rule {labels.get('rule')}"
                other[kind] = other.get(kind, 0.0) + value
        return right, other

    return counts


def stager(
    session: aiohttp.ClientSession, service: Service, case: Case
) -> Callable[[], Awaitable[Stages]]:
    """The service's own time: its OPA evaluation and the whole decision (a call: the sum
    of mcp_policy_stage_seconds; a result: mcp_policy_result_decision_seconds)."""

    async def stages() -> Stages:
        text = await scrape(session, service)
        if case.result is None:
            sums = {
                labels["stage"]: value
                for labels, value in prometheus_counters(text, "mcp_policy_stage_seconds_sum")
            }
            count = max(
                (v for _, v in prometheus_counters(text, "mcp_policy_stage_seconds_count")),
                default=0.0,
            )
            return count, {"evaluate": sums.get("evaluate", 0.0), "decide": sum(sums.values())}
        count = total(text, "mcp_policy_result_decision_seconds_count")
        return count, {
            "evaluate": total(text, "mcp_policy_result_opa_seconds_sum"),
            "decide": total(text, "mcp_policy_result_decision_seconds_sum"),
        }

    return stages


def http_body(case: Case) -> dict[str, Any]:
    body = {
        "server": SERVER,
        "tool": case.tool,
        "arguments": case.arguments,
        "principal": PRINCIPAL,
    }
    if case.result is not None:
        body["result"] = case.result
    return body


def grpc_request(case: Case, inputs: Inputs) -> Any:
    if case.result is None:
        return inputs.decide_grpc
    arguments = struct_pb2.Struct()
    arguments.update(case.arguments)
    return decision_pb2.DecideResultRequest(
        server=SERVER,
        tool=case.tool,
        arguments=arguments,
        principal=types_pb2.Principal(**PRINCIPAL),
        result_json=compact(case.result).decode(),
    )


def answer_problem(case: Case, action: str, rule: str, replaced: int) -> str | None:
    """What is wrong with an answer (None: it is the expected one)."""
    if (action, rule) != case.expect:
        return f"answered {action} by rule {rule!r}, not {case.expect[0]} by {case.expect[1]}"
    if action == "redact" and not replaced:
        return f"answered redact and replaced {replaced} values"
    return None


def targets(
    session: aiohttp.ClientSession,
    service: Service,
    channel: grpc.aio.Channel,
    case: Case,
    inputs: Inputs,
    files: Path,
    replaced: dict[str, int],
) -> list[Target]:
    """HTTP (hey) and gRPC (ghz) targets of `case`; the bodies they send under `files`
    (named after the case). `replaced` gets the values a probe saw replaced, per case."""
    stem = "".join(c if c.isalnum() else "-" for c in case.name)
    body, request = http_body(case), grpc_request(case, inputs)
    http_file, grpc_file = files / f"{stem}.json", files / f"{stem}-grpc.json"
    http_file.write_bytes(compact(body))
    grpc_file.write_text(json.dumps(json_format.MessageToDict(request)))
    path = "/v1/decide" if case.result is None else "/v1/decide-result"
    stub = decision_pb2_grpc.DecisionServiceStub(channel)

    async def http_probe() -> str | None:
        try:
            async with session.post(f"{service.http}{path}", json=body) as response:
                status, answer = response.status, await response.json()
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"POST {path} failed: {exc!r}"
        if status != 200:
            return f"POST {path} answered {status}: {json.dumps(answer)[:200]}"
        if case.result is None:
            ok = answer.get("verdict") == "allow"
            return None if ok else f"POST {path} answered {json.dumps(answer)[:200]}"
        counts = sum(r.get("count", 0) for r in answer.get("redactions") or [])
        replaced[case.name] = counts
        return answer_problem(case, answer.get("action"), answer.get("rule"), counts)

    async def grpc_probe() -> str | None:
        try:
            if case.result is None:
                decided = await stub.Decide(request, timeout=REQUEST_TIMEOUT_SECONDS)
                ok = decided.verdict == types_pb2.VERDICT_ALLOW
                return None if ok else f"gRPC Decide answered {decided.verdict} {decided.reason}"
            response = await stub.DecideResult(request, timeout=REQUEST_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            return f"gRPC failed: {exc.code().name} {exc.details()}"
        action = next((a for a, v in ACTIONS.items() if v == response.action), "unspecified")
        counts = sum(r.count for r in response.redactions)
        return answer_problem(case, action, response.rule, counts)

    counts, stages = counter(session, service, case), stager(session, service, case)
    call = DECIDE_CALL if case.result is None else DECIDE_RESULT_CALL
    protos = ["--protoset", str(files / "decision.protoset"), "--call", call]
    post = ["-m", "POST", "-T", "application/json", "-D", str(http_file)]
    return [
        Target(
            case.name,
            "hey",
            [*post, f"{service.http}{path}"],
            http_probe,
            counts,
            service.tree,
            stages=stages,
        ),
        Target(
            case.name,
            "ghz",
            [*protos, "-D", str(grpc_file), service.grpc],
            grpc_probe,
            counts,
            service.tree,
            stages=stages,
        ),
    ]


# ---------------------------------------------------------------------------- in-process


@dataclass
class Steps:
    """p50 in µs of each step a decision takes in process (absent: not a step of it)."""

    case: Case
    runs: int
    p50_us: dict[str, float] = field(default_factory=dict)
    problem: str | None = None


async def timed(steps: dict[str, Callable[[], Any]], budget: float) -> tuple[int, dict[str, float]]:
    """Run `steps` one after the other, again and again for `budget` seconds (at least
    INPROCESS_MIN_RUNS times, after INPROCESS_WARMUP runs left out): each one's p50, µs."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    runs = 0
    deadline = None
    while runs < INPROCESS_WARMUP + INPROCESS_MIN_RUNS or time.perf_counter() < (deadline or 0):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
        runs += 1
        if runs == INPROCESS_WARMUP:
            deadline = time.perf_counter() + budget
        await asyncio.sleep(0)  # Ctrl-C is seen
    return runs - INPROCESS_WARMUP, {
        name: statistics.median(t[INPROCESS_WARMUP:]) * 1e6 for name, t in times.items()
    }


async def breakdown(policy: list[Path], cases: list[Case], budget: float) -> list[Steps]:
    """Each case's steps in this process, as the service takes them (see the docstring)."""
    engine = InProcessOpa(timeout=30)
    await engine.open()
    try:
        await engine.load(read_bundle(policy), (DECISION_QUERY, RESULT_DECISION_QUERY))
        inputs = build_inputs()
        call_input = inputs.opa_body["input"]
        encoded = compact(call_input)
        found: list[Steps] = []
        runs, p50 = await timed(
            {
                "encode": lambda: compact(call_input),
                "evaluate": lambda: engine.evaluate_json(encoded),
            },
            budget,
        )
        found.append(Steps(cases[0], runs, p50))
        for case in cases[1:]:
            print(f"  in process: {case.name} …", file=sys.stderr, flush=True)
            found.append(await result_steps(engine, case, budget))
        return found
    finally:
        await engine.close()


async def result_steps(engine: InProcessOpa, case: Case, budget: float) -> Steps:
    request = DecideResultRequest.model_validate({**http_body(case)})
    call = translate.tool_call(request, max_depth=MAX_DEPTH)
    result = translate.tool_result(request.result, max_depth=MAX_DEPTH)
    result_json = compact(result)
    document = translate.result_document(
        translate.input_document(
            call, request, decision_id="rdec_bench", now=datetime.now(UTC), transport="http"
        ),
        None,
        size_bytes=len(result_json),
        max_bytes=MAX_BYTES,
    )
    input_json = translate.result_input(document, result_json)
    answer, _ = engine.evaluate_result_json(input_json)
    redactions = redaction.redactions_of(answer.redactions)
    limit = MAX_BYTES * DECODED_BYTES_PER_RESULT_BYTE
    applied = redaction.apply(result, redactions, max_decoded_bytes=limit)
    steps: dict[str, Callable[[], Any]] = {
        "check": lambda: translate.tool_result(request.result, max_depth=MAX_DEPTH),
        "encode": lambda: translate.result_input(document, compact(result)),
        "evaluate": lambda: engine.evaluate_result_json(input_json),
    }
    if answer.action.value == "redact":
        steps["redact"] = lambda: redaction.apply(result, redactions, max_decoded_bytes=limit)
    replaced = sum(applied.counts)
    # As the service answers: a redaction that replaced nothing passes the result as it came.
    action = "pass" if answer.action.value == "redact" and not replaced else answer.action.value
    problem = answer_problem(case, action, answer.rule, replaced)
    if applied.unredactable is not None:
        problem = f"unredactable: {applied.unredactable}"
    runs, p50 = await timed(steps, budget)
    return Steps(case, runs, p50, problem)


# ---------------------------------------------------------------------------- report


def print_results(results: list[Result]) -> None:
    call = {
        (r.tool, r.concurrency): r for r in results if r.case.startswith("call") and not r.failed
    }
    head = (
        f"{'case':<24}{'via':>5}{'conc':>5}{'decisions/s':>12}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'+p50 ms':>9}{'CPU ms':>8}{'srv CPU':>8}{'other':>6}{'eval µs':>9}{'decide µs':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if r.failed:
            print(f"{r.case:<24}{r.tool:>5}{r.concurrency:>5}{'FAILED':>12}")
            continue
        base = call.get((r.tool, 1))
        added = "-"
        if base is not None and r.concurrency == 1 and not r.case.startswith("call"):
            added = f"{r.p50_ms - base.p50_ms:+.2f}"
        per = r.server_cpu / 100 / r.rate * 1000 if r.rate else 0.0
        stages = f"{r.stage_us.get('evaluate', 0):>9.0f}{r.stage_us.get('decide', 0):>10.0f}"
        print(
            f"{r.case:<24}{r.tool:>5}{r.concurrency:>5}{r.rate:>12.0f}{r.p50_ms:>8.2f}"
            f"{r.p99_ms:>8.2f}{added:>9}{per:>8.2f}{r.server_cpu:>7.0f}%{r.other_cpu:>5.0f}%"
            f"{stages}"
        )
    print(
        "  via: hey = HTTP, ghz = gRPC (results as result_json). +p50 ms: p50 over the call "
        "decision's on the same transport, at 1 concurrent. CPU ms: the service's CPU time "
        "per decision (srv CPU, % of one core, over decisions/s); other: the rest of the "
        "machine meanwhile. eval µs / decide µs: the service's own time per decision in its "
        "OPA evaluation and in the whole decision (its metrics: for the call, "
        "mcp_policy_stage_seconds; for a result, mcp_policy_result_opa_seconds and "
        "mcp_policy_result_decision_seconds); the rest of p50 is reading and writing the "
        "request and answer, and the client"
    )
    for r in results:
        for problem in r.problems:
            print(f"  ! {r.case} ({r.tool}, {r.concurrency} concurrent): {problem}")
    busy = [r for r in results if r.other_cpu > OTHERS_WARN_PERCENT]
    if busy:
        print(
            f"  ! in {len(busy)} of {len(results)} cases other processes on this machine used "
            f"more than {OTHERS_WARN_PERCENT}% of a core (up to "
            f"{max(r.other_cpu for r in busy):.0f}%, the other column): those figures are "
            "disturbed; run again on a quiet machine"
        )


def print_steps(found: list[Steps]) -> None:
    call = found[0].p50_us["evaluate"]
    names = ("check", "encode", "evaluate", "redact")
    print(
        "\nIn process, no network (this process: engine.policy.inprocess, "
        "engine.policy.redaction), p50 µs per step:"
    )
    head = (
        f"{'case':<24}{'KB':>6}{'runs':>6}"
        + "".join(f"{n:>10}" for n in names)
        + f"{'sum':>10}{'× call eval':>12}"
    )
    print(head)
    print("-" * len(head))
    for steps in found:
        size = f"{steps.case.size / 1024:.0f}" if steps.case.result is not None else "-"
        if steps.problem is not None:
            print(f"{steps.case.name:<24}{size:>6}  FAILED: {steps.problem}")
            continue
        cells = "".join(
            f"{steps.p50_us[n]:>10.0f}" if n in steps.p50_us else f"{'-':>10}" for n in names
        )
        whole = sum(steps.p50_us.values())
        print(
            f"{steps.case.name:<24}{size:>6}{steps.runs:>6}{cells}{whole:>10.0f}"
            f"{whole / call:>12.1f}"
        )
    print(
        "  check: translate.tool_result (the shape and every string of the result); encode: "
        "the input's JSON (the result encoded once, then the input around it); evaluate: "
        "data.mcp.result_decision (a call: data.mcp.decision); redact: redaction.apply of the "
        "policy's redactions. × call eval: sum over the call decision's evaluation"
    )


def print_header(
    info: dict[str, str],
    hey: str,
    ghz: str,
    options: Options,
    args: argparse.Namespace,
    cases: list[Case],
) -> None:
    deadline = args.result_timeout_ms
    if deadline is None:
        deadline = f"{RESULT_TIMEOUT_MS} (default)"
    print("mcp-policy-engine result policy benchmark (bench/result_policy.py)")
    for key, value in info.items():
        print(f"  {key}: {value}")
    print(f"  hey: {tool_version(hey)}, -cpus {options.client_cpus}; ghz: {tool_version(ghz)}")
    print(
        f"  service: mcp-policy serve, engine {args.engine}, memory state store, decision log "
        f"(JSONL and SQLite) in a temp dir, MCP_POLICY_RESULT_MAX_BYTES {MAX_BYTES} (default), "
        f"MCP_POLICY_RESULT_TIMEOUT_MS {deadline}: the deadline of one result's evaluation "
        "(past it the result is blocked, result.unavailable)"
    )
    print(
        "  principal: agent and session only (no roles): the shipped phi.dicom_patient rule "
        "redacts the patient attributes of get_image_set_metadata's results"
    )
    for case in cases:
        if case.result is None:
            print(f"  {case.name}: HTTP Decide / gRPC Decide, allowed (bench/load.py's call)")
            continue
        where = "driven and in process" if case.driven else "in process only"
        print(
            f"  {case.name}: {case.tool}'s result, {case.size} bytes (compact JSON), "
            f"expected {case.expect[0]} by {case.expect[1]} ({where})"
        )
    print(
        f"  each case: {options.warmup:g} s warm-up (discarded), then {options.duration:g} s, "
        "HTTP then gRPC, every case at each concurrency in turn; in process: "
        f"{args.inprocess_seconds:g} s per case after {INPROCESS_WARMUP} runs left out"
    )
    print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.result_policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    case_options(parser)
    parser.add_argument(
        "--inprocess-seconds",
        type=float,
        default=3.0,
        help="seconds of in-process runs per case (3; at least "
        f"{INPROCESS_MIN_RUNS} runs whatever it takes)",
    )
    parser.add_argument(
        "--result-timeout-ms",
        type=int,
        default=None,
        help="the service's MCP_POLICY_RESULT_TIMEOUT_MS (default: its own default, "
        f"{RESULT_TIMEOUT_MS}): a 1 MiB result's evaluation can take longer under load",
    )
    return parsed_cases(parser, argv)


async def run(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    hey, ghz = find_tool("hey"), find_tool("ghz")
    if hey is None or ghz is None:
        raise BenchError(
            "hey and ghz are needed: run `make bench-tools` (builds them into .tools/bin)"
        )
    options = Options(args.duration, args.warmup, args.client_cpus, 1, hey, ghz)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="mcp-policy-results-"))
    results: list[Result] = []
    replaced: dict[str, int] = {}
    try:
        cases = await build_cases()
        policy = copy_policy(work / "policy")
        async with contextlib.AsyncExitStack() as stack:
            timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
            session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
            env = {}
            if args.result_timeout_ms is not None:
                env["MCP_POLICY_RESULT_TIMEOUT_MS"] = str(args.result_timeout_ms)
            service = await start_service(
                stack, session, policy, work / "service", args.engine, env=env
            )
            channel = grpc.aio.insecure_channel(service.grpc)
            stack.push_async_callback(channel.close)
            files = work / "files"
            files.mkdir()
            (files / "decision.protoset").write_bytes(protoset(decision_pb2.DESCRIPTOR))
            inputs = build_inputs()
            driven = [
                target
                for case in cases
                if case.driven
                for target in targets(session, service, channel, case, inputs, files, replaced)
            ]
            print_header(info, hey, ghz, options, args, cases)
            print("running:", file=sys.stderr)
            for concurrency in args.levels:
                for target in driven:
                    results.append(await run_case(target, options, work, concurrency))
        found = await breakdown(policy, cases, args.inprocess_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_results(results)
    print_steps(found)
    for name, count in replaced.items():
        print(f"  {name}: {count} values replaced per decision (the service's answer)")
    load_after = os.getloadavg()
    print(
        "\nload average (1/5/15 min) before: "
        + " ".join(f"{x:.2f}" for x in load_before)
        + "; after: "
        + " ".join(f"{x:.2f}" for x in load_after)
    )
    failed = any(r.failed for r in results) or any(s.problem for s in found)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_main("bench.result_policy", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
