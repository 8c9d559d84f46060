"""`mcp-policy scan`: list an MCP server's tools and write a catalog file for them.

The file holds only the server's part of the policy catalog,
`mcp_policy.catalog.<server>.<tool>: {category, risk}`, in the form of the shipped
`policies/catalog.yaml`, so it merges with the shipped policy (or with other scanned
servers) instead of replacing it: put it beside `policies/*.yaml`, or in a directory of
its own loaded with another `--policy`. Each entry carries the tool's description,
parameters (name, type, required) and annotations as comments.

Category and risk come from the tool's annotations, which are hints the server gives
about itself: `readOnlyHint` -> read/low; `destructiveHint` -> delete/high; anything
else -> write/medium. The file has no rules: the risk picks the rule from the
`risk_defaults` of `policies/rules.yaml` (as shipped: low allow, medium and high
require_approval), and a tool gets a rule of its own in `rules` there, keyed by tool
name. The file is a start for a person to review, not a policy to load unread.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx2
import mcp_types as types
import yaml
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

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


def classify(tool: types.Tool) -> tuple[str, str, str]:
    """(category, risk, action) from the tool's annotations; the action is what the
    shipped `risk_defaults` give that risk (the file itself holds no rule)."""
    hints = tool.annotations
    if hints is not None and hints.read_only_hint is True:
        return "read", "low", "allow"
    if hints is not None and hints.destructive_hint is True:
        return "delete", "high", "require_approval"
    return "write", "medium", "require_approval"


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
        "# Review every entry before use: category and risk are guessed from the tools'",
        "# own annotations (readOnlyHint -> read/low; destructiveHint -> delete/high;",
        "# otherwise write/medium).",
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


def scaffold(scanned: Scanned, *, server: str | None = None, now: datetime | None = None) -> str:
    """The catalog YAML for the scanned tools (server name overridable): only
    `mcp_policy.catalog.<server>`, so it merges with policies/ and other scans."""
    name = server or scanned.server
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    lines = [*_header(name, scanned.version, when), "mcp_policy:", "  catalog:"]
    entries: list[str] = []
    seen: set[str] = set()
    for tool in scanned.tools:
        if tool.name in seen:  # listed twice: a second key would be a YAML error
            entries.append(f"      # {_safe(tool.name)}: listed again by the server, kept once")
            continue
        seen.add(tool.name)
        category, risk, _ = classify(tool)
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
            f"        category: {category}",
            f"        risk: {risk}",
        ]
    if entries:
        lines += [f"    {_scalar(name)}:", *entries]
    else:
        lines.append(f"    {_scalar(name)}: {{}}  # the server lists no tools")
    return "\n".join(lines) + "\n"
