"""`mcp-policy import intercept FILE… -o DIR`: PolicyLayer Intercept's YAML policies as our
policy: YAML rules for what the YAML can say, a generated Rego package for the rest (the
argument conditions above all), and generated tests for both.

Intercept (a proxy in front of one MCP server) reads one YAML file: `version: "1"`, a
`default` posture (allow, or deny: only the tools listed under `tools` may be called), a
`hide` list (tools removed from tools/list and denied), and per tool (or `"*"`: every
tool) a list of rules. A rule denies outright (`action: deny`), or (`evaluate`) lets a
call through only when every one of its `conditions` holds (`path: args.<a>.<b>`, an
operator, a value); a `state` counter (`counter`, `window` minute/hour/day, `increment` or
`increment_from: args.<a>`) with an `lt`/`lte` condition on itself is a limit, and
`rate_limit: N/<window>` is shorthand for one. `on_deny` is the message a denied agent
reads. This importer follows the semantics of Intercept's policy reference; it shares no
code or text with Intercept.

What each construct becomes (DIR is laid out as a policy repository, `mcp-policy init`'s):

- `policies/<package>.yaml`: every tool named under `tools` or `hide` is catalogued under
  the server given by `--server` (default "*", any server), category `imported`, with a
  rule of its own in `rules`: `deny` for a hidden tool or one with a deny rule (reason: its
  `on_deny`; the proxy hides such a tool from tools/list, as Intercept's `hide` does),
  else `rate_limit` with its first limit (scope `global`: Intercept's counters are shared
  by every caller; `increment_from: args.<a>` becomes `increment_from: <a>`), else `allow`.
- `policies/intercept_default.yaml`: `default`, the rule for every tool not in the
  catalog, on any server: Intercept's posture. Several files are for several servers
  (one `--server` each, in order); deny when any of them says deny. When the repository
  sets `default` already (`mcp-policy init` writes one), its own stays and this file is
  not written; a posture that differs from it is reported as not converted.
- `rego/mcp/rules/<package>/<package>.rego` (package `mcp.rules.<package>`): per
  Intercept rule with conditions, a deny (rule id `<package>.<tool>.<rule name>`, reason
  its `on_deny`) when the call fails one of them; the limits the YAML rule cannot carry (a
  tool's second limit, a counted argument below the top level, the `"*"` rules' limits);
  the `"*"` rules (on every tool of the server, listed or not) and `hide: ["*"]`.
  `load_errors` rejects a policy whose regular expressions OPA cannot compile (Intercept
  refuses such a file too).
- `<package>_test.rego` beside it: generated tests, checked to pass before anything is
  written: per rule a call that meets its conditions and, per condition, calls that do not
  (at the edges of what it takes, without its argument, with one of another type); each
  limit and denial; and per tool the whole decision (the YAML and the Rego together).

The output is checked with the policy already in DIR (its rego/ and policies/) and the
framework's Rego, as `serve` loads them (schema, compile, `data.mcp.load_errors`), and its
generated tests are run in OPA's evaluator in this process: a conflict with the
repository (a tool it catalogues already) or a test that does not pass writes nothing.

Conditions keep Intercept's meaning: a path descends objects only; a missing argument fails
every operator but `exists: false` (`exists` counts null as missing); `lt`/`lte`/`gt`/`gte`
want a number argument; `regex` matches a string with Go's RE2 (as OPA does), unanchored;
`contains` is a substring of a string or an element of a list. Intercept compares values
of different JSON types by their printed text (`5` equals `"5"`, `true` equals `"true"`).
Here they are never equal (`eq`, `in`, `contains` fail), and they differ (`neq`, `not_in`
pass) only where no printed text could make them alike (not for a string that reads as a
number against a number, "true"/"false" against a boolean, …): else a condition comparing
them fails either way. The import denies rather than guess.

Differences, reported as notes (the output is at least as strict): our windows slide (no
more than N in ANY interval of the window) where Intercept's are calendar-aligned; a
counted argument must be a number >= 0 (Intercept truncates fractions and accepts negative
amounts, which lower its counter); a limit that allows nothing denies every call; limits
above 2^53 are held at 2^53; a counter no condition limits has nothing to convert; with a
named `--server`, `default: allow` still applies to every server (our `default` is one);
a rule for which no passing call can be made up (a regular expression beyond the simple
ones) gets generated tests of denied calls only.

Not converted (reported as "not converted", exit status 3; the output is still written,
and fails closed): a `"*"` rule's limit counts each tool apart (Intercept's `_global`
counter adds all tools up; our counters are per tool); a condition on a counter other than
the rule's own limit (another counter, `gt`/`eq`… on a counter, a counter with a counted
argument checked twice), a value JSON cannot hold (`.inf`, `.nan`), a fixed increment
below 1: the rule they belong to denies every call; keys Intercept does not know are
ignored (as Intercept ignores them); with several files, an `allow` posture overruled by
another file's `deny`, or a posture other than the repository's own default; a tool
name MCP cannot carry (1-128 of A-Z a-z 0-9 _ . -): the framework denies every call
naming it (input.tool_name_invalid; a note when Intercept denies it too).

Every finding is printed on stderr with its file and line, and written as a comment at the
top of the output. A file Intercept itself would refuse (bad YAML, a wrong type, an unknown
operator or action, a bad window…) is an error: nothing is written (exit 1). Text from the
input reaches the output only as JSON string literals (Rego) or through the YAML emitter,
and as JSON-escaped ASCII in comments: no input can end a string or a comment.

Exit status: 0 everything converted (notes allowed), 3 written with parts not converted,
1 nothing written (a file is invalid, an output file exists without --force, the output
did not load or its tests did not pass), 2 the in-process OPA is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TextIO, cast

import yaml

from engine.errors import EngineError, PolicyRejected, PolicyUnavailable
from engine.policy.opa_process import ToolMissing

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TOOL_MISSING = 2
EXIT_OMISSIONS = 3

HELP = "convert policies of another tool into this engine's YAML rules and Rego"
DESCRIPTION = """\
Convert policies written for another tool into a policy repository for this engine:
YAML rules (policies/), a generated Rego package per file (rego/mcp/rules/) and its
generated tests. The tools: intercept (PolicyLayer Intercept's YAML policies).
"""
INTERCEPT_HELP = "convert PolicyLayer Intercept YAML policies (exit 3: parts not converted)"
INTERCEPT_DESCRIPTION = """\
Convert PolicyLayer Intercept policy files into DIR: policies/<package>.yaml (catalog and
per-tool rules), policies/intercept_default.yaml (the rule for tools not in the catalog)
and rego/mcp/rules/<package>/ (the argument conditions and what else the YAML cannot say,
with generated tests). The output is checked the way `serve` loads it (with the
framework's Rego) and its tests are run before anything is written. Whatever cannot be
expressed is printed on stderr and noted at the top of the output, never dropped
silently; such parts fail closed. Exit status: 0 all converted, 3 written with parts not
converted, 1 nothing written, 2 OPA missing.
"""

MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_INT_DIGITS = 400
MAX_EXAMPLE = 200  # characters of a string made up to match a regular expression
MAX_LIMIT = 1 << 53  # above it, float counters are no longer exact
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # what the catalog (and MCP) takes
WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
OPERATORS = ("eq", "neq", "in", "not_in", "lt", "lte", "gt", "gte", "regex", "contains", "exists")
NUMERIC_OPS = {"lt", "lte", "gt", "gte"}
LIST_OPS = {"in", "not_in"}
CATEGORY = "imported"
DEFAULT_FILE = "intercept_default.yaml"
LINE_BUDGET = 112  # longer generated lines carry a Regal line-length exemption
MAX_FILE_LINES = 480  # longer generated files carry a Regal file-length exemption
MAX_RULE_LINES = 26  # longer generated rule bodies carry a Regal rule-length exemption

Where = tuple[str | int, ...]


class ImportFailed(EngineError):
    """Nothing was written: the lines say why (each with its file and line)."""

    def __init__(self, message: str, lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.lines = list(lines)


@dataclass(frozen=True)
class Finding:
    """Something of the input the output does not say as Intercept does: `omitted` (not
    converted, exit status 3) or a note (the output is at least as strict)."""

    file: str
    line: int
    where: str
    message: str
    omitted: bool
    places: int = 1  # where the same is found (grouped)

    def text(self) -> str:
        kind = "not converted" if self.omitted else "note"
        return f"{self.file}:{self.line}: {self.where}: {kind}: {self.message}"


def grouped(findings: Sequence[Finding]) -> list[Finding]:
    """One finding per message: where it is said again is added to the first."""
    first: dict[tuple[bool, str], Finding] = {}
    again: dict[tuple[bool, str], list[Finding]] = {}
    for finding in findings:
        key = (finding.omitted, finding.message)
        if key in first:
            again[key].append(finding)
        else:
            first[key], again[key] = finding, []
    out: list[Finding] = []
    for key, finding in first.items():
        more = again[key]
        if more:
            places = ", ".join(f"{f.where} (line {f.line})" for f in more[:5])
            places += ", ..." if len(more) > 5 else ""
            message = f"{finding.message}; also {len(more)} more: {places}"
            finding = Finding(
                finding.file, finding.line, finding.where, message, finding.omitted, 1 + len(more)
            )
        out.append(finding)
    return out


def _show(value: Any) -> str:
    """A value of the input as JSON text in ASCII: safe in messages, comments and code."""
    try:
        return json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):
        return json.dumps(str(value), ensure_ascii=True)


def _where_text(where: Where) -> str:
    out = ""
    for part in where:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{_show(part)}]"
    return out or "(top)"


# --- reading: YAML 1.2 scalars (as Intercept's Go YAML reads them), with line numbers -----


_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_YAML_STR = "tag:yaml.org,2002:str"
_YAML_SCALARS = {
    "tag:yaml.org,2002:int": int,
    "tag:yaml.org,2002:float": float,
    "tag:yaml.org,2002:bool": bool,
    "tag:yaml.org,2002:null": type(None),
}


def _core_scalar(text: str) -> Any:
    """A plain scalar under YAML 1.2's core schema (`yes` and `on` are text, not booleans)."""
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    digits = text.lstrip("+-")
    if _INT.fullmatch(text) or re.fullmatch(r"0o[0-7]+|0x[0-9a-fA-F]+", text):
        if len(digits) > MAX_INT_DIGITS:
            raise ValueError("a number with too many digits")
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if re.fullmatch(r"[-+]?\.(inf|Inf|INF)", text):
        return -math.inf if text.startswith("-") else math.inf
    if re.fullmatch(r"\.(nan|NaN|NAN)", text):
        return math.nan
    return text


class _Reader:
    """Turns one YAML document into plain values, recording the line of every value."""

    def __init__(self, display: str) -> None:
        self.display = display
        self.lines: dict[Where, int] = {}
        self.nodes = 0
        self.resolver = yaml.resolver.Resolver()

    def fail(self, node: yaml.Node, message: str) -> ImportFailed:
        line = f"{self.display}:{node.start_mark.line + 1}: {message}"
        return ImportFailed(f"{self.display} cannot be read", [line])

    def value(self, node: yaml.Node, where: Where, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            raise self.fail(
                node, f"more than {MAX_NODES} values or {MAX_DEPTH} levels (YAML aliases?)"
            )
        self.lines.setdefault(where, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self.fail(node, f"unsupported YAML tag {_show(node.tag)}")
            return [self.value(item, (*where, i), depth + 1) for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode) or node.tag != "tag:yaml.org,2002:map":
            raise self.fail(node, f"unsupported YAML tag {_show(node.tag)}")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(key_node, "a key must be text")
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.fail(key_node, "merge keys (<<) are not supported")
            key = key_node.value
            if key in out:
                raise self.fail(key_node, f"the key {_show(key)} is defined twice")
            out[key] = self.value(value_node, (*where, key), depth + 1)
        return out

    def scalar(self, node: yaml.ScalarNode) -> Any:
        plain = node.style is None
        resolve = cast(Callable[..., str], self.resolver.resolve)
        implicit = resolve(yaml.ScalarNode, node.value, (plain, not plain))
        if node.tag == implicit:  # no explicit tag: YAML 1.2's resolution
            try:
                return _core_scalar(node.value) if plain else node.value
            except ValueError as exc:
                raise self.fail(node, str(exc)) from exc
        if node.tag == _YAML_STR:
            return node.value
        kind = _YAML_SCALARS.get(node.tag)
        try:
            value = _core_scalar(node.value) if kind is not None else None
        except ValueError as exc:
            raise self.fail(node, str(exc)) from exc
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is None or not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise self.fail(node, f"unsupported YAML value {_show(node.value)} ({node.tag})")
        return value


def read_policy_file(path: Path) -> tuple[Any, dict[Where, int]]:
    """The document in `path` as plain values and the line of each; ImportFailed else."""
    display = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImportFailed(f"cannot read {display}", [f"{display}: {exc.strerror or exc}"]) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ImportFailed(f"{display} is too large", [f"{display}: larger than 1 MiB"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImportFailed(
            f"{display} is not UTF-8", [f"{display}: not UTF-8 text (byte {exc.start})"]
        ) from exc
    reader = _Reader(display)
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except RecursionError as exc:
        raise ImportFailed(
            f"{display} cannot be read", [f"{display}: nested too deeply to be a policy"]
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ImportFailed(
            f"{display} is not valid YAML", [f"{display}{where}: not valid YAML: {problem}"]
        ) from exc
    if len(nodes) != 1:
        count = "no document" if not nodes else f"{len(nodes)} documents"
        raise ImportFailed(
            f"{display} must hold one policy", [f"{display}: {count}; one policy per file"]
        )
    return reader.value(nodes[0], ()), reader.lines


# --- the Intercept policy, checked by Intercept's own rules --------------------------------


@dataclass
class _Condition:
    where: Where
    path: str
    op: str
    value: Any


@dataclass
class _State:
    where: Where
    counter: str
    window: str
    increment: int
    increment_from: str


@dataclass
class _Rule:
    where: Where
    tool: str  # "*": the wildcard rules
    index: int
    name: str
    action: str  # evaluate | deny
    conditions: list[_Condition]
    on_deny: str
    state: _State | None


@dataclass
class _Policy:
    display: str
    lines: dict[Where, int]
    description: str
    default: str
    hide: list[tuple[str, Where]]
    tools: dict[str, tuple[Where, list[_Rule]]]


_KNOWN_KEYS: dict[str, set[str]] = {
    "policy": {"version", "description", "default", "hide", "tools"},
    "tool": {"rules"},
    "rule": {"name", "action", "rate_limit", "conditions", "on_deny", "state"},
    "condition": {"path", "op", "value"},
    "state": {"counter", "window", "increment", "increment_from"},
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Checker:
    """Reads a document as an Intercept policy: the errors Intercept would refuse it for,
    and the keys it would ignore (findings)."""

    def __init__(self, display: str, lines: dict[Where, int]) -> None:
        self.display = display
        self.lines = lines
        self.errors: list[str] = []
        self.findings: list[Finding] = []

    def line(self, where: Where) -> int:
        while where not in self.lines and where:
            where = where[:-1]
        return self.lines.get(where, 1)

    def error(self, where: Where, message: str) -> None:
        self.errors.append(f"{self.display}:{self.line(where)}: {_where_text(where)}: {message}")

    def unknown_keys(self, doc: dict[str, Any], kind: str, where: Where) -> None:
        for key in doc:
            if key not in _KNOWN_KEYS[kind]:
                self.findings.append(
                    Finding(
                        self.display,
                        self.line((*where, key)),
                        _where_text((*where, key)),
                        "unknown key ignored (Intercept ignores the keys it does not know)",
                        omitted=True,
                    )
                )

    def mapping(self, value: Any, where: Where, what: str) -> dict[str, Any] | None:
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        self.error(where, f"{what} must be a mapping, got {_kind(value)}")
        return None

    def listing(self, value: Any, where: Where, what: str) -> list[Any] | None:
        if value is None:
            return []
        if isinstance(value, list):
            return value
        self.error(where, f"{what} must be a list, got {_kind(value)}")
        return None

    def text(self, doc: dict[str, Any], key: str, where: Where) -> str:
        value = doc.get(key)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        self.error((*where, key), f"{key} must be text, got {_kind(value)}")
        return ""

    def policy(self, doc: Any) -> _Policy | None:
        if not isinstance(doc, dict):
            self.error((), f"the policy must be a mapping, got {_kind(doc)}")
            return None
        self.unknown_keys(doc, "policy", ())
        version = doc.get("version")
        if version not in ("1", 1) or isinstance(version, bool):
            self.error(("version",), f'version must be "1", got {_show(version)}')
        description = self.text(doc, "description", ())
        default = doc.get("default") or "allow"
        if default not in ("allow", "deny"):
            self.error(("default",), f'default must be "allow" or "deny", got {_show(default)}')
        hide = self.hide(doc.get("hide"))
        tools: dict[str, tuple[Where, list[_Rule]]] = {}
        listed = self.mapping(doc.get("tools"), ("tools",), "tools")
        for name, spec in (listed or {}).items():
            where: Where = ("tools", name)
            tool = self.mapping(spec, where, "a tool")
            if tool is None:
                continue
            self.unknown_keys(tool, "tool", where)
            items = self.listing(tool.get("rules"), (*where, "rules"), "rules")
            rules = [
                rule
                for i, item in enumerate(items or [])
                if (rule := self.rule(item, name, i)) is not None
            ]
            self.counters(name, rules)
            tools[name] = (where, rules)
        self.references(tools)
        if self.errors:
            return None
        return _Policy(self.display, self.lines, description, default, hide, tools)

    def hide(self, value: Any) -> list[tuple[str, Where]]:
        names = self.listing(value, ("hide",), "hide") or []
        out: list[tuple[str, Where]] = []
        seen: set[str] = set()
        for i, name in enumerate(names):
            where: Where = ("hide", i)
            if not isinstance(name, str):
                self.error(where, f"a hidden tool must be a name, got {_kind(name)}")
            elif not name.strip():
                self.error(where, "entry must not be empty")
            elif name in seen:
                self.error(where, f"{_show(name)} is listed twice")
            else:
                seen.add(name)
                out.append((name, where))
        return out

    def rule(self, item: Any, tool: str, index: int) -> _Rule | None:
        where: Where = ("tools", tool, "rules", index)
        doc = self.mapping(item, where, "a rule")
        if doc is None:
            return None
        self.unknown_keys(doc, "rule", where)
        name = self.text(doc, "name", where)
        action = doc.get("action") or "evaluate"
        on_deny = self.text(doc, "on_deny", where)
        raw_conditions = self.listing(doc.get("conditions"), (*where, "conditions"), "conditions")
        conditions = [
            c
            for j, item in enumerate(raw_conditions or [])
            if (c := self.condition(item, (*where, "conditions", j))) is not None
        ]
        state = self.state(doc.get("state"), (*where, "state"))
        shorthand = doc.get("rate_limit")
        if shorthand not in (None, ""):
            desugared = self.rate_limit(shorthand, (*where, "rate_limit"), tool)
            if raw_conditions or doc.get("state") is not None:
                self.error(where, "rate_limit cannot be combined with conditions or state")
            if action == "deny":
                self.error(where, 'rate_limit cannot be used with action "deny"')
            if desugared is not None:
                conditions, state = desugared
                action = "evaluate"
        if not name:
            self.error(where, "rule must have a name")
        if action not in ("evaluate", "deny"):
            self.error(
                (*where, "action"), f'action must be "evaluate" or "deny", got {_show(action)}'
            )
        elif action == "deny" and raw_conditions:
            self.error(where, "deny rules must not have conditions")
        elif action == "evaluate" and not conditions:
            self.error(where, "evaluate rules must have at least one condition")
        return _Rule(where, tool, index, name, str(action), conditions, on_deny, state)

    def rate_limit(
        self, value: Any, where: Where, tool: str
    ) -> tuple[list[_Condition], _State] | None:
        found = re.fullmatch(r"\+?([0-9]+)/([a-z]+)", value) if isinstance(value, str) else None
        if found is None:
            self.error(
                where, f'rate_limit must be "<count>/<window>", e.g. "5/hour", got {_show(value)}'
            )
            return None
        count, window = int(found[1][:MAX_INT_DIGITS]), found[2]
        if count < 1 or count >= 1 << 63 or len(found[1]) > MAX_INT_DIGITS:
            self.error(where, f"rate_limit count must be a positive integer, got {_show(found[1])}")
            return None
        if window not in WINDOWS:
            self.error(where, f"rate_limit window must be minute, hour or day, got {_show(window)}")
            return None
        counter = f"_rate_{window}"
        scope = "_global" if tool == "*" else tool
        condition = _Condition(where, f"state.{scope}.{counter}", "lte", count)
        return [condition], _State(where, counter, window, 1, "")

    def condition(self, item: Any, where: Where) -> _Condition | None:
        doc = self.mapping(item, where, "a condition")
        if doc is None:
            return None
        self.unknown_keys(doc, "condition", where)
        path = self.text(doc, "path", where)
        op = doc.get("op")
        value = doc.get("value")
        if not path.startswith(("args.", "state.")):
            self.error(
                (*where, "path"), f'path must start with "args." or "state.", got {_show(path)}'
            )
        if op not in OPERATORS:
            self.error((*where, "op"), f"unknown operator {_show(op)}")
        elif op in LIST_OPS and not isinstance(value, list):
            self.error((*where, "value"), f"operator {op} requires a list value")
        elif op in NUMERIC_OPS and not _is_number(value):
            self.error((*where, "value"), f"operator {op} requires a numeric value")
        elif op == "exists" and not isinstance(value, bool):
            self.error((*where, "value"), "operator exists requires true or false")
        elif op == "regex" and not isinstance(value, str):
            self.error((*where, "value"), "operator regex requires a string (the pattern)")
        return _Condition(where, path, str(op), value)

    def state(self, value: Any, where: Where) -> _State | None:
        if value is None:
            return None
        doc = self.mapping(value, where, "state")
        if doc is None:
            return None
        self.unknown_keys(doc, "state", where)
        counter = self.text(doc, "counter", where)
        window = doc.get("window")
        increment = doc.get("increment")
        increment_from = self.text(doc, "increment_from", where)
        if not counter:
            self.error((*where, "counter"), "counter must not be empty")
        if window not in WINDOWS:
            self.error(
                (*where, "window"), f"window must be minute, hour or day, got {_show(window)}"
            )
        if increment is not None and (
            not isinstance(increment, int) or isinstance(increment, bool)
        ):
            self.error(
                (*where, "increment"), f"increment must be an integer, got {_show(increment)}"
            )
            increment = 1
        elif isinstance(increment, int) and abs(increment) >= 1 << 63:
            self.error((*where, "increment"), "increment is out of range")
            increment = 1
        if increment_from and not increment_from.startswith("args."):
            self.error(
                (*where, "increment_from"),
                f'increment_from must start with "args.", got {_show(increment_from)}',
            )
        return _State(where, counter, str(window), increment or 1, increment_from)

    def counters(self, tool: str, rules: list[_Rule]) -> None:
        seen: dict[str, int] = {}
        for rule in rules:
            if rule.state is None:
                continue
            if rule.state.counter in seen:
                self.error(
                    rule.where,
                    f"duplicate state counter {_show(rule.state.counter)} "
                    f"(also used by rules[{seen[rule.state.counter]}])",
                )
            seen.setdefault(rule.state.counter, rule.index)

    def references(self, tools: dict[str, tuple[Where, list[_Rule]]]) -> None:
        for _, rules in tools.values():
            for rule in rules:
                for condition in rule.conditions:
                    parts = condition.path.split(".", 2)
                    if parts[0] != "state" or len(parts) < 3:
                        continue
                    owner = "*" if parts[1] == "_global" and parts[1] not in tools else parts[1]
                    counters = {r.state.counter for r in tools.get(owner, ((), []))[1] if r.state}
                    if parts[2] not in counters:
                        self.error(
                            condition.where,
                            f"condition reads {_show(condition.path)}, but no rule of that "
                            "tool defines that counter in a state block",
                        )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "text"
    if value is None:
        return "nothing"
    return "a list" if isinstance(value, list) else "a mapping"


def check_policy(doc: Any, display: str, lines: dict[Where, int]) -> tuple[_Policy, list[Finding]]:
    """The policy in `doc`, and the keys it holds that Intercept ignores; ImportFailed with
    every error Intercept would refuse the file for."""
    checker = _Checker(display, lines)
    policy = checker.policy(doc)
    if policy is None:
        raise ImportFailed(f"{display} is not a valid Intercept policy", checker.errors)
    return policy, checker.findings


# --- what it becomes ------------------------------------------------------------------------


Path_ = tuple[str, ...]  # an argument path: keys, each descending into an object


@dataclass(frozen=True)
class ArgCondition:
    where: str
    path: Path_
    op: str
    value: Any


@dataclass(frozen=True)
class Limit:
    max: int
    window: int
    cost: Path_ | None  # None: each call counts 1


@dataclass
class Check:
    """An Intercept rule with conditions on the arguments: denies when one fails. Blocked:
    a condition could not be converted, so it denies every call (fail closed)."""

    n: int
    tool: str | None  # None: every tool of the server (an Intercept "*" rule)
    rule_id: str
    reason: str
    where: str
    conditions: list[ArgCondition]
    blocked: bool = False


@dataclass
class Denial:
    """Every call denied (a hidden tool or a deny rule the YAML cannot hold, `hide: [*]`)."""

    n: int
    tool: str | None
    rule_id: str
    reason: str  # "": the generated one that names the tool


@dataclass
class RegoLimit:
    n: int
    tool: str | None
    rule_id: str
    reason: str
    limit: Limit


@dataclass
class _RuleOut:
    """One Intercept rule, converted: a deny, a check and/or a limit."""

    rule: _Rule
    rule_id: str
    reason: str
    denies: bool = False
    conditions: list[ArgCondition] = field(default_factory=list)
    blocked: bool = False
    limit: Limit | None = None
    limit_reason: str | None = None  # None: the generated one


@dataclass
class Converted:
    """One Intercept file as our policy."""

    display: str
    package: str
    server: str
    description: str
    default: str
    catalog: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    denials: list[Denial] = field(default_factory=list)
    limits: list[RegoLimit] = field(default_factory=list)
    patterns: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # For the generated decision tests.
    denied_tools: set[str] = field(default_factory=set)
    blocked_tools: set[str] = field(default_factory=set)

    def next_n(self) -> int:
        return len(self.checks) + len(self.denials) + len(self.limits) + 1


class _Converter:
    def __init__(self, policy: _Policy, package: str, server: str) -> None:
        self.policy = policy
        self.out = Converted(policy.display, package, server, policy.description, policy.default)
        self.ids: set[str] = set()

    # -- findings and names

    def line(self, where: Where) -> int:
        while where not in self.policy.lines and where:
            where = where[:-1]
        return self.policy.lines.get(where, 1)

    def find(self, where: Where, message: str, *, omitted: bool) -> None:
        self.out.findings.append(
            Finding(self.policy.display, self.line(where), _where_text(where), message, omitted)
        )

    def rule_id(self, tool: str, name: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "rule"
        owner = tool if tool == "*" or TOOL_NAME.fullmatch(tool) else _slug(tool, "tool")
        base = f"{self.out.package}.{owner}.{slug}"
        rule_id, k = base, 2
        while rule_id in self.ids:
            rule_id, k = f"{base}_{k}", k + 1
        self.ids.add(rule_id)
        return rule_id

    # -- one rule

    def convert_rule(self, rule: _Rule) -> _RuleOut:
        named = _show_text(rule.name)
        reason = rule.on_deny or f"denied by rule {named}: a condition on the arguments fails"
        if rule.action == "deny":
            reason = rule.on_deny or f"denied by rule {named}"
        out = _RuleOut(rule, self.rule_id(rule.tool, rule.name), reason)
        if rule.action == "deny":
            out.denies = True
            return out
        own = None
        if rule.state is not None:
            scope = "_global" if rule.tool == "*" else rule.tool
            own = f"state.{scope}.{rule.state.counter}"
        counter_conditions = [c for c in rule.conditions if c.path == own]
        for condition in rule.conditions:
            if condition.path.startswith("args."):
                self.argument(out, condition)
            elif condition.path != own:
                self.block(
                    out,
                    condition.where,
                    f"a condition on {_show(condition.path)}, a counter other than this "
                    "rule's own limit, cannot be checked here",
                )
        if rule.state is not None:
            self.counter(out, rule.state, counter_conditions)
        return out

    def argument(self, out: _RuleOut, condition: _Condition) -> None:
        if not _finite(condition.value):
            self.block(out, condition.where, f"the value {_show(condition.value)} has no JSON form")
            return
        path = tuple(condition.path.removeprefix("args.").split("."))
        where = _where_text(condition.where)
        out.conditions.append(ArgCondition(where, path, condition.op, condition.value))
        if condition.op == "regex":
            self.out.patterns[where] = condition.value

    def block(self, out: _RuleOut, where: Where, message: str) -> None:
        out.blocked = True
        self.find(where, f"{message}; the rule denies every call instead", omitted=True)

    def counter(self, out: _RuleOut, state: _State, conditions: list[_Condition]) -> None:
        limit = next((c for c in conditions if c.op in ("lt", "lte") and _is_number(c.value)), None)
        if limit is None:
            if conditions:
                self.block(
                    out,
                    conditions[0].where,
                    f"counter {_show(state.counter)} has no lt/lte limit, so Intercept "
                    "never counts it; a condition on it",
                )
            else:
                self.find(
                    state.where, "a counter no condition limits: nothing to convert", omitted=False
                )
            return
        others = [c for c in conditions if c is not limit]
        bad = [c for c in others if c.op not in ("lt", "lte") or not _is_number(c.value)]
        if bad or (others and state.increment_from):
            self.block(
                out,
                (bad or others)[0].where,
                f"a second condition on counter {_show(state.counter)}",
            )
            return
        if not all(_finite(c.value) for c in conditions):
            self.block(out, limit.where, f"the limit {_show(limit.value)} has no JSON form")
            return
        total = math.trunc(limit.value) - (1 if limit.op == "lt" else 0)
        window = WINDOWS[state.window]
        if state.increment_from:
            cost = tuple(state.increment_from.removeprefix("args.").split("."))
            self.find(
                state.where,
                f"the counted argument {_show(state.increment_from)} must be a number >= 0 "
                "and counts as is (Intercept truncates it to an integer and accepts negative "
                "amounts); windows slide",
                omitted=False,
            )
            self.set_limit(out, state, total, window, cost)
            return
        if state.increment < 1:
            self.block(out, state.where, f"the increment {state.increment} is below 1")
            return
        calls = [_calls(total, state.increment, "reserve")]
        calls += [_calls(c.value, state.increment, c.op) for c in conditions]
        self.find(
            state.where,
            "windows slide (no more than the limit in any interval of that length); "
            "Intercept's start on the minute, hour or day",
            omitted=False,
        )
        self.set_limit(out, state, min(calls), window, None)

    def set_limit(
        self, out: _RuleOut, state: _State, most: int, window: int, cost: Path_ | None
    ) -> None:
        if most < 1:
            self.find(
                state.where,
                "the limit allows nothing: every call is denied (Intercept would still let "
                "through calls that count nothing)"
                if cost
                else "the limit allows no call: every call is denied",
                omitted=False,
            )
            out.denies = True
            out.reason = (
                out.rule.on_deny
                or f"denied by rule {_show_text(out.rule.name)}: its limit allows no call"
            )
            return
        if most > MAX_LIMIT:
            self.find(state.where, f"the limit {most} is held at {MAX_LIMIT}", omitted=False)
            most = MAX_LIMIT
        out.limit = Limit(most, window, cost)
        out.limit_reason = out.rule.on_deny or None

    # -- the policy

    def convert(self) -> Converted:
        tools = self.policy.tools
        hidden = dict(self.policy.hide)
        if "*" in hidden:
            self.add_denial(None, self.rule_id("*", "hidden"), "")
        for name, (where, rules) in sorted(tools.items()):
            if name != "*":
                self.tool(name, where, rules, hidden.get(name))
        for name, where in self.policy.hide:
            if name != "*" and name not in tools:
                self.tool(name, where, [], where)
        if "*" in tools:
            self.wildcard(tools["*"][1])
        return self.out

    def tool(self, name: str, where: Where, rules: list[_Rule], hidden: Where | None) -> None:
        if TOOL_NAME.fullmatch(name) is None:
            # The framework denies every call naming such a tool (input.tool_name_invalid).
            denied = hidden is not None or any(rule.action == "deny" for rule in rules)
            self.find(
                where,
                "an MCP tool name is 1 to 128 of A-Z a-z 0-9 _ . - : every call naming this "
                "one is denied (rule input.tool_name_invalid)"
                + ("" if denied else ", where Intercept would apply its rules"),
                omitted=not denied,
            )
            return
        converted = [self.convert_rule(rule) for rule in rules]
        denied_by = next((c for c in converted if c.denies), None)
        if hidden is not None or denied_by is not None:
            reason = denied_by.reason if denied_by is not None and hidden is None else ""
            self.out.denied_tools.add(name)
            self.catalogue(
                name,
                "high",
                {
                    "action": "deny",
                    "reason": reason or f"tool {_show_text(name)} is hidden by the policy",
                },
            )
            return
        yaml_limit: Limit | None = None
        yaml_reason: str | None = None
        for rule in converted:
            if rule.conditions or rule.blocked:
                self.add_check(name, rule)
            if rule.limit is None:
                continue
            cost = rule.limit.cost
            if yaml_limit is None and (cost is None or (len(cost) == 1 and cost[0] != "")):
                yaml_limit, yaml_reason = rule.limit, rule.limit_reason
            else:
                self.add_limit(name, rule)
        if any(rule.blocked for rule in converted):
            self.out.blocked_tools.add(name)
        risk = "medium" if converted else "low"
        if yaml_limit is None:
            self.catalogue(name, risk, "allow")
            return
        spec: dict[str, Any] = {
            "max": yaml_limit.max,
            "window": yaml_limit.window,
            "scope": "global",
        }
        if yaml_limit.cost is not None:
            spec["increment_from"] = yaml_limit.cost[0]
        rule_yaml: dict[str, Any] = {"action": "rate_limit", "rate_limit": spec}
        if yaml_reason:
            rule_yaml["reason"] = yaml_reason
        self.catalogue(name, risk, rule_yaml)

    def wildcard(self, rules: list[_Rule]) -> None:
        for rule in (self.convert_rule(r) for r in rules):
            if rule.denies:
                self.add_denial(None, rule.rule_id, rule.reason)
                continue
            if rule.conditions or rule.blocked:
                self.add_check(None, rule)
            if rule.limit is not None:
                self.find(
                    rule.rule.where,
                    "Intercept's _global counter adds up the calls of every tool; here each "
                    "tool is counted apart (every tool gets this limit of its own)",
                    omitted=True,
                )
                self.add_limit(None, rule)

    def catalogue(self, name: str, risk: str, rule: Any) -> None:
        self.out.catalog[name] = {
            "category": CATEGORY,
            "risk": risk,
            "description": f"imported from the Intercept policy {Path(self.out.display).name}",
        }
        self.out.rules[name] = rule

    def add_check(self, tool: str | None, rule: _RuleOut) -> None:
        self.out.checks.append(
            Check(
                self.out.next_n(),
                tool,
                rule.rule_id,
                rule.reason,
                _where_text(rule.rule.where),
                rule.conditions,
                rule.blocked,
            )
        )

    def add_denial(self, tool: str | None, rule_id: str, reason: str) -> None:
        self.out.denials.append(Denial(self.out.next_n(), tool, rule_id, reason))

    def add_limit(self, tool: str | None, rule: _RuleOut) -> None:
        assert rule.limit is not None
        limit = rule.limit
        reason = rule.limit_reason or _limit_reason(rule.rule.name, limit)
        self.out.limits.append(RegoLimit(self.out.next_n(), tool, rule.rule_id, reason, limit))


def _show_text(text: str) -> str:
    """A name of the input quoted for a reason (agents read it: any Unicode kept)."""
    return json.dumps(text, ensure_ascii=False)


def _limit_reason(name: str, limit: Limit) -> str:
    unit = {60: "minute", 3600: "hour", 86400: "day"}[limit.window]
    if limit.cost is None:
        return f"rule {_show_text(name)}: at most {limit.max} calls per {unit} across all callers"
    counted = _show_text(".".join(limit.cost))
    return (
        f"rule {_show_text(name)}: at most a total of {limit.max} of argument {counted} "
        f"per {unit} across all callers"
    )


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _calls(bound: float, increment: int, op: str) -> int:
    """How many calls a fixed increment lets through: "reserve", the limit Intercept
    reserves against (counter after the call <= bound); lte/lt, a check of the counter
    before the call (k*n <= bound, k*n < bound)."""
    exact = Fraction(bound) / increment
    if op == "reserve":
        return max(math.floor(exact), 0)
    if op == "lte":
        return math.floor(exact) + 1 if exact >= 0 else 0
    return max(math.ceil(exact), 0)


def _slug(text: str, fallback: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]
    return slug or fallback


def package_names(files: Sequence[Path]) -> list[str]:
    """A Rego package name per file, from its name: intercept_<name>, made unique."""
    names: list[str] = []
    for path in files:
        base = f"intercept_{_slug(path.stem, 'policy')}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


# --- the conditions' meaning, for choosing test calls (the Rego is what decides) -------------


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if _is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


_NUMBER_TEXT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_PRINTED_AS: dict[str, Callable[[str], bool]] = {
    "number": lambda text: _NUMBER_TEXT.fullmatch(text) is not None,
    "boolean": lambda text: text in ("true", "false"),
    "null": lambda text: text == "<nil>",
    "array": lambda text: text.startswith("["),
    "object": lambda text: text.startswith("map["),
}


def _equal(a: Any, b: Any) -> bool:
    """JSON equality, as Rego's (True is not 1, 1 is 1.0)."""
    if _json_type(a) != _json_type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _same(a: Any, b: Any) -> bool:
    return _equal(a, b)


def _printed_alike(text: Any, other: Any) -> bool:
    printed = _PRINTED_AS.get(_json_type(other))
    return isinstance(text, str) and printed is not None and printed(text)


def _differ(a: Any, b: Any) -> bool:
    if _json_type(a) == _json_type(b):
        return _json_type(a) not in ("array", "object") and not _equal(a, b)
    return not _printed_alike(a, b) and not _printed_alike(b, a)


_MISSING = object()


def _lookup(args: Any, path: Path_) -> Any:
    node = args
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def holds(condition: ArgCondition, args: dict[str, Any]) -> bool:
    """Whether `condition` holds for `args`, as the generated Rego says it (RE2 is
    approximated by Python's re: only for choosing test calls, which OPA then checks)."""
    value = _lookup(args, condition.path)
    want = condition.value
    if condition.op == "exists":
        return (value is not _MISSING and value is not None) is bool(want)
    if value is _MISSING:
        return False
    if condition.op == "eq":
        return _same(value, want)
    if condition.op == "neq":
        return _differ(value, want)
    if condition.op == "in":
        return any(_same(value, option) for option in want)
    if condition.op == "not_in":
        return all(_differ(value, option) for option in want)
    if condition.op in NUMERIC_OPS:
        if not _is_number(value):
            return False
        compare = {
            "lt": value < want,
            "lte": value <= want,
            "gt": value > want,
            "gte": value >= want,
        }
        return bool(compare[condition.op])
    if condition.op == "regex":
        # Only the example made up for the pattern counts as matching here (Python's
        # backtracking engine is no judge of RE2, and not safe on any pattern); OPA
        # checks that example when the generated tests are run.
        return isinstance(value, str) and value == regex_example(want)
    if isinstance(value, str):  # contains
        return isinstance(want, str) and want in value
    return isinstance(value, list) and any(_same(item, want) for item in value)


class _NoExample(Exception):
    pass


class _RegexExample:
    """A string a simple regular expression matches (a subset of RE2 and Python's syntax
    where both agree); _NoExample for anything else."""

    CLASSES = {"d": "0", "w": "a", "s": " ", "D": "a", "W": "-", "S": "a"}

    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.i = 0

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def take(self) -> str:
        char = self.peek()
        if not char:
            raise _NoExample
        self.i += 1
        return char

    def example(self) -> str:
        out = self.alternation()
        if self.i != len(self.text):
            raise _NoExample
        return out

    def alternation(self) -> str:
        first = self.sequence()
        while self.peek() == "|":
            self.take()
            self.sequence()
        return first

    def sequence(self) -> str:
        out = ""
        while self.peek() not in ("", "|", ")"):
            atom = self.atom()
            out += atom * self.repeat()
        return out

    def repeat(self) -> int:
        char = self.peek()
        times = 1
        if char in ("*", "?"):
            self.take()
            times = 0
        elif char == "+":
            self.take()
        elif char == "{":
            found = re.match(r"\{([0-9]{1,3})(,[0-9]{0,3})?\}", self.text[self.i :])
            if found is None:
                raise _NoExample
            self.i += len(found[0])
            times = int(found[1])
        else:
            return 1
        if self.peek() in ("*", "+", "{"):
            raise _NoExample
        if self.peek() == "?":
            self.take()
        return times

    def atom(self) -> str:
        char = self.take()
        if char in ("^", "$"):
            return ""
        if char == ".":
            return "a"
        if char == "(":
            if self.peek() == "?":
                found = re.match(r"\?(:|P<[A-Za-z_][A-Za-z0-9_]*>)", self.text[self.i :])
                if found is None:
                    raise _NoExample
                self.i += len(found[0])
            inner = self.alternation()
            if self.take() != ")":
                raise _NoExample
            return inner
        if char == "[":
            return self.char_class()
        if char == "\\":
            return self.escape(self.take())
        if char in "*+?{)":
            raise _NoExample
        return char

    def escape(self, char: str) -> str:
        if char in self.CLASSES:
            return self.CLASSES[char]
        if char == "n":
            return "\n"
        if char == "t":
            return "\t"
        if not char.isalnum():
            return char
        raise _NoExample

    def char_class(self) -> str:
        negated = self.peek() == "^"
        if negated:
            self.take()
        members: list[tuple[str, str]] = []
        first = True
        while True:
            char = self.take()
            if char == "]" and not first:
                break
            first = False
            if char == "[":
                raise _NoExample
            if char == "\\":
                escaped = self.take()
                if escaped in self.CLASSES:
                    if escaped.isupper():
                        raise _NoExample
                    members.append((self.CLASSES[escaped], self.CLASSES[escaped]))
                    continue
                char = self.escape(escaped)
            if self.peek() == "-" and self.text[self.i + 1 : self.i + 2] not in ("]", ""):
                self.take()
                end = self.take()
                if end == "\\":
                    end = self.escape(self.take())
                members.append((char, end))
            else:
                members.append((char, char))
        if not negated:
            return members[0][0] if members else ""
        for candidate in "a0-_ Z":
            if not any(low <= candidate <= high for low, high in members):
                return candidate
        raise _NoExample


@functools.lru_cache(maxsize=256)
def regex_example(pattern: str) -> str | None:
    """A string `pattern` matches, when one is easily had; else None."""
    try:
        example = _RegexExample(pattern).example()
    except (_NoExample, RecursionError):
        return None
    return example if len(example) <= MAX_EXAMPLE else None


def _candidates(conditions: list[ArgCondition]) -> Iterator[Any]:
    for condition in conditions:
        want = condition.value
        if condition.op in ("eq", "contains"):
            yield want
            if condition.op == "contains":
                yield [want]
        elif condition.op == "in":
            yield from want
        elif condition.op == "regex":
            example = regex_example(want)
            if example is not None:
                yield example
        elif condition.op in NUMERIC_OPS:
            yield from (want, want + 1, want - 1, want + 0.5, want - 0.5)
    bounds = [c.value for c in conditions if c.op in NUMERIC_OPS]
    for low in bounds:
        for high in bounds:
            yield (low + high) / 2
    yield from ("intercept-example", 0, 1, -1, 12345.5, True, False, ["intercept-example"])


def _set(args: dict[str, Any], path: Path_, value: Any) -> None:
    node = args
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _drop(args: dict[str, Any], path: Path_) -> None:
    node: Any = args
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def witness(conditions: list[ArgCondition], counted: Sequence[Path_] = ()) -> dict[str, Any] | None:
    """Arguments every condition holds for (and each counted path a number >= 0), when
    easily found; else None."""
    by_path: dict[Path_, list[ArgCondition]] = {}
    for condition in conditions:
        by_path.setdefault(condition.path, []).append(condition)
    for path in counted:
        by_path.setdefault(path, [])
    args: dict[str, Any] = {}
    for path in sorted(by_path, key=len):
        group = by_path[path]
        parents = any(other[: len(path)] == path and other != path for other in by_path)
        if parents:
            if not all(c.op == "exists" and c.value is True for c in group):
                return None
            continue
        if any(c.op == "exists" and c.value is False for c in group):
            if path in counted or len(group) > 1:
                return None
            continue
        needs_cost = path in counted
        for candidate in _candidates(group):
            if needs_cost and not (_is_number(candidate) and candidate >= 0):
                continue
            trial = json.loads(json.dumps(args))
            if _lookup(trial, path[:-1]) is not _MISSING and not isinstance(
                _lookup(trial, path[:-1]), dict
            ):
                return None
            _set(trial, path, candidate)
            if all(holds(c, trial) for c in group):
                args = trial
                break
        else:
            return None
    if all(holds(c, args) for c in conditions):
        return args
    return None


_REMOVE = object()  # a change that removes the argument
Change = tuple[Path_, Any]  # an argument path and its new value (or _REMOVE)


def apply(base: dict[str, Any], change: Change) -> dict[str, Any]:
    args: dict[str, Any] = json.loads(json.dumps(base))
    path, value = change
    if value is _REMOVE:
        _drop(args, path)
    else:
        _set(args, path, value)
    return args


def violations(
    base: dict[str, Any], condition: ArgCondition, *, typed: bool = True
) -> list[Change]:
    """Changes to `base` after which `condition` fails: its argument removed (or, for
    `exists: false`, given) and, when `typed`, its argument of another type (for the
    operators that look at the value)."""
    out: list[Change] = []
    if condition.op == "exists" and condition.value is False:
        change: Change = (condition.path, "intercept-example")
        return [change] if not holds(condition, apply(base, change)) else []
    if _lookup(base, condition.path) is not _MISSING:
        out.append((condition.path, _REMOVE))
    elif not holds(condition, base):
        out.append((condition.path, _REMOVE))
    if not typed or condition.op == "exists" or _lookup(base, condition.path) is _MISSING:
        return out
    others: list[Any] = ["intercept-other", 0, False, None, ["intercept-other"], {}]
    if condition.op == "contains":  # a string and a list without it: both ways of looking
        others = ["intercept-other", ["intercept-other"]]
    for other in others:
        if not holds(condition, apply(base, (condition.path, other))):
            out.append((condition.path, other))
            if condition.op != "contains":
                break
    return out


# --- rendering: the YAML data ----------------------------------------------------------------


def _comment(text: str, prefix: str = "# ") -> list[str]:
    """`text` as comment lines: printable ASCII only (anything else \\u-escaped)."""
    safe = "".join(
        c if 0x20 <= ord(c) < 0x7F else json.dumps(c, ensure_ascii=True)[1:-1] for c in text
    )
    width = max(96 - len(prefix), 40)
    wrapped = textwrap.wrap(safe, width, subsequent_indent="  ", break_on_hyphens=False)
    return [(prefix + line).rstrip() for line in wrapped or [""]]


def _findings_comment(findings: Sequence[Finding]) -> list[str]:
    lines: list[str] = []
    for omitted, title in ((True, "Not converted"), (False, "Notes")):
        chosen = [f for f in findings if f.omitted == omitted]
        if chosen:
            lines += ["#", f"# {title} (the import printed these too):"]
            lines += [line for f in chosen for line in _comment(f.text(), "#   ")]
    return lines


def render_data(converted: Converted) -> str:
    name = Path(converted.display).name
    lines = [
        "# Generated by `mcp-policy import intercept` from the Intercept policy",
        *_comment(
            _show(name)
            + (f" ({_show(converted.description[:200])})" if converted.description else "")
            + ".",
            "#   ",
        ),
        *_comment(
            f"Tools catalogued for server {_show(converted.server)}"
            + (" (any server)." if converted.server == "*" else "."),
        ),
        "# Argument conditions and what else the YAML cannot say:",
        f"#   rego/mcp/rules/{converted.package}/{converted.package}.rego",
        "# Regenerate it rather than edit it.",
        *_findings_comment(converted.findings),
    ]
    doc: dict[str, Any] = {"mcp_policy": {}}
    if converted.catalog:
        doc["mcp_policy"]["catalog"] = {converted.server: converted.catalog}
        doc["mcp_policy"]["rules"] = converted.rules
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=False, width=100)
    return "\n".join(lines) + "\n" + body


def render_default(outputs: Sequence[Converted], default: str) -> str:
    lines = [
        "# Generated by `mcp-policy import intercept`: the rule for every tool not in the",
        "# catalog, on any server: the posture of the Intercept policies imported with it",
    ]
    lines += [
        line
        for c in outputs
        for line in _comment(f"{_show(Path(c.display).name)}: default {c.default}", "#   ")
    ]
    lines.append("# (deny when any of them says deny).")
    return "\n".join(lines) + "\n" + yaml.safe_dump({"mcp_policy": {"default": default}})


# --- rendering: Rego --------------------------------------------------------------------------


def _term(value: Any, indent: int) -> str:
    """`value` as a Rego term (JSON syntax, ASCII): on one line when short, else laid out
    the way `opa fmt` lays out a term written over several lines."""
    flat = json.dumps(value, ensure_ascii=True, separators=(", ", ": "))
    if not isinstance(value, list | dict) or not value or len(flat) + 4 * indent <= 96:
        return flat
    if len(value) == 1:  # both OPA's and Regal's formatters keep a lone element in place
        if isinstance(value, list):
            return f"[{_term(value[0], indent)}]"
        [(key, item)] = value.items()
        return f"{{{json.dumps(key, ensure_ascii=True)}: {_term(item, indent)}}}"
    inner = "\t" * (indent + 1)
    if isinstance(value, list):
        items = [f"{inner}{_term(item, indent + 1)}," for item in value]
        return "[\n" + "\n".join(items) + "\n" + "\t" * indent + "]"
    items = [
        f"{inner}{json.dumps(k, ensure_ascii=True)}: {_term(v, indent + 1)},"
        for k, v in value.items()
    ]
    return "{\n" + "\n".join(items) + "\n" + "\t" * indent + "}"


def _exempt_long(lines: Iterable[str]) -> list[str]:
    """Lines too long for Regal's line-length rule get its exemption above them, and a file
    too long for its file-length rule gets that one on its package line."""
    out = _exempt_long_lines(lines)
    if len(out) > MAX_FILE_LINES:
        at = next(i for i, line in enumerate(out) if line.startswith("package "))
        out[at] += " # regal ignore:file-length"
    return out


def _exempt_long_lines(lines: Iterable[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        for part in line.split("\n"):
            if len(part.expandtabs(4)) > LINE_BUDGET and not part.lstrip().startswith("#"):
                indent = part[: len(part) - len(part.lstrip("\t"))]
                before = out[-1].strip() if out else ""
                if indent and before and not before.endswith(("{", "[", "(", ",")):
                    out.append("")  # opa fmt sets a comment after a statement apart
                out.append(f"{indent}# regal ignore:line-length")
            out.append(part)
    return out


_HELPERS: dict[str, str] = {
    "value": """
# The argument at `path` (keys, each descending into an object); undefined when it is
# not there (a null argument is there).
_value(path) := parent[key] if {
	parent := object.get(_args, array.slice(path, 0, count(path) - 1), null)
	is_object(parent)
	key := path[count(path) - 1]
}""",
    "compare": """
# Values of one JSON type are equal when they are (numbers by value).
_same(a, b) if {
	type_name(a) == type_name(b)
	a == b
}""",
    "differ": """
# Values differ when they are of one type (not a list or an object) and not equal, or of
# types whose printed text cannot be alike. Intercept compares values of different types
# by their printed text ("5" and 5 are equal there): where that text may be alike, they
# neither equal nor differ here, and a condition that compares them fails either way.
_differ(a, b) if {
	type_name(a) == type_name(b)
	type_name(a) in {"string", "number", "boolean", "null"}
	a != b
}

_differ(a, b) if {
	type_name(a) != type_name(b)
	not _printed_alike(a, b)
	not _printed_alike(b, a)
}

# How Go prints a number (what Intercept compares a string with).
_number_text := `^[-+]?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][-+]?[0-9]+)?$`

_printed_alike(text, other) if {
	is_string(text)
	_printed_as(text, type_name(other))
}

_printed_as(text, "number") if regex.match(_number_text, text)

_printed_as(text, "boolean") if text in {"true", "false"}

_printed_as("<nil>", "null")

_printed_as(text, "array") if startswith(text, "[")

_printed_as(text, "object") if startswith(text, "map[")""",
    "eq": """
_eq(path, want) if _same(_value(path), want)""",
    "neq": """
_neq(path, want) if _differ(_value(path), want)""",
    "in": """
_in(path, options) if {
	value := _value(path)
	some option in options
	_same(value, option)
}""",
    "not_in": """
_not_in(path, options) if {
	value := _value(path)
	every option in options {
		_differ(value, option)
	}
}""",
    "lt": """
_lt(path, bound) if {
	value := _value(path)
	is_number(value)
	value < bound
}""",
    "lte": """
_lte(path, bound) if {
	value := _value(path)
	is_number(value)
	value <= bound
}""",
    "gt": """
_gt(path, bound) if {
	value := _value(path)
	is_number(value)
	value > bound
}""",
    "gte": """
_gte(path, bound) if {
	value := _value(path)
	is_number(value)
	value >= bound
}""",
    "regex": """
# RE2, as Intercept's Go matches (unanchored).
_regex(path, pattern) if {
	value := _value(path)
	is_string(value)
	regex.match(pattern, value)
}""",
    "contains": """
# A substring of a string, or an element of a list.
_contains(path, part) if {
	value := _value(path)
	is_string(value)
	is_string(part)
	contains(value, part)
}

_contains(path, part) if {
	value := _value(path)
	is_array(value)
	some item in value
	_same(item, part)
}""",
    "exists": """
_exists(path) if _value(path) != null""",
    "cost": """
# The value a weighted limit counts: a number >= 0, else undefined (the call is denied).
_cost(path) := value if {
	value := _value(path)
	is_number(value)
	value >= 0
}""",
}


def _rule_length_exemption(body: Sequence[str]) -> list[str]:
    """Regal's rule-length exemption for a rule whose body is longer than it allows."""
    lines = sum(part.count("\n") + 1 for part in body)
    return ["# regal ignore:rule-length"] if lines > MAX_RULE_LINES else []


def _helpers_used(converted: Converted) -> list[str]:
    ops = {c.op for check in converted.checks for c in check.conditions}
    used: set[str] = set(ops)
    if ops or any(limit.limit.cost for limit in converted.limits):
        used.add("value")
    if ops & {"eq", "in", "contains"}:
        used.add("compare")
    if ops & {"neq", "not_in"}:
        used.add("differ")
    if any(limit.limit.cost for limit in converted.limits):
        used.add("cost")
    return [name for name in _HELPERS if name in used]


def _condition_expr(condition: ArgCondition, indent: int) -> str:
    path = _term(list(condition.path), indent)
    if condition.op == "exists":
        return f"_exists({path})" if condition.value else f"not _exists({path})"
    return f"_{condition.op}({path}, {_term(condition.value, indent)})"


def _selector(converted: Converted, tool: str | None) -> str:
    return "_on_server" if tool is None else f"_call({_term(tool, 1)})"


def render_rego(converted: Converted) -> str:
    package = converted.package
    name = Path(converted.display).name
    lines = [
        "# METADATA",
        f"# title: Imported Intercept policy ({package})",
        "# description: |",
        "#   Generated by `mcp-policy import intercept` from the Intercept policy",
        *_comment(f"{_show(name)}, for calls to server {_show(converted.server)}", "#   "),
        '#   ("*": any server): the rules the YAML rules of',
        f"#   policies/{package}.yaml cannot hold. Regenerate it rather than edit it.",
        f"package mcp.rules.{package}",
        "",
    ]
    if converted.findings:
        lines += [*_findings_comment(converted.findings)[1:], ""]
    if converted.server == "*":
        lines.append("_on_server if is_string(input.tool.server)")
    else:
        lines.append(f"_on_server if input.tool.server == {_term(converted.server, 0)}")
    tools = [c.tool for c in converted.checks] + [d.tool for d in converted.denials]
    if any(tool is not None for tool in tools + [x.tool for x in converted.limits]):
        lines += ["", "_call(name) if {", "\t_on_server", "\tinput.tool.name == name", "}"]
    helpers = _helpers_used(converted)
    if "value" in helpers:
        lines += [
            "",
            "default _args := {}",
            "",
            "_args := input.tool.arguments if is_object(input.tool.arguments)",
        ]
    for helper in helpers:
        lines += _HELPERS[helper].split("\n")
    for check in converted.checks:
        if check.blocked:
            continue
        lines += ["", *_comment(f"{check.where}: {check.rule_id}")]
        body = [f"\t{_condition_expr(c, 1)}" for c in check.conditions]
        lines += _rule_length_exemption(body)
        lines += [f"_passes_{check.n} if {{", *body, "}"]
    entries = {c.n: _deny_entry(c.rule_id, c.reason, c.blocked) for c in converted.checks}
    entries |= {d.n: _denial_entry(d) for d in converted.denials}
    entries |= {d.n: _cost_entry(d) for d in converted.limits if d.limit.cost}
    if entries:
        lines += ["", "_denials := " + _table(entries)]
        lines += _deny_rules(converted)
    if converted.limits:
        limits = {x.n: _limit_entry(x) for x in converted.limits}
        lines += ["", "_limits := " + _table(limits)]
        lines += _limit_rules(converted)
    if converted.patterns:
        lines += [
            "",
            "# The regular expressions of the conditions, by where they are in the policy.",
            "_patterns := " + _term(converted.patterns, 0),
            "",
            "# METADATA",
            "# title: Problems found at load",
            "# description: A regular expression OPA cannot compile (Intercept refuses it too).",
            "# scope: document",
            "load_errors contains "
            'sprintf("%s: invalid regular expression %q", [where, pattern]) if {',
            "\tsome where, pattern in _patterns",
            "\tnot regex.is_valid(pattern)",
            "}",
        ]
    return "\n".join(_exempt_long(lines)) + "\n"


def _table(entries: dict[int, dict[str, Any]]) -> str:
    """An object keyed by number (the rules refer to their entries by number)."""
    if len(entries) == 1:
        [(n, entry)] = entries.items()
        return f"{{{n}: {_term(entry, 0)}}}"
    rows = [f"\t{n}: {_term(entry, 1)}," for n, entry in sorted(entries.items())]
    return "{\n" + "\n".join(rows) + "\n}"


def _deny_entry(rule_id: str, reason: str, blocked: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"rule": rule_id, "reason": reason}
    if blocked:
        entry["whole_tool"] = True
    return entry


def _denial_entry(denial: Denial) -> dict[str, Any]:
    return {"rule": denial.rule_id, "reason": denial.reason, "whole_tool": True}


def _cost_entry(limit: RegoLimit) -> dict[str, Any]:
    counted = ".".join(limit.limit.cost or ())
    return {
        "rule": f"{limit.rule_id}.cost_invalid",
        "reason": f"argument {_show_text(counted)} must be a number >= 0: a limit counts it",
    }


def _limit_entry(limit: RegoLimit) -> dict[str, Any]:
    return {
        "rule": limit.rule_id,
        "reason": limit.reason,
        "max": limit.limit.max,
        "window_seconds": limit.limit.window,
        "scope": "global",
    }


def _deny_rules(converted: Converted) -> list[str]:
    lines = [
        "",
        "# METADATA",
        "# title: Deny contributions",
        "# description: |",
        "#   Per Intercept rule with conditions, when a call fails one; per deny the YAML",
        "#   cannot hold; per weighted limit, when its counted argument is unusable.",
        "# scope: document",
    ]
    first = True
    for check in converted.checks:
        lines += [] if first else [""]
        first = False
        select = _selector(converted, check.tool)
        if check.blocked:
            lines.append(f"deny contains _denials[{check.n}] if {select}")
        else:
            lines += [
                f"deny contains _denials[{check.n}] if {{",
                f"\t{select}",
                f"\tnot _passes_{check.n}",
                "}",
            ]
    for denial in converted.denials:
        lines += [] if first else [""]
        first = False
        select = _selector(converted, denial.tool)
        if denial.reason:
            lines.append(f"deny contains _denials[{denial.n}] if {select}")
        else:
            lines += [
                f'deny contains object.union(_denials[{denial.n}], {{"reason": reason}}) if {{',
                f"\t{select}",
                '\treason := sprintf("tool %q is hidden by the policy", [input.tool.name])',
                "}",
            ]
    for limit in converted.limits:
        if not limit.limit.cost:
            continue
        lines += [] if first else [""]
        first = False
        lines += [
            f"deny contains _denials[{limit.n}] if {{",
            f"\t{_selector(converted, limit.tool)}",
            f"\tnot _cost({_term(list(limit.limit.cost), 1)})",
            "}",
        ]
    return lines


def _limit_rules(converted: Converted) -> list[str]:
    lines = [
        "",
        "# METADATA",
        "# title: Rate-limit contributions",
        "# description: The limits the YAML rules cannot hold (scope global, as Intercept's).",
        "# scope: document",
    ]
    for i, limit in enumerate(converted.limits):
        lines += [] if i == 0 else [""]
        select = _selector(converted, limit.tool)
        if limit.limit.cost is None:
            lines.append(f"rate_limit contains _limits[{limit.n}] if {select}")
            continue
        lines += [
            f'rate_limit contains object.union(_limits[{limit.n}], {{"cost": cost}}) if {{',
            f"\t{select}",
            f"\tcost := _cost({_term(list(limit.limit.cost), 1)})",
            "}",
        ]
    return lines


# --- rendering: the generated tests ------------------------------------------------------------


TEST_SERVER = "intercept-test-server"  # the server of the test calls when any server will do


@dataclass
class GeneratedTest:
    """One generated test: a call, and what must hold of the package or the decision."""

    name: str
    tool: str
    args: Any  # the call's arguments (an object, but for the test of one that is not)
    body: list[str]  # the lines after `... with input as _input(tool, args)`
    of: str  # the document the first line evaluates: deny, rate_limit or decision
    guess: bool = False  # the call holds a string made up to match a regular expression
    base: int | None = None  # written as a change to example `_example_<base>`, when given
    change: Change | None = None


def _sample_tool(converted: Converted, unlisted: bool = False) -> str:
    """A tool name for calls where any tool will do; `unlisted`: one the policy names nowhere."""
    if not unlisted:
        for name in sorted(converted.catalog):
            if name not in converted.denied_tools:
                return name
    taken = set(converted.catalog)
    name, k = "intercept_unlisted_tool", 2
    while name in taken:
        name, k = f"intercept_unlisted_tool_{k}", k + 1
    return name


def _ids_in(of: str, rule_id: str, present: bool) -> list[str]:
    test = f"{_term(rule_id, 1)} in {{entry.rule | some entry in {of}}}"
    return [f"\t{test}" if present else f"\tnot {test}"]


def _check_cases(converted: Converted, examples: dict[int, Any]) -> Iterator[GeneratedTest]:
    """Per rule with conditions: a call that meets them (`examples`, by rule) and calls
    that fail each, at the edges of what it takes and without (or, once per operator, with
    another type of) its argument."""
    typed: set[str] = set()
    for check in converted.checks:
        tool = check.tool if check.tool is not None else _sample_tool(converted)
        n = check.n
        if check.blocked:
            entry = _deny_entry(check.rule_id, check.reason, True)
            yield GeneratedTest(
                f"test_{n}_denies_every_call", tool, {}, [f"\t{_term(entry, 1)} in denies"], "deny"
            )
            continue
        example = witness(check.conditions)
        guess = any(c.op == "regex" for c in check.conditions)
        base = None
        if example is None:
            converted.findings.append(
                Finding(
                    converted.display,
                    1,
                    check.where,
                    "no call meeting every condition could be made up (a regular expression "
                    "beyond the simple ones, or conditions that contradict each other): the "
                    "generated tests show only calls this rule denies",
                    omitted=False,
                )
            )
        else:
            examples[n] = example
            base = n
            yield GeneratedTest(
                f"test_{n}_passes_when_conditions_hold",
                tool,
                example,
                _ids_in("denies", check.rule_id, False),
                "deny",
                guess=guess,
                base=n,
            )
            for i, condition in enumerate(check.conditions, 1):
                for k, (change, passes) in enumerate(_edges(example, condition), 1):
                    args = apply(example, change)
                    if passes and not all(holds(c, args) for c in check.conditions):
                        continue
                    verb = "passes" if passes else "denies"
                    yield GeneratedTest(
                        f"test_{n}_{verb}_at_edge_{k}_of_condition_{i}",
                        tool,
                        args,
                        _ids_in("denies", check.rule_id, not passes),
                        "deny",
                        guess=guess,
                        base=n,
                        change=change,
                    )
        denied = [f"\t{_term(_deny_entry(check.rule_id, check.reason, False), 1)} in denies"]
        for i, condition in enumerate(check.conditions, 1):
            first = condition.op not in typed
            changes = violations(example or {}, condition, typed=first)
            if len(changes) > 1:
                typed.add(condition.op)
            for k, change in enumerate(changes, 1):
                yield GeneratedTest(
                    f"test_{n}_denies_when_condition_{i}_fails_{k}",
                    tool,
                    apply(example or {}, change),
                    denied,
                    "deny",
                    guess=guess and example is not None,
                    base=base,
                    change=change,
                )


def _edges(example: dict[str, Any], condition: ArgCondition) -> Iterator[tuple[Change, bool]]:
    """Changes to `example` that set `condition`'s argument at the edges of what it takes
    (the first and last listed value, a bound and just past it, a list holding the part),
    and whether the condition holds there: the tests fail when the policy changes them."""
    want = condition.value
    values: list[tuple[Any, bool]] = []
    if condition.op in ("in", "not_in"):
        ends = want[:1] + want[-1:] if len(want) > 1 and want[0] != want[-1] else want[:1]
        values = [(option, condition.op == "in") for option in ends]
    elif condition.op in ("eq", "neq"):
        values = [(want, condition.op == "eq")]
    elif condition.op in ("lte", "gte"):
        past = want + 1 if condition.op == "lte" else want - 1
        values = [(want, True), (past, False)]
    elif condition.op in ("lt", "gt"):
        values = [(want, False)]
    elif condition.op == "contains":
        values = [([want], True)]
    for value, passes in values:
        change: Change = (condition.path, value)
        if holds(condition, apply(example, change)) == passes:
            yield change, passes


def _whole_cases(converted: Converted) -> Iterator[GeneratedTest]:
    """Arguments that are not an object fail every condition (but exists: false)."""
    for check in converted.checks:
        if check.blocked or all(c.op == "exists" and not c.value for c in check.conditions):
            continue
        tool = check.tool if check.tool is not None else _sample_tool(converted)
        yield GeneratedTest(
            f"test_{check.n}_denies_when_arguments_not_an_object",
            tool,
            ["intercept-example"],
            _ids_in("denies", check.rule_id, True),
            "deny",
        )
        return


def _denial_cases(converted: Converted) -> Iterator[GeneratedTest]:
    for denial in converted.denials:
        tool = denial.tool if denial.tool is not None else _sample_tool(converted)
        entry = _denial_entry(denial)
        if not denial.reason:
            entry["reason"] = f"tool {json.dumps(tool)} is hidden by the policy"
        yield GeneratedTest(
            f"test_{denial.n}_denies_every_call",
            tool,
            {},
            [f"\t{_term(entry, 1)} in denies"],
            "deny",
        )


def _limit_cases(converted: Converted) -> Iterator[GeneratedTest]:
    for limit in converted.limits:
        tool = limit.tool if limit.tool is not None else _sample_tool(converted)
        entry = _limit_entry(limit)
        cost = limit.limit.cost
        args: dict[str, Any] = {}
        if cost is not None:
            _set(args, cost, 2)
            entry["cost"] = 2
        yield GeneratedTest(
            f"test_{limit.n}_limits", tool, args, [f"\t{_term(entry, 1)} in limits"], "rate_limit"
        )
        if cost is None:
            continue
        invalid = _cost_entry(limit)["rule"]
        for k, value in enumerate((_MISSING, -1, "2"), 1):
            args = {}
            if value is not _MISSING:
                _set(args, cost, value)
            yield GeneratedTest(
                f"test_{limit.n}_denies_when_counted_argument_unusable_{k}",
                tool,
                args,
                _ids_in("denies", invalid, True),
                "deny",
            )


def _set_term(items: Sequence[Any], indent: int) -> str:
    """A Rego set of `items`, laid out as `opa fmt` lays it out."""
    flat = "{" + ", ".join(_term(item, indent) for item in items) + "}"
    if len(flat) + 4 * indent <= 96 or not items:
        return flat if items else "set()"
    if len(items) == 1:
        return "{" + _term(items[0], indent) + "}"
    inner = "\t" * (indent + 1)
    rows = [f"{inner}{_term(item, indent + 1)}," for item in items]
    return "{\n" + "\n".join(rows) + "\n" + "\t" * indent + "}"


def _decision_cases(converted: Converted, run_default: str | None) -> Iterator[GeneratedTest]:
    everything_denied = any(d.tool is None for d in converted.denials) or any(
        c.blocked and c.tool is None for c in converted.checks
    )
    tools = [(name, True) for name in sorted(converted.catalog)]
    tools.append((_sample_tool(converted, unlisted=True), False))
    for k, (tool, listed) in enumerate(tools, 1):
        name = f"test_decision_{k}_{_slug(tool, 'tool')}"
        own: Any = converted.rules.get(tool) if listed else run_default
        body: list[str] = []
        if everything_denied or tool in converted.blocked_tools:
            body = ['\tdecision.action == "deny"']
        elif tool in converted.denied_tools:
            body = [
                '\tdecision.action == "deny"',
                f"\tdecision.rule == {_term(f'catalog.rule.{tool}', 1)}",
                f"\tdecision.reason == {_term(own['reason'], 1)}",
            ]
        elif not listed and run_default == "deny":
            body = ['\tdecision.action == "deny"', '\tdecision.rule == "catalog.default"']
        elif not listed and run_default != "allow":
            continue  # the repository's own default rule is neither: not this policy's
        if body:
            yield GeneratedTest(name, tool, {}, body, "decision")
            continue
        checks = [c for c in converted.checks if c.tool in (tool, None)]
        limits = [x for x in converted.limits if x.tool in (tool, None)]
        expected = [_limit_view(x.rule_id, x.limit.max, x.limit.window) for x in limits]
        counted = [x.limit.cost for x in limits if x.limit.cost is not None]
        if isinstance(own, dict) and own["action"] == "rate_limit":
            spec = own["rate_limit"]
            expected.append(_limit_view(f"catalog.rule.{tool}", spec["max"], spec["window"]))
            if "increment_from" in spec:
                counted.append((spec["increment_from"],))
        example = witness([c for check in checks for c in check.conditions], counted)
        if example is None:
            continue
        if expected:
            views = sorted(expected, key=lambda view: str(view["rule"]))
            body = [
                '\tdecision.action == "rate_limit"',
                "\t{_limit(limit) | some limit in decision.rate_limits} == " + _set_term(views, 1),
            ]
        else:
            rule = f"catalog.rule.{tool}" if listed else "catalog.default"
            body = ['\tdecision.action == "allow"', f"\tdecision.rule == {_term(rule, 1)}"]
        guess = any(c.op == "regex" for check in checks for c in check.conditions)
        yield GeneratedTest(name, tool, example, body, "decision", guess=guess)


def _limit_view(rule: str, most: int, window: int) -> dict[str, Any]:
    return {"rule": rule, "max": most, "window_seconds": window, "scope": "global"}


@dataclass
class GeneratedTests:
    cases: list[GeneratedTest]
    examples: dict[int, Any]  # by rule: arguments that meet its conditions


def generated_tests(converted: Converted, run_default: str | None) -> GeneratedTests:
    examples: dict[int, Any] = {}
    cases = [
        *_check_cases(converted, examples),
        *_whole_cases(converted),
        *_denial_cases(converted),
        *_limit_cases(converted),
        *_decision_cases(converted, run_default),
    ]
    return GeneratedTests(cases, examples)


def _pointer(path: Sequence[str]) -> str:
    return "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in path)


def _patch(example: Any, change: Change) -> dict[str, Any]:
    """The JSON patch operation that makes `change` to `example`."""
    path, value = change
    if value is _REMOVE:
        return {"op": "remove", "path": _pointer(path)}
    node = example
    for i, key in enumerate(path[:-1]):
        if key not in node:  # add the missing objects along with the value
            nested = value
            for inner in reversed(path[i + 1 :]):
                nested = {inner: nested}
            return {"op": "add", "path": _pointer(path[: i + 1]), "value": nested}
        node = node[key]
    return {"op": "add", "path": _pointer(path), "value": value}


def _arguments(case: GeneratedTest, examples: dict[int, Any]) -> str:
    if case.base is None:
        return _term(case.args, 1)
    if case.change is None:
        return f"_example_{case.base}"
    operation = _patch(examples[case.base], case.change)
    return f"json.patch(_example_{case.base}, [{_term(operation, 1)}])"


_SAME_CASES = [
    "_same(1, 1.0)",
    '_same(["a", {"b": null}], ["a", {"b": null}])',
    'not _same(5, "5")',
    'not _same(true, "true")',
    "not _same([true], [1])",
]

_DIFFER_CASES = [
    '_differ("a", "b")',
    "_differ(1, 2)",
    '_differ(5, "x")',
    '_differ(true, "yes")',
    '_differ(null, "null")',
    '_differ(["a"], "x")',
    '_differ({"a": 1}, "x")',
    "_differ(5, true)",
    '_differ(["a"], {"a": 1})',
    'not _differ("a", "a")',
    'not _differ(5, "5")',
    'not _differ("1e3", 1000)',
    'not _differ(true, "true")',
    'not _differ(null, "<nil>")',
    'not _differ([1], "[1]")',
    'not _differ({"a": 1}, "map[a:1]")',
    "not _differ([1], [2])",
]


def render_tests(converted: Converted, tests: GeneratedTests) -> str:
    package = converted.package
    server = TEST_SERVER if converted.server == "*" else converted.server
    cases = tests.cases
    uses_package = (
        bool(converted.patterns)
        or bool({"compare", "differ"} & set(_helpers_used(converted)))
        or any(case.of != "decision" for case in cases)
    )
    lines = [
        "# Generated by `mcp-policy import intercept` with rego/mcp/rules/"
        f"{package}/{package}.rego",
        f"# and policies/{package}.yaml: what the Intercept policy says, as tests.",
        f"package mcp.rules.{package}_test",
        "",
        *([f"import data.mcp.rules.{package}", ""] if uses_package else []),
        "_input(name, args) := {",
        f'\t"tool": {{"server": {_term(server, 1)}, "name": name, "arguments": args}},',
        '\t"principal": {"agent_id": "agent-1", "session_id": "session-1", "user_id": "user-1"},',
        "}",
    ]
    if any("_limit(limit)" in line for case in cases for line in case.body):
        lines += [
            "",
            '_limit(limit) := object.filter(limit, ["rule", "max", "window_seconds", "scope"])',
        ]
    used = sorted({case.base for case in cases if case.base is not None})
    for n in used:
        lines += ["", f"_example_{n} := {_term(tests.examples[n], 0)}"]
    documents = {
        "deny": ("denies", f"{package}.deny"),
        "rate_limit": ("limits", f"{package}.rate_limit"),
        "decision": ("decision", "data.mcp.decision"),
    }
    for case in cases:
        variable, document = documents[case.of]
        arguments = _arguments(case, tests.examples)
        first = []
        if len(arguments) > 24:  # on a line of its own
            first, arguments = [f"\targs := {arguments}"], "args"
        call = f"_input({_term(case.tool, 1)}, {arguments})"
        body = [*first, f"\t{variable} := {document} with input as {call}", *case.body]
        lines += ["", *_rule_length_exemption(body), f"{case.name} if {{", *body, "}"]
    helpers = _helpers_used(converted)
    if "compare" in helpers:
        lines += ["", "test_values_are_equal_only_of_one_type if {"]
        lines += [f"\t{x.replace('_same', f'{package}._same')}" for x in _SAME_CASES]
        lines.append("}")
    if "differ" in helpers:
        lines += ["", "test_values_differ_unless_their_printed_text_may_be_alike if {"]
        lines += [f"\t{x.replace('_differ', f'{package}._differ')}" for x in _DIFFER_CASES]
        lines.append("}")
    if converted.patterns:
        lines += [
            "",
            "test_regular_expressions_compile if {",
            f"\tcount({package}.load_errors) == 0",
            "}",
            "",
            "test_load_errors_name_a_bad_regular_expression if {",
            f'\terrors := {package}.load_errors with {package}._patterns as {{"here": "("}}',
            '\terrors == {"here: invalid regular expression \\"(\\""}',
            "}",
        ]
    return "\n".join(_exempt_long(lines)) + "\n"


# --- checking the output as serve loads it, and running its tests -------------------------------


async def _failing_tests(
    root: Path, outputs: Sequence[Converted], tests: dict[str, str]
) -> dict[str, list[str]]:
    """Per package, the generated tests that do not pass, run in OPA's evaluator in this
    process on the framework and the output (PolicyRejected: the output did not load)."""
    from engine.authoring.offline import OfflinePolicy
    from engine.policy.inprocess import InProcessOpa
    from engine.policy.source import MODULE_PREFIX, PolicyBundle, read_bundle, with_framework

    paths = with_framework([root / "rego", root / "policies"])  # the framework's Rego first
    policy = await OfflinePolicy.load(paths)  # the checks serve makes at a load
    await policy.close()
    base = read_bundle(paths)
    modules = dict(base.modules)
    for package, text in tests.items():
        modules[f"{MODULE_PREFIX}import-check/{package}_test.rego"] = text
    queries = [f"data.mcp.rules.{c.package}_test" for c in outputs]
    opa = InProcessOpa(timeout=60.0)
    await opa.open()
    try:
        await opa.load(PolicyBundle(modules=modules, data=base.data), queries)
        failing: dict[str, list[str]] = {}
        for converted, query in zip(outputs, queries, strict=True):
            result = await opa.query(query)
            passed = {k for k, v in (result or {}).items() if v is True}
            expected = re.findall(r"^(test_\w+) if \{", tests[converted.package], re.MULTILINE)
            failing[converted.package] = [name for name in expected if name not in passed]
        return failing
    finally:
        await opa.close()


# --- the command ------------------------------------------------------------------------------


def _render_all(
    outputs: Sequence[Converted], default: str | None, cases: dict[str, GeneratedTests]
) -> dict[Path, str]:
    """The output files, relative to the output directory (no default rule: None)."""
    files: dict[Path, str] = {}
    if default is not None:
        files[Path("policies", DEFAULT_FILE)] = render_default(outputs, default)
    for converted in outputs:
        rules = Path("rego", "mcp", "rules", converted.package)
        files[Path("policies", f"{converted.package}.yaml")] = render_data(converted)
        files[rules / f"{converted.package}.rego"] = render_rego(converted)
        files[rules / f"{converted.package}_test.rego"] = render_tests(
            converted, cases[converted.package]
        )
    return files


def _stage(root: Path, files: dict[Path, str | bytes]) -> None:
    for relative, content in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, "utf-8")


def _targets(outputs: Sequence[Converted]) -> set[Path]:
    """Every file the import may write, relative to the output directory."""
    paths = {Path("policies", DEFAULT_FILE)}
    for converted in outputs:
        rules = Path("rego", "mcp", "rules", converted.package)
        paths.add(Path("policies", f"{converted.package}.yaml"))
        paths |= {rules / f"{converted.package}{suffix}.rego" for suffix in ("", "_test")}
    return paths


def existing_policy(directory: Path | None, ours: set[Path]) -> dict[Path, str | bytes]:
    """The policy files already in the repository (its rego/ and policies/) that the
    import leaves alone: the output is checked together with them, as serve loads both."""
    from engine.policy.source import DATA_SUFFIXES

    found: dict[Path, str | bytes] = {}
    if directory is None:
        return found
    for part in ("rego", "policies"):
        root = directory / part
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(directory)
            policy_file = path.suffix == ".rego" or path.suffix in DATA_SUFFIXES
            if path.is_file() and policy_file and relative not in ours:
                found[relative] = path.read_bytes()
    return found


def repository_default(existing: dict[Path, str | bytes]) -> tuple[Path, Any] | None:
    """The `default` rule the repository's own data already sets, and its file."""
    for relative, content in existing.items():
        if relative.parent != Path("policies") or relative.suffix == ".rego":
            continue
        try:
            doc = yaml.safe_load(content)  # JSON is YAML too
        except yaml.YAMLError:
            continue  # the load check reports it
        policy = doc.get("mcp_policy") if isinstance(doc, dict) else None
        if isinstance(policy, dict) and "default" in policy:
            return relative, policy["default"]
    return None


async def convert_files(
    files: Sequence[Path], servers: Sequence[str], directory: Path | None = None
) -> tuple[list[Converted], dict[Path, str]]:
    """Read, check and convert `files` (server i for file i), and check the output loads
    (with the policy already in `directory`) and its tests pass; the outputs and the
    files to write."""
    problems: list[str] = []
    outputs: list[Converted] = []
    for path, server, package in zip(files, servers, package_names(files), strict=True):
        try:
            doc, lines = read_policy_file(path)
            policy, findings = check_policy(doc, str(path), lines)
        except ImportFailed as exc:
            problems += exc.lines or [exc.message]
            continue
        converted = _Converter(policy, package, server).convert()
        converted.findings[:0] = findings
        outputs.append(converted)
    if problems:
        raise ImportFailed("the input has errors", problems)
    existing = existing_policy(directory, _targets(outputs))
    theirs = repository_default(existing)
    if theirs is not None:
        default = _repository_posture(outputs, *theirs)
    else:
        default = _imported_posture(outputs)
    for converted in outputs:
        converted.findings = grouped(converted.findings)
    written = default if theirs is None else None  # the repository's own one stays
    cases = {c.package: generated_tests(c, default) for c in outputs}
    rendered = _render_all(outputs, written, cases)
    with tempfile.TemporaryDirectory(prefix="mcp-policy-import.") as staging:
        _stage(Path(staging), {**existing, **rendered})
        tests = {c.package: rendered[_test_path(c)] for c in outputs}
        try:
            failing = await _failing_tests(Path(staging), outputs, tests)
        except PolicyRejected as exc:  # name the repository's files, not the staged copies
            there = str(directory or ".")
            errors = [line.replace(staging, there) for line in exc.errors]
            raise PolicyRejected(exc.message.replace(staging, there), errors) from exc
    if _drop_example_failures(outputs, cases, failing):
        rendered = _render_all(outputs, written, cases)
    return outputs, rendered


def _imported_posture(outputs: Sequence[Converted]) -> str:
    """The default rule the import writes: deny when any policy says deny (it is one rule
    for every server)."""
    default = "deny" if any(c.default == "deny" for c in outputs) else "allow"
    for converted in outputs:
        if default == "allow" and converted.server != "*":
            converted.findings.append(
                Finding(
                    converted.display,
                    1,
                    "default",
                    f"default allow: tools not in the catalog are allowed on every server, not "
                    f"only on {_show(converted.server)} (policies/{DEFAULT_FILE} is one rule)",
                    omitted=False,
                )
            )
        if converted.default == "allow" and default == "deny":
            converted.findings.append(
                Finding(
                    converted.display,
                    1,
                    "default",
                    "default allow: another policy imported with it says deny, and the rule "
                    "for tools not in the catalog is one: they are denied",
                    omitted=True,
                )
            )
    return default


def _repository_posture(outputs: Sequence[Converted], where: Path, rule: Any) -> str | None:
    """The repository's own default rule stays (the import writes none); each policy's
    posture is compared with it. Its action, when it is a plain allow or deny."""
    action = rule.get("action") if isinstance(rule, dict) else rule
    for converted in outputs:
        same = action == converted.default
        converted.findings.append(
            Finding(
                converted.display,
                1,
                "default",
                f"default {converted.default}: the repository's own default rule ({where}) "
                + ("says so too, and stays" if same else f"stays, and says {_show(action)}")
                + f"; policies/{DEFAULT_FILE} is not written",
                omitted=not same,
            )
        )
    return action if action in ("allow", "deny") else None


def _test_path(converted: Converted) -> Path:
    return Path("rego", "mcp", "rules", converted.package, f"{converted.package}_test.rego")


def _drop_example_failures(
    outputs: Sequence[Converted],
    cases: dict[str, GeneratedTests],
    failing: dict[str, list[str]],
) -> bool:
    """Leave out the generated tests whose example call (a guess at what a regular
    expression matches) did not meet the conditions under RE2; any other failing test
    means the conversion is wrong: ImportFailed."""
    broken: list[str] = []
    dropped = False
    for converted in outputs:
        names = set(failing.get(converted.package, []))
        if not names:
            continue
        keep: list[GeneratedTest] = []
        for case in cases[converted.package].cases:
            if case.name not in names:
                keep.append(case)
            elif case.guess:
                dropped = True
                converted.findings.append(
                    Finding(
                        converted.display,
                        1,
                        case.name,
                        "no generated test: the example "
                        "call made up for a regular expression does not match it",
                        omitted=False,
                    )
                )
            else:
                broken.append(f"{converted.package}: {case.name}")
        cases[converted.package].cases = keep
    if broken:
        raise ImportFailed("the generated tests do not pass (a bug in the import)", broken)
    return dropped


def write_output(directory: Path, files: dict[Path, str], *, force: bool) -> list[Path]:
    """Write `files` under `directory`, each renamed into place once whole; none when one
    exists already (without `force`)."""
    targets = [directory / relative for relative in files]
    existing = [str(path) for path in targets if path.exists() or path.is_symlink()]
    if existing and not force:
        raise ImportFailed(
            "the output exists (--force replaces it)", [f"{path}: exists" for path in existing]
        )
    for target, text in zip(targets, files.values(), strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return targets


def _server_problem(server: str) -> str | None:
    if not server or server != server.strip() or not server.isprintable() or len(server) > 256:
        return f"--server {_show(server)}: a server name is 1-256 printable characters"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tools = parser.add_subparsers(dest="import_from", required=True, metavar="TOOL")
    intercept = tools.add_parser(
        "intercept",
        help=INTERCEPT_HELP,
        description=INTERCEPT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    intercept.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="Intercept policy files"
    )
    intercept.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="DIR",
        help="the policy repository to write into (policies/ and rego/ under it)",
    )
    intercept.add_argument(
        "--server",
        action="append",
        metavar="NAME",
        help='the MCP server the policy is for, as the proxy names it (default "*": any '
        "server); once for every file, or once per file in order",
    )
    intercept.add_argument("--force", action="store_true", help="replace output files that exist")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`mcp-policy import intercept`; the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    prefix = "mcp-policy import intercept"
    files: list[Path] = list(args.files)
    servers: list[str] = list(args.server or ["*"])
    problems = [p for s in servers if (p := _server_problem(s)) is not None]
    if len(servers) != len(files):
        problems.append(
            f"{len(files)} files and {len(args.server or [])} --server names: give one per "
            "file, in order (an Intercept policy is for one MCP server)"
        )
    elif len(files) > 1 and "*" in servers:
        problems.append(
            'with several files, no --server "*": one file\'s "*" rules would apply to the '
            "tools of the others"
        )
    elif len(set(servers)) != len(servers):
        problems.append("each file needs a server of its own: a --server is given twice")
    try:
        if problems:
            raise ImportFailed("bad arguments", problems)
        outputs, rendered = asyncio.run(convert_files(files, servers, args.output))
        written = write_output(args.output, rendered, force=args.force)
    except ToolMissing as exc:
        print(f"{prefix}: {exc.message}", file=err)
        return EXIT_TOOL_MISSING
    except (ImportFailed, PolicyRejected) as exc:
        lines = exc.lines if isinstance(exc, ImportFailed) else exc.errors
        if isinstance(exc, PolicyRejected):
            print(
                f"{prefix}: the output, with the policy in {args.output}, does not load as "
                "serve would load it",
                file=err,
            )
        print(f"{prefix}: {exc.message}; nothing written", file=err)
        for line in lines:
            print(f"  {line}", file=err)
        return EXIT_FAILED
    except PolicyUnavailable as exc:
        print(
            f"{prefix}: the output could not be checked: {exc.message}; nothing written", file=err
        )
        return EXIT_FAILED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prefix}: {where}{exc.strerror or exc}", file=err)
        return EXIT_FAILED
    findings = [f for c in outputs for f in c.findings]
    for finding in findings:
        print(f"{prefix}: {finding.text()}", file=err)
    for path in written:
        print(f"{prefix}: wrote {path}", file=out)
    omitted = sum(f.omitted for f in findings)
    for converted in outputs:
        count = sum(f.places for f in converted.findings if f.omitted)
        print(
            f"{prefix}: {converted.display}: {len(converted.catalog)} tools catalogued, "
            f"{len(converted.checks)} condition rules, {len(converted.limits)} limits in Rego; "
            + (f"not converted: {count} (see above)" if count else "everything converted"),
            file=out,
        )
    return EXIT_OMISSIONS if omitted else EXIT_OK
