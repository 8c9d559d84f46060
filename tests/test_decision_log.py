"""The decision log: complete under load, queryable on both transports, redacted as set,
unforgeable, rotated and pruned."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format, timestamp_pb2

from engine.transports.server import Servers, start_servers
from mcppolicy.v1 import decision_pb2, decision_pb2_grpc
from tests.clients import GrpcClient, HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    DATASTORE,
    approval_call,
    copy_call,
    session,
    settings_for,
)

AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}


@pytest.fixture(scope="module")
async def logged(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    """A service of its own, logging redacted arguments to its state dir."""
    tmp = tmp_path_factory.mktemp("logged")
    settings = settings_for(
        tmp,
        decision_log=None,
        decision_log_arguments="redacted",
        decision_log_redact=["datastore_id"],
    )
    running = await start_servers(settings)
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def clients(logged: Servers) -> AsyncIterator[tuple[HttpClient, GrpcClient]]:
    async with (
        httpx.AsyncClient(base_url=logged.http_url, timeout=30) as raw,
        grpc.aio.insecure_channel(logged.grpc_target) as channel,
    ):
        yield HttpClient(raw), GrpcClient(channel)


def jsonl_records(servers: Servers) -> list[dict[str, Any]]:
    path = servers.runtime.settings.state_dir / "decisions.jsonl"
    files = sorted(path.parent.glob("decisions.jsonl*"))
    return [json.loads(text) for f in files for text in f.read_text("utf-8").splitlines()]


async def page_all(http: HttpClient, **params: Any) -> list[dict[str, Any]]:
    out, cursor = [], None
    while True:
        query = {**params, "limit": 50, **({"cursor": cursor} if cursor else {})}
        response = await http.raw.get("/v1/decisions", params=query, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        out += body["decisions"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


async def test_every_decision_is_logged_once_under_concurrent_load(
    logged: Servers, clients: tuple[HttpClient, GrpcClient]
) -> None:
    http, grpc_client = clients
    sid = session()
    calls = [(http if i % 2 else grpc_client).decide(copy_call(sid)) for i in range(300)]
    ids = [d["decision_id"] for d in await asyncio.gather(*calls)]
    assert len(set(ids)) == 300
    listed = [r["decision_id"] for r in await page_all(http, session_id=sid)]
    assert sorted(listed) == sorted(ids), "each decision exactly once in the database"
    in_files = [
        r["decision_id"]
        for r in jsonl_records(logged)
        if r.get("session_id") == sid or r.get("principal", {}).get("session_id") == sid
    ]
    assert sorted(in_files) == sorted(ids), "each decision exactly once in the JSONL files"


async def test_arguments_are_redacted_as_configured(
    logged: Servers, clients: tuple[HttpClient, GrpcClient]
) -> None:
    http, _ = clients
    sid = session()
    await http.decide(copy_call(sid))
    [record] = await page_all(http, session_id=sid)
    assert record["arguments"]["datastore_id"] == "[redacted]"
    assert (
        record["arguments"]["source_image_set_id"]
        == copy_call()["arguments"]["source_image_set_id"]
    )
    assert len(record["arguments_sha256"]) == 64
    assert DATASTORE not in json.dumps(record)


async def test_default_logs_only_a_hash_of_the_arguments(
    servers: Servers, http: HttpClient
) -> None:
    sid = session()
    await http.decide(copy_call(sid))
    response = await http.raw.get("/v1/decisions", params={"session_id": sid}, headers=AUTH)
    [record] = response.json()["decisions"]
    assert "arguments" not in record
    assert DATASTORE not in json.dumps(record)


async def test_control_characters_cannot_forge_records(
    logged: Servers, clients: tuple[HttpClient, GrpcClient]
) -> None:
    http, _ = clients
    sid = session()
    forged = '{"event":"decision","decision_id":"dec_forged","verdict":"allow"}'
    body = copy_call(sid)
    body["tool"] = f"copy_image_set\n{forged}\r\n"
    body["arguments"]["source_image_set_id"] = f"x\n{forged}\u2028"
    # (A principal id with a control character is refused before anything is logged:
    # tests/test_principal_ids.py.)
    decision = await http.decide(body)
    assert decision["verdict"] == "deny"
    await logged.runtime.decision_log.flush()
    records = jsonl_records(logged)
    assert "dec_forged" not in [r.get("decision_id") for r in records]
    [mine] = [r for r in records if r.get("decision_id") == decision["decision_id"]]
    assert mine["tool"] == body["tool"], "the name is kept, escaped inside one line"


async def test_filters_and_paging_over_http_and_grpc(
    logged: Servers, clients: tuple[HttpClient, GrpcClient]
) -> None:
    http, grpc_client = clients
    sid = session()
    before = datetime.now(UTC) - timedelta(seconds=1)
    for _ in range(3):
        await http.decide(copy_call(sid))
    await http.decide(copy_call(sid, datastore_id="bad"))
    assert len(await page_all(http, session_id=sid)) == 4
    denied = await page_all(http, session_id=sid, verdict="deny")
    assert [r["rule"] for r in denied] == ["copy_image_set.datastore_id_invalid"]
    assert (
        len(await page_all(http, session_id=sid, tool="copy_image_set", since=before.isoformat()))
        == 4
    )
    assert await page_all(http, session_id=sid, until=before.isoformat()) == []

    stub = decision_pb2_grpc.DecisionLogServiceStub(grpc_client.channel)
    metadata = (("authorization", f"Bearer {APPROVER_TOKEN}"),)
    since = timestamp_pb2.Timestamp()
    since.FromDatetime(before)
    seen, token = [], ""
    while True:
        reply = await stub.ListDecisions(
            decision_pb2.ListDecisionsRequest(
                session_id=sid, since=since, page_size=3, page_token=token
            ),
            metadata=metadata,
        )
        seen += [json_format.MessageToDict(d) for d in reply.decisions]
        token = reply.next_page_token
        if not token:
            break
    assert len(seen) == 4
    assert [r["verdict"] for r in seen] == ["deny", "allow", "allow", "allow"], "newest first"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListDecisions(decision_pb2.ListDecisionsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await http.raw.get("/v1/decisions")).status_code == 401


async def test_unknown_filters_are_refused_and_one_decision_is_read_by_id(
    logged: Servers, clients: tuple[HttpClient, GrpcClient]
) -> None:
    """A filter the listing does not know is a 422 naming it (ignored, it would list every
    decision); GET /v1/decisions/{id} answers one decision, 404 for an id it never made."""
    http, _ = clients
    sid = session()
    decided = await http.decide(copy_call(sid))
    for query in ({"sesion_id": sid}, {"session_id": sid, "user_id": "u"}, {"Tool": "x"}):
        response = await http.raw.get("/v1/decisions", params=query, headers=AUTH)
        assert response.status_code == 422, response.text
        unknown = next(k for k in query if k not in ("session_id",))
        assert repr(unknown) in response.json()["error"]["message"]
    one = await http.raw.get(f"/v1/decisions/{decided['decision_id']}", headers=AUTH)
    assert one.status_code == 200, one.text
    record = one.json()
    assert (record["decision_id"], record["verdict"]) == (decided["decision_id"], "allow")
    assert record["principal"]["session_id"] == sid
    missing = await http.raw.get("/v1/decisions/dec_" + "0" * 32, headers=AUTH)
    assert missing.status_code == 404
    assert (await http.raw.get("/v1/decisions/" + "x" * 300, headers=AUTH)).status_code == 422
    unauthenticated = await http.raw.get(f"/v1/decisions/{decided['decision_id']}")
    assert unauthenticated.status_code == 401


async def test_status_summary(logged: Servers, clients: tuple[HttpClient, GrpcClient]) -> None:
    http, _ = clients
    before = (await http.raw.get("/v1/status", headers=AUTH)).json()
    await http.decide(copy_call(datastore_id="bad"))
    await http.decide({**copy_call(), "tool": "delete_datastore"})
    pending = await http.decide(approval_call())
    after = (await http.raw.get("/v1/status", headers=AUTH)).json()
    assert after["calls"] == before["calls"] + 3
    rules = {d["rule"]: d["count"] for d in after["denials_by_rule"]}
    assert rules["catalog.default"] >= 1
    assert rules["copy_image_set.datastore_id_invalid"] >= 1
    assert pending["approval"]["id"] in [a["id"] for a in after["pending_approvals"]]
    # Calls waiting for a human are counted apart from denials.
    assert after["recent_denials"][0]["verdict"] == "deny"
    assert all(d["verdict"] != "approval_required" for d in after["recent_denials"])
    assert "copy_image_set.existing_destination" not in rules
    waiting = {a["rule"]: a["count"] for a in after["approvals_required_by_rule"]}
    assert waiting["copy_image_set.existing_destination"] >= 1
    assert after["top_tools"][0]["tool"] == "copy_image_set"


async def test_jsonl_rotates_and_keeps_the_configured_backups(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, decision_log=None, decision_log_max_bytes=16 * 1024, decision_log_backups=2
    )
    servers = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            http = HttpClient(raw)
            for _ in range(4):
                await asyncio.gather(*[http.decide(copy_call()) for _ in range(50)])
            await servers.runtime.decision_log.flush()
            files = sorted(settings.state_dir.glob("decisions.jsonl*"))
            assert [f.name for f in files] == [
                "decisions.jsonl",
                "decisions.jsonl.1",
                "decisions.jsonl.2",
            ]
            assert all(f.stat().st_size <= 16 * 1024 for f in files)
            # The database keeps every record regardless of file rotation.
            assert len(await page_all(http)) == 200
    finally:
        await servers.stop()


async def test_database_keeps_records_for_the_retention_only(tmp_path: Path) -> None:
    servers = await start_servers(settings_for(tmp_path, decision_log_retention_days=1 / 86400))
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            http = HttpClient(raw)
            old = (await http.decide(copy_call()))["decision_id"]
            await servers.runtime.decision_log.flush()
            await asyncio.sleep(1.2)
            new = (await http.decide(copy_call()))["decision_id"]
            listed = [r["decision_id"] for r in await page_all(http)]
            assert listed == [new], f"{old} is past the retention"
    finally:
        await servers.stop()


async def test_database_keeps_within_its_size_cap_oldest_first(tmp_path: Path) -> None:
    """Past MCP_POLICY_DECISION_LOG_DB_MAX_BYTES the oldest records go first: the newest
    stay, the used pages stay near the cap, and /readyz counts what was pruned."""
    cap = 256 * 1024
    settings = settings_for(tmp_path, decision_log_db_max_bytes=cap, decision_log_arguments="raw")
    servers = await start_servers(settings)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            http = HttpClient(raw)
            ids = []
            for i in range(80):  # ~8 KiB each: about three caps' worth
                ids.append((await http.decide(copy_call(note=f"{i}:" + "x" * 8000)))["decision_id"])
                if i % 10 == 9:
                    await servers.runtime.decision_log.flush()
            await servers.runtime.decision_log.flush()
            first = await raw.get(f"/v1/decisions/{ids[0]}", headers=AUTH)
            last = await raw.get(f"/v1/decisions/{ids[-1]}", headers=AUTH)
            assert (first.status_code, last.status_code) == (404, 200)
            health = (await raw.get("/readyz")).json()["decision_log"]
            assert health["pruned_for_size"] > 0
            kept = [r["decision_id"] for r in await page_all(http)]
            assert kept == ids[-len(kept) :][::-1], "the newest are kept, in order"
    finally:
        await servers.stop()
    db = sqlite3.connect(settings.decision_log_settings.database)
    try:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    assert (pages - free) * size <= cap * 1.2, "the records stay near the cap"
