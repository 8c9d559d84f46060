"""HTTP transport (FastAPI): converts requests and responses, decides nothing itself.

Every body is read and parsed here by the strict parser (duplicate keys, NaN, numbers
out of range, lone surrogates and deep nesting are refused; size is capped) before
pydantic validates its shape. Every error, whoever raises it (our code, FastAPI's query
validation, routing, an unexpected fault), answers one shape,
`{"error": {"code", "message", "field"?}}`, with the caller's input quoted only up to a
bound and never an internal detail.
"""

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine import approver_auth, jsonstrict
from engine.authoring.explain import LiveExplainer
from engine.errors import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    Conflict,
    EngineError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PolicyRejected,
    PolicyUnavailable,
    RequestTooLarge,
    StateUnavailable,
    Unauthenticated,
    bounded,
    from_validation,
)
from engine.identity.base import Identity
from engine.models import (
    Approval,
    ApprovalAction,
    ApprovalRef,
    ApprovalStatus,
    ApprovalWait,
    DecideRequest,
    DecideResultRequest,
    Decision,
    OutcomeAck,
    OutcomeReport,
    ResultDecision,
    Verdict,
)
from engine.runtime import Runtime
from engine.service import RESULT_THREAD_BYTES, small
from engine.state.approvals import ApprovalCursor
from engine.transports import paging
from engine.transports.guard import HttpGuard, listener_guard
from engine.transports.tls import current_peer


def status_for(exc: EngineError) -> int:
    """The one mapping from engine errors to HTTP statuses."""
    if isinstance(exc, RequestTooLarge):
        return 413
    if isinstance(exc, InvalidRequest):
        return 400 if exc.syntax else 422
    if isinstance(exc, Unauthenticated):
        return 401
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict | PolicyRejected):
        return 409
    if isinstance(exc, PolicyUnavailable | StateUnavailable):
        return 503
    return 500


log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, *, field: str | None = None, **extra: Any
) -> JSONResponse:
    """The one error shape of this API."""
    error: dict[str, Any] = {"code": code, "message": bounded(message, MAX_MESSAGE_CHARS)}
    if field:
        error["field"] = bounded(field, MAX_FIELD_CHARS)
    error.update(extra)
    return JSONResponse({"error": error}, status_code=status)


def _engine_error_response(exc: EngineError) -> JSONResponse:
    extra: dict[str, Any] = {}
    if isinstance(exc, PolicyRejected):
        extra["errors"] = [bounded(e, MAX_MESSAGE_CHARS) for e in exc.errors[:50]]
    field = exc.field if isinstance(exc, InvalidRequest) else None
    return error_response(status_for(exc), type(exc).__name__, exc.message, field=field, **extra)


RELOAD_PATH = "/v1/policy/reload"
# The query parameters GET /v1/decisions takes; any other is a 422.
DECISION_FILTERS = frozenset(
    {"session_id", "agent_id", "tool", "verdict", "since", "until", "limit", "cursor"}
)
# The longest id (approval, decision) the API takes, as in the protos (wire.MAX_ID_CHARS).
MAX_ID_CHARS = 256
# Approval page tokens are short (ApprovalCursor.token); a longer one was not made here.
APPROVAL_TOKEN_MAX = 256
HTTP_CODES = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(
            f"request body is {bounded(declared, 24)} bytes; the limit is {limit}"
        )
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestTooLarge(f"request body is over the limit of {limit} bytes")
    except ClientDisconnect as exc:
        # Nobody is left to answer; nothing was decided or taken.
        raise InvalidRequest("the client disconnected before the body was complete") from exc
    return bytes(body)


async def read_json(request: Request, limit: int, max_depth: int) -> Any:
    """The body parsed strictly; a large one (a tool's result) on a worker thread, so the
    event loop is not held for the tens of ms a MiB of JSON takes."""
    body = await read_body(request, limit)
    if len(body) > RESULT_THREAD_BYTES:
        return await asyncio.to_thread(jsonstrict.loads, body, max_depth=max_depth)
    return jsonstrict.loads(body, max_depth=max_depth)


def _json_bytes(body: dict[str, Any]) -> bytes:
    """`body` as JSONResponse encodes it."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


# Bodies that are read by the strict parser rather than by FastAPI; their schemas are added
# to the OpenAPI document by hand.
BODY_MODELS: tuple[type[BaseModel], ...] = (
    DecideRequest,
    DecideResultRequest,
    OutcomeReport,
    ApprovalAction,
    ApprovalWait,
)
M = TypeVar("M", bound=BaseModel)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def create_app(runtime: Runtime) -> FastAPI:
    settings = runtime.settings
    service = runtime.service
    app = FastAPI(
        title="mcp-policy-engine",
        version="0.1.0",
        description="Policy decisions for MCP tool calls, evaluated by OPA.",
    )

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, exc: EngineError) -> JSONResponse:
        if isinstance(exc, InvalidRequest):
            runtime.metrics.invalid_requests.labels("http").inc()
        return _engine_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def query_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        runtime.metrics.invalid_requests.labels("http").inc()
        first: dict[str, Any] = next(iter(exc.errors()), {})
        where = ".".join(str(part)[:64] for part in first.get("loc", ()))
        problem = InvalidRequest(f"{where}: {first.get('msg', 'invalid')}", field=where or None)
        return _engine_error_response(problem)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "HTTPError")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "Internal", "internal error; the service log has the cause")

    async def approver(request: Request) -> Identity:
        return await runtime.check_approver(request.headers.get("authorization"))

    async def operator(request: Request) -> Identity:
        return await runtime.check_operator(request.headers.get("authorization"))

    # An approver, or the operator (who may read approvals; decide them only in
    # single-token mode): engine.approver_auth says what each may act on.
    Approver = Annotated[Identity, Depends(approver)]
    Operator = Annotated[Identity, Depends(operator)]

    def decision_client(request: Request) -> str | None:
        """The proven caller of the decision API (client token or certificate)."""
        try:
            return runtime.decision_clients.authenticate(
                request.headers.get("authorization"), current_peer()
            )
        except Unauthenticated:
            runtime.metrics.unauthenticated_callers.labels("http").inc()
            raise

    async def read_model(request: Request, model: type[M], limit: int | None = None) -> M:
        limit = settings.max_body_bytes if limit is None else limit
        raw = await read_json(request, limit, settings.max_json_depth)
        if not isinstance(raw, dict):
            raise InvalidRequest("request body must be a JSON object")
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise from_validation(exc) from exc

    @app.post(
        "/v1/decide",
        response_model=Decision,
        response_model_exclude_none=True,
        openapi_extra=_body_schema(DecideRequest),
        summary="Decide one MCP tools/call",
    )
    async def decide(request: Request) -> Response:
        caller = decision_client(request)
        decision = await service.decide(
            await read_model(request, DecideRequest), transport="http", asserted_by=caller
        )
        try:
            return JSONResponse(decision.model_dump(mode="json", exclude_none=True))
        except BaseException:
            await service.abandon(decision)  # never delivered: it holds nothing
            raise

    @app.post(
        "/v1/decide-result",
        response_model=ResultDecision,
        response_model_exclude_none=True,
        openapi_extra=_body_schema(DecideResultRequest),
        summary="Decide on the result of one MCP tools/call: pass, redact or block",
    )
    async def decide_result(request: Request) -> Response:
        """The call as /v1/decide takes it (but `approval_id`), `result` (the tool's
        CallToolResult) and, optionally, the call's `decision_id`. The body may be
        MCP_POLICY_RESULT_MAX_BYTES larger than /v1/decide's (413 past that). `result` in
        the answer is what to hand the agent (null on pass: the tool's result as it is)."""
        caller = decision_client(request)
        limit = settings.max_body_bytes + settings.result_max_bytes
        decision = await service.decide_result(
            await read_model(request, DecideResultRequest, limit),
            transport="http",
            asserted_by=caller,
        )
        # The result (up to a MiB) goes into the answer as it is, not through the model,
        # encoded on a worker thread when it is large.
        body = decision.model_dump(mode="json", exclude={"result"}, exclude_none=True)
        if decision.result is None:
            return JSONResponse(body)
        body["result"] = decision.result
        if small(decision.result, RESULT_THREAD_BYTES):
            return JSONResponse(body)
        text = await asyncio.to_thread(_json_bytes, body)
        return Response(text, media_type="application/json")

    @app.get("/v1/whoami", summary="Who this service takes the decision API's caller for")
    async def who_am_i(request: Request) -> dict[str, Any]:
        """`caller`: the name the client token or certificate proves (null: unknown);
        `callers_required`: whether every caller must prove itself."""
        caller = decision_client(request)
        return {"caller": caller, "callers_required": runtime.decision_clients.required}

    @app.post(
        "/v1/decisions/{decision_id}/outcome",
        response_model=OutcomeAck,
        openapi_extra=_body_schema(OutcomeReport),
        summary="Report how the upstream call of an allowed decision went",
    )
    async def outcome(decision_id: str, request: Request) -> OutcomeAck:
        decision_client(request)
        report = await read_model(request, OutcomeReport)
        released = await service.report_outcome(
            decision_id, outcome_token=report.outcome_token or "", succeeded=report.succeeded
        )
        return OutcomeAck(decision_id=decision_id, released=released)

    @app.get(
        "/v1/approvals",
        response_model=list[Approval],
        summary="List approvals, newest first, a page at a time",
    )
    async def list_approvals(
        who: Approver,
        response: Response,
        status: ApprovalStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=paging.MAX_PAGE_SIZE)] = paging.DEFAULT_PAGE_SIZE,
        page_token: Annotated[str | None, Query(max_length=APPROVAL_TOKEN_MAX)] = None,
    ) -> list[Approval]:
        """The approvals the credential may see (the operator: all), newest first, at most
        `limit`. The body is the list; when more follow, the `X-Next-Page-Token` header
        holds the token to pass back as `page_token` (with the same `status` and `limit`),
        and `Link: <...>; rel="next"` the next page's path. A page may hold fewer than
        `limit` (approvals the credential may not see are skipped) and still have a next."""
        after = None
        if page_token:
            after = ApprovalCursor.from_token(page_token, field="page_token")
        page = await service.page_approvals(who, status, limit, after)
        if page.next is not None:
            token = page.next.token()
            query = {"status": status.value} if status else {}
            query.update(limit=str(limit), page_token=token)
            response.headers["X-Next-Page-Token"] = token
            response.headers["Link"] = f'</v1/approvals?{urlencode(query)}>; rel="next"'
        return page.approvals

    @app.get("/v1/approvals/{approval_id}", response_model=Approval, summary="Get an approval")
    async def get_approval(approval_id: str, who: Approver) -> Approval:
        approval = await service.get_approval(approval_id)
        approver_auth.check_may_act(who, approval, "view")
        return approval

    async def act(request: Request, who: Identity, approval_id: str, approve: bool) -> Approval:
        body = await read_model(request, ApprovalAction)
        return await service.decide_approval(
            approval_id, approve=approve, approver=who, comment=body.comment, declared=body.approver
        )

    @app.post(
        "/v1/approvals/{approval_id}/approve",
        response_model=Approval,
        openapi_extra=_body_schema(ApprovalAction),
        summary="Approve a pending approval",
    )
    async def approve(approval_id: str, request: Request, who: Approver) -> Approval:
        return await act(request, who, approval_id, True)

    @app.post(
        "/v1/approvals/{approval_id}/deny",
        response_model=Approval,
        openapi_extra=_body_schema(ApprovalAction),
        summary="Deny a pending approval",
    )
    async def deny(approval_id: str, request: Request, who: Approver) -> Approval:
        return await act(request, who, approval_id, False)

    @app.post(
        "/v1/approvals/{approval_id}/await",
        response_model=ApprovalRef,
        response_model_exclude_none=True,
        openapi_extra=_body_schema(ApprovalWait),
        summary="Wait until an approval is decided, or the timeout passes (decision clients)",
    )
    async def await_approval(
        approval_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)],
        request: Request,
    ) -> ApprovalRef:
        """The approval's status, expiry and console link once it is no longer pending, or
        when `timeout_seconds` (at most 300) have passed: what a proxy holding a call for a
        human waits on. The callers of /v1/decide may ask; 404 for an id that names no
        approval."""
        decision_client(request)
        wait = await read_model(request, ApprovalWait)
        return await service.await_approval(approval_id, wait.timeout_seconds)

    @app.get("/v1/decisions", summary="List logged decisions, newest first (operator)")
    async def list_decisions(
        _: Operator,
        request: Request,
        session_id: str | None = None,
        agent_id: str | None = None,
        tool: str | None = None,
        verdict: Verdict | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=paging.MAX_PAGE_SIZE)] = paging.DEFAULT_PAGE_SIZE,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        # A filter this listing does not know is refused: ignored, it would list everything.
        unknown = sorted(set(request.query_params) - DECISION_FILTERS)
        if unknown:
            raise InvalidRequest(
                f"unknown query parameter {bounded(unknown[0], 64)!r}; the decisions can be "
                f"filtered by {', '.join(sorted(DECISION_FILTERS))}",
                field=bounded(unknown[0], 64),
            )
        records, next_cursor = await service.list_decisions(
            paging.decision_query(
                session_id=session_id,
                agent_id=agent_id,
                tool=tool,
                verdict=verdict.value if verdict else None,
                since=since,
                until=until,
                limit=limit,
                token=cursor,
            )
        )
        return {"decisions": records, "next_cursor": next_cursor}

    @app.get("/v1/decisions/{decision_id}", summary="One logged decision (operator)")
    async def get_decision(
        _: Operator,
        decision_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)],
    ) -> dict[str, Any]:
        return await service.get_decision(decision_id)

    explainer = LiveExplainer()

    @app.get(
        "/v1/decisions/{decision_id}/explain",
        summary="Why a logged decision got its answer, by the running policy (operator)",
    )
    async def explain_decision(
        _: Operator,
        decision_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)],
    ) -> dict[str, Any]:
        """The running policy's explanation of the decision's logged input (404: no such
        decision; 409: its record holds no input that can be evaluated, see
        MCP_POLICY_DECISION_LOG_INPUT)."""
        record = await service.get_decision(decision_id)
        return await explainer.explain(runtime.policy.bundle, record)

    @app.get("/v1/status", summary="Summary: calls, denials by rule, top tools, approvals")
    async def status(
        _: Operator, hours: Annotated[float, Query(gt=0, le=24 * 365)] = 24
    ) -> dict[str, Any]:
        return await service.status(datetime.now(UTC) - timedelta(hours=hours))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: OPA answers, the policy is loaded and the state store answers",
    )
    async def readyz() -> JSONResponse:
        """Ready (200) when OPA answers and the policy is loaded, else 503.

        `decision_log` shows whether the decision log is writing (`healthy`, counts of
        records written, dropped, sanitised, truncated and suppressed, failed batches, the
        last error and when, per sink). It is reported, never gating: a log that cannot
        write must not stop decisions (see `Runtime.ready`).
        """
        ready = await runtime.ready()
        last = runtime.policy.last_reload
        body = {
            "status": "ready" if ready else "not ready",
            "policy_revision": runtime.policy.revision,
            "last_reload": last.as_dict() if last else None,
            "decision_log": runtime.decision_log.health(),
            "state_store": runtime.store_status,
        }
        if runtime.fleet is not None:
            body.update(runtime.fleet_status())
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post(RELOAD_PATH, summary="Read rego/ and policies/ again and apply (operator)")
    async def reload(_: Operator) -> dict[str, Any]:
        previous = runtime.policy.revision
        revision = await runtime.policy.load()
        return {"policy_revision": revision, "changed": revision != previous}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # here: it imports this module
    from engine.transports.gateway_http import FORWARD_AUTH_PATH, add_gateway_routes

    add_gateway_routes(app, runtime)
    # The approvals console under /console (engine/console/): its forms are not JSON.
    from engine.console.routes import PREFIX as CONSOLE_PATH
    from engine.console.routes import mount_console

    mount_console(app, runtime)
    # Host, Origin and content type before anything else (engine/transports/guard.py);
    # forward-auth bodies are the original request's, reload takes none.
    app.add_middleware(
        HttpGuard,
        config=listener_guard(
            settings.host,
            authenticated=settings.clients_file is not None or settings.tls_client_ca is not None,
            allowed_origins=settings.allowed_origins,
            allowed_hosts=settings.allowed_hosts,
            raw_body_paths=(FORWARD_AUTH_PATH, RELOAD_PATH, CONSOLE_PATH),
            forwarded_paths=(FORWARD_AUTH_PATH,),
        ),
    )
    return app
