"""Screening what the agent sends, before anything of it is relayed or decided.

One function for both agent transports (a stdio line, a streamable HTTP POST body):
the text is parsed once, with the decision service's strict rules (`engine.jsonstrict`:
no duplicate keys, no NaN or Infinity, no number that overflows to infinity, no integer
literal past a digit bound, no lone UTF-16 surrogate, nothing nested deeper than the
service's limit), and the parsed value is then validated as a JSON-RPC message. A policy
and the upstream server can therefore never read one message two ways.

Answers, as JSON-RPC errors:

- -32700 Parse error for text that is not strict JSON, naming the problem (bounded: it
  never quotes more than a few dozen characters of the input);
- -32600 Invalid Request for what parses but is not one JSON-RPC message: a batch (MCP
  removed them), a value that is not an object, a message with both a `method` and a
  `result` or `error`, a `method` with an `id` that is not a string or an integer (MCP:
  a request's id is never null, a notification has none), and a `tools/call` without an
  id. The SDK's models would read `"id": null` (or `true`, `1.5`, `{}`) on a request as
  a *notification*, which is never answered and, for `tools/call`, would never be decided:
  a tools/call must be a request, decided and answered, or it is not relayed at all.

The request id is given back with a -32600 when one can be read; never with a -32700.

What passes is a `Frame` (see core.py): the parsed object and, when the SDK's models
would read it as exactly that object, the text itself, which is then relayed as it came,
without a model being built. Anything else (a member the models drop, a value they
convert) is read by the models, as before, and relayed as they write it.
"""

from __future__ import annotations

from typing import Any, Final

from mcp.shared.message import SessionMessage
from mcp_types import (
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCNotification,
    RequestId,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError

from engine import jsonstrict
from engine.errors import InvalidRequest
from engine.proxy.core import NOTIFICATION, TOOLS_CALL, Frame, MalformedMessage
from engine.settings import Settings

# The decision service's default nesting limit (`max_json_depth`).
MAX_DEPTH: Final[int] = int(Settings.model_fields["max_json_depth"].default)
# Error messages never carry more than this much of the parser's explanation.
DETAIL_LIMIT: Final = 160

NOT_A_MESSAGE: Final = (
    "Invalid Request: not a JSON-RPC 2.0 request, notification or response "
    '(needs "jsonrpc": "2.0" and a "method", or an "id" with a "result" or "error")'
)
BATCH: Final = (
    "Invalid Request: JSON-RPC batches are not supported (MCP removed them in 2025-06-18); "
    "send one message at a time"
)
BAD_ID: Final = (
    "Invalid Request: a request's id must be a string or an integer (never null), and a "
    "notification has no id"
)
MIXED: Final = (
    'Invalid Request: a message has either a "method" (a request or notification) or a '
    '"result" or "error" (a response), not both'
)
TOOLS_CALL_NOTIFICATION: Final = (
    "Invalid Request: tools/call must be a request with an id (a string or an integer); "
    "sent as a notification it is neither decided nor relayed"
)


def bounded(text: str, limit: int = DETAIL_LIMIT) -> str:
    """`text` cut to `limit` characters, and always encodable as UTF-8."""
    if len(text) > limit:
        text = text[:limit] + "…"
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def usable_id(value: Any) -> RequestId | None:
    """`value` if it can be a JSON-RPC request id (a string or an integer), else None."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None


def _invalid(message: str, request_id: RequestId | None = None) -> MalformedMessage:
    return MalformedMessage(ErrorData(code=INVALID_REQUEST, message=message), request_id)


def screen_line(raw: str | bytes, *, max_depth: int = MAX_DEPTH) -> Frame | MalformedMessage:
    """One message from the agent (a stdio line, a POST body): the frame to relay, or
    the error to answer it with."""
    try:
        value = jsonstrict.loads(raw, max_depth=max_depth, what="message")
    except InvalidRequest as exc:
        return MalformedMessage(
            ErrorData(
                code=PARSE_ERROR,
                message=f"Parse error: not JSON, or not strict JSON ({bounded(exc.message)})",
            )
        )
    frame = Frame.parsed(value, raw if isinstance(raw, bytes) else raw.encode())
    if frame is None or (frame.kind == NOTIFICATION and frame.method == TOOLS_CALL):
        return _screen(value)
    return frame


def screen_agent_message(
    raw: str | bytes, *, max_depth: int = MAX_DEPTH
) -> SessionMessage | MalformedMessage:
    """`screen_line`, with the message as an SDK model."""
    screened = screen_line(raw, max_depth=max_depth)
    return screened if isinstance(screened, MalformedMessage) else SessionMessage(screened.model)


def screen_value(value: Any) -> SessionMessage | MalformedMessage:
    """A strictly parsed JSON value from the agent: the message, or the error for it."""
    screened = _screen(value)
    return screened if isinstance(screened, MalformedMessage) else SessionMessage(screened.model)


def _screen(value: Any) -> Frame | MalformedMessage:
    """What the SDK's models make of `value`, under the rules above."""
    if isinstance(value, list):
        return _invalid(BATCH)
    if not isinstance(value, dict):
        return _invalid(NOT_A_MESSAGE)
    request_id = usable_id(value.get("id"))
    if "method" in value:
        if "result" in value or "error" in value:
            return _invalid(MIXED, request_id)
        if "id" in value and request_id is None:
            return _invalid(BAD_ID)
    try:
        message = jsonrpc_message_adapter.validate_python(value, by_name=False)
    except ValidationError:
        return _invalid(NOT_A_MESSAGE, request_id)
    if isinstance(message, JSONRPCNotification) and message.method == TOOLS_CALL:
        return _invalid(TOOLS_CALL_NOTIFICATION)
    return Frame.of(message)
