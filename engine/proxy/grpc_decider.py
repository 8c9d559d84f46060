"""`GrpcDecider`: decisions from a running decision service over gRPC (`--decision-url`).

Proto messages exist only here, converted by `engine.transports.wire` (as the server does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from engine.errors import EngineError, InvalidRequest, NotFound
from engine.identity.base import Identity
from engine.models import ApprovalRef, DecideRequest, DecideResultRequest, Decision, ResultDecision
from engine.proxy.decider import DecisionUnavailable, ProxyUnknown
from engine.translate import proven_principal
from engine.transports import wire
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc


def decide_message(request: DecideRequest) -> Any:
    """The protobuf DecideRequest for `request` (see `engine.transports.wire`)."""
    return wire.decide_request_to_proto(request)


def decision_from_message(response: Any) -> Decision:
    """The domain Decision for a protobuf DecideResponse (see `engine.transports.wire`: a verdict
    this proxy does not know is a deny)."""
    return wire.decision_from_proto(response)


# What the channel takes: a result decision's answer carries the rewritten result, which
# redaction can make larger than the result sent (a replacement longer than what it
# replaces). Sending is bounded by the service (RESOURCE_EXHAUSTED past its limit).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_ANSWER_BYTES),)


class GrpcDecider:
    """A decision service over gRPC: one channel for the life of the proxy."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 5.0,
        tls_ca: Path | bytes | None = None,
        tls_cert: Path | bytes | None = None,
        tls_key: Path | bytes | None = None,
        client_token: str | None = None,
    ) -> None:
        """`tls_ca` (PEM roots to verify the service by; default: the system's) or a
        client certificate (`tls_cert` with its `tls_key`, for mTLS) makes the channel TLS;
        each is PEM bytes or a file to read them from. `client_token` is this proxy's
        token from the service's clients file, sent with every call."""
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {client_token}"),) if client_token else None
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")

        def pem(value: Path | bytes | None) -> bytes | None:
            return value if value is None or isinstance(value, bytes) else value.read_bytes()

        if tls_ca is None and tls_cert is None:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pem(tls_ca),
                private_key=pem(tls_key),
                certificate_chain=pem(tls_cert),
            )
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> EngineError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(details)
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details)
        return DecisionUnavailable(
            f"decision service at {self.target} could not {what} ({code.name}: {details})"
        )

    async def require_known(self) -> None:
        if await self.who_am_i() is None:
            raise ProxyUnknown(
                f"the decision service at {self.target} does not know this proxy, so the "
                "agents --auth-* proves would reach it unproven; run `mcp-policy clients "
                "add NAME` where the service runs, start the service with "
                "MCP_POLICY_CLIENTS_FILE naming the file it wrote, and give the proxy the "
                "token it printed in MCP_POLICY_CLIENT_TOKEN (or a client certificate: "
                "--decision-cert and --decision-key, with MCP_POLICY_TLS_CLIENT_CA on the "
                "service)"
            )

    async def who_am_i(self) -> str | None:
        """The name the service proves this proxy by (client token or certificate), or
        None when the service knows no caller."""
        try:
            response = await self._stub.WhoAmI(
                decision_pb2.WhoAmIRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "say who it takes this proxy for") from exc
        return wire.who_am_i_from_proto(response)

    async def decide(self, request: DecideRequest, identity: Identity | None = None) -> Decision:
        """With an `identity`, the proven agent, user and roles go in the request's
        principal, marked `principal_verified`: the service believes them because it
        knows this proxy (`principal.asserted_by` names it; `principal.authenticated`
        stays false there), and denies the call (identity.unproven_caller) when it does
        not. A caller that wants the service to verify the agent itself sends the agent's
        token in `DecideRequest.credential` instead.
        """
        if identity is not None:
            request = request.model_copy(
                update={
                    "principal": proven_principal(request.principal, identity),
                    "principal_verified": True,
                }
            )
        try:
            response = await self._stub.Decide(
                decide_message(request), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "decide") from exc
        return decision_from_message(response)

    async def decide_result(
        self, request: DecideResultRequest, identity: Identity | None = None
    ) -> ResultDecision:
        """DecideResult, the result sent as JSON text; `identity` as for `decide` (the
        proven principal, `principal_verified`). An answer this proxy cannot read is
        DecisionUnavailable (the result is then handed on to nobody)."""
        if identity is not None:
            request = request.model_copy(
                update={
                    "principal": proven_principal(request.principal, identity),
                    "principal_verified": True,
                }
            )
        try:
            response = await self._stub.DecideResult(
                wire.decide_result_request_to_proto(request),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "decide on the result") from exc
        try:
            return wire.result_decision_from_proto(response)
        except InvalidRequest as exc:
            raise DecisionUnavailable(
                f"decision service at {self.target} answered a result it cannot read: {exc.message}"
            ) from exc

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool:
        try:
            response = await self._stub.ReportOutcome(
                wire.report_outcome_to_proto(decision_id, outcome_token, succeeded=succeeded),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "take the outcome report") from exc
        return wire.outcome_ack_from_proto(response).released

    async def await_approval(self, approval_id: str, timeout: float) -> ApprovalRef | None:
        """AwaitApproval: the call's deadline is the wait plus the usual decision timeout."""
        try:
            response = await self._stub.AwaitApproval(
                wire.await_approval_to_proto(approval_id, timeout),
                timeout=timeout + self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "say how the approval stands") from exc
        return wire.await_response_from_proto(response)

    async def close(self) -> None:
        await self._channel.close()
