"""`mcp-policy scan`: list an MCP server's tools and write a catalog file for them.

The file holds only the server's part of the policy catalog,
`mcp_policy.catalog.<server>.<tool>: {category, risk, guessed: true}`, in the form of the
shipped `policies/catalog.yaml`, so it merges with the shipped policy (or with other
scanned servers) instead of replacing it: put it beside `policies/*.yaml`, or in a
directory of its own loaded with another `--policy`. Each entry carries the tool's
description, parameters (name, type, required) and annotations as comments.

Category and risk are guesses (GUESSES, one table): from the tool's annotations when it
has them, which are hints the server gives about itself (`readOnlyHint` -> read/low;
`destructiveHint` -> delete/high), else from the verb its name starts with (`get_`,
`list_`, `search_` … -> read/low; `create_`, `update_`, `copy_` … -> write/medium;
`delete_`, `remove_` … -> delete/high; `bulk_` raises the risk to high; a tool the
server says is not read-only is never guessed a read), else write/medium. Each entry
says so: `guessed: true` and a comment with the reason. A tool whose name the catalog
does not take (MCP's names: 1-128 of [A-Za-z0-9_.-]) is left out, named in a comment, so
the file always loads. The file has no rules: the risk picks the rule from the
`risk_defaults` of `policies/rules.yaml` (as shipped: low allow, medium and high
require_approval), and a tool gets a rule of its own in `rules` there, keyed by tool
name. The file is a start for a person to review, not a policy to load unread.

With `--skip-catalogued`, the tools the policy (`--policy` directories) already
catalogues for this server (or for any server, "*") are left out, named in a comment, so
the file merges without a clash. `--cases FILE` also writes a starter table-test file
(engine.authoring.tables: `*.cases.yaml`) with one case per catalogued tool, expecting
what the policy decides for it today, with the scanned entries loaded beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx2
import mcp_types as types
import yaml
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from engine.errors import EngineError, PolicyRejected, PolicyUnavailable
from engine.policy.schema import load as load_schema
from engine.policy.schema import locate
from engine.policy.source import PolicyBundle, data_files, merge_data, read_bundle, with_framework
from engine.settings import DEFAULT_POLICY_SCHEMA

if TYPE_CHECKING:
    from engine.authoring.offline import OfflinePolicy

MAX_PAGES = 100


@dataclass(frozen=True)
class Scanned:
    server: str
    version: str
    tools: list[types.Tool]


@asynccontextmanager
async def connect(
    command: list[str], url: str | None, headers: dict[str, str]
) -> AsyncIterator[ClientSession]:
    """An initialized client session to the server (a command over stdio, or a URL)."""
    if url is not None:
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0)) as http,
            streamable_http_client(url, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session
        return
    params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def scan(command: list[str], url: str | None, headers: dict[str, str]) -> Scanned:
    async with connect(command, url, headers) as session:
        info = session.server_info
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await session.list_tools(params=params)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
    return Scanned(
        server=info.name if info is not None else "unknown",
        version=info.version if info is not None else "",
        tools=tools,
    )


@dataclass(frozen=True)
class Guess:
    """One row of GUESSES: a tool that fits is guessed `category` and `risk`.

    `kind` says what fits: "hint", the tool's annotation `match[0]` is true; "verb", the
    first word of the tool's name that is a verb of any row is one of `match`;
    "modifier", a word before that verb is one of `match` (no category of its own: it
    raises the verb's risk to at least `risk`); "not_read", the annotation `match[0]` is
    false, which overrules a name that says the tool reads."""

    kind: str
    match: tuple[str, ...]
    category: str | None
    risk: str
    reason: str


# How scan guesses a tool's category and risk: the server's own annotations that say
# read-only or destructive first, else the verb of the tool's name (a "bulk"-like word
# before it raising the risk), where a server that says a tool is not read-only
# overrules a name that says it reads; nothing fits: FALLBACK. idempotentHint and
# openWorldHint change no guess (an idempotent write is still a write; most tools reach
# the world outside). Every guess is marked as one in the file: a person reviews it.
GUESSES: tuple[Guess, ...] = (
    Guess("hint", ("readOnlyHint",), "read", "low", "annotation readOnlyHint=true"),
    Guess("hint", ("destructiveHint",), "delete", "high", "annotation destructiveHint=true"),
    Guess("modifier", ("bulk", "batch", "mass"), None, "high", "a bulk operation"),
    Guess(
        "verb",
        (
            *("get", "list", "search", "describe", "read", "fetch", "query", "find"),
            *("show", "view", "lookup", "count", "head", "download"),
        ),
        "read",
        "low",
        "the name says it reads",
    ),
    Guess(
        "verb",
        ("delete", "remove", "drop", "purge", "destroy", "erase", "truncate", "revoke", "wipe"),
        "delete",
        "high",
        "the name says it deletes",
    ),
    Guess(
        "verb",
        (
            *("create", "update", "copy", "put", "set", "add", "start", "stop", "cancel"),
            *("tag", "untag", "write", "upload", "import", "export", "modify", "edit"),
            *("patch", "move", "rename", "send", "post", "run", "invoke", "execute"),
            *("restart", "enable", "disable", "attach", "detach", "grant", "assign"),
        ),
        "write",
        "medium",
        "the name says it writes",
    ),
    Guess("not_read", ("readOnlyHint",), "write", "medium", "annotation readOnlyHint=false"),
)
FALLBACK = Guess("fallback", (), "write", "medium", "no annotation or verb says otherwise")
RISKS = ("low", "medium", "high", "critical")


@dataclass(frozen=True)
class Classified:
    category: str
    risk: str
    reason: str  # why, for the comment that marks the guess


def _words(name: str) -> list[str]:
    """The words of a tool name: split at _ - . and at lowerUpper, lowercased."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return [word.lower() for word in re.split(r"[_\-.\s]+", spaced) if word]


def classify(tool: types.Tool) -> Classified:
    """The guessed category and risk of `tool` (GUESSES), with the reason."""
    hints = tool.annotations
    said = hints.model_dump(by_alias=True, exclude_none=True) if hints is not None else {}
    for row in GUESSES:
        if row.kind == "hint" and said.get(row.match[0]) is True and row.category:
            return Classified(row.category, row.risk, row.reason)
    by_name = _by_name(_words(tool.name))
    for row in GUESSES:
        if (
            row.kind == "not_read"
            and said.get(row.match[0]) is False
            and by_name.category == "read"
            and row.category
        ):
            return Classified(row.category, row.risk, f"{row.reason}, though {by_name.reason}")
    return by_name


def _by_name(words: list[str]) -> Classified:
    """The guess of the first word that is a verb (raised by a modifier before it)."""
    floor: Guess | None = None
    for word in words:
        row = next((r for r in GUESSES if r.kind in ("verb", "modifier") and word in r.match), None)
        if row is None:
            continue
        if row.kind == "modifier":
            floor = floor or row
            continue
        risk, reason = row.risk, f"{row.reason} ({word})"
        if floor is not None and RISKS.index(floor.risk) > RISKS.index(risk):
            risk, reason = floor.risk, f"{reason}, {floor.reason}"
        return Classified(str(row.category), risk, reason)
    return Classified(str(FALLBACK.category), FALLBACK.risk, FALLBACK.reason)


def _type_of(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "any"
    kind = schema.get("type")
    if isinstance(kind, str):
        if kind == "array":
            return f"array of {_type_of(schema.get('items'))}"
        return kind
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            return " | ".join(_type_of(option) for option in options)
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    return "any"


def parameters(tool: types.Tool) -> list[str]:
    """`name: type, required` lines for the tool's input schema."""
    schema = tool.input_schema
    properties = schema.get("properties")
    required = schema.get("required")
    required_names = set(required) if isinstance(required, list) else set()
    out = []
    if isinstance(properties, dict):
        for name, prop in properties.items():
            line = f"{name}: {_type_of(prop)}"
            line += ", required" if name in required_names else ", optional"
            if isinstance(prop, dict) and "default" in prop:
                line += f" (default {json.dumps(prop['default'])})"
            out.append(line)
    return out


# What a YAML stream may hold as is (YAML 1.1, as PyYAML reads it), less the characters
# it treats as line breaks: anything else is written as an escape.
_PRINTABLE = re.compile(r"[\t\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _safe(text: str) -> str:
    """`text` on one line: line breaks and unprintable characters as escapes (the
    server chooses its names and descriptions; none may end a comment early)."""
    return "".join(c if _PRINTABLE.fullmatch(c) else _escape(c) for c in text)


def _comment(text: str, prefix: str) -> list[str]:
    return [f"{prefix}{_safe(line)}".rstrip() for line in text.splitlines() or [""]]


def _scalar(value: str) -> str:
    """A YAML scalar that reads back as `value`: plain when safe, else double-quoted
    with escapes, so names like `true`, `null` or `1e3` stay strings."""
    if value and all(c.isalnum() or c in "._-/" for c in value) and value.isascii():
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    body = "".join(
        "\\" + c if c in '"\\' else c if _PRINTABLE.fullmatch(c) else _escape(c) for c in value
    )
    return f'"{body}"'


def _header(name: str, version: str, when: str) -> list[str]:
    return [
        f"# Policy catalog for the MCP server {_safe(name)}"
        + (f" (version {_safe(version)})" if version else ""),
        f"# written by `mcp-policy scan` on {when}.",
        "#",
        "# Review every entry before use: category and risk are guesses (guessed: true,",
        "# the comment beside says from what), from the tools' own annotations",
        "# (readOnlyHint -> read/low; destructiveHint -> delete/high), else from the verb",
        "# their name starts with (get_/list_/search_ -> read/low; create_/update_/copy_",
        "# -> write/medium; delete_/remove_ -> delete/high; bulk_ -> at least high; never",
        "# a read when readOnlyHint=false), else write/medium. Once you checked an entry,",
        "# remove its `guessed: true`.",
        "#",
        "# Only catalog entries, no rules: a tool without a rule of its own gets the rule",
        "# of its risk from risk_defaults in policies/rules.yaml. As shipped that is:",
        "# low -> allow, medium and high -> require_approval (critical -> deny). A rule",
        "# already in policies/rules.yaml for a tool of the same name (e.g. the shipped",
        "# copy_image_set rule) applies to that tool here too. To give a tool a rule of",
        "# its own, add it to `rules` in policies/rules.yaml, keyed by the tool name:",
        "#   rules:",
        "#     <tool>:",
        "#       action: rate_limit",
        "#       rate_limit: {max: 10, window: 60}",
        "#",
        "# To use it, put this file beside policies/*.yaml (the files merge into one",
        "# catalog; this server's tools must not be catalogued in another file too), or",
        "# in a directory of its own loaded with another --policy:",
        "#   mcp-policy serve --policy rego/ --policy policies/ --policy <that directory>",
        "# Check it with `mcp-policy validate rego/ policies/ [<that directory>]`.",
    ]


@functools.cache
def _tool_name_pattern() -> re.Pattern[str]:
    """What the policy schema takes as a tool name in the catalog (MCP's tool names)."""
    schema = load_schema(DEFAULT_POLICY_SCHEMA)
    pattern = schema["properties"]["catalog"]["additionalProperties"]["propertyNames"]["pattern"]
    return re.compile(str(pattern))


_NAME_RULE = "1 to 128 of A-Z a-z 0-9 _ . -"


def catalogable(name: str) -> bool:
    """Whether the catalog (the policy schema) takes `name` as a tool name."""
    return _tool_name_pattern().search(name) is not None


def scaffold(
    scanned: Scanned,
    *,
    server: str | None = None,
    now: datetime | None = None,
    skip: dict[str, str] | None = None,
) -> str:
    """The catalog YAML for the scanned tools (server name overridable): only
    `mcp_policy.catalog.<server>`, so it merges with policies/ and other scans. The tools
    in `skip` (name -> where the policy catalogues it) are left out, each named in a
    comment."""
    name = server or scanned.server
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    lines = [*_header(name, scanned.version, when), "mcp_policy:", "  catalog:"]
    entries: list[str] = []
    written = 0
    seen: set[str] = set()
    for tool in scanned.tools:
        if tool.name in seen:  # listed twice: a second key would be a YAML error
            entries.append(f"      # {_safe(tool.name)}: listed again by the server, kept once")
            continue
        seen.add(tool.name)
        if not catalogable(tool.name):
            entries.append(
                f"      # {_safe(tool.name)}: not a tool name the catalog takes "
                f"({_NAME_RULE}), left out"
            )
            continue
        if skip is not None and tool.name in skip:
            entries.append(
                f"      # {_safe(tool.name)}: already catalogued ({_safe(skip[tool.name])}), "
                "left out"
            )
            continue
        guess = classify(tool)
        entries.append(f"      # {_safe(tool.name)}")
        if tool.description:
            entries.extend(_comment(tool.description.strip(), "      #   "))
        params = parameters(tool)
        if params:
            entries.append("      #   parameters:")
            entries.extend(f"      #     {_safe(param)}" for param in params)
        else:
            entries.append("      #   parameters: none")
        hints = tool.annotations
        if hints is not None:
            shown = hints.model_dump(by_alias=True, exclude_none=True)
            if shown:
                entries.append(
                    "      #   annotations: "
                    + ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items())
                )
        entries += [
            f"      {_scalar(tool.name)}:",
            f"        category: {guess.category}  # guessed: {_safe(guess.reason)}",
            f"        risk: {guess.risk}",
            "        guessed: true",
        ]
        written += 1
    if written:
        lines += [f"    {_scalar(name)}:", *entries]
    else:
        why = "every tool is catalogued already" if scanned.tools else "the server lists no tools"
        lines += [f"    {_scalar(name)}: {{}}  # {why}", *entries]
    return "\n".join(lines) + "\n"


# --- the policy the tools join: what is catalogued, and the starter table tests --------


@dataclass(frozen=True)
class Target:
    """The policy the scanned tools join: its directories (the framework's Rego added when
    none of them has the decision package; the shipped data when they hold none), and
    its data as `serve` reads them."""

    paths: list[Path]
    bundle: PolicyBundle
    files: list[Path] = field(default_factory=list)


def target(dirs: Sequence[Path]) -> Target:
    """The policy of `dirs` (default: the shipped rego/ and policies/); PolicyRejected
    when it cannot be read (a directory missing, a data conflict with both places)."""
    paths = with_framework(list(dirs))
    return Target(paths, read_bundle(paths), data_files(paths))


def catalogued(policy: Target, server: str, tools: Sequence[types.Tool]) -> dict[str, str]:
    """The tools the policy already catalogues for `server` (or for any server, "*"),
    each with where: `file:line:col` of its entry."""
    policy_data = policy.bundle.data.get("mcp_policy")
    catalog = policy_data.get("catalog") if isinstance(policy_data, dict) else None
    out: dict[str, str] = {}
    for tool in tools:
        for key in (server, "*"):
            entries = catalog.get(key) if isinstance(catalog, dict) else None
            if isinstance(entries, dict) and tool.name in entries:
                place = locate(["mcp_policy", "catalog", key, tool.name], policy.files)
                on = "" if key == server else ' under "*"'
                out[tool.name] = f"{place or 'in the policy data'}{on}"
                break
    return out


def _listed(scanned: Scanned, skip: dict[str, str]) -> list[types.Tool]:
    """The tools the catalog file holds: each once, less those skipped and those whose
    name the catalog does not take."""
    seen: dict[str, types.Tool] = {}
    for tool in scanned.tools:
        if tool.name not in skip and catalogable(tool.name):
            seen.setdefault(tool.name, tool)
    return list(seen.values())


# A starter case's principal: an agent in one session, with nothing proven (edit it: give
# roles, and `authenticated: true` for a principal the service would have verified).
STARTER_PRINCIPAL = {"agent_id": "starter-agent", "session_id": "starter-session"}
MAX_PLACEHOLDER_DEPTH = 4


def placeholder(schema: Any, depth: int = 0) -> Any:
    """A value for a parameter from its JSON schema: its default, first example or enum
    value when those are JSON, else one of its type (a required object's required keys
    filled in the same way)."""
    if not isinstance(schema, dict) or depth > MAX_PLACEHOLDER_DEPTH:
        return "example"
    for key in ("default", "const"):
        if key in schema and schema[key] is not None and _is_json(schema[key]):
            return schema[key]
    for key in ("examples", "enum"):
        values = schema.get(key)
        if isinstance(values, list) and values and values[0] is not None and _is_json(values[0]):
            return values[0]
    kinds = schema.get("type")
    kind = next((k for k in kinds if k != "null"), None) if isinstance(kinds, list) else kinds
    if kind is None:
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list):
                usable = [
                    o for o in options if not (isinstance(o, dict) and o.get("type") == "null")
                ]
                if usable:
                    return placeholder(usable[0], depth + 1)
    if kind == "object":
        return required_arguments(schema, depth + 1)
    simple: dict[str, Any] = {"integer": 1, "number": 1, "boolean": False, "array": []}
    return simple.get(str(kind), "example")


def required_arguments(schema: Any, depth: int = 0) -> dict[str, Any]:
    """The required properties of an object schema, each with its placeholder."""
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties")
    required = schema.get("required")
    if not isinstance(properties, dict) or not isinstance(required, list):
        return {}
    return {
        name: placeholder(properties.get(name), depth)
        for name in required
        if isinstance(name, str) and name in properties
    }


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _flow(value: Any) -> str:
    """`value` as one line of YAML (flow style) that reads back as itself."""
    return str(yaml.safe_dump(value, default_flow_style=True, width=math.inf)).strip()


async def starter_cases(
    scanned: Scanned, server: str, policy: Target, skip: dict[str, str], *, now: datetime
) -> str | None:
    """The starter table-test file: a case per catalogued tool (placeholder arguments),
    expecting what the policy, with the scanned entries loaded beside it, decides today.
    None when there is no tool to write a case for. PolicyRejected when the policy with
    the scanned entries does not load (a clash with what it catalogues)."""
    from engine.authoring.offline import OfflinePolicy

    tools = _listed(scanned, skip)
    if not tools:
        return None
    scanned_data = {
        "mcp_policy": {
            "catalog": {
                server: {
                    t.name: {"category": g.category, "risk": g.risk} for t, g in _classified(tools)
                }
            }
        }
    }
    bundle = policy.bundle
    data = json.loads(json.dumps(bundle.data))
    merge_data(data, scanned_data, "data")
    lines = _cases_header(server, scanned.version, now.strftime("%Y-%m-%d %H:%M UTC"))
    async with await OfflinePolicy.load(
        policy.paths, bundle=PolicyBundle(modules=bundle.modules, data=data)
    ) as loaded:
        for tool, guess in _classified(tools):
            lines += _case(loaded, server, tool, guess, now)
    return "\n".join(lines) + "\n"


def _classified(tools: Sequence[types.Tool]) -> list[tuple[types.Tool, Classified]]:
    return [(tool, classify(tool)) for tool in tools]


def _case(
    policy: OfflinePolicy, server: str, tool: types.Tool, guess: Classified, now: datetime
) -> list[str]:
    """One case's lines (commented out, with why, when the service would refuse it)."""
    arguments = required_arguments(tool.input_schema)
    call = {
        "server": server,
        "tool": tool.name,
        "arguments": arguments,
        "principal": STARTER_PRINCIPAL,
    }
    head = f"  # {_safe(tool.name)}: guessed {guess.category}/{guess.risk} ({_safe(guess.reason)})"
    try:
        result = policy.evaluate(policy.input_for(call, time=now))
    except EngineError as exc:
        return [
            head,
            f"  #   no case: the service would not decide this call: {_safe(exc.message)}",
        ]
    return [
        head,
        f"  #   the policy today: {result.action} by {_safe(result.rule)}: {_safe(result.reason)}",
        f"  - name: {_scalar(tool.name)}",
        "    call:",
        f"      server: {_scalar(server)}",
        f"      tool: {_scalar(tool.name)}",
        f"      arguments: {_flow(arguments)}",
        f"      principal: {_flow(STARTER_PRINCIPAL)}",
        "    expect:",
        f"      action: {result.action}",
        f"      rule: {_scalar(result.rule)}",
    ]


def _cases_header(name: str, version: str, when: str) -> list[str]:
    return [
        f"# Starter table tests for the MCP server {_safe(name)}"
        + (f" (version {_safe(version)})" if version else ""),
        f"# written by `mcp-policy scan` on {when}: one case per tool it catalogued.",
        "#",
        "# Each case expects what the policy decided for the call when this file was",
        "# written (with the scanned catalog entries loaded): a record of today, not a",
        "# judgement. Review every case: change `expect` to what the tool should get, the",
        "# placeholder arguments (from each tool's input schema) to a real call, and the",
        "# principal to the caller you mean (roles count only when proven: add",
        "# `authenticated: true`). Add cases for the arguments and callers that matter.",
        "#",
        "# Keep this file outside the policy directories (serve would load it as data),",
        "# e.g. in tests/, and run it with `mcp-policy test`.",
        "cases:",
    ]


# --- the command -------------------------------------------------------------------------


async def write(scanned: Scanned, args: argparse.Namespace, err: TextIO) -> int:
    """Write the catalog file (`--out`, else stdout) and, with --cases, the starter
    table tests, as the command line asks (`--server-name`, `--policy`,
    `--skip-catalogued`, `--cases`: engine/proxy/cli.py); 0, or 2 with one line on `err`
    when the policy cannot be read or, with the scanned entries, does not load."""
    server = args.server_name or scanned.server
    now = datetime.now(UTC)
    try:
        policy = target(args.policy)
    except PolicyRejected as exc:
        print(
            f"mcp-policy scan: the policy cannot be read: {'; '.join(exc.errors or [exc.message])}",
            file=err,
        )
        return EXIT_POLICY
    known = catalogued(policy, server, scanned.tools)
    skip = known if args.skip_catalogued else {}
    if known and not args.skip_catalogued:
        print(
            f"mcp-policy scan: the policy already catalogues {len(known)} of these tools for "
            f"{_safe(server)} ({_safe(', '.join(sorted(known)))}); the file would clash with "
            "it: use --skip-catalogued to leave them out",
            file=err,
        )
    text = scaffold(scanned, server=server, now=now, skip=skip)
    cases = None
    if args.cases is not None:
        try:
            cases = await starter_cases(scanned, server, policy, skip, now=now)
        except (PolicyRejected, PolicyUnavailable) as exc:
            errors = exc.errors if isinstance(exc, PolicyRejected) else []
            print(
                f"mcp-policy scan: no starter cases: the policy with the scanned entries does "
                f"not load: {'; '.join(errors or [exc.message])}",
                file=err,
            )
            return EXIT_POLICY
    _put(args.out, text, err)
    if args.cases is not None:
        if cases is None:
            print("mcp-policy scan: no starter cases: no tool to write one for", file=err)
        else:
            _put(args.cases, cases, err)
    return 0


EXIT_POLICY = 2


def _put(path: Path | None, text: str, err: TextIO) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    print(f"mcp-policy scan: wrote {path}", file=err)
