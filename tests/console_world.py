"""What the console's tests share: a real `mcp-policy serve` process with named approvers,
agent API keys and a proxy's client token, and an httpx client that signs in as a browser
does (the sign-in form's token, cookies, forms).

People (approvers file): alice (anyone's calls but her own), uma (the user of the test
calls, "user-1": four eyes keeps her off them), carol (only the valkey server's calls) and
rex (revoked by a test); and kim, the user behind the agent AGENT (its API key), who may
decide her own agent's OWN_TOOL calls (by: caller) and no other of its calls. The operator
token is operator-only here (named approvers exist).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engine.identity import add_entry
from tests.conftest import (
    DATASTORE,
    HEALTHIMAGING,
    IMAGE_SET,
    VALKEY,
    add_tools,
    approval_call,
    copy_policy,
    session,
)
from tests.processes import Serve

OPERATOR_TOKEN = "console-operator-token"
AGENT = "agent-k"
AGENT_USER = "kim"
CLIENT = "proxy-1"
# A tool whose policy reason is markup (the console must show it as text).
PROBE_TOOL = "xss_probe"
PROBE_REASON = "<script>alert('reason')</script> needs a human"
# A tool whose calls the caller's own user may approve (approval: {by: caller}).
OWN_TOOL = "update_image_set_metadata"
_HIDDEN = re.compile(r'name="csrf_token" value="([^"]*)"')


@dataclass
class World:
    serve: Serve
    url: str
    approvers: dict[str, str]  # name -> secret
    approvers_file: Path
    agent_key: str
    client_token: str

    def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        """A decision, asked as the known proxy (its client token)."""
        response = httpx.post(
            f"{self.url}/v1/decide",
            json=body,
            headers={"Authorization": f"Bearer {self.client_token}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def agent_call(self, tool: str = OWN_TOOL, **arguments: Any) -> dict[str, Any]:
        """A call of `tool` by AGENT, proven by its API key (its user: kim)."""
        return {
            "server": HEALTHIMAGING,
            "tool": tool,
            "arguments": {"datastore_id": DATASTORE, "image_set_id": IMAGE_SET, **arguments},
            "principal": {"session_id": session()},
            "credential": self.agent_key,
        }

    def pending_approval(self, call: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
        """A call that needs approval, asked once: (the call, its approval id)."""
        call = call or approval_call()
        asked = self.decide(call)
        assert asked["verdict"] == "approval_required", asked
        return call, str(asked["approval"]["id"])


def start_world(tmp: Path, *extra: str, **env: str) -> World:
    approvers_file = tmp / "approvers.yaml"
    approvers = {
        "alice": add_entry(approvers_file, "approver", "alice", user_id="alice"),
        "uma": add_entry(approvers_file, "approver", "uma", user_id="user-1"),
        "carol": add_entry(approvers_file, "approver", "carol", user_id="carol", servers=[VALKEY]),
        "rex": add_entry(approvers_file, "approver", "rex", user_id="rex"),
        # Caller-only (`approvers add --caller-only`): decides her own agents' calls only.
        "kim": add_entry(approvers_file, "approver", "kim", user_id=AGENT_USER, roles=["caller"]),
    }
    keys_file = tmp / "keys.yaml"
    agent_key = add_entry(keys_file, "api_key", AGENT, agent_id=AGENT, user_id=AGENT_USER)
    clients_file = tmp / "clients.yaml"
    client_token = add_entry(clients_file, "client_token", CLIENT)
    rego, data = copy_policy(tmp)
    add_tools(
        data,
        catalog=[
            {"server": HEALTHIMAGING, "tool": tool, "category": "write", "risk": "medium"}
            for tool in (PROBE_TOOL, OWN_TOOL)
        ],
        rules={
            PROBE_TOOL: {"action": "require_approval", "reason": PROBE_REASON},
            OWN_TOOL: {"action": "require_approval", "approval": {"by": "caller"}},
        },
    )
    serve = Serve(
        tmp,
        [rego, data],
        {
            "MCP_POLICY_APPROVER_TOKEN": OPERATOR_TOKEN,
            "MCP_POLICY_APPROVERS_FILE": str(approvers_file),
            "MCP_POLICY_AGENT_KEYS_FILE": str(keys_file),
            "MCP_POLICY_CLIENTS_FILE": str(clients_file),
            "MCP_POLICY_APPROVAL_MAX_PENDING_PER_AGENT": "100000",
            "MCP_POLICY_APPROVAL_MAX_PENDING_PER_SESSION": "100000",
            **env,
        },
        *extra,
    )
    return World(serve, serve.url, approvers, approvers_file, agent_key, client_token)


def form_token(html: str) -> str:
    """The CSRF token in a page's first form."""
    match = _HIDDEN.search(html)
    assert match is not None, html[:2000]
    return match.group(1)


class Console:
    """An httpx client that uses the console as a browser without JavaScript would."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
        self.csrf = ""

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sign_in(self, secret: str, next_url: str | None = None) -> httpx.Response:
        """Fill in and send the sign-in form; on success, remember the session's token."""
        page = self.http.get("/console/sign-in")
        assert page.status_code == 200, page.text
        form = {"csrf_token": form_token(page.text), "secret": secret}
        if next_url is not None:
            form["next"] = next_url
        response = self.http.post("/console/sign-in", data=form)
        if response.status_code == 303:
            home = self.http.get("/console")
            if home.status_code == 200:
                self.csrf = form_token(home.text)
        return response

    def post(self, path: str, **fields: str) -> httpx.Response:
        """A form POST carrying the session's CSRF token (unless `csrf_token` is given)."""
        data = {"csrf_token": self.csrf, **fields}
        return self.http.post(path, data={k: v for k, v in data.items() if v is not None})

    @property
    def session_cookie(self) -> str | None:
        return self.http.cookies.get("mcp_policy_console")


__all__ = ["HEALTHIMAGING", "Console", "World", "form_token", "start_world"]
