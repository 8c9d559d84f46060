"""Table tests: calls and the decision the policy must give each, in YAML, for people who do
not write Rego. `mcp-policy test` runs them beside the Rego tests.

A table-test file is named `*.cases.yaml` (or `.cases.yml`) and lives outside the policy
directories, since `serve` loads every YAML file there as policy data: the repository
`mcp-policy init` writes keeps them in tests/, where `mcp-policy test` looks by default.
Its one top-level key is `cases`, a list; each case:

    cases:
      - name: mail to someone outside the company needs approval   # optional
        call:
          server: mail                           # required: the MCP server
          tool: send_email                       # required: the tool
          arguments: {to: [bob@elsewhere.org]}   # optional, default {}
          principal:                             # optional
            agent_id: assistant                  # optional
            session_id: s-1                      # optional, default "table-test"
            user_id: ana                         # optional
            roles: [mail-admin]                  # optional, default []
            authenticated: true                  # optional, default false: the policy sees
                                                 # a principal the service verified (method
                                                 # jwt, with `claims` and `scopes` if given)
            asserted_by: gateway                 # optional, not with authenticated: the
                                                 # proxy that vouched for the principal
          time: "2026-12-07T09:00:00Z"           # optional, RFC 3339 with an offset;
                                                 # default: now
          context: {}                            # optional: input.context
        expect:                                  # action and/or rule, required
          action: require_approval               # allow | deny | rate_limit | require_approval
          rule: outbound_mail.external_recipient # the decision's rule id
          reason_contains: elsewhere.org         # optional: a part of the decision's reason
          rate_limits:                           # optional: the decision's limits, in its
            - {max: 20, window_seconds: 3600, scope: user}   # order; each field given must
                                                 # match (rule, max, window_seconds, scope,
                                                 # cost); [] expects none

The call is what a proxy sends to `/v1/decide` (checked as strictly: a call the service
would refuse is a failure of the case), made into the input document the service builds and
evaluated by `OfflinePolicy`: the policy loaded as `serve` loads it, in OPA's evaluator in
this process. What is compared is the policy's answer (action, rule, reason, limits), not
counters or approvals, which the service keeps.

A file is read with the place of everything in it (yaml.compose marks), so a failure names
the file, the line of the case and what differed; a file or case that cannot be read as
cases (bad YAML, an unknown key, a wrong type, a value that is not JSON) fails with the
place and the problem, never with a traceback. Aliases are followed, within bounds (a
"billion laughs" file is refused, not expanded).
"""

from __future__ import annotations

import json
import math
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from engine.authoring.offline import OfflinePolicy
from engine.errors import EngineError
from engine.models import PolicyResult, RateLimitSpec

SUFFIXES = (".cases.yaml", ".cases.yml")
DEFAULT_SESSION = "table-test"
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 100_000  # YAML nodes one file may expand to (aliases count each time used)
MAX_DEPTH = 32  # nesting of a value (the service allows less in arguments: 24)
MAX_SHOWN = 200  # characters of a value quoted in a message

ACTIONS: tuple[str, ...] = typing.get_args(PolicyResult.model_fields["action"].annotation)
LIMIT_FIELDS = ("rule", "max", "window_seconds", "scope", "cost")
SCOPES: tuple[str, ...] = typing.get_args(RateLimitSpec.model_fields["scope"].annotation)

_CASE_KEYS = ("name", "call", "expect")
_CALL_KEYS = ("server", "tool", "arguments", "principal", "time", "context")
_PRINCIPAL_KEYS = (
    "agent_id",
    "session_id",
    "user_id",
    "roles",
    "authenticated",
    "asserted_by",
    "claims",
    "scopes",
)
_EXPECT_KEYS = ("action", "rule", "reason_contains", "rate_limits")
_STR = "tag:yaml.org,2002:str"


class CaseProblem(Exception):
    """Something in a case file that is not a case: its line (1-based) and what is wrong."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Expect:
    action: str | None = None
    rule: str | None = None
    reason_contains: str | None = None
    rate_limits: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class Case:
    file: Path
    line: int
    name: str
    call: dict[str, Any]  # a DecideRequest as JSON
    principal: dict[str, Any]  # what the input document's principal gets besides the call's
    time: datetime | None
    expect: Expect


@dataclass(frozen=True)
class CaseResult:
    """One case's outcome: passed when `problems` is empty."""

    file: Path
    line: int
    name: str
    problems: tuple[str, ...] = ()
    got: str = ""  # the decision, in one line, when there was one

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class CaseFile:
    path: Path
    cases: list[Case] = field(default_factory=list)
    # Problems that keep a case (or the whole file: no name) from running.
    broken: list[CaseResult] = field(default_factory=list)


# --- finding and reading --------------------------------------------------------------------


def is_case_file(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def find_case_files(paths: Iterable[Path]) -> list[Path]:
    """The case files named, and those under the directories named, sorted by directory."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_case_file(p))
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def read_case_file(path: Path) -> CaseFile:
    """The cases of one file; whatever cannot be read is in `broken`, with its line."""
    out = CaseFile(path)
    try:
        root = _compose(path)
    except CaseProblem as problem:
        out.broken.append(CaseResult(path, problem.line, path.name, (problem.message,)))
        return out
    reader = _Reader()
    try:
        top = reader.mapping(root, "the file", allowed=("cases",), required=("cases",))
        items = reader.sequence(top["cases"], "cases")
        if not items:
            raise CaseProblem(_line(top["cases"]), "cases: empty; a file needs at least one case")
    except CaseProblem as problem:
        out.broken.append(CaseResult(path, problem.line, path.name, (problem.message,)))
        return out
    names: dict[str, int] = {}
    for index, node in enumerate(items, start=1):
        try:
            case = _case(reader, path, index, node)
        except CaseProblem as problem:
            name = _name_of(node) or f"case {index}"
            out.broken.append(CaseResult(path, _line(node), name, (_at(problem, node),)))
            continue
        if case.name in names:
            message = f"the name {case.name!r} is also the case's at line {names[case.name]}"
            out.broken.append(CaseResult(path, case.line, case.name, (message,)))
            continue
        names[case.name] = case.line
        out.cases.append(case)
    return out


def _compose(path: Path) -> yaml.Node:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CaseProblem(1, f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise CaseProblem(1, f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CaseProblem(line, f"not UTF-8 text (byte {exc.start})") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p) or str(exc)
        line = mark.line + 1 if mark is not None else 1
        column = f", column {mark.column + 1}" if mark is not None else ""
        raise CaseProblem(line, f"not valid YAML{column}: {problem}") from exc
    except yaml.YAMLError as exc:
        raise CaseProblem(1, f"not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise CaseProblem(1, "not valid YAML: nested too deeply") from exc
    if node is None:
        raise CaseProblem(1, "empty; a case file has a top-level `cases:` list")
    return node


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _at(problem: CaseProblem, case: yaml.Node) -> str:
    """The message, saying where in the case when that is not the case's first line."""
    if problem.line == _line(case):
        return problem.message
    return f"line {problem.line}: {problem.message}"


def _name_of(node: yaml.Node) -> str | None:
    """The case's name when it has a readable one (for a case that cannot be read)."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == "name" and isinstance(value, yaml.ScalarNode) and value.tag == _STR:
                return str(value.value)
    return None


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


class _Reader:
    """Node walking with the checks a case needs; every problem a CaseProblem with a line."""

    def __init__(self) -> None:
        self.nodes = 0
        self.constructor = yaml.SafeLoader("")

    def mapping(
        self,
        node: yaml.Node,
        what: str,
        *,
        allowed: Sequence[str],
        required: Sequence[str] = (),
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise CaseProblem(_line(node), f"{what} must be a mapping, not {_kind(node)}")
        out: dict[str, yaml.Node] = {}
        for key, value in node.value:
            name = self._key(key, what)
            if name not in allowed:
                raise CaseProblem(
                    _line(key),
                    f"{what}: unknown key {_shown(name)!r} (allowed: {', '.join(allowed)})",
                )
            if name in out:
                raise CaseProblem(
                    _line(key), f"{what}: {name!r} given twice (also at line {_line(out[name])})"
                )
            out[name] = value
        for name in required:
            if name not in out:
                raise CaseProblem(_line(node), f"{what}: {name!r} is missing")
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise CaseProblem(_line(node), f"{what} must be a list, not {_kind(node)}")
        return list(node.value)

    def string(self, node: yaml.Node, what: str, *, empty: bool = False) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str):
            raise CaseProblem(
                _line(node), f"{what} must be a string, not {_type_name(value)} ({_shown(value)})"
            )
        if not empty and value == "":
            raise CaseProblem(_line(node), f"{what} must not be empty")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise CaseProblem(_line(node), f"{what} must be true or false, not {_shown(value)}")
        return value

    def number(self, node: yaml.Node, what: str) -> int | float:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isinf(value):
            raise CaseProblem(_line(node), f"{what} must be a number, not {_shown(value)}")
        if math.isnan(value):
            raise CaseProblem(_line(node), f"{what} must be a number, not NaN")
        return value

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise CaseProblem(_line(node), f"{what} must be a single value, not {_kind(node)}")
        try:
            return self.constructor.construct_object(node)
        except yaml.YAMLError as exc:
            raise CaseProblem(_line(node), f"{what}: {_yaml_problem(exc)}") from exc

    def json(self, node: yaml.Node, what: str, depth: int = 0) -> Any:
        """The node as a JSON value (what the service's input carries): no YAML dates,
        binary, sets, tags, NaN or non-string keys."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CaseProblem(
                _line(node), f"{what}: more than {MAX_NODES} values (aliases expand each time)"
            )
        if depth > MAX_DEPTH:
            raise CaseProblem(_line(node), f"{what}: nested more than {MAX_DEPTH} deep")
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise CaseProblem(_line(node), f"{what}: the YAML tag {node.tag} is not JSON")
            return [self.json(item, f"{what}[{i}]", depth + 1) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise CaseProblem(_line(node), f"{what}: the YAML tag {node.tag} is not JSON")
            out: dict[str, Any] = {}
            for key, value in node.value:
                name = self._key(key, what)
                if name in out:
                    raise CaseProblem(_line(key), f"{what}: {name!r} given twice")
                out[name] = self.json(value, f"{what}.{name}", depth + 1)
            return out
        value = self.scalar(node, what)
        if isinstance(value, float) and not math.isfinite(value):
            raise CaseProblem(_line(node), f"{what}: {value} is not a JSON number")
        if value is None or isinstance(value, str | bool | int | float):
            return value
        hint = " (quote it to make it a string)" if isinstance(value, date) else ""
        raise CaseProblem(_line(node), f"{what}: a YAML {_type_name(value)} is not JSON{hint}")

    def _key(self, key: yaml.Node, what: str) -> str:
        if key.tag == "tag:yaml.org,2002:merge":
            raise CaseProblem(_line(key), f"{what}: YAML merge keys (<<) are not supported")
        if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
            shown = _shown(key.value) if isinstance(key, yaml.ScalarNode) else _kind(key)
            raise CaseProblem(_line(key), f"{what}: the key {shown} must be a string")
        return str(key.value)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "nothing (null)"
    return f"the value {_shown(node.value)!r}"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if isinstance(value, datetime | date):
        return "date"
    if isinstance(value, bytes):
        return "binary value"
    return type(value).__name__


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(p) for p in (exc.context, exc.problem) if p) or str(exc)
    return str(exc)


def _case(reader: _Reader, path: Path, index: int, node: yaml.Node) -> Case:
    keys = reader.mapping(node, f"case {index}", allowed=_CASE_KEYS, required=("call", "expect"))
    name = reader.string(keys["name"], "name") if "name" in keys else f"case {index}"
    call_keys = reader.mapping(
        keys["call"], "call", allowed=_CALL_KEYS, required=("server", "tool")
    )
    call: dict[str, Any] = {
        "server": reader.string(call_keys["server"], "call.server"),
        "tool": reader.string(call_keys["tool"], "call.tool"),
        "arguments": {},
    }
    if "arguments" in call_keys:
        call["arguments"] = reader.json(call_keys["arguments"], "call.arguments")
    if "context" in call_keys:
        context = reader.json(call_keys["context"], "call.context")
        if not isinstance(context, dict):
            raise CaseProblem(_line(call_keys["context"]), "call.context must be a mapping")
        call["context"] = context
    principal, extra = _principal(reader, call_keys.get("principal"))
    call["principal"] = principal
    when = _time(reader, call_keys["time"]) if "time" in call_keys else None
    return Case(path, _line(node), name, call, extra, when, _expect(reader, keys["expect"]))


def _principal(reader: _Reader, node: yaml.Node | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The call's principal (as a DecideRequest has it) and what the input document's
    principal gets on top: what the service would have proven."""
    if node is None:
        return {"session_id": DEFAULT_SESSION}, {}
    keys = reader.mapping(node, "call.principal", allowed=_PRINCIPAL_KEYS)
    principal: dict[str, Any] = {"session_id": DEFAULT_SESSION}
    for name in ("agent_id", "session_id", "user_id"):
        if name in keys:
            principal[name] = reader.string(keys[name], f"call.principal.{name}")
    if "roles" in keys:
        roles = reader.sequence(keys["roles"], "call.principal.roles")
        principal["roles"] = [
            reader.string(role, f"call.principal.roles[{i}]") for i, role in enumerate(roles)
        ]
    extra: dict[str, Any] = {}
    proven = "authenticated" in keys and reader.boolean(
        keys["authenticated"], "call.principal.authenticated"
    )
    if proven:
        extra.update(authenticated=True, method="jwt", asserted_by=None, claims={}, scopes=[])
    for name in ("claims", "scopes"):
        if name not in keys:
            continue
        if not proven:
            raise CaseProblem(_line(keys[name]), f"call.principal.{name} needs authenticated: true")
        extra[name] = reader.json(keys[name], f"call.principal.{name}")
    if not isinstance(extra.get("claims", {}), dict):
        raise CaseProblem(_line(keys["claims"]), "call.principal.claims must be a mapping")
    scopes = extra.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise CaseProblem(_line(keys["scopes"]), "call.principal.scopes must be a list of strings")
    if "asserted_by" in keys:
        if proven:
            raise CaseProblem(
                _line(keys["asserted_by"]),
                "call.principal.asserted_by is for a principal the service did not verify "
                "(not with authenticated: true)",
            )
        extra["asserted_by"] = reader.string(keys["asserted_by"], "call.principal.asserted_by")
    return principal, extra


def _time(reader: _Reader, node: yaml.Node) -> datetime:
    value = reader.scalar(node, "call.time")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise CaseProblem(
                _line(node), f"call.time {_shown(value)!r} is not an RFC 3339 time"
            ) from exc
    if not isinstance(value, datetime):
        raise CaseProblem(
            _line(node),
            f"call.time must be an RFC 3339 time (e.g. 2026-12-07T09:00:00Z), not {_shown(value)}",
        )
    if value.tzinfo is None:
        raise CaseProblem(
            _line(node), "call.time must say its offset (e.g. 2026-12-07T09:00:00Z or +01:00)"
        )
    return value


def _expect(reader: _Reader, node: yaml.Node) -> Expect:
    keys = reader.mapping(node, "expect", allowed=_EXPECT_KEYS)
    if "action" not in keys and "rule" not in keys:
        raise CaseProblem(_line(node), "expect: give the action, the rule, or both")
    action = None
    if "action" in keys:
        action = reader.string(keys["action"], "expect.action")
        if action not in ACTIONS:
            raise CaseProblem(
                _line(keys["action"]),
                f"expect.action {_shown(action)!r} is not one of {', '.join(ACTIONS)}",
            )
    rule = reader.string(keys["rule"], "expect.rule") if "rule" in keys else None
    reason = None
    if "reason_contains" in keys:
        reason = reader.string(keys["reason_contains"], "expect.reason_contains")
    limits = None
    if "rate_limits" in keys:
        items = reader.sequence(keys["rate_limits"], "expect.rate_limits")
        limits = tuple(_limit(reader, item, i) for i, item in enumerate(items))
    return Expect(action, rule, reason, limits)


def _limit(reader: _Reader, node: yaml.Node, index: int) -> dict[str, Any]:
    what = f"expect.rate_limits[{index}]"
    keys = reader.mapping(node, what, allowed=LIMIT_FIELDS)
    if not keys:
        raise CaseProblem(_line(node), f"{what}: give at least one of {', '.join(LIMIT_FIELDS)}")
    limit: dict[str, Any] = {}
    for name, value in keys.items():
        if name == "rule":
            limit[name] = reader.string(value, f"{what}.rule")
        elif name == "scope":
            scope = reader.string(value, f"{what}.scope")
            if scope not in SCOPES:
                raise CaseProblem(
                    _line(value),
                    f"{what}.scope {_shown(scope)!r} is not one of {', '.join(SCOPES)}",
                )
            limit[name] = scope
        else:
            limit[name] = reader.number(value, f"{what}.{name}")
    return limit


# --- running --------------------------------------------------------------------------------


def case_id(case_file: Path, name: str) -> str:
    """What `--run REGEX` is matched against: `FILE::NAME`."""
    return f"{case_file.as_posix()}::{name}"


def run_case(policy: OfflinePolicy, case: Case) -> CaseResult:
    """Evaluate one case with `policy` and compare the decision with what it expects."""
    try:
        doc = OfflinePolicy.input_for(case.call, time=case.time)
    except EngineError as exc:
        problem = f"the call is not one the service would decide: {exc.message}"
        return CaseResult(case.file, case.line, case.name, (problem,))
    doc["principal"].update(case.principal)
    try:
        result = policy.evaluate(doc)
    except EngineError as exc:
        problem = f"the policy could not be evaluated: {exc.message}"
        return CaseResult(case.file, case.line, case.name, (problem,))
    problems = tuple(differences(case.expect, result))
    return CaseResult(case.file, case.line, case.name, problems, got=summary(result))


def differences(expect: Expect, result: PolicyResult) -> list[str]:
    """What `result` does not do of `expect`, one line each."""
    out: list[str] = []
    if expect.action is not None and result.action != expect.action:
        out.append(f"expected action {expect.action}, got {result.action}")
    if expect.rule is not None and result.rule != expect.rule:
        out.append(f"expected rule {expect.rule}, got {result.rule}")
    if expect.reason_contains is not None and expect.reason_contains not in result.reason:
        out.append(
            f"expected the reason to contain {_shown(expect.reason_contains)!r}, "
            f"got {_shown(result.reason)!r}"
        )
    if expect.rate_limits is not None:
        out += _limit_differences(expect.rate_limits, result)
    return out


def _limit_differences(expected: Sequence[dict[str, Any]], result: PolicyResult) -> list[str]:
    actual = [limit.model_dump() for limit in result.rate_limits]
    if len(actual) != len(expected):
        return [
            f"expected {len(expected)} rate limit(s), got {len(actual)}: "
            + (_limits_text(actual) or "none")
        ]
    out = []
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        for name, value in want.items():
            if got.get(name) != value:
                out.append(
                    f"rate_limits[{index}].{name}: expected {_shown(value)}, "
                    f"got {_shown(got.get(name))}"
                )
    return out


def _limits_text(limits: Sequence[dict[str, Any]]) -> str:
    return ", ".join(
        f"{_number(limit['max'])} per {_number(limit['window_seconds'])}s per {limit['scope']} "
        f"({limit['rule']})"
        for limit in limits
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def summary(result: PolicyResult) -> str:
    """The decision in one line, for a failure's report."""
    text = f"{result.action} by {result.rule}: {_shown(result.reason)}"
    if result.rate_limits:
        text += f" [limits: {_limits_text([limit.model_dump() for limit in result.rate_limits])}]"
    return text


def select(cases: Iterable[Case], pattern: re.Pattern[str] | None) -> list[Case]:
    if pattern is None:
        return list(cases)
    return [case for case in cases if pattern.search(case_id(case.file, case.name))]
