"""The ways around enforcement, tried as an attacker would: outcome reports from someone
who was not given the decision, and requests that end in an error after quota was taken.

The assertion is always the same: no allow that should not be, and nothing consumed."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from engine.transports import wire
from engine.transports.server import Servers
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import copy_call, session

Client = HttpClient | GrpcClient
LIMIT = 10  # copy_image_set: at most 10 per 60 s per session (policies/rules.yaml)
INTERNALS = ("Traceback", "<class", "Error:", "RuntimeError", "Exception")


async def test_a_stranger_cannot_give_back_slots(client: Client) -> None:
    """A caller that knows decision ids (they are in the log) but was not given the
    decisions reports every call as failed: not one slot comes back."""
    body = copy_call()
    decisions = [await client.decide(body) for _ in range(LIMIT)]
    assert all(d["verdict"] == "allow" for d in decisions)
    foreign = decisions[0]["outcome_token"]
    for decision in decisions:
        with pytest.raises(ApiError) as missing:
            await client.report(decision["decision_id"], False, None)
        assert missing.value.status in (401, "UNAUTHENTICATED")
        assert "outcome_token" in missing.value.message
        for token in ("guess", "x" * 256, decision["decision_id"]):
            ack = await client.report(decision["decision_id"], False, token)
            assert not ack.get("released")
        if decision is not decisions[0]:  # another decision's token fits no other one
            assert not (await client.report(decision["decision_id"], False, foreign)).get(
                "released"
            )
    blocked = await client.decide(body)
    assert blocked["verdict"] == "rate_limited"


async def test_a_decision_gives_its_slots_back_once(client: Client) -> None:
    """Twenty concurrent failure reports with the right token release exactly once."""
    body = copy_call()
    first = await client.decide(body)
    acks = await asyncio.gather(
        *(client.report(first["decision_id"], False, first["outcome_token"]) for _ in range(20))
    )
    assert sum(bool(a.get("released")) for a in acks) == 1
    again = await client.decide(body)
    assert again["rate_limit"]["remaining"] == LIMIT - 1


async def test_no_outcome_token_without_slots(client: Client) -> None:
    """Refusals and dry runs hold nothing, so they carry no token to report with."""
    denied = await client.decide(copy_call(datastore_id="not-hex"))
    assert denied["verdict"] == "deny"
    assert not denied.get("outcome_token")
    dry = await client.decide({**copy_call(), "dry_run": True})
    assert dry["verdict"] == "allow"
    assert not dry.get("outcome_token")
    assert "outcome_token" not in str(denied.get("mcp_result"))


async def remaining(client: Client, sid: str) -> int:
    decision = await client.decide(copy_call(sid))
    assert decision["verdict"] == "allow"
    left: int = decision["rate_limit"]["remaining"]
    return left


async def test_errors_after_the_limit_was_taken_consume_nothing(
    client: Client, servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten requests that fail after their slots were reserved (here: the decision log
    raising) get a clean internal error that shows nothing of the cause, and the
    session's quota is untouched."""
    sid = session()

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("decision log exploded: /secret/path")

    monkeypatch.setattr(servers.runtime.service.log, "decision", broken)
    for _ in range(LIMIT):
        with pytest.raises(ApiError) as failed:
            await client.decide(copy_call(sid))
        assert failed.value.status in (500, "INTERNAL")
        assert "/secret/path" not in failed.value.message
        assert not any(word in failed.value.message for word in INTERNALS)
    monkeypatch.undo()
    assert await remaining(client, sid) == LIMIT - 1


async def test_an_answer_that_cannot_be_sent_consumes_nothing(
    grpc_client: GrpcClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = session()

    def broken(_: Any) -> Any:
        raise ValueError("cannot encode")

    monkeypatch.setattr(wire, "decision_to_proto", broken)
    for _ in range(LIMIT):
        with pytest.raises(ApiError) as failed:
            await grpc_client.decide(copy_call(sid))
        assert failed.value.status == "INTERNAL"
        assert "cannot encode" not in failed.value.message
    monkeypatch.undo()
    assert await remaining(grpc_client, sid) == LIMIT - 1


async def test_a_cancelled_decision_consumes_nothing(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that gives up while its decision is being made (after the slots were
    reserved) leaves them free."""
    sid = session()
    service = servers.runtime.service
    real_shadow = service._shadow
    reserved = asyncio.Event()

    async def slow_shadow(*args: Any) -> Any:
        reserved.set()
        await asyncio.sleep(30)
        return await real_shadow(*args)

    monkeypatch.setattr(service, "_shadow", slow_shadow)
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        client = GrpcClient(channel)
        calls = [asyncio.create_task(client.decide(copy_call(sid))) for _ in range(LIMIT)]
        await asyncio.wait_for(reserved.wait(), 10)
        await asyncio.sleep(0.2)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    monkeypatch.undo()
    peek = {**copy_call(sid), "dry_run": True}
    async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
        client = GrpcClient(channel)
        for _ in range(100):  # the server sees the cancellations on its own time
            left = (await client.decide(peek))["rate_limit"]["remaining"]
            if left == LIMIT - 1:
                break
            await asyncio.sleep(0.05)
    assert left == LIMIT - 1, "the cancelled calls' slots came back"
