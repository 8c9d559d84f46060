"""The proxy under floods by one caller, and requests that reuse an id in flight.

Sessions: every session of `mcp-policy proxy --listen` holds an upstream (here a fixture
child each), so one principal may hold at most `max_sessions_per_principal` of them
(handshake sessions and 2026-07-28 relays alike); more get HTTP 429 with a JSON-RPC error
saying how to free a place, before anything is started, and other principals are not
affected. A DELETE or the idle timeout frees a place.

Duplicate ids: a request whose id is in use in its session (not answered yet) is refused
-32600 before it is decided: no decision, nothing forwarded, and the first request's
answer still arrives. Over HTTP, over stdio, and (where each POST is an exchange of its
own, under an id of the relay's) at 2026-07-28, where both are served.

Everything is real: the embedded decision service, the SDK's transports, fixture
children through the fork server; a decision can be held (`Decisions.gate`) so that a
second request certainly arrives while the first is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.identity import Identity
from engine.models import DecideRequest, Decision
from engine.proxy.auth import AuthConfig, ResourceServer
from engine.proxy.core import ProxyOptions
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import settings_for
from tests.fixtures.issuer import Issuer
from tests.fixtures.proxy_harness import (
    FIXTURE,
    MODE_ENV,
    PROXY,
    RECORD_ENV,
    RawProxy,
    calls,
    clean_env,
    copy_args,
    embedded_args,
    proxy_policy,
)

AUDIENCE = "https://mcp.example.test/mcp"
HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


# -- the rig --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    tmp = tmp_path_factory.mktemp("proxy-floods")
    running = Runtime(settings_for(tmp, decision_log="off", policy_paths=proxy_policy(tmp)))
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    running = Issuer(audience=AUDIENCE)
    await running.start()
    yield running
    await running.stop()


class Decisions(EmbeddedDecider):
    """The embedded decider, keeping the tools/call decisions it was asked for. While
    `gate` is clear, each waits for it before deciding."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.asked: list[DecideRequest] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def decide(self, request: DecideRequest, identity: Identity | None = None) -> Decision:
        if not request.dry_run:
            self.asked.append(request)
            await self.gate.wait()
        return await super().decide(request, identity)

    async def asked_for(self, count: int) -> None:
        """Until `count` decisions have been asked for (a test's bound, not a timing)."""
        for _ in range(600):
            if len(self.asked) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{len(self.asked)} decisions were asked for, not {count}")


class Upstreams:
    """The fixture children the proxy starts (one per session), counted as they start and
    end, and the calls they received."""

    def __init__(self, tmp: Path) -> None:
        self.record = tmp / "calls.jsonl"
        self.env = {**os.environ, RECORD_ENV: str(self.record)}
        self.started = 0
        self.ended = 0

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Any]:
        self.started += 1
        try:
            async with open_child(FIXTURE, self.env) as child:
                yield child
        finally:
            self.ended += 1

    def calls(self) -> list[dict[str, Any]]:
        return calls(self.record)


@pytest.fixture
def upstreams(tmp_path: Path) -> Upstreams:
    return Upstreams(tmp_path)


@contextlib.asynccontextmanager
async def listening(
    runtime: Runtime,
    upstreams: Upstreams,
    *,
    issuer: Issuer | None = None,
    **limits: Any,
) -> AsyncIterator[tuple[HttpProxy, Decisions]]:
    """The HTTP proxy on a free loopback port (with --auth-* for `issuer`'s tokens)."""
    resource = None
    if issuer is not None:
        resource = ResourceServer(AuthConfig(issuer=issuer.issuer, audience=AUDIENCE))
        await resource.start()
    decider = Decisions(runtime)
    try:
        running = await start_http_proxy(
            "127.0.0.1",
            0,
            decider=decider,
            options=ProxyOptions(),
            open_upstream=upstreams.open,
            auth=resource,
            **limits,
        )
        try:
            yield running, decider
        finally:
            decider.gate.set()
            await running.stop()
    finally:
        if resource is not None:
            await resource.close()


def token_of(issuer: Issuer, agent: str, user: str) -> dict[str, str]:
    claims = issuer.claims(sub=user, client_id=agent, jti=uuid.uuid4().hex)
    return {"authorization": f"Bearer {issuer.key.sign(claims)}"}


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- raw streamable HTTP --------------------------------------------------------------------


def initialize(request_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "flood-test-client", "version": "1"},
        },
    }


def tools_call(request_id: int | str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "copy_image_set", "arguments": arguments},
    }


def message_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message of a response (a JSON body, or the last SSE data line)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        body: dict[str, Any] = response.json()
        return body
    data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    message: dict[str, Any] = json.loads([d for d in data if d][-1])
    return message


async def open_session(
    raw: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST initialize (and, when a session opened, notifications/initialized)."""
    headers = {**ACCEPT, **(headers or {})}
    opened = await raw.post(url, json=initialize(), headers=headers)
    session_id = opened.headers.get("mcp-session-id")
    if opened.status_code == 200 and session_id:
        done = await raw.post(
            url,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers=in_session(session_id, headers),
        )
        assert done.status_code == 202, done.text
    return opened


def in_session(session_id: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **ACCEPT,
        **(headers or {}),
        "mcp-session-id": session_id,
        "mcp-protocol-version": HANDSHAKE,
    }


def stateless_call(request_id: int | str, arguments: dict[str, Any]) -> dict[str, Any]:
    call = tools_call(request_id, arguments)
    call["params"]["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return call


def stateless_headers(session: str | None, headers: dict[str, str] | None = None) -> dict[str, str]:
    sent = {
        **ACCEPT,
        **(headers or {}),
        "mcp-protocol-version": MODERN,
        "mcp-method": "tools/call",
        "mcp-name": "copy_image_set",
    }
    if session is not None:
        sent["mcp-policy-session"] = session
    return sent


async def stateless_post(
    raw: httpx.AsyncClient,
    url: str,
    session: str | None,
    headers: dict[str, str] | None = None,
    request_id: int | str = 1,
) -> tuple[httpx.Response, dict[str, Any]]:
    """One 2026-07-28 tools/call (its own relay per `session` name); the arguments."""
    arguments = copy_args()
    response = await raw.post(
        url, json=stateless_call(request_id, arguments), headers=stateless_headers(session, headers)
    )
    return response, arguments


def assert_cap(response: httpx.Response, cap: int) -> str:
    """A 429 with a JSON-RPC error naming the cap and how to free a place; its message."""
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == -32600
    message: str = body["error"]["message"]
    assert f"at most {cap} per principal" in message
    assert "--max-sessions-per-principal" in message
    assert "DELETE" in message
    assert "idles out" in message
    assert body["error"]["data"]["max_sessions_per_principal"] == cap
    return message


def answers(message: dict[str, Any], arguments: dict[str, Any]) -> bool:
    """Whether `message` is the successful answer to copy_image_set with `arguments` (the
    fixture's result names the source image set, a fresh id each call)."""
    result = message.get("result")
    if not isinstance(result, dict) or result.get("isError") is True:
        return False
    return arguments["source_image_set_id"] in json.dumps(result)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (a bound on the test, never an assertion about time)."""
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


# -- one principal's sessions ------------------------------------------------------------------


async def test_a_principal_at_its_cap_gets_429_and_others_still_open_sessions(
    runtime: Runtime, issuer: Issuer, upstreams: Upstreams
) -> None:
    alice = token_of(issuer, fresh("agent-a"), fresh("user-a"))
    # The same agent and user with another token: the same principal.
    alice_again = token_of(issuer, alice_agent := fresh("agent-a2"), alice_user := fresh("u"))
    alice_renewed = token_of(issuer, alice_agent, alice_user)
    bob = token_of(issuer, fresh("agent-b"), fresh("user-b"))
    async with (
        listening(runtime, upstreams, issuer=issuer, max_sessions_per_principal=3) as (
            running,
            decider,
        ),
        httpx.AsyncClient(timeout=30) as raw,
    ):
        url = running.url
        opened = [await open_session(raw, url, alice) for _ in range(3)]
        started_at_cap = upstreams.started
        over = await open_session(raw, url, alice)
        over_stateless, _ = await stateless_post(raw, url, "fourth", alice)
        started_after_refusals = upstreams.started
        theirs = await open_session(raw, url, bob)
        theirs_stateless, theirs_args = await stateless_post(raw, url, None, bob)
        # Another token of one agent and user counts with the first.
        others = [await open_session(raw, url, alice_again) for _ in range(3)]
        renewed = await open_session(raw, url, alice_renewed)
        sessions = dict(running.app.sessions)

    assert [r.status_code for r in opened] == [200, 200, 200]
    assert len({r.headers["mcp-session-id"] for r in opened}) == 3
    message = assert_cap(over, 3)
    assert "this one has 3" in message
    assert "mcp-session-id" not in over.headers
    assert_cap(over_stateless, 3)
    assert started_at_cap == 3
    assert started_after_refusals == 3  # nothing was started for a refused request
    assert theirs.status_code == 200
    assert theirs_stateless.status_code == 200
    assert answers(message_of(theirs_stateless), theirs_args)
    assert [r.status_code for r in others] == [200, 200, 200]
    assert_cap(renewed, 3)
    assert len(sessions) == 3 + 1 + 3
    assert len(decider.asked) == 1
    assert len(upstreams.calls()) == 1


async def test_without_auth_the_principal_is_the_client_address(
    runtime: Runtime, upstreams: Upstreams
) -> None:
    other_address = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with (
        listening(runtime, upstreams, max_sessions_per_principal=2) as (running, _),
        httpx.AsyncClient(timeout=30) as first,
        httpx.AsyncClient(timeout=30) as second,
        httpx.AsyncClient(timeout=30, transport=other_address) as elsewhere,
    ):
        url = running.url
        # Two connections (two ports) of one address are one principal.
        opened = [await open_session(first, url), await open_session(second, url)]
        over = await open_session(first, url)
        over_stateless, _ = await stateless_post(second, url, "mine")
        started_at_cap = upstreams.started
        from_elsewhere = await open_session(elsewhere, url)

    assert [r.status_code for r in opened] == [200, 200]
    assert_cap(over, 2)
    assert_cap(over_stateless, 2)
    assert started_at_cap == 2
    assert from_elsewhere.status_code == 200


async def test_the_global_cap_still_holds(runtime: Runtime, upstreams: Upstreams) -> None:
    other_address = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with (
        listening(runtime, upstreams, max_sessions=2) as (running, _),
        httpx.AsyncClient(timeout=30) as raw,
        httpx.AsyncClient(timeout=30, transport=other_address) as elsewhere,
    ):
        url = running.url
        opened = await open_session(raw, url)
        relay, relay_args = await stateless_post(raw, url, "one")
        full = await open_session(elsewhere, url)
        full_stateless, _ = await stateless_post(elsewhere, url, "two")

    assert opened.status_code == 200
    assert answers(message_of(relay), relay_args)
    for refused in (full, full_stateless):
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "Too many open sessions"
    assert upstreams.started == 2


async def test_stateless_relays_count_with_handshake_sessions(
    runtime: Runtime, issuer: Issuer, upstreams: Upstreams
) -> None:
    alice = token_of(issuer, fresh("agent-s"), fresh("user-s"))
    bob = token_of(issuer, fresh("agent-t"), fresh("user-t"))
    async with (
        listening(runtime, upstreams, issuer=issuer, max_sessions_per_principal=2) as (
            running,
            decider,
        ),
        httpx.AsyncClient(timeout=30) as raw,
    ):
        url = running.url
        one, one_args = await stateless_post(raw, url, "one", alice)
        two, two_args = await stateless_post(raw, url, "two", alice)
        three, _ = await stateless_post(raw, url, "three", alice)
        handshake = await open_session(raw, url, alice)
        # A request in a relay that is open takes no new place.
        one_again, one_again_args = await stateless_post(raw, url, "one", alice)
        theirs, theirs_args = await stateless_post(raw, url, "one", bob)
        relays = len(running.app._stateless)

    assert answers(message_of(one), one_args)
    assert answers(message_of(two), two_args)
    assert_cap(three, 2)
    assert_cap(handshake, 2)
    assert answers(message_of(one_again), one_again_args)
    assert answers(message_of(theirs), theirs_args)
    assert relays == 3
    assert upstreams.started == 3
    assert len(decider.asked) == 4
    assert len(upstreams.calls()) == 4


async def test_closing_a_session_frees_its_place(runtime: Runtime, upstreams: Upstreams) -> None:
    async with (
        listening(runtime, upstreams, max_sessions_per_principal=1) as (running, _),
        httpx.AsyncClient(timeout=30) as raw,
    ):
        url = running.url
        first = await open_session(raw, url)
        session_id = first.headers["mcp-session-id"]
        over = await open_session(raw, url)
        deleted = await raw.delete(url, headers=in_session(session_id))
        gone = await raw.post(url, json=tools_call(2, copy_args()), headers=in_session(session_id))
        second = await open_session(raw, url)
        await until(lambda: upstreams.ended == 1, "the deleted session's child ended")
        sessions = list(running.app.sessions)

    assert first.status_code == 200
    assert_cap(over, 1)
    assert deleted.status_code == 200
    assert gone.status_code == 404
    assert second.status_code == 200
    assert sessions == [second.headers["mcp-session-id"]]
    assert upstreams.calls() == []


async def test_idle_sessions_are_reaped_and_free_their_place(
    runtime: Runtime, upstreams: Upstreams
) -> None:
    async with (
        listening(runtime, upstreams, max_sessions_per_principal=1, idle_timeout=0.5) as (
            running,
            decider,
        ),
        httpx.AsyncClient(timeout=30) as raw,
    ):
        url = running.url
        first = await open_session(raw, url)
        session_id = first.headers["mcp-session-id"]
        over = await open_session(raw, url)
        await until(lambda: not running.app.sessions, "the idle session was closed")
        await until(lambda: upstreams.ended == 1, "its child ended")
        reaped = await raw.post(
            url, json=tools_call(2, copy_args()), headers=in_session(session_id)
        )
        # Its place is free: a stateless relay takes it, and is reaped in turn.
        relay, relay_args = await stateless_post(raw, url, None)
        over_relay = await open_session(raw, url)
        await until(lambda: not running.app._stateless, "the idle relay was closed")
        await until(lambda: upstreams.ended == 2, "its child ended")
        last = await open_session(raw, url)

    assert first.status_code == 200
    assert_cap(over, 1)
    assert reaped.status_code == 404
    assert reaped.json()["error"]["message"] == "Session not found"
    assert answers(message_of(relay), relay_args)
    assert_cap(over_relay, 1)
    assert last.status_code == 200
    assert upstreams.started == 3
    assert len(decider.asked) == 1


# -- duplicate request ids ----------------------------------------------------------------------


def assert_duplicate(response: httpx.Response, request_id: int | str) -> None:
    """The POST was refused 400 with -32600 naming the id in use."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["id"] == request_id
    assert body["error"]["code"] == -32600
    assert f"request id {request_id!r} is already in use" in body["error"]["message"]


async def test_concurrent_duplicate_ids_in_a_session(
    runtime: Runtime, upstreams: Upstreams
) -> None:
    first_args, second_args, text_args = copy_args(), copy_args(), copy_args()
    async with (
        listening(runtime, upstreams) as (running, decider),
        httpx.AsyncClient(timeout=30) as one,
        httpx.AsyncClient(timeout=30) as two,
    ):
        url = running.url
        opened = await open_session(one, url)
        session_id = opened.headers["mcp-session-id"]
        headers = in_session(session_id)
        decider.gate.clear()  # the first call's decision waits: it is in flight
        posts = [
            asyncio.create_task(one.post(url, json=tools_call(7, first_args), headers=headers)),
            asyncio.create_task(two.post(url, json=tools_call(7, second_args), headers=headers)),
        ]
        done, _ = await asyncio.wait(posts, return_when=asyncio.FIRST_COMPLETED)
        (refused,) = [task.result() for task in done]
        # 7 and "7" are one id to the SDK's transport (one stream per str(id)).
        as_text = await two.post(url, json=tools_call("7", text_args), headers=headers)
        asked_while_held = len(decider.asked)
        decider.gate.set()
        (allowed,) = [await task for task in posts if task not in done]
        # Answered, the id is free again (once the listener and the relay let go of it).
        relay = running.app._relays[session_id]
        await until(
            lambda: not running.app._in_flight[session_id] and not relay.in_use(7),
            "the answered id was let go",
        )
        reused_args = copy_args()
        reused = await one.post(url, json=tools_call(7, reused_args), headers=headers)

    assert_duplicate(refused, 7)
    assert_duplicate(as_text, "7")
    assert asked_while_held == 1
    assert allowed.status_code == 200
    answer = message_of(allowed)
    assert answer["id"] == 7
    (recorded, again) = upstreams.calls()
    assert answers(answer, recorded["arguments"])
    assert recorded["arguments"] in (first_args, second_args)
    assert decider.asked[0].message["params"]["arguments"] == recorded["arguments"]
    assert answers(message_of(reused), reused_args)
    assert again["arguments"] == reused_args
    assert len(decider.asked) == 2


async def test_an_id_the_relay_still_holds_is_refused(
    runtime: Runtime, upstreams: Upstreams
) -> None:
    """A client that hangs up on a call still being decided, then sends its id again:
    the relay still holds the id, so the new POST is refused before the transport gives
    it the first one's stream (and with it the first call's answer)."""
    async with (
        listening(runtime, upstreams) as (running, decider),
        httpx.AsyncClient(timeout=30) as raw,
    ):
        url = running.url
        opened = await open_session(raw, url)
        session_id = opened.headers["mcp-session-id"]
        headers = in_session(session_id)
        decider.gate.clear()
        first = asyncio.create_task(raw.post(url, json=tools_call(9, copy_args()), headers=headers))
        await decider.asked_for(1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await until(
            lambda: not running.app._in_flight[session_id], "the listener let go of the POST"
        )
        again = await raw.post(url, json=tools_call(9, copy_args()), headers=headers)
        decider.gate.set()

    assert_duplicate(again, 9)
    assert len(decider.asked) == 1


async def test_stateless_posts_with_one_id_are_each_answered(
    runtime: Runtime, upstreams: Upstreams
) -> None:
    """At 2026-07-28 each POST is an exchange of its own: the relay sends each under an id
    of its own, so two with the client's same id are decided and answered each on its own
    response, and neither answer is lost or swapped."""
    async with (
        listening(runtime, upstreams) as (running, decider),
        httpx.AsyncClient(timeout=30) as one,
        httpx.AsyncClient(timeout=30) as two,
    ):
        url = running.url
        decider.gate.clear()
        posts = [
            asyncio.create_task(stateless_post(client, url, "dup", request_id=7))
            for client in (one, two)
        ]
        await decider.asked_for(2)
        decider.gate.set()
        answered = [await task for task in posts]
        relays = len(running.app._stateless)

    assert relays == 1
    for response, arguments in answered:
        assert response.status_code == 200
        message = message_of(response)
        assert message["id"] == 7
        assert answers(message, arguments)
    assert sorted(c["arguments"]["source_image_set_id"] for c in upstreams.calls()) == sorted(
        arguments["source_image_set_id"] for _, arguments in answered
    )
    assert len(decider.asked) == 2


async def test_duplicate_ids_over_stdio(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    log = tmp_path / "decisions.jsonl"
    args = [*embedded_args(tmp_path, proxy_policy(tmp_path)), "--decision-log", str(log)]
    proxy = await RawProxy.start(
        [*args, "--", *FIXTURE], clean_env(**{RECORD_ENV: str(record)}), tmp_path / "proxy.log"
    )
    first, second, third, later = copy_args(), copy_args(), copy_args(), copy_args()
    try:
        await proxy.initialize()
        # One write: the proxy reads the three lines before the first call can be decided.
        await proxy.write_line(
            "\n".join(
                json.dumps(tools_call(request_id, arguments))
                for request_id, arguments in ((7, first), (7, second), ("7", third))
            )
        )
        received = [await proxy.receive() for _ in range(3)]
        await proxy.send(tools_call(7, later))
        again = await proxy.answer_to(7)
    finally:
        status = await proxy.close()

    refusals = [a for a in received if "error" in a]
    results = [a for a in received if "result" in a]
    assert sorted(str(r["id"]) for r in refusals) == ["7", "7"]
    assert {type(r["id"]) for r in refusals} == {int, str}
    for refusal in refusals:
        assert refusal["error"]["code"] == -32600
        assert "is already in use" in refusal["error"]["message"]
    (result,) = results
    assert result["id"] == 7
    assert answers(result, first)
    assert answers(again, later)
    assert [c["arguments"] for c in calls(record)] == [first, later]
    logged = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    decided = [record for record in logged if record["event"] == "decision"]
    assert len(decided) == 2, decided
    assert status == 0


async def test_an_id_the_server_may_still_answer_stays_in_use(tmp_path: Path) -> None:
    """A call that timed out upstream keeps its id: the server may still answer it, and
    that answer must never be taken for a new call's."""
    record = tmp_path / "calls.jsonl"
    args = [*embedded_args(tmp_path, proxy_policy(tmp_path)), "--upstream-timeout", "0.5"]
    proxy = await RawProxy.start(
        [*args, "--", *FIXTURE],
        clean_env(**{RECORD_ENV: str(record), MODE_ENV: "hang"}),
        tmp_path / "proxy.log",
    )
    try:
        await proxy.initialize()
        await proxy.send(tools_call(5, copy_args()))
        timed_out = await proxy.answer_to(5)
        await proxy.send(tools_call(5, copy_args()))
        again = await proxy.answer_to(5)
        pinged = await proxy.request("ping")
    finally:
        await proxy.close()

    assert timed_out["error"]["code"] == -32001
    assert again["error"]["code"] == -32600
    assert "request id 5 is already in use" in again["error"]["message"]
    assert pinged["result"] == {}
    assert len(calls(record)) == 1


# -- the command line ---------------------------------------------------------------------------


async def test_the_command_takes_the_session_flags(tmp_path: Path) -> None:
    args = embedded_args(tmp_path, proxy_policy(tmp_path))
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "proxy",
        *args,
        "--listen",
        "127.0.0.1:0",
        "--max-sessions-per-principal",
        "1",
        "--max-sessions",
        "5",
        "--session-idle-timeout",
        "600",
        "--",
        *FIXTURE,
        stdout=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=str(PROJECT_ROOT),
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert "MCP on http://127.0.0.1:" in line, line
        url = line.split("MCP on ", 1)[1].split(" ", 1)[0]
        async with httpx.AsyncClient(timeout=30) as raw:
            first = await open_session(raw, url)
            over = await open_session(raw, url)
    finally:
        proc.terminate()
        status = await asyncio.wait_for(proc.wait(), 30)

    assert first.status_code == 200
    assert_cap(over, 1)
    assert "600 s" in over.json()["error"]["message"]
    assert status == 0


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--max-sessions-per-principal", "0"], "at least 1"),
        (["--max-sessions", "-3"], "at least 1"),
        (["--session-idle-timeout", "0"], "more than 0 seconds"),
        (["--session-idle-timeout", "inf"], "more than 0 seconds"),
        (["--session-idle-timeout", "nan"], "more than 0 seconds"),
    ],
)
async def test_bad_session_flags_are_refused(flags: list[str], problem: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "proxy",
        "--decision-url",
        "127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        *flags,
        "--",
        *FIXTURE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=str(PROJECT_ROOT),
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)

    assert proc.returncode == 2
    assert problem in stderr.decode()


async def test_session_flags_go_with_listen() -> None:
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "proxy",
        "--decision-url",
        "127.0.0.1:1",
        "--max-sessions-per-principal",
        "4",
        "--",
        *FIXTURE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=str(PROJECT_ROOT),
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)

    assert proc.returncode == 2
    assert "go with --listen" in stderr.decode()
