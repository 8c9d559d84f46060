"""The shipped policy, end to end: one table of calls through HTTP and gRPC, with the
policy evaluated in-process (the default) and by an OPA server over REST."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from engine.transports.server import Servers, start_servers
from tests.clients import GrpcClient, HttpClient
from tests.conftest import (
    DATASTORE,
    DATASTORE_2,
    IMAGE_SET,
    VALKEY,
    approval_call,
    copy_call,
    session,
    settings_for,
    shared_policy,
)

Client = HttpClient | GrpcClient


def renamed(tool: str) -> dict[str, Any]:
    call = copy_call()
    call["tool"] = tool
    return call


def on_server(server: str) -> dict[str, Any]:
    call = copy_call()
    call["server"] = server
    return call


def with_arguments(**arguments: Any) -> dict[str, Any]:
    """copy_call, with `arguments` set as given (None too: sent as JSON null)."""
    call = copy_call()
    call["arguments"] = {**call["arguments"], **arguments}
    return call


def as_message(jsonrpc_id: Any = 7, **arguments: Any) -> dict[str, Any]:
    call = copy_call(**arguments)
    return {
        "server": call["server"],
        "principal": call["principal"],
        "message": {
            "jsonrpc": "2.0",
            "id": jsonrpc_id,
            "method": "tools/call",
            "params": {"name": "copy_image_set", "arguments": call["arguments"]},
        },
    }


# (case id, request, verdict, rule, words the reason must contain)
CASES: list[tuple[str, dict[str, Any], str, str, list[str]]] = [
    ("valid-healthimaging", copy_call(), "allow", "catalog.rule.copy_image_set", []),
    ("valid-valkey", on_server(VALKEY), "allow", "catalog.rule.copy_image_set", []),
    (
        "same-datastore-source",
        copy_call(source_datastore_id=DATASTORE),
        "allow",
        "catalog.rule.copy_image_set",
        [],
    ),
    # force is no parameter of the real tool; the shipped pack still checks it for servers
    # that take it
    ("force-false", copy_call(force=False), "allow", "catalog.rule.copy_image_set", []),
    (
        "source-datastore-null",
        with_arguments(source_datastore_id=None),  # the real tool's default: a string or null
        "allow",
        "catalog.rule.copy_image_set",
        [],
    ),
    ("raw-jsonrpc-message", as_message(), "allow", "catalog.rule.copy_image_set", []),
    (
        "raw-jsonrpc-string-id",
        as_message(jsonrpc_id="req-1"),
        "allow",
        "catalog.rule.copy_image_set",
        [],
    ),
    (
        "unknown-server",
        on_server("some.other-server"),
        "deny",
        "catalog.default",
        ["not in the policy catalog"],
    ),
    ("unknown-tool", renamed("delete_datastore"), "deny", "catalog.default", ["delete_datastore"]),
    ("case-variant", renamed("Copy_Image_Set"), "deny", "catalog.default", []),
    ("fullwidth-variant", renamed("ｃｏｐｙ_image_set"), "deny", "catalog.default", []),
    ("zero-width-variant", renamed("copy_\u200bimage_set"), "deny", "catalog.default", []),
    ("cyrillic-lookalike", renamed("cоpy_image_set"), "deny", "catalog.default", []),
    (
        "missing-datastore",
        copy_call(datastore_id=None),
        "deny",
        "copy_image_set.datastore_id_invalid",
        ["datastore_id"],
    ),
    (
        "uppercase-image-set",
        copy_call(source_image_set_id=IMAGE_SET.upper()),
        "deny",
        "copy_image_set.source_image_set_id_invalid",
        ["source_image_set_id"],
    ),
    (
        "short-datastore",
        copy_call(datastore_id="abc"),
        "deny",
        "copy_image_set.datastore_id_invalid",
        ["datastore_id"],
    ),
    (
        "force-overwrite",
        copy_call(force=True),
        "approval_required",
        "copy_image_set.force_overwrite",
        ["approval"],
    ),
    (
        "into-existing-image-set",
        approval_call(),
        "approval_required",
        "copy_image_set.existing_destination",
        ["approval", "existing image set"],
    ),
    (
        "missing-copy-information",
        copy_call(copy_image_set_information=None),
        "deny",
        "copy_image_set.copy_image_set_information_invalid",
        ["copy_image_set_information", "required"],
    ),
    (
        "malformed-copy-information",
        copy_call(copy_image_set_information={"sourceImageSet": {"latestVersionId": 1}}),
        "deny",
        "copy_image_set.copy_image_set_information_invalid",
        ["latestVersionId"],
    ),
    (
        "cross-datastore",
        copy_call(source_datastore_id=DATASTORE_2),
        "approval_required",
        "copy_image_set.cross_datastore",
        ["approval"],
    ),
]


@pytest.fixture(scope="module")
async def opa_servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """The service with the other engine: an OPA server it starts, asked over REST (with
    the shared service's policy)."""
    tmp = tmp_path_factory.mktemp("rest")
    running = await start_servers(settings_for(tmp, engine="opa", policy_paths=shared_policy(tmp)))
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def opa_clients(opa_servers: Servers) -> AsyncIterator[dict[str, Client]]:
    async with (
        httpx.AsyncClient(base_url=opa_servers.http_url, timeout=10) as raw,
        grpc.aio.insecure_channel(opa_servers.grpc_target) as channel,
    ):
        yield {"http": HttpClient(raw), "grpc": GrpcClient(channel)}


@pytest.fixture(params=["inprocess", "opa"])
def engine_client(
    request: pytest.FixtureRequest, client: Client, opa_clients: dict[str, Client]
) -> Client:
    """`client` (HTTP and gRPC) against each engine."""
    return client if request.param == "inprocess" else opa_clients[client.name]


@pytest.mark.parametrize(
    ("request_body", "verdict", "rule", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_shipped_policy_decides(
    engine_client: Client,
    request_body: dict[str, Any],
    verdict: str,
    rule: str,
    words: list[str],
) -> None:
    body = dict(request_body)
    body["principal"] = {**body["principal"], "session_id": session()}
    decision = await engine_client.decide(body)
    assert decision["verdict"] == verdict
    assert decision["rule"] == rule
    for word in words:
        assert word in decision["reason"]
    assert decision["decision_id"].startswith("dec_")
    assert decision["policy_revision"].startswith("sha256:")
    if verdict == "allow":
        assert "mcp_result" not in decision
    else:
        result = decision["mcp_result"]
        assert result["isError"] is True
        assert result["content"][0]["type"] == "text"
        assert decision["reason"] in result["content"][0]["text"]
        assert "structuredContent" not in result, "clients validate it against outputSchema"
        structured = result["_meta"]["mcp-policy/decision"]
        assert structured["decision_id"] == decision["decision_id"]
        assert structured["verdict"] == verdict


async def test_allowed_call_reports_its_rate_limit(client: Client) -> None:
    decision = await client.decide(copy_call())
    assert decision["rate_limit"] == {
        "limit": 10,
        "remaining": 9,
        "window_seconds": 60,
        "retry_after_seconds": 0,
        "rule": "catalog.rule.copy_image_set",
        "scope": "session",
    }


async def test_decision_ids_are_unique_and_logged(servers: Any, client: Client) -> None:
    ids = {(await client.decide(copy_call()))["decision_id"] for _ in range(5)}
    assert len(ids) == 5
    await servers.runtime.decision_log.flush()
    log = Path(servers.runtime.settings.decision_log).read_text("utf-8")
    lines = {json.loads(line).get("decision_id"): line for line in log.splitlines()}
    for decision_id in ids:
        assert DATASTORE not in lines[decision_id], "arguments are logged only as a hash"
        record = json.loads(lines[decision_id])
        assert record["tool"] == "copy_image_set"
        assert record["verdict"] == "allow"
        assert record["transport"] == client.name
        assert len(record["arguments_sha256"]) == 64


async def test_same_policy_revision_on_both_transports(
    http: HttpClient, grpc_client: GrpcClient
) -> None:
    a = await http.decide(copy_call())
    b = await grpc_client.decide(copy_call())
    assert a["policy_revision"] == b["policy_revision"] != "none"


async def test_both_engines_give_the_same_decisions(
    http: HttpClient, opa_clients: dict[str, Client], servers: Servers, opa_servers: Servers
) -> None:
    """Every case of the table, field by field (bar ids and times), in both engines."""
    assert servers.runtime.policy.revision == opa_servers.runtime.policy.revision
    volatile = {"decision_id", "outcome_token", "mcp_result", "approval", "time"}
    for case_id, request_body, *_ in CASES:
        sid = session()
        body = {**request_body, "principal": {**request_body["principal"], "session_id": sid}}
        here = stable(await http.decide(body), volatile)
        there = stable(await opa_clients["http"].decide(body), volatile)
        assert here == there, case_id


def stable(decision: dict[str, Any], volatile: set[str]) -> dict[str, Any]:
    """A decision without what differs between any two services: ids and times."""
    out = {k: v for k, v in decision.items() if k not in volatile}
    out["reason"] = re.sub(r"apr_[0-9a-f]+", "apr_…", out["reason"])
    return out
