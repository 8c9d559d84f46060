"""Gateway protocols on the HTTP port: forward-auth checks and the AuthZEN 1.0 API.

Both are thin, like every transport: each call they decide is one `service.decide()`,
so limits taken and approvals opened behave exactly as with `POST /v1/decide`.

**Forward-auth** (`/v1/check`, any method, any path below it): Traefik's `forwardAuth`
(with `forwardBody: true`) and Envoy's HTTP `ext_authz` (with `with_request_body`;
`path_prefix: /v1/check`, Envoy appends the original path and keeps the original method)
send the original request's headers and body. A JSON-RPC `tools/call` is decided:

- server: the `X-MCP-Server` header when the gateway sets it, else `gateway_servers`
  by forwarded host (`X-Forwarded-Host`, else `Host`; with or without its port), else
  that host itself;
- session: `Mcp-Session-Id`, else one derived from the agent's credential, the agent the
  gateway names, or the client's address (`identity.callers.gateway_session`);
- agent: the agent's `Authorization: Bearer` token is verified as the decision's
  `credential` when the service verifies agent credentials; otherwise (or without a
  token) agent, user and roles are what the gateway asserts in `X-MCP-Agent-Id`,
  `X-MCP-User-Id` and `X-MCP-Roles` (comma-separated) after its own check. The gateway
  must set or strip these headers and `X-MCP-Server` itself: whatever arrives with the
  original request is believed (marked `asserted_by` the gateway, never authenticated).

Answers: 200 with `X-MCP-Policy-Decision-Id` (and `X-MCP-Policy-Outcome-Token` when the
decision has one) lets the call through; a refusal answers `gateway_refusal_status`
(403 by default) with the JSON-RPC response for the call's id carrying the decision's
`mcp_result`; a malformed JSON-RPC message answers 400 with a JSON-RPC error; any
other MCP message (initialize, tools/list, notifications, responses) answers 200; a
request with no body or a body that is not JSON-RPC answers as `gateway_non_mcp` says
(deny: 403). The gateway's `Authorization` header is the agent's, so the gateway proves
itself by its TLS client certificate or `X-MCP-Policy-Client: <client token>`.

The HTTP guard (guard.py) sees these requests first, as every other: Host and Origin
are checked, but a forward-auth body is the original request's (any content type), and
a check carrying `X-Forwarded-Host` is a gateway's, its `Origin` the original request's.
Envoy's HTTP ext_authz keeps the original Host: where Host is checked, that host must be
in `allowed_hosts`.

**AuthZEN** (`POST /access/v1/evaluation`, `POST /access/v1/evaluations`,
`GET /.well-known/authzen-configuration`): subject `{type: "agent", id, properties:
{session_id, user_id?, roles?}}`, action `{name: "tools/call"}`, resource `{type:
"mcp_tool", id: "<server>/<tool>"}` (split at the last "/": tool names never hold one),
context `{arguments?, approval_id?, dry_run?, …}` (other context keys reach the policy
as `input.context`). Callers authenticate as on `/v1/decide`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from engine import jsonstrict, translate
from engine.errors import InvalidRequest, RequestTooLarge, Unauthenticated, from_validation
from engine.identity.callers import bearer, gateway_session
from engine.models import DecideRequest, Decision, Verdict
from engine.runtime import Runtime
from engine.service import mcp_result
from engine.transports.http_app import error_response
from engine.transports.http_app import read_body as read_request_body
from engine.transports.tls import current_peer

FORWARD_AUTH = "forward-auth"
FORWARD_AUTH_PATH = "/v1/check"
AUTHZEN = "authzen"
DECISION_HEADER = "X-MCP-Policy-Decision-Id"
OUTCOME_HEADER = "X-MCP-Policy-Outcome-Token"
CLIENT_HEADER = "x-mcp-policy-client"
OTHER_METHODS = ["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")
MAX_EVALUATIONS = 256
# DecideRequest fields by their AuthZEN names, for error messages.
AUTHZEN_FIELDS = (
    ("principal.agent_id", "subject.id"),
    ("principal.session_id", "subject.properties.session_id"),
    ("principal.user_id", "subject.properties.user_id"),
    ("principal.roles", "subject.properties.roles"),
    ("principal", "subject"),
    ("server", "resource.id"),
    ("tool", "resource.id"),
    ("arguments", "context.arguments"),
    ("approval_id", "context.approval_id"),
    ("dry_run", "context.dry_run"),
)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602


class _NotMcp(Exception):
    """The request carries no MCP message; `reason` says what it carries instead."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def add_gateway_routes(app: FastAPI, runtime: Runtime) -> None:
    settings = runtime.settings
    service = runtime.service

    def authenticate(authorization: str | None) -> str | None:
        try:
            return runtime.decision_clients.authenticate(authorization, current_peer())
        except Unauthenticated:
            runtime.metrics.unauthenticated_callers.labels("http").inc()
            raise

    async def read_body(request: Request) -> bytes:
        return await read_request_body(request, settings.max_body_bytes)

    def invalid(exc: InvalidRequest) -> JSONResponse:
        runtime.metrics.invalid_requests.labels("http").inc()
        return error_response(400, "InvalidRequest", exc.message, field=exc.field)

    # ---- forward-auth ---------------------------------------------------------------

    def forwarded_host(request: Request) -> str:
        host = request.headers.get("x-forwarded-host") or request.headers.get("host") or ""
        return host.split(",")[0].strip()

    def server_for(request: Request) -> str:
        named = request.headers.get("x-mcp-server")
        if named:
            return named
        host = forwarded_host(request)
        mapped = settings.gateway_servers.get(host)
        if mapped is None and ":" in host and not host.endswith("]"):
            mapped = settings.gateway_servers.get(host.rsplit(":", 1)[0])
        return mapped if mapped is not None else host

    def jsonrpc_error(jsonrpc_id: Any, code: int, message: str) -> JSONResponse:
        runtime.metrics.invalid_requests.labels("http").inc()
        body = {"jsonrpc": "2.0", "id": jsonrpc_id, "error": {"code": code, "message": message}}
        return JSONResponse(body, status_code=400)

    def not_mcp(reason: str) -> Response:
        if settings.gateway_non_mcp == "allow":
            return Response(status_code=200)
        return error_response(403, "NotMcp", f"{reason}; only MCP JSON-RPC requests pass")

    def mcp_message(body: bytes, content_type: str) -> Any:
        """The parsed JSON-RPC message; _NotMcp when the body is not one."""
        if not body.strip():
            raise _NotMcp(
                "the request has no body (is forwardBody / with_request_body set on the gateway?)"
            )
        looks_json = body.lstrip()[:1] in (b"{", b"[") or "json" in content_type.lower()
        if not looks_json:
            raise _NotMcp("the request body is not JSON")
        message = jsonstrict.loads(body, max_depth=settings.max_json_depth, what="message")
        if isinstance(message, dict) and "jsonrpc" not in message and "method" not in message:
            raise _NotMcp("the request body is not a JSON-RPC message")
        return message

    def envoy_uri(request: Request, rest: str) -> str:
        query = request.url.query
        return "/" + rest + (f"?{query}" if query else "")

    def principal_from(request: Request, credential: str | None) -> dict[str, Any]:
        agent = request.headers.get("x-mcp-agent-id")
        principal: dict[str, Any] = {
            "session_id": gateway_session(
                request.headers.get("mcp-session-id"),
                credential=credential,
                agent=agent,
                peer=request.client.host if request.client else None,
            )
        }
        user = request.headers.get("x-mcp-user-id")
        roles = request.headers.get("x-mcp-roles")
        if agent:
            principal["agent_id"] = agent
        if user:
            principal["user_id"] = user
        if roles:
            principal["roles"] = [r.strip() for r in roles.split(",") if r.strip()]
        return principal

    async def check(request: Request, rest: str = "") -> Response:
        client = request.headers.get(CLIENT_HEADER)
        if client is not None and bearer(client) is None:
            client = f"Bearer {client.strip()}"
        caller = authenticate(client)
        body = await read_body(request)
        try:
            message = mcp_message(body, request.headers.get("content-type", ""))
        except _NotMcp as exc:
            return not_mcp(exc.reason)
        except InvalidRequest as exc:
            return jsonrpc_error(None, PARSE_ERROR, exc.message)
        jsonrpc_id = message.get("id") if isinstance(message, dict) else None
        if isinstance(jsonrpc_id, bool) or not isinstance(jsonrpc_id, str | int):
            jsonrpc_id = None
        if isinstance(message, list):
            return jsonrpc_error(
                None, INVALID_REQUEST, "JSON-RPC batches were removed from MCP (2025-06-18)"
            )
        if not isinstance(message, dict):
            return jsonrpc_error(None, INVALID_REQUEST, "a JSON-RPC message must be an object")
        if message.get("method") != translate.TOOLS_CALL:
            if message.get("jsonrpc") != "2.0":
                return jsonrpc_error(jsonrpc_id, INVALID_REQUEST, '`jsonrpc` must be "2.0"')
            return Response(status_code=200)  # not a tool call: nothing to decide
        server = server_for(request)
        try:
            translate.parse_tools_call(message, server=server)
            token = bearer(request.headers.get("authorization"))
            credential = token if service.credentials.configured else None
            fields: dict[str, Any] = {
                "server": server,
                "message": message,
                "principal": principal_from(request, credential),
                "context": {
                    "http": {
                        "method": request.headers.get("x-forwarded-method") or request.method,
                        "host": forwarded_host(request),
                        "uri": request.headers.get("x-forwarded-uri") or envoy_uri(request, rest),
                    }
                },
            }
            if credential is not None:
                fields["credential"] = credential
            # Principal headers are what the gateway proved (its own token check): believed
            # only from a gateway this service knows (translate.gateway_principal_verified).
            fields["principal_verified"] = translate.gateway_principal_verified(fields["principal"])
            try:
                decide_request = DecideRequest.model_validate(fields)
            except ValidationError as exc:
                raise from_validation(exc) from exc
            decision = await service.decide(
                decide_request, transport=FORWARD_AUTH, asserted_by=caller
            )
        except InvalidRequest as exc:
            params = (exc.field or "").startswith("message.params")
            code = INVALID_PARAMS if params else INVALID_REQUEST
            where = f" ({exc.field})" if exc.field else ""
            return jsonrpc_error(jsonrpc_id, code, exc.message + where)
        try:
            return forward_answer(decision, jsonrpc_id)
        except BaseException:
            await service.abandon(decision)
            raise

    def forward_answer(decision: Decision, jsonrpc_id: Any) -> Response:
        headers = {DECISION_HEADER: decision.decision_id}
        if decision.verdict == Verdict.ALLOW:
            if decision.outcome_token:
                headers[OUTCOME_HEADER] = decision.outcome_token
            return Response(status_code=200, headers=headers)
        result = {**(decision.mcp_result or mcp_result(decision)), "resultType": "complete"}
        body = {"jsonrpc": "2.0", "id": jsonrpc_id, "result": result}
        return JSONResponse(body, status_code=settings.gateway_refusal_status, headers=headers)

    # POST is documented; the other methods (Envoy keeps the original one) are the same
    # check, left out of the OpenAPI document (one operation id per route there).
    async def check_root(request: Request) -> Response:
        return await check(request)

    async def check_path(rest: str, request: Request) -> Response:
        return await check(request, rest)

    for path, endpoint, summary in (
        (FORWARD_AUTH_PATH, check_root, "Forward-auth check of a proxied MCP request (Traefik)"),
        (
            FORWARD_AUTH_PATH + "/{rest:path}",
            check_path,
            "Forward-auth check, original path appended (Envoy)",
        ),
    ):
        app.add_api_route(path, endpoint, methods=["POST"], summary=summary)
        app.add_api_route(path, endpoint, methods=OTHER_METHODS, include_in_schema=False)

    # ---- AuthZEN 1.0 ----------------------------------------------------------------

    async def read_object(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        raw = jsonstrict.loads(body, max_depth=settings.max_json_depth)
        if not isinstance(raw, dict):
            raise InvalidRequest("request body must be a JSON object")
        return raw

    def obj(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise InvalidRequest(f"`{where}` must be an object", field=where)
        for key in value:
            if key not in allowed:
                raise InvalidRequest(
                    f"`{where}` has an unknown member {jsonstrict.quote(key)}; "
                    f"known: {', '.join(sorted(allowed))}",
                    field=f"{where}.{key}"[:256],
                )
        return value

    def text(value: Any, where: str, *, required: bool = True) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"`{where}` must be a non-empty string", field=where)
        return value

    def evaluation_request(item: dict[str, Any], where: str) -> DecideRequest:
        """One AuthZEN evaluation as a DecideRequest; InvalidRequest naming the field."""
        for part in ("subject", "action", "resource"):
            if part not in item:
                raise InvalidRequest(f"`{where}{part}` is required", field=f"{where}{part}")
        subject = obj(item["subject"], f"{where}subject", {"type", "id", "properties"})
        if subject.get("type") != "agent":
            raise InvalidRequest(
                f'`{where}subject.type` must be "agent"', field=f"{where}subject.type"
            )
        agent_id = text(subject.get("id"), f"{where}subject.id")
        props = obj(
            subject.get("properties", {}),
            f"{where}subject.properties",
            {"session_id", "user_id", "roles"},
        )
        session_id = text(props.get("session_id"), f"{where}subject.properties.session_id")
        user_id = text(props.get("user_id"), f"{where}subject.properties.user_id", required=False)
        roles = props.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidRequest(
                f"`{where}subject.properties.roles` must be a list of strings",
                field=f"{where}subject.properties.roles",
            )
        action = obj(item["action"], f"{where}action", {"name", "properties"})
        if action.get("name") != translate.TOOLS_CALL:
            raise InvalidRequest(
                f'`{where}action.name` must be "{translate.TOOLS_CALL}"',
                field=f"{where}action.name",
            )
        resource = obj(item["resource"], f"{where}resource", {"type", "id", "properties"})
        if resource.get("type") != "mcp_tool":
            raise InvalidRequest(
                f'`{where}resource.type` must be "mcp_tool"', field=f"{where}resource.type"
            )
        resource_id = text(resource.get("id"), f"{where}resource.id") or ""
        server, slash, tool = resource_id.rpartition("/")
        if not slash or not server or not tool:
            raise InvalidRequest(
                f'`{where}resource.id` must be "<server>/<tool>"', field=f"{where}resource.id"
            )
        context = item.get("context", {})
        if not isinstance(context, dict):
            raise InvalidRequest(f"`{where}context` must be an object", field=f"{where}context")
        context = dict(context)
        arguments = context.pop("arguments", {})
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"`{where}context.arguments` must be an object", field=f"{where}context.arguments"
            )
        approval_id = text(
            context.pop("approval_id", None), f"{where}context.approval_id", required=False
        )
        dry_run = context.pop("dry_run", False)
        if not isinstance(dry_run, bool):
            raise InvalidRequest(
                f"`{where}context.dry_run` must be true or false", field=f"{where}context.dry_run"
            )
        principal: dict[str, Any] = {"agent_id": agent_id, "session_id": session_id}
        if user_id is not None:
            principal["user_id"] = user_id
        principal["roles"] = roles
        fields: dict[str, Any] = {
            "server": server,
            "tool": tool,
            "arguments": arguments,
            "principal": principal,
            "approval_id": approval_id,
            "dry_run": dry_run,
            "context": context,
        }
        # Everything the service would refuse is refused here, before any evaluation of
        # a batch has taken anything, and named as AuthZEN spells it.
        try:
            try:
                decide_request = DecideRequest.model_validate(fields)
            except ValidationError as exc:
                raise from_validation(exc) from exc
            translate.tool_call(decide_request, max_depth=settings.max_json_depth)
        except InvalidRequest as exc:
            field = where + authzen_field(exc.field) if exc.field else None
            raise InvalidRequest(exc.message, field=field) from exc
        return decide_request

    def authzen_field(field: str) -> str:
        for ours, theirs in AUTHZEN_FIELDS:
            if field == ours or field.startswith((ours + ".", ours + "[")):
                return theirs + field[len(ours) :]
        return field

    def evaluation_answer(decision: Decision) -> dict[str, Any]:
        context: dict[str, Any] = {
            "reason": decision.reason,
            "rule": decision.rule,
            "decision_id": decision.decision_id,
            "verdict": decision.verdict.value,
            "policy_revision": decision.policy_revision,
        }
        extra = decision.model_dump(
            mode="json",
            include={"rate_limit", "approval", "outcome_token", "dry_run"},
            exclude_none=True,
        )
        context.update(extra)
        return {"decision": decision.verdict == Verdict.ALLOW, "context": context}

    async def deliver(decisions: list[Decision], body: dict[str, Any]) -> Response:
        try:
            return JSONResponse(body)
        except BaseException:
            for decision in decisions:
                await service.abandon(decision)
            raise

    @app.post("/access/v1/evaluation", summary="AuthZEN 1.0 Access Evaluation")
    async def evaluation(request: Request) -> Response:
        caller = authenticate(request.headers.get("authorization"))
        try:
            raw = await read_object(request)
            obj(raw, "request body", {"subject", "action", "resource", "context"})
            decide_request = evaluation_request(raw, "")
            decision = await service.decide(decide_request, transport=AUTHZEN, asserted_by=caller)
        except RequestTooLarge:
            raise
        except InvalidRequest as exc:
            return invalid(exc)
        return await deliver([decision], evaluation_answer(decision))

    @app.post("/access/v1/evaluations", summary="AuthZEN 1.0 Access Evaluations (batch)")
    async def evaluations(request: Request) -> Response:
        caller = authenticate(request.headers.get("authorization"))
        try:
            raw = await read_object(request)
            obj(
                raw,
                "request body",
                {"subject", "action", "resource", "context", "evaluations", "options"},
            )
            options = obj(raw.get("options", {}), "options", {"evaluations_semantic"})
            semantic = options.get("evaluations_semantic", "execute_all")
            if semantic not in SEMANTICS:
                raise InvalidRequest(
                    f"`options.evaluations_semantic` must be one of {', '.join(SEMANTICS)}",
                    field="options.evaluations_semantic",
                )
            items = raw.get("evaluations")
            if not isinstance(items, list) or not items:
                raise InvalidRequest("`evaluations` must be a non-empty list", field="evaluations")
            if len(items) > MAX_EVALUATIONS:
                raise InvalidRequest(
                    f"`evaluations` has {len(items)} items; at most {MAX_EVALUATIONS}",
                    field="evaluations",
                )
            defaults: dict[str, Any] = {
                k: raw[k] for k in ("subject", "action", "resource", "context") if k in raw
            }
            requests = []
            for i, item in enumerate(items):
                where = f"evaluations[{i}]"
                obj(item, where, {"subject", "action", "resource", "context"})
                requests.append(evaluation_request({**defaults, **item}, where + "."))
        except RequestTooLarge:
            raise
        except InvalidRequest as exc:
            return invalid(exc)
        decisions: list[Decision] = []
        try:
            for decide_request in requests:
                decision = await service.decide(
                    decide_request, transport=AUTHZEN, asserted_by=caller
                )
                decisions.append(decision)
                allowed = decision.verdict == Verdict.ALLOW
                if (semantic == "deny_on_first_deny" and not allowed) or (
                    semantic == "permit_on_first_permit" and allowed
                ):
                    break  # the rest are not evaluated, and not answered
        except BaseException:
            for decision in decisions:  # never delivered: they hold nothing
                await service.abandon(decision)
            raise
        body = {"evaluations": [evaluation_answer(d) for d in decisions]}
        return await deliver(decisions, body)

    @app.get("/.well-known/authzen-configuration", summary="AuthZEN PDP metadata")
    async def authzen_configuration(request: Request) -> dict[str, str]:
        base = str(request.base_url).rstrip("/")
        return {
            "policy_decision_point": base,
            "access_evaluation_endpoint": f"{base}/access/v1/evaluation",
            "access_evaluations_endpoint": f"{base}/access/v1/evaluations",
        }
