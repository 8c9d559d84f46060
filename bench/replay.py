"""How fast `mcp-policy replay` re-evaluates a decision log: 100,000 decisions by default.

`python -m bench.replay` writes a JSONL decision log of `--decisions` records in a
temporary directory, exactly as the service writes them with
MCP_POLICY_DECISION_LOG_INPUT=true and raw arguments (each record made safe by the
decision log's own `prepare`, chained with its `chain_line`): a mix of calls as agents
make them (valid copy_image_set calls on both catalogued servers, calls with a malformed
id, calls of tools the catalog does not know), each with its own decision id, agent,
session, arguments and time. The policy's logged answer is the shipped policy's for that
kind of call, except for one call in ten, logged as allowed by an older rule: replay must
count those as changes and nothing else.

Then the shipped policy is loaded as `replay` loads a candidate (`OfflinePolicy`) and the
log is replayed as `mcp-policy replay --log FILE` does (streamed, evaluated on one thread
per CPU). Printed: the machine (with its load: other work on it slows the figure), the
log's size, the total time, decisions/s, the CPU time the replay took, and the report's
counts (checked: every decision replayed, the changes exactly the ones planted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ARGUMENTS, BenchError, machine, run_main
from engine.authoring import replay
from engine.authoring.offline import OfflinePolicy
from engine.settings import DEFAULT_POLICY_PATHS, DEFAULT_POLICY_SCHEMA
from engine.state.decision_log import GENESIS, chain_line, prepare

HI = "awslabs.healthimaging-mcp-server"
VALKEY = "awslabs.valkey-mcp-server"
OLD_RULE = "catalog.rule.copy_image_set_before"


def _calls() -> list[tuple[str, str, dict[str, Any]]]:
    """The kinds of call logged, as (server, tool, arguments template)."""
    bad = {**ARGUMENTS, "datastore_id": "not-an-id"}
    return [
        (HI, "copy_image_set", ARGUMENTS),
        (HI, "copy_image_set", ARGUMENTS),
        (VALKEY, "copy_image_set", ARGUMENTS),
        (HI, "copy_image_set", bad),
        (HI, "list_datastores", {}),
        ("files.example", "read_file", {"path": "/srv/data/report.csv"}),
    ]


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _arguments(template: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    arguments = json.loads(json.dumps(template))
    if "source_image_set_id" in arguments:
        arguments["source_image_set_id"] = _hex(rng)
    return arguments


async def _answers(policy: OfflinePolicy) -> list[dict[str, Any]]:
    """The shipped policy's answer for each kind of call (as a record keeps it)."""
    answers = []
    for server, tool, arguments in _calls():
        doc = OfflinePolicy.input_for(
            {
                "server": server,
                "tool": tool,
                "arguments": arguments,
                "principal": {"agent_id": "a", "session_id": "s"},
            }
        )
        result = policy.evaluate(doc)
        answer = result.model_dump(mode="json", include={"action", "rule", "rate_limits"})
        answers.append(answer)
    return answers


def write_log(path: Path, count: int, answers: list[dict[str, Any]], seed: int = 7) -> int:
    """Write `count` decision records to `path` as the service writes them; how many were
    logged with an older answer (the changes replay must find)."""
    rng = random.Random(seed)
    calls = _calls()
    planted = 0
    seq, prev = 0, GENESIS
    start = time.time() - 86400
    with path.open("w", encoding="ascii") as f:
        for i in range(count):
            kind = rng.randrange(len(calls))
            server, tool, template = calls[kind]
            answer = answers[kind]
            if i % 10 == 0:
                answer = {"action": "allow", "rule": OLD_RULE, "rate_limits": []}
                planted += 1
            decision_id = f"dec_{_hex(rng)}"
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + i * 0.5))
            stamp += f".{i % 1000:03d}Z"
            agent, session = f"agent-{rng.randrange(50)}", f"s-{rng.randrange(5000)}"
            arguments = _arguments(template, rng)
            doc = {
                "tool": {"server": server, "name": tool, "arguments": arguments},
                "principal": {
                    "agent_id": agent,
                    "session_id": session,
                    "user_id": None,
                    "roles": [],
                    "authenticated": False,
                    "method": None,
                    "scopes": [],
                    "claims": {},
                    "asserted_by": None,
                },
                "request": {"id": decision_id, "time": stamp, "transport": "http", "jsonrpc_id": 7},
                "context": {},
            }
            verdict = {"rate_limit": "allow", "require_approval": "approval_required"}.get(
                answer["action"], answer["action"]
            )
            record = {
                "event": "decision",
                "decision_id": decision_id,
                "time": stamp,
                "transport": "http",
                "principal": {"agent_id": agent, "session_id": session, "user_id": None},
                "server": server,
                "tool": tool,
                "arguments_sha256": "0" * 64,
                "verdict": verdict,
                "rule": answer["rule"],
                "reason": "",
                "matched": [answer["rule"]],
                "policy_revision": "sha256:bench",
                "approval_id": None,
                "latency_ms": 0.5,
                "arguments": arguments,
                "input": doc,
                "input_arguments": "raw",
                "policy": answer,
            }
            prepared = prepare(record, max_argument_bytes=16 * 1024)
            seq += 1
            text, prev = chain_line(prepared.text, seq, prev)
            f.write(text + "\n")
    return planted


async def run(args: argparse.Namespace) -> int:
    replay.tune_go_gc()  # as `mcp-policy replay` does, before OPA's library is loaded
    print("bench.replay: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    print(f"GOGC={os.environ['GOGC']}")
    paths = list(DEFAULT_POLICY_PATHS)
    with tempfile.TemporaryDirectory(prefix="mcp-policy-replay-bench.") as directory:
        log = Path(directory) / "decisions.jsonl"
        async with await OfflinePolicy.load(paths, schema=DEFAULT_POLICY_SCHEMA) as policy:
            answers = await _answers(policy)
            written = time.perf_counter()
            planted = await asyncio.to_thread(write_log, log, args.decisions, answers)
            written = time.perf_counter() - written
            size = log.stat().st_size
            print(
                f"wrote {args.decisions} logged decisions ({size / 1e6:.1f} MB, "
                f"{size // args.decisions} bytes each) in {written:.1f} s"
            )
            report = replay.Report(policy.revision, str(log))
            cpu = time.process_time()
            started = time.perf_counter()
            items = replay.read_log(log, replay.Window(), report.chain)
            await asyncio.to_thread(
                replay.replay, items, policy.evaluate_json, report, workers=args.workers
            )
            total = time.perf_counter() - started
            cpu = time.process_time() - cpu
    print(
        f"replayed {report.replayed} decisions in {total:.1f} s: "
        f"{report.replayed / total:,.0f} decisions/s "
        f"({args.workers or 'one per CPU'} evaluation threads)"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    print(
        f"  CPU time {cpu:.1f} s (this process, all threads): on {cores} idle cores at least "
        f"{cpu / max(1, min(cores, (args.workers or cores) + 1)):.1f} s; the machine's "
        "other work slows the figure above"
    )
    print(
        f"  unchanged {report.unchanged}, changed {report.changed}, skipped "
        f"{sum(n for n, _ in report.skipped.values())}, errors "
        f"{sum(n for n, _ in report.errors.values())}, chain breaks {report.chain.breaks}"
    )
    if report.replayed != args.decisions or report.changed != planted or report.errors:
        raise BenchError(
            f"expected {args.decisions} replayed and {planted} changed: "
            f"{json.dumps(report.as_dict())[:2000]}"
        )
    if total > 60:
        print(f"  over a minute ({total:.1f} s) on this machine", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--decisions", type=int, default=100_000, help="logged decisions")
    parser.add_argument("--workers", type=int, help="evaluation threads (default: one per CPU)")
    args = parser.parse_args()
    if args.decisions < 1:
        parser.error("--decisions: at least 1")
    return run_main("bench.replay", run(args))


if __name__ == "__main__":
    sys.exit(main())
