"""The buf.validate rules of the protos and the limits of the domain models agree.

A gRPC request is checked against its proto's rules (protovalidate) before anything else;
an HTTP body against the pydantic models. Both describe the same requests, so each limit
is compared here: a change on one side that is not made on the other fails this test.
No OPA, no server: the descriptors and the models only.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from buf.validate import validate_pb2
from engine import models
from engine.errors import InvalidRequest
from engine.transports import paging, wire
from mcppolicy.v1 import approval_pb2, decision_pb2, types_pb2


def _rules(message: Any, field: str) -> Any:
    """The buf.validate FieldRules of `message.field`."""
    options = message.DESCRIPTOR.fields_by_name[field].GetOptions()
    return options.Extensions[validate_pb2.field]


def _string_limits(message: Any, field: str) -> tuple[int | None, int | None]:
    rules = _rules(message, field)
    if rules.HasField("repeated"):
        rules = rules.repeated.items
    string = rules.string
    return (
        string.min_len if string.HasField("min_len") else None,
        string.max_len if string.HasField("max_len") else None,
    )


def _schema_limits(model: type[BaseModel], field: str) -> tuple[int | None, int | None]:
    """minLength / maxLength of a string field of `model` (an optional one too)."""
    schema = model.model_json_schema()
    prop = schema["properties"][field]
    if prop.get("type") == "array":
        prop = prop["items"]
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "string":
            return option.get("minLength"), option.get("maxLength")
    raise AssertionError(f"{model.__name__}.{field} is not a string field")


# (proto message, proto field, model, model field); an empty proto3 string is "not given"
# where the model's field is optional, so only the maximum is compared there.
STRING_FIELDS: list[tuple[Any, str, type[BaseModel], str, bool]] = [
    (decision_pb2.DecideRequest, "server", models.DecideRequest, "server", True),
    (decision_pb2.DecideRequest, "approval_id", models.DecideRequest, "approval_id", True),
    (decision_pb2.DecideRequest, "credential", models.DecideRequest, "credential", True),
    (types_pb2.Principal, "session_id", models.Principal, "session_id", True),
    (types_pb2.Principal, "agent_id", models.Principal, "agent_id", False),
    (types_pb2.Principal, "user_id", models.Principal, "user_id", False),
    (types_pb2.Principal, "roles", models.Principal, "roles", False),
    (
        decision_pb2.ReportOutcomeRequest,
        "outcome_token",
        models.OutcomeReport,
        "outcome_token",
        False,
    ),
    (approval_pb2.ApproveRequest, "approver", models.ApprovalAction, "approver", True),
    (approval_pb2.DenyRequest, "approver", models.ApprovalAction, "approver", True),
    (approval_pb2.ApproveRequest, "comment", models.ApprovalAction, "comment", False),
    (approval_pb2.DenyRequest, "comment", models.ApprovalAction, "comment", False),
]


@pytest.mark.parametrize(
    ("message", "field", "model", "model_field", "both"),
    STRING_FIELDS,
    ids=[f"{m.DESCRIPTOR.name}.{f}" for m, f, *_ in STRING_FIELDS],
)
def test_string_limits_agree(
    message: Any, field: str, model: type[BaseModel], model_field: str, both: bool
) -> None:
    proto_min, proto_max = _string_limits(message, field)
    model_min, model_max = _schema_limits(model, model_field)
    assert proto_max is not None and proto_max == model_max
    if both:
        assert proto_min == model_min
    else:
        assert not proto_min


def test_roles_count_agrees() -> None:
    rules = _rules(types_pb2.Principal, "roles")
    schema = models.Principal.model_json_schema()["properties"]["roles"]
    assert rules.repeated.max_items == schema["maxItems"]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (approval_pb2.GetApprovalRequest, "id"),
        (approval_pb2.ApproveRequest, "id"),
        (approval_pb2.DenyRequest, "id"),
        (decision_pb2.ReportOutcomeRequest, "decision_id"),
    ],
)
def test_ids_are_required_and_bounded_like_every_id(message: Any, field: str) -> None:
    assert _string_limits(message, field) == (1, wire.MAX_ID_CHARS)


@pytest.mark.parametrize("field", ["session_id", "agent_id", "tool"])
def test_decision_log_filters_bounded_like_the_http_filters(field: str) -> None:
    assert _string_limits(decision_pb2.ListDecisionsRequest, field) == (
        None,
        paging.MAX_FILTER_LENGTH,
    )


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (decision_pb2.ListDecisionsRequest, "page_size"),
        (approval_pb2.ListApprovalsRequest, "page_size"),
        (approval_pb2.ListApprovalsRequest, "limit"),
    ],
)
def test_page_sizes_bounded_like_paging(message: Any, field: str) -> None:
    rules = _rules(message, field).int32
    assert (rules.gte, rules.lte) == (0, paging.MAX_PAGE_SIZE)


REQUESTS = [
    decision_pb2.DecideRequest,
    types_pb2.Principal,
    decision_pb2.ReportOutcomeRequest,
    decision_pb2.ListDecisionsRequest,
    approval_pb2.ListApprovalsRequest,
    approval_pb2.GetApprovalRequest,
    approval_pb2.ApproveRequest,
    approval_pb2.DenyRequest,
]

# String fields of the requests that carry no buf.validate rule, and why: the raw JSON-RPC
# text is bounded by the message size and checked by the strict parser; a page token is
# checked as a token; the deprecated verdict string must name a verdict.
UNRULED = {
    "DecideRequest.message",
    "ListDecisionsRequest.verdict",
    "ListDecisionsRequest.page_token",
    "ListApprovalsRequest.page_token",
}


def test_every_string_field_of_a_request_has_a_rule() -> None:
    """A string field added to a request without a rule (or a rule dropped) fails here."""
    string = 9  # FieldDescriptor.TYPE_STRING
    fields = {
        f"{m.DESCRIPTOR.name}.{f.name}": _rules(m, f.name).ByteSize() > 0
        for m in REQUESTS
        for f in m.DESCRIPTOR.fields
        if f.type == string
    }
    assert {name for name, ruled in fields.items() if not ruled} == UNRULED


def test_the_call_oneof_is_required() -> None:
    call = decision_pb2.DecideRequest.DESCRIPTOR.oneofs_by_name["call"]
    assert call.GetOptions().Extensions[validate_pb2.oneof].required


# -- check_rules ---------------------------------------------------------------------------


def _violation(message: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        wire.check_rules(message)
    return caught.value


def _decide(**fields: Any) -> decision_pb2.DecideRequest:
    request = decision_pb2.DecideRequest(server="srv", tool="t", **fields)
    request.principal.session_id = "s-1"
    return request


def test_check_rules_passes_a_good_request() -> None:
    wire.check_rules(_decide())


def test_check_rules_names_the_field_and_the_limit() -> None:
    found = _violation(_decide(credential="x" * 8193))
    assert found.field == "credential"
    assert "8192" in str(found)


def test_check_rules_names_a_missing_call_as_the_oneof() -> None:
    request = decision_pb2.DecideRequest(server="srv")
    request.principal.session_id = "s-1"
    found = _violation(request)
    assert found.field == "call"
    assert str(found) == "give exactly one of `tool` or `message`, not neither"


def test_check_rules_names_a_repeated_element_by_index() -> None:
    request = _decide()
    request.principal.roles.extend(["a", "b", "c" * 300])
    assert _violation(request).field == "principal.roles[2]"


def test_check_rules_on_every_annotated_field() -> None:
    """Each rule fires on its own: one bad field, one violation naming it."""
    cases: list[tuple[Any, str]] = []
    for message, field, _model, _model_field, _both in STRING_FIELDS:
        descriptor_field = message.DESCRIPTOR.fields_by_name[field]
        _min, limit = _string_limits(message, field)
        assert limit is not None
        request = _valid(message)
        if descriptor_field.is_repeated:
            getattr(request, field).append("x" * (limit + 1))
            cases.append((request, f"{field}[0]"))
        else:
            setattr(request, field, "x" * (limit + 1))
            cases.append((request, field))
    for request, field in cases:
        assert _violation(request).field == field, field


def _valid(message: Any) -> Any:
    """A request of type `message` that passes every rule."""
    if message is decision_pb2.DecideRequest:
        return _decide()
    if message is types_pb2.Principal:
        return types_pb2.Principal(session_id="s-1")
    if message is decision_pb2.ReportOutcomeRequest:
        return decision_pb2.ReportOutcomeRequest(decision_id="d-1")
    return message(id="a-1")
