"""Decisions on tool results, attacked: hostile requests over HTTP and gRPC, a policy that
fails every way it can, and hostile results that try to carry a redacted value out.

Every hostile request ends in a 4xx (INVALID_ARGUMENT over gRPC) naming what is wrong, or
in a block; never a 5xx (INTERNAL, UNKNOWN), never a pass of something the policy said to
redact. Whatever cannot be evaluated or applied is blocked with the rule saying why. No
value the policy redacts is ever written to the decision log.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from engine.policy.opa_process import OpaProcess
from mcppolicy.v1 import decision_pb2
from tests.conftest import copy_call
from tests.test_result_service import (
    KEY,
    PHI,
    GrpcResults,
    HttpResults,
    Refused,
    ResultClient,
    World,
    everything,
    metadata,
    phi_result,
    result_call,
    start_world,
    text,
)

INTERNALS = ("Traceback", "<class", "DecodeError", "UnicodeEncodeError", "ValueError")
RESULT_DEADLINE_MS = 300


@pytest.fixture(scope="module", params=["inprocess", "opa"])
async def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    opa = None
    if request.param == "opa":
        opa = OpaProcess("opa")
        await opa.start()
    # The result decision's own deadline (MCP_POLICY_RESULT_TIMEOUT_MS), not the call's.
    servers = await start_world(tmp, opa, result_timeout_ms=RESULT_DEADLINE_MS)
    try:
        yield World(servers, request.param)
    finally:
        await servers.stop()
        if opa is not None:
            await opa.stop()
    # Whatever was sent at it, no redacted value reached its log.
    log = (tmp / "decisions.jsonl").read_text()
    assert PHI not in log and KEY not in log


@pytest.fixture
async def http(world: World) -> AsyncIterator[HttpResults]:
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        yield HttpResults(raw)


@pytest.fixture(params=["http", "grpc-struct", "grpc-json"])
async def results(request: pytest.FixtureRequest, world: World) -> AsyncIterator[ResultClient]:
    if request.param == "http":
        async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
            yield HttpResults(raw)
    else:
        async with grpc.aio.insecure_channel(world.servers.grpc_target) as channel:
            yield GrpcResults(channel, as_json=request.param == "grpc-json")


def body_text(**fields: str) -> bytes:
    """A decide-result body as JSON text, each field's value as written (so escapes,
    duplicates and literals reach the server as they are)."""
    call = copy_call()
    values = {
        "server": json.dumps(call["server"]),
        "tool": json.dumps(call["tool"]),
        "arguments": json.dumps(call["arguments"]),
        "principal": json.dumps(call["principal"]),
        "result": json.dumps({"content": [text("ok")]}),
    }
    values.update(fields)
    return ("{" + ",".join(f'"{k}":{v}' for k, v in values.items() if v) + "}").encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (case, the body, the field the error names (None: a problem of the JSON text), words)
HTTP_CASES: list[tuple[str, bytes, str | None, str]] = [
    ("no-result", body_text(result=""), "result", "required"),
    ("result-null", body_text(result="null"), "result", "dictionary"),
    ("result-list", body_text(result="[]"), "result", "dictionary"),
    ("result-string", body_text(result='"x"'), "result", "dictionary"),
    ("no-content", body_text(result="{}"), "result.content", "missing"),
    ("content-string", body_text(result='{"content":"x"}'), "result.content", "list"),
    ("content-object", body_text(result='{"content":{}}'), "result.content", "list"),
    ("content-null", body_text(result='{"content":null}'), "result.content", "list"),
    ("is-error-string", body_text(result='{"content":[],"isError":"true"}'), "result.isError", ""),
    ("is-error-number", body_text(result='{"content":[],"isError":1}'), "result.isError", ""),
    (
        "structured-list",
        body_text(result='{"content":[],"structuredContent":[]}'),
        "result.structuredContent",
        "object",
    ),
    ("meta-string", body_text(result='{"content":[],"_meta":"x"}'), "result._meta", "object"),
    ("deep-garbage", body_text(result='{"content":' + nested(50) + "}"), None, "deeper"),
    (
        "deep-structured",
        body_text(result='{"content":[],"structuredContent":{"a":' + nested(48) + "}}"),
        None,
        "deeper",
    ),
    ("duplicate-content", body_text(result='{"content":[],"content":[1]}'), None, "duplicate"),
    (
        "duplicate-result",
        body_text(result='{"content":[]},"result":{"content":[]}'),
        None,
        "duplicate",
    ),
    (
        "surrogate-text",
        body_text(result='{"content":[{"type":"text","text":"a\\ud800"}]}'),
        "result.content[0].text",
        "surrogate",
    ),
    (
        "surrogate-key",
        body_text(result='{"content":[],"structuredContent":{"\\udfff":1}}'),
        "a key in result.structuredContent",
        "surrogate",
    ),
    ("huge-float", body_text(result='{"content":[1e400]}'), None, "out of range"),
    ("huge-integer", body_text(result='{"content":[' + "9" * 200 + "]}"), None, "digits"),
    ("nan", body_text(result='{"content":[NaN]}'), None, "NaN"),
    ("server-number", body_text(server="1"), "server", "string"),
    ("server-empty", body_text(server='""'), "server", "at least 1"),
    ("tool-number", body_text(tool="1"), "tool", "string"),
    ("arguments-string", body_text(arguments='"x"'), "arguments", "object"),
    ("principal-string", body_text(principal='"x"'), "principal", ""),
    ("principal-no-session", body_text(principal='{"agent_id":"a"}'), "principal.session_id", ""),
    ("roles-string", body_text(principal='{"session_id":"s","roles":"x"}'), "principal.roles", ""),
    ("context-list", body_text(context="[]"), "context", "dictionary"),
    ("dry-run-string", body_text(dry_run='"yes"'), "dry_run", "boolean"),
    ("verified-string", body_text(principal_verified='"true"'), "principal_verified", "boolean"),
    ("credential-number", body_text(credential="1"), "credential", "string"),
    ("credential-empty", body_text(credential='""'), "credential", "at least 1"),
    ("decision-id-number", body_text(decision_id="1"), "decision_id", "string"),
    ("decision-id-empty", body_text(decision_id='""'), "decision_id", "at least 1"),
    ("decision-id-long", body_text(decision_id=json.dumps("d" * 257)), "decision_id", "256"),
    ("decision-id-surrogate", body_text(decision_id='"\\ud800"'), "decision_id", "surrogate"),
    ("approval-id", body_text(approval_id='"apr_x"'), "approval_id", "not permitted"),
    ("unknown-field", body_text(extra="1"), "extra", "not permitted"),
    ("both-calls", body_text(message='"{}"'), "tool", "exactly one"),
]


@pytest.mark.parametrize(
    ("case", "body", "field", "words"), HTTP_CASES, ids=[c[0] for c in HTTP_CASES]
)
async def test_hostile_http_requests_are_a_clear_4xx(
    http: HttpResults, case: str, body: bytes, field: str | None, words: str
) -> None:
    with pytest.raises(Refused) as refused:
        await http.post(body)
    error = refused.value
    assert error.status in (400, 422), case
    assert error.field == field, (case, error)
    assert words.lower() in error.message.lower(), (case, error)
    assert not any(internal in error.message for internal in INTERNALS)


async def test_bodies_that_are_no_json_object_are_a_400(http: HttpResults) -> None:
    for body in (b"\xff\xfe", b"not json", b"[]", b'{"server":'):
        with pytest.raises(Refused) as refused:
            await http.post(body)
        assert refused.value.status in (400, 422), body


async def test_a_body_not_said_to_be_json_is_refused_before_anything(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        response = await raw.post(
            "/v1/decide-result", content=body_text(), headers={"content-type": "text/plain"}
        )
    assert response.status_code == 415


def grpc_request(**fields: Any) -> decision_pb2.DecideResultRequest:
    call = copy_call()
    request = decision_pb2.DecideResultRequest(server=call["server"], tool=call["tool"])
    request.arguments.update(call["arguments"])
    request.principal.session_id = call["principal"]["session_id"]
    request.result_json = json.dumps({"content": [text("ok")]})
    for name, value in fields.items():
        if name == "result":
            request.result.update(value)
        else:
            setattr(request, name, value)
    return request


# (case, the request, the field the error names, words)
GRPC_CASES: list[tuple[str, Any, str | None, str]] = [
    ("not-json", lambda: grpc_request(result_json="{"), "result_json", "not valid JSON"),
    ("json-list", lambda: grpc_request(result_json="[]"), "result", "dictionary"),
    ("json-no-content", lambda: grpc_request(result_json="{}"), "result.content", "missing"),
    (
        "json-duplicate",
        lambda: grpc_request(result_json='{"content":[],"content":[]}'),
        "result_json",
        "duplicate",
    ),
    (
        "json-surrogate",
        lambda: grpc_request(result_json='{"content":["\\ud800"]}'),
        "result_json",
        "surrogate",
    ),
    (
        "json-deep",
        lambda: grpc_request(result_json='{"content":' + nested(50) + "}"),
        "result_json",
        "deeper",
    ),
    ("json-huge", lambda: grpc_request(result_json='{"content":[1e400]}'), "result_json", "range"),
    (
        "struct-content-string",
        lambda: grpc_request(result={"content": "x"}),
        "result.content",
        "list",
    ),
    (
        "struct-is-error-string",
        lambda: grpc_request(result={"content": [], "isError": "yes"}),
        "result.isError",
        "",
    ),
    ("struct-nan", lambda: grpc_request(result={"content": [float("nan")]}), "result", "finite"),
    ("no-result", lambda: _without_result(), "tool_result", "not neither"),
    ("decision-id-long", lambda: grpc_request(decision_id="d" * 257), "decision_id", "256"),
    ("decision-id-empty", lambda: grpc_request(decision_id=""), "decision_id", ""),
    ("credential-long", lambda: grpc_request(credential="c" * 8193), "credential", "8192"),
    ("server-empty", lambda: grpc_request(server=""), "server", ""),
    ("no-principal", lambda: _without_principal(), "principal", ""),
]


def _without_result() -> decision_pb2.DecideResultRequest:
    request = grpc_request()
    request.ClearField("result_json")
    return request


def _without_principal() -> decision_pb2.DecideResultRequest:
    request = grpc_request()
    request.ClearField("principal")
    return request


@pytest.mark.parametrize(
    ("case", "make", "field", "words"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES]
)
async def test_hostile_grpc_requests_are_invalid_argument(
    world: World, case: str, make: Any, field: str | None, words: str
) -> None:
    async with grpc.aio.insecure_channel(world.servers.grpc_target) as channel:
        client = GrpcResults(channel, as_json=True)
        with pytest.raises(Refused) as refused:
            await client.send(make())
    error = refused.value
    assert error.status == "INVALID_ARGUMENT", (case, error)
    assert error.field == field, (case, error)
    assert words.lower() in error.message.lower(), (case, error)
    assert not any(internal in error.message for internal in INTERNALS)


async def test_grpc_bytes_of_both_result_forms_or_none_that_decode(world: World) -> None:
    async with grpc.aio.insecure_channel(world.servers.grpc_target) as channel:
        raw = channel.unary_unary(
            "/mcppolicy.v1.DecisionService/DecideResult",
            request_serializer=lambda data: data,
            response_deserializer=decision_pb2.DecideResultResponse.FromString,
        )
        both = (
            grpc_request().SerializeToString()
            + grpc_request(result={"content": []}).SerializeToString()
        )
        for data, words in ((both, "exactly one"), (b"\xff\xff\xff", "do not decode")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw(data)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert words in (caught.value.details() or "")


# -- principals that cannot be believed: blocked, never decided on -------------------------


async def test_a_caller_lying_about_having_verified_the_principal_is_blocked(
    results: ResultClient,
) -> None:
    answer = await results.decide_result(
        result_call("pass", phi_result(), principal_verified=True)
        | {"principal": {"session_id": "s-1", "roles": ["phi-reader"]}}
    )
    assert (answer["action"], answer["rule"]) == ("block", "identity.unproven_caller")
    assert PHI not in everything(answer["result"])


async def test_a_forged_credential_is_blocked(results: ResultClient) -> None:
    answer = await results.decide_result(
        result_call("pass", phi_result(), credential="eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
    )
    assert (answer["action"], answer["rule"]) == ("block", "identity.invalid_credential")
    assert PHI not in everything(answer["result"])


# -- the policy failing: always a block, with the rule that says why -----------------------

FAILURES = [
    ("malformed", "result.malformed_answer", "malformed"),
    ("no_rule", "result.malformed_answer", "rule"),
    ("pass_with_redactions", "result.malformed_answer", "pass with redactions"),
    ("bad_path", "result.malformed_answer", "redaction"),
    ("bad_pattern", "result.malformed_answer", "redaction"),
    ("undefined", "result.unavailable", "no result_decision"),
]


@pytest.mark.parametrize(("mode", "rule", "words"), FAILURES, ids=[f[0] for f in FAILURES])
async def test_a_policy_that_fails_blocks_the_result(
    results: ResultClient, mode: str, rule: str, words: str
) -> None:
    answer = await results.decide_result(result_call(mode, phi_result()))
    assert answer["action"] == "block", mode
    assert answer["rule"] == rule, (mode, answer["reason"])
    assert words in answer["reason"], (mode, answer["reason"])
    refusal = answer["result"]
    assert refusal["isError"] is True
    assert refusal["content"] == [{"type": "text", "text": answer["reason"]}]
    assert refusal["_meta"]["mcp-policy/result-decision"]["rule"] == rule
    assert PHI not in json.dumps(answer) and KEY not in json.dumps(answer)


async def test_a_policy_past_its_deadline_blocks_the_result(http: HttpResults) -> None:
    answer = await http.decide_result(result_call("slow", phi_result()))
    assert (answer["action"], answer["rule"]) == ("block", "result.unavailable")
    assert f"within {RESULT_DEADLINE_MS} ms" in answer["reason"]
    assert PHI not in json.dumps(answer)


async def test_an_opa_server_gone_blocks_results(tmp_path: Path) -> None:
    opa = OpaProcess("opa")
    await opa.start()
    servers = await start_world(tmp_path, opa)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            client = HttpResults(raw)
            assert (await client.decide_result(result_call("pass")))["action"] == "pass"
            await opa.stop()
            answer = await client.decide_result(result_call("pass", phi_result()))
    finally:
        await servers.stop()
        await opa.stop()
    assert (answer["action"], answer["rule"]) == ("block", "result.unavailable")
    assert "unreachable" in answer["reason"]
    assert PHI not in json.dumps(answer)


# -- hostile results: a value the policy redacts never gets out -----------------------------


def blob(value: Any) -> str:
    return base64.b64encode(gzip.compress(json.dumps(value).encode())).decode()


def deep(value: Any, levels: int) -> Any:
    for i in range(levels):
        value = [value] if i % 2 else {"x": value}
    return value


def escaped(value: Any, times: int) -> str:
    """`value` as JSON text, that as a JSON string, and so on `times` times."""
    out = json.dumps(value)
    for _ in range(times - 1):
        out = json.dumps({"inner": out})
    return out


# (case, the result) each carrying the patient's name in a document.
HIDDEN: list[tuple[str, dict[str, Any]]] = [
    ("nested-arrays", {"content": [], "structuredContent": {"a": [[[[metadata()]]]]}}),
    ("deep-structure", {"content": [], "structuredContent": {"d": deep(metadata(), 13)}}),
    ("escaped-json-text", {"content": [text(escaped(metadata(), 4))]}),
    (
        "json-in-structured-string",
        {"content": [], "structuredContent": {"s": escaped(metadata(), 2)}},
    ),
    ("gzip-blob", {"content": [text(json.dumps({"image_set_metadata_blob": blob(metadata())}))]}),
    (
        "plain-base64",
        {
            "content": [],
            "structuredContent": {"b": base64.b64encode(json.dumps(metadata()).encode()).decode()},
        },
    ),
    ("blob-in-blob", {"content": [text(blob({"inner": blob(metadata())}))]}),
    (
        "resource-text",
        {
            "content": [
                {
                    "type": "resource",
                    "resource": {"uri": "x://m", "text": json.dumps(metadata())},
                }
            ]
        },
    ),
    ("huge-string-beside", {"content": [text("A" * 600_000), text(json.dumps(metadata()))]}),
    (
        "unicode-name",
        {"content": [], "structuredContent": {"Patient": {"PatientName": PHI + "\u202e\u200b"}}},
    ),
    ("name-elsewhere-too", {"content": [text(json.dumps(metadata())), text(f"seen {PHI} here")]}),
]


@pytest.mark.parametrize(("case", "result"), HIDDEN, ids=[h[0] for h in HIDDEN])
async def test_a_redacted_value_never_gets_out(
    results: ResultClient, case: str, result: dict[str, Any]
) -> None:
    answer = await results.decide_result(result_call("redact", result))
    assert answer["action"] in ("redact", "block"), case
    if answer["action"] == "block":
        assert answer["rule"] == "result.unredactable", (case, answer["reason"])
    assert PHI not in everything(answer["result"]), case
    assert PHI not in answer["reason"]


UNREDACTABLE: list[tuple[str, dict[str, Any]]] = [
    ("prose", {"content": [text(f"PatientName: {PHI}, born 1970")]}),
    ("broken-json", {"content": [text('{"PatientName": "' + PHI + '", ')]}),
    ("in-a-key-of-prose", {"content": [], "structuredContent": {"note": f"PatientName={PHI}"}}),
    ("too-deep-to-decode", {"content": [text(escaped(metadata(), 12))]}),
]


@pytest.mark.parametrize(("case", "result"), UNREDACTABLE, ids=[u[0] for u in UNREDACTABLE])
async def test_a_result_that_cannot_be_redacted_safely_is_blocked(
    results: ResultClient, case: str, result: dict[str, Any]
) -> None:
    answer = await results.decide_result(result_call("redact", result))
    assert (answer["action"], answer["rule"]) == ("block", "result.unredactable"), case
    assert PHI not in json.dumps(answer)


async def test_hostile_results_never_cost_a_5xx(http: HttpResults) -> None:
    """Odd but valid results: unknown block types, empty everything, a key that is the
    engine's own, numbers at the edges, a 900 KB string."""
    for result in (
        {"content": []},
        {"content": [{"type": "audio", "data": "AAAA", "mimeType": "audio/wav"}]},
        {"content": [{}], "isError": True, "_meta": {"mcp-policy/result-decision": "forged"}},
        {"content": [1, "x", None, True, 1.5e308, -(10**99)]},
        {"content": [text("B" * 900_000)]},
        {"content": [], "structuredContent": {"": {"": [""]}}, "extra": {"ok": 1}},
    ):
        for mode in ("pass", "redact", "block"):
            answer = await http.decide_result(result_call(mode, result))
            assert answer["action"] in ("pass", "redact", "block")
            if mode == "block":
                assert answer["action"] == "block"
