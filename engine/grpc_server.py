"""gRPC transport: converts protobuf messages to the domain and back, decides nothing.

Also serves grpc.health.v1 (SERVING only while OPA answers and the policy is loaded)
and server reflection, so `grpcurl -plaintext localhost:50051 list` works.

Bad input is INVALID_ARGUMENT with a google.rpc.BadRequest naming the field, also for
bytes that do not decode as the request message (`StrictDecoding`); an unexpected fault
is INTERNAL with a fixed message. No status ever carries an internal exception's text.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from pydantic import ValidationError

from engine import approver_auth, extauthz, jsonstrict, paging
from engine.errors import (
    MAX_MESSAGE_CHARS,
    Conflict,
    EngineError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PolicyRejected,
    PolicyUnavailable,
    StateUnavailable,
    Unauthenticated,
    bounded,
    from_validation,
)
from engine.identity.base import Identity
from engine.metrics import Metrics
from engine.models import (
    Approval,
    ApprovalAction,
    ApprovalStatus,
    DecideRequest,
    Decision,
    Verdict,
)
from engine.runtime import Runtime
from engine.tls import ClientNameInterceptor, ServerTls, load_server_tls, peer_identity
from mcppolicy.v1 import approval_pb2, approval_pb2_grpc, decision_pb2, decision_pb2_grpc

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_ID_CHARS = 256
GRPC_IDLE_MS = 5 * 60 * 1000

VERDICTS = {
    Verdict.ALLOW: decision_pb2.VERDICT_ALLOW,
    Verdict.DENY: decision_pb2.VERDICT_DENY,
    Verdict.RATE_LIMITED: decision_pb2.VERDICT_RATE_LIMITED,
    Verdict.APPROVAL_REQUIRED: decision_pb2.VERDICT_APPROVAL_REQUIRED,
}
APPROVAL_STATUSES = {
    ApprovalStatus.PENDING: decision_pb2.APPROVAL_STATUS_PENDING,
    ApprovalStatus.APPROVED: decision_pb2.APPROVAL_STATUS_APPROVED,
    ApprovalStatus.DENIED: decision_pb2.APPROVAL_STATUS_DENIED,
    ApprovalStatus.USED: decision_pb2.APPROVAL_STATUS_USED,
    ApprovalStatus.EXPIRED: decision_pb2.APPROVAL_STATUS_EXPIRED,
}
STATUS_FROM_PROTO = {value: key for key, value in APPROVAL_STATUSES.items()}
SERVICE_NAMES = (
    decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name,
    decision_pb2.DESCRIPTOR.services_by_name["DecisionLogService"].full_name,
    approval_pb2.DESCRIPTOR.services_by_name["ApprovalService"].full_name,
)


def status_for(exc: EngineError) -> grpc.StatusCode:
    """The one mapping from engine errors to gRPC status codes."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, Conflict | PolicyRejected):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, PolicyUnavailable | StateUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: EngineError) -> None:
    code = status_for(exc)
    message = bounded(exc.message, MAX_MESSAGE_CHARS)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if isinstance(exc, InvalidRequest):
        detail = error_details_pb2.BadRequest()
        detail.field_violations.add(field=bounded(exc.field or "", 256), description=message)
        status.details.add().Pack(detail)
    await context.abort_with_status(rpc_status.to_status(status))


async def _answer(
    context: grpc.aio.ServicerContext, work: Awaitable[T], metrics: Metrics | None = None
) -> T:
    try:
        return await work
    except EngineError as exc:
        if metrics is not None and isinstance(exc, InvalidRequest):
            metrics.invalid_requests.labels("grpc").inc()
        await _abort(context, exc)
        raise  # abort_with_status raises; this line is never reached
    except Exception:
        if context.code() is not None:  # already aborted on purpose
            raise
        log.exception("internal error in a gRPC call")
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error; the service log has the cause"
        )
        raise


class _Undecodable:
    """What StrictDecoding's deserializer yields for bytes that are not the message."""


class StrictDecoding(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answer INVALID_ARGUMENT, not UNKNOWN, for request bytes that do not decode.

    grpc's own deserializer failure (truncated bytes, a string field that is not UTF-8,
    nesting past protobuf's limit) ends the call with an opaque status carrying the
    exception; here the deserializer never raises and the handler answers the failure.
    """

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not handler.unary_unary or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        behaviour = handler.unary_unary

        def deserialize(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception:  # noqa: BLE001 - any failure to decode is the caller's
                return _Undecodable()

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await _abort(
                    context,
                    InvalidRequest(
                        "the request bytes do not decode as "
                        f"{details.method.rsplit('/', 1)[-1]}Request (truncated, a string "
                        "that is not UTF-8, or nested too deep)",
                        syntax=True,
                    ),
                )
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


def _struct_to_dict(message: struct_pb2.Struct, max_depth: int, what: str) -> dict[str, Any]:
    try:
        value = jsonstrict.normalise_numbers(json_format.MessageToDict(message))
    except ValueError as exc:  # NaN or Infinity in a number_value
        raise InvalidRequest(f"{what} contains a non-finite number", field=what) from exc
    jsonstrict.check_value(value, max_depth=max_depth, what=what)
    assert isinstance(value, dict)
    return value


def _check_id(value: str, field: str) -> None:
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{field}: at most {MAX_ID_CHARS} characters", field=field)


def _instant(message: Any, field: str) -> datetime | None:
    """A Timestamp field as a datetime; InvalidRequest when it is out of range."""
    if not message.HasField(field):
        return None
    try:
        value: datetime = getattr(message, field).ToDatetime(UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidRequest(f"{field}: a time out of range", field=field) from exc
    return value


def _dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def decide_request(message: Any, max_depth: int) -> DecideRequest:
    try:
        return _decide_request(message, max_depth)
    except DecodeError as exc:  # protobuf's own nesting limit, met while reading a Struct
        raise InvalidRequest(
            f"request could not be decoded (nests deeper than {max_depth} levels?)",
            syntax=True,
        ) from exc


def _decide_request(message: Any, max_depth: int) -> DecideRequest:
    fields: dict[str, Any] = {"server": message.server}
    if message.HasField("tool"):
        fields["tool"] = message.tool
    if message.HasField("arguments"):
        fields["arguments"] = _struct_to_dict(message.arguments, max_depth, "arguments")
    if message.HasField("message"):
        fields["message"] = message.message
    if message.HasField("approval_id"):
        fields["approval_id"] = message.approval_id
    if message.HasField("context"):
        fields["context"] = _struct_to_dict(message.context, max_depth, "context")
    fields["dry_run"] = message.dry_run
    if message.HasField("credential"):
        fields["credential"] = message.credential
    p = message.principal
    fields["principal"] = {
        "session_id": p.session_id,
        "agent_id": p.agent_id or None,
        "user_id": p.user_id or None,
        "roles": list(p.roles),
    }
    try:
        return DecideRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def decide_response(decision: Decision) -> Any:
    response = decision_pb2.DecideResponse(
        decision_id=decision.decision_id,
        verdict=VERDICTS[decision.verdict],
        reason=decision.reason,
        rule=decision.rule,
        policy_revision=decision.policy_revision,
        dry_run=bool(decision.dry_run),
        outcome_token=decision.outcome_token or "",
    )
    if decision.rate_limit is not None:
        response.rate_limit.CopyFrom(
            decision_pb2.RateLimitStatus(**decision.rate_limit.model_dump())
        )
    if decision.approval is not None:
        response.approval.CopyFrom(
            decision_pb2.ApprovalRef(
                id=decision.approval.id,
                status=APPROVAL_STATUSES[decision.approval.status],
                expires_at=_timestamp(decision.approval.expires_at),
            )
        )
    if decision.mcp_result is not None:
        response.mcp_result.CopyFrom(_dict_to_struct(decision.mcp_result))
    return response


def approval_message(approval: Approval) -> Any:
    return approval_pb2.Approval(
        id=approval.id,
        status=APPROVAL_STATUSES[approval.status],
        server=approval.server,
        tool=approval.tool,
        arguments=_dict_to_struct(approval.arguments),
        principal=decision_pb2.Principal(
            session_id=approval.principal.session_id,
            agent_id=approval.principal.agent_id or "",
            user_id=approval.principal.user_id or "",
            roles=approval.principal.roles,
        ),
        rule=approval.rule,
        reason=approval.reason,
        decision_id=approval.decision_id,
        created_at=_timestamp(approval.created_at),
        expires_at=_timestamp(approval.expires_at),
        decided_at=_timestamp(approval.decided_at),
        approver=approval.approver or "",
        comment=approval.comment or "",
        fingerprint=approval.fingerprint,
    )


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def Decide(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def work() -> Any:
            caller = self._caller(context)
            parsed = decide_request(request, self._runtime.settings.max_json_depth)
            decision = await self._runtime.service.decide(
                parsed, transport="grpc", asserted_by=caller
            )
            try:
                return decide_response(decision)
            except BaseException:
                await self._runtime.service.abandon(decision)  # never delivered
                raise

        return await _answer(context, work(), self._runtime.metrics)

    def _caller(self, context: grpc.aio.ServicerContext) -> str | None:
        """The proven caller (client token or certificate); raises when one is required."""
        metadata = dict(context.invocation_metadata() or ())
        try:
            return self._runtime.decision_clients.authenticate(
                metadata.get("authorization"), peer_identity(context)
            )
        except Unauthenticated:
            self._runtime.metrics.unauthenticated_callers.labels("grpc").inc()
            raise

    async def ReportOutcome(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def work() -> Any:
            self._caller(context)
            if not request.decision_id:
                raise InvalidRequest("decision_id: required", field="decision_id")
            _check_id(request.decision_id, "decision_id")
            _check_id(request.outcome_token, "outcome_token")
            released = await self._runtime.service.report_outcome(
                request.decision_id,
                outcome_token=request.outcome_token,
                succeeded=request.succeeded,
            )
            return decision_pb2.ReportOutcomeResponse(
                decision_id=request.decision_id, released=released
            )

        return await _answer(context, work())


class ApprovalServicer(approval_pb2_grpc.ApprovalServiceServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def _as_approver(
        self, context: grpc.aio.ServicerContext, work: Callable[[Identity], Awaitable[T]]
    ) -> T:
        """Run `work(identity)` for the approver (or operator) the metadata proves."""

        async def checked() -> T:
            metadata = dict(context.invocation_metadata() or ())
            return await work(await self._runtime.check_approver(metadata.get("authorization")))

        return await _answer(context, checked())

    async def ListApprovals(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def work(who: Identity) -> Any:
            status = STATUS_FROM_PROTO.get(request.status)
            if status is None and request.status != decision_pb2.APPROVAL_STATUS_UNSPECIFIED:
                raise InvalidRequest(
                    f"status: {request.status} is not an ApprovalStatus", field="status"
                )
            limit = paging.page_size(request.limit, field="limit")
            found = await self._runtime.service.list_approvals(
                status, approver_auth.scan_limit(who, limit)
            )
            return approval_pb2.ListApprovalsResponse(
                approvals=[approval_message(a) for a in approver_auth.visible(who, found, limit)]
            )

        return await self._as_approver(context, work)

    async def GetApproval(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def work(who: Identity) -> Any:
            _check_id(request.id, "id")
            approval = await self._runtime.service.get_approval(request.id)
            approver_auth.check_may_act(who, approval, "view")
            return approval_pb2.GetApprovalResponse(approval=approval_message(approval))

        return await self._as_approver(context, work)

    async def _act(self, request: Any, context: grpc.aio.ServicerContext, approve: bool) -> Any:
        async def work(who: Identity) -> Any:
            _check_id(request.id, "id")
            declared = request.approver if request.HasField("approver") else None
            try:  # the same limits as the HTTP body
                action = ApprovalAction(approver=declared, comment=request.comment)
            except ValidationError as exc:
                raise from_validation(exc) from exc
            approval = await self._runtime.service.decide_approval(
                request.id,
                approve=approve,
                approver=who,
                comment=action.comment,
                declared=action.approver,
            )
            return approval_message(approval)

        return await self._as_approver(context, work)

    async def Approve(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return approval_pb2.ApproveResponse(approval=await self._act(request, context, True))

    async def Deny(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return approval_pb2.DenyResponse(approval=await self._act(request, context, False))


class DecisionLogServicer(decision_pb2_grpc.DecisionLogServiceServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def ListDecisions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def checked() -> Any:
            metadata = dict(context.invocation_metadata() or ())
            await self._runtime.check_operator(metadata.get("authorization"))
            query = paging.decision_query(
                session_id=request.session_id,
                agent_id=request.agent_id,
                tool=request.tool,
                verdict=request.verdict,
                since=_instant(request, "since"),
                until=_instant(request, "until"),
                limit=request.page_size,
                token=request.page_token,
                names={"limit": "page_size", "token": "page_token"},
            )
            records, next_cursor = await self._runtime.service.list_decisions(query)
            return decision_pb2.ListDecisionsResponse(
                decisions=[_dict_to_struct(r) for r in records],
                next_page_token=next_cursor or "",
            )

        return await _answer(context, checked())


def create_server(
    runtime: Runtime, address: str, *, tls: ServerTls | None = None
) -> tuple[grpc.aio.Server, int]:
    """Build the gRPC server bound to `address` ("host:port", port 0 for any).

    With TLS in the settings (`tls`, or else read from `runtime.settings`) the port is a
    TLS port; with a client CA, callers need a certificate it signed, and
    `ClientNameInterceptor` checks its names against `tls_client_names` (any, if empty)
    and makes the name `engine.tls.current_peer()` for the call.
    """
    if tls is None:
        tls = load_server_tls(runtime.settings)
    interceptors: list[grpc.aio.ServerInterceptor] = [StrictDecoding()]
    if tls is not None and tls.client_ca is not None:
        interceptors.insert(0, ClientNameInterceptor(tls.client_names))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", runtime.settings.max_body_bytes),
            # A connection that has had no call for this long is closed (with GOAWAY);
            # clients reconnect on their own. grpc's handshake timeout bounds one that
            # never gets as far as a call.
            ("grpc.max_connection_idle_ms", GRPC_IDLE_MS),
        ],
    )
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(DecisionServicer(runtime), server)
    approval_pb2_grpc.add_ApprovalServiceServicer_to_server(ApprovalServicer(runtime), server)
    decision_pb2_grpc.add_DecisionLogServiceServicer_to_server(DecisionLogServicer(runtime), server)
    extauthz.add_to_server(runtime, server)  # envoy.service.auth.v3.Authorization
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            extauthz.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )

    async def on_ready(ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, status)

    runtime.add_readiness_listener(on_ready)
    if tls is not None:
        port = server.add_secure_port(address, tls.grpc_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC to {address}")
    return server, port
