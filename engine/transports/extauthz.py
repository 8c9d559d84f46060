"""Envoy ext_authz v3 (`envoy.service.auth.v3.Authorization/Check`) on the gRPC port.

Envoy (or any gateway speaking ext_authz) asks, for every request on an MCP route, whether
it may go through. The MCP message is read from `attributes.request.http` (Envoy must be
configured `with_request_body`); a JSON-RPC `tools/call` is screened with the service's
strict rules and decided by the one `DecisionService.decide()` (transport "extauthz").

Answers (never a gRPC error for a request that got this far, so Envoy's
`failure_mode_allow` never decides for us):

- allowed call, other MCP messages (initialize, tools/list, notifications, responses):
  OK; an allowed call carries `x-mcp-policy-decision-id` (and `x-mcp-policy-outcome-token`
  when it holds rate-limit slots) upstream, for the outcome report;
- refused call: denied, HTTP 200 with the JSON-RPC response for the call's id whose
  `result` is the decision's CallToolResult (`isError: true`);
- malformed JSON-RPC: denied, HTTP 400 with a JSON-RPC error (-32700, -32600, -32602);
- not MCP (not a JSON POST): `extauthz_non_mcp` (default deny, 403);
- a body Envoy did not send (no `with_request_body`) or cut short: denied, 403;
- an unauthenticated caller (same rules as Decide), or any unexpected fault: denied.

Who the call is from: the session is the `mcp-session-id` header, else one derived from
the agent's bearer token (its hash), else from the agent header, else from the peer
address. With agent credentials configured, the request's `Authorization: Bearer` is the
agent credential the service verifies; otherwise agent and user are the headers the
gateway sets after its own check (`extauthz_agent_header`, `extauthz_user_header`),
asserted by the authenticated gateway.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2  # type: ignore[import-untyped]
from envoy.service.auth.v3 import (  # type: ignore[import-untyped]
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from envoy.type.v3 import http_status_pb2  # type: ignore[import-untyped]
from google.rpc import code_pb2, status_pb2

from engine import jsonstrict, service
from engine.errors import InvalidRequest, Unauthenticated, bounded
from engine.identity.callers import bearer, gateway_session
from engine.models import DecideRequest, Decision, Verdict
from engine.runtime import Runtime
from engine.settings import Settings
from engine.translate import gateway_principal_verified, parse_tools_call
from engine.transports.tls import peer_identity

log = logging.getLogger(__name__)

SERVICE_NAME: str = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
TRANSPORT = "extauthz"
TOOLS_CALL = "tools/call"
DECISION_HEADER = "x-mcp-policy-decision-id"
OUTCOME_HEADER = "x-mcp-policy-outcome-token"
SESSION_HEADER = "mcp-session-id"
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
SERVER_EXTENSION = "mcp_server"
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
MAX_ID_CHARS = 256
NO_BODY = (
    "the request body was not sent to the policy service: configure the ext_authz filter "
    "with_request_body (max_request_bytes, allow_partial_message: false)"
)
PARTIAL_BODY = (
    "the request body reached the policy service cut short (allow_partial_message): raise "
    "with_request_body.max_request_bytes and set allow_partial_message: false"
)


@dataclass(frozen=True)
class HttpView:
    """What the check request says about the HTTP request, headers by lower-case name."""

    method: str
    path: str
    host: str
    headers: dict[str, str]
    body: bytes | None
    peer: str | None
    context_extensions: dict[str, str]


@dataclass(frozen=True)
class Call:
    """A screened tools/call: the parsed message and its id."""

    message: dict[str, Any]
    jsonrpc_id: str | int


@dataclass(frozen=True)
class Refusal:
    """A request answered without a decision (malformed, not MCP, no body)."""

    http_status: int
    body: dict[str, Any]
    reason: str


class Pass:
    """An MCP message that is not a tools/call: let it through."""


def http_view(check: Any) -> HttpView:
    """The HTTP request of a CheckRequest (pure)."""
    http = check.attributes.request.http
    headers = {key.lower(): value for key, value in http.headers.items()}
    for header in http.header_map.headers:  # Envoy's alternative form (raw values)
        value = header.value or header.raw_value.decode("utf-8", "replace")
        headers.setdefault(header.key.lower(), value)
    body: bytes | None = None
    if http.raw_body:
        body = bytes(http.raw_body)
    elif http.body:
        body = http.body.encode("utf-8", "surrogatepass")
    address = check.attributes.source.address.socket_address
    peer = f"{address.address}:{address.port_value}" if address.address else None
    return HttpView(
        method=http.method or headers.get(":method", ""),
        path=http.path or headers.get(":path", ""),
        host=http.host or headers.get(":authority", headers.get("host", "")),
        headers=headers,
        body=body,
        peer=peer,
        context_extensions=dict(check.attributes.context_extensions),
    )


def _json_rpc_error(code: int, message: str, request_id: str | int | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _usable_id(value: Any) -> str | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        return value
    if isinstance(value, int):
        return value
    return None


def _forbidden(reason: str) -> Refusal:
    return Refusal(403, {"error": "forbidden", "reason": reason}, reason)


def _is_json_media(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def screen(view: HttpView, settings: Settings) -> Call | Pass | Refusal:
    """Classify the request (pure): a tools/call to decide, a pass, or a refusal."""
    declared = view.headers.get("content-length", "0").strip() or "0"
    looks_json = view.body is not None and view.body.lstrip()[:1] in (b"{", b"[")
    mcp_post = view.method.upper() == "POST" and (
        _is_json_media(view.headers.get("content-type", "")) or looks_json
    )
    if not mcp_post:
        if settings.extauthz_non_mcp == "allow":
            return Pass()
        return _forbidden(
            f"{bounded(view.method, 16)} {bounded(view.path, 200)} is not an MCP JSON-RPC "
            "POST, and extauthz_non_mcp is deny"
        )
    if view.headers.get(PARTIAL_BODY_HEADER, "").lower() == "true":
        return _forbidden(PARTIAL_BODY)
    if view.body is None:
        if declared != "0" or "transfer-encoding" in view.headers:
            return _forbidden(NO_BODY)
        body = b""
    else:
        body = view.body
    try:
        value = jsonstrict.loads(body, max_depth=settings.max_json_depth, what="message")
    except InvalidRequest as exc:
        return Refusal(
            400,
            _json_rpc_error(PARSE_ERROR, f"Parse error: {bounded(exc.message, 160)}"),
            exc.message,
        )
    return screen_value(value)


def screen_value(value: Any) -> Call | Pass | Refusal:
    """A strictly parsed body as one JSON-RPC message (pure)."""

    def invalid(message: str, request_id: str | int | None = None) -> Refusal:
        return Refusal(400, _json_rpc_error(INVALID_REQUEST, message, request_id), message)

    if isinstance(value, list):
        return invalid(
            "Invalid Request: JSON-RPC batches are not supported (MCP removed them in "
            "2025-06-18); send one message at a time"
        )
    if not isinstance(value, dict) or value.get("jsonrpc") != "2.0":
        return invalid('Invalid Request: not a JSON-RPC 2.0 message (needs "jsonrpc": "2.0")')
    request_id = _usable_id(value.get("id"))
    if "method" not in value:  # a response from the client
        if "id" in value and ("result" in value) != ("error" in value):
            return Pass()
        return invalid("Invalid Request: not a JSON-RPC 2.0 request, notification or response")
    method = value["method"]
    if "result" in value or "error" in value:
        return invalid(
            'Invalid Request: a message has either a "method" or a "result"/"error", not both',
            request_id,
        )
    if not isinstance(method, str):
        return invalid("Invalid Request: `method` must be a string", request_id)
    if "id" in value and request_id is None:
        return invalid(
            "Invalid Request: a request's id must be a string or an integer (never null), "
            "and a notification has no id"
        )
    if method != TOOLS_CALL:
        return Pass()
    if request_id is None:
        return invalid(
            "Invalid Request: tools/call must be a request with an id (a string or an "
            "integer); sent as a notification it is neither decided nor relayed"
        )
    try:
        parse_tools_call(value, server="-")
    except InvalidRequest as exc:
        return Refusal(
            400,
            _json_rpc_error(
                INVALID_PARAMS, f"Invalid params: {bounded(exc.message, 200)}", request_id
            ),
            exc.message,
        )
    return Call(message=value, jsonrpc_id=request_id)


def server_for(view: HttpView, settings: Settings) -> str:
    """The MCP server: the route's context extension, the host mapping, or the host."""
    named = view.context_extensions.get(SERVER_EXTENSION)
    if named:
        return named
    mapping = {key.lower(): value for key, value in settings.extauthz_servers.items()}
    host = view.host.lower()
    for key in (host, host.rsplit(":", 1)[0]):  # with its port, then without
        mapped = mapping.get(key)
        if mapped:
            return mapped
    return view.host or "unknown"


def decide_request(
    view: HttpView, call: Call, settings: Settings, *, credentials_configured: bool
) -> DecideRequest:
    """The DecideRequest for a screened tools/call (pure); InvalidRequest when it can't be."""
    credential = bearer(view.headers.get("authorization")) if credentials_configured else None
    agent = view.headers.get(settings.extauthz_agent_header.lower()) or None
    user = view.headers.get(settings.extauthz_user_header.lower()) or None
    peer = view.peer.rsplit(":", 1)[0] if view.peer is not None else None
    session = gateway_session(
        view.headers.get(SESSION_HEADER), credential=credential, agent=agent, peer=peer
    )
    fields: dict[str, Any] = {
        "server": server_for(view, settings),
        "message": call.message,
        "principal": {"session_id": session, "agent_id": agent, "user_id": user},
    }
    if credential is not None:
        fields["credential"] = credential
    fields["principal_verified"] = gateway_principal_verified(fields["principal"])
    try:
        return DecideRequest.model_validate(fields)
    except ValueError as exc:
        raise InvalidRequest(f"the call cannot be decided: {bounded(str(exc), 200)}") from exc


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def ok_response(decision: Decision | None = None) -> Any:
    """OK; for an allowed call, the decision id (and outcome token) go upstream (pure)."""
    ok = external_auth_pb2.OkHttpResponse()
    if decision is not None:
        ok.headers.append(_header(DECISION_HEADER, decision.decision_id))
        if decision.outcome_token:
            ok.headers.append(_header(OUTCOME_HEADER, decision.outcome_token))
    else:  # nothing the agent sent passes as if it came from a decision
        ok.headers_to_remove.extend([DECISION_HEADER, OUTCOME_HEADER])
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK), ok_response=ok
    )


def denied_response(
    http_status: int,
    body: dict[str, Any],
    reason: str,
    code: int = code_pb2.PERMISSION_DENIED,
) -> Any:
    """Denied: Envoy answers the client with `body` as JSON and does not forward (pure)."""
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=bounded(reason, 1024)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),
            headers=[_header("content-type", "application/json")],
            body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        ),
    )


def refused_response(decision: Decision, jsonrpc_id: str | int) -> Any:
    """A refused call: HTTP 200, the JSON-RPC response whose result is the refusal (pure)."""
    result = dict(decision.mcp_result or service.mcp_result(decision))
    result["resultType"] = "complete"
    body = {"jsonrpc": "2.0", "id": jsonrpc_id, "result": result}
    return denied_response(200, body, f"{decision.verdict.value}: {decision.reason}")


def check_response(decision: Decision, call: Call) -> Any:
    """Decision → CheckResponse (pure)."""
    if decision.verdict is Verdict.ALLOW:
        return ok_response(decision)
    return refused_response(decision, call.jsonrpc_id)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            return await self._check(request, context)
        except Exception:  # noqa: BLE001 - fail closed, never OK
            log.exception("internal error in an ext_authz Check")
            reason = "internal error; the service log has the cause"
            return denied_response(
                500, _json_rpc_error(INTERNAL_ERROR, reason), reason, code_pb2.INTERNAL
            )

    async def _check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        runtime = self._runtime
        metadata = dict(context.invocation_metadata() or ())
        try:
            caller = runtime.decision_clients.authenticate(
                metadata.get("authorization"), peer_identity(context)
            )
        except Unauthenticated as exc:
            runtime.metrics.unauthenticated_callers.labels(TRANSPORT).inc()
            reason = f"the ext_authz caller is not authenticated: {exc.message}"
            return denied_response(
                403,
                {"error": "unauthenticated", "reason": reason},
                reason,
                code_pb2.UNAUTHENTICATED,
            )
        view = http_view(request)  # undecodable bytes never get here (StrictDecoding)
        screened = screen(view, runtime.settings)
        if isinstance(screened, Pass):
            return ok_response()
        if isinstance(screened, Refusal):
            if screened.http_status == 400:
                runtime.metrics.invalid_requests.labels(TRANSPORT).inc()
            return denied_response(screened.http_status, screened.body, screened.reason)
        try:
            parsed = decide_request(
                view,
                screened,
                runtime.settings,
                credentials_configured=runtime.service.credentials.configured,
            )
            decision = await runtime.service.decide(parsed, transport=TRANSPORT, asserted_by=caller)
        except InvalidRequest as exc:
            runtime.metrics.invalid_requests.labels(TRANSPORT).inc()
            message = f"Invalid Request: {bounded(exc.message, 200)}"
            return denied_response(
                400, _json_rpc_error(INVALID_REQUEST, message, screened.jsonrpc_id), message
            )
        try:
            return check_response(decision, screened)
        except BaseException:
            await runtime.service.abandon(decision)  # never delivered
            raise


def add_to_server(runtime: Runtime, server: grpc.aio.Server) -> None:
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(runtime), server
    )
