"""Turn a decide request into a tool call and the OPA input document.

This is the only place that reads MCP's JSON-RPC shape. It checks structure (what must
be there, of which type) and never policy: an unknown or odd tool name is a call the
policy denies, not a malformed request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from engine import jsonstrict
from engine.errors import InvalidRequest
from engine.identity.base import Identity
from engine.models import CallRequest, DecideRequest, DecideResultRequest, Principal, ToolCall

TOOLS_CALL = "tools/call"


def tool_call(request: CallRequest, *, max_depth: int) -> ToolCall:
    """Validate the call part of `request`: exactly one of `tool` or `message`.

    Every string that reaches the policy is checked to be valid Unicode here, whichever
    transport it came by, so the policy evaluates exactly what was sent."""
    _check_strings(request)
    jsonstrict.check_value(request.context, max_depth=max_depth, what="context")
    has_tool = request.tool is not None
    has_message = request.message is not None
    if has_tool == has_message:
        raise InvalidRequest(
            "give exactly one of `tool` (with `arguments`) or `message`, not "
            + ("both" if has_tool else "neither"),
            field="tool" if has_tool else "message",
        )
    if request.tool is not None:
        if request.tool == "":
            raise InvalidRequest("`tool` must not be empty", field="tool")
        arguments = {} if request.arguments is None else request.arguments
        if not isinstance(arguments, dict):
            raise InvalidRequest("`arguments` must be a JSON object", field="arguments")
        jsonstrict.check_value(arguments, max_depth=max_depth, what="arguments")
        return ToolCall(server=request.server, name=request.tool, arguments=arguments)
    if request.arguments is not None:
        raise InvalidRequest(
            "`arguments` goes with `tool`; with `message` the "
            "arguments are message.params.arguments",
            field="arguments",
        )
    message = request.message
    if isinstance(message, str | bytes):
        try:
            message = jsonstrict.loads(message, max_depth=max_depth, what="message")
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, field="message", syntax=True) from exc
    elif message is not None:
        jsonstrict.check_value(message, max_depth=max_depth, what="message")
    return parse_tools_call(message, server=request.server)


def _check_strings(request: CallRequest) -> None:
    principal = request.principal
    for what, text in (
        ("server", request.server),
        ("tool", request.tool),
        ("approval_id", request.approval_id if isinstance(request, DecideRequest) else None),
        ("decision_id", request.decision_id if isinstance(request, DecideResultRequest) else None),
        ("principal.agent_id", principal.agent_id),
        ("principal.session_id", principal.session_id),
        ("principal.user_id", principal.user_id),
    ):
        if text is not None:
            jsonstrict.check_text(text, what=what)
    for i, role in enumerate(principal.roles):
        jsonstrict.check_text(role, what=f"principal.roles[{i}]")


def parse_tools_call(message: Any, *, server: str) -> ToolCall:
    """Read a JSON-RPC 2.0 `tools/call` request; raise InvalidRequest naming what is wrong."""
    if isinstance(message, list):
        raise InvalidRequest(
            "`message` is a JSON-RPC batch; MCP removed batches (2025-06-18), send one request",
            field="message",
        )
    if not isinstance(message, dict):
        raise InvalidRequest("`message` must be a JSON-RPC 2.0 request object", field="message")
    if message.get("jsonrpc") != "2.0":
        raise InvalidRequest('`message.jsonrpc` must be "2.0"', field="message.jsonrpc")
    method = message.get("method")
    if method != TOOLS_CALL:
        raise InvalidRequest(
            f'`message.method` must be exactly "{TOOLS_CALL}", got {jsonstrict.quote(method)}',
            field="message.method",
        )
    if "id" not in message or message["id"] is None:
        raise InvalidRequest(
            "`message.id` is missing or null: a tools/call is a request, not a notification",
            field="message.id",
        )
    jsonrpc_id = message["id"]
    if isinstance(jsonrpc_id, bool) or not isinstance(jsonrpc_id, str | int):
        raise InvalidRequest("`message.id` must be a string or an integer", field="message.id")
    params = message.get("params")
    if not isinstance(params, dict):
        raise InvalidRequest("`message.params` must be an object", field="message.params")
    name = params.get("name")
    if not isinstance(name, str) or name == "":
        raise InvalidRequest(
            "`message.params.name` must be a non-empty string", field="message.params.name"
        )
    arguments = params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise InvalidRequest(
            "`message.params.arguments` must be an object", field="message.params.arguments"
        )
    return ToolCall(server=server, name=name, arguments=arguments, jsonrpc_id=jsonrpc_id)


def gateway_principal_verified(principal: Mapping[str, Any]) -> bool:
    """Whether a gateway's request says it verified who the agent is: it names the agent,
    user or roles in its principal headers (set after its own token check). Such a
    principal is believed only from a gateway the service authenticated; anonymous calls
    (no principal headers) are decided as anonymous."""
    return any(principal.get(key) for key in ("agent_id", "user_id", "roles"))


def proven_principal(asserted: Principal, identity: Identity | None) -> Principal:
    """Who the call is from: what the agent's verified credential says, when there is one
    (the asserted agent, user and roles are then ignored; the session stays the one the
    transport knows), else what the caller asserted."""
    if identity is None:
        return asserted
    return Principal(
        agent_id=identity.agent_id or identity.subject,
        session_id=asserted.session_id,
        user_id=identity.user_id,
        roles=list(identity.roles),
    )


def tool_result(result: Any, *, max_depth: int) -> dict[str, Any]:
    """Validate a tool's answer as an MCP `CallToolResult`: an object whose `content` is a
    list, `isError` a boolean and `structuredContent` and `_meta` objects when present;
    every string valid Unicode, no non-finite number, nesting within `max_depth`. Its
    content is the tool's own business (the result policy's): a block of an unknown type
    is no malformed request. Raises InvalidRequest naming the field."""
    if not isinstance(result, dict):
        raise InvalidRequest("`result` must be a JSON object (a CallToolResult)", field="result")
    content = result.get("content")
    if not isinstance(content, list):
        raise InvalidRequest(
            "`result.content` must be a list of content blocks"
            + (" (it is missing)" if "content" not in result else ""),
            field="result.content",
        )
    if "isError" in result and not isinstance(result["isError"], bool):
        raise InvalidRequest("`result.isError` must be true or false", field="result.isError")
    for key in ("structuredContent", "_meta"):
        if key in result and not isinstance(result[key], dict):
            raise InvalidRequest(f"`result.{key}` must be a JSON object", field=f"result.{key}")
    jsonstrict.check_value(result, max_depth=max_depth, what="result")
    return result


def input_document(
    call: ToolCall,
    request: CallRequest,
    *,
    decision_id: str,
    now: datetime,
    transport: str,
    identity: Identity | None = None,
    asserted_by: str | None = None,
) -> dict[str, Any]:
    """The OPA input document; its shape is a stable contract (see DESIGN.md).

    `principal.authenticated` is true when agent, user and roles come from a credential
    this engine verified (`principal.method`: jwt or api_key; its claims and scopes are
    there too); otherwise they are what the caller asserted, and `principal.asserted_by`
    names the authenticated proxy that asserted them (null when the caller is not known).
    """
    principal = request.principal
    return {
        "tool": {"server": call.server, "name": call.name, "arguments": call.arguments},
        "principal": {
            "agent_id": principal.agent_id,
            "session_id": principal.session_id,
            "user_id": principal.user_id,
            "roles": list(principal.roles),
            "authenticated": identity is not None,
            "method": identity.method if identity is not None else None,
            "scopes": list(identity.scopes) if identity is not None else [],
            "claims": dict(identity.claims) if identity is not None else {},
            "asserted_by": asserted_by if identity is None else None,
        },
        "request": {
            "id": decision_id,
            "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "transport": transport,
            "jsonrpc_id": call.jsonrpc_id,
        },
        "context": request.context,
    }


def result_document(
    input_doc: dict[str, Any], call_decision_id: str | None, *, size_bytes: int, max_bytes: int
) -> dict[str, Any]:
    """The input of `data.mcp.result_decision` but its `result` (see DESIGN.md): the call's
    input document, `request.call_decision_id` (when the caller gave it) and `result_info`.
    The result itself is added to the JSON text as it was encoded once (`result_input`)."""
    request = dict(input_doc["request"])
    if call_decision_id is not None:
        request["call_decision_id"] = call_decision_id
    return {
        **input_doc,
        "request": request,
        "result_info": {"size_bytes": size_bytes, "max_bytes": max_bytes},
    }


def result_input(document: dict[str, Any], result_json: bytes) -> bytes:
    """The JSON text of `document` with `"result": <result_json>` added: the result encoded
    once (its size and digest are taken from the same bytes), never again per use."""
    head = json.dumps(document, separators=(",", ":")).encode()
    return head[:-1] + b',"result":' + result_json + b"}"
