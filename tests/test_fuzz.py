"""Property tests as an attacker: generated hostile JSON and protobuf bytes over HTTP, gRPC
and the stdio proxy (the strategies are in tests/strategies.py; test_hostile_input.py and
test_bypass.py hold the hand-picked cases).

Every example must end in a clean answer: never a 5xx over HTTP, never UNKNOWN or
INTERNAL over gRPC, error bodies small and free of Python internals, never an allow for
malformed input, and a valid request with hostile values decided exactly as the policy
says. After each batch of examples: the quota of the session the examples named is
untouched (counting only the allows they were given), the decision log still writes, and
the service (or the proxy) is alive and logged no traceback.

The service runs as its own process (tests.processes.Serve), spoken to with synchronous
httpx and grpc clients, so Hypothesis drives plain synchronous functions: nothing here
shares the test event loop. Each test runs its examples through an inner @given function,
so it can prepare state before them and check the invariants after all of them. The
examples per test come from the profile in tests/strategies.py (HYPOTHESIS_PROFILE=fuzz
for many more: `make fuzz`).
"""

from __future__ import annotations

import json
import math
import queue
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from google.protobuf import struct_pb2, timestamp_pb2
from hypothesis import event, given
from hypothesis import strategies as st

from engine.settings import PROJECT_ROOT
from mcppolicy.v1 import (
    approval_pb2,
    approval_pb2_grpc,
    decision_pb2,
    decision_pb2_grpc,
    types_pb2,
)
from tests.conftest import (
    APPROVER_TOKEN,
    HEALTHIMAGING,
    approval_call,
    copy_call,
    copy_policy,
    session,
)
from tests.fixtures.proxy_harness import FIXTURE, PROXY, clean_env
from tests.processes import Serve
from tests.strategies import (
    BODY_PLACEMENTS,
    COPY_ARGS,
    FUZZ,
    AgentLine,
    agent_lines,
    fuzz_agent,
    hostile_decide_bodies,
    hostile_ints,
    hostile_objects,
    hostile_strings,
    hostile_values,
    malformed_decide_bodies,
    poison_values,
    poisoned,
    protobuf_noise,
    request_ids,
    tools_call,
)

LIMIT = 10  # copy_image_set: 10 per session (policies/rules.yaml) ...
WINDOW = 86_400  # ... per day here, so a long `make fuzz` run never sees a slot expire
MAX_ERROR_BYTES = 8 * 1024
AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
GRPC_AUTH = (("authorization", f"Bearer {APPROVER_TOKEN}"),)
INTERNALS = (
    "Traceback",
    "<class",
    'File "',
    "Exception",
    "DecodeError",
    "UnicodeEncodeError",
    "UnicodeDecodeError",
    "RecursionError",
    "ValueError",
    "TypeError",
    "KeyError",
    "AttributeError",
    "AssertionError",
    "OverflowError",
    "ValidationError",
)
GRPC_ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
VERDICT_NAMES = {
    types_pb2.VERDICT_ALLOW: "allow",
    types_pb2.VERDICT_DENY: "deny",
    types_pb2.VERDICT_RATE_LIMITED: "rate_limited",
    types_pb2.VERDICT_APPROVAL_REQUIRED: "approval_required",
}


# --------------------------------------------------------------------------------------
# The service as a process, and what every test checks after its examples.


class Service:
    """`mcp-policy serve` with sync clients; its output is collected as it comes."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.http = httpx.Client(base_url=serve.url, timeout=60)
        self.grpc_target = f"127.0.0.1:{serve.grpc_port}"
        self.channel = grpc.insecure_channel(self.grpc_target)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.decisions = decision_pb2_grpc.DecisionServiceStub(self.channel)
        self.approvals = approval_pb2_grpc.ApprovalServiceStub(self.channel)
        self.log_stub = decision_pb2_grpc.DecisionLogServiceStub(self.channel)

    def raw(self, method: str) -> Any:
        return self.channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

    def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/v1/decide", json=body)
        assert response.status_code == 200, response.text
        decision: dict[str, Any] = response.json()
        return decision

    def check(self) -> None:
        """Alive, answering, and no traceback in its output so far."""
        assert self.serve.proc.poll() is None, "the service exited"
        assert self.http.get("/healthz").status_code == 200
        tracebacks = [line for line in self.serve.lines if "Traceback" in line]
        assert not tracebacks, "".join(self.serve.lines)[-8000:]

    def stop(self) -> int:
        self.channel.close()
        self.http.close()
        return self.serve.stop()  # Serve reads the log all along, into serve.lines


def fuzz_policy(tmp: Path) -> list[Path]:
    """The shipped policy with copy_image_set's window stretched to WINDOW."""
    rego, data = copy_policy(tmp)
    rules_file = data / "rules.yaml"
    rules = yaml.safe_load(rules_file.read_text())
    limit = rules["mcp_policy"]["rules"]["copy_image_set"]["rate_limit"]
    assert limit["max"] == LIMIT
    limit["window"] = WINDOW
    rules_file.write_text(yaml.safe_dump(rules))
    return [rego, data]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("fuzz-service")
    serve = Serve(tmp, fuzz_policy(tmp), {"MCP_POLICY_APPROVER_TOKEN": APPROVER_TOKEN})
    running = Service(serve)
    try:
        yield running
    finally:
        status = running.stop()
    assert status == 0, "".join(serve.lines)[-8000:]


def assert_quota(service: Service, session_id: str, used: int) -> None:
    """A fresh decision for `session_id` shows exactly `used` slots taken before it."""
    decision = service.decide(copy_call(session_id))
    if used >= LIMIT:
        assert decision["verdict"] == "rate_limited", decision
        return
    assert decision["verdict"] == "allow", decision
    assert decision["rate_limit"]["remaining"] == LIMIT - 1 - used, (
        f"{used} slot(s) were given out, yet {decision['rate_limit']}"
    )


def assert_log_writes(service: Service) -> None:
    """A normal decision made now is in the decision log."""
    sid = session()
    decision = service.decide(copy_call(sid))
    listed = service.http.get("/v1/decisions", params={"session_id": sid}, headers=AUTH)
    assert listed.status_code == 200, listed.text
    assert [d["decision_id"] for d in listed.json()["decisions"]] == [decision["decision_id"]]


def after_examples(service: Service, session_id: str, used: int) -> None:
    assert_quota(service, session_id, used)
    assert_log_writes(service)
    service.check()


def check_http(response: httpx.Response) -> None:
    """Never a 5xx; an error is a 4xx in the one error shape, small, without internals."""
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, response.text[:2000]
    if response.status_code < 400:
        return
    assert len(response.content) < MAX_ERROR_BYTES, len(response.content)
    assert not any(word in response.text for word in INTERNALS), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def check_grpc_error(error: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = error.code()
    details = error.details() or ""
    event(f"gRPC {code.name}")
    assert code in GRPC_ANSWERS, (code, details)
    assert len(details.encode()) < MAX_ERROR_BYTES, len(details)
    assert not any(word in details for word in INTERNALS), details
    trailers = sum(len(value) for _, value in error.trailing_metadata() or ())
    assert trailers < MAX_ERROR_BYTES, trailers
    return code


def consumed(decision: dict[str, Any]) -> int:
    """1 when a decision holds a slot: an allow that is not a dry run (it has a token)."""
    return int(decision.get("verdict") == "allow" and bool(decision.get("outcome_token")))


def post(service: Service, path: str, body: bytes, **headers: str) -> httpx.Response:
    return service.http.post(
        path, content=body, headers={"content-type": "application/json", **headers}
    )


# --------------------------------------------------------------------------------------
# HTTP.


def test_malformed_decide_bodies_are_refused_and_take_nothing(service: Service) -> None:
    """Poisoned bodies naming one session: each a clean 4xx, none takes its slot."""
    sid = session()

    @FUZZ
    @given(malformed_decide_bodies(sid))
    def examples(body: bytes) -> None:
        response = post(service, "/v1/decide", body)
        check_http(response)
        assert 400 <= response.status_code < 500, response.text[:500]

    examples()
    after_examples(service, sid, used=0)


def test_the_text_around_each_poison_is_a_valid_request(service: Service) -> None:
    """The generator's own check: with a benign stand-in for the poison, the same bodies
    are decided, so the refusals above are the poison's doing."""
    sid = session()
    decisions: list[dict[str, Any]] = []

    @FUZZ
    @given(
        malformed_decide_bodies(
            sid,
            placements=BODY_PLACEMENTS[:4],
            values=st.just("0"),
            members=st.just('"benign":0'),
        )
    )
    def examples(body: bytes) -> None:
        response = post(service, "/v1/decide", body)
        assert response.status_code == 200, response.text[:500]
        decision = response.json()
        # A stand-in inside copy_image_set_information (an extra key there) makes it one the
        # real tool does not take: decided too, as that.
        assert decision["verdict"] in ("allow", "rate_limited") or (
            decision["rule"] == "copy_image_set.copy_image_set_information_invalid"
        ), decision
        decisions.append(decision)

    examples()
    after_examples(service, sid, used=sum(consumed(d) for d in decisions))


def test_hostile_values_are_decided_as_the_policy_says(service: Service) -> None:
    """Valid bodies full of odd Unicode, long strings, extreme numbers and deep nesting:
    an odd tool or server is an unknown tool (denied), an odd id an invalid one (denied),
    odd content the policy ignores changes nothing (a dry run: allowed, nothing taken)."""
    sid = session()

    @FUZZ
    @given(hostile_decide_bodies(sid), st.booleans())
    def examples(case: tuple[dict[str, Any], str], ascii_: bool) -> None:
        body, expected = case
        data = json.dumps(body, ensure_ascii=ascii_).encode()
        response = post(service, "/v1/decide", data)
        check_http(response)
        if len(data) > 1024 * 1024:
            assert response.status_code == 413, response.text[:500]
            return
        assert response.status_code == 200, response.text[:500]
        assert len(response.content) < 4 * MAX_ERROR_BYTES, "the answer grows with the request"
        decision = response.json()
        verdict, _, rule = expected.partition(" ")
        assert decision["verdict"] == verdict, (expected, decision)
        if rule:
            assert decision["rule"] == rule, (expected, decision)
        else:
            assert decision.get("dry_run") is True and not decision.get("outcome_token")

    examples()
    after_examples(service, sid, used=0)


def test_outcome_reports_that_are_malformed_release_nothing(service: Service) -> None:
    """Malformed reports carrying the right token, and reports with odd tokens or for odd
    decision ids: none gives the slot back; the right report afterwards does, once."""
    sid = session()
    decision = service.decide(copy_call(sid))
    decision_id, token = decision["decision_id"], decision["outcome_token"]
    path = f"/v1/decisions/{decision_id}/outcome"
    report = {"succeeded": False, "outcome_token": token}
    released: list[bool] = []

    malformed = st.one_of(
        poisoned(report).map(str.encode),
        poison_values().map(str.encode),
        st.builds(
            lambda value: json.dumps({**report, "succeeded": value}).encode(),
            hostile_values(2).filter(lambda value: not isinstance(value, bool)),
        ),
        st.builds(
            lambda extra: json.dumps({**report, **extra}).encode(),
            hostile_objects(2).filter(lambda extra: bool(set(extra) - set(report))),
        ),
    )
    odd_tokens = hostile_strings(max_long=2000).filter(lambda value: value != token)

    @FUZZ
    @given(
        st.one_of(
            malformed.map(lambda body: (path, body)),
            odd_tokens.map(
                lambda odd: (path, json.dumps({"succeeded": False, "outcome_token": odd}).encode())
            ),
            hostile_strings(max_long=500).map(
                lambda odd: (
                    "/v1/decisions/" + urllib.parse.quote(odd, safe="") + "/outcome",
                    json.dumps(report).encode(),
                )
            ),
        )
    )
    def examples(case: tuple[str, bytes]) -> None:
        where, body = case
        response = post(service, where, body)
        check_http(response)
        if response.status_code == 200:
            released.append(response.json()["released"])
            assert not released[-1], (where, body[:500])

    examples()
    assert not any(released), "a malformed or foreign report gave the slot back"
    after_examples(service, sid, used=1)
    ack = post(service, path, json.dumps(report).encode())
    assert ack.status_code == 200 and ack.json()["released"] is True, ack.text
    after_examples(service, sid, used=1)  # the slot came back; the check above took one


def test_approval_actions_that_are_malformed_change_nothing(service: Service) -> None:
    """Malformed or ill-typed approve/deny bodies, with the approver token or without:
    a 4xx each, and the approval stays pending."""
    pending = service.decide(approval_call())
    assert pending["verdict"] == "approval_required", pending
    approval_id = pending["approval"]["id"]
    action = {"approver": "fuzz-approver", "comment": "looks fine"}

    bodies = st.one_of(
        poisoned(action).map(str.encode),
        poison_values().map(str.encode),
        st.builds(
            lambda value: json.dumps({**action, "approver": value}).encode(),
            hostile_values(2).filter(lambda value: not isinstance(value, str) or value == ""),
        ),
        st.builds(
            lambda value: json.dumps({**action, "comment": value}).encode(),
            st.one_of(hostile_ints(), st.lists(st.none(), max_size=2), st.just("c" * 4097)),
        ),
        st.builds(
            lambda extra: json.dumps({**action, **extra}).encode(),
            hostile_objects(2).filter(lambda extra: bool(set(extra) - set(action))),
        ),
    )

    @FUZZ
    @given(bodies, st.sampled_from(["approve", "deny"]), st.booleans())
    def examples(body: bytes, verb: str, authorised: bool) -> None:
        headers = AUTH if authorised else {}
        response = post(service, f"/v1/approvals/{approval_id}/{verb}", body, **headers)
        check_http(response)
        assert 400 <= response.status_code < 500, response.text[:500]

    examples()
    still = service.http.get(f"/v1/approvals/{approval_id}", headers=AUTH)
    assert still.json()["status"] == "pending", still.json()
    approved = post(
        service, f"/v1/approvals/{approval_id}/approve", json.dumps(action).encode(), **AUTH
    )
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    service.check()
    assert_log_writes(service)


PERCENT_BYTES = st.lists(
    st.sampled_from(["%ff", "%c0%af", "%ed%a0%80", "%00", "%2f", "%25", "%e2%80%ae", "%"]),
    min_size=1,
    max_size=4,
).map("".join)


def test_hostile_ids_in_paths_and_queries_are_4xx(service: Service) -> None:
    """Odd approval and decision ids in paths, odd filters and cursors in queries
    (percent-escapes that are not UTF-8 included): answers, never 5xx."""
    sid = session()
    segment = st.one_of(
        hostile_strings(max_long=3000).map(lambda s: urllib.parse.quote(s, safe="")),
        PERCENT_BYTES,
    )

    @FUZZ
    @given(
        st.one_of(
            segment.map(lambda s: ("GET", f"/v1/approvals/{s}")),
            segment.map(lambda s: ("POST", f"/v1/approvals/{s}/approve")),
            segment.map(lambda s: ("POST", f"/v1/approvals/{s}/deny")),
            segment.map(lambda s: ("POST", f"/v1/decisions/{s}/outcome")),
            st.tuples(
                st.sampled_from(
                    ["session_id", "agent_id", "tool", "verdict", "since", "until", "cursor"]
                ),
                segment,
            ).map(lambda kv: ("GET", f"/v1/decisions?{kv[0]}={kv[1]}")),
            segment.map(lambda v: ("GET", f"/v1/approvals?status={v}")),
        )
    )
    def examples(case: tuple[str, str]) -> None:
        method, target = case
        body = json.dumps({"approver": "fuzz", "succeeded": False}).encode()
        response = service.http.request(
            method,
            httpx.URL(service.serve.url + target),
            content=body if method == "POST" else None,
            headers={**AUTH, "content-type": "application/json"},
        )
        check_http(response)

    examples()
    after_examples(service, sid, used=0)


HEADER_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])  # what HTTP/1.1 allows
NOT_IN_HEADERS = bytes(b for b in range(256) if b not in HEADER_BYTES)


def _header(data: bytes) -> bytes:
    """`data` as an Authorization value HTTP/1.1 can carry."""
    return data.translate(None, NOT_IN_HEADERS).strip(b" \t")


def test_hostile_credentials_are_refused(service: Service) -> None:
    """Odd Authorization headers (any bytes HTTP allows, odd schemes, near-misses of the
    approver token) on the approver's endpoints, and odd gRPC metadata: a 401 or 403 (or
    UNAUTHENTICATED / PERMISSION_DENIED) unless the header carries the token itself."""
    sid = session()
    token = APPROVER_TOKEN.encode()
    near = st.sampled_from(
        [token[:-1], token + b"x", token.upper(), b"x" + token, token.replace(b"-", b"_")]
    )
    headers = st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda scheme, rest: scheme + b" " + rest,
            st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"Basic", b"Token", b""]),
            st.one_of(near, hostile_strings(max_long=3000).map(str.encode)),
        ),
    ).map(_header)
    targets = st.sampled_from(
        [
            ("GET", "/v1/approvals"),
            ("GET", f"/v1/decisions?session_id={sid}"),
            ("GET", "/v1/status"),
            ("POST", "/v1/approvals/apr_nosuchapproval/deny"),
        ]
    )
    metadata = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)

    @FUZZ
    @given(targets, headers, metadata)
    def examples(target: tuple[str, str], header: bytes, value: str) -> None:
        method, path = target
        response = service.http.request(
            method,
            path,
            content=json.dumps({"approver": "fuzz"}).encode() if method == "POST" else None,
            headers={"Authorization": header, "content-type": "application/json"},
        )
        check_http(response)
        if token not in header:
            assert response.status_code in (401, 403), (header, response.text[:300])
        try:
            service.approvals.ListApprovals(
                approval_pb2.ListApprovalsRequest(), metadata=(("authorization", value),)
            )
        except grpc.RpcError as error:
            code = check_grpc_error(error)
            assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        else:
            assert APPROVER_TOKEN in value, value

    examples()
    after_examples(service, sid, used=0)


# --------------------------------------------------------------------------------------
# gRPC.

DECIDE = "/mcppolicy.v1.DecisionService/Decide"
REPORT = "/mcppolicy.v1.DecisionService/ReportOutcome"


def _valid_requests(sid: str, decision_id: str, token: str) -> dict[str, tuple[Any, bytes]]:
    """A valid request for each unary method (the Decide one an allowed copy by `sid`;
    the ReportOutcome one the real failure report of `decision_id`), serialised."""
    decide = decision_pb2.DecideRequest(
        server=HEALTHIMAGING,
        tool="copy_image_set",
        principal=types_pb2.Principal(agent_id=fuzz_agent(sid), session_id=sid),
    )
    decide.arguments.update(COPY_ARGS)
    unknown = "apr_fuzz_no_such_approval"
    messages: dict[str, tuple[Any, Any]] = {
        DECIDE: (decision_pb2.DecideRequest, decide),
        REPORT: (
            decision_pb2.ReportOutcomeRequest,
            decision_pb2.ReportOutcomeRequest(
                decision_id=decision_id, succeeded=False, outcome_token=token
            ),
        ),
        "/mcppolicy.v1.ApprovalService/ListApprovals": (
            approval_pb2.ListApprovalsRequest,
            approval_pb2.ListApprovalsRequest(status=types_pb2.APPROVAL_STATUS_PENDING, limit=5),
        ),
        "/mcppolicy.v1.ApprovalService/GetApproval": (
            approval_pb2.GetApprovalRequest,
            approval_pb2.GetApprovalRequest(id=unknown),
        ),
        "/mcppolicy.v1.ApprovalService/Approve": (
            approval_pb2.ApproveRequest,
            approval_pb2.ApproveRequest(id=unknown, approver="fuzz", comment="c"),
        ),
        "/mcppolicy.v1.ApprovalService/Deny": (
            approval_pb2.DenyRequest,
            approval_pb2.DenyRequest(id=unknown, approver="fuzz", comment="c"),
        ),
        "/mcppolicy.v1.DecisionLogService/ListDecisions": (
            decision_pb2.ListDecisionsRequest,
            decision_pb2.ListDecisionsRequest(session_id=sid, page_size=5),
        ),
    }
    return {
        method: (kind, message.SerializeToString()) for method, (kind, message) in messages.items()
    }


def test_raw_protobuf_bytes_to_every_method(service: Service) -> None:
    """Random bytes and mutated valid requests (truncated, bit-flipped, invalid UTF-8 in
    strings, wrong wire types, huge length prefixes, deep Structs) to every unary method:
    a request that does not decode is INVALID_ARGUMENT, one that does is answered as what
    it decodes to — and only that takes (or gives back) a slot."""
    sid = session()
    outcome_sid = session()
    held = service.decide(copy_call(outcome_sid))
    valid = _valid_requests(sid, held["decision_id"], held["outcome_token"])
    used = {"decide": 0, "released": 0}

    cases = st.sampled_from(sorted(valid)).flatmap(
        lambda method: st.tuples(
            st.just(method),
            protobuf_noise(valid[method][1], deep_field=3 if method == DECIDE else None),
        )
    )

    @FUZZ
    @given(cases, st.integers(0, 3))
    def examples(case: tuple[str, bytes], auth: int) -> None:
        method, data = case
        kind = valid[method][0]
        try:
            decoded = kind.FromString(data)
        except Exception:  # noqa: BLE001 - any failure to decode: the server must refuse
            decoded = None
        try:
            answer = service.raw(method)(data, timeout=60, metadata=GRPC_AUTH if auth else None)
        except grpc.RpcError as error:
            code = check_grpc_error(error)
            if decoded is None:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, error.details())
            return
        assert decoded is not None, f"undecodable bytes were answered OK: {data!r}"
        if method == DECIDE:
            response = decision_pb2.DecideResponse.FromString(answer)
            if decoded.principal.session_id == sid and response.outcome_token:
                assert response.verdict == types_pb2.VERDICT_ALLOW
                used["decide"] += 1
        elif method == REPORT:
            response = decision_pb2.ReportOutcomeResponse.FromString(answer)
            if response.released:
                assert (decoded.decision_id, decoded.outcome_token, decoded.succeeded) == (
                    held["decision_id"],
                    held["outcome_token"],
                    False,
                ), decoded
                used["released"] += 1

    examples()
    assert used["released"] <= 1
    after_examples(service, sid, used=used["decide"])
    after_examples(service, outcome_sid, used=1 - used["released"])


def _struct(value: dict[str, Any]) -> Any:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def to_proto(body: dict[str, Any]) -> Any:
    """A decide body (as the HTTP API spells it) as a protobuf DecideRequest."""
    request = decision_pb2.DecideRequest(server=body["server"], dry_run=body.get("dry_run", False))
    if "tool" in body:
        request.tool = body["tool"]
    if "arguments" in body:
        request.arguments.CopyFrom(_struct(body["arguments"]))
    if "message" in body:
        message = body["message"]
        request.message = message if isinstance(message, str) else json.dumps(message)
    principal = body["principal"]
    request.principal.session_id = principal["session_id"]
    request.principal.agent_id = principal.get("agent_id") or ""
    request.principal.user_id = principal.get("user_id") or ""
    request.principal.roles.extend(principal.get("roles", []))
    if "context" in body:
        request.context.CopyFrom(_struct(body["context"]))
    return request


@st.composite
def grpc_decide_cases(draw: st.DrawFn, sid: str) -> tuple[Any, str]:
    """A DecideRequest for `sid` and what it must get: `invalid` for poisoned `message` text
    or a non-finite number in a Struct, else the policy's answer (hostile_decide_bodies)."""
    kind = draw(st.sampled_from(["message", "non-finite", "values", "values"]))
    base = {
        "server": HEALTHIMAGING,
        "principal": {"agent_id": fuzz_agent(sid), "session_id": sid},
    }
    if kind == "message":
        arguments = {**COPY_ARGS, "notes": draw(hostile_values(3))}
        text = draw(poisoned(tools_call(draw(request_ids()), "copy_image_set", arguments)))
        return to_proto({**base, "message": text}), "invalid"
    if kind == "non-finite":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        where = draw(st.sampled_from(["arguments", "context", "deep"]))
        body: dict[str, Any] = {**base, "tool": "copy_image_set", "arguments": dict(COPY_ARGS)}
        if where == "arguments":
            body["arguments"]["n"] = bad
        elif where == "context":
            body["context"] = {"n": [1, {"m": bad}]}
        else:
            body["arguments"]["copy_image_set_information"] = {"a": [[{"b": bad}]]}
        return to_proto(body), "invalid"
    body, expected = draw(hostile_decide_bodies(sid))
    return to_proto(body), expected


def test_hostile_decide_messages_over_grpc(service: Service) -> None:
    """Structured DecideRequests: poisoned `message` text and non-finite Struct numbers are
    INVALID_ARGUMENT; odd values are decided as the policy says; the session keeps its
    quota."""
    sid = session()

    @FUZZ
    @given(grpc_decide_cases(sid))
    def examples(case: tuple[Any, str]) -> None:
        request, expected = case
        try:
            response = service.decisions.Decide(request, timeout=60)
        except grpc.RpcError as error:
            if request.ByteSize() > 1024 * 1024:  # over the message size limit
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                return
            code = check_grpc_error(error)
            assert expected == "invalid" and code == grpc.StatusCode.INVALID_ARGUMENT, (
                expected,
                code,
                error.details(),
            )
            return
        assert expected != "invalid", response
        verdict, _, rule = expected.partition(" ")
        assert VERDICT_NAMES[response.verdict] == verdict, (expected, response)
        if rule:
            assert response.rule == rule, (expected, response)
        else:
            assert response.dry_run and not response.outcome_token

    examples()
    after_examples(service, sid, used=0)


def _timestamp() -> st.SearchStrategy[Any]:
    return st.builds(
        timestamp_pb2.Timestamp,
        seconds=st.integers(-(2**63), 2**63 - 1),
        nanos=st.integers(-(2**31), 2**31 - 1),
    )


def test_hostile_fields_for_the_other_methods(service: Service) -> None:
    """Outcome reports, approval lookups and actions, and log queries with odd strings,
    numbers, enums and timestamps: answered with a fitting status, never a release of
    someone else's slot nor an approval of an unknown id."""
    sid = session()
    text = hostile_strings(max_long=3000)
    int32 = st.integers(-(2**31), 2**31 - 1)
    cases = st.one_of(
        st.builds(
            decision_pb2.ReportOutcomeRequest,
            decision_id=text,
            succeeded=st.booleans(),
            outcome_token=text,
        ).map(lambda r: ("ReportOutcome", r)),
        st.builds(approval_pb2.GetApprovalRequest, id=text).map(lambda r: ("GetApproval", r)),
        st.builds(approval_pb2.ApproveRequest, id=text, approver=text, comment=text).map(
            lambda r: ("Approve", r)
        ),
        st.builds(approval_pb2.DenyRequest, id=text, approver=text, comment=text).map(
            lambda r: ("Deny", r)
        ),
        st.builds(approval_pb2.ListApprovalsRequest, status=int32, limit=int32).map(
            lambda r: ("ListApprovals", r)
        ),
        st.builds(
            decision_pb2.ListDecisionsRequest,
            session_id=text,
            agent_id=text,
            tool=text,
            verdict=text,
            page_size=int32,
            page_token=text,
            since=_timestamp(),
            until=_timestamp(),
        ).map(lambda r: ("ListDecisions", r)),
    )
    stubs = {
        "ReportOutcome": service.decisions.ReportOutcome,
        "GetApproval": service.approvals.GetApproval,
        "Approve": service.approvals.Approve,
        "Deny": service.approvals.Deny,
        "ListApprovals": service.approvals.ListApprovals,
        "ListDecisions": service.log_stub.ListDecisions,
    }

    @FUZZ
    @given(cases, st.booleans())
    def examples(case: tuple[str, Any], authorised: bool) -> None:
        name, request = case
        try:
            response = stubs[name](request, timeout=60, metadata=GRPC_AUTH if authorised else None)
        except grpc.RpcError as error:
            check_grpc_error(error)
            return
        assert name not in ("Approve", "Deny", "GetApproval"), (name, request, response)
        if name == "ReportOutcome":
            assert not response.released

    examples()
    after_examples(service, sid, used=0)


# --------------------------------------------------------------------------------------
# The stdio proxy, in front of the fixture MCP server, deciding through the service.


class LineProxy:
    """`mcp-policy proxy` as a process fed raw lines. Its upstream is the fixture server
    behind `tee`, so every byte the proxy relays upstream is kept in `upstream_in`."""

    def __init__(self, tmp: Path, service: Service) -> None:
        self.agent_id = "fuzz-proxy-" + uuid.uuid4().hex[:8]
        self.upstream_in = tmp / "upstream.in"
        self.log = tmp / "proxy.log"
        command = [
            *PROXY,
            "proxy",
            "--decision-url",
            service.grpc_target,
            "--agent-id",
            self.agent_id,
            "--",
            "sh",
            "-c",
            'tee -a "$0" | exec "$@"',
            str(self.upstream_in),
            *FIXTURE,
        ]
        with self.log.open("ab") as errlog:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errlog,
                env=clean_env(),
                cwd=str(PROJECT_ROOT),
            )
        self.answers: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.sent_calls: list[dict[str, Any]] = []
        self.used = 0
        self._count = 0
        init = self.request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "fuzz", "version": "1"},
            },
        )
        assert init["result"]["serverInfo"]["name"] == HEALTHIMAGING, init
        self.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.answers.put(line)

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def next_message(self, timeout: float = 60) -> dict[str, Any]:
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no answer from the proxy; its log:\n{self.log.read_text()[-4000:]}"
            ) from None
        message: dict[str, Any] = json.loads(line)
        return message

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._count += 1
        request_id = f"fuzz-{self._count}-{uuid.uuid4().hex[:6]}"
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.write(json.dumps(message).encode())
        while True:
            answer = self.next_message()
            if answer.get("id") == request_id:
                return answer

    def exchange(self, line: AgentLine) -> list[dict[str, Any]]:
        """Send `line`, then a ping; every answer up to the ping's and the one `line` needs."""
        self._count += 1
        barrier = f"barrier-{self._count}-{uuid.uuid4().hex[:6]}"
        self.write(line.data)
        self.write(json.dumps({"jsonrpc": "2.0", "id": barrier, "method": "ping"}).encode())
        got: list[dict[str, Any]] = []
        pinged = False
        # Errors for lines that are not messages come before the ping's answer (lines are
        # screened in order); a tools/call is decided and relayed, so its answer may not.
        while not pinged or (
            line.expect == "answer" and not any(_same_id(m.get("id"), line.request_id) for m in got)
        ):
            message = self.next_message()
            if "method" in message and "id" not in message:
                continue  # a notification from upstream
            if message.get("id") == barrier:
                assert message.get("result") == {}, message
                pinged = True
                continue
            got.append(message)
        return got

    def check(self) -> None:
        assert self.proc.poll() is None, f"the proxy exited:\n{self.log.read_text()[-4000:]}"
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-8000:]

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            status = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return status


def _same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _answers(line: AgentLine, message: dict[str, Any]) -> bool:
    """Whether `message` is the answer `line` must get."""
    if line.expect == "parse-error":
        return message.get("id") is None and message.get("error", {}).get("code") == -32700
    if line.expect == "invalid":
        return (
            _same_id(message.get("id"), line.request_id)
            and message.get("error", {}).get("code") == -32600
        )
    return _same_id(message.get("id"), line.request_id) and (
        "result" in message or "error" in message
    )


def strict_json(line: bytes) -> Any:
    """Parse `line` as the strict parser would, by other means: UTF-8, no duplicate key,
    no NaN or Infinity, every number finite, every string valid Unicode."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        assert len(keys) == len(set(keys)), f"duplicate key upstream: {line[:300]!r}"
        return dict(items)

    def finite(text: str) -> float:
        value = float(text)
        assert math.isfinite(value), f"{text} upstream"
        return value

    def constant(name: str) -> Any:
        raise AssertionError(f"{name} upstream")

    value = json.loads(
        line.decode("utf-8"), object_pairs_hook=pairs, parse_float=finite, parse_constant=constant
    )
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot encode
    return value


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, service: Service) -> Iterator[LineProxy]:
    running = LineProxy(tmp_path_factory.mktemp("fuzz-proxy"), service)
    try:
        yield running
    finally:
        running.stop()


def proxy_session(service: Service, proxy: LineProxy) -> tuple[str, list[dict[str, Any]]]:
    """The proxy's session id and its allowed (not dry-run) decisions, from the log."""
    denied = proxy.request("tools/call", {"name": "delete_datastore", "arguments": {}})
    assert denied["result"]["isError"] is True, denied

    def records(**query: Any) -> list[dict[str, Any]]:
        listed = service.http.get(
            "/v1/decisions", params={"agent_id": proxy.agent_id, **query}, headers=AUTH
        )
        assert listed.status_code == 200, listed.text
        found: list[dict[str, Any]] = listed.json()["decisions"]
        return found

    newest = records(limit=1)[0]
    assert newest["tool"] == "delete_datastore", newest
    allowed = [r for r in records(verdict="allow", limit=1000) if not r.get("dry_run")]
    sid: str = newest["principal"]["session_id"]
    assert {r["principal"]["session_id"] for r in allowed} <= {sid}
    return sid, allowed


def test_hostile_lines_to_the_stdio_proxy(service: Service, proxy: LineProxy) -> None:
    """Hostile text, poisoned and ill-formed JSON-RPC, and well-formed tools/calls with
    hostile ids, names and arguments: every line gets the answer it must get, the proxy
    stays up, and only well-formed, allowed calls reach the upstream server, exactly as
    sent; the session's quota counts only the calls that went through."""

    @FUZZ
    @given(agent_lines())
    def examples(line: AgentLine) -> None:
        got = proxy.exchange(line)
        if line.expect == "none":
            assert got == [], (line, got)
            proxy.check()
            return
        assert len(got) == 1, (line, got)
        answer = got[0]
        assert _answers(line, answer), (line, answer)
        if "error" in answer:  # bounded, apart from the request id it must echo
            text = json.dumps(answer["error"])
            assert len(text.encode()) < MAX_ERROR_BYTES, len(text)
            assert not any(word in text for word in INTERNALS), text
        result = answer.get("result")
        if line.call is not None:
            proxy.sent_calls.append(line.call["params"])
            if isinstance(result, dict) and result.get("isError") is not True:
                assert "verdict" not in (result.get("structuredContent") or {}), result
                proxy.used += 1  # allowed, forwarded, and it succeeded: its slot is taken
        proxy.check()

    examples()
    proxy.check()
    sid, allowed = proxy_session(service, proxy)
    upstream = [strict_json(line) for line in proxy.upstream_in.read_bytes().splitlines()]
    for message in upstream:
        assert message.get("jsonrpc") == "2.0", message
    relayed = [m for m in upstream if m.get("method") == "tools/call"]
    assert len(relayed) == len(allowed), (relayed, allowed)
    for message in relayed:
        assert isinstance(message["id"], int | str) and not isinstance(message["id"], bool)
        params = {"name": message["params"]["name"], "arguments": message["params"]["arguments"]}
        assert any(
            params == {"name": sent["name"], "arguments": sent["arguments"]}
            for sent in proxy.sent_calls
        ), params
    peek = service.decide(
        {**copy_call(sid), "dry_run": True, "principal": {"agent_id": "x", "session_id": sid}}
    )
    if proxy.used >= LIMIT:
        assert peek["verdict"] == "rate_limited", peek
    else:
        assert peek["rate_limit"]["remaining"] == LIMIT - 1 - proxy.used, (proxy.used, peek)
    assert_log_writes(service)
    service.check()
