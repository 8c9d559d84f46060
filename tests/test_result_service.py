"""Decisions on tool results (issue 24) in the service: POST /v1/decide-result, gRPC
DecideResult (the result as a Struct and as JSON text), the proxy's deciders (embedded and
gRPC), the decision log, the collector upload and the metrics.

Real services on loopback, real OPA: in this process and, where the engine matters, an
`opa run --server` of its own (MCP_POLICY_ENGINE=opa). The engine's own part is tested
with a small result policy of the test's (`TEST_POLICY`: its answer chosen by the call's
`context.result_test`), the shipped result rules through the shipped policy.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.identity import add_entry
from engine.models import DecideResultRequest, ResultAction
from engine.policy.fleet import check_events
from engine.policy.opa_process import OpaProcess
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.grpc_decider import GrpcDecider
from engine.state import audit
from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc
from tests.conftest import (
    APPROVER_TOKEN,
    HEALTHIMAGING,
    copy_call,
    copy_policy,
    session,
    settings_for,
    without_agent_limit,
)
from tests.fleet_world import FleetServer, opa_config
from tests.processes import Serve

AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
META = "mcp-policy/result-decision"
# Values the test policy redacts ($..PatientName) and a key it redacts by pattern: they
# must never reach an agent (redacted) nor the decision log or the collector (ever).
PHI = "DOE^JANE"
KEY = "AKIAIOSFODNN7EXAMPLE"

# A result policy of the test's own: the answer named by context.result_test (default
# "pass"); "undefined" gives none, "slow" passes its deadline.
TEST_POLICY = """package mcp

_mode := object.get(input.context, "result_test", "pass")

_none := {"redactions": [], "matched": [], "shadow": []}

_answers := {
	"pass": object.union(_none, {
		"action": "pass", "rule": "default.pass", "reason": "",
		"shadow": [{"level": "block", "rule": "t.shadow", "reason": "would block"}],
	}),
	"block": object.union(_none, {
		"action": "block", "rule": "t.block", "reason": "blocked by the test policy",
		"matched": ["t.block"],
	}),
	"block_silent": object.union(_none, {"action": "block", "rule": "t.silent", "reason": ""}),
	"redact": {
		"action": "redact", "rule": "t.phi", "reason": "patient data",
		"redactions": [
			{"rule": "t.key", "pattern": "AKIA[A-Z0-9]{16}", "replacement": "[KEY]"},
			{"rule": "t.phi", "path": "$..PatientName", "replacement": "[REDACTED]"},
		],
		"matched": ["t.key", "t.phi"], "shadow": [],
	},
	"malformed": {"action": "maybe", "rule": "t.x"},
	"no_rule": {"action": "pass"},
	"bad_path": object.union(_none, {
		"action": "redact", "rule": "t.bad",
		"redactions": [{"rule": "t.bad", "path": "PatientName", "replacement": "x"}],
	}),
	"bad_pattern": object.union(_none, {
		"action": "redact", "rule": "t.bad",
		"redactions": [{"rule": "t.bad", "pattern": "(", "replacement": "x"}],
	}),
	"pass_with_redactions": object.union(_none, {
		"action": "pass", "rule": "t.p",
		"redactions": [{"rule": "t.p", "path": "$.x", "replacement": "x"}],
	}),
	"echo": object.union(_none, {
		"action": "pass", "rule": "t.echo",
		"reason": json.marshal({
			"keys": object.keys(input), "request": input.request,
			"result_info": input.result_info, "principal": input.principal,
			"tool": input.tool, "content": count(input.result.content),
		}),
	}),
}

result_decision := _answers[_mode] if _mode != "slow"

result_decision := _answers.pass if {
	_mode == "slow"
	count([x | some x in numbers.range(1, 20000000)]) < 0
}
"""


def result_policy_dirs(tmp: Path, module: str = TEST_POLICY) -> list[Path]:
    """The shipped call policy (without the per-agent copy limit) with `module` as its
    whole result policy: the shipped result rules, if any, left out."""
    rego, data = copy_policy(tmp)
    without_agent_limit(rego)
    for path in (rego / "mcp" / "result_decision.rego", data / "results.yaml"):
        path.unlink(missing_ok=True)
    shutil.rmtree(rego / "mcp" / "result_rules", ignore_errors=True)
    (rego / "mcp" / "result_test_policy.rego").write_text(module)
    return [rego, data]


def result_call(mode: str = "pass", result: dict[str, Any] | None = None, **extra: Any) -> Any:
    """A result decision request: the copy_image_set call of a fresh session, its
    context naming the test policy's answer, and `result` (a text block by default)."""
    body = copy_call()
    body["context"] = {"result_test": mode}
    body["result"] = result if result is not None else {"content": [text("done")]}
    body.update(extra)
    return body


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def metadata(patient: str = PHI) -> dict[str, Any]:
    """DICOM-shaped image set metadata (as get_image_set_metadata's blob holds it)."""
    return {
        "SchemaVersion": "1.1",
        "Patient": {"DICOM": {"PatientName": patient, "PatientID": "P-1", "PatientSex": "F"}},
        "Study": {"DICOM": {"StudyInstanceUID": "1.2.840.1", "StudyDescription": "CT"}},
    }


def phi_result() -> dict[str, Any]:
    """A result carrying the patient's name in every place a document can be: structured
    content, JSON text, JSON text inside a string, base64 of gzip of JSON, and a key."""
    blob = base64.b64encode(gzip.compress(json.dumps(metadata()).encode())).decode()
    return {
        "content": [
            text(json.dumps(metadata())),
            text(json.dumps({"wrapped": json.dumps(metadata()), "note": f"key {KEY}"})),
            text(json.dumps({"image_set_metadata_blob": blob})),
        ],
        "structuredContent": {"items": [{"deep": [[metadata()]]}], "key": KEY},
    }


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def everything(value: Any) -> str:
    """Every string of `value`, decoded where a string is JSON, base64 or base64 of gzip:
    where a value could hide."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                out.append(key)
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, str):
            out.append(node)
            for decode in (
                lambda s: json.loads(s),
                lambda s: json.loads(base64.b64decode(s, validate=True)),
                lambda s: json.loads(gzip.decompress(base64.b64decode(s, validate=True))),
            ):
                try:
                    walk(decode(node))
                except Exception:  # noqa: BLE001, S112 - not that encoding
                    continue

    walk(value)
    return "\n".join(out)


# -- clients ------------------------------------------------------------------------------


@dataclass
class Refused(Exception):
    """A request the service refused: the HTTP status or gRPC code, message and field."""

    status: int | str
    message: str
    field: str | None = None


class ResultClient(Protocol):
    name: str

    async def decide_result(self, body: dict[str, Any]) -> dict[str, Any]: ...


class HttpResults:
    """POST /v1/decide-result; the answer as JSON, Refused for anything but 200."""

    name = "http"

    def __init__(self, raw: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:
        self.raw = raw
        self.headers = headers or {}

    async def decide_result(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.post(json.dumps(body).encode())

    async def post(self, content: bytes) -> dict[str, Any]:
        response = await self.raw.post(
            "/v1/decide-result",
            content=content,
            headers={"content-type": "application/json", **self.headers},
        )
        if response.status_code != 200:
            error = response.json()["error"]
            raise Refused(response.status_code, error["message"], error.get("field"))
        answer: dict[str, Any] = response.json()
        return answer


class GrpcResults:
    """DecideResult, the result sent as a Struct or (`as_json`) as JSON text; the answer
    spelled as the HTTP API spells it."""

    def __init__(self, channel: grpc.aio.Channel, *, as_json: bool, token: str | None = None):
        self.name = "grpc-json" if as_json else "grpc-struct"
        self.as_json = as_json
        self.stub = decision_pb2_grpc.DecisionServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def message(self, body: dict[str, Any]) -> decision_pb2.DecideResultRequest:
        body = dict(body)
        result = body.pop("result", None)
        if isinstance(body.get("message"), dict):
            body["message"] = json.dumps(body["message"])
        request = json_format.ParseDict(body, decision_pb2.DecideResultRequest())
        if result is not None:
            if self.as_json:
                request.result_json = json.dumps(result)
            else:
                request.result.update(result)
        return request

    async def decide_result(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.send(self.message(body))

    async def send(self, request: decision_pb2.DecideResultRequest) -> dict[str, Any]:
        try:
            response = await self.stub.DecideResult(request, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise Refused(exc.code().name, exc.details() or "", _field_of(exc)) from exc
        return spelled(response)


def _field_of(exc: grpc.aio.AioRpcError) -> str | None:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return str(bad.field_violations[0].field) or None
    return None


def spelled(response: decision_pb2.DecideResultResponse) -> dict[str, Any]:
    """A DecideResultResponse as the HTTP API answers."""
    out = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    out["action"] = out["action"].removeprefix("RESULT_ACTION_").lower()
    for entry in out.get("redactions", []):
        entry["count"] = int(entry["count"])
    if "mcp_result" in out:
        out["result"] = json.loads(json.dumps(out.pop("mcp_result")))
    elif "mcp_result_json" in out:
        out["result"] = json.loads(out.pop("mcp_result_json"))
    if out.pop("dry_run", False):
        out["dry_run"] = True
    return out


# -- services -----------------------------------------------------------------------------


@dataclass
class World:
    """A service with the test result policy, on one engine."""

    servers: Servers
    engine: str

    @property
    def log_path(self) -> Path:
        return Path(str(self.servers.runtime.settings.decision_log))

    def records(self, event: str = "result_decision") -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("event") == event]

    def record(self, decision_id: str) -> dict[str, Any]:
        (found,) = [r for r in self.records() if r["decision_id"] == decision_id]
        return found

    async def flushed(self) -> None:
        await self.servers.runtime.decision_log.flush()


async def start_world(
    tmp: Path, opa: OpaProcess | None, module: str = TEST_POLICY, **overrides: Any
) -> Servers:
    if opa is not None:
        overrides["opa_url"] = opa.url
    return await start_servers(
        settings_for(tmp, policy_paths=result_policy_dirs(tmp, module), **overrides)
    )


@pytest.fixture(scope="module", params=["inprocess", "opa"])
async def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    """The test result policy on each engine: OPA in the service's process, and an OPA
    server of its own (as MCP_POLICY_ENGINE=opa or MCP_POLICY_OPA_URL run it)."""
    tmp = tmp_path_factory.mktemp(f"results-{request.param}")
    opa = None
    if request.param == "opa":
        opa = OpaProcess("opa")
        await opa.start()
    servers = await start_world(tmp, opa)
    try:
        yield World(servers, request.param)
    finally:
        await servers.stop()
        if opa is not None:
            await opa.stop()


@pytest.fixture(params=["http", "grpc-struct", "grpc-json"])
async def results(request: pytest.FixtureRequest, world: World) -> AsyncIterator[ResultClient]:
    """The same test over HTTP and over gRPC, with the result as a Struct and as JSON."""
    if request.param == "http":
        async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
            yield HttpResults(raw)
    else:
        async with grpc.aio.insecure_channel(
            world.servers.grpc_target,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        ) as channel:
            yield GrpcResults(channel, as_json=request.param == "grpc-json")


# -- pass, block, redact ------------------------------------------------------------------


async def test_a_pass_hands_on_the_result_as_it_is(results: ResultClient) -> None:
    answer = await results.decide_result(result_call("pass", decision_id="dec_call"))
    assert answer["action"] == "pass"
    assert answer["rule"] == "default.pass"
    assert answer["decision_id"].startswith("rdec_")
    assert "result" not in answer, "on pass the tool's result goes on as it is"
    assert answer["shadow"] == [{"level": "block", "rule": "t.shadow", "reason": "would block"}]
    assert answer["policy_revision"].startswith("sha256:")


async def test_a_block_is_a_refusal_the_agent_reads(results: ResultClient) -> None:
    answer = await results.decide_result(result_call("block", phi_result()))
    assert answer["action"] == "block"
    assert answer["rule"] == "t.block"
    assert answer["matched"] == ["t.block"]
    refusal = answer["result"]
    assert refusal == {
        "content": [{"type": "text", "text": "blocked by the test policy"}],
        "isError": True,
        "_meta": {
            META: {
                "action": "block",
                "rule": "t.block",
                "reason": "blocked by the test policy",
                "decision_id": answer["decision_id"],
                "redactions": [],
            }
        },
    }
    assert PHI not in json.dumps(answer)


async def test_a_block_without_a_reason_still_says_why(results: ResultClient) -> None:
    answer = await results.decide_result(result_call("block_silent"))
    assert answer["action"] == "block"
    assert answer["result"]["content"][0]["text"] == answer["reason"]
    assert "t.silent" in answer["reason"]


async def test_a_redact_hands_on_the_rewritten_result(results: ResultClient) -> None:
    original = phi_result()
    original["_meta"] = {"tool/own": 1, META: {"forged": True}}
    answer = await results.decide_result(result_call("redact", original))
    assert answer["action"] == "redact"
    assert answer["rule"] == "t.phi"
    rewritten = answer["result"]
    seen = everything(rewritten)
    assert PHI not in seen and KEY not in seen, "a value the policy redacts was handed on"
    assert "[REDACTED]" in seen and "[KEY]" in seen
    by_rule = {r["rule"]: r for r in answer["redactions"]}
    assert by_rule["t.phi"]["path"] == "$..PatientName" and "pattern" not in by_rule["t.phi"]
    assert by_rule["t.phi"]["count"] == 4  # structured, text, wrapped text, gzip blob
    assert by_rule["t.key"]["pattern"] == "AKIA[A-Z0-9]{16}" and by_rule["t.key"]["count"] >= 2
    meta = rewritten["_meta"]
    assert meta["tool/own"] == 1, "the tool's own _meta stays"
    assert meta[META] == {
        "action": "redact",
        "rule": "t.phi",
        "reason": "patient data",
        "decision_id": answer["decision_id"],
        "redactions": answer["redactions"],
    }, "the engine's key is the engine's: a tool cannot forge it"
    # Nothing else changed: the study is still there.
    assert "1.2.840.1" in seen


async def test_a_dry_run_answers_the_same_and_is_logged_as_one(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        client = HttpResults(raw)
        before = world.servers.runtime.metrics.render().decode()
        answer = await client.decide_result(result_call("redact", phi_result(), dry_run=True))
        after = world.servers.runtime.metrics.render().decode()
    assert answer["action"] == "redact" and answer["dry_run"] is True
    assert PHI not in everything(answer["result"])
    await world.flushed()
    assert world.record(answer["decision_id"])["dry_run"] is True
    counted = 'mcp_policy_result_decisions_total{action="redact",rule="t.phi"}'
    assert _value(before, counted) == _value(after, counted), "a dry run is not counted"


# -- the input document -------------------------------------------------------------------


async def test_the_policy_sees_the_call_the_result_and_its_size(results: ResultClient) -> None:
    result = {"content": [text("é" * 10)], "structuredContent": {"n": 12345678901234567}}
    body = result_call("echo", result, decision_id="dec_of_the_call")
    answer = await results.decide_result(body)
    seen = json.loads(answer["reason"])
    assert seen["keys"] == ["context", "principal", "request", "result", "result_info", "tool"]
    assert seen["request"]["id"] == answer["decision_id"]
    assert seen["request"]["call_decision_id"] == "dec_of_the_call"
    assert seen["request"]["transport"] == ("http" if results.name == "http" else "grpc")
    assert seen["tool"] == {
        "server": HEALTHIMAGING,
        "name": "copy_image_set",
        "arguments": body["arguments"],
    }
    assert seen["principal"]["session_id"] == body["principal"]["session_id"]
    assert seen["principal"]["authenticated"] is False
    # As it was sent: a Struct carries numbers as doubles (JSON text keeps integers exact).
    sent = json.loads(json.dumps(result))
    if results.name == "grpc-struct":
        sent["structuredContent"]["n"] = int(float(12345678901234567))
    assert seen["result_info"] == {"size_bytes": len(compact(sent)), "max_bytes": 1048576}
    assert seen["content"] == 1


async def test_without_a_call_decision_id_the_request_names_none(results: ResultClient) -> None:
    seen = json.loads((await results.decide_result(result_call("echo")))["reason"])
    assert "call_decision_id" not in seen["request"]


# -- the proxy's deciders -----------------------------------------------------------------


async def test_the_embedded_decider_decides_results(world: World) -> None:
    decider = EmbeddedDecider(world.servers.runtime)
    request = DecideResultRequest.model_validate(result_call("redact", phi_result()))
    answer = await decider.decide_result(request)
    assert answer.action is ResultAction.REDACT
    assert answer.result is not None and PHI not in everything(answer.result)
    passed = await decider.decide_result(DecideResultRequest.model_validate(result_call()))
    assert passed.action is ResultAction.PASS and passed.result is None
    await world.flushed()
    assert world.record(answer.decision_id)["transport"] == "proxy"


async def test_the_grpc_decider_decides_results_and_keeps_big_integers(world: World) -> None:
    decider = GrpcDecider(world.servers.grpc_target)
    try:
        big = 2**63 + 1
        result = phi_result()
        result["structuredContent"]["big"] = big
        answer = await decider.decide_result(
            DecideResultRequest.model_validate(result_call("redact", result))
        )
        assert answer.action is ResultAction.REDACT
        assert answer.result is not None
        assert answer.result["structuredContent"]["big"] == big, "JSON text keeps integers"
        assert PHI not in everything(answer.result)
        assert {r.rule for r in answer.redactions} == {"t.phi", "t.key"}
        blocked = await decider.decide_result(
            DecideResultRequest.model_validate(result_call("block"))
        )
        assert blocked.action is ResultAction.BLOCK
        assert blocked.result is not None and blocked.result["isError"] is True
        passed = await decider.decide_result(DecideResultRequest.model_validate(result_call()))
        assert passed.action is ResultAction.PASS and passed.result is None
    finally:
        await decider.close()


# -- the decision log ---------------------------------------------------------------------


async def test_the_log_record_names_what_was_decided_never_a_value(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        client = HttpResults(raw)
        body = result_call("redact", phi_result(), decision_id="dec_the_call")
        answer = await client.decide_result(body)
    await world.flushed()
    record = world.record(answer["decision_id"])
    assert record["call_decision_id"] == "dec_the_call"
    assert record["principal"] == body["principal"]
    assert record["server"] == HEALTHIMAGING and record["tool"] == "copy_image_set"
    assert (record["action"], record["rule"]) == ("redact", "t.phi")
    assert record["matched"] == ["t.key", "t.phi"]
    assert record["redactions"] == answer["redactions"]
    assert record["result_sha256"] == hashlib.sha256(compact(body["result"])).hexdigest()
    assert record["size_bytes"] == len(compact(body["result"]))
    assert record["policy_revision"] == answer["policy_revision"]
    assert "arguments" not in record and record["arguments_sha256"]
    text_of_log = world.log_path.read_text()
    assert PHI not in text_of_log and KEY not in text_of_log
    assert "[REDACTED]" not in text_of_log, "not even the rewritten result"
    report = audit.verify_jsonl(world.log_path)
    assert report.finding is None, report.text()


async def test_input_logging_keeps_the_input_but_never_the_result(tmp_path: Path) -> None:
    servers = await start_world(tmp_path, None, decision_log_input=True)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            answer = await HttpResults(raw).decide_result(result_call("redact", phi_result()))
        await servers.runtime.decision_log.flush()
    finally:
        await servers.stop()
    log = (tmp_path / "decisions.jsonl").read_text()
    (record,) = [
        r for r in map(json.loads, log.splitlines()) if r["decision_id"] == answer["decision_id"]
    ]
    assert record["input"]["result_info"]["size_bytes"] == record["size_bytes"]
    assert "result" not in record["input"]
    assert record["input"]["tool"]["arguments"] == record["arguments_sha256"]  # hash mode
    assert record["policy"] == {"action": "redact", "rule": "t.phi"}
    assert PHI not in log and KEY not in log


async def test_with_the_log_synced_a_result_goes_on_once_its_record_is_written(
    tmp_path: Path,
) -> None:
    servers = await start_world(tmp_path, None, decision_log_sync="always")
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            client = HttpResults(raw)
            answers = [
                await client.decide_result(result_call(mode, phi_result()))
                for mode in ("pass", "redact")
            ]
            # No flush: each was answered only once its record was on disk.
            log = (tmp_path / "decisions.jsonl").read_text()
            schema = (await raw.get("/openapi.json")).json()
    finally:
        await servers.stop()
    for answer in answers:
        assert answer["decision_id"] in log
    assert "/v1/decide-result" in schema["paths"]
    assert "result" in schema["components"]["schemas"]["DecideResultRequest"]["required"]


async def test_result_decisions_are_no_call_decisions_in_the_listings(world: World) -> None:
    """GET /v1/decisions, ListDecisions and the status list call decisions: a result
    decision (in the JSONL log, linked by call_decision_id) is none of them."""
    sid = session()
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        call = await raw.post("/v1/decide", json=copy_call(sid))
        call_id = call.json()["decision_id"]
        before = (await raw.get("/v1/status", headers=AUTH)).json()
        body = {**result_call("block"), "principal": copy_call(sid)["principal"]}
        answer = await HttpResults(raw).decide_result({**body, "decision_id": call_id})
        listed = (await raw.get("/v1/decisions", params={"session_id": sid}, headers=AUTH)).json()
        assert [d["decision_id"] for d in listed["decisions"]] == [call_id]
        assert all(d["event"] == "decision" for d in listed["decisions"])
        missing = await raw.get(f"/v1/decisions/{answer['decision_id']}", headers=AUTH)
        assert missing.status_code == 404
        assert (await raw.get(f"/v1/decisions/{call_id}", headers=AUTH)).status_code == 200
        after = (await raw.get("/v1/status", headers=AUTH)).json()
        assert after["calls"] == before["calls"]
        assert after["verdicts"] == before["verdicts"]
    async with grpc.aio.insecure_channel(world.servers.grpc_target) as channel:
        stub = decision_pb2_grpc.DecisionLogServiceStub(channel)
        page = await stub.ListDecisions(
            decision_pb2.ListDecisionsRequest(session_id=sid),
            metadata=(("authorization", f"Bearer {APPROVER_TOKEN}"),),
        )
        assert [d["decision_id"] for d in page.decisions] == [call_id]
    await world.flushed()
    assert world.record(answer["decision_id"])["call_decision_id"] == call_id


# -- metrics ------------------------------------------------------------------------------


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def test_metrics_count_result_decisions_and_values_replaced_per_rule(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        client = HttpResults(raw)
        before = (await raw.get("/metrics")).text
        redacted = await client.decide_result(result_call("redact", phi_result()))
        await client.decide_result(result_call("block"))
        await client.decide_result(result_call("block"))
        await client.decide_result(result_call("malformed"))
        await client.decide_result(result_call("pass"))
        after = (await raw.get("/metrics")).text

    def grew(series: str) -> float:
        return _value(after, series) - _value(before, series)

    assert grew('mcp_policy_result_decisions_total{action="redact",rule="t.phi"}') == 1
    assert grew('mcp_policy_result_decisions_total{action="block",rule="t.block"}') == 2
    assert (
        grew('mcp_policy_result_decisions_total{action="block",rule="result.malformed_answer"}')
        == 1
    )
    counts = {r["rule"]: r["count"] for r in redacted["redactions"]}
    assert grew('mcp_policy_result_redactions_total{rule="t.phi"}') == counts["t.phi"]
    assert grew('mcp_policy_result_redactions_total{rule="t.key"}') == counts["t.key"]
    assert grew('mcp_policy_result_decisions_total{action="pass",rule="default.pass"}') == 1
    assert grew('mcp_policy_result_decision_seconds_count{transport="http"}') == 5
    assert grew("mcp_policy_result_opa_seconds_count") == 4  # the malformed answer: none
    assert grew('mcp_policy_shadow_total{level="block",rule="t.shadow"}') == 1


# -- a policy without result_decision ------------------------------------------------------

NO_RESULT_POLICY = "package mcp\n\nnot_a_result_decision := true\n"


@pytest.mark.parametrize("engine", ["inprocess", "opa"])
async def test_a_policy_without_result_decision_loads_and_blocks_results(
    tmp_path: Path, engine: str
) -> None:
    opa = OpaProcess("opa") if engine == "opa" else None
    if opa is not None:
        await opa.start()
    servers = await start_world(tmp_path, opa, NO_RESULT_POLICY)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            call = await raw.post("/v1/decide", json=copy_call())
            assert call.json()["verdict"] == "allow", "calls are decided as before"
            answer = await HttpResults(raw).decide_result(result_call(result=phi_result()))
            assert (await raw.get("/readyz")).status_code == 200
    finally:
        await servers.stop()
        if opa is not None:
            await opa.stop()
    assert answer["action"] == "block"
    assert answer["rule"] == "result.unavailable"
    assert "no result_decision" in answer["reason"]
    assert answer["result"]["isError"] is True and PHI not in json.dumps(answer)


async def test_a_bundle_file_without_result_decision_loads_and_blocks_results(
    tmp_path: Path,
) -> None:
    """A bundle built before results were decided on (fleet bundles load the same way)."""
    from tests.fleet_world import opa_build

    rego, data = result_policy_dirs(tmp_path, NO_RESULT_POLICY)
    bundle = opa_build([rego, data], tmp_path / "old.tar.gz", "old-1")
    servers = await start_servers(settings_for(tmp_path, bundle=bundle))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
            assert (await raw.post("/v1/decide", json=copy_call())).json()["verdict"] == "allow"
            answer = await HttpResults(raw).decide_result(result_call())
    finally:
        await servers.stop()
    assert (answer["action"], answer["rule"]) == ("block", "result.unavailable")
    assert answer["policy_revision"] == "old-1"


# -- sizes --------------------------------------------------------------------------------


def sized(target: int) -> dict[str, Any]:
    """A metadata-shaped result of about `target` bytes of JSON, the patient in it."""
    series = {
        f"1.2.840.{i}": {"Instances": {f"1.2.3.{i}.{j}": {"N": j} for j in range(20)}}
        for i in range(max(1, target // 500))
    }
    doc = {**metadata(), "Series": series}
    return {"content": [text(json.dumps(doc))], "structuredContent": {"ok": True}}


async def test_a_mebibyte_result_is_decided_on_every_transport(results: ResultClient) -> None:
    result = sized(780_000)
    assert 800_000 < len(compact(result)) < 1_048_576
    answer = await results.decide_result(result_call("redact", result))
    assert answer["action"] == "redact"
    assert PHI not in everything(answer["result"])
    echo = json.loads((await results.decide_result(result_call("echo", result)))["reason"])
    assert echo["result_info"]["size_bytes"] == len(compact(result))


async def test_a_result_larger_than_the_transport_takes_is_refused_naming_the_limit(
    results: ResultClient,
) -> None:
    result = sized(2_300_000)  # over max_body_bytes + result_max_bytes
    with pytest.raises(Refused) as refused:
        await results.decide_result(result_call("pass", result))
    assert refused.value.status in (413, "RESOURCE_EXHAUSTED")
    assert str(1048576 + 1048576) in refused.value.message


async def test_decide_keeps_its_own_body_limit(world: World) -> None:
    body = {**copy_call(), "context": {"pad": "x" * 1_100_000}}
    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        response = await raw.post("/v1/decide", json=body)
        assert response.status_code == 413
    async with grpc.aio.insecure_channel(world.servers.grpc_target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        request = json_format.ParseDict(body, decision_pb2.DecideRequest())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Decide(request)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1048576" in (caught.value.details() or "")


# -- callers and principals ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def guarded(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Servers, str, str]]:
    """A service that knows one proxy (a client token) and verifies agent API keys: the
    test result policy echoes what it was told of the principal."""
    tmp = tmp_path_factory.mktemp("results-guarded")
    clients = tmp / "clients.yaml"
    token = add_entry(clients, "client_token", "proxy-a")
    keys = tmp / "keys.yaml"
    api_key = add_entry(keys, "api_key", "agent-k", agent_id="agent-k", roles=["phi-reader"])
    servers = await start_world(tmp, None, clients_file=clients, agent_keys_file=keys)
    yield servers, token, api_key
    await servers.stop()


async def test_a_principal_is_established_as_for_calls(
    guarded: tuple[Servers, str, str],
) -> None:
    servers, token, api_key = guarded
    async with httpx.AsyncClient(base_url=servers.http_url, timeout=30) as raw:
        anonymous = HttpResults(raw)
        with pytest.raises(Refused) as refused:
            await anonymous.decide_result(result_call("echo"))
        assert refused.value.status == 401, "the same callers as /v1/decide"
        proxy = HttpResults(raw, {"Authorization": f"Bearer {token}"})
        asserted = json.loads(
            (
                await proxy.decide_result(
                    result_call("echo", principal_verified=True)
                    | {"principal": {"session_id": "s-1", "agent_id": "a", "roles": ["phi-reader"]}}
                )
            )["reason"]
        )
        assert asserted["principal"]["asserted_by"] == "proxy-a"
        assert asserted["principal"]["authenticated"] is False
        proven = json.loads(
            (await proxy.decide_result(result_call("echo", credential=api_key)))["reason"]
        )
        assert proven["principal"]["authenticated"] is True
        assert proven["principal"]["agent_id"] == "agent-k"
        assert proven["principal"]["roles"] == ["phi-reader"]
        forged = await proxy.decide_result(result_call("pass", credential="mcpk_forged"))
        assert (forged["action"], forged["rule"]) == ("block", "identity.invalid_credential")
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        client = GrpcResults(channel, as_json=True, token=token)
        seen = json.loads((await client.decide_result(result_call("echo")))["reason"])
        assert seen["request"]["transport"] == "grpc"
        with pytest.raises(Refused) as refused:
            await GrpcResults(channel, as_json=True).decide_result(result_call("echo"))
        assert refused.value.status == "UNAUTHENTICATED"


# -- the collector ------------------------------------------------------------------------


def test_result_decisions_reach_the_collector_without_the_result(tmp_path: Path) -> None:
    server = FleetServer()
    config = opa_config(tmp_path, server, bundles=False)
    serve = Serve(tmp_path, result_policy_dirs(tmp_path), {}, "--opa-config", str(config))
    try:
        url = f"{serve.url}/v1/decide-result"
        answers = [
            httpx.post(url, json=result_call(mode, phi_result()), timeout=30).json()
            for mode in ("pass", "redact", "block")
        ]
        call = serve.decide(copy_call())
        ids = {a["decision_id"] for a in answers} | {call["decision_id"]}
        server.wait(lambda r: ids <= set(r.ids()))
    finally:
        serve.stop()
        server.stop()
    events = {e["decision_id"]: e for e in server.received.events}
    assert check_events(list(events.values())) == len(events), "OPA's own EventV1"
    assert events[call["decision_id"]]["path"] == "mcp/decision"
    for answer in answers:
        event = events[answer["decision_id"]]
        assert event["path"] == "mcp/result_decision"
        assert event["result"]["action"] == answer["action"]
        assert event["result"]["rule"] == answer["rule"]
        assert event["result"]["redactions"] == answer["redactions"]
        assert len(event["result"]["result_sha256"]) == 64
        assert "result" not in event["input"] and "result" not in event["result"]
        assert event["input"]["result_info"]["size_bytes"] > 0
        assert "arguments" not in event["input"]["tool"]  # hashed, as the local log
        assert event["metrics"]["timer_mcp_policy_result_decision_ns"] > 0
    sent = json.dumps(server.received.events)
    assert PHI not in sent and KEY not in sent and "[REDACTED]" not in sent


# -- replay -------------------------------------------------------------------------------


async def test_replay_passes_over_result_decisions(world: World) -> None:
    """`mcp-policy replay` replays call decisions: a result decision in the log (or in a
    collector's events) is neither replayed nor reported as a skipped call."""
    from engine.authoring import replay

    async with httpx.AsyncClient(base_url=world.servers.http_url, timeout=30) as raw:
        answer = await HttpResults(raw).decide_result(result_call("block"))
    await world.flushed()
    record = world.record(answer["decision_id"])
    event = {
        "decision_id": answer["decision_id"],
        "path": "mcp/result_decision",
        "input": {"tool": {"name": "copy_image_set"}},
        "result": {"action": "block"},
    }
    assert replay._record_item(record, "log") is None
    assert replay._record_item(event, "collector") is None


# -- the shipped result rules -------------------------------------------------------------

READER_ROLE = "phi-reader"


@dataclass
class Shipped:
    servers: Servers
    reader_key: str  # an agent API key whose roles include phi-reader


@pytest.fixture(scope="module")
async def shipped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shipped]:
    """The shipped policy (result rules included) on a service that verifies agent API
    keys, with a result cap of 200 000 bytes."""
    tmp = tmp_path_factory.mktemp("results-shipped")
    rego, data = copy_policy(tmp)
    keys = tmp / "keys.yaml"
    key = add_entry(keys, "api_key", "reader", agent_id="reader", roles=[READER_ROLE])
    settings = settings_for(
        tmp,
        policy_paths=[without_agent_limit(rego), data],
        agent_keys_file=keys,
        result_max_bytes=200_000,
    )
    servers = await start_servers(settings)
    yield Shipped(servers, key)
    await servers.stop()


@pytest.fixture(params=["http", "grpc-json"])
async def shipped_client(
    request: pytest.FixtureRequest, shipped: Shipped
) -> AsyncIterator[ResultClient]:
    if request.param == "http":
        async with httpx.AsyncClient(base_url=shipped.servers.http_url, timeout=30) as raw:
            yield HttpResults(raw)
    else:
        async with grpc.aio.insecure_channel(shipped.servers.grpc_target) as channel:
            yield GrpcResults(channel, as_json=True)


def imaging_call(tool: str, result: dict[str, Any], **principal: Any) -> dict[str, Any]:
    sid = session()
    return {
        "server": HEALTHIMAGING,
        "tool": tool,
        "arguments": {"datastore_id": "d" * 32, "image_set_id": "i" * 32},
        "principal": {"agent_id": f"agent-{sid}", "session_id": sid, **principal},
        "result": result,
    }


def metadata_result(doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """get_image_set_metadata's answer as the real server gives it: the metadata as base64
    of gzip'd JSON, in structured content and in the text block the SDK adds."""
    blob = base64.b64encode(gzip.compress(compact(doc or metadata()), mtime=0)).decode()
    structured = {
        "image_set_metadata_blob": blob,
        "content_type": "application/json",
        "content_encoding": "gzip",
    }
    return {"content": [text(json.dumps(structured))], "structuredContent": structured}


async def test_shipped_patient_attributes_are_redacted_for_callers_not_proven_readers(
    shipped_client: ResultClient,
) -> None:
    body = imaging_call("get_image_set_metadata", metadata_result(), roles=[READER_ROLE])
    answer = await shipped_client.decide_result(body)  # the role claimed, not proven
    assert (answer["action"], answer["rule"]) == ("redact", "phi.dicom_patient")
    rewritten = answer["result"]
    assert PHI not in everything(rewritten) and "P-1" not in everything(rewritten)
    blob = rewritten["structuredContent"]["image_set_metadata_blob"]
    decoded = json.loads(gzip.decompress(base64.b64decode(blob)))
    assert decoded["Patient"]["DICOM"]["PatientName"] == "[REDACTED]"
    assert decoded["Study"]["DICOM"]["StudyInstanceUID"] == "1.2.840.1", "the rest is kept"
    # What was redacted, not each of the dozens of paths the rule asks for.
    counted = {r["path"]: r["count"] for r in answer["redactions"]}
    assert counted == {"$..PatientName": 2, "$..PatientID": 2, "$..PatientSex": 2}
    assert all(r["rule"] == "phi.dicom_patient" for r in answer["redactions"])


async def test_shipped_patient_attributes_pass_for_a_proven_reader(
    shipped: Shipped, shipped_client: ResultClient
) -> None:
    body = imaging_call("get_image_set_metadata", metadata_result())
    answer = await shipped_client.decide_result({**body, "credential": shipped.reader_key})
    assert answer["action"] == "pass"
    assert "result" not in answer


async def test_shipped_search_results_are_redacted_too(shipped_client: ResultClient) -> None:
    found = {
        "imageSetsMetadataSummaries": [
            {"imageSetId": "i" * 32, "DICOMTags": {"DICOMPatientName": PHI, "DICOMStudyId": "4711"}}
        ]
    }
    answer = await shipped_client.decide_result(
        imaging_call(
            "search_image_sets", {"content": [text(json.dumps(found))], "structuredContent": found}
        )
    )
    assert answer["action"] == "redact"
    assert PHI not in everything(answer["result"]) and "4711" in everything(answer["result"])


async def test_shipped_rules_block_aws_keys_in_any_result(shipped_client: ResultClient) -> None:
    result = {"content": [text(f"exported with {KEY}")]}
    answer = await shipped_client.decide_result(imaging_call("list_datastores", result))
    assert (answer["action"], answer["rule"]) == ("block", "secrets.aws_access_key")
    assert KEY not in json.dumps(answer)


async def test_shipped_rules_block_results_over_the_cap(shipped_client: ResultClient) -> None:
    result = {"content": [text("x" * 250_000)]}
    answer = await shipped_client.decide_result(imaging_call("list_datastores", result))
    assert (answer["action"], answer["rule"]) == ("block", "size.result_too_large")
    assert "200000" in answer["reason"]


async def test_shipped_prose_naming_a_patient_cannot_be_redacted_so_is_blocked(
    shipped_client: ResultClient,
) -> None:
    doc = metadata()
    doc["Study"]["DICOM"]["StudyDescription"] = f"prior images filed under PatientName {PHI}"
    answer = await shipped_client.decide_result(
        imaging_call("get_image_set_metadata", metadata_result(doc))
    )
    assert (answer["action"], answer["rule"]) == ("block", "result.unredactable")
    assert PHI not in json.dumps(answer)


# -- the wire conversions -----------------------------------------------------------------


def test_wire_round_trips_a_result_request_in_both_forms() -> None:
    from engine.transports import wire

    body = result_call("redact", phi_result(), decision_id="dec_1", dry_run=True)
    request = DecideResultRequest.model_validate(body)
    message = wire.decide_result_request_to_proto(request)
    assert message.WhichOneof("tool_result") == "result_json"
    back, as_json = wire.decide_result_request_from_proto(message, max_depth=24)
    assert as_json and back == request
    as_struct = decision_pb2.DecideResultRequest()
    as_struct.CopyFrom(message)
    as_struct.result.update(request.result)
    again, as_json = wire.decide_result_request_from_proto(as_struct, max_depth=24)
    assert not as_json and again.result == request.result


def test_a_client_reads_a_result_decision_closed() -> None:
    """An action it does not know, or a redact without its result, is a block with a
    refusal; a shadow entry of a level it does not know is left out."""
    from engine.transports import wire

    unknown = decision_pb2.DecideResultResponse(decision_id="rdec_1", action=7, reason="new")
    unknown.mcp_result_json = json.dumps({"content": [text(PHI)]})
    unknown.shadow.add(level="later", rule="x")
    read = wire.result_decision_from_proto(unknown)
    assert read.action is ResultAction.BLOCK and read.shadow == []
    assert read.result is not None and PHI not in json.dumps(read.result)
    assert read.result["isError"] is True
    bare = decision_pb2.DecideResultResponse(
        decision_id="rdec_2", action=decision_pb2.RESULT_ACTION_REDACT
    )
    read = wire.result_decision_from_proto(bare)
    assert read.action is ResultAction.BLOCK and read.result is not None
    assert read.result["_meta"][META]["decision_id"] == "rdec_2"
    passed = decision_pb2.DecideResultResponse(action=decision_pb2.RESULT_ACTION_PASS)
    assert wire.result_decision_from_proto(passed).result is None


def test_the_proto_rules_of_a_result_request_agree_with_the_model() -> None:
    from buf.validate import validate_pb2

    def limits(field: str) -> tuple[int, int]:
        options = decision_pb2.DecideResultRequest.DESCRIPTOR.fields_by_name[field].GetOptions()
        rules = options.Extensions[validate_pb2.field].string
        return rules.min_len, rules.max_len

    schema = DecideResultRequest.model_json_schema()["properties"]
    for field in ("server", "decision_id", "credential"):
        prop = schema[field]
        option = next(o for o in prop.get("anyOf", [prop]) if o.get("type") == "string")
        assert limits(field) == (option["minLength"], option["maxLength"]), field
    shared = {f.name for f in decision_pb2.DecideRequest.DESCRIPTOR.fields} - {"approval_id"}
    fields = decision_pb2.DecideResultRequest.DESCRIPTOR.fields_by_name
    for name in shared:  # the call's fields, as DecideRequest numbers them
        assert (
            fields[name].number == decision_pb2.DecideRequest.DESCRIPTOR.fields_by_name[name].number
        )
