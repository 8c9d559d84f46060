"""The in-process evaluator's latency beside OPA's own benchmark, in one run.

`python -m bench.inprocess` (after `make tools`, which builds the library) prints, for one
valid copy_image_set input document built the way the service builds it:

- `opa bench` of data.mcp.decision over rego/ and policies/ with that input (Go alone,
  no marshalling): the baseline;
- `InProcessOpa.evaluate()` p50/p99 over --calls sequential calls: JSON out, one ctypes
  call into the same evaluator, JSON back, PolicyResult validation;
- the library call alone (input already JSON, result left as bytes): what Go and cgo cost;
- `evaluate()` with a policy whose decision is a constant: the marshalling cost alone;
- the REST evaluator (`rest.Opa` against `opa run --server`) for the same input.

Timings are sequential (one caller), so they show per-call cost, not throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bench.common import ARGUMENTS, percentiles
from engine import translate
from engine.models import DecideRequest
from engine.policy import inprocess
from engine.policy.inprocess import InProcessOpa
from engine.policy.opa_process import OpaProcess, find_opa
from engine.policy.rest import Opa
from engine.policy.source import PolicyBundle, read_bundle
from engine.settings import PROJECT_ROOT

CONSTANT = PolicyBundle(
    modules={
        "mcp-policy/constant.rego": 'package mcp\n\ndecision := {"action": "allow", '
        '"rule": "constant"}\n'
    },
    data={},
)


def input_document() -> dict[str, Any]:
    request = DecideRequest.model_validate(
        {
            "server": "awslabs.healthimaging-mcp-server",
            "tool": "copy_image_set",
            "arguments": ARGUMENTS,
            "principal": {"agent_id": "bench", "session_id": "s-bench", "user_id": "u-1"},
        }
    )
    return translate.input_document(
        translate.tool_call(request, max_depth=24),
        request,
        decision_id="dec_bench",
        now=datetime.now(UTC),
        transport="http",
    )


def opa_bench(input_path: str) -> tuple[float, float]:
    """`opa bench`'s median query evaluation time and its ns/op, in ms."""
    out = subprocess.run(
        [find_opa(), "bench", "-d", "rego", "-d", "policies", "-i", input_path]
        + ["--format", "json", "data.mcp.decision"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    median_ns = report["Extra"]["histogram_timer_rego_query_eval_ns_median"]
    return median_ns / 1e6, report["T"] / report["N"] / 1e6


def timed(call: Callable[[], Any], calls: int) -> tuple[float, float]:
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


async def timed_async(call: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()

    doc = input_document()
    raw = json.dumps(doc, separators=(",", ":")).encode()
    shipped = read_bundle([PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"])
    rows: list[tuple[str, float, float | None]] = []

    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as tmp:
        tmp.write(raw)
    try:
        median, per_op = opa_bench(tmp.name)
    finally:
        os.unlink(tmp.name)
    rows.append(("opa bench (median eval)", median, None))
    rows.append(("opa bench (ns/op, mean)", per_op, None))

    opa = InProcessOpa(timeout=5.0)
    await opa.open()
    await opa.load(shipped)
    for _ in range(args.warmup):
        await opa.evaluate(doc)
    rows.append(
        ("in-process evaluate()", *await timed_async(lambda: opa.evaluate(doc), args.calls))
    )
    loaded = opa._loaded
    assert loaded is not None
    lib = inprocess._library()
    rows.append(
        ("  library call alone", *timed(lambda: lib.eval(loaded.handle, 0, raw, 0), args.calls))
    )
    await opa.load(CONSTANT)
    for _ in range(args.warmup):
        await opa.evaluate(doc)
    rows.append(
        ("constant policy evaluate()", *await timed_async(lambda: opa.evaluate(doc), args.calls))
    )
    loaded = opa._loaded
    assert loaded is not None
    rows.append(
        ("  library call alone", *timed(lambda: lib.eval(loaded.handle, 0, raw, 0), args.calls))
    )
    await opa.close()

    process = OpaProcess()
    await process.start()
    rest = Opa(process.url, timeout=5.0)
    await rest.open()
    try:
        await rest.load(shipped)
        for _ in range(args.warmup):
            await rest.evaluate(doc)
        rows.append(
            (
                "REST evaluate() (opa server)",
                *await timed_async(lambda: rest.evaluate(doc), args.calls),
            )
        )
    finally:
        await rest.close()
        await process.stop()

    print(f"shipped policy {shipped.revision}, {args.calls} sequential calls, OPA {lib.version}")
    print(f"{'path':<32}{'p50 ms':>9}{'p99 ms':>9}")
    for name, p50, p99 in rows:
        print(f"{name:<32}{p50:>9.3f}{'' if p99 is None else f'{p99:>9.3f}'}")


if __name__ == "__main__":
    asyncio.run(main())
