"""The proxy core: relay JSON-RPC messages between an agent and an MCP server, untouched,
except where policy applies.

Everything the agent sends goes upstream as it came, and everything the server sends goes
back the same way (initialize, notifications, resources, prompts, progress, cancellation,
server-to-client requests, methods the proxy has never heard of), with three exceptions:

- a `tools/call` request is decided first (in its own task, so decisions never hold up
  other traffic). Allowed: it is forwarded with exactly the arguments that were evaluated
  and the upstream's answer is reported back to the decision service (a JSON-RPC error or
  a result with `isError: true` counts as failed, which gives the rate-limit slots back).
  Not allowed: it is never forwarded; the agent gets the decision's `mcp_result` (a
  `CallToolResult` with `isError: true`, the reason as text, the decision as
  `_meta["mcp-policy/decision"]`) as the JSON-RPC result.
- a `tools/list` result is filtered (see `listing.py`).
- approvals: an approval id for a retry can ride in `params._meta["mcp-policy/approval_id"]`
  (stripped before forwarding); an identical retry of a call whose approval was granted
  is retried with that approval by the proxy itself; a client that can show its user a
  URL is sent to the approval's page (`elicitation.py`: URL-mode elicitation, or at
  2026-07-28 an input-required result and the retry that answers it); with
  `approval_wait` the proxy waits for a human before answering. Waiting is AwaitApproval
  (the decision service answers once the approval is decided), then the identical call is
  decided once more; `approval_poll` keeps the old way (deciding again every so often) as
  a baseline for the benchmark.

Messages travel through the core as `Frame`s: the message as a JSON object and, when it
came as text the core may pass on as it is (a stdio line), that text. A message the proxy
does not act on is relayed as those very bytes, without building an SDK model; the SDK's
transports (streamable HTTP) get and give models, built only when one of them needs it.

The upstream's answer to an allowed call goes through the result policy before the agent
sees it (`Decider.decide_result`, with the call's own fields and decision id): `pass` hands
the agent the answer as it came (the server's very bytes), `redact` the result the policy
rewrote (a redaction that finds nothing is answered as a pass), `block` the
refusal (`isError: true`, the reason as text, the result decision under
`_meta["mcp-policy/result-decision"]`). A JSON-RPC error answer is checked too (its
message can carry a secret as well as a result can): as the CallToolResult
`{"content": [message, data as JSON text], "isError": true}`; pass hands on the error
itself, redact or block that result. When the result decision cannot be had (the service
unreachable or slow, or the result not one it can read) the agent gets a refusal, never
the answer (rules `result.unavailable`, `result.malformed`). With `result_policy`
"dry-run" (rolling out result rules) the decision is asked for as a dry run, logged there,
and the answer forwarded as it came whatever it says. The result decision runs in the
call's own task, never in the one that reads the upstream: a slow one holds up nothing
but its own answer. The outcome report comes after the answer (a success) or before it (a
failure), off the relay path either way.

The core knows neither the transports (it gets message streams and an `Upstream`) nor
where decisions come from (a `Decider`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

import anyio
import pydantic_core
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    REQUEST_TIMEOUT,
    SERVER_INFO_META_KEY,
    ErrorData,
    JSONRPCError,
    JSONRPCMessage,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError

from engine.errors import EngineError, InvalidRequest, NotFound
from engine.identity.base import Identity
from engine.models import (
    MAX_AWAIT_SECONDS,
    ApprovalRef,
    ApprovalStatus,
    DecideRequest,
    DecideResultRequest,
    Decision,
    Principal,
    ResultAction,
    ResultDecision,
    Verdict,
)
from engine.policy import result as policy_result
from engine.proxy import elicitation
from engine.proxy.decider import Decider
from engine.proxy.elicitation import ElicitationOptions, Retry, StateRefused
from engine.proxy.listing import ToolFilter
from engine.service import mcp_result
from engine.settings import Settings
from engine.translate import proven_principal

log = logging.getLogger(__name__)

APPROVAL_META_KEY = "mcp-policy/approval_id"
RULE_DECISION_UNAVAILABLE = "proxy.decision_unavailable"
RULE_SERVER_UNKNOWN = "proxy.server_unknown"
RULE_ELICITATION_DECLINED = "proxy.elicitation_declined"
# The result policy (see the module's docstring).
RULE_RESULT_UNAVAILABLE = "result.unavailable"
RULE_RESULT_MALFORMED = "result.malformed"
RESULT_ENFORCE: Final = "enforce"
RESULT_DRY_RUN: Final = "dry-run"
RESULT_POLICIES = (RESULT_ENFORCE, RESULT_DRY_RUN)
# The proxy's own bound on one result decision, past the decider's deadlines (the gRPC
# call's, the service's evaluation deadline): the answer is withheld, never passed.
RESULT_DECISION_TIMEOUT = 30.0
# JSON-RPC codes of the proxy's own errors (the implementation-defined range).
UPSTREAM_CLOSED = -32000
UPSTREAM_TIMEOUT = REQUEST_TIMEOUT  # -32001
REPORT_TIMEOUT = 10.0
TOOLS_CALL: Final = "tools/call"
ELICIT: Final = "elicitation/create"
ELICITATION_COMPLETE: Final = "notifications/elicitation/complete"
# After AwaitApproval failed (the service unreachable), the wait goes on after this pause.
AWAIT_RETRY_PAUSE = 1.0
# A session watches at most this many approvals for their completion notification (the
# -32042 form); past it the notification, which is optional, is not sent.
MAX_WATCHED = 100

# The four kinds of JSON-RPC message.
REQUEST: Final = "request"
NOTIFICATION: Final = "notification"
RESPONSE: Final = "response"
ERROR: Final = "error"

# The members each kind has in the SDK's models: a message with any other is read by the
# models (which drop what they do not know) rather than relayed as it came.
_MEMBERS = {
    REQUEST: frozenset({"jsonrpc", "id", "method", "params"}),
    NOTIFICATION: frozenset({"jsonrpc", "method", "params"}),
    RESPONSE: frozenset({"jsonrpc", "id", "result"}),
    ERROR: frozenset({"jsonrpc", "id", "error"}),
}
_ERROR_MEMBERS = frozenset({"code", "message", "data"})


@dataclass(frozen=True)
class ProxyOptions:
    """How one proxy behaves; the same for every session it serves."""

    server_name: str | None = None
    agent_id: str | None = None
    user_id: str | None = None
    approval_wait: float = 0.0
    # None: wait with AwaitApproval. Seconds: the old way, deciding again this often (each
    # a logged decision), kept as the benchmark's baseline (--approval-poll).
    approval_poll: float | None = None
    upstream_timeout: float = 60.0
    filter_tools: bool = True
    # RESULT_ENFORCE: the result policy's decision is applied to every allowed call's
    # answer; RESULT_DRY_RUN: asked as a dry run (logged), the answer forwarded as it came.
    result_policy: str = RESULT_ENFORCE
    # Messages nested deeper are refused (the service's default; --embedded: its setting).
    max_json_depth: int = int(Settings.model_fields["max_json_depth"].default)
    elicitation: ElicitationOptions = field(default_factory=ElicitationOptions)


def _plain_id(value: Any) -> bool:
    kind = type(value)
    return kind is str or kind is int


def id_key(request_id: RequestId) -> str:
    """The key a request id is known by while it is in use: its text, so 7 and "7" are one
    id. The SDK's streamable HTTP transports (the agent's side of `--listen`, and an
    upstream URL's server) route each answer to its request's stream by `str(id)`: two
    requests in flight whose ids have the same text would get one stream, and one answer
    would be lost."""
    return str(request_id)


def id_in_use(request_id: RequestId) -> str:
    """The message of the -32600 error that refuses a request whose id is in use."""
    text = repr(request_id)
    if len(text) > 80:
        text = text[:77] + "..."
    return (
        f"Invalid Request: request id {text} is already in use in this session by a request "
        "that has not been answered (or was cancelled, and the server may still answer it); "
        "the request was neither decided nor forwarded: send it with an id of its own"
    )


def kind_of(value: dict[str, Any]) -> str | None:
    """The kind of JSON-RPC message `value` is, when the SDK's models would read it as
    exactly that object (the same kind, nothing dropped, nothing converted); else None,
    and the models are the judge.

    A request or a response needs an id that is a string or an integer (never a bool or
    a float), a request or a notification a string `method` and `params` that are an
    object or null, a response an object `result`, an error an `error` object with an
    integer `code` and a string `message`, and none of them any other member.
    """
    if value.get("jsonrpc") != "2.0":
        return None
    if "method" in value:
        params = value.get("params")
        if type(value["method"]) is not str or (params is not None and type(params) is not dict):
            return None
        if "id" in value:
            kind = REQUEST if _plain_id(value["id"]) else None
        else:
            kind = NOTIFICATION
    elif "result" in value:
        ok = type(value["result"]) is dict and _plain_id(value.get("id"))
        kind = RESPONSE if ok else None
    else:
        error = value.get("error")
        if (
            type(error) is not dict
            or "id" not in value
            or not (value["id"] is None or _plain_id(value["id"]))
            or type(error.get("code")) is not int
            or type(error.get("message")) is not str
            or not error.keys() <= _ERROR_MEMBERS
        ):
            return None
        kind = ERROR
    if kind is None or not value.keys() <= _MEMBERS[kind]:
        return None
    return kind


def encode(value: Any) -> bytes:
    """`value` as compact JSON text in UTF-8, as the SDK's models write it (a non-finite
    number, which strictly parsed input never holds, as null)."""
    try:
        return pydantic_core.to_json(value, inf_nan_mode="null")
    except pydantic_core.PydanticSerializationError:
        # A lone surrogate (only an upstream's text can hold one): ASCII escapes carry it.
        return json.dumps(value, separators=(",", ":")).encode()


_KINDS: dict[type, str] = {
    JSONRPCRequest: REQUEST,
    JSONRPCNotification: NOTIFICATION,
    JSONRPCResponse: RESPONSE,
    JSONRPCError: ERROR,
}


class Frame:
    """One JSON-RPC message as the core relays it.

    `value` is the message as a JSON object, `kind` one of REQUEST, NOTIFICATION,
    RESPONSE and ERROR. `raw` is the text the message came as, when it may be relayed as
    it is: strictly parsed (agent) or parsed (server), one line, and read by the SDK's
    models as exactly `value` (see `kind_of`). A frame made from an SDK model keeps it for
    the SDK's transports; one the proxy builds has only its value.
    """

    __slots__ = ("_model", "kind", "raw", "value")

    def __init__(
        self,
        kind: str,
        value: dict[str, Any],
        *,
        raw: bytes | None = None,
        model: JSONRPCMessage | None = None,
    ) -> None:
        self.kind = kind
        self.value = value
        self.raw = raw
        self._model = model

    @classmethod
    def parsed(cls, value: Any, raw: bytes) -> Frame | None:
        """The frame for `value` parsed from `raw`, or None when the SDK's models must
        read it (it is not plainly one JSON-RPC message: see `kind_of`)."""
        if type(value) is not dict:
            return None
        kind = kind_of(value)
        if kind is None:
            return None
        raw = raw.strip()
        return cls(kind, value, raw=None if b"\n" in raw else raw)

    @classmethod
    def of(cls, message: JSONRPCMessage) -> Frame:
        """The frame of an SDK model (from the SDK's transports, or a test)."""
        value = message.model_dump(by_alias=True, exclude_unset=True)
        return cls(_KINDS[type(message)], value, model=message)

    @classmethod
    def request(cls, request_id: RequestId, method: str, params: dict[str, Any]) -> Frame:
        value = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        return cls(REQUEST, value)

    @classmethod
    def notification(cls, method: str, params: dict[str, Any]) -> Frame:
        return cls(NOTIFICATION, {"jsonrpc": "2.0", "method": method, "params": params})

    @classmethod
    def response(cls, request_id: RequestId, result: dict[str, Any]) -> Frame:
        return cls(RESPONSE, {"jsonrpc": "2.0", "id": request_id, "result": result})

    @classmethod
    def error(cls, request_id: RequestId | None, code: int, message: str) -> Frame:
        error = {"code": code, "message": message}
        return cls(ERROR, {"jsonrpc": "2.0", "id": request_id, "error": error})

    @property
    def id(self) -> Any:
        return self.value.get("id")

    @property
    def method(self) -> str | None:
        return self.value.get("method")

    @property
    def params(self) -> dict[str, Any]:
        """A request's or notification's params ({} when it has none)."""
        params = self.value.get("params")
        return params if type(params) is dict else {}

    @property
    def result(self) -> dict[str, Any]:
        """A response's result ({} for any other kind)."""
        result = self.value.get("result")
        return result if type(result) is dict else {}

    def line(self) -> bytes:
        """The message as one line of the stdio transport: the text it came as when it
        may be relayed as it is, else as the SDK's models write it."""
        if self.raw is not None:
            return self.raw + b"\n"
        if self._model is not None:
            text = self._model.model_dump_json(by_alias=True, exclude_unset=True)
            return text.encode() + b"\n"
        return encode(self.value) + b"\n"

    @property
    def model(self) -> JSONRPCMessage:
        """The message as an SDK model (built once, when a transport of the SDK needs it)."""
        if self._model is None:
            self._model = jsonrpc_message_adapter.validate_python(self.value, by_name=False)
        return self._model

    def __repr__(self) -> str:
        return f"Frame({self.kind}, {self.value!r})"


class MalformedMessage(Exception):
    """What an agent transport yields for a line that is not a JSON-RPC message."""

    def __init__(self, error: ErrorData, request_id: RequestId | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id


class UpstreamClosed(Exception):
    """The upstream MCP server is gone; nothing more can be sent to it."""


class MessageWriter(Protocol):
    """Where messages are sent: the agent side of a transport, or the SDK client's writer."""

    async def send(self, item: SessionMessage, /) -> None: ...


@runtime_checkable
class FrameWriter(Protocol):
    """A writer that takes frames as they are (the stdio transport): a message that came
    as text goes on as that text."""

    async def send_frame(self, frame: Frame, /) -> None: ...


class Upstream(Protocol):
    """One connection to the real MCP server (a child over stdio, or a URL)."""

    @property
    def messages(self) -> AsyncIterable[Frame | SessionMessage | Exception]:
        """What the server sends; ends when the server is gone."""
        ...

    async def send(self, message: Frame) -> None:
        """Send one message; raises UpstreamClosed when the server is gone."""
        ...

    def negotiated(self, protocol_version: str) -> None:
        """The protocol version the agent and the server agreed on (from initialize)."""
        ...

    def ended(self) -> str:
        """Why `messages` ended, for error messages: "exited with status 3", ..."""
        ...


def error_response(request_id: RequestId | None, code: int, message: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))


def refusal(rule: str, reason: str) -> dict[str, Any]:
    """A CallToolResult refusing a call for a reason of the proxy's own (fail closed)."""
    decision = Decision(
        decision_id="",
        verdict=Verdict.DENY,
        reason=reason,
        rule=rule,
        policy_revision="",
    )
    return mcp_result(decision)


def result_refusal(rule: str, reason: str) -> dict[str, Any]:
    """A CallToolResult withholding a tool's answer for a reason of the proxy's own (the
    result decision could not be had), as the service refuses a result it blocks."""
    decision = ResultDecision(
        decision_id="", action=ResultAction.BLOCK, rule=rule, reason=reason, policy_revision=""
    )
    return policy_result.refusal(decision)


def tool_result_of(answer: Frame) -> dict[str, Any]:
    """The CallToolResult the result policy looks at for an upstream answer: a response's
    result as it is; for a JSON-RPC error, a result made of it, `{"content": [message, data
    as JSON text], "isError": true}` (data as a block of its own, so that the policy's
    paths apply inside it as in any JSON text)."""
    if answer.kind == RESPONSE:
        return answer.result
    error = answer.value.get("error")
    error = error if isinstance(error, dict) else {}
    message = error.get("message")
    content = [{"type": "text", "text": message if isinstance(message, str) else ""}]
    if "data" in error:
        content.append({"type": "text", "text": encode(error["data"]).decode()})
    return {"content": content, "isError": True}


def call_failed(answer: Frame | JSONRPCResponse | JSONRPCError) -> bool:
    """Whether an upstream answer to tools/call counts as failed for the rate limits.

    A JSON-RPC error or `isError: true` failed. An `input_required` result (protocol
    2026-07-28) is not a finished call either: the client retries it as a new tools/call,
    which is decided and counted on its own.
    """
    if isinstance(answer, Frame):
        if answer.kind != RESPONSE:
            return True
        result = answer.result
    elif isinstance(answer, JSONRPCError):
        return True
    else:
        result = answer.result
    return result.get("isError") is True or result.get("resultType") == "input_required"


@dataclass(slots=True)
class _Call:
    """One tools/call from the agent, from decision to answer (in a task of its own)."""

    request: Frame
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    forwarded: bool = False
    answered: bool = False
    answer: Frame | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def tool(self) -> str:
        name = self.request.params.get("name")
        return name if isinstance(name, str) else "?"


class ProxySession:
    """One agent session relayed to one upstream connection."""

    def __init__(
        self,
        decider: Decider,
        options: ProxyOptions,
        *,
        session_id: str,
        tool_filter: ToolFilter | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.decider = decider
        self.options = options
        self.session_id = session_id
        self.server_name = options.server_name
        self.tool_filter = tool_filter if options.filter_tools else None
        # The agent's verified credential (HTTP listener with --auth-*): it, not the
        # options, says who the calls are from. The transport may replace it with a
        # renewed credential of the same principal.
        self.identity = identity
        self._asserted = Principal(
            agent_id=options.agent_id, session_id=session_id, user_id=options.user_id
        )
        # Every id in use, by `id_key`: tools/calls from arrival until their answer has
        # gone to the agent, other requests until the server answers them (the request's
        # own id, and its method), and requests the agent no longer waits for (cancelled,
        # timed out) whose answer the server may still send.
        self._calls: dict[str, _Call] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, tuple[RequestId, str]] = {}
        self._abandoned: set[str] = set()
        self._listings: dict[RequestId, anyio.Event] = {}
        self._progress: dict[str | int, RequestId] = {}
        self._progress_of: dict[RequestId, str | int] = {}
        self._closed: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        # What the client declared at initialize, and the version the session speaks (the
        # initialize handshake; a 2026-07-28 client says both in each request's _meta).
        self._client_capabilities: Any = None
        self.protocol_version: str | None = None
        # The proxy's own requests to the agent (elicitation/create), by id, until answered;
        # and the approvals watched for their completion notification (-32042 form).
        self._asks: dict[str, asyncio.Future[Frame]] = {}
        self._late: set[str] = set()  # asked, no longer awaited: a late answer is dropped
        self._watched: dict[str, str] = {}
        self._watches: set[asyncio.Task[None]] = set()
        # Where answers go: frames as they are (stdio), or SDK models in SessionMessages.
        self._frames: FrameWriter | None = None
        self._messages: MessageWriter | None = None
        self._upstream: Upstream | None = None

    def in_use(self, request_id: RequestId) -> bool:
        """Whether a new request with this id would be refused (see `id_key`)."""
        key = id_key(request_id)
        return key in self._calls or key in self._pending or key in self._abandoned

    @property
    def principal(self) -> Principal:
        """Who the session's calls are from: what its identity proves when it has one
        (the session id stays this session's), else what the options assert."""
        return proven_principal(self._asserted, self.identity)

    async def run(
        self,
        agent_messages: AsyncIterable[Frame | SessionMessage | Exception],
        agent: MessageWriter | FrameWriter,
        upstream: Upstream,
    ) -> None:
        """Relay until the agent or the upstream goes away.

        When the upstream goes first, every request still waiting for it is answered with
        a JSON-RPC error before this returns.
        """
        if isinstance(agent, FrameWriter):
            self._frames = agent
        else:
            self._messages = agent
        self._upstream = upstream
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._from_upstream, upstream)
                with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                    await self._from_agent(agent_messages)
                tg.cancel_scope.cancel()
        finally:
            await self._end_calls()

    async def _end_calls(self) -> None:
        """Stop the calls still in progress with the session, as the session's own tasks
        would be: their outcome reports (shielded) still go out."""
        for watch in list(self._watches):
            watch.cancel()
        if not self._tasks:
            return
        for call in list(self._calls.values()):
            call.scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(REPORT_TIMEOUT):
            await asyncio.wait(list(self._tasks))

    # Agent → upstream.

    async def _from_agent(
        self, messages: AsyncIterable[Frame | SessionMessage | Exception]
    ) -> None:
        async for item in messages:
            if isinstance(item, Frame):
                frame = item
            elif isinstance(item, SessionMessage):
                frame = Frame.of(item.message)
            elif isinstance(item, MalformedMessage):
                log.warning("malformed message from the agent: %s", item.error.message)
                error = JSONRPCError(jsonrpc="2.0", id=item.request_id, error=item.error)
                await self._to_agent(Frame.of(error))
                continue
            else:
                log.warning("agent transport error: %s", item)
                continue
            kind = frame.kind
            if kind == REQUEST:
                request_id = frame.id
                # The id is checked and taken with no await in between (and a tools/call
                # takes it before its decision starts): of two requests with one id, the
                # second is refused here, never decided, never forwarded. Its answer
                # cannot be told from the first's (over HTTP it would take the first's
                # stream). A request the agent gave up on keeps its id while the server
                # may still answer it, so a late answer is never taken for a new one's.
                if self.in_use(request_id):
                    log.warning("refused a request whose id is in use: %.80r", request_id)
                    await self._to_agent(
                        Frame.error(request_id, INVALID_REQUEST, id_in_use(request_id))
                    )
                    continue
                method = frame.method
                if method == TOOLS_CALL:
                    self._start_call(frame)
                    continue
                if method == "initialize":
                    self._client_capabilities = frame.params.get("capabilities")
                self._pending[id_key(request_id)] = (request_id, method or "?")
                self._track_progress(frame)
            elif kind == NOTIFICATION:
                method = frame.method
                if method == TOOLS_CALL:
                    # Last guard (the transports screen these out already): a tools/call
                    # without a usable id could be neither decided nor answered.
                    log.warning("refused a tools/call sent as a notification (no usable id)")
                    await self._to_agent(
                        Frame.error(
                            None,
                            INVALID_REQUEST,
                            "Invalid Request: tools/call must be a request with an id (a "
                            "string or an integer); sent as a notification it is neither "
                            "decided nor relayed",
                        )
                    )
                    continue
                if method == "notifications/cancelled" and self._cancel_call(frame):
                    continue
            elif type(frame.id) is str and (frame.id in self._asks or frame.id in self._late):
                # The agent's answer to the proxy's own request: never the upstream's.
                future = self._asks.pop(frame.id, None)
                if future is not None and not future.done():
                    future.set_result(frame)
                self._late.discard(frame.id)
                continue
            await self._to_upstream(frame)

    async def _to_upstream(self, frame: Frame) -> None:
        assert self._upstream is not None
        try:
            if self._closed is not None:
                raise UpstreamClosed(self._closed)
            await self._upstream.send(frame)
        except UpstreamClosed:
            if frame.kind == REQUEST:
                self._pending.pop(id_key(frame.id), None)
                await self._to_agent(
                    Frame.error(
                        frame.id,
                        UPSTREAM_CLOSED,
                        f"upstream MCP server {self._closed or 'is gone'}; "
                        f"{frame.method} was not delivered",
                    )
                )

    def _cancel_call(self, notification: Frame) -> bool:
        """A cancellation for a call still being decided stops it here (no answer is due);
        one for a forwarded call goes upstream. Returns whether it was consumed here."""
        request_id = notification.params.get("requestId")
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            return False
        call = self._calls.get(id_key(request_id))
        if call is None:
            return False
        if call.forwarded:
            # The agent no longer waits; the call may still have run, so its slot stays
            # used (no outcome report). Once the server has answered (the result is being
            # decided) there is nothing left upstream to cancel, nor an answer to wait for.
            call.answered = True
            answered_upstream = call.answer is not None
            if not answered_upstream:
                self._abandoned.add(id_key(request_id))
            call.scope.cancel()
            return answered_upstream
        call.answered = True
        call.scope.cancel()
        return True

    # Upstream → agent.

    async def _from_upstream(self, upstream: Upstream) -> None:
        async for item in upstream.messages:
            if isinstance(item, Frame):
                frame = item
            elif isinstance(item, SessionMessage):
                frame = Frame.of(item.message)
            else:
                log.warning("upstream sent something that is not JSON-RPC: %s", item)
                continue
            kind = frame.kind
            if (kind == RESPONSE or kind == ERROR) and frame.id is not None:
                request_id = frame.id
                key = id_key(request_id)
                call = self._calls.get(key)
                if call is not None and call.forwarded:
                    self._abandoned.discard(key)  # (given up on, it was still answered)
                    # The call's own task has the result decided and answers the agent
                    # (never this task: one slow result decision would hold up everything
                    # the server sends after it).
                    call.answer = frame
                    call.arrived.set()
                    continue
                if key in self._abandoned:
                    self._abandoned.discard(key)
                    log.info("dropped the late upstream answer to request %.80r", request_id)
                    continue
                pending = self._pending.pop(key, None)
                method = pending[1] if pending is not None else None
                self._untrack_progress(request_id)
                if kind == RESPONSE:
                    if self.server_name is None:
                        self._learn_from_meta(frame)
                    if method == "initialize":
                        self._learn_initialize(frame, upstream)
                    elif method == "server/discover":
                        self._learn_discover(frame)
                    elif method == "tools/list" and self.tool_filter is not None:
                        assert self._tg is not None
                        done = self._listings[request_id] = anyio.Event()
                        self._tg.start_soon(self._send_filtered_list, frame, done)
                        continue
            await self._to_agent(frame, self._related(frame))
        await self._upstream_ended(upstream.ended())

    def _learn_initialize(self, frame: Frame, upstream: Upstream) -> None:
        result = frame.result
        version = result.get("protocolVersion")
        if isinstance(version, str):
            upstream.negotiated(version)
            self.protocol_version = version
        info = result.get("serverInfo")
        if self.server_name is None and isinstance(info, dict):
            name = info.get("name")
            if isinstance(name, str) and name:
                self.server_name = name
                log.info("MCP server name from initialize: %s", name)

    def _learn_discover(self, frame: Frame) -> None:
        self._learn_from_meta(frame, "server/discover")

    def _learn_from_meta(self, frame: Frame, where: str = "a result") -> None:
        """From protocol 2026-07-28 on, results carry the server's info in `_meta`: a
        client that never sends server/discover still names the server this way."""
        if self.server_name is not None:
            return
        meta = frame.result.get("_meta")
        info = meta.get(SERVER_INFO_META_KEY) if isinstance(meta, dict) else None
        if isinstance(info, dict):
            name = info.get("name")
            if isinstance(name, str) and name:
                self.server_name = name
                log.info("MCP server name from %s: %s", where, name)

    async def _send_filtered_list(self, frame: Frame, done: anyio.Event) -> None:
        assert self.tool_filter is not None
        try:
            result = frame.result
            tools = result.get("tools")
            if isinstance(tools, list) and self.server_name is not None:
                names = [
                    tool["name"]
                    for tool in tools
                    if isinstance(tool, dict) and isinstance(tool.get("name"), str)
                ]
                hidden = await self.tool_filter.hidden(self.server_name, names, self.principal)
                if hidden:
                    tools = [
                        t for t in tools if not (isinstance(t, dict) and t.get("name") in hidden)
                    ]
                    log.info("tools/list: hid %s", ", ".join(sorted(hidden)))
                # Written anew whatever was hidden: the agent gets the very list the proxy
                # read (never the server's text, which another parser might read otherwise).
                frame = Frame.response(frame.id, {**result, "tools": tools})
            await self._to_agent(frame)
        finally:
            self._listings.pop(frame.id, None)
            done.set()

    async def _upstream_ended(self, why: str) -> None:
        self._closed = why
        log.warning("upstream MCP server %s", why)
        forwarded = []
        for call in list(self._calls.values()):
            if call.forwarded:
                call.arrived.set()  # its task answers and reports the outcome
                forwarded.append(call)
            elif not call.answered:
                call.answered = True
                call.scope.cancel()
                await self._to_agent(
                    Frame.error(
                        call.request.id,
                        UPSTREAM_CLOSED,
                        f"upstream MCP server {why}; tools/call {call.tool!r} was not forwarded",
                    )
                )
        for request_id, method in list(self._pending.values()):
            await self._to_agent(
                Frame.error(
                    request_id,
                    UPSTREAM_CLOSED,
                    f"upstream MCP server {why} before answering {method}",
                )
            )
        self._pending.clear()
        with anyio.move_on_after(REPORT_TIMEOUT):
            tasks = [call.task for call in forwarded if call.task is not None]
            if tasks:
                await asyncio.wait(tasks)
            for listing in list(self._listings.values()):
                await listing.wait()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _to_agent(self, frame: Frame, metadata: ServerMessageMetadata | None = None) -> None:
        try:
            if self._frames is not None:
                await self._frames.send_frame(frame)
            else:
                assert self._messages is not None
                await self._messages.send(SessionMessage(frame.model, metadata))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.debug("the agent is gone; dropped a %s", frame.kind)

    # Progress notifications belong to their request's stream (streamable HTTP).

    def _track_progress(self, request: Frame) -> None:
        meta = request.params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        if isinstance(token, str | int) and not isinstance(token, bool):
            self._progress[token] = request.id
            self._progress_of[request.id] = token

    def _untrack_progress(self, request_id: RequestId) -> None:
        token = self._progress_of.pop(request_id, None)
        if token is not None and self._progress.get(token) == request_id:
            del self._progress[token]

    def _related(self, frame: Frame) -> ServerMessageMetadata | None:
        if frame.kind == NOTIFICATION and frame.method == "notifications/progress":
            token = frame.params.get("progressToken")
            if isinstance(token, str | int) and token in self._progress:
                return ServerMessageMetadata(related_request_id=self._progress[token])
        return None

    # tools/call.

    def _start_call(self, request: Frame) -> None:
        # A plain task (the session's task group would cost more per call than the rest
        # of the relay); `_end_calls` ends those left when the session ends.
        call = _Call(request)
        self._calls[id_key(request.id)] = call
        task = call.task = asyncio.get_running_loop().create_task(self._run_call(call))
        self._tasks.add(task)
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a tools/call task failed in the proxy", exc_info=exc)

    async def _run_call(self, call: _Call) -> None:
        try:
            with call.scope:
                try:
                    answer, outcome = await self._handle_call(call)
                except Exception:
                    # The traceback is for the proxy's log; the agent learns nothing of
                    # the proxy's internals.
                    log.exception("tools/call %r failed in the proxy", call.request.id)
                    answer = Frame.error(call.request.id, INTERNAL_ERROR, "internal proxy error")
                    outcome = None
                # A failure gives its slots back before the agent hears of it, so a retry
                # at once finds them; a success is reported after answering.
                if outcome is not None and not outcome[1]:
                    await self._report(*outcome)
                if not call.answered:
                    call.answered = True
                    await self._to_agent(answer)
                    self._release(call)
                if outcome is not None and outcome[1]:
                    await self._report(*outcome)
        finally:
            self._release(call)

    def _release(self, call: _Call) -> None:
        """The call's id is free again (its answer has gone to the agent, or the call is
        over): a new request may use it."""
        key = id_key(call.request.id)
        if self._calls.get(key) is call:
            del self._calls[key]

    async def _report(self, decision: Decision, succeeded: bool) -> None:
        """Tell the decision service how the call went (shielded: it must not be lost).

        Only decisions that hold rate-limit slots carry an outcome token; the others have
        nothing to report."""
        decision_id, token = decision.decision_id, decision.outcome_token
        if not token:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(REPORT_TIMEOUT):
            try:
                released = await self.decider.report_outcome(
                    decision_id, token, succeeded=succeeded
                )
            except EngineError as exc:
                log.warning("could not report the outcome of %s: %s", decision_id, exc.message)
                return
            log.debug("outcome of %s: succeeded=%s released=%s", decision_id, succeeded, released)

    async def _handle_call(self, call: _Call) -> tuple[Frame, tuple[Decision, bool] | None]:
        """Decide the call and forward it if allowed; the answer and the outcome to report."""
        request = call.request
        request_id = request.id
        params = request.params
        forward = request
        approval_id: str | None = None
        meta = params.get("_meta")
        if isinstance(meta, dict) and APPROVAL_META_KEY in meta:
            params, meta = dict(params), dict(meta)
            value = meta.pop(APPROVAL_META_KEY)
            if not isinstance(value, str) or not value:
                return Frame.error(
                    request_id,
                    INVALID_PARAMS,
                    f'params._meta["{APPROVAL_META_KEY}"] must be an approval id (a string)',
                ), None
            approval_id = value
            if meta:
                params["_meta"] = meta
            else:
                del params["_meta"]
            forward = Frame.request(request_id, TOOLS_CALL, params)
        retry = elicitation.retry_of(params)
        if retry is not None:
            # A 2026-07-28 retry answering the proxy's elicitation: its requestState and
            # inputResponses are the proxy's alone, and never go upstream.
            params = retry.params
            forward = Frame.request(request_id, TOOLS_CALL, params)
        if self.server_name is None:
            reason = (
                "the proxy does not know the MCP server's name (the server did not report "
                "one); start the proxy with --server-name"
            )
            return self._result(request_id, refusal(RULE_SERVER_UNKNOWN, reason)), None
        evaluated = {key: params[key] for key in ("name", "arguments") if key in params}
        try:
            decide = DecideRequest(
                server=self.server_name,
                message={
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": TOOLS_CALL,
                    "params": evaluated,
                },
                principal=self.principal,
                approval_id=approval_id,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            return Frame.error(request_id, INVALID_PARAMS, f"{where}: {first['msg']}"), None
        if retry is not None:
            decision = await self._resume(call, decide, retry)
        else:
            decision = await self._decide(decide)
            if not isinstance(decision, Frame):
                decision = await self._after_approval(call, decide, decision)
        if isinstance(decision, Frame):
            return decision, None
        if decision.verdict is not Verdict.ALLOW:
            return self._result(request_id, decision.mcp_result or mcp_result(decision)), None
        if forward.raw is not None:
            # Never the agent's text: the server gets the JSON of exactly what was
            # evaluated, written by the proxy.
            forward = Frame.request(request_id, TOOLS_CALL, params)
        return await self._forward(call, forward, decide, decision)

    @staticmethod
    def _result(request_id: RequestId, result: dict[str, Any]) -> Frame:
        """A refusal as the JSON-RPC result. `resultType` is added as the SDK's servers
        always send it: required from protocol 2026-07-28 on, ignored before."""
        return Frame.response(request_id, {"resultType": "complete", **result})

    async def _decide(self, request: DecideRequest) -> Decision | Frame:
        message = request.message
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            identity = self.identity
            if identity is None:  # (a Decider from before identities needs no change)
                return await self.decider.decide(request)
            return await self.decider.decide(request, identity)
        except InvalidRequest as exc:
            return Frame.error(request_id, INVALID_PARAMS, f"invalid tools/call: {exc.message}")
        except EngineError as exc:
            log.error("no decision: %s", exc.message)
            return Decision(
                decision_id="",
                verdict=Verdict.DENY,
                reason=f"policy decision service unavailable: {exc.message}",
                rule=RULE_DECISION_UNAVAILABLE,
                policy_revision="",
                mcp_result=refusal(
                    RULE_DECISION_UNAVAILABLE, f"policy decision service unavailable: {exc.message}"
                ),
            )

    async def _after_approval(
        self, call: _Call, request: DecideRequest, decision: Decision
    ) -> Decision | Frame:
        """approval_required: use a granted approval at once, send the agent's user to the
        approval's page (elicitation), or wait for a human."""
        approval = decision.approval
        if decision.verdict is not Verdict.APPROVAL_REQUIRED or approval is None:
            return decision
        retry = request.model_copy(update={"approval_id": approval.id})
        if approval.status is ApprovalStatus.APPROVED:
            # The identical call, approved and not used yet (a service of this version lets
            # it through by itself; an older one answers so): use the grant.
            return await self._decide(retry)
        if approval.status is ApprovalStatus.PENDING and approval.url:
            asked = await self._elicit(call, retry, decision, approval, approval.url)
            if asked is not None:
                return asked
        wait = self.options.approval_wait
        if wait <= 0:
            return decision
        if self.options.approval_poll is not None:
            return await self._poll(retry, decision, wait, self.options.approval_poll)
        seen = await self._await_decided(approval.id, wait)
        if seen is not None and seen.status is ApprovalStatus.PENDING:
            return decision
        return await self._decide(retry)

    async def _poll(
        self, retry: DecideRequest, decision: Decision, wait: float, every: float
    ) -> Decision | Frame:
        """The old wait: decide the call again every `every` seconds (each a decision of
        its own in the log) until it is no longer approval_required or `wait` passes."""
        deadline = anyio.current_time() + wait
        last = decision
        while (left := deadline - anyio.current_time()) > 0:
            await anyio.sleep(min(every, left))
            again = await self._decide(retry)
            if isinstance(again, Frame):
                return again
            if again.rule == RULE_DECISION_UNAVAILABLE:
                continue
            if again.verdict is not Verdict.APPROVAL_REQUIRED:
                return again
            last = again
        return last

    async def _await_decided(self, approval_id: str, wait: float) -> ApprovalRef | None:
        """Wait until the approval is no longer pending, or `wait` seconds pass: the
        approval as last seen (still pending: the wait passed), or None when how it stands
        is not known (it is gone, or the service could not always be asked), so that the
        caller decides the call again and the service says."""
        deadline = anyio.current_time() + wait
        seen: ApprovalRef | None = None
        failed = False
        while (left := deadline - anyio.current_time()) > 0:
            try:
                answer = await self.decider.await_approval(
                    approval_id, min(left, MAX_AWAIT_SECONDS)
                )
            except NotFound:
                return None
            except EngineError as exc:
                log.warning("could not wait for approval %s: %s", approval_id, exc.message)
                failed = True
                await anyio.sleep(min(AWAIT_RETRY_PAUSE, max(left, 0.0)))
                continue
            if answer is not None:
                seen = answer
                if answer.status is not ApprovalStatus.PENDING:
                    return answer
        return None if failed else seen

    # Elicitation (see elicitation.py).

    @staticmethod
    def _left(approval: ApprovalRef, wait: float) -> float:
        """Seconds to hold a call for `approval`: `wait`, never past its expiry."""
        return max(0.0, min(wait, approval.expires_at.timestamp() - time.time()))

    def _binding(self, request: DecideRequest) -> elicitation.CallBinding | None:
        """What a requestState for this call is bound to."""
        params = request.message.get("params") if isinstance(request.message, dict) else None
        if not isinstance(params, dict):
            return None
        tool = params.get("name")
        return elicitation.CallBinding.of(
            self.principal,
            self.identity,
            server=request.server,
            tool=tool if isinstance(tool, str) else "",
            arguments=params.get("arguments"),
        )

    async def _elicit(
        self,
        call: _Call,
        retry: DecideRequest,
        decision: Decision,
        approval: ApprovalRef,
        url: str,
    ) -> Decision | Frame | None:
        """Send the agent's user to the approval's page when its client can be asked: the
        answer to give, or None when it cannot (then the proxy answers as without)."""
        options = self.options.elicitation
        if not options.enabled:
            return None
        message = elicitation.message_for(retry.server, call.tool, decision)
        request_id = call.request.id
        if elicitation.stateless_url_mode(call.request.params):
            binding = self._binding(retry)
            if binding is None:
                return None
            state = options.states.issue(binding, approval.id, approval.expires_at.timestamp())
            result = elicitation.input_required(message, url, state, decision)
            return Frame.response(request_id, result)
        if not elicitation.handshake_url_mode(self.protocol_version, self._client_capabilities):
            return None
        if options.wait <= 0:
            # The spec's other form: answered at once, completed by a notification.
            elicitation_id = self._watch(approval)
            error = elicitation.url_required_error(request_id, message, url, elicitation_id)
            return Frame(ERROR, error)
        deadline = anyio.current_time() + self._left(approval, options.wait)
        elicitation_id = elicitation.new_elicitation_id()
        params = elicitation.url_params(message, url, elicitation_id)
        answer = await self._ask(call, ELICIT, params, deadline - anyio.current_time())
        if answer is None:
            return decision  # no answer in time: the refusal, the approval stays pending
        if answer.kind != RESPONSE:
            log.info("the client refused the elicitation: %.200r", answer.value.get("error"))
            return None
        if elicitation.answered(answer.result) != "accept":
            return decision  # declined or cancelled: the client's word, nothing more
        left = deadline - anyio.current_time()
        seen = await self._await_decided(approval.id, left) if left > 0 else None
        if left <= 0 or (seen is not None and seen.status is ApprovalStatus.PENDING):
            return decision
        complete = Frame.notification(
            ELICITATION_COMPLETE, elicitation.complete_params(elicitation_id)
        )
        await self._to_agent(complete, self._about(call))
        return await self._decide(retry)

    async def _resume(self, call: _Call, request: DecideRequest, retry: Retry) -> Decision | Frame:
        """A 2026-07-28 retry with the proxy's requestState: refused unless the state
        verifies for exactly this call (then it is spent); on accept, the approval is
        waited for and the call decided with it (forwarded only if the service lets it
        through); on decline or cancel, the approval_required refusal."""
        request_id = call.request.id
        binding = self._binding(request)
        try:
            if binding is None:
                raise StateRefused("requestState was issued for another call")
            approval_id, expires = self.options.elicitation.states.redeem(retry.state, binding)
        except StateRefused as refused:
            log.warning("refused a requestState on tools/call %.80r: %s", request_id, refused)
            return Frame.error(request_id, INVALID_PARAMS, f"Invalid requestState: {refused}")
        again = request.model_copy(update={"approval_id": approval_id})
        if retry.action != "accept":
            return await self._declined(approval_id, retry.action)
        wait = max(0.0, min(self.options.elicitation.wait, expires - time.time()))
        await self._await_decided(approval_id, wait)
        return await self._decide(again)

    async def _declined(self, approval_id: str, action: str | None) -> Decision:
        """The refusal for a client that declined (or cancelled, or did not answer) the
        elicitation: approval_required, the approval as it stands (never used)."""
        try:
            ref = await self.decider.await_approval(approval_id, 0)
        except EngineError:
            ref = None
        where = f" at {ref.url}" if ref is not None and ref.url else ""
        reason = (
            f"the user did not open the approval page ({action or 'no answer'}); approval "
            f"{approval_id} waits for a human{where}; call the same tool again unchanged "
            "once a human approves"
        )
        declined = Decision(
            decision_id="",
            verdict=Verdict.APPROVAL_REQUIRED,
            reason=reason,
            rule=RULE_ELICITATION_DECLINED,
            policy_revision="",
            approval=ref,
        )
        declined.mcp_result = mcp_result(declined)
        return declined

    def _about(self, call: _Call) -> ServerMessageMetadata:
        """Sends a message on the call's own stream (streamable HTTP)."""
        return ServerMessageMetadata(related_request_id=call.request.id)

    async def _ask(
        self, call: _Call, method: str, params: dict[str, Any], timeout: float
    ) -> Frame | None:
        """Send the agent a request of the proxy's own about `call`: its answer (a
        response or an error), or None when none came within `timeout` (the request is
        then cancelled)."""
        request_id = "mcp-policy-" + uuid.uuid4().hex
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._asks[request_id] = future
        try:
            await self._to_agent(Frame.request(request_id, method, params), self._about(call))
            with anyio.move_on_after(timeout):
                return await future
            cancelled = {"requestId": request_id, "reason": "the call waited long enough"}
            await self._to_agent(
                Frame.notification("notifications/cancelled", cancelled), self._about(call)
            )
            return None
        finally:
            unanswered = self._asks.pop(request_id, None) is not None
            if unanswered and len(self._late) < MAX_WATCHED:
                self._late.add(request_id)

    def _watch(self, approval: ApprovalRef) -> str:
        """The elicitation id for `approval` in this session, and a watch that sends the
        agent `notifications/elicitation/complete` once the approval is decided."""
        elicitation_id = self._watched.get(approval.id)
        if elicitation_id is not None:
            return elicitation_id
        elicitation_id = elicitation.new_elicitation_id()
        if len(self._watched) >= MAX_WATCHED:
            return elicitation_id

        async def watch() -> None:
            try:
                seen = await self._await_decided(approval.id, self._left(approval, math.inf))
                if seen is None or seen.status is not ApprovalStatus.PENDING:
                    complete = elicitation.complete_params(elicitation_id)
                    await self._to_agent(Frame.notification(ELICITATION_COMPLETE, complete))
            finally:
                self._watched.pop(approval.id, None)

        self._watched[approval.id] = elicitation_id
        task = asyncio.get_running_loop().create_task(watch())
        self._watches.add(task)
        task.add_done_callback(self._watches.discard)
        return elicitation_id

    async def _forward(
        self, call: _Call, request: Frame, decide: DecideRequest, decision: Decision
    ) -> tuple[Frame, tuple[Decision, bool] | None]:
        """Send the allowed call upstream and wait for its answer: the answer as the result
        policy lets the agent have it, and the outcome to report."""
        request_id = request.id
        if self._closed is not None:
            return Frame.error(
                request_id,
                UPSTREAM_CLOSED,
                f"upstream MCP server {self._closed}; tools/call {call.tool!r} was not forwarded",
            ), (decision, False)
        call.forwarded = True
        self._track_progress(request)
        assert self._upstream is not None
        try:
            await self._upstream.send(request)
        except UpstreamClosed:
            return Frame.error(
                request_id,
                UPSTREAM_CLOSED,
                f"upstream MCP server {self._closed or 'is gone'}; "
                f"tools/call {call.tool!r} was not delivered",
            ), (decision, False)
        timeout = self.options.upstream_timeout
        if not call.arrived.is_set():
            with anyio.move_on_after(timeout) as waited:
                await call.arrived.wait()
            timed_out = waited.cancelled_caught
        else:
            timed_out = False
        answer = call.answer
        if answer is not None:
            self._untrack_progress(request_id)
            # The outcome is the upstream's: a result the policy blocks or redacts still
            # ran, so a success keeps its rate-limit slots (only a failure gives them back).
            succeeded = not call_failed(answer)
            return await self._checked(decide, decision, answer), (decision, succeeded)
        if timed_out:
            self._abandoned.add(id_key(request_id))
            self._untrack_progress(request_id)
            await self._to_upstream(
                Frame.notification(
                    "notifications/cancelled",
                    {"requestId": request_id, "reason": "timed out in mcp-policy proxy"},
                )
            )
            return Frame.error(
                request_id,
                UPSTREAM_TIMEOUT,
                f"upstream MCP server did not answer tools/call {call.tool!r} within "
                f"{timeout:g} s; the call was cancelled",
            ), (decision, False)
        return Frame.error(
            request_id,
            UPSTREAM_CLOSED,
            f"upstream MCP server {self._closed} before answering tools/call {call.tool!r}",
        ), (decision, False)

    # The result policy.

    async def _checked(self, decide: DecideRequest, decision: Decision, answer: Frame) -> Frame:
        """The upstream's `answer` to an allowed call, as the result policy lets the agent
        have it (see the module's docstring). Never the answer unless the policy passed it
        (or the policy runs as a dry run)."""
        request_id = answer.id
        dry_run = self.options.result_policy == RESULT_DRY_RUN
        result = tool_result_of(answer)
        checked = await self._decide_result(decide, decision, result, dry_run)
        if dry_run:
            if isinstance(checked, ResultDecision):
                log.info(
                    "result of tools/call %.80r: %s (%s), forwarded as it came (dry run)",
                    request_id,
                    checked.action.value,
                    checked.rule,
                )
            else:  # nothing to enforce either way: said, and forwarded
                log.warning(
                    "result of tools/call %.80r not checked (dry run): %s",
                    request_id,
                    checked[1],
                )
            return answer
        if isinstance(checked, tuple):
            return self._result(request_id, result_refusal(*checked))
        if checked.action is ResultAction.PASS:
            return answer
        replacement = checked.result
        if not isinstance(replacement, dict):
            # A redact or block with nothing to hand on: the service's answer is broken.
            reason = f"the result policy answered {checked.action.value} without a result"
            return self._result(request_id, result_refusal(RULE_RESULT_UNAVAILABLE, reason))
        if checked.action is ResultAction.BLOCK:
            return self._result(request_id, replacement)
        return Frame.response(request_id, replacement)

    async def _decide_result(
        self, decide: DecideRequest, decision: Decision, result: dict[str, Any], dry_run: bool
    ) -> ResultDecision | tuple[str, str]:
        """The result decision on `result`, or (rule, reason) when it cannot be had."""
        try:
            request = DecideResultRequest(
                server=decide.server,
                message=decide.message,
                principal=decide.principal,
                context=decide.context,
                decision_id=decision.decision_id or None,
                result=result,
                dry_run=dry_run,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            log.warning("a tool result the result policy cannot take: %s: %s", where, first["msg"])
            return RULE_RESULT_MALFORMED, f"the tool's result cannot be checked: {first['msg']}"
        try:
            with anyio.fail_after(RESULT_DECISION_TIMEOUT):
                identity = self.identity
                if identity is None:
                    return await self.decider.decide_result(request)
                return await self.decider.decide_result(request, identity)
        except InvalidRequest as exc:
            log.warning("a tool result the result policy refused to read: %s", exc.message)
            return RULE_RESULT_MALFORMED, f"the tool's result cannot be checked: {exc.message}"
        except EngineError as exc:
            log.error("no result decision: %s", exc.message)
            return RULE_RESULT_UNAVAILABLE, f"result policy unavailable: {exc.message}"
        except TimeoutError:
            log.error("no result decision within %g s", RESULT_DECISION_TIMEOUT)
            return (
                RULE_RESULT_UNAVAILABLE,
                f"result policy unavailable: no answer within {RESULT_DECISION_TIMEOUT:g} s",
            )
        except Exception:
            # The traceback is for the proxy's log; the agent learns nothing of its internals.
            log.exception("the result of a tools/call of %s could not be checked", decide.server)
            return RULE_RESULT_UNAVAILABLE, "result policy unavailable: internal proxy error"
