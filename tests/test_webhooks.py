"""Approval webhooks against real receivers: the service (in-process, real OPA and stores)
POSTs its approval events to small aiohttp receivers on loopback, each of which checks
EVERY request with `standardwebhooks.Webhook(secret).verify` and answers 401 to anything
that does not verify. Receivers that fail, hang or refuse prove that delivery never holds
up or changes a decision (by ordering and completion: a receiver still holding its first
request while every decision has been answered), and show in /metrics and the log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from engine.models import Approval, ApprovalStatus, Principal
from engine.notify.events import ApprovalEvent, EventType
from engine.notify.webhooks import (
    Endpoint,
    check_secret,
    check_url,
    endpoint_label,
    parse_retry_after,
    proxy_for,
    slack_body,
    standard_body,
)
from engine.policy.opa_process import free_loopback_port
from engine.transports.server import Servers, start_servers
from tests.clients import HttpClient
from tests.conftest import APPROVER_TOKEN, approval_call, settings_for, shared_policy


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


SECRET = new_secret()  # MCP_POLICY_APPROVAL_WEBHOOK_SECRET of the services here
SLACK_SECRET = new_secret()  # a file endpoint's own
WAIT = 60.0  # the longest any wait for a delivery may take before the test fails


@dataclass(frozen=True)
class Received:
    id: str  # webhook-id
    payload: dict[str, Any]
    body: bytes
    headers: dict[str, str]

    @property
    def type(self) -> str:
        return str(self.payload.get("type"))

    @property
    def approval(self) -> dict[str, Any]:
        approval: dict[str, Any] = self.payload["data"]["approval"]
        return approval


class Receiver:
    """A webhook receiver on loopback. Every request is verified with the receiver's
    secret (a failure: 401, nothing recorded). Then, by `behaviour`:
    ok: 204; flaky: 500 the first time an id comes, then 204; busy: 429 with Retry-After 1
    the first time, then 204; hang: never answers (until `release` is set, then 204);
    redirect: 307 to `redirect_to`; huge: 200 with 4 MiB of body.
    `path` is the URL path the service is given (the log must never show it)."""

    def __init__(self, secret: str, behaviour: str = "ok", path: str = "/hook") -> None:
        self.secret = secret
        self.behaviour = behaviour
        self.path = path
        self.accepted: list[Received] = []  # answered 2xx, in arrival order
        self.attempts: list[str] = []  # webhook-ids of every verified request
        self.rejected: list[str] = []  # why requests failed verification
        self.holding = 0  # hang: requests held unanswered right now
        self.release = asyncio.Event()
        self.redirect_to = ""
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def label(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except (WebhookVerificationError, ValueError) as exc:  # ValueError: a malformed header
            self.rejected.append(str(exc) or type(exc).__name__)
            return web.Response(status=401, text="signature does not verify")
        webhook_id = request.headers["webhook-id"]
        self.attempts.append(webhook_id)
        first = self.attempts.count(webhook_id) == 1
        if self.behaviour == "flaky" and first:
            return web.Response(status=500)
        if self.behaviour == "busy" and first:
            return web.Response(status=429, headers={"Retry-After": "1"})
        if self.behaviour == "redirect":
            return web.Response(status=307, headers={"Location": self.redirect_to})
        if self.behaviour == "huge":
            self.accepted.append(Received(webhook_id, payload, body, dict(request.headers)))
            return web.Response(status=200, body=b"x" * (4 << 20))
        if self.behaviour == "hang":
            self.holding += 1
            try:
                await self.release.wait()
            finally:
                self.holding -= 1
        self.accepted.append(Received(webhook_id, payload, body, dict(request.headers)))
        return web.Response(status=204)

    def of(self, approval_id: str) -> list[Received]:
        """What was accepted for one approval, in arrival order."""
        return [r for r in self.accepted if r.approval["id"] == approval_id]

    def of_slack(self, approval_id: str) -> list[Received]:
        """Slack bodies carry no approval record: they are found by the approval id shown."""
        shown = f"*Approval*\n{approval_id}"
        return [
            r
            for r in self.accepted
            if any(f["text"] == shown for f in r.payload["blocks"][0].get("fields", []))
        ]

    async def wait_for(self, what: str, done: Callable[[], bool]) -> None:
        """Wait (at most WAIT seconds) until `done()`; fail naming `what` otherwise."""
        deadline = time.monotonic() + WAIT
        while not done():
            if time.monotonic() > deadline:
                seen = [r.body[:120] for r in self.accepted]
                raise AssertionError(f"{self.behaviour} receiver: no {what}; got {seen}")
            await asyncio.sleep(0.02)

    async def wait_types(self, approval_id: str, types: list[str]) -> list[Received]:
        await self.wait_for(
            f"{types} for {approval_id}", lambda: len(self.of(approval_id)) >= len(types)
        )
        return self.of(approval_id)


def write_endpoints(path: Path, endpoints: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"endpoints": endpoints}))
    return path


async def start(tmp: Path, file: Path | None = None, **overrides: Any) -> Servers:
    return await start_servers(
        settings_for(
            tmp,
            policy_paths=shared_policy(tmp),
            approval_webhook_secret=SECRET,
            approval_webhook_file=file,
            **overrides,
        )
    )


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of `name` with `labels` in a /metrics page (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


async def metrics(http: HttpClient) -> str:
    response = await http.raw.get("/metrics")
    assert response.status_code == 200
    return response.text


async def wait_metric(http: HttpClient, name: str, at_least: float, **labels: str) -> str:
    deadline = time.monotonic() + WAIT
    while True:
        text = await metrics(http)
        if metric(text, name, **labels) >= at_least:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} never reached {at_least}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- one service


@dataclass
class World:
    http: HttpClient
    servers: Servers
    ok: Receiver  # MCP_POLICY_APPROVAL_WEBHOOK_URLS
    flaky: Receiver  # the file's: 500, then 204
    busy: Receiver  # the file's: 429 Retry-After 1, then 204
    slack: Receiver  # the file's: format slack, its own secret, two events only
    redirect: Receiver  # the file's: 307 to `ok`
    huge: Receiver  # the file's: 200 with a 4 MiB answer


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("webhooks")
    ok = await Receiver(SECRET).start()
    flaky = await Receiver(SECRET, "flaky").start()
    busy = await Receiver(SECRET, "busy").start()
    slack = await Receiver(SLACK_SECRET, path="/services/T000/B000/slack-path-secret").start()
    redirect = await Receiver(SECRET, "redirect").start()
    redirect.redirect_to = ok.url
    huge = await Receiver(SECRET, "huge").start()
    file = write_endpoints(
        tmp / "webhooks.yaml",
        [
            {"url": flaky.url},
            {"url": busy.url, "timeout_seconds": 10},
            {
                "url": slack.url,
                "secret": SLACK_SECRET,
                "format": "slack",
                "events": ["approval.requested", "approval.denied"],
            },
            {"url": redirect.url, "attempts": 3},
            {"url": huge.url},
        ],
    )
    servers = await start(tmp, file, approval_webhook_urls=ok.url)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=10) as client:
            yield World(HttpClient(client), servers, ok, flaky, busy, slack, redirect, huge)
    finally:
        await servers.stop()
        for receiver in (ok, flaky, busy, slack, redirect, huge):
            await receiver.stop()


async def test_requested_approved_used_in_order_each_once_with_the_link(world: World) -> None:
    call = approval_call()
    first = await world.http.decide(call)
    assert first["verdict"] == "approval_required"
    approval_id, link = first["approval"]["id"], first["approval"]["url"]
    assert link.endswith(f"/console/approvals/{approval_id}")
    await world.http.act_as(APPROVER_TOKEN, approval_id, "approve", "go ahead")
    used = await world.http.decide(call)  # the identical call, once granted
    assert used["verdict"] == "allow"

    got = await world.ok.wait_types(approval_id, ["requested", "approved", "used"])
    assert [r.type for r in got] == ["approval.requested", "approval.approved", "approval.used"]
    assert len({r.id for r in got}) == 3  # a webhook-id per event
    assert all(r.id.startswith("evt_") for r in got)
    assert [r.approval["status"] for r in got] == ["pending", "approved", "used"]
    assert all(r.approval["url"] == link for r in got)
    assert got[0].approval["decision_id"] == first["decision_id"]
    assert got[1].approval["approver"] == "operator"
    assert got[1].approval["comment"] == "go ahead"
    assert got[2].approval["used_by_decision"] == used["decision_id"]
    assert got[0].approval["arguments"] == call["arguments"]
    for r in got:
        assert r.headers["Content-Type"] == "application/json"
        assert abs(int(r.headers["webhook-timestamp"]) - time.time()) < 300
        assert r.payload["timestamp"].endswith("Z")
    # Every request the receiver saw verified, and each event came once.
    assert world.ok.rejected == []
    assert sorted(world.ok.attempts) == sorted({*world.ok.attempts})


async def test_denied_event_carries_the_comment(world: World) -> None:
    first = await world.http.decide(approval_call())
    approval_id = first["approval"]["id"]
    await world.http.act_as(APPROVER_TOKEN, approval_id, "deny", "not on a Friday")
    got = await world.ok.wait_types(approval_id, ["requested", "denied"])
    assert [r.type for r in got] == ["approval.requested", "approval.denied"]
    assert got[1].approval["status"] == "denied"
    assert got[1].approval["comment"] == "not on a Friday"
    assert got[1].approval["url"] == first["approval"]["url"]


async def test_500_then_200_is_retried_and_delivered_once(world: World) -> None:
    first = await world.http.decide(approval_call())
    approval_id = first["approval"]["id"]
    got = await world.flaky.wait_types(approval_id, ["requested"])
    assert [r.type for r in got] == ["approval.requested"]
    # Two verified attempts with the same webhook-id (the first answered 500), one accepted.
    assert world.flaky.attempts.count(got[0].id) == 2
    assert [r.id for r in world.flaky.accepted].count(got[0].id) == 1
    # The same event as the healthy receiver got, byte for byte.
    ok = await world.ok.wait_types(approval_id, ["requested"])
    assert ok[0].id == got[0].id and ok[0].body == got[0].body
    text = await metrics(world.http)
    endpoint = world.flaky.label
    assert metric(text, "mcp_policy_webhook_deliveries_total", endpoint=endpoint, result="retried")
    assert (
        metric(text, "mcp_policy_webhook_deliveries_total", endpoint=endpoint, result="failed") == 0
    )


async def test_429_with_retry_after_is_retried_and_delivered_once(world: World) -> None:
    first = await world.http.decide(approval_call())
    approval_id = first["approval"]["id"]
    got = await world.busy.wait_types(approval_id, ["requested"])
    assert world.busy.attempts.count(got[0].id) == 2
    assert [r.id for r in world.busy.accepted].count(got[0].id) == 1
    assert world.busy.rejected == []


async def test_receivers_that_redirect_or_flood(world: World) -> None:
    """A redirect is not followed (nor retried: the receiver said where it is, not that
    it failed), so no one else receives the event by way of it; a receiver answering
    megabytes is delivered to, its answer left unread past 64 KiB."""
    first = await world.http.decide(approval_call())
    approval_id = first["approval"]["id"]
    got = await world.huge.wait_types(approval_id, ["requested"])
    await world.redirect.wait_for("an attempt", lambda: got[0].id in world.redirect.attempts)
    # Each event gets one attempt there, so once as many failed as it saw, ours is done.
    seen = len(set(world.redirect.attempts))
    deliveries = "mcp_policy_webhook_deliveries_total"
    label = world.redirect.label
    text = await wait_metric(world.http, deliveries, seen, endpoint=label, result="failed")
    assert world.redirect.attempts.count(got[0].id) == 1
    ok = await world.ok.wait_types(approval_id, ["requested"])
    assert [r.id for r in ok] == [got[0].id]  # once: straight, not through the redirect
    assert metric(text, deliveries, endpoint=label, result="retried") == 0
    assert metric(text, deliveries, endpoint=label, result="delivered") == 0
    text = await wait_metric(
        world.http, deliveries, 1, endpoint=world.huge.label, result="delivered"
    )
    assert metric(text, deliveries, endpoint=world.huge.label, result="failed") == 0


async def test_slack_body(world: World) -> None:
    # An agent whose ids are Slack markup: a mention and a link of its own.
    call = approval_call()
    call["principal"]["agent_id"] = "<!channel> agent"
    call["principal"]["user_id"] = "<https://evil.example|click me>"
    first = await world.http.decide(call)
    approval_id, link = first["approval"]["id"], first["approval"]["url"]
    await world.http.act_as(APPROVER_TOKEN, approval_id, "approve")  # not sent to Slack
    later = (await world.http.decide(approval_call()))["approval"]["id"]
    await world.slack.wait_for("the later approval", lambda: bool(world.slack.of_slack(later)))

    got = world.slack.of_slack(approval_id)
    assert len(got) == 1  # requested only: approved is not among its events
    body = got[0].payload
    assert set(body) == {"text", "blocks"}
    assert "copy_image_set" in body["text"] and f"<{link}|Open>" in body["text"]
    section, actions = body["blocks"]
    assert section["type"] == "section"
    assert section["text"]["type"] == "mrkdwn"
    assert section["text"]["text"].startswith("*Approval requested*\n")
    fields = {f["text"].split("\n", 1)[0]: f["text"].split("\n", 1)[1] for f in section["fields"]}
    assert fields["*Tool*"] == "copy_image_set"
    assert fields["*Server*"] == "awslabs.healthimaging-mcp-server"
    assert fields["*Status*"] == "pending"
    assert fields["*Approval*"] == approval_id
    assert (
        "&lt;!channel&gt; agent / &lt;https://evil.example|click me&gt;" in fields["*Agent / user*"]
    )
    assert actions == {
        "type": "actions",
        "elements": [
            {
                "type": "button",
                "text": {"type": "plain_text", "text": "Open in console"},
                "url": link,
                "action_id": "open_approval",
                "style": "primary",
            }
        ],
    }
    # Nothing the agent sent became Slack markup: the only links are the console's.
    everything = got[0].body.decode()
    assert "<!channel>" not in everything and "<https://evil" not in everything
    assert world.slack.rejected == []


async def test_forged_requests_fail_verification_in_the_receiver(world: World) -> None:
    """The receivers' check is real: a request signed with another secret, a body changed
    after signing, a signature moved to another id, a timestamp outside the tolerance or
    no signature at all is refused (401) and recorded as nothing."""
    first = await world.http.decide(approval_call())
    genuine = (await world.ok.wait_types(first["approval"]["id"], ["requested"]))[0]
    accepted = len(world.ok.accepted)
    now = datetime.now(UTC)
    stamp = str(int(now.timestamp()))
    body = genuine.body.decode()

    def headers(secret: str, webhook_id: str, data: str, at: datetime) -> dict[str, str]:
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign(webhook_id, at, data),
            "content-type": "application/json",
        }

    tampered = body.replace('"pending"', '"approved"')
    assert tampered != body
    forged = [
        (body, headers(new_secret(), genuine.id, body, now)),  # someone else's secret
        (tampered, genuine.headers),  # the body changed after signing
        (body, {**headers(SECRET, "evt_other", body, now), "webhook-id": genuine.id}),
        (body, headers(SECRET, genuine.id, body, now - timedelta(minutes=10))),  # too old
        (body, {"webhook-id": genuine.id, "webhook-timestamp": stamp}),  # unsigned
        (body, {**genuine.headers, "webhook-signature": "v1,AAAA"}),
        (body, {**genuine.headers, "webhook-signature": "garbage"}),
    ]
    async with httpx.AsyncClient() as client:
        for data, sent in forged:
            sent = {
                k: v
                for k, v in sent.items()
                if k.lower() not in ("content-length", "host", "transfer-encoding")
            }
            response = await client.post(world.ok.url, content=data, headers=sent)
            assert response.status_code == 401, sent
    assert len(world.ok.rejected) == len(forged)
    assert len(world.ok.accepted) == accepted
    # The library itself, on the same inputs: the genuine one verifies, a forged one not.
    assert Webhook(SECRET).verify(genuine.body, genuine.headers) == genuine.payload
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(genuine.body, genuine.headers)
    world.ok.rejected.clear()


# ---------------------------------------------------------------------------- services of their own


async def test_expired_event(tmp_path: Path) -> None:
    ok = await Receiver(SECRET).start()
    servers = await start(tmp_path, approval_webhook_urls=ok.url, approval_ttl_seconds=1)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=10) as client:
            http = HttpClient(client)
            call = approval_call()
            first = await http.decide(call)
            approval_id = first["approval"]["id"]
            got = await ok.wait_types(approval_id, ["requested", "expired"])
            assert [r.type for r in got] == ["approval.requested", "approval.expired"]
            assert got[1].approval["status"] == "expired"
            assert got[1].approval["url"] == first["approval"]["url"]
            # Expired means expired: the same call opens a new approval, not a grant.
            again = await http.decide(call)
            assert again["verdict"] == "approval_required"
            assert again["approval"]["id"] != approval_id
    finally:
        await servers.stop()
        await ok.stop()


def refusing_port() -> tuple[socket.socket, int]:
    """A loopback port bound but not listening: every connection to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


async def test_hanging_and_refusing_receivers_hold_up_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ok = await Receiver(SECRET).start()
    # Holds every request, with a deadline far beyond this test: its worker stays on the
    # first event, so everything after it waits in its queue.
    stuck = await Receiver(SECRET, "hang", path="/hook/stuck-path-secret").start()
    # Holds every request too, but each attempt gives up after 1 s: retried, then failed.
    slow = await Receiver(SECRET, "hang").start()
    closed, closed_port = refusing_port()
    refused_url = f"http://127.0.0.1:{closed_port}/hook/refused-path-secret"
    file = write_endpoints(
        tmp_path / "webhooks.yaml",
        [
            {"url": stuck.url, "timeout_seconds": 300, "attempts": 1},
            {"url": slow.url, "timeout_seconds": 1, "attempts": 2},
            {"url": refused_url, "timeout_seconds": 5, "attempts": 2},
        ],
    )
    caplog.set_level(logging.WARNING, logger="engine.notify.webhooks")
    servers = await start(tmp_path, file, approval_webhook_urls=ok.url)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=10) as client:
            http = HttpClient(client)
            call = approval_call()
            first = await http.decide(call)
            assert first["verdict"] == "approval_required"
            approval_id = first["approval"]["id"]
            await stuck.wait_for("a held request", lambda: stuck.holding == 1)

            # While that request hangs: the approval is decided, the call goes through
            # once, and further calls open approvals of their own, all as without webhooks.
            approved = await http.act_as(APPROVER_TOKEN, approval_id, "approve")
            assert approved["status"] == "approved"
            used = await http.decide(call)
            assert used["verdict"] == "allow"
            assert (await http.decide(call))["verdict"] == "approval_required"
            others = [await http.decide(approval_call()) for _ in range(3)]
            assert all(d["verdict"] == "approval_required" for d in others)

            # The healthy receiver got every event, in order, while the stuck one still
            # holds its first request unanswered.
            got = await ok.wait_types(approval_id, ["requested", "approved", "used"])
            assert [r.type for r in got] == [
                "approval.requested",
                "approval.approved",
                "approval.used",
            ]
            for other in others:
                await ok.wait_types(other["approval"]["id"], ["requested"])
            assert stuck.holding == 1 and stuck.accepted == []
            assert stuck.attempts == [got[0].id]

            # /metrics: the stuck queue holds the 6 events after the first (approved, used,
            # 4 requested); the slow and refusing endpoints retry and give up.
            text = await metrics(http)
            depth = "mcp_policy_webhook_queue_depth"
            assert metric(text, depth, endpoint=stuck.label) == 6
            deliveries = "mcp_policy_webhook_deliveries_total"
            assert metric(text, deliveries, endpoint=ok.label, result="delivered") == 7
            assert metric(text, deliveries, endpoint=stuck.label, result="delivered") == 0
            refused_label = f"127.0.0.1:{closed_port}"
            for label in (slow.label, refused_label):
                await wait_metric(http, deliveries, 1, endpoint=label, result="failed")
                text = await wait_metric(http, deliveries, 1, endpoint=label, result="retried")
                assert metric(text, deliveries, endpoint=label, result="delivered") == 0
            assert 'endpoint="127.0.0.1' in text and "path-secret" not in text
    finally:
        await servers.stop()
        for receiver in (ok, stuck, slow):
            await receiver.stop()
        closed.close()
    # Logged once per failed attempt, naming the endpoint by host:port only.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    refused = [w for w in warnings if f"127.0.0.1:{closed_port}" in w]
    assert refused and all("attempt" in w for w in refused)
    assert any("retrying in" in w for w in refused) and any("giving up" in w for w in refused)
    assert any(f"{slow.label}" in w and "no answer within 1 s" in w for w in warnings)
    assert not any("path-secret" in w or SECRET in w for w in warnings)


async def test_queue_overflow_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    stuck = await Receiver(SECRET, "hang").start()
    file = write_endpoints(
        tmp_path / "webhooks.yaml",
        [{"url": stuck.url, "timeout_seconds": 300, "attempts": 1, "queue": 2}],
    )
    servers = await start(tmp_path, file)
    try:
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=10) as client:
            http = HttpClient(client)
            first = await http.decide(approval_call())
            await stuck.wait_for("a held request", lambda: stuck.holding == 1)
            # Five more events while the worker is held: room for two, three dropped.
            later = [await http.decide(approval_call()) for _ in range(5)]
            assert all(d["verdict"] == "approval_required" for d in later)
            text = await metrics(http)
            deliveries = "mcp_policy_webhook_deliveries_total"
            assert metric(text, deliveries, endpoint=stuck.label, result="dropped") == 3
            assert metric(text, "mcp_policy_webhook_queue_depth", endpoint=stuck.label) == 2
            # Let it go: the held event and the two newest are delivered, the oldest
            # three of the later ones were dropped.
            stuck.release.set()
            await stuck.wait_for("three deliveries", lambda: len(stuck.accepted) == 3)
            ids = [r.approval["id"] for r in stuck.accepted]
            expected = [first["approval"]["id"], *(d["approval"]["id"] for d in later[3:])]
            assert ids == expected
            text = await wait_metric(http, deliveries, 3, endpoint=stuck.label, result="delivered")
            assert metric(text, deliveries, endpoint=stuck.label, result="dropped") == 3
    finally:
        await servers.stop()
        await stuck.stop()


# ---------------------------------------------------------------------------- refusing to start


def serve(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    environment.update(env)
    argv = [sys.executable, "-m", "engine.cli", "serve", "--state-dir", str(tmp / "state")]
    argv += ["--http-port", str(free_loopback_port()), "--grpc-port", str(free_loopback_port())]
    return subprocess.run(
        argv, env=environment, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


SHORT_SECRET = "whsec_" + base64.b64encode(b"0123456789").decode()
URL = "https://hooks.example/approvals"


@pytest.mark.parametrize(
    ("env", "endpoints", "expected"),
    [
        (
            {"MCP_POLICY_APPROVAL_WEBHOOK_URLS": "ftp://hooks.example/hunter2"},
            None,
            "MCP_POLICY_APPROVAL_WEBHOOK_URLS: a webhook URL must be http:// or https://",
        ),
        (
            {"MCP_POLICY_APPROVAL_WEBHOOK_URLS": f"{URL}, https://:443/x"},
            None,
            "a webhook URL needs a host",
        ),
        (
            {"MCP_POLICY_APPROVAL_WEBHOOK_URLS": URL, "MCP_POLICY_APPROVAL_WEBHOOK_SECRET": ""},
            None,
            "must be in the Standard Webhooks form whsec_<base64>",
        ),
        (
            {"MCP_POLICY_APPROVAL_WEBHOOK_SECRET": "hunter2-not-a-webhook-secret"},
            None,
            "MCP_POLICY_APPROVAL_WEBHOOK_SECRET: a webhook secret must be in the Standard",
        ),
        (
            {"MCP_POLICY_APPROVAL_WEBHOOK_SECRET": "whsec_not*base64!hunter2"},
            None,
            "is not valid base64",
        ),
        ({"MCP_POLICY_APPROVAL_WEBHOOK_SECRET": SHORT_SECRET}, None, "24 to 64 bytes"),
        (
            {"MCP_POLICY_APPROVAL_WEBHOOK_URLS": URL, "MCP_POLICY_APPROVAL_WEBHOOK_SECRET": None},
            None,
            "approval_webhook_urls needs approval_webhook_secret",
        ),
        ({}, [{"url": URL, "events": ["approval.nope"]}], "unknown event 'approval.nope'"),
        ({}, [{"url": URL, "format": "teams"}], "unknown format 'teams' (known: standard, slack)"),
        ({}, [{"url": "file:///etc/passwd"}], "endpoint 1: a webhook URL must be http://"),
        ({}, [{"url": URL}, {"url": URL, "retries": 3}], "endpoint 2: unknown key 'retries'"),
        ({}, [{"url": URL, "secret": "hunter2-plain"}], "endpoint 1: a webhook secret must be"),
        ({}, [{"url": URL, "timeout_seconds": 0}], "timeout_seconds must be over 0"),
        ({}, [{"url": URL, "attempts": "many"}], "attempts must be a whole number"),
        ({}, [], "endpoints must be a non-empty list"),
    ],
)
def test_bad_configuration_refuses_to_start(
    tmp_path: Path, env: dict[str, str | None], endpoints: list[Any] | None, expected: str
) -> None:
    settings = {"MCP_POLICY_APPROVAL_WEBHOOK_SECRET": SECRET, **env}
    if endpoints is not None:
        path = tmp_path / "webhooks.yaml"
        path.write_text(yaml.safe_dump({"endpoints": endpoints}))
        settings["MCP_POLICY_APPROVAL_WEBHOOK_FILE"] = str(path)
    done = serve(tmp_path, {k: v for k, v in settings.items() if v is not None})
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0], lines[0]
    assert "HTTP on" not in done.stdout
    # No secret is ever repeated back.
    for secret in (SECRET, "hunter2"):
        assert secret not in done.stderr + done.stdout


def test_bad_yaml_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.yaml"
    path.write_text("endpoints:\n  - url: [unclosed\n")
    done = serve(
        tmp_path,
        {
            "MCP_POLICY_APPROVAL_WEBHOOK_SECRET": SECRET,
            "MCP_POLICY_APPROVAL_WEBHOOK_FILE": str(path),
        },
    )
    assert done.returncode == 3
    assert done.stderr.strip() == (
        f"mcp-policy: MCP_POLICY_APPROVAL_WEBHOOK_FILE {path}: not valid YAML at line 3"
    )


# ---------------------------------------------------------------------------- the pieces


def test_secret_and_url_checks() -> None:
    assert check_secret(SECRET) == SECRET
    unpadded = SECRET.rstrip("=")
    assert check_secret(unpadded) == unpadded  # what some libraries print
    for bad in ("", "whsec_", "sk_" + SECRET[6:], SECRET + "!", "whsec_" + "A" * 200):
        with pytest.raises(ValueError) as caught:
            check_secret(bad)
        assert SECRET[6:] not in str(caught.value)
    assert check_url("http://[::1]:8080/x?token=1") == "http://[::1]:8080/x?token=1"
    for bad in ("hooks.example/x", "javascript:alert(1)", "http://h:99999/", "https://h/x#y"):
        with pytest.raises(ValueError):
            check_url(bad)
    assert (
        endpoint_label("https://hooks.slack.example/services/T/B/secret")
        == "hooks.slack.example:443"
    )
    assert endpoint_label("http://[::1]/x") == "[::1]:80"


def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https://hooks.example/x") is None
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.setenv("no_proxy", "localhost,.corp.example")
    assert proxy_for("https://hooks.example/x") == "http://proxy.internal:3128"
    assert proxy_for("http://hooks.example/x") is None  # no http_proxy
    assert proxy_for("https://hooks.corp.example/x") is None


def test_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_bodies() -> None:
    now = datetime.now(UTC)
    approval = Approval(
        id="apr_1",
        status=ApprovalStatus.DENIED,
        server="s",
        tool="t",
        arguments={"a": "<b>&"},
        principal=Principal(session_id="s-1"),
        rule="r",
        reason="x" * 5000,
        decision_id="dec_1",
        fingerprint="f",
        created_at=now,
        expires_at=now,
        approver="ann",
        comment="no & <never>",
    )
    event = ApprovalEvent(EventType.DENIED, approval, now)
    standard = json.loads(standard_body(event))
    assert standard == json.loads(json.dumps(event.payload()))
    slack = slack_body(event)
    assert "actions" not in [b["type"] for b in slack["blocks"]]  # no link, no button
    section = slack["blocks"][0]
    assert len(section["text"]["text"]) <= 3000 and len(slack["text"]) <= 3000
    fields = [f["text"] for f in section["fields"]]
    assert "*Status*\ndenied by ann" in fields
    assert "*Comment*\nno &amp; &lt;never&gt;" in fields
    assert "*Agent / user*\n(no agent id) / (no user id) (unproven)" in fields
    assert Endpoint(url="https://h/secret-path", secret=SECRET).label == "h:443"
    assert "secret-path" not in repr(Endpoint(url="https://h/secret-path", secret=SECRET))
    assert SECRET not in repr(Endpoint(url="https://h/x", secret=SECRET))


async def test_no_endpoints_no_workers(tmp_path: Path) -> None:
    servers = await start(tmp_path)
    try:
        assert servers.runtime.webhooks.endpoints == []
        assert servers.runtime.webhooks.stats() == []  # no worker, no subscription
        async with httpx.AsyncClient(base_url=servers.http_url, timeout=10) as client:
            text = (await client.get("/metrics")).text
        assert "mcp_policy_webhook_deliveries_total{" not in text
    finally:
        await servers.stop()
