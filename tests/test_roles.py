"""Roles in the YAML rules, end to end in the real service: a rule with `roles:` applies only
to callers that have one of those roles, proven — by a credential the service verified, or
asserted by a proxy it authenticated. "Only imaging-admin may delete a datastore" is the
tool's own rule for the role plus a risk whose default denies, and no Rego.

As an attacker: a caller that merely claims the role (in its principal, beside another
agent's credential, with a forged key, or claiming a proxy verified it) is denied, gets
no answer other than a deny (never a 5xx), and consumes nothing of the quota the real
admin's rule counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.errors import PolicyRejected
from engine.identity import add_entry
from engine.transports.server import Servers, start_servers
from tests.conftest import DATASTORE, HEALTHIMAGING, add_tools, copy_policy, session, settings_for

TOOL = "delete_datastore"
ADMIN_RULE = {
    "action": "rate_limit",
    "rate_limit": {"max": 2, "window": 3600, "scope": "user"},
    "reason": "only imaging-admin deletes datastores, twice an hour",
    "roles": ["imaging-admin"],
}


def role_policy(tmp: Path, rule: dict[str, Any] = ADMIN_RULE) -> list[Path]:
    """The shipped policy plus delete_datastore: critical (its risk default denies), and
    its own rule for the role."""
    rego, data = copy_policy(tmp)
    add_tools(
        data,
        catalog=[{"server": HEALTHIMAGING, "tool": TOOL, "category": "delete", "risk": "critical"}],
        rules={TOOL: rule},
    )
    return [rego, data]


@dataclass
class Keys:
    admin: str  # agent-admin, user kim, role imaging-admin
    viewer: str  # agent-viewer, user vic, role viewer


@dataclass
class Running:
    servers: Servers
    keys: Keys


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    """A service on loopback that verifies agents' API keys; no client credentials."""
    tmp = tmp_path_factory.mktemp("roles")
    keys_file = tmp / "keys.yaml"
    keys = Keys(
        admin=add_entry(
            keys_file,
            "api_key",
            "admin",
            agent_id="agent-admin",
            user_id="kim",
            roles=["imaging-admin"],
        ),
        viewer=add_entry(
            keys_file, "api_key", "viewer", agent_id="agent-viewer", user_id="vic", roles=["viewer"]
        ),
    )
    servers = await start_servers(
        settings_for(tmp, policy_paths=role_policy(tmp), agent_keys_file=keys_file)
    )
    yield Running(servers, keys)
    await servers.stop()


def delete_call(principal: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "server": HEALTHIMAGING,
        "tool": TOOL,
        "arguments": {"datastore_id": DATASTORE},
        "principal": principal,
        **extra,
    }


async def decide(servers: Servers, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=servers.http_url) as http:
        answer = await http.post("/v1/decide", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    decision: dict[str, Any] = answer.json()
    return decision


async def test_the_rule_applies_to_a_caller_with_the_proven_role(service: Running) -> None:
    admin = await decide(
        service.servers,
        delete_call({"session_id": session()}, credential=service.keys.admin, dry_run=True),
    )
    assert (admin["verdict"], admin["rule"]) == ("allow", f"catalog.rule.{TOOL}")
    viewer = await decide(
        service.servers,
        delete_call({"session_id": session()}, credential=service.keys.viewer, dry_run=True),
    )
    assert (viewer["verdict"], viewer["rule"]) == ("deny", "catalog.risk_default.critical")


async def test_a_role_only_claimed_never_counts_and_consumes_nothing(service: Running) -> None:
    servers, keys = service.servers, service.keys
    claims = {"agent_id": "agent-admin", "user_id": "kim", "roles": ["imaging-admin"]}
    liars = [
        # The caller's word alone (loopback, nothing proven).
        (delete_call({**claims, "session_id": session()}), "catalog.risk_default.critical"),
        # Another agent's credential, the admin's identity and role claimed beside it.
        (
            delete_call({**claims, "session_id": session()}, credential=keys.viewer),
            "catalog.risk_default.critical",
        ),
        # A key the service never issued.
        (
            delete_call({**claims, "session_id": session()}, credential="mcp_" + "A" * 43),
            "identity.invalid_credential",
        ),
        # "A proxy verified me", from a caller the service does not know.
        (
            delete_call({**claims, "session_id": session()}, principal_verified=True),
            "identity.unproven_caller",
        ),
        # Lookalikes and many roles.
        (
            delete_call(
                {
                    **claims,
                    "session_id": session(),
                    "roles": ["Imaging-Admin", "imaging-admin ", "imaging_admin", *"abc"],
                },
                credential=keys.viewer,
            ),
            "catalog.risk_default.critical",
        ),
    ]
    for body, rule in liars:
        for _ in range(3):
            decision = await decide(servers, body)
            assert (decision["verdict"], decision["rule"]) == ("deny", rule), body
            assert decision.get("rate_limit") is None

    # The admin's own quota (2 an hour for user kim, whose identity the liars claimed) is
    # whole: two calls pass, the third is limited.
    verdicts = []
    for _ in range(3):
        decision = await decide(
            servers, delete_call({"session_id": session()}, credential=keys.admin)
        )
        verdicts.append((decision["verdict"], decision["rule"]))
    assert verdicts == [
        ("allow", f"catalog.rule.{TOOL}"),
        ("allow", f"catalog.rule.{TOOL}"),
        ("rate_limited", f"catalog.rule.{TOOL}"),
    ]


async def test_a_role_asserted_by_an_authenticated_proxy_counts(tmp_path: Path) -> None:
    clients = tmp_path / "clients.yaml"
    token = add_entry(clients, "client_token", "proxy-a")
    servers = await start_servers(
        settings_for(tmp_path, policy_paths=role_policy(tmp_path), clients_file=clients)
    )
    try:
        proxy = {"Authorization": f"Bearer {token}"}

        def asserted(roles: list[str]) -> dict[str, Any]:
            principal = {"agent_id": "a-1", "user_id": "u-1", "session_id": session()}
            return delete_call({**principal, "roles": roles}, principal_verified=True)

        admin = await decide(servers, asserted(["imaging-admin"]), **proxy)
        assert (admin["verdict"], admin["rule"]) == ("allow", f"catalog.rule.{TOOL}")
        viewer = await decide(servers, asserted(["viewer"]), **proxy)
        assert (viewer["verdict"], viewer["rule"]) == ("deny", "catalog.risk_default.critical")
        async with httpx.AsyncClient(base_url=servers.http_url) as http:
            for headers in ({}, {"Authorization": "Bearer not-a-client"}):
                answer = await http.post(
                    "/v1/decide", json=asserted(["imaging-admin"]), headers=headers
                )
                assert answer.status_code == 401, answer.text
    finally:
        await servers.stop()


async def test_malformed_roles_keep_the_service_from_starting(tmp_path: Path) -> None:
    for roles in ("imaging-admin", [], [""], [7]):
        tmp = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
        tmp.mkdir()
        paths = role_policy(tmp, {**ADMIN_RULE, "roles": roles})
        with pytest.raises(PolicyRejected) as refused:
            await start_servers(settings_for(tmp, policy_paths=paths))
        rules = paths[1] / "rules.yaml"
        assert any(
            error.startswith(f"{rules}:") and f"data.mcp_policy.rules.{TOOL}.roles" in error
            for error in refused.value.errors
        ), refused.value.errors
