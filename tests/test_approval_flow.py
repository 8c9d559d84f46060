"""An approval from the agent's side to the human's and back, through HTTP and gRPC.

The identical call goes through once a human approves (no approval id needed: the agent
is told to call the same tool again, unchanged); every decision's approval carries the
console link; the approval records how the call's principal was proven; and the policy's
`approval: {by: caller}` lets the proven user behind the agent decide their own agent's
call, never an agent credential, never someone else's call, never a call whose user was
only asserted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from engine.identity import add_entry
from engine.notify.events import EventType
from engine.transports.server import Servers, start_servers
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    DATASTORE,
    HEALTHIMAGING,
    IMAGE_SET,
    add_tools,
    approval_call,
    copy_policy,
    session,
    settings_for,
)

Client = HttpClient | GrpcClient
PUBLIC = "https://policy.example.test/base"
# A tool whose calls the caller may approve (by: caller), added to a private catalog.
OWN_TOOL = "update_image_set_metadata"


@dataclass
class Flow:
    servers: Servers
    keys: dict[str, str]  # agent -> its API key
    approvers: dict[str, str]  # person -> approver secret


@pytest.fixture(scope="module")
async def flow(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Flow]:
    tmp = tmp_path_factory.mktemp("flow")
    keys_path, approvers_path = tmp / "keys.yaml", tmp / "approvers.yaml"
    keys = {
        agent: add_entry(keys_path, "api_key", agent, agent_id=agent, user_id=user)
        for agent, user in (("agent-a", "ann"), ("agent-b", "bob"))
    }
    approvers = {
        "alice": add_entry(approvers_path, "approver", "alice", user_id="alice"),
        "ann": add_entry(approvers_path, "approver", "ann", user_id="ann", roles=["caller"]),
        # An approver who is also the user behind agent-b.
        "bob": add_entry(approvers_path, "approver", "bob", user_id="bob"),
    }
    rego, data = copy_policy(tmp)
    add_tools(
        data,
        catalog=[
            {"server": HEALTHIMAGING, "tool": OWN_TOOL, "category": "write", "risk": "medium"}
        ],
        rules={OWN_TOOL: {"action": "require_approval", "approval": {"by": "caller"}}},
    )
    servers = await start_servers(
        settings_for(
            tmp,
            policy_paths=[rego, data],
            agent_keys_file=keys_path,
            approvers_file=approvers_path,
            public_url=PUBLIC + "/",
        )
    )
    yield Flow(servers, keys, approvers)
    await servers.stop()


@pytest.fixture(params=["http", "grpc"])
async def api(request: pytest.FixtureRequest, flow: Flow) -> AsyncIterator[Client]:
    if request.param == "http":
        async with httpx.AsyncClient(base_url=flow.servers.http_url, timeout=30) as raw:
            yield HttpClient(raw)
    else:
        async with grpc.aio.insecure_channel(flow.servers.grpc_target) as channel:
            yield GrpcClient(channel)


def own_call(flow: Flow, agent: str = "agent-a", sid: str | None = None) -> dict[str, Any]:
    """A call of OWN_TOOL (approvable by the caller), proven by the agent's API key."""
    return {
        "server": HEALTHIMAGING,
        "tool": OWN_TOOL,
        "arguments": {"datastore_id": DATASTORE, "image_set_id": IMAGE_SET},
        "principal": {"session_id": sid or session()},
        "credential": flow.keys[agent],
    }


def page_of(approval_id: str) -> str:
    return f"{PUBLIC}/console/approvals/{approval_id}"


async def test_the_identical_call_goes_through_once_approved(flow: Flow, api: Client) -> None:
    call = approval_call()
    asked = await api.decide(call)
    assert asked["verdict"] == "approval_required"
    approval_id = asked["approval"]["id"]
    assert asked["approval"]["url"] == page_of(approval_id)
    assert "call the same tool again unchanged once a human approves" in asked["reason"]
    assert page_of(approval_id) in asked["reason"]
    assert "approval_id" not in asked["reason"], "the agent is not told to add an id"
    again = await api.decide(call)
    assert (again["verdict"], again["approval"]["id"]) == ("approval_required", approval_id)

    await api.act_as(flow.approvers["alice"], approval_id, "approve", "fine")
    through = await api.decide(call)
    assert through["verdict"] == "allow"
    assert through["approval"] == {**through["approval"], "id": approval_id, "status": "used"}
    record = await api.get_approval(APPROVER_TOKEN, approval_id)
    assert record["status"] == "used"
    assert record["used_by_decision"] == through["decision_id"]
    assert record["url"] == page_of(approval_id)

    # Once only: the same call again asks for a new approval.
    after = await api.decide(call)
    assert after["verdict"] == "approval_required"
    assert after["approval"]["id"] != approval_id
    assert after["approval"]["status"] == "pending"


async def test_a_denied_call_reads_the_comment_when_called_again(flow: Flow, api: Client) -> None:
    """The identical call after a denial is denied with the approver's comment (and opens
    no new approval) until the approval would have expired; with the id too."""
    call = approval_call()
    approval_id = (await api.decide(call))["approval"]["id"]
    await api.act_as(flow.approvers["alice"], approval_id, "deny", "not this datastore")
    for again in (await api.decide(call), await api.decide({**call, "approval_id": approval_id})):
        assert (again["verdict"], again["rule"]) == ("deny", "engine.approval")
        assert "not this datastore" in again["reason"] and "alice" in again["reason"]
        assert again["approval"]["id"] == approval_id
    # Another agent's identical call is its own: it opens an approval of its own.
    other = await api.decide({**call, "principal": {**call["principal"], "agent_id": "x-2"}})
    assert other["verdict"] == "approval_required"
    assert other["approval"]["id"] != approval_id


async def test_concurrent_identical_calls_use_the_grant_once(flow: Flow, api: Client) -> None:
    call = approval_call()
    approval_id = (await api.decide(call))["approval"]["id"]
    await api.act_as(flow.approvers["alice"], approval_id, "approve", "")
    results = await asyncio.gather(*[api.decide(call) for _ in range(6)])
    verdicts = sorted(d["verdict"] for d in results)
    assert verdicts.count("allow") == 1, verdicts


async def test_the_approval_records_how_the_principal_was_proven(flow: Flow, api: Client) -> None:
    proven = await api.decide(own_call(flow))
    record = await api.get_approval(APPROVER_TOKEN, proven["approval"]["id"])
    assert (record["principal_proof"], record["approvable_by"]) == ("credential", "caller")
    assert record["principal"]["user_id"] == "ann"

    asserted = await api.decide(approval_call())
    record = await api.get_approval(APPROVER_TOKEN, asserted["approval"]["id"])
    assert (record["principal_proof"], record["approvable_by"]) == ("none", "approvers")
    assert record.get("asserted_by") in (None, "")


async def test_the_caller_approves_their_own_agents_call(flow: Flow, api: Client) -> None:
    call = own_call(flow)
    approval_id = (await api.decide(call))["approval"]["id"]
    # ann is the user proven behind agent-a: by: caller lets her decide it (four eyes
    # would refuse her on an approvers-only approval).
    decided = await api.act_as(flow.approvers["ann"], approval_id, "approve", "mine")
    assert (decided["status"], decided["approver"]) == ("approved", "ann")
    assert (await api.decide(call))["verdict"] == "allow"


async def test_the_caller_cannot_decide_anyone_elses_call(flow: Flow, api: Client) -> None:
    bobs = (await api.decide(own_call(flow, "agent-b")))["approval"]["id"]
    with pytest.raises(ApiError) as refused:
        await api.act_as(flow.approvers["ann"], bobs, "approve", "")
    assert refused.value.status in (403, "PERMISSION_DENIED")
    # An approvers-only approval of ann's own agent: she is no approver.
    call = {**approval_call(), "credential": flow.keys["agent-a"]}
    own = (await api.decide(call))["approval"]["id"]
    with pytest.raises(ApiError) as refused:
        await api.act_as(flow.approvers["ann"], own, "approve", "")
    assert refused.value.status in (403, "PERMISSION_DENIED")
    assert "not an approver" in refused.value.message
    # bob is an approver, and the user behind agent-b: an approvers-only call of his own
    # agent is four eyes' (another approver must decide it).
    call = {**approval_call(), "credential": flow.keys["agent-b"]}
    bobs_own = (await api.decide(call))["approval"]["id"]
    with pytest.raises(ApiError) as refused:
        await api.act_as(flow.approvers["bob"], bobs_own, "approve", "")
    assert "own behalf" in refused.value.message
    for approval_id in (bobs, own, bobs_own):
        assert (await api.get_approval(APPROVER_TOKEN, approval_id))["status"] == "pending"
    # Another approver may still decide the caller-approvable one.
    decided = await api.act_as(flow.approvers["alice"], bobs, "deny", "no")
    assert decided["status"] == "denied"


async def test_an_asserted_user_cannot_approve_as_the_caller(flow: Flow, api: Client) -> None:
    """A call that merely claims user ann (no credential, no verifying proxy): ann's own
    approval power over her calls does not extend to it."""
    call = own_call(flow)
    del call["credential"]
    call["principal"] = {"agent_id": "agent-a", "user_id": "ann", "session_id": session()}
    approval_id = (await api.decide(call))["approval"]["id"]
    with pytest.raises(ApiError) as refused:
        await api.act_as(flow.approvers["ann"], approval_id, "approve", "")
    assert refused.value.status in (403, "PERMISSION_DENIED")
    assert (await api.get_approval(APPROVER_TOKEN, approval_id))["status"] == "pending"


async def test_an_agent_key_is_no_approver_credential(flow: Flow, api: Client) -> None:
    approval_id = (await api.decide(own_call(flow)))["approval"]["id"]
    with pytest.raises(ApiError) as refused:
        await api.act_as(flow.keys["agent-a"], approval_id, "approve", "")
    assert refused.value.status in (401, "UNAUTHENTICATED")
    assert (await api.get_approval(APPROVER_TOKEN, approval_id))["status"] == "pending"


async def test_events_follow_the_approval(flow: Flow) -> None:
    """requested, approved, used: each once, in order, for this approval."""
    events = flow.servers.runtime.service.events
    async with httpx.AsyncClient(base_url=flow.servers.http_url, timeout=30) as raw:
        api = HttpClient(raw)
        with events.subscribe() as seen:
            call = approval_call()
            approval_id = (await api.decide(call))["approval"]["id"]
            await api.decide(call)  # the same pending approval: no new event
            await api.act_as(flow.approvers["alice"], approval_id, "approve", "")
            assert (await api.decide(call))["verdict"] == "allow"
            mine = []
            while len(mine) < 3:
                event = await seen.get(timeout=10)
                assert event is not None, f"events so far: {mine}"
                if event.approval.id == approval_id:
                    mine.append(event)
    assert [e.type for e in mine] == [EventType.REQUESTED, EventType.APPROVED, EventType.USED]
    assert all(e.approval.url == page_of(approval_id) for e in mine)
    assert len({e.id for e in mine}) == 3


async def test_expiry_is_published_once_for_what_expired() -> None:
    """The expiry watch publishes approval.expired for an approval left pending past its
    expiry, once; not for one that was granted and used in time; a granted one is
    watched until its grant's own expiry."""
    from engine.models import Principal, ToolCall
    from engine.notify.events import ApprovalEvents
    from engine.state.approvals import MemoryApprovalStore, fingerprint

    now = [1_000_000.0]
    store = MemoryApprovalStore(clock=lambda: now[0])
    hub = ApprovalEvents()
    hub.expiry._claim = store.claim_expiry

    def open_one(name: str) -> Any:
        call = ToolCall(server="s", name=name, arguments={})
        principal = Principal(agent_id="a", session_id="s-1")
        return call, principal

    async def opened(name: str, ttl: float) -> Any:
        call, principal = open_one(name)
        approval = await store.open_or_get(
            call, principal, rule="r", reason="why", decision_id="dec_" + name, ttl=ttl
        )
        hub.publish(EventType.REQUESTED, approval)
        return approval

    with hub.subscribe() as seen:
        left = await opened("left", 10)
        used = await opened("used", 10)
        granted = await opened("granted", 10)
        for approval in (used, granted):
            decided = await store.decide(
                approval.id, approve=True, approver="x", comment="", grant_ttl=100
            )
            hub.publish(EventType.APPROVED, decided)
        call, principal = open_one("used")
        fp = fingerprint(call, principal.session_id)
        use = await store.consume(used.id, fp, principal=principal, decision_id="dec_use")
        assert use.approval is not None
        hub.publish(EventType.USED, use.approval)

        now[0] += 20
        await hub.expiry.check(now[0])
        await hub.expiry.check(now[0])  # nothing twice
        now[0] += 100
        await hub.expiry.check(now[0])
        events = []
        while (event := await seen.get(timeout=0)) is not None:
            events.append((event.type, event.approval.id))
    expired = [approval_id for kind, approval_id in events if kind is EventType.EXPIRED]
    assert expired == [left.id, granted.id]
    assert hub.expiry.watched == 0
