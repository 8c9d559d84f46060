"""`mcp-policy explain`: why a call gets its decision.

One call (a DecideRequest as JSON, or an input document as the decision log keeps it) or
one logged decision (`--decision-id`: its input, from the SQLite copy or the JSONL log) is
evaluated with the policy in directories (`OfflinePolicy`: checked and compiled as `serve`
loads them), and the policy's own explanation is shown: `data.mcp.explain.explanation`
(rego/mcp/explain/explain.rego) gives the decision, every contribution that matched (its
package, rule, level, reason, whether shadow, and what became of it), the winner and why
(precedence deny > require_approval > rate_limit > allow, then rule id), the YAML chain
walked for the tool, and the limits and approval that would apply. This module only
reads the record, asks the policy and prints: what the explanation says is the policy's.

The same explanation of a logged decision is served to operators by the HTTP API
(GET /v1/decisions/{id}/explain) with the policy the service is running (`LiveExplainer`:
compiled once per revision, beside the engine that decides).

A logged decision holds its input only when the service keeps it
(MCP_POLICY_DECISION_LOG_INPUT=true) with arguments raw or redacted: a record without
one, or with only the arguments' hash, is refused with what to change (HTTP 409).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from engine import jsonstrict
from engine.authoring.replay import (
    NO_INPUT,
    BadArgument,
    NoInput,
    ReplayError,
    bounded_lines,
    logged_input,
    parse_time,
    printable,
    text_of,
)
from engine.errors import (
    Conflict,
    EngineError,
    InvalidRequest,
    NotFound,
    PolicyRejected,
    PolicyUnavailable,
)
from engine.policy.opa_process import ToolMissing
from engine.policy.source import PolicyBundle, with_framework
from engine.state.decision_log import Link, read_link, rotated_files, row_hash

EXPLAIN_QUERY = "data.mcp.explain.explanation"

EXIT_OK = 0
EXIT_FAILED = 1  # no such decision, it holds no input, or the policy could not answer
EXIT_POLICY_REJECTED = 2  # the policy has problems (and: no OPA library)
EXIT_INVALID = 3  # a bad argument or call

HELP = "explain why a call (or a logged decision) gets its decision"
DESCRIPTION = """\
Evaluate one call with the policy (--policy DIR, repeatable; default: what serve loads)
and print why it gets its decision: the input document, every contribution that matched
(package, rule, level, reason, shadow or enforced, and what became of it), the winner and
why (deny > require_approval > rate_limit > allow, then rule id), the YAML chain walked
for the tool, and the limits and approval that would apply. The call is a DecideRequest
as JSON (server, tool, arguments, principal, context) on standard input or in FILE, or
an input document as the decision log keeps it; or --decision-id ID takes the input of a
logged decision (MCP_POLICY_DECISION_LOG_INPUT=true) from the SQLite copy or --log.

Exit status: 0 explained, 1 no such decision or it holds no input, 2 the policy was
rejected (or OPA's library is missing), 3 a bad argument or call.
"""


# --- the explanation -------------------------------------------------------------------


async def explain_input(
    policy: Any, input_doc: dict[str, Any], *, note: list[str] | None = None
) -> dict[str, Any]:
    """The explanation of `input_doc` by `policy` (an OfflinePolicy loaded with
    EXPLAIN_QUERY): the input, the policy's explanation and its revision."""
    explanation = await policy.query(EXPLAIN_QUERY, input_doc)
    if not isinstance(explanation, dict):
        raise Conflict(
            f"the policy gives no {EXPLAIN_QUERY}: it does not carry the framework's "
            "rego/mcp/explain (a policy or bundle built from an older framework)"
        )
    return {
        "policy_revision": policy.revision,
        "notes": list(note or []),
        "input": input_doc,
        "explanation": explanation,
    }


def record_input(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The input of a logged decision and notes on it; NoInput saying why it has none
    that can be evaluated (and how to have one)."""
    doc, redacted = logged_input(record)
    notes = []
    if redacted:
        notes.append(
            "the arguments were logged redacted: rules that read the redacted fields "
            'saw "[redacted]"'
        )
    return doc, notes


def _logged(record: dict[str, Any]) -> dict[str, Any]:
    """What the log says was decided (shown beside the explanation)."""
    keys = ("decision_id", "time", "verdict", "rule", "reason", "policy_revision", "policy")
    return {key: record[key] for key in keys if key in record}


def _checked_input(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`record_input`, its NoInput as a Conflict naming the decision."""
    try:
        return record_input(record)
    except NoInput as exc:
        raise Conflict(
            f"decision {jsonstrict.quote(text_of(record.get('decision_id')))} cannot be "
            f"explained: {exc.message}"
        ) from exc


# --- finding a logged decision ---------------------------------------------------------


def find_in_database(path: Path, decision_id: str) -> dict[str, Any]:
    """The record of `decision_id` in the SQLite copy, checked against its hash."""
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise ReplayError(f"{path}: {exc}") from exc
    try:
        row = db.execute(
            "SELECT decision_id, ts, session_id, agent_id, user_id, server, tool, verdict, "
            "rule, record, prev, hash FROM decisions WHERE decision_id = ?",
            (decision_id,),
        ).fetchone()
    except sqlite3.Error as exc:
        raise ReplayError(f"{path}: not a decision log database ({exc})") from exc
    finally:
        db.close()
    if row is None:
        raise NotFound(f"no decision {jsonstrict.quote(decision_id)} in {path}")
    *columns, prev, digest = row
    if digest is not None and (not isinstance(prev, str) or row_hash(prev, columns) != digest):
        raise ReplayError(
            f"the record of {jsonstrict.quote(decision_id)} in {path} does not match its hash "
            "(changed or forged: mcp-policy log verify says more)"
        )
    try:
        record = json.loads(columns[-1])
    except (ValueError, TypeError, RecursionError) as exc:
        raise ReplayError(f"the record of {jsonstrict.quote(decision_id)} is not JSON") from exc
    if not isinstance(record, dict):
        raise ReplayError(f"the record of {jsonstrict.quote(decision_id)} is not an object")
    return record


def find_in_log(path: Path, decision_id: str) -> dict[str, Any]:
    """The record of `decision_id` in the JSONL log (rotated files too; the last line of
    it wins: the log's answer), checked against its hash."""
    files = [p for _, p in reversed(rotated_files(path))]
    if path.is_file():
        files.append(path)
    if not files:
        raise ReplayError(f"{path}: no such file (nor rotated ones beside it)")
    needle = b'"decision_id":' + json.dumps(decision_id).encode("ascii")
    found: dict[str, Any] | None = None
    forged = False
    for file in files:
        try:
            with open(file, "rb") as f:
                for text, fits in bounded_lines(f):
                    if not fits or needle not in text:
                        continue
                    link = read_link(text)
                    record: Any = link.record if isinstance(link, Link) else None
                    if record is None and link == "unchained":
                        record = json.loads(text)
                    if record is None:
                        forged = True
                    elif isinstance(record, dict) and record.get("decision_id") == decision_id:
                        found, forged = record, False
        except OSError as exc:
            raise ReplayError(f"{file}: {exc.strerror or exc}") from exc
    if forged:
        raise ReplayError(
            f"the last record of {jsonstrict.quote(decision_id)} in {path} does not match its "
            "hash (changed or forged: mcp-policy log verify says more)"
        )
    if found is None:
        raise NotFound(f"no decision {jsonstrict.quote(decision_id)} in {path}")
    return found


# --- the running service's explainer ---------------------------------------------------


class LiveExplainer:
    """Explains logged decisions with the policy a service runs: the running bundle,
    compiled for each explanation (about 0.1 s for the shipped policy; one at a time) with
    the explain query, beside the engine that decides, and released after."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def explain(self, bundle: PolicyBundle | None, record: dict[str, Any]) -> dict[str, Any]:
        """The explanation of `record` by `bundle`: Conflict when the record holds no
        input that can be evaluated, PolicyUnavailable when the policy cannot be had."""
        from engine.authoring.offline import OfflinePolicy

        doc, notes = _checked_input(record)
        if bundle is None:
            raise PolicyUnavailable("no policy is loaded yet")
        async with self._lock:
            try:
                # The running bundle was checked against the schema when it was loaded:
                # not again here, on the event loop of a serving replica.
                policy = await OfflinePolicy.load(
                    [], schema=None, queries=(EXPLAIN_QUERY,), bundle=bundle
                )
            except ToolMissing as exc:
                raise PolicyUnavailable(
                    f"explaining needs OPA's in-process library: {exc.message}"
                ) from exc
            except PolicyRejected as exc:
                raise PolicyUnavailable(
                    f"the running policy cannot be compiled to explain: {exc.message}"
                ) from exc
            async with policy:
                explained = await explain_input(policy, doc, note=notes)
        explained["logged"] = _logged(record)
        return explained


# --- output ----------------------------------------------------------------------------


def _one_line(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = " ".join(printable(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _limit_text(limit: dict[str, Any]) -> str:
    cost = f", each call counts {limit['cost']}" if "cost" in limit else ""
    return (
        f"{_one_line(limit.get('rule'))}: at most {limit.get('max')} per "
        f"{limit.get('window_seconds')} s, scope {_one_line(limit.get('scope'))}{cost}"
    )


def render(explained: dict[str, Any]) -> str:
    """The explanation for a person (every string made safe for a terminal)."""
    e = explained["explanation"]
    d = e.get("decision", {})
    doc = explained["input"]
    tool = doc.get("tool") if isinstance(doc.get("tool"), dict) else {}
    lines = [
        f"call: tool {_one_line(tool.get('name'))} on server {_one_line(tool.get('server'))}",
        f"decision: {_one_line(d.get('action'))} by rule {_one_line(d.get('rule'))} "
        f"(policy {explained['policy_revision']})",
        f"  reason: {_one_line(d.get('reason'), 400)}",
    ]
    logged = explained.get("logged")
    if logged:
        lines.append(
            f"logged: {_one_line(logged.get('verdict'))} by rule "
            f"{_one_line(logged.get('rule'))} at {_one_line(logged.get('time'))} "
            f"(policy {_one_line(logged.get('policy_revision'))})"
        )
    for note in explained.get("notes", []):
        lines.append(f"note: {note}")
    winner = e.get("winner", {})
    lines += ["", "why", f"  {_one_line(winner.get('why'), 600)}"]
    contributions = e.get("contributions", [])
    lines += ["", f"contributions ({len(contributions)})"]
    for c in contributions:
        kind = "shadow" if c.get("shadow") else "enforced"
        lines.append(
            f"  [{_one_line(c.get('status'))}] {_one_line(c.get('level'))} "
            f"{_one_line(c.get('rule'))} ({_one_line(c.get('package'))}, {kind})"
        )
        if c.get("reason"):
            lines.append(f"      reason: {_one_line(c.get('reason'), 300)}")
        lines.append(f"      {_one_line(c.get('outcome'), 300)}")
    if not contributions:
        lines.append("  (none)")
    yaml_chain = e.get("yaml", {})
    known = yaml_chain.get("tool", {})
    catalogued = (
        f"catalogued: {_one_line(known.get('category'))}, {_one_line(known.get('risk'))} risk"
        if known.get("known")
        else "not in the catalog"
    )
    lines += ["", f"YAML chain walked for the tool ({catalogued})"]
    for number, step in enumerate(yaml_chain.get("walk", []), 1):
        lines.append(
            f"  {number}. {_one_line(step.get('step')):<22} {_one_line(step.get('where')):<34} "
            f"{_one_line(step.get('status'))}"
        )
    for link in yaml_chain.get("chain", []):
        lines.append(
            f"     {_one_line(link.get('where'))} as written: {_one_line(link.get('rule'))}"
        )
    limits = e.get("limits", [])
    lines += ["", "limits that would apply (every one must pass)"]
    lines += [f"  {_limit_text(limit)}" for limit in limits] or ["  (none)"]
    approval = e.get("approval")
    lines += ["", "approval"]
    if approval:
        extra = ""
        if "ttl_seconds" in approval:
            extra += f", usable for {approval['ttl_seconds']} s once granted"
        extra += (
            ", the caller's own user may approve"
            if approval.get("by") == "caller"
            else ", approvers decide (never the call's own user or agent)"
        )
        lines.append(f"  required by rule {_one_line(approval.get('rule'))}{extra}")
    else:
        lines.append("  (none)")
    shadow = d.get("shadow", [])
    if shadow:
        lines += ["", "shadow rules (tried, not enforced)"]
        lines += [
            f"  would {_one_line(s.get('level'))}: {_one_line(s.get('rule'))}: "
            f"{_one_line(s.get('reason'), 300)}"
            for s in shadow
        ]
    text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True)
    lines += ["", "input document", *(f"  {line}" for line in text.splitlines())]
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", nargs="?", type=Path, help="read the call from this file (default: stdin)"
    )
    parser.add_argument(
        "--decision-id", metavar="ID", help="explain this logged decision (its logged input)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        type=Path,
        help="the decision log's SQLite copy (default: decisions.sqlite3 in the state dir)",
    )
    where.add_argument(
        "--log", type=Path, help="the JSONL decision log (its rotated files read too)"
    )
    parser.add_argument(
        "--policy",
        type=Path,
        action="append",
        metavar="DIR",
        help="a directory of Rego and YAML; repeat for several (default: what serve loads)",
    )
    parser.add_argument("--time", help="the call's time, RFC 3339 with its timezone (default: now)")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")


def _call_input(text: bytes, time: datetime | None, max_depth: int) -> dict[str, Any]:
    """The input document for a call: a DecideRequest, or an input document as is."""
    from engine.authoring.offline import OfflinePolicy

    call = jsonstrict.loads(text, max_depth=max_depth, what="the call")
    if not isinstance(call, dict):
        raise InvalidRequest("the call must be a JSON object (a DecideRequest)")
    if isinstance(call.get("tool"), dict):  # an input document, as the log keeps it
        if time is not None:
            raise BadArgument("--time: an input document carries its time (request.time)")
        return call
    return OfflinePolicy.input_for(call, time=time)


async def _explain(args: argparse.Namespace, settings: Any, text: bytes | None) -> dict[str, Any]:
    from engine.authoring.offline import OfflinePolicy

    record: dict[str, Any] | None = None
    if args.decision_id is not None:
        record = _find(args, settings)
        doc, notes = _checked_input(record)
    else:
        assert text is not None
        when = parse_time(args.time, "--time") if args.time else None
        doc, notes = _call_input(text, when, settings.max_json_depth), []
    # A team's directories: the installed framework's Rego added when none holds it.
    paths = with_framework(list(args.policy)) if args.policy else list(settings.policy_paths)
    async with await OfflinePolicy.load(
        paths, schema=settings.policy_schema, queries=(EXPLAIN_QUERY,)
    ) as policy:
        explained = await explain_input(policy, doc, note=notes)
    if record is not None:
        explained["logged"] = _logged(record)
    return explained


def _find(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    if args.log is not None:
        return find_in_log(args.log, args.decision_id)
    if args.db is not None:
        return find_in_database(args.db, args.decision_id)
    logs = settings.decision_log_settings
    if logs.database is not None and logs.database.is_file():
        return find_in_database(logs.database, args.decision_id)
    if logs.jsonl not in ("-", "off"):
        return find_in_log(Path(logs.jsonl), args.decision_id)
    raise ReplayError("no decision log to read: give --db or --log")


def run(
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stdin: Any = None,
) -> int:
    """`mcp-policy explain`; the exit status."""
    from engine.settings import Settings

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def fail(message: str, status: int) -> int:
        print(f"mcp-policy explain: {printable(message)}", file=err)
        return status

    if args.decision_id is not None and (args.file is not None or args.time is not None):
        return fail("--decision-id takes the logged input: give no FILE or --time", EXIT_INVALID)
    if args.decision_id is None and (args.db is not None or args.log is not None):
        return fail("--db and --log are read only with --decision-id", EXIT_INVALID)
    if args.decision_id is not None and not 1 <= len(args.decision_id) <= 256:
        return fail("--decision-id: 1 to 256 characters", EXIT_INVALID)
    for path in args.policy or []:
        if not path.is_dir():
            return fail(f"--policy {path}: not a directory", EXIT_INVALID)
    defaults: dict[str, Any] = {}
    settings = Settings(**defaults)  # MCP_POLICY_*: what serve would load
    text: bytes | None = None
    if args.decision_id is None:
        try:
            if args.file is not None:
                text = args.file.read_bytes()
            else:
                text = (stdin if stdin is not None else sys.stdin.buffer).read(
                    settings.max_body_bytes + 1
                )
        except OSError as exc:
            return fail(f"cannot read {args.file}: {exc.strerror or exc}", EXIT_INVALID)
        assert text is not None
        if len(text) > settings.max_body_bytes:
            return fail(
                f"the call is over {settings.max_body_bytes} bytes (MCP_POLICY_MAX_BODY_BYTES)",
                EXIT_INVALID,
            )
    try:
        explained = asyncio.run(_explain(args, settings, text))
    except (BadArgument, InvalidRequest) as exc:
        return fail(exc.message, EXIT_INVALID)
    except (NotFound, ReplayError, Conflict, PolicyUnavailable) as exc:
        message = exc.message
        if NO_INPUT in message:
            message += "; and the arguments raw or redacted (MCP_POLICY_DECISION_LOG_ARGUMENTS)"
        return fail(message, EXIT_FAILED)
    except PolicyRejected as exc:
        fail(f"policy rejected: {exc.message}", EXIT_POLICY_REJECTED)
        for line in exc.errors:
            print(f"  {printable(line)}", file=err)
        return EXIT_POLICY_REJECTED
    except ToolMissing as exc:
        return fail(exc.message, EXIT_POLICY_REJECTED)
    except EngineError as exc:
        return fail(exc.message, EXIT_FAILED)
    if args.json:
        print(json.dumps(explained, indent=2, ensure_ascii=True), file=out)
    else:
        print(render(explained), file=out)
    return EXIT_OK
