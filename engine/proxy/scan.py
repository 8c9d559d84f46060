"""`mcp-policy scan`: list an MCP server's tools and write a policy scaffold for them.

The scaffold is a complete `mcp_policy` data document in the format of the shipped
`policies/catalog.yaml` and `policies/rules.yaml`: a catalog entry per tool, a rule per
tool, and the shipped `risk_defaults` and `default`, so a directory holding it can stand
in for `policies/` (`--policy rego/ --policy <dir>`). Each entry carries the tool's
description, parameters (name, type, required) and annotations as comments.

Category and risk come from the tool's annotations, which are hints the server gives
about itself: `readOnlyHint` → read/low (rule: allow); `destructiveHint` → delete/high;
anything else → write/medium (rule: require_approval for both). The scaffold is a start
for a person to review, not a policy to load unread.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx2
import mcp_types as types
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
    """(category, risk, action) from the tool's annotations."""
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


def _comment(text: str, prefix: str) -> list[str]:
    return [f"{prefix}{line}".rstrip() for line in text.splitlines() or [""]]


def _scalar(value: str) -> str:
    """A YAML scalar: plain when safe, else double-quoted (JSON string syntax)."""
    if value and all(c.isalnum() or c in "._-/" for c in value) and not value[0].isdigit():
        return value
    return json.dumps(value, ensure_ascii=False)


def scaffold(scanned: Scanned, *, server: str | None = None, now: datetime | None = None) -> str:
    """The policy scaffold YAML for the scanned tools (server name overridable)."""
    name = server or scanned.server
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Policy scaffold for the MCP server {name}"
        + (f" (version {scanned.version})" if scanned.version else ""),
        f"# written by `mcp-policy scan` on {when}.",
        "#",
        "# Review every entry before use: category and risk are guessed from the tools'",
        "# own annotations (readOnlyHint -> read/low, allow; destructiveHint ->",
        "# delete/high; otherwise write/medium; both require_approval).",
        "# This is a whole policies/ data set (catalog, rules, risk_defaults, default):",
        "# put it in a directory of its own and run the service with",
        "#   --policy rego/ --policy <that directory>",
        "# or copy its entries into policies/catalog.yaml and policies/rules.yaml.",
        "# Check it with `mcp-policy validate rego/ <that directory>`.",
        "mcp_policy:",
        "  catalog:",
    ]
    rules: list[str] = []
    for tool in scanned.tools:
        category, risk, action = classify(tool)
        lines.append(f"    # {tool.name}")
        if tool.description:
            lines.extend(_comment(tool.description.strip(), "    #   "))
        params = parameters(tool)
        if params:
            lines.append("    #   parameters:")
            lines.extend(f"    #     {param}" for param in params)
        else:
            lines.append("    #   parameters: none")
        hints = tool.annotations
        if hints is not None:
            shown = hints.model_dump(by_alias=True, exclude_none=True)
            if shown:
                lines.append(
                    "    #   annotations: "
                    + ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items())
                )
        lines += [
            f"    - server: {_scalar(name)}",
            f"      tool: {_scalar(tool.name)}",
            f"      category: {category}",
            f"      risk: {risk}",
        ]
        rules += [f"    {_scalar(tool.name)}:", f"      action: {action}"]
    if not scanned.tools:
        lines[-1] = "  catalog: []"
    lines += [
        "",
        "  # Per-tool rules (see policies/rules.yaml for every option: reason,",
        "  # rate_limit, approval).",
        "  rules:" if rules else "  rules: {}",
        *rules,
        "",
        "  # As shipped: rules for catalogued tools without a rule of their own.",
        "  risk_defaults:",
        "    low:",
        "      action: allow",
        "    medium:",
        "      action: require_approval",
        "    high:",
        "      action: require_approval",
        "    critical:",
        "      action: deny",
        "",
        "  # As shipped: tools not in the catalog are denied.",
        "  default:",
        "    action: deny",
        "",
    ]
    return "\n".join(lines)
