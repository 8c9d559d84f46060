"""Hostile input through both transports: lone surrogates, numbers past every limit,
undecodable protobuf, oversized fields, odd page tokens and timestamps.

Every case ends in a 4xx (INVALID_ARGUMENT over gRPC) naming what is wrong, quoting the
caller's input only up to a bound and never an internal exception; nothing is consumed,
and the decision log still writes afterwards."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import timestamp_pb2

from engine.transports.server import Servers
from mcppolicy.v1 import approval_pb2, decision_pb2, types_pb2
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import APPROVER_TOKEN, HEALTHIMAGING, approval_call, copy_call, session

Client = HttpClient | GrpcClient
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
GRPC_AUTH = (("authorization", f"Bearer {APPROVER_TOKEN}"),)
INTERNALS = ("Traceback", "<class", "DecodeError", "UnicodeEncodeError", "ValueError", "Exceeds")


def message_text(name: str = "copy_image_set", arguments: str | None = None) -> str:
    args = arguments or json.dumps(copy_call()["arguments"])
    return (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
        + json.dumps(name)
        + ',"arguments":'
        + args
        + "}}"
    )


def body_text(sid: str, *, tool: str = '"copy_image_set"', arguments: str = "", **raw: str) -> str:
    """A decide body as JSON text, so escapes and literals reach the server as written."""
    args = arguments or json.dumps(copy_call()["arguments"])
    fields = {
        "server": json.dumps(HEALTHIMAGING),
        "tool": tool,
        "arguments": args,
        "principal": json.dumps({"agent_id": f"agent-{sid}", "session_id": sid}),
        **raw,
    }
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


def bad_message(text: str) -> str:
    return json.dumps(text)  # as the JSON string value of `message`


# (case, body text given a session id, words the error must contain)
HTTP_CASES: list[tuple[str, Any, str]] = [
    ("surrogate-tool", lambda s: body_text(s, tool='"copy\\ud800"'), "surrogate"),
    (
        "surrogate-argument",
        lambda s: body_text(s, arguments='{"datastore_id":"\\udfff"}'),
        "arguments.datastore_id",
    ),
    ("surrogate-key", lambda s: body_text(s, arguments='{"\\ud83d":1}'), "surrogate"),
    ("surrogate-context", lambda s: body_text(s, context='{"a":["\\udc00"]}'), "context.a[0]"),
    ("surrogate-server", lambda s: body_text(s, server='"x\\ud800"'), "surrogate"),
    ("surrogate-approval-id", lambda s: body_text(s, approval_id='"\\ud800"'), "surrogate"),
    (
        "surrogate-session",
        lambda s: body_text(s, principal='{"session_id":"\\ud800' + s + '"}'),
        "surrogate",
    ),
    (
        "surrogate-in-message-text",
        lambda s: body_text(
            s,
            tool="null",
            arguments="null",
            message=bad_message(message_text(arguments='{"datastore_id":"\\ud800"}')),
        ),
        "surrogate",
    ),
    ("huge-integer", lambda s: body_text(s, arguments='{"n":' + "9" * 5000 + "}"), "digits"),
    (
        "huge-integer-in-message",
        lambda s: body_text(
            s,
            tool="null",
            arguments="null",
            message=bad_message(message_text(arguments='{"n":' + "1" * 5000 + "}")),
        ),
        "digits",
    ),
    ("float-overflow", lambda s: body_text(s, arguments='{"n":1e400}'), "out of range"),
    ("negative-overflow", lambda s: body_text(s, arguments='{"n":-1e999}'), "out of range"),
    ("nan", lambda s: body_text(s, arguments='{"n":NaN}'), "non-finite"),
    ("duplicate-key", lambda s: body_text(s, arguments='{"a":1,"a":2}'), "duplicate"),
    ("not-utf8", lambda s: body_text(s).encode() + b"\xff", "UTF-8"),
]


def sent(body: Any) -> bytes:
    return body if isinstance(body, bytes) else body.encode()


async def assert_nothing_consumed(client: Client, sid: str) -> None:
    decision = await client.decide(copy_call(sid))
    assert decision["verdict"] == "allow"
    assert decision["rate_limit"]["remaining"] == 9, "a refused request took a slot"


@pytest.mark.parametrize(("case", "make", "words"), HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
async def test_hostile_json_is_a_clean_400(
    http: HttpClient, case: str, make: Any, words: str
) -> None:
    sid = session()
    response = await http.raw.post(
        "/v1/decide", content=sent(make(sid)), headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert words in error["message"] + error.get("field", ""), error
    assert not any(word in response.text for word in INTERNALS)
    await assert_nothing_consumed(http, sid)


GRPC_MESSAGES: list[tuple[str, str, str]] = [
    ("surrogate", message_text(arguments='{"a":"\\ud800"}'), "surrogate"),
    (
        "surrogate-name",
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"copy\\ud800"}}',
        "surrogate",
    ),
    ("huge-integer", message_text(arguments='{"n":' + "7" * 5000 + "}"), "digits"),
    ("float-overflow", message_text(arguments='{"n":1e400}'), "out of range"),
]


@pytest.mark.parametrize(
    ("case", "text", "words"), GRPC_MESSAGES, ids=[c[0] for c in GRPC_MESSAGES]
)
async def test_hostile_message_text_over_grpc(
    grpc_client: GrpcClient, case: str, text: str, words: str
) -> None:
    sid = session()
    request = decision_pb2.DecideRequest(
        server=HEALTHIMAGING, message=text, principal=types_pb2.Principal(session_id=sid)
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await grpc_client.decisions.Decide(request)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = failed.value.details() or ""
    assert words in details
    assert not any(word in details for word in INTERNALS)
    await assert_nothing_consumed(grpc_client, sid)


def valid_request_bytes(sid: str) -> bytes:
    message = decision_pb2.DecideRequest(
        server=HEALTHIMAGING,
        tool="copy_image_set",
        principal=types_pb2.Principal(session_id=sid),
    )
    message.arguments.update(copy_call()["arguments"])
    data: bytes = message.SerializeToString()
    return data


def bad_utf8_string_field() -> bytes:
    # field 1 (server), wire type 2, length 3, bytes that are not UTF-8
    return b"\x0a\x03\xff\xfe\xfd"


RAW_BODIES: list[tuple[str, Any]] = [
    ("truncated", lambda sid: valid_request_bytes(sid)[:-3]),
    ("bad-utf8-string", lambda sid: bad_utf8_string_field() + valid_request_bytes(sid)[5:]),
    ("garbage", lambda sid: b"\xff" * 64),
    ("bad-length", lambda sid: b"\x0a\xff\xff\xff\xff\x0f"),
]


@pytest.mark.parametrize(("case", "make"), RAW_BODIES, ids=[c[0] for c in RAW_BODIES])
async def test_undecodable_protobuf_is_invalid_argument(
    servers: Servers, grpc_client: GrpcClient, case: str, make: Any
) -> None:
    sid = session()
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        raw = channel.unary_unary(
            "/mcppolicy.v1.DecisionService/Decide",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await raw(make(sid))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = failed.value.details() or ""
    assert "do not decode" in details
    assert not any(word in details for word in INTERNALS)
    await assert_nothing_consumed(grpc_client, sid)


async def test_raw_protobuf_for_every_method_never_unknown(servers: Servers) -> None:
    """Undecodable bytes to every unary method of ours: INVALID_ARGUMENT, never UNKNOWN."""
    methods = [
        "/mcppolicy.v1.DecisionService/Decide",
        "/mcppolicy.v1.DecisionService/ReportOutcome",
        "/mcppolicy.v1.ApprovalService/ListApprovals",
        "/mcppolicy.v1.ApprovalService/GetApproval",
        "/mcppolicy.v1.ApprovalService/Approve",
        "/mcppolicy.v1.ApprovalService/Deny",
        "/mcppolicy.v1.DecisionLogService/ListDecisions",
    ]
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        for method in methods:
            raw = channel.unary_unary(
                method, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await raw(b"\x0a\x05ab", metadata=GRPC_AUTH)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method


async def test_errors_quote_input_only_up_to_a_bound(client: Client) -> None:
    """A 900 KB tool name on a request that is wrong elsewhere: the answer is small."""
    body = {**copy_call(), "tool": "t" * 900_000, "message": {"x": 1}}
    if client.name == "http":
        response = await client.raw.post("/v1/decide", json=body)  # type: ignore[union-attr]
        assert response.status_code == 422
        assert len(response.content) < 4096
    with pytest.raises(ApiError) as failed:
        await client.decide(body)
    assert len(failed.value.message) < 2048


async def test_an_unknown_field_name_is_quoted_bounded(http: HttpClient) -> None:
    body = {**copy_call(), "k" * 500_000: 1}
    response = await http.raw.post("/v1/decide", json=body)
    assert response.status_code == 422
    assert len(response.content) < 4096
    assert "Extra inputs" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/decisions?limit=abc", 422),
        ("/v1/decisions?limit=0", 422),
        ("/v1/decisions?limit=100000", 422),
        ("/v1/decisions?verdict=maybe", 422),
        ("/v1/decisions?since=not-a-time", 422),
        ("/v1/decisions?since=9999-12-31T23:59:59-23:59", 422),
        ("/v1/decisions?cursor=123", 422),
        ("/v1/decisions?cursor=%D9%A1%D9%A2%D9%A3", 422),
        ("/v1/decisions?cursor=" + "9" * 5000, 422),
        ("/v1/approvals?status=whatever", 422),
        ("/v1/approvals?limit=-1", 422),
        ("/v1/status?hours=-1", 422),
        ("/v1/no-such-thing", 404),
    ],
)
async def test_query_errors_have_the_one_error_shape(
    http: HttpClient, path: str, status: int
) -> None:
    response = await http.raw.get(path, headers=AUTH)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"]
    assert len(response.content) < 2048


async def test_method_not_allowed_has_the_error_shape(http: HttpClient) -> None:
    response = await http.raw.get("/v1/decide")
    assert response.status_code == 405
    assert set(response.json()) == {"error"}


async def test_page_tokens_are_opaque_and_checked(
    http: HttpClient, grpc_client: GrpcClient
) -> None:
    sid = session()
    for _ in range(3):
        await http.decide(copy_call(sid))
    page = (await http.raw.get(f"/v1/decisions?session_id={sid}&limit=2", headers=AUTH)).json()
    token = page["next_cursor"]
    assert isinstance(token, str) and not token.isdigit()
    rest = (
        await http.raw.get(f"/v1/decisions?session_id={sid}&limit=2&cursor={token}", headers=AUTH)
    ).json()
    assert len(page["decisions"]) == 2 and len(rest["decisions"]) == 1
    seen = {d["decision_id"] for d in page["decisions"] + rest["decisions"]}
    assert len(seen) == 3
    stub = grpc_client.channel.unary_unary(
        "/mcppolicy.v1.DecisionLogService/ListDecisions",
        request_serializer=decision_pb2.ListDecisionsRequest.SerializeToString,
        response_deserializer=decision_pb2.ListDecisionsResponse.FromString,
    )
    reply = await stub(
        decision_pb2.ListDecisionsRequest(session_id=sid, page_size=2, page_token=token),
        metadata=GRPC_AUTH,
    )
    assert len(reply.decisions) == 1
    for bad in ("123", "١٢٣", "9" * 5000, token + "!", token + "=", "ZDE6LTE"):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub(decision_pb2.ListDecisionsRequest(page_token=bad), metadata=GRPC_AUTH)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "page_token" in (failed.value.details() or "")


@pytest.mark.parametrize(
    "request_",
    [
        decision_pb2.ListDecisionsRequest(page_size=-1),
        decision_pb2.ListDecisionsRequest(page_size=1001),
        decision_pb2.ListDecisionsRequest(verdict="maybe"),
        decision_pb2.ListDecisionsRequest(session_id="s" * 10_000),
        decision_pb2.ListDecisionsRequest(since=timestamp_pb2.Timestamp(seconds=2**62)),
        decision_pb2.ListDecisionsRequest(until=timestamp_pb2.Timestamp(seconds=-(2**62))),
        decision_pb2.ListDecisionsRequest(since=timestamp_pb2.Timestamp(nanos=-5)),
    ],
    ids=["negative", "too-many", "verdict", "long-filter", "far-future", "far-past", "nanos"],
)
async def test_list_decisions_refuses_bad_queries(grpc_client: GrpcClient, request_: Any) -> None:
    stub = grpc_client.channel.unary_unary(
        "/mcppolicy.v1.DecisionLogService/ListDecisions",
        request_serializer=decision_pb2.ListDecisionsRequest.SerializeToString,
        response_deserializer=decision_pb2.ListDecisionsResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub(request_, metadata=GRPC_AUTH)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not any(word in (failed.value.details() or "") for word in INTERNALS)


async def pending_approval(client: Client) -> str:
    decision = await client.decide(approval_call())  # a copy into an image set that exists
    assert decision["verdict"] == "approval_required", decision
    approval_id: str = decision["approval"]["id"]
    return approval_id


@pytest.mark.parametrize(
    ("approver", "comment", "field"),
    [("a" * 100_000, "", "approver"), ("alice", "c" * 100_000, "comment"), ("", "", "approver")],
    ids=["long-approver", "long-comment", "empty-approver"],
)
async def test_approval_actions_have_the_same_limits_on_both_transports(
    client: Client, approver: str, comment: str, field: str
) -> None:
    approval_id = await pending_approval(client)
    with pytest.raises(ApiError) as failed:
        await client.act(APPROVER_TOKEN, approval_id, "approve", approver, comment)
    assert failed.value.status in (422, "INVALID_ARGUMENT")
    assert field in failed.value.message
    still = await client.get_approval(APPROVER_TOKEN, approval_id)
    assert still["status"] == "pending", "a refused action changed nothing"


@pytest.mark.parametrize(
    "request_",
    [
        approval_pb2.ListApprovalsRequest(status=99),  # type: ignore[arg-type]
        approval_pb2.ListApprovalsRequest(limit=-1),
        approval_pb2.ListApprovalsRequest(limit=5000),
    ],
    ids=["unknown-status", "negative-limit", "too-many"],
)
async def test_list_approvals_refuses_bad_queries(grpc_client: GrpcClient, request_: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await grpc_client.approval_stub.ListApprovals(request_, metadata=GRPC_AUTH)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_log_still_writes_after_hostile_input(servers: Servers, http: HttpClient) -> None:
    """After every kind of hostile request above, a normal decision is logged and found."""
    sid = session()
    for _, make, _ in HTTP_CASES:
        await http.raw.post(
            "/v1/decide", content=sent(make(sid)), headers={"content-type": "application/json"}
        )
    decision = await http.decide(copy_call(sid))
    listed = (await http.raw.get(f"/v1/decisions?session_id={sid}", headers=AUTH)).json()
    assert [d["decision_id"] for d in listed["decisions"]] == [decision["decision_id"]]
    async with httpx.AsyncClient(base_url=servers.http_url) as raw:
        assert (await raw.get("/healthz")).status_code == 200


async def test_a_surrogate_is_named_by_its_field(http: HttpClient) -> None:
    text = body_text(session(), arguments='{"datastore_id":["ok","\\udfff"]}')
    response = await http.raw.post(
        "/v1/decide", content=text.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "arguments.datastore_id[1]"


async def test_a_reason_never_grows_with_the_request(client: Client) -> None:
    """Reasons quote what was sent (an unknown tool's name): the answer stays small, and
    characters that reorder or hide text reach the model as escapes."""
    body = {**copy_call(), "tool": "\u202e" * 100_000 + "x" * 200_000}
    decision = await client.decide(body)
    assert decision["verdict"] == "deny"
    assert len(json.dumps(decision)) < 12_000
    assert "\u202e" not in json.dumps(decision, ensure_ascii=False)
    assert "\\u202e" in decision["reason"]
    assert "characters)" in decision["reason"]
