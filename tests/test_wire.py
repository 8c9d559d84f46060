"""engine/transports/wire.py, the one conversion between protobuf and the domain: every conversion
round-trips, the receiving side refuses what the protos' rules refuse, and through a
running service: ListApprovals pages like ListDecisions, the decision log filters by the
Verdict enum (and still by the deprecated string), and a Decide whose bytes carry both
`tool` and `message` is INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from engine.errors import InvalidRequest
from engine.identity import add_entry
from engine.models import (
    Approval,
    ApprovalRef,
    ApprovalStatus,
    DecideRequest,
    Decision,
    OutcomeAck,
    OutcomeReport,
    Principal,
    RateLimitInfo,
    Verdict,
)
from engine.service import mcp_result
from engine.state.approvals import ApprovalCursor, ApprovalPage
from engine.transports import wire
from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import (
    approval_pb2,
    approval_pb2_grpc,
    decision_pb2,
    decision_pb2_grpc,
    types_pb2,
)
from tests.clients import GrpcClient
from tests.conftest import (
    APPROVER_TOKEN,
    HEALTHIMAGING,
    approval_call,
    copy_call,
    session,
    settings_for,
)

DEPTH = 24
OPERATOR = (("authorization", f"Bearer {APPROVER_TOKEN}"),)
WHEN = datetime(2030, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "principal",
    [
        Principal(agent_id="a", session_id="s", user_id="u", roles=["r1", "r2"]),
        Principal(session_id="s"),
    ],
)
def test_principal_round_trips(principal: Principal) -> None:
    assert wire.principal_from_proto(wire.principal_to_proto(principal)) == principal


def test_a_principal_without_a_session_is_refused() -> None:
    with pytest.raises(InvalidRequest) as refused:
        wire.principal_from_proto(types_pb2.Principal(agent_id="a"))
    assert refused.value.field == "principal.session_id"


def test_every_verdict_and_status_round_trips() -> None:
    for verdict in Verdict:
        assert wire.verdict_from_proto(wire.verdict_to_proto(verdict)) is verdict
    for status in ApprovalStatus:
        assert wire.approval_status_from_proto(wire.approval_status_to_proto(status)) is status
    assert wire.verdict_from_proto(types_pb2.VERDICT_UNSPECIFIED) is None
    assert wire.approval_status_from_proto(types_pb2.APPROVAL_STATUS_UNSPECIFIED) is None
    with pytest.raises(InvalidRequest, match="verdict_value: 99 is not a Verdict"):
        wire.verdict_from_proto(99, field="verdict_value")
    with pytest.raises(InvalidRequest, match="status: 7 is not an ApprovalStatus"):
        wire.approval_status_from_proto(7)


MESSAGE = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "x"}}


@pytest.mark.parametrize(
    "request_",
    [
        DecideRequest(
            server=HEALTHIMAGING,
            tool="copy_image_set",
            arguments={"datastore_id": "d", "n": 3, "f": 0.5, "nested": {"l": [1, None, True]}},
            principal=Principal(agent_id="a", session_id="s", user_id="u", roles=["r"]),
            approval_id="apr_1",
            context={"k": "v"},
            dry_run=True,
            credential="agent-token",
        ),
        DecideRequest(server=HEALTHIMAGING, tool="t", principal=Principal(session_id="s")),
        DecideRequest(
            server=HEALTHIMAGING, message='{"jsonrpc":"2.0"}', principal=Principal(session_id="s")
        ),
    ],
    ids=["tool-and-everything", "tool-only", "message-text"],
)
def test_decide_requests_round_trip(request_: DecideRequest) -> None:
    message = wire.decide_request_to_proto(request_)
    back = wire.decide_request_from_proto(message, max_depth=DEPTH)
    assert back == request_
    wire.check_oneofs(message, message.SerializeToString())  # one of the oneof: fine


def test_a_message_object_is_sent_as_its_json_text() -> None:
    request = DecideRequest(
        server=HEALTHIMAGING, message=MESSAGE, principal=Principal(session_id="s")
    )
    back = wire.decide_request_from_proto(wire.decide_request_to_proto(request), max_depth=DEPTH)
    assert back.model_dump(exclude={"message"}) == request.model_dump(exclude={"message"})
    assert back.message == '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}'


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tool": "t", "message": MESSAGE}, "not both"),
        ({}, "not neither"),
        ({"tool": "t", "arguments": [1, 2]}, "`arguments` must be a JSON object"),
        ({"message": {"x": float("nan")}}, "non-finite"),
    ],
    ids=["both", "neither", "arguments-not-object", "nan"],
)
def test_a_client_refuses_what_the_service_would(fields: dict[str, Any], words: str) -> None:
    request = DecideRequest(server=HEALTHIMAGING, principal=Principal(session_id="s"), **fields)
    with pytest.raises(InvalidRequest, match=words):
        wire.decide_request_to_proto(request)


def refused_decision() -> Decision:
    decision = Decision(
        decision_id="dec_1",
        verdict=Verdict.APPROVAL_REQUIRED,
        reason="needs a human",
        rule="catalog.rule.x",
        policy_revision="sha256:1",
        rate_limit=RateLimitInfo(
            limit=10,
            remaining=9.5,
            window_seconds=60,
            retry_after_seconds=0,
            rule="catalog.rule.x",
            scope="session",
        ),
        approval=ApprovalRef(
            id="apr_1",
            status=ApprovalStatus.PENDING,
            expires_at=WHEN,
            url="https://policy.example/console/approvals/apr_1",
        ),
    )
    decision.mcp_result = mcp_result(decision)
    return decision


@pytest.mark.parametrize(
    "decision",
    [
        refused_decision(),
        Decision(
            decision_id="dec_2",
            verdict=Verdict.ALLOW,
            reason="",
            rule="r",
            policy_revision="p",
            dry_run=True,
            outcome_token="tok",
        ),
    ],
    ids=["refused-with-everything", "allowed"],
)
def test_decisions_round_trip(decision: Decision) -> None:
    assert wire.decision_from_proto(wire.decision_to_proto(decision)) == decision


@pytest.mark.parametrize("verdict", [types_pb2.VERDICT_UNSPECIFIED, 99])
def test_a_client_reads_a_verdict_it_does_not_know_as_a_deny(verdict: int) -> None:
    response = decision_pb2.DecideResponse(decision_id="d", verdict=verdict)  # type: ignore[arg-type]
    assert wire.decision_from_proto(response).verdict is Verdict.DENY


def test_outcome_reports_round_trip() -> None:
    message = wire.report_outcome_to_proto("dec_1", "tok", succeeded=False)
    assert wire.report_outcome_from_proto(message) == (
        "dec_1",
        OutcomeReport(succeeded=False, outcome_token="tok"),
    )
    ack = OutcomeAck(decision_id="dec_1", released=True)
    assert wire.outcome_ack_from_proto(wire.outcome_ack_to_proto(ack)) == ack
    for bad, field in (
        (decision_pb2.ReportOutcomeRequest(), "decision_id"),
        (decision_pb2.ReportOutcomeRequest(decision_id="d" * 257), "decision_id"),
        (
            decision_pb2.ReportOutcomeRequest(decision_id="d", outcome_token="t" * 257),
            "outcome_token",
        ),
    ):
        with pytest.raises(InvalidRequest) as refused:
            wire.report_outcome_from_proto(bad)
        assert refused.value.field == field


def approval(**changes: Any) -> Approval:
    fields: dict[str, Any] = {
        "id": "apr_" + "ab" * 15,
        "status": ApprovalStatus.PENDING,
        "server": HEALTHIMAGING,
        "tool": "copy_image_set",
        "arguments": {"datastore_id": "d", "force": True, "n": 2},
        "principal": Principal(agent_id="a", session_id="s", user_id="u"),
        "rule": "catalog.approval",
        "reason": "an overwrite",
        "decision_id": "dec_1",
        "fingerprint": "f" * 64,
        "created_at": WHEN,
        "expires_at": WHEN + timedelta(minutes=15),
    }
    fields.update(changes)
    return Approval(**fields)


@pytest.mark.parametrize(
    "approval_",
    [
        approval(),
        approval(
            status=ApprovalStatus.DENIED,
            decided_at=WHEN + timedelta(seconds=5),
            approver="alice",
            comment="no",
        ),
        approval(
            status=ApprovalStatus.USED,
            decided_at=WHEN + timedelta(seconds=5),
            approver="ann",
            approvable_by="caller",
            principal_proof="caller",
            asserted_by="proxy-1",
            used_at=WHEN + timedelta(seconds=9),
            used_by_decision="dec_2",
            url="https://policy.example/console/approvals/apr_1",
        ),
        approval(principal_proof="credential"),
    ],
    ids=["pending", "decided", "used-by-caller", "proven"],
)
def test_approvals_round_trip(approval_: Approval) -> None:
    assert wire.approval_from_proto(wire.approval_to_proto(approval_)) == approval_


def test_approval_actions_and_ids_are_checked() -> None:
    request = approval_pb2.ApproveRequest(id="apr_1", approver="alice", comment="ok")
    approval_id, action = wire.approval_action_from_proto(request)
    assert (approval_id, action.approver, action.comment) == ("apr_1", "alice", "ok")
    _, anonymous = wire.approval_action_from_proto(approval_pb2.DenyRequest(id="apr_1"))
    assert anonymous.approver is None, "an unset approver is not an empty name"
    for bad, field in (
        (approval_pb2.DenyRequest(), "id"),
        (approval_pb2.DenyRequest(id="x" * 257), "id"),
        (approval_pb2.DenyRequest(id="apr_1", approver=""), "approver"),
        (approval_pb2.DenyRequest(id="apr_1", comment="c" * 5000), "comment"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            wire.approval_action_from_proto(bad)
        assert refused.value.field == field
    assert wire.approval_id_from_proto(approval_pb2.GetApprovalRequest(id="apr_1")) == "apr_1"
    with pytest.raises(InvalidRequest, match="id: required"):
        wire.approval_id_from_proto(approval_pb2.GetApprovalRequest())


def test_approval_listings() -> None:
    cursor = ApprovalCursor.of(approval())
    listing = wire.approval_listing_from_proto(
        approval_pb2.ListApprovalsRequest(
            status=types_pb2.APPROVAL_STATUS_PENDING, page_size=5, page_token=cursor.token()
        )
    )
    assert listing == wire.ApprovalListing(ApprovalStatus.PENDING, 5, cursor)
    default = wire.approval_listing_from_proto(approval_pb2.ListApprovalsRequest())
    assert default == wire.ApprovalListing(None, 100, None)
    old = wire.approval_listing_from_proto(approval_pb2.ListApprovalsRequest(limit=7))
    assert old.size == 7, "the deprecated limit is still the page size"
    both = approval_pb2.ListApprovalsRequest(limit=7, page_size=7)
    assert wire.approval_listing_from_proto(both).size == 7
    for bad, field in (
        (approval_pb2.ListApprovalsRequest(limit=7, page_size=8), "limit"),
        (approval_pb2.ListApprovalsRequest(limit=5000), "limit"),
        (approval_pb2.ListApprovalsRequest(page_size=-1), "page_size"),
        (approval_pb2.ListApprovalsRequest(page_token="ZDE6NQ"), "page_token"),
        (approval_pb2.ListApprovalsRequest(status=42), "status"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidRequest) as refused:
            wire.approval_listing_from_proto(bad)
        assert refused.value.field == field

    page = wire.approvals_page_to_proto(ApprovalPage([approval()], cursor))
    assert [wire.approval_from_proto(a) for a in page.approvals] == [approval()]
    assert ApprovalCursor.from_token(page.next_page_token, field="page_token") == cursor
    assert wire.approvals_page_to_proto(ApprovalPage([], None)).next_page_token == ""


@pytest.mark.parametrize(
    ("request_", "verdict"),
    [
        (decision_pb2.ListDecisionsRequest(verdict_value=types_pb2.VERDICT_DENY), "deny"),
        (decision_pb2.ListDecisionsRequest(verdict="rate_limited"), "rate_limited"),
        (
            decision_pb2.ListDecisionsRequest(
                verdict="allow", verdict_value=types_pb2.VERDICT_ALLOW
            ),
            "allow",
        ),
        (decision_pb2.ListDecisionsRequest(), None),
    ],
    ids=["enum", "deprecated-string", "both-agree", "none"],
)
def test_decision_queries_take_the_verdict_either_way(
    request_: decision_pb2.ListDecisionsRequest, verdict: str | None
) -> None:
    assert wire.decision_query_from_proto(request_).verdict == verdict


@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [
        (
            decision_pb2.ListDecisionsRequest(
                verdict="deny", verdict_value=types_pb2.VERDICT_ALLOW
            ),
            "verdict",
            "differ: set verdict_value only",
        ),
        (decision_pb2.ListDecisionsRequest(verdict_value=9), "verdict_value", "not a Verdict"),  # type: ignore[arg-type]
        (
            decision_pb2.ListDecisionsRequest(
                verdict="maybe", verdict_value=types_pb2.VERDICT_DENY
            ),
            "verdict",
            "must be one of",
        ),
        (decision_pb2.ListDecisionsRequest(page_size=5000), "page_size", "between 1 and"),
    ],
    ids=["disagree", "unknown-enum", "bad-string", "page-size"],
)
def test_decision_queries_refuse(
    request_: decision_pb2.ListDecisionsRequest, field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        wire.decision_query_from_proto(request_)
    assert refused.value.field == field
    assert words in refused.value.message


def test_decision_pages() -> None:
    records = [{"decision_id": "dec_1", "verdict": "allow", "n": 2}]
    page = wire.decisions_page_to_proto(records, "tok")
    assert [json_format.MessageToDict(r) for r in page.decisions] == [
        {"decision_id": "dec_1", "verdict": "allow", "n": 2.0}
    ]
    assert (page.next_page_token, wire.decisions_page_to_proto([], None).next_page_token) == (
        "tok",
        "",
    )


def both_members(tool_first: bool = True) -> bytes:
    """DecideRequest bytes with `tool` and `message` both set, as an older client built
    them (each alone is a message of its own: bytes concatenate as a merge)."""
    base = decision_pb2.DecideRequest(
        server=HEALTHIMAGING, principal=types_pb2.Principal(session_id=session())
    )
    tool = decision_pb2.DecideRequest(tool="copy_image_set")
    message = decision_pb2.DecideRequest(message='{"jsonrpc":"2.0"}')
    parts = [tool, message] if tool_first else [message, tool]
    return b"".join(m.SerializeToString() for m in (base, *parts))


@pytest.mark.parametrize("tool_first", [True, False])
def test_bytes_with_two_members_of_a_oneof_are_refused(tool_first: bool) -> None:
    data = both_members(tool_first)
    decoded = decision_pb2.DecideRequest.FromString(data)
    assert decoded.WhichOneof("call") == ("message" if tool_first else "tool"), "last one wins"
    with pytest.raises(InvalidRequest) as refused:
        wire.check_oneofs(decoded, data)
    assert refused.value.message == "give exactly one of `tool` or `message`, not both"
    assert refused.value.field == ("tool" if tool_first else "message")
    twice = decision_pb2.DecideRequest(tool="a").SerializeToString() * 2
    wire.check_oneofs(decision_pb2.DecideRequest.FromString(twice), twice)  # the same one


# -- through a running service --------------------------------------------------------------


@dataclass
class Service:
    servers: Servers
    client: GrpcClient
    approvals: approval_pb2_grpc.ApprovalServiceStub
    log: decision_pb2_grpc.DecisionLogServiceStub
    alice: tuple[tuple[str, str], ...]  # an approver
    uma: tuple[tuple[str, str], ...]  # an approver who is user-1, who makes copy_call's calls


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """A service of its own (so a listing holds only this module's approvals)."""
    tmp = tmp_path_factory.mktemp("wire")
    approvers = tmp / "approvers.yaml"
    alice = add_entry(approvers, "approver", "alice", user_id="alice")
    uma = add_entry(approvers, "approver", "uma", user_id="user-1")
    servers = await start_servers(settings_for(tmp, approvers_file=approvers))
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        yield Service(
            servers,
            GrpcClient(channel),
            approval_pb2_grpc.ApprovalServiceStub(channel),
            decision_pb2_grpc.DecisionLogServiceStub(channel),
            bearer(alice),
            bearer(uma),
        )
    await servers.stop()


async def make_approvals(service: Service, count: int, *, user: str = "user-1") -> list[str]:
    """`count` pending approvals (one per session), oldest first."""
    ids = []
    for _ in range(count):
        body = approval_call()  # a copy into an existing image set needs approval
        body["principal"]["user_id"] = user
        decision = await service.client.decide(body)
        assert decision["verdict"] == "approval_required", decision
        ids.append(decision["approval"]["id"])
    return ids


async def pages(
    service: Service, request: approval_pb2.ListApprovalsRequest, metadata: Any = OPERATOR
) -> list[list[str]]:
    """Every page's ids, following next_page_token to the end."""
    found: list[list[str]] = []
    while True:
        reply = await service.approvals.ListApprovals(request, metadata=metadata)
        found.append([a.id for a in reply.approvals])
        if not reply.next_page_token:
            return found
        assert not reply.next_page_token.isdigit(), "tokens are opaque"
        following = approval_pb2.ListApprovalsRequest()
        following.CopyFrom(request)
        following.page_token = reply.next_page_token
        request = following
        assert len(found) < 100, "the pages end"


async def list_all(
    service: Service, metadata: Any = OPERATOR, status: int = 0
) -> list[approval_pb2.Approval]:
    reply = await service.approvals.ListApprovals(
        approval_pb2.ListApprovalsRequest(page_size=1000, status=status),  # type: ignore[arg-type]
        metadata=metadata,
    )
    assert not reply.next_page_token
    return list(reply.approvals)


def ids(approvals: list[approval_pb2.Approval]) -> list[str]:
    return [a.id for a in approvals]


async def test_list_approvals_pages_newest_first(service: Service) -> None:
    made = await make_approvals(service, 5)
    everything = ids(await list_all(service))
    assert everything[:5] == made[::-1]
    found = await pages(service, approval_pb2.ListApprovalsRequest(page_size=2))
    assert sum(found, []) == everything, "every approval once, newest first"
    assert all(len(page) == 2 for page in found[:-1]) and 1 <= len(found[-1]) <= 2
    old = await service.approvals.ListApprovals(
        approval_pb2.ListApprovalsRequest(limit=2), metadata=OPERATOR
    )
    assert ids(list(old.approvals)) == everything[:2], "the deprecated limit still works"
    assert old.next_page_token


async def test_list_approvals_pages_by_status(service: Service) -> None:
    made = await make_approvals(service, 4)
    for approval_id in made[:3]:
        await service.approvals.Deny(
            approval_pb2.DenyRequest(id=approval_id, comment="no"), metadata=service.alice
        )
    denied = await pages(
        service,
        approval_pb2.ListApprovalsRequest(status=types_pb2.APPROVAL_STATUS_DENIED, page_size=2),
    )
    assert sum(denied, []) == ids(await list_all(service, status=types_pb2.APPROVAL_STATUS_DENIED))
    assert sum(denied, [])[:3] == made[2::-1]
    pending = await pages(
        service,
        approval_pb2.ListApprovalsRequest(status=types_pb2.APPROVAL_STATUS_PENDING, page_size=2),
    )
    assert made[3] in sum(pending, []) and not set(made[:3]) & set(sum(pending, []))


async def test_an_approver_pages_through_only_what_they_may_see(service: Service) -> None:
    """uma is user-1: calls made for user-1 are not hers to see (four eyes). Her pages
    skip them and still hold every other approval, once, newest first."""
    await make_approvals(service, 3, user="user-1")
    await make_approvals(service, 3, user="user-2")
    everything = await list_all(service)
    hers = [a.id for a in everything if a.principal.user_id != "user-1"]
    assert 3 <= len(hers) < len(everything)
    assert ids(await list_all(service, service.uma)) == hers
    found = await pages(service, approval_pb2.ListApprovalsRequest(page_size=2), service.uma)
    assert sum(found, []) == hers
    assert all(len(page) <= 2 for page in found)


async def test_list_approvals_refuses_foreign_tokens(service: Service) -> None:
    log = await service.log.ListDecisions(
        decision_pb2.ListDecisionsRequest(page_size=1), metadata=OPERATOR
    )
    for bad in ("123", "١٢٣", "9" * 5000, log.next_page_token or "ZDE6NQ"):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await service.approvals.ListApprovals(
                approval_pb2.ListApprovalsRequest(page_token=bad), metadata=OPERATOR
            )
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "page_token" in (failed.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await service.approvals.ListApprovals(
            approval_pb2.ListApprovalsRequest(limit=2, page_size=3), metadata=OPERATOR
        )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_decision_log_filters_by_the_verdict_enum(service: Service) -> None:
    sid = session()
    await service.client.decide(copy_call(sid))
    await service.client.decide(copy_call(sid, datastore_id="bad"))

    async def verdicts(**fields: Any) -> list[str]:
        reply = await service.log.ListDecisions(
            decision_pb2.ListDecisionsRequest(session_id=sid, **fields), metadata=OPERATOR
        )
        return [json_format.MessageToDict(d)["verdict"] for d in reply.decisions]

    assert await verdicts() == ["deny", "allow"]
    assert await verdicts(verdict_value=types_pb2.VERDICT_DENY) == ["deny"]
    assert await verdicts(verdict="deny") == ["deny"], "the deprecated string still filters"
    assert await verdicts(verdict="allow", verdict_value=types_pb2.VERDICT_ALLOW) == ["allow"]
    for fields in (
        {"verdict": "allow", "verdict_value": types_pb2.VERDICT_DENY},
        {"verdict_value": 42},
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await verdicts(**fields)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_decide_bytes_with_tool_and_message_are_invalid_argument(service: Service) -> None:
    sid = session()
    raw = service.client.channel.unary_unary(
        "/mcppolicy.v1.DecisionService/Decide",
        request_serializer=lambda data: data,
        response_deserializer=decision_pb2.DecideResponse.FromString,
    )
    base = decision_pb2.DecideRequest(
        server=HEALTHIMAGING, principal=types_pb2.Principal(session_id=sid)
    )
    base.arguments.update(copy_call()["arguments"])
    tool = decision_pb2.DecideRequest(tool="copy_image_set")
    message = decision_pb2.DecideRequest(message="{}")
    for parts in ((tool, message), (message, tool)):
        data = b"".join(m.SerializeToString() for m in (base, *parts))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await raw(data)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not both" in (failed.value.details() or "")
        status = status_pb2.Status.FromString(
            dict(failed.value.trailing_metadata() or ())["grpc-status-details-bin"]
        )
        detail = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(detail)
        assert detail.field_violations[0].field in ("tool", "message")
    allowed = await service.client.decide(copy_call(sid))
    assert allowed["verdict"] == "allow"
    assert allowed["rate_limit"]["remaining"] == 9, "the refused requests took no slot"
