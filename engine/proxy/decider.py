"""Where the proxy gets its decisions: one small interface, two implementations.

`Decider` is all the proxy core knows. `GrpcDecider` asks a running decision service
over one long-lived gRPC channel (`--decision-url host:port`); `EmbeddedDecider` runs the
service in-process around its own `Runtime` (`--embedded`), so one command serves a single
user with nothing else running. Both take and return the engine's domain models; proto
messages exist only inside `GrpcDecider`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC
from typing import Any, Protocol

import grpc
from google.protobuf import json_format

from engine import jsonstrict
from engine.errors import EngineError, InvalidRequest
from engine.grpc_server import APPROVAL_STATUSES, VERDICTS
from engine.models import (
    ApprovalRef,
    DecideRequest,
    Decision,
    RateLimitInfo,
    Verdict,
)
from engine.runtime import Runtime
from engine.settings import Settings
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc

log = logging.getLogger(__name__)

TRANSPORT = "proxy"
VERDICT_FROM_PROTO = {value: key for key, value in VERDICTS.items()}
STATUS_FROM_PROTO = {value: key for key, value in APPROVAL_STATUSES.items()}


class DecisionUnavailable(EngineError):
    """The decision service could not be asked (down, slow, or answering an error)."""


class Decider(Protocol):
    """Asks for decisions and reports outcomes; raises InvalidRequest or DecisionUnavailable."""

    async def decide(self, request: DecideRequest) -> Decision: ...

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool: ...

    async def close(self) -> None: ...


class EmbeddedDecider:
    """The decision service in this process, with its own OPA and state stores."""

    def __init__(self, runtime: Runtime, *, owned: bool = False) -> None:
        self.runtime = runtime
        self._owned = owned

    @classmethod
    async def start(cls, settings: Settings) -> EmbeddedDecider:
        """Start a Runtime (OPA, policy, stores) that `close()` stops again."""
        runtime = Runtime(settings)
        try:
            await runtime.start()
        except BaseException:
            await runtime.stop()
            raise
        return cls(runtime, owned=True)

    async def decide(self, request: DecideRequest) -> Decision:
        return await self.runtime.service.decide(request, transport=TRANSPORT)

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool:
        try:
            return await self.runtime.service.report_outcome(
                decision_id, outcome_token=outcome_token, succeeded=succeeded
            )
        except EngineError as exc:
            raise DecisionUnavailable(exc.message) from exc

    async def close(self) -> None:
        if self._owned:
            await self.runtime.stop()


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def decide_message(request: DecideRequest) -> Any:
    """The protobuf DecideRequest for `request` (the call as `message` text or tool+args)."""
    principal = request.principal
    message = decision_pb2.DecideRequest(
        server=request.server,
        principal=decision_pb2.Principal(
            session_id=principal.session_id,
            agent_id=principal.agent_id or "",
            user_id=principal.user_id or "",
            roles=principal.roles,
        ),
    )
    if request.message is not None:
        text = request.message
        if not isinstance(text, str):
            text = json.dumps(text, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        message.message = text
    if request.tool is not None:
        message.tool = request.tool
        if request.arguments is not None:
            message.arguments.update(request.arguments)
    if request.approval_id is not None:
        message.approval_id = request.approval_id
    if request.context:
        message.context.update(request.context)
    message.dry_run = request.dry_run
    return message


def decision_from_message(response: Any) -> Decision:
    """The domain Decision for a protobuf DecideResponse (VERDICT_UNSPECIFIED is a deny)."""
    rate_limit = None
    if response.HasField("rate_limit"):
        limit = response.rate_limit
        rate_limit = RateLimitInfo(
            limit=_number(limit.limit),
            remaining=_number(limit.remaining),
            window_seconds=limit.window_seconds,
            retry_after_seconds=limit.retry_after_seconds,
            rule=limit.rule,
            scope=limit.scope,
        )
    approval = None
    if response.HasField("approval"):
        ref = response.approval
        status = STATUS_FROM_PROTO.get(ref.status)
        if status is not None:
            approval = ApprovalRef(
                id=ref.id,
                status=status,
                expires_at=ref.expires_at.ToDatetime(tzinfo=UTC),
            )
    mcp_result = None
    if response.HasField("mcp_result"):
        value = jsonstrict.normalise_numbers(json_format.MessageToDict(response.mcp_result))
        mcp_result = value if isinstance(value, dict) else None
    return Decision(
        decision_id=response.decision_id,
        verdict=VERDICT_FROM_PROTO.get(response.verdict, Verdict.DENY),
        reason=response.reason,
        rule=response.rule,
        policy_revision=response.policy_revision,
        rate_limit=rate_limit,
        approval=approval,
        mcp_result=mcp_result,
        dry_run=True if response.dry_run else None,
        outcome_token=response.outcome_token or None,
    )


class GrpcDecider:
    """A decision service over gRPC: one channel for the life of the proxy."""

    def __init__(self, target: str, *, timeout: float = 5.0) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> EngineError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(details)
        return DecisionUnavailable(
            f"decision service at {self.target} could not {what} ({code.name}: {details})"
        )

    async def decide(self, request: DecideRequest) -> Decision:
        try:
            response = await self._stub.Decide(decide_message(request), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "decide") from exc
        return decision_from_message(response)

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool:
        try:
            response = await self._stub.ReportOutcome(
                decision_pb2.ReportOutcomeRequest(
                    decision_id=decision_id, outcome_token=outcome_token, succeeded=succeeded
                ),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "take the outcome report") from exc
        return bool(response.released)

    async def close(self) -> None:
        await self._channel.close()
