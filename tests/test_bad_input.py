"""Malformed requests: a clear error naming the problem, on both transports, and the
service keeps answering afterwards."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import struct_pb2

from mcppolicy.v1 import decision_pb2, types_pb2
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import copy_call

Client = HttpClient | GrpcClient


def without(key: str) -> dict[str, Any]:
    body = copy_call()
    del body[key]
    return body


def with_message(message: Any, **extra: Any) -> dict[str, Any]:
    body = without("tool")
    del body["arguments"]
    body["message"] = message
    body.update(extra)
    return body


def valid_message(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "copy_image_set", "arguments": copy_call()["arguments"]},
    }
    message.update(changes)
    return {k: v for k, v in message.items() if v is not ...}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


# (case id, body, HTTP status, words the error must contain)
CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("missing-session", {**copy_call(), "principal": {"agent_id": "a"}}, 422, "session_id"),
    ("empty-session", {**copy_call(), "principal": {"session_id": ""}}, 422, "session_id"),
    ("missing-principal", without("principal"), 422, "principal"),
    ("missing-server", without("server"), 422, "server"),
    ("tool-and-message", {**copy_call(), "message": valid_message()}, 422, "both"),
    ("neither-tool-nor-message", with_message(None), 422, "neither"),
    ("message-not-object", with_message("[]"), 422, "batch"),
    ("message-batch", with_message([valid_message()]), 422, "batch"),
    ("message-jsonrpc-1", with_message(valid_message(jsonrpc="1.0")), 422, "jsonrpc"),
    ("message-no-jsonrpc", with_message(valid_message(jsonrpc=...)), 422, "jsonrpc"),
    ("message-wrong-method", with_message(valid_message(method="tools/list")), 422, "method"),
    ("message-method-case", with_message(valid_message(method="Tools/Call")), 422, "method"),
    ("message-missing-id", with_message(valid_message(id=...)), 422, "id"),
    ("message-null-id", with_message(valid_message(id=None)), 422, "id"),
    ("message-bool-id", with_message(valid_message(id=True)), 422, "id"),
    ("message-no-params", with_message(valid_message(params=...)), 422, "params"),
    (
        "message-arguments-not-object",
        with_message(valid_message(params={"name": "copy_image_set", "arguments": "x"})),
        422,
        "arguments",
    ),
    ("message-no-name", with_message(valid_message(params={"arguments": {}})), 422, "name"),
    ("message-not-json", with_message('{"jsonrpc": "2.0",'), 400, "not valid JSON"),
    (
        "message-duplicate-key",
        with_message(
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x",'
            '"name":"copy_image_set"}}'
        ),
        400,
        "duplicate key 'name'",
    ),
    ("message-nan", with_message('{"jsonrpc":"2.0","id":NaN,"method":"tools/call"}'), 400, "NaN"),
    ("arguments-too-deep", {**copy_call(), "arguments": nested(28)}, 400, "deeper than 24"),
]


@pytest.mark.parametrize(
    ("body", "status", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_request_is_refused_with_a_clear_error(
    client: Client, body: dict[str, Any], status: int, words: str
) -> None:
    with pytest.raises(ApiError) as caught:
        await client.decide(body)
    expected = status if client.name == "http" else "INVALID_ARGUMENT"
    assert caught.value.status == expected
    assert words in caught.value.message
    # ...and the service keeps answering.
    assert (await client.decide(copy_call()))["verdict"] == "allow"


RAW_BODIES: list[tuple[str, bytes, int, str]] = [
    ("duplicate-key", b'{"server":"a","server":"b"}', 400, "duplicate key 'server'"),
    ("nan", b'{"server":NaN}', 400, "NaN"),
    ("infinity", b'{"server":Infinity}', 400, "Infinity"),
    ("not-json", b"server=a", 400, "not valid JSON"),
    ("not-utf8", b'{"server":"\xff"}', 400, "UTF-8"),
    ("array", b"[]", 422, "JSON object"),
    ("deep", b"[" * 100_000 + b"]" * 100_000, 400, "deeper"),
    ("unknown-field", json.dumps({**copy_call(), "sesion_id": "x"}).encode(), 422, "sesion_id"),
    (
        "arguments-not-object",
        json.dumps({**copy_call(), "arguments": [1, 2]}).encode(),
        422,
        "arguments",
    ),
    ("too-large", b'{"server":"' + b"a" * (1024 * 1024) + b'"}', 413, "limit"),
]


@pytest.mark.parametrize(
    ("raw", "status", "words"), [c[1:] for c in RAW_BODIES], ids=[c[0] for c in RAW_BODIES]
)
async def test_bad_http_body_is_refused(
    http: HttpClient, raw: bytes, status: int, words: str
) -> None:
    response = await http.raw.post(
        "/v1/decide", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert (await http.decide(copy_call()))["verdict"] == "allow"


async def test_chunked_body_over_the_limit_is_refused(http: HttpClient) -> None:
    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * (64 * 1024)

    response = await http.raw.post(
        "/v1/decide", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


async def test_grpc_non_finite_argument_is_refused(grpc_client: GrpcClient) -> None:
    arguments = struct_pb2.Struct()
    arguments.update({"datastore_id": float("nan")})
    request = decision_pb2.DecideRequest(
        server="awslabs.healthimaging-mcp-server",
        tool="copy_image_set",
        arguments=arguments,
        principal=types_pb2.Principal(session_id="s-nan"),
    )
    with pytest.raises(ApiError) as caught:
        await grpc_client._call(grpc_client.decisions.Decide, request)
    assert caught.value.status == "INVALID_ARGUMENT"
    assert "non-finite" in caught.value.message


async def test_grpc_error_carries_bad_request_details(grpc_client: GrpcClient) -> None:
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    async def violation(request: decision_pb2.DecideRequest) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await grpc_client.decisions.Decide(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(caught.value)
        assert status is not None
        detail = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(detail)
        return str(detail.field_violations[0].field)

    no_principal = decision_pb2.DecideRequest(server="x", tool="copy_image_set")
    assert await violation(no_principal) == "principal"
    no_session = decision_pb2.DecideRequest(server="x", tool="copy_image_set")
    no_session.principal.agent_id = "a-1"
    assert await violation(no_session) == "principal.session_id"
    long_role = decision_pb2.DecideRequest(server="x", tool="copy_image_set")
    long_role.principal.session_id = "s-1"
    long_role.principal.roles.extend(["reader", "r" * 257])
    assert await violation(long_role) == "principal.roles[1]"


async def test_openapi_documents_the_decide_body(http: HttpClient) -> None:
    schema = (await http.raw.get("/openapi.json")).json()
    body = schema["paths"]["/v1/decide"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/DecideRequest"
    assert "session_id" in json.dumps(schema["components"]["schemas"]["Principal"])
    assert (await http.raw.get("/docs")).status_code == 200


async def test_health_endpoints(http: HttpClient) -> None:
    assert (await http.raw.get("/healthz")).json() == {"status": "ok"}
    ready = await http.raw.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["policy_revision"].startswith("sha256:")
