"""Hot reload: edits to rego/ and policies/ apply by themselves, broken ones are rejected
while decisions go on without a single error, and counters stay as they were."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.transports.server import Servers, start_servers
from tests.clients import HttpClient
from tests.conftest import APPROVER_TOKEN, copy_call, copy_policy, session, settings_for

AUTH = {"Authorization": f"Bearer {APPROVER_TOKEN}"}


class Watched:
    def __init__(self, servers: Servers, rego: Path, data: Path, http: HttpClient) -> None:
        self.servers, self.rego, self.data, self.http = servers, rego, data, http

    @property
    def revision(self) -> str:
        return self.servers.runtime.policy.revision

    async def readyz(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self.http.raw.get("/readyz")).json()
        return body


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[Watched]:
    rego, data = copy_policy(tmp_path)
    settings = settings_for(tmp_path, policy_paths=[rego, data], reload_interval_seconds=0.1)
    servers = await start_servers(settings)
    async with httpx.AsyncClient(base_url=servers.http_url) as raw:
        yield Watched(servers, rego, data, HttpClient(raw))
    await servers.stop()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def decide_continuously(http: HttpClient, stop: asyncio.Event) -> list[dict[str, Any]]:
    """Decisions one after another until `stop`; each must be a 200 answer."""
    seen = []
    while not stop.is_set():
        seen.append(await http.decide(copy_call()))
    return seen


async def test_valid_edit_applies_and_keeps_counters(watched: Watched) -> None:
    sid = session()
    for _ in range(2):
        await watched.http.decide(copy_call(sid))
    before = watched.revision
    assert await revisions_in_metrics(watched) == [before]
    rules = watched.data / "rules.yaml"
    rules.write_text(rules.read_text().replace("max: 10", "max: 4"))

    async def applied() -> bool:
        return watched.revision != before

    await until(applied)
    decision = await watched.http.decide(copy_call(sid))
    assert decision["policy_revision"] == watched.revision
    assert decision["rate_limit"]["limit"] == 4
    assert decision["rate_limit"]["remaining"] == 4 - 3, "counters survive the reload"
    last = (await watched.readyz())["last_reload"]
    assert last["ok"] is True and last["changed"] is True
    assert await revisions_in_metrics(watched) == [watched.revision], "only the active one"


async def revisions_in_metrics(watched: Watched) -> list[str]:
    """The revisions /metrics names as deciding now (mcp_policy_policy_revision == 1)."""
    text = (await watched.http.raw.get("/metrics")).text
    prefix = 'mcp_policy_policy_revision{revision="'
    return [
        line[len(prefix) :].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith(prefix) and line.endswith(" 1.0")
    ]


@pytest.mark.parametrize(
    ("path", "edit", "words"),
    [
        ("rego/mcp/decision.rego", lambda text: text + "\nbroken := {\n", "decision.rego"),
        (
            "policies/rules.yaml",
            lambda text: text.replace("action: rate_limit", "action: maybe"),
            "data.mcp_policy.rules.copy_image_set",
        ),
        ("policies/rules.yaml", lambda text: text + "\n  : [\n", "rules.yaml"),
    ],
)
async def test_broken_edit_is_rejected_while_decisions_continue(
    watched: Watched, path: str, edit: Callable[[str], str], words: str
) -> None:
    before = watched.revision
    stop = asyncio.Event()
    traffic = asyncio.create_task(decide_continuously(watched.http, stop))
    await asyncio.sleep(0.2)
    target = watched.rego.parent / path
    target.write_text(edit(target.read_text()))

    async def rejected() -> bool:
        last = (await watched.readyz())["last_reload"]
        return last is not None and last["ok"] is False

    await until(rejected)
    await asyncio.sleep(0.3)
    stop.set()
    decisions = await traffic
    assert len(decisions) > 5
    assert all(d["verdict"] == "allow" for d in decisions), "not a single error"
    assert {d["policy_revision"] for d in decisions} == {before}
    body = await watched.readyz()
    assert body["status"] == "ready"
    assert body["policy_revision"] == before
    assert any(words in error for error in body["last_reload"]["errors"])


async def test_reload_endpoint(watched: Watched) -> None:
    response = await watched.http.raw.post("/v1/policy/reload", headers=AUTH)
    assert response.json() == {"policy_revision": watched.revision, "changed": False}
    assert (await watched.http.raw.post("/v1/policy/reload")).status_code == 401
    decision_rego = watched.rego / "mcp" / "decision.rego"
    decision_rego.write_text(decision_rego.read_text() + "\nbroken := {\n")
    rejected = await watched.http.raw.post("/v1/policy/reload", headers=AUTH)
    assert rejected.status_code == 409
    assert any("decision.rego" in e for e in rejected.json()["error"]["errors"])


async def test_a_refused_data_edit_names_the_file_line_and_mistake(watched: Watched) -> None:
    """A YAML rule with an unknown action: the reload is refused with the file, the line
    and the mistake (as `mcp-policy validate` says it), not jsonschema's "is not valid
    under any of the given schemas"; the running policy keeps deciding."""
    before = watched.revision
    rules = watched.data / "rules.yaml"
    rules.write_text(
        rules.read_text().replace(
            "    copy_image_set:\n      action: rate_limit",
            "    copy_image_set:\n      action: rate_limitt",
        )
    )
    rejected = await watched.http.raw.post("/v1/policy/reload", headers=AUTH)
    assert rejected.status_code == 409
    errors = rejected.json()["error"]["errors"]
    assert len(errors) == 1, errors
    (line,) = [
        n for n, text in enumerate(rules.read_text().splitlines(), 1) if "rate_limitt" in text
    ]
    assert errors[0].startswith(f"{rules}:{line}:"), errors
    assert "data.mcp_policy.rules.copy_image_set.action" in errors[0]
    assert "'rate_limitt'" in errors[0] and "not valid under any" not in errors[0]
    assert watched.revision == before
    assert (await watched.http.decide(copy_call()))["verdict"] == "allow"
