"""gRPC transport: wires the servicers to the service, decides nothing.

Every message is converted to the domain and back by `engine.transports.wire` (which the gRPC
clients use too).

Also serves grpc.health.v1 (SERVING only while OPA answers and the policy is loaded)
and server reflection, so `grpcurl -plaintext localhost:50051 list` works.

Bad input is INVALID_ARGUMENT with a google.rpc.BadRequest naming the field, also for
bytes that do not decode as the request message (`StrictDecoding`); an unexpected fault
is INTERNAL with a fixed message. No status ever carries an internal exception's text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from engine import approver_auth
from engine.errors import (
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
)
from engine.identity.base import Identity
from engine.models import OutcomeAck
from engine.obs.metrics import Metrics
from engine.runtime import Runtime
from engine.service import RESULT_THREAD_BYTES
from engine.transports import extauthz, wire
from engine.transports.tls import ClientNameInterceptor, ServerTls, load_server_tls, peer_identity
from mcppolicy.v1 import approval_pb2, approval_pb2_grpc, decision_pb2, decision_pb2_grpc

T = TypeVar("T")
log = logging.getLogger(__name__)
GRPC_IDLE_MS = 5 * 60 * 1000

DECIDE_RESULT_METHOD = "/mcppolicy.v1.DecisionService/DecideResult"

SERVICE_NAMES = (
    decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name,
    decision_pb2.DESCRIPTOR.services_by_name["DecisionLogService"].full_name,
    approval_pb2.DESCRIPTOR.services_by_name["ApprovalService"].full_name,
)


def status_for(exc: EngineError) -> grpc.StatusCode:
    """The one mapping from engine errors to gRPC status codes."""
    if isinstance(exc, RequestTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
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


class _Refused:
    """What it yields for bytes that set two members of a oneof (`wire.check_oneofs`) or
    a message that breaks a buf.validate rule of its proto (`wire.check_rules`)."""

    def __init__(self, error: InvalidRequest) -> None:
        self.error = error


class StrictDecoding(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answer INVALID_ARGUMENT, not UNKNOWN, for request bytes that do not decode.

    grpc's own deserializer failure (truncated bytes, a string field that is not UTF-8,
    nesting past protobuf's limit) ends the call with an opaque status carrying the
    exception; here the deserializer never raises and the handler answers the failure.
    Bytes that set two members of one oneof (decoding would keep the last) are refused
    here too, since the decoded message no longer shows it, and so is a message that breaks
    a buf.validate rule of its proto: every RPC, before the handler or any credential check
    runs, at the cost of a few microseconds.

    With `max_bytes`, a request over it is RESOURCE_EXHAUSTED naming the limit, before it
    is decoded: the server's receive limit is the largest method's (`larger`: DecideResult
    takes a tool's result besides the call), every other method keeps `max_bytes`.
    """

    def __init__(self, max_bytes: int | None = None, larger: dict[str, int] | None = None):
        self._max_bytes = max_bytes
        self._larger = larger or {}

    def _limit(self, method: str) -> int | None:
        return self._larger.get(method, self._max_bytes)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not handler.unary_unary or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        behaviour = handler.unary_unary
        limit = self._limit(details.method)

        def deserialize(data: bytes) -> Any:
            if limit is not None and len(data) > limit:
                return _Refused(
                    RequestTooLarge(
                        f"the request is {len(data)} bytes; {details.method} takes at most "
                        f"{limit} (MCP_POLICY_MAX_BODY_BYTES"
                        + (
                            " + MCP_POLICY_RESULT_MAX_BYTES)"
                            if details.method in self._larger
                            else ")"
                        )
                    )
                )
            try:
                message = decode(data)
            except Exception:  # noqa: BLE001 - any failure to decode is the caller's
                return _Undecodable()
            try:
                wire.check_oneofs(message, data)
                wire.check_rules(message)
            except InvalidRequest as exc:
                return _Refused(exc)
            return message

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Refused):
                await _abort(context, request.error)
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


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def Decide(  # noqa: N802
        self, request: decision_pb2.DecideRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.DecideResponse:
        async def work() -> decision_pb2.DecideResponse:
            caller = self._caller(context)
            parsed = wire.decide_request_from_proto(
                request, max_depth=self._runtime.settings.max_json_depth
            )
            decision = await self._runtime.service.decide(
                parsed, transport="grpc", asserted_by=caller
            )
            try:
                return wire.decision_to_proto(decision)
            except BaseException:
                await self._runtime.service.abandon(decision)  # never delivered
                raise

        return await _answer(context, work(), self._runtime.metrics)

    async def DecideResult(  # noqa: N802
        self, request: decision_pb2.DecideResultRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.DecideResultResponse:
        async def work() -> decision_pb2.DecideResultResponse:
            caller = self._caller(context)
            depth = self._runtime.settings.max_json_depth
            # A large result is read and written (tens of ms for a MiB, more as a Struct)
            # on a worker thread, not on the event loop.
            large = request.ByteSize() > RESULT_THREAD_BYTES
            if large:
                parsed, as_json = await asyncio.to_thread(
                    wire.decide_result_request_from_proto, request, max_depth=depth
                )
            else:
                parsed, as_json = wire.decide_result_request_from_proto(request, max_depth=depth)
            decision = await self._runtime.service.decide_result(
                parsed, transport="grpc", asserted_by=caller
            )
            if large:
                return await asyncio.to_thread(
                    wire.result_decision_to_proto, decision, as_json=as_json
                )
            return wire.result_decision_to_proto(decision, as_json=as_json)

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

    async def ReportOutcome(  # noqa: N802
        self, request: decision_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.ReportOutcomeResponse:
        async def work() -> decision_pb2.ReportOutcomeResponse:
            self._caller(context)
            decision_id, report = wire.report_outcome_from_proto(request)
            released = await self._runtime.service.report_outcome(
                decision_id, outcome_token=report.outcome_token or "", succeeded=report.succeeded
            )
            return wire.outcome_ack_to_proto(OutcomeAck(decision_id=decision_id, released=released))

        return await _answer(context, work())

    async def WhoAmI(  # noqa: N802
        self, request: decision_pb2.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.WhoAmIResponse:
        async def work() -> decision_pb2.WhoAmIResponse:
            caller = self._caller(context)
            required = self._runtime.decision_clients.required
            return wire.who_am_i_to_proto(caller, callers_required=required)

        return await _answer(context, work())

    async def AwaitApproval(  # noqa: N802
        self, request: decision_pb2.AwaitApprovalRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.AwaitApprovalResponse:
        async def work() -> decision_pb2.AwaitApprovalResponse:
            self._caller(context)
            approval_id, timeout = wire.await_approval_from_proto(request)
            ref = await self._runtime.service.await_approval(approval_id, timeout)
            return wire.await_response_to_proto(ref)

        return await _answer(context, work(), self._runtime.metrics)


class ApprovalServicer(approval_pb2_grpc.ApprovalServiceServicer):
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

    async def ListApprovals(  # noqa: N802
        self, request: approval_pb2.ListApprovalsRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.ListApprovalsResponse:
        async def work(who: Identity) -> approval_pb2.ListApprovalsResponse:
            listing = wire.approval_listing_from_proto(request)
            page = await self._runtime.service.page_approvals(
                who, listing.status, listing.size, listing.after
            )
            return wire.approvals_page_to_proto(page)

        return await self._as_approver(context, work)

    async def GetApproval(  # noqa: N802
        self, request: approval_pb2.GetApprovalRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.GetApprovalResponse:
        async def work(who: Identity) -> approval_pb2.GetApprovalResponse:
            approval_id = wire.approval_id_from_proto(request)
            approval = await self._runtime.service.get_approval(approval_id)
            approver_auth.check_may_act(who, approval, "view")
            return approval_pb2.GetApprovalResponse(approval=wire.approval_to_proto(approval))

        return await self._as_approver(context, work)

    async def _act(
        self,
        request: approval_pb2.ApproveRequest | approval_pb2.DenyRequest,
        context: grpc.aio.ServicerContext,
        approve: bool,
    ) -> approval_pb2.Approval:
        async def work(who: Identity) -> approval_pb2.Approval:
            approval_id, action = wire.approval_action_from_proto(request)
            approval = await self._runtime.service.decide_approval(
                approval_id,
                approve=approve,
                approver=who,
                comment=action.comment,
                declared=action.approver,
            )
            return wire.approval_to_proto(approval)

        return await self._as_approver(context, work)

    async def Approve(  # noqa: N802
        self, request: approval_pb2.ApproveRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.ApproveResponse:
        return approval_pb2.ApproveResponse(approval=await self._act(request, context, True))

    async def Deny(  # noqa: N802
        self, request: approval_pb2.DenyRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.DenyResponse:
        return approval_pb2.DenyResponse(approval=await self._act(request, context, False))


class DecisionLogServicer(decision_pb2_grpc.DecisionLogServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def ListDecisions(  # noqa: N802
        self, request: decision_pb2.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.ListDecisionsResponse:
        async def checked() -> decision_pb2.ListDecisionsResponse:
            metadata = dict(context.invocation_metadata() or ())
            await self._runtime.check_operator(metadata.get("authorization"))
            query = wire.decision_query_from_proto(request)
            records, next_token = await self._runtime.service.list_decisions(query)
            return wire.decisions_page_to_proto(records, next_token)

        return await _answer(context, checked())


def create_server(
    runtime: Runtime, address: str, *, tls: ServerTls | None = None
) -> tuple[grpc.aio.Server, int]:
    """Build the gRPC server bound to `address` ("host:port", port 0 for any).

    With TLS in the settings (`tls`, or else read from `runtime.settings`) the port is a
    TLS port; with a client CA, callers need a certificate it signed, and
    `ClientNameInterceptor` checks its names against `tls_client_names` (any, if empty)
    and makes the name `engine.transports.tls.current_peer()` for the call.
    """
    if tls is None:
        tls = load_server_tls(runtime.settings)
    settings = runtime.settings
    largest = settings.max_body_bytes + settings.result_max_bytes
    interceptors: list[grpc.aio.ServerInterceptor] = [
        StrictDecoding(settings.max_body_bytes, {DECIDE_RESULT_METHOD: largest})
    ]
    if tls is not None and tls.client_ca is not None:
        interceptors.insert(0, ClientNameInterceptor(tls.client_names))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # The largest request any method takes (DecideResult: a tool's result and the
            # call); StrictDecoding holds every other method to max_body_bytes.
            ("grpc.max_receive_message_length", largest),
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
