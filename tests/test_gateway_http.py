"""Gateway protocols on the HTTP port, through real HTTP against the running service:
forward-auth (`/v1/check`, as Traefik forwardAuth and Envoy's HTTP ext_authz call it)
and the AuthZEN 1.0 Access Evaluation API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from engine.identity import add_entry
from engine.transports.server import start_servers
from tests.clients import HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    COPY_INFORMATION,
    DATASTORE,
    DATASTORE_2,
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

META = "mcp-policy/decision"
MAPPED_HOST = "imaging.gateway.example"


def tools_call(
    jsonrpc_id: Any = 7, name: str = "copy_image_set", **arguments: Any
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "datastore_id": DATASTORE,
        "source_image_set_id": IMAGE_SET,
        "copy_image_set_information": COPY_INFORMATION,
    }
    args.update(arguments)
    return {
        "jsonrpc": "2.0",
        "id": jsonrpc_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": {k: v for k, v in args.items() if v is not None}},
    }


def forwarded(sid: str | None = None, **extra: str) -> dict[str, str]:
    """Headers as Traefik forwards them (the original host names the server). No principal
    headers: a gateway that names the agent must prove itself (see `guarded`)."""
    headers = {
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Uri": "/mcp",
        "X-Forwarded-Host": HEALTHIMAGING,
        "Mcp-Session-Id": sid or session(),
        "Content-Type": "application/json",
    }
    headers.update(extra)
    return headers


async def check(
    client: httpx.AsyncClient,
    message: Any,
    headers: dict[str, str],
    path: str = "/v1/check",
    method: str = "POST",
) -> httpx.Response:
    content = message if isinstance(message, bytes) else json.dumps(message).encode()
    return await client.request(method, path, content=content, headers=headers)


def refusal(response: httpx.Response, jsonrpc_id: Any = 7) -> dict[str, Any]:
    """The decision carried by a refused forward-auth answer (checking its shape)."""
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == jsonrpc_id
    result = body["result"]
    assert result["isError"] is True and result["resultType"] == "complete"
    assert "structuredContent" not in result
    decision: dict[str, Any] = result["_meta"][META]
    assert result["content"][0]["text"].endswith(decision["reason"])
    assert response.headers["X-MCP-Policy-Decision-Id"] == decision["decision_id"]
    return decision


@pytest.fixture
def raw(http: HttpClient) -> httpx.AsyncClient:
    return http.raw


# ---- forward-auth against the default settings ---------------------------------------


async def test_forward_auth_allows_with_decision_headers(raw: httpx.AsyncClient) -> None:
    response = await check(raw, tools_call(), forwarded())
    assert response.status_code == 200
    assert response.headers["X-MCP-Policy-Decision-Id"].startswith("dec_")
    assert response.headers["X-MCP-Policy-Outcome-Token"]
    assert response.content == b""


async def test_forward_auth_denies_with_403_and_the_jsonrpc_answer(
    raw: httpx.AsyncClient,
) -> None:
    response = await check(raw, tools_call("req-9", datastore_id="abc"), forwarded())
    assert response.status_code == 403
    decision = refusal(response, "req-9")
    assert decision["verdict"] == "deny"
    assert decision["rule"] == "copy_image_set.datastore_id_invalid"
    assert "datastore_id" in decision["reason"]
    assert "X-MCP-Policy-Outcome-Token" not in response.headers


async def test_forward_auth_rate_limits_after_ten_in_one_session(
    raw: httpx.AsyncClient,
) -> None:
    sid = session()
    statuses = [(await check(raw, tools_call(i), forwarded(sid))).status_code for i in range(10)]
    assert statuses == [200] * 10
    response = await check(raw, tools_call(11), forwarded(sid))
    assert response.status_code == 403
    decision = refusal(response, 11)
    assert decision["verdict"] == "rate_limited"
    assert decision["rate_limit"]["limit"] == 10
    assert decision["rate_limit"]["remaining"] == 0
    other = await check(raw, tools_call(12), forwarded())
    assert other.status_code == 200, "another session has its own limit"


async def test_forward_auth_requires_approval_for_a_copy_into_an_existing_image_set(
    raw: httpx.AsyncClient,
) -> None:
    response = await check(raw, tools_call(copy_image_set_information=INTO_EXISTING), forwarded())
    assert response.status_code == 403
    decision = refusal(response)
    assert decision["verdict"] == "approval_required"
    assert decision["rule"] == "copy_image_set.existing_destination"
    assert decision["approval"]["status"] == "pending"


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call",', -32700, "not valid JSON"),
        (
            b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "tools/call", "params": {}}',
            -32700,
            "duplicate key",
        ),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "x": NaN}', -32700, "NaN"),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "tools/call"}]', -32600, "batch"),
        (b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x"}}', -32600, "id"),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/call", "params": {}}', -32600, "2.0"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}', -32602, "name"),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
            b'"params": {"name": "copy_image_set", "arguments": [1]}}',
            -32602,
            "arguments",
        ),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/list"}', -32600, "2.0"),
    ],
)
async def test_forward_auth_malformed_jsonrpc_is_400(
    raw: httpx.AsyncClient, body: bytes, code: int, words: str
) -> None:
    response = await check(raw, body, forwarded())
    assert response.status_code == 400
    answer = response.json()
    assert answer["jsonrpc"] == "2.0"
    assert answer["error"]["code"] == code
    assert words in answer["error"]["message"]


async def test_forward_auth_without_a_body_names_forward_body(raw: httpx.AsyncClient) -> None:
    response = await raw.post("/v1/check", headers=forwarded())
    assert response.status_code == 403
    assert "forwardBody" in response.json()["error"]["message"]
    not_json = await check(raw, b"hello", forwarded(**{"Content-Type": "text/plain"}))
    assert not_json.status_code == 403
    assert "not JSON" in not_json.json()["error"]["message"]
    no_rpc = await check(raw, {"query": "x"}, forwarded())
    assert no_rpc.status_code == 403
    assert "JSON-RPC" in no_rpc.json()["error"]["message"]


async def test_forward_auth_passes_other_mcp_messages(raw: httpx.AsyncClient) -> None:
    for message in (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 3, "result": {}},
    ):
        response = await check(raw, message, forwarded())
        assert response.status_code == 200, message
        assert "X-MCP-Policy-Decision-Id" not in response.headers


async def test_forward_auth_envoy_style_path_and_method(plain: httpx.AsyncClient) -> None:
    """Envoy appends the original path to path_prefix and keeps the original method and
    Host (so the service must answer that host: MCP_POLICY_ALLOWED_HOSTS); the original
    Host is the server when nothing else names one."""
    headers = {
        "Host": HEALTHIMAGING,
        "Mcp-Session-Id": session(),
        "Content-Type": "application/json",
    }
    allowed = await check(plain, tools_call(), headers, path="/v1/check/mcp/v1")
    assert allowed.status_code == 200
    assert "X-MCP-Policy-Decision-Id" in allowed.headers
    denied = await check(
        plain, tools_call(datastore_id="abc"), headers, path="/v1/check/mcp", method="PUT"
    )
    assert denied.status_code == 200  # plain's refusal status
    assert refusal(denied)["verdict"] == "deny"


async def test_forward_auth_server_from_header_or_host(raw: httpx.AsyncClient) -> None:
    by_host = await check(raw, tools_call(), forwarded(**{"X-Forwarded-Host": "unknown.example"}))
    assert by_host.status_code == 403
    decision = refusal(by_host)
    assert decision["rule"] == "catalog.default"
    by_header = await check(
        raw,
        tools_call(),
        forwarded(**{"X-Forwarded-Host": "unknown.example", "X-MCP-Server": VALKEY}),
    )
    assert by_header.status_code == 200


async def test_forward_auth_outcome_token_releases_the_slot(raw: httpx.AsyncClient) -> None:
    sid = session()
    for i in range(10):
        allowed = await check(raw, tools_call(i), forwarded(sid))
        assert allowed.status_code == 200
    report = await raw.post(
        f"/v1/decisions/{allowed.headers['X-MCP-Policy-Decision-Id']}/outcome",
        json={"succeeded": False, "outcome_token": allowed.headers["X-MCP-Policy-Outcome-Token"]},
    )
    assert report.json()["released"] is True
    assert (await check(raw, tools_call(10), forwarded(sid))).status_code == 200
    assert (await check(raw, tools_call(11), forwarded(sid))).status_code == 403


async def test_gateway_routes_are_in_the_openapi_document(raw: httpx.AsyncClient) -> None:
    paths = (await raw.get("/openapi.json")).json()["paths"]
    assert "post" in paths["/v1/check"] and "post" in paths["/v1/check/{rest}"]
    assert "post" in paths["/access/v1/evaluation"]
    assert "post" in paths["/access/v1/evaluations"]
    assert "get" in paths["/.well-known/authzen-configuration"]


# ---- forward-auth with a mapping, 200 refusals, non-MCP allowed; no agent credentials --


@pytest.fixture(scope="module")
async def plain(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    tmp = tmp_path_factory.mktemp("gateway-plain")
    rego, data = copy_policy(tmp)
    add_rule_package(rego, "whoami", WHOAMI)
    settings = settings_for(
        tmp,
        policy_paths=[rego, data],
        gateway_servers={MAPPED_HOST: HEALTHIMAGING},
        gateway_refusal_status=200,
        gateway_non_mcp="allow",
        allowed_hosts=[HEALTHIMAGING],  # the Host Envoy's HTTP ext_authz keeps
    )
    running = await start_servers(settings)
    async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as client:
        yield client
    await running.stop()


async def test_forward_auth_server_from_the_mapping(plain: httpx.AsyncClient) -> None:
    for host in (MAPPED_HOST, MAPPED_HOST + ":8443"):
        response = await check(plain, tools_call(), forwarded(**{"X-Forwarded-Host": host}))
        assert response.status_code == 200, host
        assert "X-MCP-Policy-Decision-Id" in response.headers
    unmapped = await check(plain, tools_call(), forwarded(**{"X-Forwarded-Host": "other.example"}))
    assert refusal(unmapped)["rule"] == "catalog.default"


async def test_forward_auth_refusal_status_200_when_configured(plain: httpx.AsyncClient) -> None:
    headers = forwarded(**{"X-Forwarded-Host": MAPPED_HOST})
    response = await check(plain, tools_call(datastore_id="abc"), headers)
    assert response.status_code == 200
    assert refusal(response)["verdict"] == "deny"


async def test_forward_auth_non_mcp_allowed_when_configured(plain: httpx.AsyncClient) -> None:
    assert (await plain.get("/v1/check/mcp", headers=forwarded())).status_code == 200


async def test_forward_auth_gateway_headers_from_an_unknown_gateway_are_refused(
    plain: httpx.AsyncClient,
) -> None:
    """No decision clients configured: a gateway that names the agent (after its own token
    check) cannot be known to be the gateway, so the call is denied with the fix in the
    reason, never decided as if nobody had proven anything; it consumes nothing."""
    headers = forwarded(
        **{
            "X-Forwarded-Host": MAPPED_HOST,
            "X-MCP-Agent-Id": "agent-g",
            "X-MCP-User-Id": "gina",
            "X-MCP-Roles": "reader, writer",
            "Authorization": "Bearer some-agent-jwt",
        }
    )
    for _ in range(12):  # past copy_image_set's limit of 10: nothing was counted
        response = await check(plain, tools_call(), headers)
        decision = refusal(response)
        assert decision["verdict"] == "deny"
        assert decision["rule"] == "identity.unproven_caller"
        assert "mcp-policy clients add" in decision["reason"]
    anonymous = {k: v for k, v in headers.items() if not k.startswith("X-MCP-")}
    assert (await check(plain, tools_call(), anonymous)).status_code == 200


# ---- with decision clients and agent credentials configured -----------------------------


@dataclass
class Guarded:
    client: httpx.AsyncClient
    client_token: str
    api_key: str


@pytest.fixture(scope="module")
async def guarded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Guarded]:
    tmp = tmp_path_factory.mktemp("gateway-guarded")
    rego, data = copy_policy(tmp)
    add_rule_package(rego, "whoami", WHOAMI)
    clients = tmp / "clients.yaml"
    client_token = add_entry(clients, "client_token", "gateway-a")
    keys = tmp / "keys.yaml"
    api_key = add_entry(keys, "api_key", "agent-k", agent_id="agent-k", user_id="kim")
    settings = settings_for(
        tmp, policy_paths=[rego, data], clients_file=clients, agent_keys_file=keys
    )
    running = await start_servers(settings)
    async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as client:
        yield Guarded(client, client_token, api_key)
    await running.stop()


async def test_forward_auth_gateway_proves_itself_by_client_header(guarded: Guarded) -> None:
    headers = forwarded(Authorization=f"Bearer {guarded.api_key}")
    assert (await check(guarded.client, tools_call(), headers)).status_code == 401
    wrong = {**headers, "X-MCP-Policy-Client": "not-a-token"}
    assert (await check(guarded.client, tools_call(), wrong)).status_code == 401
    for value in (guarded.client_token, f"Bearer {guarded.client_token}"):
        ok = {**headers, "X-MCP-Policy-Client": value}
        assert (await check(guarded.client, tools_call(), ok)).status_code == 200


async def test_forward_auth_verifies_the_agent_bearer(guarded: Guarded) -> None:
    headers = forwarded(
        Authorization=f"Bearer {guarded.api_key}",
        **{"X-MCP-Policy-Client": guarded.client_token, "X-MCP-Agent-Id": "someone-else"},
    )
    seen = policy_saw(
        refusal(await check(guarded.client, tools_call(name="whoami"), headers))["reason"]
    )
    assert seen["agent_id"] == "agent-k" and seen["user_id"] == "kim"
    assert seen["authenticated"] is True and seen["method"] == "api_key"
    bad = {**headers, "Authorization": "Bearer not-a-key"}
    response = await check(guarded.client, tools_call(), bad)
    assert response.status_code == 403
    assert refusal(response)["rule"] == "identity.invalid_credential"


async def test_forward_auth_without_a_bearer_takes_the_gateway_headers(guarded: Guarded) -> None:
    headers = forwarded(**{"X-MCP-Policy-Client": guarded.client_token, "X-MCP-Agent-Id": "g-1"})
    response = await check(guarded.client, tools_call(name="whoami"), headers)
    seen = policy_saw(refusal(response)["reason"])
    assert seen["agent_id"] == "g-1" and seen["authenticated"] is False
    assert seen["asserted_by"] == "gateway-a"


async def test_authzen_needs_a_proven_caller(guarded: Guarded) -> None:
    body = evaluation()
    assert (await guarded.client.post("/access/v1/evaluation", json=body)).status_code == 401
    auth = {"Authorization": f"Bearer {guarded.client_token}"}
    answer = await guarded.client.post("/access/v1/evaluation", json=body, headers=auth)
    assert answer.status_code == 200 and answer.json()["decision"] is True


# ---- AuthZEN ---------------------------------------------------------------------------


def evaluation(
    sid: str | None = None, server: str = HEALTHIMAGING, tool: str = "copy_image_set", **args: Any
) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "datastore_id": DATASTORE,
        "source_image_set_id": IMAGE_SET,
        "copy_image_set_information": COPY_INFORMATION,
    }
    arguments.update(args)
    sid = sid or session()
    return {
        "subject": {
            "type": "agent",
            "id": f"agent-{sid}",  # the session's own: tests share no per-agent copy limit
            "properties": {"session_id": sid, "user_id": "user-1", "roles": []},
        },
        "action": {"name": "tools/call"},
        "resource": {"type": "mcp_tool", "id": f"{server}/{tool}"},
        "context": {"arguments": {k: v for k, v in arguments.items() if v is not None}},
    }


@pytest.mark.parametrize(
    ("body", "decision", "verdict", "rule"),
    [
        (evaluation(), True, "allow", "catalog.rule.copy_image_set"),
        (evaluation(server=VALKEY), True, "allow", "catalog.rule.copy_image_set"),
        (evaluation(datastore_id="abc"), False, "deny", "copy_image_set.datastore_id_invalid"),
        (evaluation(server="some.other-server"), False, "deny", "catalog.default"),
        (evaluation(tool="delete_datastore"), False, "deny", "catalog.default"),
        (
            evaluation(copy_image_set_information=INTO_EXISTING),
            False,
            "approval_required",
            "copy_image_set.existing_destination",
        ),
        (
            evaluation(source_datastore_id=DATASTORE_2),
            False,
            "approval_required",
            "copy_image_set.cross_datastore",
        ),
    ],
)
async def test_authzen_decision_table(
    raw: httpx.AsyncClient, body: dict[str, Any], decision: bool, verdict: str, rule: str
) -> None:
    response = await raw.post("/access/v1/evaluation", json=body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["decision"] is decision
    context = answer["context"]
    assert context["verdict"] == verdict and context["rule"] == rule
    assert context["decision_id"].startswith("dec_") and isinstance(context["reason"], str)
    if verdict == "approval_required":
        assert context["approval"]["status"] == "pending"
    if verdict == "allow":
        assert context["rate_limit"]["limit"] == 10 and context["outcome_token"]


async def test_authzen_rate_limit_and_dry_run(raw: httpx.AsyncClient) -> None:
    sid = session()
    dry = evaluation(sid)
    dry["context"]["dry_run"] = True
    for _ in range(3):
        answer = (await raw.post("/access/v1/evaluation", json=dry)).json()
        assert answer["decision"] is True and answer["context"]["dry_run"] is True
    decisions = [
        (await raw.post("/access/v1/evaluation", json=evaluation(sid))).json() for _ in range(11)
    ]
    assert [d["decision"] for d in decisions] == [True] * 10 + [False]
    last = decisions[-1]["context"]
    assert last["verdict"] == "rate_limited" and last["rate_limit"]["remaining"] == 0


async def test_authzen_approved_call_passes_once(raw: httpx.AsyncClient) -> None:
    sid = session()
    body = evaluation(sid, copy_image_set_information=INTO_EXISTING)
    first = (await raw.post("/access/v1/evaluation", json=body)).json()
    approval_id = first["context"]["approval"]["id"]
    auth = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
    approved = await raw.post(f"/v1/approvals/{approval_id}/approve", json={}, headers=auth)
    assert approved.status_code == 200
    body["context"]["approval_id"] = approval_id
    second = (await raw.post("/access/v1/evaluation", json=body)).json()
    assert second["decision"] is True
    third = (await raw.post("/access/v1/evaluation", json=body)).json()
    assert third["decision"] is False


def batch(sid: str, items: list[dict[str, Any]], semantic: str | None = None) -> dict[str, Any]:
    base = evaluation(sid)
    body: dict[str, Any] = {
        "subject": base["subject"],
        "action": base["action"],
        "resource": base["resource"],
        "evaluations": items,
    }
    if semantic is not None:
        body["options"] = {"evaluations_semantic": semantic}
    return body


_COPY = {
    "datastore_id": DATASTORE,
    "source_image_set_id": IMAGE_SET,
    "copy_image_set_information": COPY_INFORMATION,
}
GOOD = {"context": {"arguments": _COPY}}
BAD = {"context": {"arguments": {**_COPY, "datastore_id": "abc"}}}


@pytest.mark.parametrize(
    ("semantic", "expected"),
    [
        (None, [True, False, True, False]),
        ("execute_all", [True, False, True, False]),
        ("deny_on_first_deny", [True, False]),
        ("permit_on_first_permit", [True]),
    ],
)
async def test_authzen_batch_semantics(
    raw: httpx.AsyncClient, semantic: str | None, expected: list[bool]
) -> None:
    body = batch(session(), [GOOD, BAD, GOOD, BAD], semantic)
    response = await raw.post("/access/v1/evaluations", json=body)
    assert response.status_code == 200
    answers = response.json()["evaluations"]
    assert [a["decision"] for a in answers] == expected
    assert all(a["context"]["decision_id"].startswith("dec_") for a in answers)


async def test_authzen_permit_on_first_permit_skips_denials_before(
    raw: httpx.AsyncClient,
) -> None:
    body = batch(session(), [BAD, BAD, GOOD, GOOD], "permit_on_first_permit")
    answers = (await raw.post("/access/v1/evaluations", json=body)).json()["evaluations"]
    assert [a["decision"] for a in answers] == [False, False, True]


async def test_authzen_items_override_the_defaults(raw: httpx.AsyncClient) -> None:
    body = batch(
        session(), [{**GOOD, "resource": {"type": "mcp_tool", "id": "x.y/copy_image_set"}}, GOOD]
    )
    answers = (await raw.post("/access/v1/evaluations", json=body)).json()["evaluations"]
    assert [a["context"]["rule"] for a in answers] == [
        "catalog.default",
        "catalog.rule.copy_image_set",
    ]


async def test_authzen_batch_of_twelve_allows_exactly_ten(raw: httpx.AsyncClient) -> None:
    body = batch(session(), [GOOD] * 12)
    answers = (await raw.post("/access/v1/evaluations", json=body)).json()["evaluations"]
    assert [a["decision"] for a in answers] == [True] * 10 + [False] * 2
    assert {a["context"]["verdict"] for a in answers[10:]} == {"rate_limited"}


async def test_authzen_metadata(raw: httpx.AsyncClient) -> None:
    response = await raw.get("/.well-known/authzen-configuration")
    assert response.status_code == 200
    meta = response.json()
    base = str(raw.base_url).rstrip("/")
    assert meta == {
        "policy_decision_point": base,
        "access_evaluation_endpoint": f"{base}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{base}/access/v1/evaluations",
    }


def without(path: str) -> dict[str, Any]:
    body = evaluation()
    *parents, last = path.split(".")
    holder = body
    for key in parents:
        holder = holder[key]
    del holder[last]
    return body


def with_value(path: str, value: Any) -> dict[str, Any]:
    body = evaluation()
    *parents, last = path.split(".")
    holder = body
    for key in parents:
        holder = holder[key]
    holder[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (without("subject"), "subject"),
        (without("resource"), "resource"),
        (with_value("subject.type", "user"), "subject.type"),
        (without("subject.id"), "subject.id"),
        (without("subject.properties.session_id"), "subject.properties.session_id"),
        (with_value("subject.properties.roles", "admin"), "subject.properties.roles"),
        (with_value("subject.properties.role", "admin"), "subject.properties.role"),
        (with_value("subject.properties.session_id", "s" * 300), "subject.properties.session_id"),
        (with_value("action.name", "tools/list"), "action.name"),
        (with_value("resource.type", "file"), "resource.type"),
        (with_value("resource.id", "copy_image_set"), "resource.id"),
        (with_value("resource.id", "server/"), "resource.id"),
        (with_value("context.arguments", [1]), "context.arguments"),
        (with_value("context.dry_run", "yes"), "context.dry_run"),
        (with_value("context.approval_id", 5), "context.approval_id"),
        (with_value("extra", 1), "request body.extra"),
        (with_value("context.arguments", {"x": "\ud800"}), "context.arguments.x"),
    ],
)
async def test_authzen_bad_bodies_are_400_naming_the_field(
    raw: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    content = json.dumps(body)  # ASCII, so a lone surrogate travels as its escape
    response = await raw.post(
        "/access/v1/evaluation", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"subject": {}, "subject": {}}', None),
        (b"[1]", None),
        (b'{"action": {"name": NaN}}', None),
    ],
)
async def test_authzen_strict_json(raw: httpx.AsyncClient, body: bytes, field: str | None) -> None:
    response = await raw.post(
        "/access/v1/evaluation", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "InvalidRequest"


async def test_authzen_bad_batches_take_nothing(raw: httpx.AsyncClient) -> None:
    sid = session()
    bad_item = {"resource": {"type": "mcp_tool", "id": "nope"}}
    for body, field in (
        (batch(sid, [GOOD, bad_item]), "evaluations[1].resource.id"),
        (batch(sid, []), "evaluations"),
        (batch(sid, [GOOD], "first_wins"), "options.evaluations_semantic"),
        (batch(sid, [GOOD, {"subjekt": {}}]), "evaluations[1].subjekt"),
    ):
        response = await raw.post("/access/v1/evaluations", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["field"] == field
    answers = (await raw.post("/access/v1/evaluations", json=batch(sid, [GOOD] * 10))).json()
    assert [a["decision"] for a in answers["evaluations"]] == [True] * 10, "nothing was taken"
