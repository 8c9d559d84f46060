"""Envoy ext_authz v3 on the gRPC port: a real Authorization client, built from the
packaged Envoy API (xds-protos), against the running service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from google.rpc import code_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.identity import add_entry
from engine.policy.opa_process import OpaProcess
from engine.transports import extauthz
from engine.transports.server import Servers, start_servers
from tests.conftest import (
    COPY_INFORMATION,
    DATASTORE,
    HEALTHIMAGING,
    IMAGE_SET,
    INTO_EXISTING,
    VALKEY,
    copy_policy,
    session,
    settings_for,
)
from tests.test_callers import WHOAMI, policy_saw
from tests.test_faults import add_rule_package


def arguments(**extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "datastore_id": DATASTORE,
        "source_image_set_id": IMAGE_SET,
        "copy_image_set_information": COPY_INFORMATION,
    }
    args.update(extra)
    return {k: v for k, v in args.items() if v is not None}


def tools_call(tool: str = "copy_image_set", jsonrpc_id: Any = 7, **extra: Any) -> str:
    message = {
        "jsonrpc": "2.0",
        "id": jsonrpc_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments(**extra)},
    }
    return json.dumps(message)


def check_request(
    body: str | bytes | None,
    *,
    sid: str | None = None,
    method: str = "POST",
    path: str = "/mcp",
    host: str = HEALTHIMAGING,
    server: str | None = HEALTHIMAGING,
    headers: dict[str, str] | None = None,
) -> Any:
    all_headers = {":method": method, ":path": path, ":authority": host}
    if method == "POST":
        all_headers["content-type"] = "application/json"
        size = len(body.encode() if isinstance(body, str) else body or b"")
        all_headers["content-length"] = str(size)
    if sid is not None:
        all_headers["mcp-session-id"] = sid
    all_headers.update(headers or {})
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=path, host=host, headers=all_headers
    )
    if isinstance(body, str):
        http.body = body
    elif isinstance(body, bytes):
        http.raw_body = body
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.CopyFrom(http)
    if server is not None:
        request.attributes.context_extensions["mcp_server"] = server
    return request


@dataclass
class Answer:
    ok: bool
    code: int
    http_status: int
    headers: dict[str, str]
    body: Any

    @property
    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = self.body["result"]
        return result

    @property
    def decision(self) -> dict[str, Any]:
        decision: dict[str, Any] = self.result["_meta"]["mcp-policy/decision"]
        return decision


def answer(response: Any) -> Answer:
    if response.HasField("ok_response"):
        assert response.status.code == code_pb2.OK
        headers = {h.header.key: h.header.value for h in response.ok_response.headers}
        return Answer(True, response.status.code, 0, headers, None)
    assert response.HasField("denied_response"), "every answer is ok or denied"
    assert response.status.code != code_pb2.OK
    denied = response.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers["content-type"] == "application/json"
    return Answer(False, response.status.code, denied.status.code, headers, json.loads(denied.body))


class Envoy:
    """What Envoy does: Check over gRPC, as a client of the packaged Envoy API."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None) -> None:
        self.stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def check(self, body: str | bytes | None, **kwargs: Any) -> Answer:
        response = await self.stub.Check(
            check_request(body, **kwargs), metadata=self.metadata, timeout=10
        )
        return answer(response)


@pytest.fixture
async def envoy(servers: Servers) -> AsyncIterator[Envoy]:
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        yield Envoy(channel)


async def test_listed_by_reflection(servers: Servers) -> None:
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert "envoy.service.auth.v3.Authorization" in names


# (case id, body, verdict, rule, words the reason must contain)
CASES: list[tuple[str, str, str, str, list[str]]] = [
    ("allow", tools_call(), "allow", "catalog.rule.copy_image_set", []),
    (
        "bad-datastore",
        tools_call(datastore_id="abc"),
        "deny",
        "copy_image_set.datastore_id_invalid",
        ["datastore_id"],
    ),
    (
        "unknown-tool",
        tools_call("delete_datastore"),
        "deny",
        "catalog.default",
        ["delete_datastore"],
    ),
    (
        "into-an-existing-image-set",
        tools_call(copy_image_set_information=INTO_EXISTING),
        "approval_required",
        "copy_image_set.existing_destination",
        ["approval"],
    ),
]


@pytest.mark.parametrize(
    ("body", "verdict", "rule", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_decision_table(
    envoy: Envoy, body: str, verdict: str, rule: str, words: list[str]
) -> None:
    got = await envoy.check(body, sid=session())
    if verdict == "allow":
        assert got.ok
        assert got.headers[extauthz.DECISION_HEADER].startswith("dec_")
        return
    assert not got.ok
    assert got.code == code_pb2.PERMISSION_DENIED, "Envoy must not forward"
    assert got.http_status == 200
    assert got.body["jsonrpc"] == "2.0" and got.body["id"] == 7
    assert got.result["isError"] is True
    assert got.result["resultType"] == "complete"
    assert got.decision["verdict"] == verdict
    assert got.decision["rule"] == rule
    for word in words:
        assert word in got.result["content"][0]["text"]


async def test_raw_body_bytes_and_string_id(envoy: Envoy) -> None:
    got = await envoy.check(
        tools_call(jsonrpc_id="r-1", datastore_id="abc").encode(), sid=session()
    )
    assert not got.ok and got.body["id"] == "r-1"
    assert got.decision["rule"] == "copy_image_set.datastore_id_invalid"


async def test_rate_limited_after_ten_in_one_session(envoy: Envoy) -> None:
    sid = session()
    for _ in range(10):
        assert (await envoy.check(tools_call(), sid=sid)).ok
    limited = await envoy.check(tools_call(), sid=sid)
    assert not limited.ok and limited.http_status == 200
    assert limited.decision["verdict"] == "rate_limited"
    assert limited.decision["rate_limit"]["retry_after_seconds"] > 0
    assert (await envoy.check(tools_call(), sid=session())).ok, "other sessions unaffected"


async def test_thirty_concurrent_checks_let_exactly_ten_through(envoy: Envoy) -> None:
    sid = session()
    answers = await asyncio.gather(*(envoy.check(tools_call(), sid=sid) for _ in range(30)))
    assert sum(a.ok for a in answers) == 10
    assert all(a.decision["verdict"] == "rate_limited" for a in answers if not a.ok)


async def test_outcome_report_with_the_headers_releases_the_slot(
    envoy: Envoy, servers: Servers
) -> None:
    sid = session()
    allowed = [await envoy.check(tools_call(), sid=sid) for _ in range(10)]
    assert all(a.ok for a in allowed)
    assert not (await envoy.check(tools_call(), sid=sid)).ok
    first = allowed[0].headers
    decision_id = first[extauthz.DECISION_HEADER]
    token = first[extauthz.OUTCOME_HEADER]
    async with httpx.AsyncClient(base_url=servers.http_url) as raw:
        response = await raw.post(
            f"/v1/decisions/{decision_id}/outcome",
            json={"succeeded": False, "outcome_token": token},
        )
    assert response.status_code == 200
    assert response.json() == {"decision_id": decision_id, "released": True}
    assert (await envoy.check(tools_call(), sid=sid)).ok, "the released slot is usable"


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ("not json", -32700, "Parse error"),
        ('{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call","params":{}}', -32700, "Parse"),
        (tools_call().replace(f'"{DATASTORE}"', "NaN"), -32700, "Parse error"),
        ("[" + tools_call() + "]", -32600, "batch"),
        (
            '{"jsonrpc":"2.0","method":"tools/call","params":{"name":"copy_image_set"}}',
            -32600,
            "tools/call",
        ),
        ('{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{}}', -32600, "id"),
        ('{"jsonrpc":"2.0","id":3,"method":"tools/call","params":[]}', -32602, "params"),
        ("", -32700, "Parse error"),
    ],
    ids=["not-json", "duplicate-keys", "nan", "batch", "no-id", "null-id", "params", "empty"],
)
async def test_malformed_bodies_are_400_jsonrpc_errors(
    envoy: Envoy, body: str, code: int, words: str
) -> None:
    got = await envoy.check(body, sid=session())
    assert not got.ok and got.http_status == 400
    assert got.body["jsonrpc"] == "2.0"
    assert got.body["error"]["code"] == code
    assert words in got.body["error"]["message"]


async def test_missing_body_is_denied_naming_with_request_body(envoy: Envoy) -> None:
    request = check_request(None, sid=session())
    request.attributes.request.http.headers["content-length"] = "120"
    got = answer(await envoy.stub.Check(request, timeout=10))
    assert not got.ok and got.http_status == 403
    assert "with_request_body" in got.body["reason"]


async def test_partial_body_is_denied(envoy: Envoy) -> None:
    got = await envoy.check(
        tools_call()[:20], sid=session(), headers={"x-envoy-auth-partial-body": "true"}
    )
    assert not got.ok and got.http_status == 403
    assert "max_request_bytes" in got.body["reason"]


async def test_non_mcp_request_is_denied_by_default(envoy: Envoy) -> None:
    got = await envoy.check(None, method="GET", path="/health")
    assert not got.ok and got.http_status == 403
    assert "not an MCP JSON-RPC POST" in got.body["reason"]


def test_non_mcp_request_may_be_allowed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, extauthz_non_mcp="allow")
    view = extauthz.http_view(check_request(None, method="GET", path="/health"))
    assert isinstance(extauthz.screen(view, settings), extauthz.Pass)


@pytest.mark.parametrize(
    "body",
    [
        '{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}',
        '{"jsonrpc":"2.0","method":"notifications/initialized"}',
        '{"jsonrpc":"2.0","id":5,"result":{}}',
    ],
    ids=["tools-list", "initialize", "notification", "response"],
)
async def test_other_mcp_messages_pass(envoy: Envoy, body: str) -> None:
    got = await envoy.check(body, sid=session())
    assert got.ok
    assert extauthz.DECISION_HEADER not in got.headers


async def test_pass_strips_decision_headers_the_agent_sent(envoy: Envoy) -> None:
    response = await envoy.stub.Check(
        check_request('{"jsonrpc":"2.0","id":1,"method":"tools/list"}'), timeout=10
    )
    removed = set(response.ok_response.headers_to_remove)
    assert {extauthz.DECISION_HEADER, extauthz.OUTCOME_HEADER} <= removed


async def test_context_extension_picks_the_server(envoy: Envoy) -> None:
    on_valkey = await envoy.check(tools_call(), sid=session(), host="gw.example", server=VALKEY)
    assert on_valkey.ok
    unmapped = await envoy.check(tools_call(), sid=session(), host="gw.example", server=None)
    assert not unmapped.ok
    assert "not in the policy catalog" in unmapped.result["content"][0]["text"]


@dataclass
class Guarded:
    servers: Servers
    opa: OpaProcess
    client_token: str
    api_key: str


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Guarded]:
    """A service with a clients file, agent API keys, a host mapping and its own OPA."""
    rego, data = copy_policy(tmp_path)
    add_rule_package(rego, "whoami", WHOAMI)
    clients = tmp_path / "clients.yaml"
    client_token = add_entry(clients, "client_token", "envoy-1")
    keys = tmp_path / "keys.yaml"
    api_key = add_entry(keys, "api_key", "agent-k", agent_id="agent-k", user_id="kim")
    opa = OpaProcess("opa")
    await opa.start()
    servers = await start_servers(
        settings_for(
            tmp_path,
            opa_url=opa.url,
            policy_paths=[rego, data],
            clients_file=clients,
            agent_keys_file=keys,
            extauthz_servers={"imaging.internal": HEALTHIMAGING},
        )
    )
    try:
        yield Guarded(servers, opa, client_token, api_key)
    finally:
        await servers.stop()
        await opa.stop()


async def test_guarded_service(guarded: Guarded) -> None:
    async with grpc.aio.insecure_channel(guarded.servers.grpc_target) as channel:
        anonymous = Envoy(channel)
        refused = await anonymous.check(tools_call(), sid=session())
        assert not refused.ok and refused.http_status == 403
        assert refused.code == code_pb2.UNAUTHENTICATED
        assert "not authenticated" in refused.body["reason"]

        envoy = Envoy(channel, guarded.client_token)
        mapped = await envoy.check(
            tools_call(), sid=session(), host="imaging.internal:443", server=None
        )
        assert mapped.ok, "the host mapping names the server"

        agent = {"authorization": f"Bearer {guarded.api_key}", "x-mcp-agent-id": "mallory"}
        seen = await envoy.check(tools_call("whoami"), sid=session(), headers=agent)
        principal = policy_saw(seen.result["content"][0]["text"])
        assert principal["agent_id"] == "agent-k", "the credential, not the header"
        assert principal["authenticated"] is True

        asserted = await envoy.check(
            tools_call("whoami"), headers={"x-mcp-agent-id": "a-9", "x-mcp-user-id": "u-9"}
        )
        principal = policy_saw(asserted.result["content"][0]["text"])
        assert (principal["agent_id"], principal["user_id"]) == ("a-9", "u-9")
        assert principal["asserted_by"] == "envoy-1"

        await guarded.opa.stop()
        down = await envoy.check(tools_call(), sid=session())
        assert not down.ok and down.http_status == 200
        assert down.decision["verdict"] == "deny"
        assert down.decision["rule"] == "engine.unavailable"


async def test_unexpected_fault_is_denied_never_ok(
    envoy: Envoy, servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(servers.runtime.service, "decide", broken)
    got = await envoy.check(tools_call(), sid=session())
    assert not got.ok and got.http_status == 500
    assert got.code == code_pb2.INTERNAL
    assert "boom" not in json.dumps(got.body), "no internal text leaks"
