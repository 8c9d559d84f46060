"""Human approvals: the whole flow through both transports, the approver credential,
expiry, and survival across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.transports.server import start_servers
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import (
    APPROVER_TOKEN,
    DATASTORE_2,
    approval_call,
    copy_call,
    session,
    settings_for,
)

Client = HttpClient | GrpcClient


def needs_approval(sid: str | None = None, **arguments: Any) -> dict[str, Any]:
    """A call that needs approval: a copy into an existing image set."""
    return approval_call(sid or session(), **arguments)


async def test_approval_flow(client: Client) -> None:
    call = needs_approval()
    first = await client.decide(call)
    assert first["verdict"] == "approval_required"
    assert first["rule"] == "copy_image_set.existing_destination"
    approval_id = first["approval"]["id"]
    assert first["approval"]["status"] == "pending"
    assert approval_id in first["mcp_result"]["content"][0]["text"]

    # The same call while pending gets the same approval.
    again = await client.decide(call)
    assert again["verdict"] == "approval_required"
    assert again["approval"]["id"] == approval_id
    pending = await client.approvals(APPROVER_TOKEN, status="pending")
    assert approval_id in [a["id"] for a in pending]

    # Retrying with the id before a human has decided changes nothing.
    waiting = await client.decide({**call, "approval_id": approval_id})
    assert waiting["verdict"] == "approval_required"

    approved = await client.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops", "ok once")
    assert approved["status"] == "approved"
    # Single-token mode: the shared token proves the operator, not the body's "dr-ops"
    # (accepted for compatibility, not recorded; tests/test_approvers.py has named ones).
    assert approved["approver"] == "operator"

    # A different call cannot ride on the grant...
    other = {
        **needs_approval(call["principal"]["session_id"], source_image_set_id="f" * 32),
        "approval_id": approval_id,
    }
    mismatch = await client.decide(other)
    assert mismatch["verdict"] == "deny"
    assert "different call" in mismatch["reason"]
    # ...nor can the same call from another session.
    stolen = {**needs_approval(), "approval_id": approval_id}
    assert (await client.decide(stolen))["verdict"] == "deny"

    # The identical call passes exactly once.
    granted = await client.decide({**call, "approval_id": approval_id})
    assert granted["verdict"] == "allow"
    assert granted["approval"]["status"] == "used"
    assert "operator" in granted["reason"]
    replay = await client.decide({**call, "approval_id": approval_id})
    assert replay["verdict"] == "deny"
    assert "already used" in replay["reason"]
    assert (await client.get_approval(APPROVER_TOKEN, approval_id))["status"] == "used"

    # Deciding twice is refused.
    with pytest.raises(ApiError) as caught:
        await client.act(APPROVER_TOKEN, approval_id, "deny", "dr-ops")
    assert caught.value.status in (409, "FAILED_PRECONDITION")


async def test_denied_approval_denies_with_the_comment(client: Client) -> None:
    call = copy_call(source_datastore_id=DATASTORE_2)
    approval_id = (await client.decide(call))["approval"]["id"]
    denied = await client.act(APPROVER_TOKEN, approval_id, "deny", "dr-ops", "not this datastore")
    assert denied["status"] == "denied"
    decision = await client.decide({**call, "approval_id": approval_id})
    assert decision["verdict"] == "deny"
    assert "not this datastore" in decision["reason"]
    assert "operator" in decision["reason"]


async def test_unknown_approval_id_is_denied(client: Client) -> None:
    decision = await client.decide({**needs_approval(), "approval_id": "apr_nope"})
    assert decision["verdict"] == "deny"
    assert "does not exist" in decision["reason"]


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
async def test_agent_side_cannot_approve(client: Client, token: str | None) -> None:
    approval_id = (await client.decide(needs_approval()))["approval"]["id"]
    expected = {
        None: (401, "UNAUTHENTICATED"),
        "": (401, "UNAUTHENTICATED"),
        "wrong-token": (403, "PERMISSION_DENIED"),
    }[token]
    for attempt in (
        client.act(token, approval_id, "approve", "agent"),
        client.approvals(token),
        client.get_approval(token, approval_id),
    ):
        with pytest.raises(ApiError) as caught:
            await attempt
        assert caught.value.status == expected[0 if client.name == "http" else 1]
    status = (await client.get_approval(APPROVER_TOKEN, approval_id))["status"]
    assert status == "pending"


async def test_unknown_approval_is_not_found(client: Client) -> None:
    with pytest.raises(ApiError) as caught:
        await client.get_approval(APPROVER_TOKEN, "apr_missing")
    assert caught.value.status in (404, "NOT_FOUND")


async def test_approved_call_still_counts_against_rate_limit(http: HttpClient) -> None:
    sid = session()
    call = needs_approval(sid)
    approval_id = (await http.decide(call))["approval"]["id"]
    await http.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops")
    for _ in range(10):
        assert (await http.decide(copy_call(sid)))["verdict"] == "allow"
    limited = await http.decide({**call, "approval_id": approval_id})
    assert limited["verdict"] == "rate_limited"
    # The grant was not burned by the blocked call.
    assert (await http.get_approval(APPROVER_TOKEN, approval_id))["status"] == "approved"


async def test_concurrent_use_of_one_grant_lets_one_call_through(http: HttpClient) -> None:
    call = needs_approval()
    approval_id = (await http.decide(call))["approval"]["id"]
    await http.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops")
    decisions = await asyncio.gather(
        *[http.decide({**call, "approval_id": approval_id}) for _ in range(8)]
    )
    verdicts = [d["verdict"] for d in decisions]
    assert verdicts.count("allow") == 1
    assert verdicts.count("deny") == 7


async def test_expired_approvals(tmp_path: Path) -> None:
    servers = await start_servers(
        settings_for(tmp_path, approval_ttl_seconds=0.3, grant_ttl_seconds=0.3)
    )
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            client = HttpClient(raw)
            unused = needs_approval()
            pending_id = (await client.decide(unused))["approval"]["id"]
            granted = needs_approval()
            granted_id = (await client.decide(granted))["approval"]["id"]
            await client.act(APPROVER_TOKEN, granted_id, "approve", "dr-ops")
            await asyncio.sleep(0.4)
            with pytest.raises(ApiError) as caught:
                await client.act(APPROVER_TOKEN, pending_id, "approve", "dr-ops")
            assert caught.value.status == 409
            late = await client.decide({**granted, "approval_id": granted_id})
            assert late["verdict"] == "deny"
            assert "expired" in late["reason"]
            expired = await client.approvals(APPROVER_TOKEN, status="expired")
            assert {pending_id, granted_id} <= {a["id"] for a in expired}
            # Asking again opens a fresh approval.
            fresh = await client.decide(unused)
            assert fresh["verdict"] == "approval_required"
            assert fresh["approval"]["id"] != pending_id
    finally:
        await servers.stop()
