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
  is retried with that approval by the proxy itself; with `approval_wait` the proxy waits
  for a human before answering.

The core knows neither the transports (it gets message streams and an `Upstream`) nor
where decisions come from (a `Decider`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
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
)
from pydantic import ValidationError

from engine.errors import EngineError, InvalidRequest
from engine.identity.base import Identity
from engine.models import ApprovalStatus, DecideRequest, Decision, Principal, Verdict
from engine.proxy.decider import Decider
from engine.proxy.listing import ToolFilter
from engine.service import mcp_result
from engine.settings import Settings
from engine.translate import proven_principal

log = logging.getLogger(__name__)

APPROVAL_META_KEY = "mcp-policy/approval_id"
RULE_DECISION_UNAVAILABLE = "proxy.decision_unavailable"
RULE_SERVER_UNKNOWN = "proxy.server_unknown"
# JSON-RPC codes of the proxy's own errors (the implementation-defined range).
UPSTREAM_CLOSED = -32000
UPSTREAM_TIMEOUT = REQUEST_TIMEOUT  # -32001
REPORT_TIMEOUT = 10.0


@dataclass(frozen=True)
class ProxyOptions:
    """How one proxy behaves; the same for every session it serves."""

    server_name: str | None = None
    agent_id: str | None = None
    user_id: str | None = None
    approval_wait: float = 0.0
    approval_poll: float = 0.5
    upstream_timeout: float = 60.0
    filter_tools: bool = True
    # Messages nested deeper are refused (the service's default; --embedded: its setting).
    max_json_depth: int = int(Settings.model_fields["max_json_depth"].default)


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


class Upstream(Protocol):
    """One connection to the real MCP server (a child over stdio, or a URL)."""

    @property
    def messages(self) -> AsyncIterable[SessionMessage | Exception]:
        """What the server sends; ends when the server is gone."""
        ...

    async def send(self, message: JSONRPCMessage) -> None:
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


def call_failed(answer: JSONRPCResponse | JSONRPCError) -> bool:
    """Whether an upstream answer to tools/call counts as failed for the rate limits.

    A JSON-RPC error or `isError: true` failed. An `input_required` result (protocol
    2026-07-28) is not a finished call either: the client retries it as a new tools/call,
    which is decided and counted on its own.
    """
    if isinstance(answer, JSONRPCError):
        return True
    result = answer.result
    return result.get("isError") is True or result.get("resultType") == "input_required"


@dataclass
class _Call:
    """One tools/call from the agent, from decision to answer."""

    request: JSONRPCRequest
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    forwarded: bool = False
    answered: bool = False
    answer: JSONRPCResponse | JSONRPCError | None = None
    arrived: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)

    @property
    def tool(self) -> str:
        name = (self.request.params or {}).get("name")
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
        self._calls: dict[RequestId, _Call] = {}
        self._pending: dict[RequestId, str] = {}
        self._abandoned: set[RequestId] = set()
        self._listings: dict[RequestId, anyio.Event] = {}
        self._progress: dict[str | int, RequestId] = {}
        self._closed: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._agent: MessageWriter | None = None
        self._upstream: Upstream | None = None

    @property
    def principal(self) -> Principal:
        """Who the session's calls are from: what its identity proves when it has one
        (the session id stays this session's), else what the options assert."""
        return proven_principal(self._asserted, self.identity)

    async def run(
        self,
        agent_messages: AsyncIterable[SessionMessage | Exception],
        agent: MessageWriter,
        upstream: Upstream,
    ) -> None:
        """Relay until the agent or the upstream goes away.

        When the upstream goes first, every request still waiting for it is answered with
        a JSON-RPC error before this returns.
        """
        self._agent = agent
        self._upstream = upstream
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._from_upstream, upstream)
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._from_agent(agent_messages)
            tg.cancel_scope.cancel()

    # Agent → upstream.

    async def _from_agent(self, messages: AsyncIterable[SessionMessage | Exception]) -> None:
        async for item in messages:
            if isinstance(item, MalformedMessage):
                log.warning("malformed message from the agent: %s", item.error.message)
                await self._to_agent(
                    JSONRPCError(jsonrpc="2.0", id=item.request_id, error=item.error)
                )
                continue
            if isinstance(item, Exception):
                log.warning("agent transport error: %s", item)
                continue
            message = item.message
            if isinstance(message, JSONRPCRequest):
                # A new request owns its id: a late answer to an abandoned one is not it.
                self._abandoned.discard(message.id)
                if message.id in self._calls or message.id in self._pending:
                    await self._to_agent(
                        error_response(
                            message.id,
                            INVALID_REQUEST,
                            f"request id {message.id!r} is already in use by a request "
                            "that has not been answered",
                        )
                    )
                    continue
                if message.method == "tools/call":
                    self._start_call(message)
                    continue
                self._pending[message.id] = message.method
                self._track_progress(message)
            elif isinstance(message, JSONRPCNotification):
                if message.method == "tools/call":
                    # Last guard (the transports screen these out already): a tools/call
                    # without a usable id could be neither decided nor answered.
                    log.warning("refused a tools/call sent as a notification (no usable id)")
                    await self._to_agent(
                        error_response(
                            None,
                            INVALID_REQUEST,
                            "Invalid Request: tools/call must be a request with an id (a "
                            "string or an integer); sent as a notification it is neither "
                            "decided nor relayed",
                        )
                    )
                    continue
                if message.method == "notifications/cancelled" and self._cancel_call(message):
                    continue
            await self._to_upstream(message)

    async def _to_upstream(self, message: JSONRPCMessage) -> None:
        assert self._upstream is not None
        try:
            if self._closed is not None:
                raise UpstreamClosed(self._closed)
            await self._upstream.send(message)
        except UpstreamClosed:
            if isinstance(message, JSONRPCRequest):
                self._pending.pop(message.id, None)
                await self._to_agent(
                    error_response(
                        message.id,
                        UPSTREAM_CLOSED,
                        f"upstream MCP server {self._closed or 'is gone'}; "
                        f"{message.method} was not delivered",
                    )
                )

    def _cancel_call(self, notification: JSONRPCNotification) -> bool:
        """A cancellation for a call still being decided stops it here (no answer is due);
        one for a forwarded call goes upstream. Returns whether it was consumed here."""
        request_id = (notification.params or {}).get("requestId")
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            return False
        call = self._calls.get(request_id)
        if call is None:
            return False
        if call.forwarded:
            # The agent no longer waits; the call may still have run, so its slot stays
            # used (no outcome report).
            call.answered = True
            self._abandoned.add(request_id)
            call.scope.cancel()
            return False
        call.answered = True
        call.scope.cancel()
        return True

    # Upstream → agent.

    async def _from_upstream(self, upstream: Upstream) -> None:
        async for item in upstream.messages:
            if isinstance(item, Exception):
                log.warning("upstream sent something that is not JSON-RPC: %s", item)
                continue
            message = item.message
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id is not None:
                call = self._calls.get(message.id)
                if call is not None and call.forwarded:
                    call.answer = message
                    call.arrived.set()
                    continue
                if message.id in self._abandoned:
                    self._abandoned.discard(message.id)
                    log.info("dropped the late upstream answer to request %r", message.id)
                    continue
                method = self._pending.pop(message.id, None)
                self._untrack_progress(message.id)
                if isinstance(message, JSONRPCResponse):
                    self._learn_from_meta(message)
                    if method == "initialize":
                        self._learn_initialize(message, upstream)
                    elif method == "server/discover":
                        self._learn_discover(message)
                    elif method == "tools/list" and self.tool_filter is not None:
                        assert self._tg is not None
                        done = self._listings[message.id] = anyio.Event()
                        self._tg.start_soon(self._send_filtered_list, message, done)
                        continue
            await self._to_agent(message, self._related(message))
        await self._upstream_ended(upstream.ended())

    def _learn_initialize(self, message: JSONRPCResponse, upstream: Upstream) -> None:
        version = message.result.get("protocolVersion")
        if isinstance(version, str):
            upstream.negotiated(version)
        info = message.result.get("serverInfo")
        if self.server_name is None and isinstance(info, dict):
            name = info.get("name")
            if isinstance(name, str) and name:
                self.server_name = name
                log.info("MCP server name from initialize: %s", name)

    def _learn_discover(self, message: JSONRPCResponse) -> None:
        self._learn_from_meta(message, "server/discover")

    def _learn_from_meta(self, message: JSONRPCResponse, where: str = "a result") -> None:
        """From protocol 2026-07-28 on, results carry the server's info in `_meta`: a
        client that never sends server/discover still names the server this way."""
        if self.server_name is not None:
            return
        meta = message.result.get("_meta")
        info = meta.get(SERVER_INFO_META_KEY) if isinstance(meta, dict) else None
        if isinstance(info, dict):
            name = info.get("name")
            if isinstance(name, str) and name:
                self.server_name = name
                log.info("MCP server name from %s: %s", where, name)

    async def _send_filtered_list(self, message: JSONRPCResponse, done: anyio.Event) -> None:
        assert self.tool_filter is not None
        try:
            result = message.result
            tools = result.get("tools")
            if isinstance(tools, list) and self.server_name is not None:
                names = [
                    tool["name"]
                    for tool in tools
                    if isinstance(tool, dict) and isinstance(tool.get("name"), str)
                ]
                hidden = await self.tool_filter.hidden(self.server_name, names, self.principal)
                if hidden:
                    kept = [
                        t for t in tools if not (isinstance(t, dict) and t.get("name") in hidden)
                    ]
                    result = {**result, "tools": kept}
                    log.info("tools/list: hid %s", ", ".join(sorted(hidden)))
            await self._to_agent(JSONRPCResponse(jsonrpc="2.0", id=message.id, result=result))
        finally:
            self._listings.pop(message.id, None)
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
                    error_response(
                        call.request.id,
                        UPSTREAM_CLOSED,
                        f"upstream MCP server {why}; tools/call {call.tool!r} was not forwarded",
                    )
                )
        for request_id, method in list(self._pending.items()):
            await self._to_agent(
                error_response(
                    request_id,
                    UPSTREAM_CLOSED,
                    f"upstream MCP server {why} before answering {method}",
                )
            )
        self._pending.clear()
        with anyio.move_on_after(REPORT_TIMEOUT):
            for call in forwarded:
                await call.finished.wait()
            for listing in list(self._listings.values()):
                await listing.wait()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _to_agent(
        self, message: JSONRPCMessage, metadata: ServerMessageMetadata | None = None
    ) -> None:
        assert self._agent is not None
        try:
            await self._agent.send(SessionMessage(message, metadata))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.debug("the agent is gone; dropped %s", type(message).__name__)

    # Progress notifications belong to their request's stream (streamable HTTP).

    def _track_progress(self, request: JSONRPCRequest) -> None:
        meta = (request.params or {}).get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        if isinstance(token, str | int) and not isinstance(token, bool):
            self._progress[token] = request.id

    def _untrack_progress(self, request_id: RequestId) -> None:
        for token, owner in list(self._progress.items()):
            if owner == request_id:
                del self._progress[token]

    def _related(self, message: JSONRPCMessage) -> ServerMessageMetadata | None:
        if isinstance(message, JSONRPCNotification) and message.method == "notifications/progress":
            token = (message.params or {}).get("progressToken")
            if isinstance(token, str | int) and token in self._progress:
                return ServerMessageMetadata(related_request_id=self._progress[token])
        return None

    # tools/call.

    def _start_call(self, request: JSONRPCRequest) -> None:
        call = _Call(request)
        self._calls[request.id] = call
        assert self._tg is not None
        self._tg.start_soon(self._run_call, call, name=f"tools/call {request.id!r}")

    async def _run_call(self, call: _Call) -> None:
        try:
            with call.scope:
                try:
                    answer, outcome = await self._handle_call(call)
                except Exception:
                    # The traceback is for the proxy's log; the agent learns nothing of
                    # the proxy's internals.
                    log.exception("tools/call %r failed in the proxy", call.request.id)
                    answer = error_response(call.request.id, INTERNAL_ERROR, "internal proxy error")
                    outcome = None
                # A failure gives its slots back before the agent hears of it, so a retry
                # at once finds them; a success is reported after answering.
                if outcome is not None and not outcome[1]:
                    await self._report(*outcome)
                if not call.answered:
                    call.answered = True
                    await self._to_agent(answer)
                if outcome is not None and outcome[1]:
                    await self._report(*outcome)
        finally:
            if self._calls.get(call.request.id) is call:
                del self._calls[call.request.id]
            call.finished.set()

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

    async def _handle_call(
        self, call: _Call
    ) -> tuple[JSONRPCMessage, tuple[Decision, bool] | None]:
        """Decide the call and forward it if allowed; the answer and the outcome to report."""
        request = call.request
        params = dict(request.params or {})
        approval_id: str | None = None
        meta = params.get("_meta")
        if isinstance(meta, dict) and APPROVAL_META_KEY in meta:
            meta = dict(meta)
            value = meta.pop(APPROVAL_META_KEY)
            if not isinstance(value, str) or not value:
                return error_response(
                    request.id,
                    INVALID_PARAMS,
                    f'params._meta["{APPROVAL_META_KEY}"] must be an approval id (a string)',
                ), None
            approval_id = value
            if meta:
                params["_meta"] = meta
            else:
                del params["_meta"]
        if self.server_name is None:
            reason = (
                "the proxy does not know the MCP server's name (the server did not report "
                "one); start the proxy with --server-name"
            )
            return self._result(request.id, refusal(RULE_SERVER_UNKNOWN, reason)), None
        evaluated = {key: params[key] for key in ("name", "arguments") if key in params}
        try:
            decide = DecideRequest(
                server=self.server_name,
                message={
                    "jsonrpc": "2.0",
                    "id": request.id,
                    "method": "tools/call",
                    "params": evaluated,
                },
                principal=self.principal,
                approval_id=approval_id,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            return error_response(request.id, INVALID_PARAMS, f"{where}: {first['msg']}"), None
        decision = await self._decide(decide)
        if isinstance(decision, JSONRPCError):
            return decision, None
        decision = await self._after_approval(decide, decision)
        if isinstance(decision, JSONRPCError):
            return decision, None
        if decision.verdict is not Verdict.ALLOW:
            return self._result(request.id, decision.mcp_result or mcp_result(decision)), None
        forwarded = JSONRPCRequest(jsonrpc="2.0", id=request.id, method="tools/call", params=params)
        return await self._forward(call, forwarded, decision)

    @staticmethod
    def _result(request_id: RequestId, result: dict[str, Any]) -> JSONRPCResponse:
        """A refusal as the JSON-RPC result. `resultType` is added as the SDK's servers
        always send it: required from protocol 2026-07-28 on, ignored before."""
        return JSONRPCResponse(
            jsonrpc="2.0", id=request_id, result={"resultType": "complete", **result}
        )

    async def _decide(self, request: DecideRequest) -> Decision | JSONRPCError:
        message = request.message
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            identity = self.identity
            if identity is None:  # (a Decider from before identities needs no change)
                return await self.decider.decide(request)
            return await self.decider.decide(request, identity)
        except InvalidRequest as exc:
            return error_response(request_id, INVALID_PARAMS, f"invalid tools/call: {exc.message}")
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
        self, request: DecideRequest, decision: Decision
    ) -> Decision | JSONRPCError:
        """approval_required: use a granted approval at once, or wait for a human."""
        approval = decision.approval
        if decision.verdict is not Verdict.APPROVAL_REQUIRED or approval is None:
            return decision
        retry = request.model_copy(update={"approval_id": approval.id})
        if approval.status is ApprovalStatus.APPROVED:
            # The identical call, approved and not used yet: the agent retried it.
            return await self._decide(retry)
        wait = self.options.approval_wait
        if wait <= 0:
            return decision
        deadline = anyio.current_time() + wait
        last = decision
        while (left := deadline - anyio.current_time()) > 0:
            await anyio.sleep(min(self.options.approval_poll, left))
            again = await self._decide(retry)
            if isinstance(again, JSONRPCError):
                return again
            if again.rule == RULE_DECISION_UNAVAILABLE:
                continue
            if again.verdict is not Verdict.APPROVAL_REQUIRED:
                return again
            last = again
        return last

    async def _forward(
        self, call: _Call, request: JSONRPCRequest, decision: Decision
    ) -> tuple[JSONRPCMessage, tuple[Decision, bool] | None]:
        if self._closed is not None:
            return error_response(
                request.id,
                UPSTREAM_CLOSED,
                f"upstream MCP server {self._closed}; tools/call {call.tool!r} was not forwarded",
            ), (decision, False)
        call.forwarded = True
        self._track_progress(request)
        assert self._upstream is not None
        try:
            await self._upstream.send(request)
        except UpstreamClosed:
            return error_response(
                request.id,
                UPSTREAM_CLOSED,
                f"upstream MCP server {self._closed or 'is gone'}; "
                f"tools/call {call.tool!r} was not delivered",
            ), (decision, False)
        timeout = self.options.upstream_timeout
        with anyio.move_on_after(timeout) as waited:
            await call.arrived.wait()
        answer = call.answer
        if answer is not None:
            self._untrack_progress(request.id)
            return answer, (decision, not call_failed(answer))
        if waited.cancelled_caught:
            self._abandoned.add(request.id)
            self._untrack_progress(request.id)
            await self._to_upstream(
                JSONRPCNotification(
                    jsonrpc="2.0",
                    method="notifications/cancelled",
                    params={"requestId": request.id, "reason": "timed out in mcp-policy proxy"},
                )
            )
            return error_response(
                request.id,
                UPSTREAM_TIMEOUT,
                f"upstream MCP server did not answer tools/call {call.tool!r} within "
                f"{timeout:g} s; the call was cancelled",
            ), (decision, False)
        return error_response(
            request.id,
            UPSTREAM_CLOSED,
            f"upstream MCP server {self._closed} before answering tools/call {call.tool!r}",
        ), (decision, False)
