"""The reference proxy applies the result policy (issue 24): real MCP SDK clients, over stdio
and streamable HTTP, through `mcp-policy proxy` (embedded, and --decision-url to a running
decision service over gRPC) in front of the fixture server's image-set tools, which answer
as the real awslabs.healthimaging-mcp-server does (get_image_set_metadata: base64 of the
gzip'd DICOM JSON; search_image_sets: DICOM tag summaries).

What the agent receives is searched whole, as an attacker would look at it: the JSON-RPC
answer's text, every string in it, and whatever those strings decode to (JSON text, base64,
base64 of gzip, in UTF-8 or Latin-1): no patient value the policy redacts, no AWS key, ever,
whatever the result looked like (tests/fixtures/imaging_server.py's hostile results), and
whatever happened to the decision service meanwhile. A proven phi-reader gets the result as
the server sent it; a dry run forwards it and logs what would have happened; and a result
decision held up holds up nothing but its own answer."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gzip
import json
import os
import subprocess
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from engine.identity import Identity, add_entry
from engine.models import DecideResultRequest, ResultDecision
from engine.proxy.auth import AuthConfig, ResourceServer
from engine.proxy.core import (
    ERROR,
    RESPONSE,
    Frame,
    ProxyOptions,
    ProxySession,
    tool_result_of,
)
from engine.proxy.decider import Decider
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.grpc_decider import GrpcDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child, open_http
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from engine.transports.server import Servers, start_servers
from tests.conftest import DATASTORE, HEALTHIMAGING, IMAGE_SET, add_tools, copy_policy, settings_for
from tests.fixtures.imaging_server import (
    ACCESSION_NUMBER,
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
    GATE_ENV,
    HOSTILE,
    IMAGE_SETS_ENV,
    INBOUND_ENV,
    LATIN1_PATIENT_NAME,
    PATIENT,
    PLAIN_ERROR,
    PROSE_PATIENT_NAME,
    RESULT_ENV,
    SECOND_PATIENT,
    image_set_metadata,
    image_set_summaries,
    metadata_blob,
)
from tests.fixtures.issuer import Issuer
from tests.fixtures.proxy_harness import (
    FIXTURE,
    PROXY,
    RECORD_ENV,
    HttpFixture,
    calls,
    clean_env,
    http_session,
    proxy_process,
    stdio_session,
)

METADATA = "get_image_set_metadata"
SEARCH = "search_image_sets"
METADATA_ARGS = {"datastore_id": DATASTORE, "image_set_id": IMAGE_SET}
SEARCH_ARGS = {"datastore_id": DATASTORE}
RESULT_META = "mcp-policy/result-decision"
REDACTED = "[REDACTED]"
PHI_RULE = "phi.dicom_patient"
AUDIENCE = "https://mcp.example.test/mcp"
PROXY_NAME = "results-proxy"
READER_ROLE = "phi-reader"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
PROTOCOL = "2025-11-25"
SEARCH_LIMIT = 2
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "raw-results-test", "version": "1"},
    },
}

# Every value that must never reach an agent that may not read it: the patients' (those of
# four characters or more: shorter ones, like a sex, are checked where they stand), the
# accession numbers, the names only hostile results carry, and the AWS keys.
PATIENT_VALUES = tuple(
    value
    for patient in (PATIENT, SECOND_PATIENT)
    for key, value in patient.items()
    if key != "PatientSex"
)
SENSITIVE = (
    *PATIENT_VALUES,
    ACCESSION_NUMBER,
    PROSE_PATIENT_NAME,
    LATIN1_PATIENT_NAME,
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
)


def phi_keys() -> frozenset[str]:
    """The attribute names the shipped policy redacts (policies/results.yaml): DICOM keywords
    and HealthImaging's DICOMTags keys."""
    data = yaml.safe_load((PROJECT_ROOT / "policies" / "results.yaml").read_text())
    phi = data["mcp_policy"]["results"]["phi"]
    return frozenset([*phi["attributes"], *phi["search_keys"]])


def results_policy(tmp: Path) -> list[Path]:
    """The shipped policy (with its result rules), the two image-set read tools catalogued
    as read/low: allowed, their results decided; search_image_sets limited to SEARCH_LIMIT
    calls a minute per session."""
    rego, data = copy_policy(tmp)
    add_tools(
        data,
        catalog=[
            {"server": HEALTHIMAGING, "tool": tool, "category": "read", "risk": "low"}
            for tool in (METADATA, SEARCH)
        ],
        rules={SEARCH: {"action": "rate_limit", "rate_limit": {"max": SEARCH_LIMIT, "window": 60}}},
    )
    return [rego, data]


# -- what the agent received ------------------------------------------------------------


def _decodings(text: str) -> Iterator[bytes]:
    """What a string of an answer may hide: its base64, and the gzip inside that."""
    compact = text.strip()
    if len(compact) < 8 or len(compact) % 4:
        return
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return
    yield data
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error):
            yield gzip.decompress(data)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def leaks(data: str | bytes, depth: int = 0) -> set[str]:
    """Every SENSITIVE value in `data` (an answer's text, say): as it is (UTF-8 or Latin-1),
    and in every string its JSON holds and whatever those decode to, at any depth."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    found = {
        value
        for value in SENSITIVE
        for encoding in ("utf-8", "latin-1")
        if value.encode(encoding) in raw
    }
    if depth > 8:
        return found | {"(too deep to look into)"}
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        document = raw.decode("utf-8", "replace") if depth == 0 else None
    for text in _strings(document):
        if text != data:
            found |= leaks(text, depth + 1)
        for decoded in _decodings(text):
            found |= leaks(decoded, depth + 1)
    return found


def redacted(value: Any, keys: frozenset[str]) -> Any:
    """`value` with the value of every key in `keys` replaced, at any depth (what the shipped
    $..<keyword> paths do to a document)."""
    if isinstance(value, dict):
        return {k: REDACTED if k in keys else redacted(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(item, keys) for item in value]
    return value


def blob_document(blob: str) -> Any:
    return json.loads(gzip.decompress(base64.b64decode(blob)))


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def result_decision(result: Any) -> dict[str, Any]:
    meta = result.meta or {}
    decision: dict[str, Any] = meta[RESULT_META]
    return decision


def assert_metadata_redacted(result: Any) -> None:
    """get_image_set_metadata's answer as an agent without the role gets it: the blob (in
    structuredContent, and in the JSON text content) decodes to the fixture's metadata with
    every patient attribute replaced, and nothing else changed."""
    assert result.is_error is False, text_of(result)
    expected = redacted(image_set_metadata(DATASTORE, IMAGE_SET), phi_keys())
    structured = result.structured_content
    assert structured["content_type"] == "application/json"
    assert structured["content_encoding"] == "gzip"
    assert blob_document(structured["image_set_metadata_blob"]) == expected
    (block,) = result.content
    from_text = json.loads(block.text)
    assert blob_document(from_text["image_set_metadata_blob"]) == expected
    assert expected["Patient"]["DICOM"]["PatientSex"] == REDACTED
    decision = result_decision(result)
    assert (decision["action"], decision["rule"]) == ("redact", PHI_RULE), decision
    counts = {r["path"]: r["count"] for r in decision["redactions"] if "path" in r}
    assert counts["$..PatientName"] >= 2, counts  # structured and text content
    assert leaks(result.model_dump_json(by_alias=True)) == set()


def assert_search_redacted(result: Any) -> None:
    assert result.is_error is False, text_of(result)
    keys = phi_keys()
    expected = redacted(image_set_summaries(DATASTORE), keys)
    summaries = result.structured_content["image_sets_metadata_summaries"]
    assert summaries == expected
    assert all(s["dicom_tags"]["DICOMPatientName"] == REDACTED for s in summaries)
    assert all(s["dicom_tags"]["DICOMPatientSex"] == REDACTED for s in summaries)
    assert all(s["dicom_tags"]["DICOMStudyInstanceUID"].startswith("1.2.") for s in summaries)
    (block,) = result.content
    assert json.loads(block.text)["image_sets_metadata_summaries"] == expected
    assert result_decision(result)["action"] == "redact"
    assert leaks(result.model_dump_json(by_alias=True)) == set()


def assert_metadata_unchanged(result: Any) -> None:
    """What the server sent, byte for byte in the blob: a proven phi-reader's answer."""
    assert result.is_error is False, text_of(result)
    blob = metadata_blob(image_set_metadata(DATASTORE, IMAGE_SET))
    assert result.structured_content["image_set_metadata_blob"] == blob
    assert json.loads(text_of(result))["image_set_metadata_blob"] == blob
    assert blob_document(blob)["Patient"]["DICOM"] == PATIENT
    assert RESULT_META not in (result.meta or {})


def result_records(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines() if log.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r.get("event") == "result_decision"]


# -- the decision service, and the proxies ---------------------------------------------


@dataclass
class Service:
    """The decision service (gRPC and HTTP) this module's proxies ask, knowing them by the
    client token `token`, so that the principal an authenticated proxy proves reaches it
    as asserted by that proxy; `log` is its decision log."""

    servers: Servers
    token: str
    log: Path

    @property
    def runtime(self) -> Runtime:
        return self.servers.runtime

    @property
    def grpc_target(self) -> str:
        return self.servers.grpc_target

    async def logged(self) -> list[dict[str, Any]]:
        """The result decisions in its log, once what it holds is written."""
        await self.runtime.decision_log.flush()
        return result_records(self.log)


async def start_service(tmp: Path) -> Service:
    clients = tmp / "clients.yaml"
    token = add_entry(clients, "client_token", PROXY_NAME)
    log = tmp / "decisions.jsonl"
    settings = settings_for(
        tmp,
        policy_paths=results_policy(tmp),
        clients_file=clients,
        decision_log=str(log),
    )
    return Service(await start_servers(settings), token, log)


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    running = await start_service(tmp_path_factory.mktemp("proxy-results"))
    yield running
    await running.servers.stop()


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    running = Issuer(audience=AUDIENCE)
    await running.start()
    yield running
    await running.stop()


def agent_token(issuer: Issuer, *roles: str) -> str:
    agent = "agent-" + uuid.uuid4().hex[:8]
    return issuer.token(sub="user-" + agent, client_id=agent, roles=list(roles))


def fixture_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The fixture's environment: its image-set tools, its call record, and `extra`."""
    return clean_env(**{IMAGE_SETS_ENV: "1", RECORD_ENV: str(tmp / "calls.jsonl"), **extra})


def decider_for(kind: str, service: Service) -> Decider:
    if kind == "embedded":
        return EmbeddedDecider(service.runtime)
    return GrpcDecider(service.grpc_target, client_token=service.token)


@contextlib.asynccontextmanager
async def listening(
    decider: Decider,
    *,
    env: dict[str, str] | None = None,
    url: str | None = None,
    auth: ResourceServer | None = None,
    **options: Any,
) -> AsyncIterator[HttpProxy]:
    """The HTTP proxy on a free loopback port before a fixture child (its environment
    `env`) or the fixture at `url`."""

    def open_upstream() -> Any:
        if url is not None:
            return open_http(url)
        return open_child(FIXTURE, env)

    running = await start_http_proxy(
        "127.0.0.1",
        0,
        decider=decider,
        options=ProxyOptions(**options),
        open_upstream=open_upstream,
        auth=auth,
    )
    try:
        yield running
    finally:
        await running.stop()
        await decider.close()


def grpc_args(service: Service) -> list[str]:
    return ["--decision-url", service.grpc_target]


def grpc_env(service: Service, tmp: Path, **extra: str) -> dict[str, str]:
    return fixture_env(tmp, MCP_POLICY_CLIENT_TOKEN=service.token, **extra)


def embedded_args(tmp: Path, log: str = "off") -> list[str]:
    args = ["--embedded", "--state-dir", str(tmp / "state"), "--decision-log", log]
    for path in results_policy(tmp):
        args += ["--policy", str(path)]
    return args


# -- an agent that may not read patient data --------------------------------------------


@pytest.mark.parametrize("where", ["embedded", "grpc"])
async def test_an_unproven_agent_over_stdio_gets_no_patient_data(
    service: Service, tmp_path: Path, where: str
) -> None:
    """`mcp-policy proxy -- <server>` (stdio, nobody proven: no role counts): the metadata
    blob decodes to the image set's metadata without a patient value, in structuredContent
    and in the JSON text content alike; the search's DICOM tags likewise. Everything else is
    as the server sent it, and the decision log holds no value either."""
    if where == "embedded":
        args, env = (
            embedded_args(tmp_path, str(tmp_path / "decisions.jsonl")),
            fixture_env(tmp_path),
        )
    else:
        args, env = grpc_args(service), grpc_env(service, tmp_path)
    async with stdio_session([*args, "--", *FIXTURE], env, tmp_path / "proxy.log") as session:
        listed = await session.list_tools()
        metadata = await session.call_tool(METADATA, METADATA_ARGS)
        search = await session.call_tool(SEARCH, SEARCH_ARGS)

    assert {METADATA, SEARCH} <= {tool.name for tool in listed.tools}
    assert_metadata_redacted(metadata)
    assert_search_redacted(search)
    assert [call["tool"] for call in calls(tmp_path / "calls.jsonl")] == [METADATA, SEARCH]
    if where == "embedded":
        log = tmp_path / "decisions.jsonl"
        logged = result_records(log)
    else:
        log = service.log
        logged = await service.logged()
    ids = {result_decision(metadata)["decision_id"], result_decision(search)["decision_id"]}
    records = [r for r in logged if r["decision_id"] in ids]
    assert sorted(r["tool"] for r in records) == [METADATA, SEARCH]
    assert all(r["action"] == "redact" and r["rule"] == PHI_RULE for r in records)
    assert all(r["call_decision_id"] for r in records)
    assert leaks(log.read_text()) == set()


# -- the HTTP listener: a proven phi-reader, and everyone else ---------------------------


async def test_a_proven_phi_reader_gets_the_result_as_sent_over_http_with_sse(
    service: Service, issuer: Issuer, tmp_path: Path
) -> None:
    """`--listen` with `--auth-*` (embedded decider), the server at a URL answering with SSE
    events: the role proven by the agent's token lets the result through untouched; the
    same call with a token without it, or with the role only claimed in the request, is
    redacted."""
    upstream = HttpFixture.start(fixture_env(tmp_path), tmp_path / "fixture.log")
    resource = ResourceServer(AuthConfig(issuer=issuer.issuer, audience=AUDIENCE))
    await resource.start()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            probe = await client.post(upstream.url, json=INITIALIZE, headers=ACCEPT)
        assert probe.headers["content-type"].startswith("text/event-stream")  # answers: SSE
        async with listening(
            EmbeddedDecider(service.runtime), url=upstream.url, auth=resource
        ) as running:
            reader = {"Authorization": f"Bearer {agent_token(issuer, READER_ROLE)}"}
            async with http_session(running.url, reader) as session:
                as_reader = await session.call_tool(METADATA, METADATA_ARGS)
                search_as_reader = await session.call_tool(SEARCH, SEARCH_ARGS)
            viewer = {"Authorization": f"Bearer {agent_token(issuer, 'viewer')}"}
            async with http_session(running.url, viewer) as session:
                as_viewer = await session.call_tool(METADATA, METADATA_ARGS)
                search_as_viewer = await session.call_tool(SEARCH, SEARCH_ARGS)
    finally:
        await resource.close()
        upstream.stop()

    assert_metadata_unchanged(as_reader)
    assert search_as_reader.structured_content["image_sets_metadata_summaries"] == (
        image_set_summaries(DATASTORE)
    )
    assert_metadata_redacted(as_viewer)
    assert_search_redacted(search_as_viewer)


async def test_a_phi_reader_proven_to_an_authenticated_proxy_over_grpc(
    service: Service, issuer: Issuer, tmp_path: Path
) -> None:
    """`mcp-policy proxy --listen --decision-url --auth-*`, the proxy known to the service by
    its client token: the role reaches the result policy as asserted by that proxy."""
    args = [*grpc_args(service), "--auth-issuer", issuer.issuer, "--auth-audience", AUDIENCE]
    async with proxy_process(args, grpc_env(service, tmp_path)) as url:
        reader = {"Authorization": f"Bearer {agent_token(issuer, READER_ROLE)}"}
        async with http_session(url, reader) as session:
            as_reader = await session.call_tool(METADATA, METADATA_ARGS)
        viewer = {"Authorization": f"Bearer {agent_token(issuer, 'viewer', 'imaging-admin')}"}
        async with http_session(url, viewer) as session:
            as_viewer = await session.call_tool(METADATA, METADATA_ARGS)
            search_as_viewer = await session.call_tool(SEARCH, SEARCH_ARGS)

    assert_metadata_unchanged(as_reader)
    assert_metadata_redacted(as_viewer)
    assert_search_redacted(search_as_viewer)


# -- hostile results ----------------------------------------------------------------------


class RawAgent:
    """An MCP client in raw HTTP: what the proxy answers is kept as the very text it sent."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.headers = dict(ACCEPT)

    async def open(self) -> None:
        response = await self.client.post(self.url, json=INITIALIZE, headers=self.headers)
        assert response.status_code == 200, response.text
        self.headers["mcp-session-id"] = response.headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = PROTOCOL
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        response = await self.client.post(self.url, json=note, headers=self.headers)
        assert response.status_code == 202, response.text

    async def call(self, request_id: int, name: str, arguments: dict[str, Any]) -> str:
        """The text of the JSON-RPC answer to a tools/call (the SSE event's data)."""
        body = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
        response = await self.client.post(self.url, json=body, headers=self.headers)
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("application/json"):
            return response.text
        for line in response.text.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data and json.loads(data).get("id") == request_id:
                    return data
        raise AssertionError(f"no answer to {request_id} in {response.text[:2000]}")


# What each hostile result must come to (None: redacted or blocked, as long as nothing
# leaks): a block with this rule.
BLOCKED = {
    ("prose-phi", METADATA): "result.unredactable",
    ("prose-phi", SEARCH): "result.unredactable",
    # In the metadata the key is inside the gzip'd blob, where Rego cannot see it: the
    # engine finds it decoding the blob (the pattern's block_if_found) and blocks.
    ("aws-key", METADATA): "secrets.aws_access_key",
    ("aws-key", SEARCH): "secrets.aws_access_key",
    ("huge", METADATA): "size.result_too_large",
    ("huge", SEARCH): "size.result_too_large",
    ("error-aws-key", METADATA): "secrets.aws_access_key",
    ("error-aws-key", SEARCH): "secrets.aws_access_key",
}


@pytest.mark.parametrize("where", ["embedded", "grpc"])
@pytest.mark.parametrize("kind", HOSTILE)
async def test_a_hostile_result_never_hands_the_agent_what_the_policy_redacts(
    service: Service, tmp_path: Path, kind: str, where: str
) -> None:
    """Patient data hidden in nested arrays, in escaped JSON text, in base64, in prose, in
    metadata that is not UTF-8, AWS keys in a result or in a JSON-RPC error, a result over
    the size cap: the answer text the agent receives holds none of it, decoded however it
    may be. A blocked result is a tool error the agent reads (isError, the reason); a
    redacted one is the result with the values replaced. Never a 5xx."""
    env = fixture_env(tmp_path, **{RESULT_ENV: kind})
    answers: dict[str, str] = {}
    async with (
        listening(decider_for(where, service), env=env) as running,
        httpx.AsyncClient(timeout=60) as client,
    ):
        agent = RawAgent(client, running.url)
        await agent.open()
        for request_id, (tool, arguments) in enumerate(
            ((METADATA, METADATA_ARGS), (SEARCH, SEARCH_ARGS)), start=1
        ):
            answers[tool] = await agent.call(request_id, tool, arguments)

    assert [call["tool"] for call in calls(tmp_path / "calls.jsonl")] == [METADATA, SEARCH]
    for tool, text in answers.items():
        assert leaks(text) == set(), (kind, tool)
        answer = json.loads(text)
        assert "error" not in answer, (kind, tool, answer)  # errors come back as results
        result = answer["result"]
        decision = result["_meta"][RESULT_META]
        assert decision["decision_id"].startswith("rdec_"), decision  # the service's own
        rule = BLOCKED.get((kind, tool))
        if rule is not None:
            assert result["isError"] is True, (kind, tool)
            assert (decision["action"], decision["rule"]) == ("block", rule), (kind, tool)
            assert [block["text"] for block in result["content"]] == [decision["reason"]]
            assert "structuredContent" not in result
        elif decision["action"] == "block":
            assert result["isError"] is True, (kind, tool)
            assert "structuredContent" not in result
        else:
            assert decision["action"] == "redact", (kind, tool, decision)
            assert result.get("isError") is False


async def test_a_blocked_result_still_ran_so_its_rate_limit_slot_stays_used(
    service: Service, tmp_path: Path
) -> None:
    """A result the policy blocks (over the size cap) was a call that succeeded upstream:
    its outcome is reported as such and its slot is not given back, so the call after the
    limit is refused and never reaches the server."""
    env = fixture_env(tmp_path, **{RESULT_ENV: "huge"})
    async with (
        listening(decider_for("embedded", service), env=env) as running,
        http_session(running.url) as session,
    ):
        blocked = [await session.call_tool(SEARCH, SEARCH_ARGS) for _ in range(SEARCH_LIMIT)]
        limited = await session.call_tool(SEARCH, SEARCH_ARGS)

    for result in blocked:
        assert result.is_error is True
        assert result_decision(result)["rule"] == "size.result_too_large"
    assert limited.is_error is True
    assert (limited.meta or {})["mcp-policy/decision"]["verdict"] == "rate_limited"
    assert [call["tool"] for call in calls(tmp_path / "calls.jsonl")] == [SEARCH] * SEARCH_LIMIT


async def test_a_json_rpc_error_the_policy_passes_is_handed_on_as_the_error(
    service: Service, tmp_path: Path
) -> None:
    """An error answer is checked as a result made of its message and data; passed (nothing
    to redact in it), the agent gets the server's JSON-RPC error itself."""
    env = fixture_env(tmp_path, **{RESULT_ENV: "error"})
    async with (
        listening(decider_for("grpc", service), env=env) as running,
        httpx.AsyncClient(timeout=60) as client,
    ):
        agent = RawAgent(client, running.url)
        await agent.open()
        answer = json.loads(await agent.call(1, METADATA, METADATA_ARGS))

    assert answer == {"jsonrpc": "2.0", "id": 1, "error": PLAIN_ERROR}
    session_id = agent.headers["mcp-session-id"]
    (record,) = [r for r in await service.logged() if r["principal"]["session_id"] == session_id]
    assert record["tool"] == METADATA
    assert record["action"] in ("pass", "redact")
    assert all(r["count"] == 0 for r in record.get("redactions", []))


def test_what_the_result_policy_is_asked_about_an_error() -> None:
    error = Frame.error(3, -32603, "failed")
    error.value["error"]["data"] = {"secret_key": "x", "n": [1, 2]}
    assert tool_result_of(error) == {
        "content": [
            {"type": "text", "text": "failed"},
            {"type": "text", "text": '{"secret_key":"x","n":[1,2]}'},
        ],
        "isError": True,
    }
    assert tool_result_of(Frame.error(3, -32603, "no data")) == {
        "content": [{"type": "text", "text": "no data"}],
        "isError": True,
    }
    ok = Frame.response(3, {"content": [], "structuredContent": {"a": "b"}})
    assert tool_result_of(ok) is ok.result


# -- failing closed ---------------------------------------------------------------------


async def test_the_decision_service_going_down_mid_call_withholds_the_result(
    tmp_path: Path,
) -> None:
    """The call is decided and forwarded; the decision service stops before the server
    answers: the answer is withheld (result.unavailable), never passed as it came."""
    running = await start_service(tmp_path)
    gate = tmp_path / "gate"
    env = fixture_env(tmp_path, **{GATE_ENV: str(gate), "MCP_POLICY_CLIENT_TOKEN": running.token})
    args = ["--decision-url", running.grpc_target, "--decision-timeout", "2", "--", *FIXTURE]
    stopped = False
    try:
        async with stdio_session(args, env, tmp_path / "proxy.log") as session:
            pending = asyncio.create_task(session.call_tool(METADATA, METADATA_ARGS))
            with anyio.fail_after(30):
                while not calls(tmp_path / "calls.jsonl"):
                    await anyio.sleep(0.02)
            await running.servers.stop()
            stopped = True
            gate.touch()
            withheld = await pending
            after = await session.call_tool(SEARCH, SEARCH_ARGS)
    finally:
        if not stopped:
            await running.servers.stop()

    assert withheld.is_error is True
    assert withheld.structured_content is None
    decision = result_decision(withheld)
    assert (decision["action"], decision["rule"]) == ("block", "result.unavailable")
    assert "result policy unavailable" in text_of(withheld)
    assert leaks(withheld.model_dump_json(by_alias=True)) == set()
    # The next call is not even forwarded: its own decision cannot be had.
    assert after.is_error is True
    assert (after.meta or {})["mcp-policy/decision"]["rule"] == "proxy.decision_unavailable"
    assert [call["tool"] for call in calls(tmp_path / "calls.jsonl")] == [METADATA]


class HeldResults(EmbeddedDecider):
    """The embedded decider; its result decisions on `held`'s answers wait for `release`.
    `decided` lists the tools whose result decisions were made, in order."""

    def __init__(self, runtime: Runtime, held: str) -> None:
        super().__init__(runtime)
        self.held = held
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.decided: list[str] = []

    async def decide_result(
        self, request: DecideResultRequest, identity: Identity | None = None
    ) -> ResultDecision:
        assert isinstance(request.message, dict)
        tool = request.message["params"]["name"]
        if tool == self.held:
            self.holding.set()
            await self.release.wait()
        decision = await super().decide_result(request, identity)
        self.decided.append(tool)
        return decision


async def test_a_held_result_decision_holds_up_no_other_answer(
    service: Service, tmp_path: Path
) -> None:
    """While one call's result decision is held, another call in the same session is
    decided, forwarded, answered and its result decided; pings and listings are answered.
    The held one is answered once its decision is made (no timing: the order is the proof)."""
    decider = HeldResults(service.runtime, METADATA)
    async with (
        listening(decider, env=fixture_env(tmp_path)) as running,
        http_session(running.url) as session,
    ):
        held = asyncio.create_task(session.call_tool(METADATA, METADATA_ARGS))
        await asyncio.wait_for(decider.holding.wait(), 60)
        search = await session.call_tool(SEARCH, SEARCH_ARGS)
        await session.send_ping()
        listed = await session.list_tools()
        assert not held.done()
        assert decider.decided == [SEARCH]
        decider.release.set()
        metadata = await held

    assert decider.decided == [SEARCH, METADATA]
    assert_search_redacted(search)
    assert_metadata_redacted(metadata)
    assert METADATA in {tool.name for tool in listed.tools}


class FrameAgent:
    """The agent side of a ProxySession that takes frames (as the stdio transport does)."""

    def __init__(self) -> None:
        self.to_proxy, self.inbox = anyio.create_memory_object_stream[Frame](16)
        self.frames: list[Frame] = []
        self.arrived = anyio.Event()

    async def send_frame(self, frame: Frame, /) -> None:
        self.frames.append(frame)
        self.arrived.set()

    async def answer(self, request_id: Any) -> Frame:
        with anyio.fail_after(60):
            while True:
                for frame in self.frames:
                    if frame.kind in (RESPONSE, ERROR) and frame.id == request_id:
                        return frame
                self.arrived = anyio.Event()
                await self.arrived.wait()


async def test_a_call_cancelled_during_its_result_decision_frees_its_id(
    service: Service, tmp_path: Path
) -> None:
    """The agent cancels a call whose answer is being decided on: nothing of that answer
    reaches it, nothing more goes upstream (the server has answered), and the id is free at
    once: a new call with it is decided, forwarded and answered on its own."""
    decider = HeldResults(service.runtime, METADATA)
    inbound = tmp_path / "inbound.jsonl"
    env = fixture_env(tmp_path, **{INBOUND_ENV: str(inbound)})
    agent = FrameAgent()
    session = ProxySession(decider, ProxyOptions(), session_id="results-" + uuid.uuid4().hex)
    hello = {
        "protocolVersion": PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "results-test", "version": "1"},
    }
    async with open_child(FIXTURE, env) as child, anyio.create_task_group() as tg:
        tg.start_soon(session.run, agent.inbox, agent, child)
        await agent.to_proxy.send(Frame.request(0, "initialize", hello))
        assert (await agent.answer(0)).kind == RESPONSE
        await agent.to_proxy.send(Frame.notification("notifications/initialized", {}))
        params = {"name": METADATA, "arguments": METADATA_ARGS}
        await agent.to_proxy.send(Frame.request(7, "tools/call", params))
        await asyncio.wait_for(decider.holding.wait(), 60)
        cancelled = {"requestId": 7, "reason": "the agent moved on"}
        await agent.to_proxy.send(Frame.notification("notifications/cancelled", cancelled))
        again = {"name": SEARCH, "arguments": SEARCH_ARGS}
        await agent.to_proxy.send(Frame.request(7, "tools/call", again))
        answer = await agent.answer(7)
        await agent.to_proxy.send(Frame.request("ping", "ping", {}))
        await agent.answer("ping")
        decider.release.set()
        await agent.to_proxy.aclose()
    await agent.inbox.aclose()

    assert answer.kind == RESPONSE, answer
    assert answer.result["_meta"][RESULT_META]["action"] == "redact"
    assert "image_sets_metadata_summaries" in answer.result["structuredContent"]
    assert [f.id for f in agent.frames if f.kind in (RESPONSE, ERROR)] == [0, 7, "ping"]
    assert decider.decided == [SEARCH]
    assert leaks(b"".join(frame.line() for frame in agent.frames)) == set()
    received = [json.loads(line)["method"] for line in inbound.read_text().splitlines()]
    assert "notifications/cancelled" not in received
    assert [call["tool"] for call in calls(tmp_path / "calls.jsonl")] == [METADATA, SEARCH]


# -- dry run ----------------------------------------------------------------------------


async def test_a_dry_run_forwards_the_result_and_logs_what_would_have_happened(
    tmp_path: Path,
) -> None:
    """`--result-policy dry-run` (embedded): the agent gets the server's answer as it came;
    the decision log says the policy would have redacted it (and holds no value)."""
    log = tmp_path / "decisions.jsonl"
    args = [*embedded_args(tmp_path, str(log)), "--result-policy", "dry-run", "--", *FIXTURE]
    async with stdio_session(args, fixture_env(tmp_path), tmp_path / "proxy.log") as session:
        metadata = await session.call_tool(METADATA, METADATA_ARGS)

    assert_metadata_unchanged(metadata)
    (record,) = result_records(log)
    assert record["tool"] == METADATA
    assert (record["action"], record["rule"], record["dry_run"]) == ("redact", PHI_RULE, True)
    counted = {r["path"]: r["count"] for r in record["redactions"] if "path" in r}
    assert counted["$..PatientName"] >= 2, record  # what would have been replaced
    assert leaks(log.read_text()) == set()


async def test_the_dry_run_setting_from_the_environment_over_grpc(
    service: Service, tmp_path: Path
) -> None:
    """MCP_PROXY_RESULT_POLICY=dry-run: the search's tags are forwarded as they came; the
    service's log has the dry run's redact."""
    env = grpc_env(service, tmp_path, MCP_PROXY_RESULT_POLICY="dry-run")
    args = [*grpc_args(service), "--", *FIXTURE]
    async with stdio_session(args, env, tmp_path / "proxy.log") as session:
        search = await session.call_tool(SEARCH, SEARCH_ARGS)

    assert search.is_error is False
    summaries = search.structured_content["image_sets_metadata_summaries"]
    assert summaries == image_set_summaries(DATASTORE)
    assert RESULT_META not in (search.meta or {})
    records = [r for r in await service.logged() if r.get("dry_run") and r["tool"] == SEARCH]
    assert records and all(r["action"] == "redact" for r in records)


@pytest.mark.parametrize(
    ("flags", "env", "problem"),
    [
        (["--result-policy", "off"], {}, "invalid choice: 'off'"),
        ([], {"MCP_PROXY_RESULT_POLICY": "log-only"}, "MCP_PROXY_RESULT_POLICY must be"),
    ],
)
async def test_a_result_policy_setting_it_does_not_know_stops_the_proxy(
    tmp_path: Path, flags: list[str], env: dict[str, str], problem: str
) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [*PROXY, "proxy", *embedded_args(tmp_path), *flags, "--", *FIXTURE],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(**env),
        cwd=str(PROJECT_ROOT),
    )
    assert done.returncode == 2, done.stderr
    assert problem in done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "state").exists(), "nothing was started"


def test_the_help_says_what_the_result_policy_setting_does() -> None:
    done = subprocess.run(
        [*PROXY, "proxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        cwd=str(PROJECT_ROOT),
    )
    assert done.returncode == 0
    assert "--result-policy {enforce,dry-run}" in done.stdout
    assert "MCP_PROXY_RESULT_POLICY" in done.stdout
