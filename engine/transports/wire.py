"""Protobuf <-> domain: every conversion between mcppolicy.v1 messages and engine models.

The one place the generated messages meet the domain, used by the gRPC server
(`engine.transports.grpc_server`) and by every gRPC client (the proxy's `GrpcDecider`), so a client
never reads the server's tables and nothing is converted twice. Conversions come in
pairs, `x_to_proto` and `x_from_proto`; the side that receives a message checks it while
converting and raises `InvalidRequest` naming the field (the server answers it as
INVALID_ARGUMENT with a google.rpc.BadRequest).

The rules the protos carry as buf.validate annotations (required fields, lengths, exactly
one of `tool` and `message`) are checked by protovalidate on every request the server
decodes (`check_rules`), before anything else runs; the domain models hold the same limits
for the HTTP API (tests/test_wire_rules.py checks that the two agree).

A member of a `oneof` replaces the other when protobuf decodes bytes that carry both, so
a request whose bytes set two (as a client built before `tool`/`message` became the
oneof `call` could send) is caught on the bytes: `check_oneofs`, which the server's
deserializer runs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import (
    descriptor,
    empty_pb2,
    json_format,
    struct_pb2,
    timestamp_pb2,
    unknown_fields,
)
from google.protobuf import message as protobuf_message
from google.protobuf.message import DecodeError
from protovalidate import collect_violations
from pydantic import ValidationError

from engine import jsonstrict
from engine.errors import InvalidRequest, from_validation
from engine.models import (
    Approval,
    ApprovalAction,
    ApprovalRef,
    ApprovalStatus,
    ApprovalWait,
    CallRequest,
    DecideRequest,
    DecideResultRequest,
    Decision,
    OutcomeAck,
    OutcomeReport,
    Principal,
    PrincipalProof,
    RateLimitInfo,
    RedactionCount,
    ResultAction,
    ResultDecision,
    ResultShadowSpec,
    Verdict,
)
from engine.policy.result import refusal
from engine.state.approvals import ApprovalCursor, ApprovalPage
from engine.state.decision_log import DecisionQuery
from engine.transports import paging
from mcppolicy.v1 import approval_pb2, decision_pb2, types_pb2

MAX_ID_CHARS = 256

_VERDICTS: dict[Verdict, types_pb2.Verdict] = {
    Verdict.ALLOW: types_pb2.VERDICT_ALLOW,
    Verdict.DENY: types_pb2.VERDICT_DENY,
    Verdict.RATE_LIMITED: types_pb2.VERDICT_RATE_LIMITED,
    Verdict.APPROVAL_REQUIRED: types_pb2.VERDICT_APPROVAL_REQUIRED,
}
_VERDICTS_FROM_PROTO: dict[int, Verdict] = {int(v): k for k, v in _VERDICTS.items()}
_APPROVAL_STATUSES: dict[ApprovalStatus, types_pb2.ApprovalStatus] = {
    ApprovalStatus.PENDING: types_pb2.APPROVAL_STATUS_PENDING,
    ApprovalStatus.APPROVED: types_pb2.APPROVAL_STATUS_APPROVED,
    ApprovalStatus.DENIED: types_pb2.APPROVAL_STATUS_DENIED,
    ApprovalStatus.USED: types_pb2.APPROVAL_STATUS_USED,
    ApprovalStatus.EXPIRED: types_pb2.APPROVAL_STATUS_EXPIRED,
}
_STATUSES_FROM_PROTO: dict[int, ApprovalStatus] = {int(v): k for k, v in _APPROVAL_STATUSES.items()}
# How a message object goes into DecideRequest.message (one encoder, not one per call).
_MESSAGE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# -- values -------------------------------------------------------------------------------


def _struct_to_dict(
    message: struct_pb2.Struct, what: str, max_depth: int | None = None
) -> dict[str, Any]:
    """A Struct as JSON (integral numbers as ints); with `max_depth`, checked as a
    request's JSON is (depth, finite numbers, valid Unicode)."""
    try:
        value = jsonstrict.normalise_numbers(json_format.MessageToDict(message))
    except ValueError as exc:  # NaN or Infinity in a number_value
        raise InvalidRequest(f"{what} contains a non-finite number", field=what) from exc
    if max_depth is not None:
        jsonstrict.check_value(value, max_depth=max_depth, what=what)
    assert isinstance(value, dict)
    return value


def _dict_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _request_struct(value: Any, what: str) -> struct_pb2.Struct:
    """A client's JSON object for a request Struct; InvalidRequest for anything else."""
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"`{what}` must be a JSON object", field=what)
    try:
        return _dict_to_struct(value)
    except (TypeError, ValueError) as exc:  # a value a Struct cannot hold
        raise InvalidRequest(f"`{what}` holds a value JSON cannot", field=what) from exc


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _instant(message: protobuf_message.Message, field: str) -> datetime | None:
    """A Timestamp field as a datetime (None when unset); InvalidRequest out of range."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    try:
        return stamp.ToDatetime(UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidRequest(f"{field}: a time out of range", field=field) from exc


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def check_id(value: str, field: str, *, required: bool = False) -> str:
    """An id field: at most MAX_ID_CHARS characters; with `required`, not empty."""
    if required and not value:
        raise InvalidRequest(f"{field}: required", field=field)
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{field}: at most {MAX_ID_CHARS} characters", field=field)
    return value


# -- oneofs on the wire -------------------------------------------------------------------


@functools.cache
def _oneof_members(message_type: descriptor.Descriptor) -> dict[int, descriptor.OneofDescriptor]:
    """Field number -> its oneof, for the oneofs of `message_type` with several members
    (a proto3 `optional` is a oneof of one: it cannot be set twice)."""
    return {
        field.number: oneof
        for oneof in message_type.oneofs
        if len(oneof.fields) > 1
        for field in oneof.fields
    }


def check_oneofs(message: protobuf_message.Message, data: bytes) -> None:
    """Refuse `data` (the bytes `message` was decoded from) if it sets two members of one
    of the message's oneofs: decoding kept only the last, so the request is ambiguous."""
    members = _oneof_members(message.DESCRIPTOR)
    if not members:
        return
    try:
        fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError as exc:  # decoded as the message, so not expected
        raise InvalidRequest("the request bytes do not decode", syntax=True) from exc
    seen: dict[str, str] = {}
    for i in range(len(fields)):
        number: int = fields[i].field_number
        oneof = members.get(number)
        if oneof is None:
            continue
        name = oneof.containing_type.fields_by_number[number].name
        first = seen.setdefault(oneof.name, name)
        if first != name:
            names = " or ".join(f"`{f.name}`" for f in oneof.fields)
            raise InvalidRequest(f"give exactly one of {names}, not both", field=first)


# -- buf.validate rules -------------------------------------------------------------------


def check_rules(message: protobuf_message.Message) -> None:
    """Refuse a request that breaks a buf.validate rule of its proto: InvalidRequest naming
    the field of the first violation (e.g. `principal.roles[2]`) and what is wrong."""
    violations = collect_violations(message)
    if not violations:
        return
    found = violations[0].proto
    elements = found.field.elements if found.field is not None else []
    path = ".".join(_path_element(e) for e in elements) or None
    oneof = message.DESCRIPTOR.oneofs_by_name.get(path or "")
    if oneof is not None and found.rule_id == "required":
        names = " or ".join(f"`{f.name}`" for f in oneof.fields)
        raise InvalidRequest(f"give exactly one of {names}, not neither", field=path)
    raise InvalidRequest(f"{path or 'request'}: {found.message}", field=path)


def _path_element(element: Any) -> str:
    subscript = element.subscript
    if subscript is None:
        return str(element.field_name)
    return f"{element.field_name}[{subscript.value!r}]"


# -- enums --------------------------------------------------------------------------------


def verdict_to_proto(verdict: Verdict) -> types_pb2.Verdict:
    return _VERDICTS[verdict]


def verdict_from_proto(value: int, *, field: str = "verdict") -> Verdict | None:
    """None for VERDICT_UNSPECIFIED; InvalidRequest for a number that is no Verdict.
    (A client reading a decision treats both as a deny: `decision_from_proto`.)"""
    if value == types_pb2.VERDICT_UNSPECIFIED:
        return None
    verdict = _VERDICTS_FROM_PROTO.get(value)
    if verdict is None:
        raise InvalidRequest(f"{field}: {value} is not a Verdict", field=field)
    return verdict


def approval_status_to_proto(status: ApprovalStatus) -> types_pb2.ApprovalStatus:
    return _APPROVAL_STATUSES[status]


def approval_status_from_proto(value: int, *, field: str = "status") -> ApprovalStatus | None:
    """None for APPROVAL_STATUS_UNSPECIFIED; InvalidRequest for a number that is none."""
    if value == types_pb2.APPROVAL_STATUS_UNSPECIFIED:
        return None
    status = _STATUSES_FROM_PROTO.get(value)
    if status is None:
        raise InvalidRequest(f"{field}: {value} is not an ApprovalStatus", field=field)
    return status


# -- principal ----------------------------------------------------------------------------


def principal_to_proto(principal: Principal) -> types_pb2.Principal:
    return types_pb2.Principal(
        session_id=principal.session_id,
        agent_id=principal.agent_id or "",
        user_id=principal.user_id or "",
        roles=principal.roles,
    )


def _principal_fields(message: types_pb2.Principal) -> dict[str, Any]:
    """Empty agent and user ids are "not given" (proto3 strings have no absence)."""
    return {
        "session_id": message.session_id,
        "agent_id": message.agent_id or None,
        "user_id": message.user_id or None,
        "roles": list(message.roles),
    }


def principal_from_proto(message: types_pb2.Principal) -> Principal:
    try:
        return Principal.model_validate(_principal_fields(message))
    except ValidationError as exc:
        error = from_validation(exc, "principal.")
        raise InvalidRequest(error.message, field=f"principal.{error.field}") from exc


# -- Decide -------------------------------------------------------------------------------


_CallMessage = decision_pb2.DecideRequest | decision_pb2.DecideResultRequest


def decide_request_to_proto(request: DecideRequest) -> decision_pb2.DecideRequest:
    """The message for `request`: the call as `tool` (+ `arguments`) or `message` text (a
    message object is sent as its JSON text). Both or neither: InvalidRequest, as the
    service would answer."""
    message = decision_pb2.DecideRequest()
    _call_to_proto(request, message)
    if request.approval_id is not None:
        message.approval_id = request.approval_id
    return message


def _call_to_proto(request: CallRequest, message: _CallMessage) -> None:
    """Set the call's fields (the same in DecideRequest and DecideResultRequest)."""
    has_tool, has_message = request.tool is not None, request.message is not None
    if has_tool == has_message:
        raise InvalidRequest(
            "give exactly one of `tool` (with `arguments`) or `message`, not "
            + ("both" if has_tool else "neither"),
            field="tool" if has_tool else "message",
        )
    message.server = request.server
    message.principal.CopyFrom(principal_to_proto(request.principal))
    message.dry_run = request.dry_run
    message.principal_verified = request.principal_verified
    if request.tool is not None:
        message.tool = request.tool
    else:
        text = request.message
        if not isinstance(text, str):
            try:
                text = _MESSAGE_JSON.encode(text)
            except ValueError as exc:
                raise InvalidRequest(
                    "message contains a non-finite number", field="message"
                ) from exc
        message.message = text
    if request.arguments is not None:  # with `message` too: the service refuses that
        message.arguments.CopyFrom(_request_struct(request.arguments, "arguments"))
    if request.context:
        message.context.CopyFrom(_request_struct(request.context, "context"))
    if request.credential is not None:
        message.credential = request.credential


def decide_request_from_proto(
    message: decision_pb2.DecideRequest, *, max_depth: int
) -> DecideRequest:
    try:
        fields = _call_fields(message, max_depth)
    except DecodeError as exc:  # protobuf's own nesting limit, met while reading a Struct
        raise _too_deep(max_depth) from exc
    if message.HasField("approval_id"):
        fields["approval_id"] = message.approval_id
    try:
        return DecideRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(
        f"request could not be decoded (nests deeper than {max_depth} levels?)", syntax=True
    )


def _call_fields(message: _CallMessage, max_depth: int) -> dict[str, Any]:
    """The call's fields of a DecideRequest or DecideResultRequest, as the model takes them."""
    fields: dict[str, Any] = {
        "server": message.server,
        "dry_run": message.dry_run,
        "principal_verified": message.principal_verified,
    }
    call = message.WhichOneof("call")
    if call == "tool":
        fields["tool"] = message.tool
    elif call == "message":
        fields["message"] = message.message
    if message.HasField("arguments"):
        fields["arguments"] = _struct_to_dict(message.arguments, "arguments", max_depth)
    if message.HasField("context"):
        fields["context"] = _struct_to_dict(message.context, "context", max_depth)
    if message.HasField("credential"):
        fields["credential"] = message.credential
    fields["principal"] = _principal_fields(message.principal)
    return fields


# -- DecideResult -------------------------------------------------------------------------

# How deep a result read back from the service may nest (it never nests deeper than the
# request the service took: MCP_POLICY_MAX_JSON_DEPTH, at most 30).
RESULT_READ_DEPTH = 64
_RESULT_ACTIONS: dict[ResultAction, decision_pb2.ResultAction] = {
    ResultAction.PASS: decision_pb2.RESULT_ACTION_PASS,
    ResultAction.REDACT: decision_pb2.RESULT_ACTION_REDACT,
    ResultAction.BLOCK: decision_pb2.RESULT_ACTION_BLOCK,
}
_RESULT_ACTIONS_FROM_PROTO: dict[int, ResultAction] = {
    int(v): k for k, v in _RESULT_ACTIONS.items()
}


def decide_result_request_to_proto(
    request: DecideResultRequest,
) -> decision_pb2.DecideResultRequest:
    """The message for `request`, its result as JSON text (`result_json`: integers exact,
    and encoded at C speed). InvalidRequest as the service would answer it, for the call
    or for a result JSON cannot carry."""
    message = decision_pb2.DecideResultRequest()
    _call_to_proto(request, message)
    if request.decision_id is not None:
        message.decision_id = request.decision_id
    try:
        message.result_json = _MESSAGE_JSON.encode(request.result)
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON, or not UTF-8
        raise InvalidRequest("result holds a value JSON cannot", field="result") from exc
    return message


def decide_result_request_from_proto(
    message: decision_pb2.DecideResultRequest, *, max_depth: int
) -> tuple[DecideResultRequest, bool]:
    """The request, and whether its result came as JSON text (the answer then carries
    its result the same way). The result's JSON is read strictly; its shape and strings
    are the service's to check (`translate.tool_result`), as for every transport."""
    try:
        fields = _call_fields(message, max_depth)
        as_json = message.WhichOneof("tool_result") == "result_json"
        if as_json:
            try:
                fields["result"] = jsonstrict.loads(
                    message.result_json, max_depth=max_depth, what="result_json"
                )
            except InvalidRequest as exc:
                raise InvalidRequest(exc.message, field="result_json", syntax=True) from exc
        elif message.HasField("result"):
            fields["result"] = _struct_to_dict(message.result, "result")
    except DecodeError as exc:
        raise _too_deep(max_depth) from exc
    if message.HasField("decision_id"):
        fields["decision_id"] = message.decision_id
    try:
        return DecideResultRequest.model_validate(fields), as_json
    except ValidationError as exc:
        raise from_validation(exc) from exc


def result_action_to_proto(action: ResultAction) -> decision_pb2.ResultAction:
    return _RESULT_ACTIONS[action]


def result_decision_to_proto(
    decision: ResultDecision, *, as_json: bool
) -> decision_pb2.DecideResultResponse:
    """The response for `decision`; its result (on redact and block) as JSON text when
    `as_json`, else as a Struct."""
    response = decision_pb2.DecideResultResponse(
        decision_id=decision.decision_id,
        action=result_action_to_proto(decision.action),
        reason=decision.reason,
        rule=decision.rule,
        policy_revision=decision.policy_revision,
        matched=decision.matched,
        dry_run=bool(decision.dry_run),
    )
    for applied in decision.redactions:
        entry = response.redactions.add(rule=applied.rule, count=applied.count)
        if applied.path is not None:
            entry.path = applied.path
        elif applied.pattern is not None:
            entry.pattern = applied.pattern
    for spec in decision.shadow:
        response.shadow.add(level=spec.level, rule=spec.rule, reason=spec.reason)
    if decision.result is not None:
        if as_json:
            response.mcp_result_json = _MESSAGE_JSON.encode(decision.result)
        else:
            response.mcp_result.CopyFrom(_dict_to_struct(decision.result))
    return response


def result_decision_from_proto(response: decision_pb2.DecideResultResponse) -> ResultDecision:
    """The domain ResultDecision for a DecideResultResponse. Fails closed: an action this
    client does not know (RESULT_ACTION_UNSPECIFIED, or a newer one) is a block, and so is
    a redact without its rewritten result; a block without its refusal gets one made from
    the reason. A shadow entry of a level this client does not know is left out."""
    action = _RESULT_ACTIONS_FROM_PROTO.get(response.action)
    shadow = [
        ResultShadowSpec.model_validate({"level": s.level, "rule": s.rule, "reason": s.reason})
        for s in response.shadow
        if s.level in ("pass", "redact", "block")
    ]
    decision = ResultDecision(
        decision_id=response.decision_id,
        action=action or ResultAction.BLOCK,
        rule=response.rule,
        reason=response.reason,
        policy_revision=response.policy_revision,
        redactions=[
            RedactionCount(
                rule=r.rule,
                path=r.path if r.HasField("path") else None,
                pattern=r.pattern if r.HasField("pattern") else None,
                count=r.count,
            )
            for r in response.redactions
        ],
        matched=list(response.matched),
        shadow=shadow,
        dry_run=True if response.dry_run else None,
    )
    form = response.WhichOneof("forward")
    if action is None or action is ResultAction.PASS or form is None:
        if decision.action is not ResultAction.PASS:
            decision.action = ResultAction.BLOCK
            decision.reason = decision.reason or "result withheld (the decision named no result)"
            decision.result = refusal(decision)
        return decision
    if form == "mcp_result_json":
        value = jsonstrict.loads(
            response.mcp_result_json, max_depth=RESULT_READ_DEPTH, what="mcp_result_json"
        )
        if not isinstance(value, dict):
            raise InvalidRequest("mcp_result_json: not a JSON object", field="mcp_result_json")
        decision.result = value
    else:
        decision.result = _struct_to_dict(response.mcp_result, "mcp_result")
    return decision


def who_am_i_to_proto(caller: str | None, *, callers_required: bool) -> decision_pb2.WhoAmIResponse:
    """The WhoAmIResponse naming `caller` (None: the service knows no caller)."""
    return decision_pb2.WhoAmIResponse(caller=caller or "", callers_required=callers_required)


def who_am_i_from_proto(response: decision_pb2.WhoAmIResponse) -> str | None:
    """The proven caller a WhoAmIResponse names, or None."""
    return response.caller or None


def decision_to_proto(decision: Decision) -> decision_pb2.DecideResponse:
    response = decision_pb2.DecideResponse(
        decision_id=decision.decision_id,
        verdict=verdict_to_proto(decision.verdict),
        reason=decision.reason,
        rule=decision.rule,
        policy_revision=decision.policy_revision,
        dry_run=bool(decision.dry_run),
        outcome_token=decision.outcome_token or "",
        denies_tool=bool(decision.denies_tool),
    )
    if decision.rate_limit is not None:
        limit = decision.rate_limit
        response.rate_limit.CopyFrom(
            decision_pb2.RateLimitStatus(
                limit=limit.limit,
                remaining=limit.remaining,
                window_seconds=limit.window_seconds,
                retry_after_seconds=limit.retry_after_seconds,
                rule=limit.rule,
                scope=limit.scope,
            )
        )
    if decision.approval is not None:
        response.approval.CopyFrom(approval_ref_to_proto(decision.approval))
    if decision.mcp_result is not None:
        response.mcp_result.CopyFrom(_dict_to_struct(decision.mcp_result))
    return response


def decision_from_proto(response: decision_pb2.DecideResponse) -> Decision:
    """The domain Decision for a DecideResponse. A verdict this client does not know
    (VERDICT_UNSPECIFIED, or a newer one) is a deny; so is an approval status it does
    not know for the approval (then left out)."""
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
        approval = approval_ref_from_proto(response.approval)
    mcp_result = None
    if response.HasField("mcp_result"):
        mcp_result = _struct_to_dict(response.mcp_result, "mcp_result")
    return Decision(
        decision_id=response.decision_id,
        verdict=_VERDICTS_FROM_PROTO.get(response.verdict, Verdict.DENY),
        reason=response.reason,
        rule=response.rule,
        policy_revision=response.policy_revision,
        rate_limit=rate_limit,
        approval=approval,
        mcp_result=mcp_result,
        dry_run=True if response.dry_run else None,
        denies_tool=True if response.denies_tool else None,
        outcome_token=response.outcome_token or None,
    )


def approval_ref_to_proto(ref: ApprovalRef) -> decision_pb2.ApprovalRef:
    return decision_pb2.ApprovalRef(
        id=ref.id,
        status=approval_status_to_proto(ref.status),
        expires_at=_timestamp(ref.expires_at),
        url=ref.url or "",
    )


def approval_ref_from_proto(ref: decision_pb2.ApprovalRef) -> ApprovalRef | None:
    """The domain ApprovalRef; None for a status this client does not know."""
    status = _STATUSES_FROM_PROTO.get(ref.status)
    if status is None:
        return None
    return ApprovalRef(
        id=ref.id,
        status=status,
        expires_at=ref.expires_at.ToDatetime(tzinfo=UTC),
        url=ref.url or None,
    )


# -- AwaitApproval ------------------------------------------------------------------------


def await_approval_to_proto(approval_id: str, timeout: float) -> decision_pb2.AwaitApprovalRequest:
    return decision_pb2.AwaitApprovalRequest(approval_id=approval_id, timeout_seconds=timeout)


def await_approval_from_proto(request: decision_pb2.AwaitApprovalRequest) -> tuple[str, float]:
    """The approval id (required) and the wait, with the limits of the HTTP body."""
    approval_id = check_id(request.approval_id, "approval_id", required=True)
    try:
        wait = ApprovalWait(timeout_seconds=request.timeout_seconds)
    except ValidationError as exc:
        raise from_validation(exc) from exc
    return approval_id, wait.timeout_seconds


def await_response_to_proto(ref: ApprovalRef) -> decision_pb2.AwaitApprovalResponse:
    return decision_pb2.AwaitApprovalResponse(approval=approval_ref_to_proto(ref))


def await_response_from_proto(response: decision_pb2.AwaitApprovalResponse) -> ApprovalRef | None:
    """The approval as the service answered it; None when it answered none, or a status
    this client does not know (the caller treats it as still undecided)."""
    if not response.HasField("approval"):
        return None
    return approval_ref_from_proto(response.approval)


# -- ReportOutcome ------------------------------------------------------------------------


def report_outcome_to_proto(
    decision_id: str, outcome_token: str, *, succeeded: bool
) -> decision_pb2.ReportOutcomeRequest:
    return decision_pb2.ReportOutcomeRequest(
        decision_id=decision_id, outcome_token=outcome_token, succeeded=succeeded
    )


def report_outcome_from_proto(
    request: decision_pb2.ReportOutcomeRequest,
) -> tuple[str, OutcomeReport]:
    """The decision id (required) and the report; ids and token at most 256 characters."""
    check_id(request.decision_id, "decision_id", required=True)
    check_id(request.outcome_token, "outcome_token")
    report = OutcomeReport(succeeded=request.succeeded, outcome_token=request.outcome_token)
    return request.decision_id, report


def outcome_ack_to_proto(ack: OutcomeAck) -> decision_pb2.ReportOutcomeResponse:
    return decision_pb2.ReportOutcomeResponse(decision_id=ack.decision_id, released=ack.released)


def outcome_ack_from_proto(response: decision_pb2.ReportOutcomeResponse) -> OutcomeAck:
    return OutcomeAck(decision_id=response.decision_id, released=response.released)


# -- approvals ----------------------------------------------------------------------------


def approval_to_proto(approval: Approval) -> approval_pb2.Approval:
    message = approval_pb2.Approval(
        id=approval.id,
        status=approval_status_to_proto(approval.status),
        server=approval.server,
        tool=approval.tool,
        arguments=_dict_to_struct(approval.arguments),
        principal=principal_to_proto(approval.principal),
        rule=approval.rule,
        reason=approval.reason,
        decision_id=approval.decision_id,
        created_at=_timestamp(approval.created_at),
        expires_at=_timestamp(approval.expires_at),
        approver=approval.approver or "",
        comment=approval.comment or "",
        fingerprint=approval.fingerprint,
        approvable_by=approval.approvable_by,
        principal_proof=approval.principal_proof,
        asserted_by=approval.asserted_by or "",
        used_by_decision=approval.used_by_decision or "",
        url=approval.url or "",
    )
    if approval.decided_at is not None:
        message.decided_at.CopyFrom(_timestamp(approval.decided_at))
    if approval.used_at is not None:
        message.used_at.CopyFrom(_timestamp(approval.used_at))
    return message


def approval_from_proto(message: approval_pb2.Approval) -> Approval:
    """The domain Approval for an Approval message (a client reading the service's)."""
    status = approval_status_from_proto(message.status)
    if status is None:
        raise InvalidRequest("status: required", field="status")
    created_at = _instant(message, "created_at")
    expires_at = _instant(message, "expires_at")
    if created_at is None or expires_at is None:
        missing = "created_at" if created_at is None else "expires_at"
        raise InvalidRequest(f"{missing}: required", field=missing)
    return Approval(
        id=message.id,
        status=status,
        server=message.server,
        tool=message.tool,
        arguments=_struct_to_dict(message.arguments, "arguments"),
        principal=principal_from_proto(message.principal),
        rule=message.rule,
        reason=message.reason,
        decision_id=message.decision_id,
        fingerprint=message.fingerprint,
        created_at=created_at,
        expires_at=expires_at,
        decided_at=_instant(message, "decided_at"),
        approver=message.approver or None,
        comment=message.comment or None,
        approvable_by="caller" if message.approvable_by == "caller" else "approvers",
        principal_proof=_PROOFS.get(message.principal_proof, "none"),
        asserted_by=message.asserted_by or None,
        used_at=_instant(message, "used_at"),
        used_by_decision=message.used_by_decision or None,
        url=message.url or None,
    )


_PROOFS: dict[str, PrincipalProof] = {"credential": "credential", "caller": "caller"}


@dataclass(frozen=True)
class ApprovalListing:
    """A ListApprovalsRequest as the store takes it."""

    status: ApprovalStatus | None
    size: int
    after: ApprovalCursor | None


def approval_listing_from_proto(request: approval_pb2.ListApprovalsRequest) -> ApprovalListing:
    """Status, page size and position. The deprecated `limit` still works as the page
    size; set together with `page_size` it must be the same."""
    status = approval_status_from_proto(request.status, field="status")
    if request.limit and request.page_size and request.limit != request.page_size:
        raise InvalidRequest(
            "limit (deprecated) and page_size differ: set page_size only", field="limit"
        )
    if request.page_size or not request.limit:
        size = paging.page_size(request.page_size, field="page_size")
    else:
        size = paging.page_size(request.limit, field="limit")
    after = None
    if request.page_token:
        after = ApprovalCursor.from_token(request.page_token, field="page_token")
    return ApprovalListing(status=status, size=size, after=after)


def approvals_page_to_proto(page: ApprovalPage) -> approval_pb2.ListApprovalsResponse:
    return approval_pb2.ListApprovalsResponse(
        approvals=[approval_to_proto(a) for a in page.approvals],
        next_page_token="" if page.next is None else page.next.token(),
    )


def approval_id_from_proto(request: approval_pb2.GetApprovalRequest) -> str:
    return check_id(request.id, "id", required=True)


def approval_action_from_proto(
    request: approval_pb2.ApproveRequest | approval_pb2.DenyRequest,
) -> tuple[str, ApprovalAction]:
    """The approval id (required) and the action, with the limits of the HTTP body."""
    check_id(request.id, "id", required=True)
    declared = request.approver if request.HasField("approver") else None
    try:
        return request.id, ApprovalAction(approver=declared, comment=request.comment)
    except ValidationError as exc:
        raise from_validation(exc) from exc


# -- decision log -------------------------------------------------------------------------


def decision_query_from_proto(request: decision_pb2.ListDecisionsRequest) -> DecisionQuery:
    """The query; the verdict from `verdict_value`, or from the deprecated string
    `verdict` (both may be set if they name the same verdict)."""
    chosen = verdict_from_proto(request.verdict_value, field="verdict_value")
    text = request.verdict
    known = {v.value for v in Verdict}
    if chosen is not None and text in known and text != chosen.value:
        raise InvalidRequest(
            f"verdict (deprecated) {text!r} and verdict_value "
            f"{types_pb2.Verdict.Name(request.verdict_value)} differ: set verdict_value only",
            field="verdict",
        )
    return paging.decision_query(
        session_id=request.session_id,
        agent_id=request.agent_id,
        tool=request.tool,
        verdict=text or (chosen.value if chosen is not None else None),
        since=_instant(request, "since"),
        until=_instant(request, "until"),
        limit=request.page_size,
        token=request.page_token,
        names={"limit": "page_size", "token": "page_token"},
    )


def decisions_page_to_proto(
    records: list[dict[str, Any]], next_page_token: str | None
) -> decision_pb2.ListDecisionsResponse:
    return decision_pb2.ListDecisionsResponse(
        decisions=[_dict_to_struct(r) for r in records],
        next_page_token=next_page_token or "",
    )
