"""The approvals console as an attacker finds it: httpx against a real `mcp-policy serve`.

Signed out nothing but the sign-in page and the static files answers; only approvers'
secrets sign in (never an agent's key, a proxy's token, the operator-only token, a revoked
entry); the session cookie is HttpOnly, SameSite=Strict, Secure under TLS, rotated at
sign-in, expiring, and ended server-side at sign-out; every POST needs the session's CSRF
token; what callers sent is shown as text; hostile ids answer 404 like unknown ones; the
event stream carries only what the person may view. Assertions: no 5xx, nothing decided
that should not be, nothing leaked.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from engine.identity import revoke_entry
from tests.conftest import VALKEY, approval_call
from tests.console_world import (
    OPERATOR_TOKEN,
    OWN_TOOL,
    PROBE_REASON,
    PROBE_TOOL,
    Console,
    World,
    form_token,
    start_world,
)
from tests.processes import Serve

COOKIE = "mcp_policy_console"
SIGN_IN = "/console/sign-in"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    found = start_world(tmp_path_factory.mktemp("console"))
    yield found
    found.serve.stop()


@pytest.fixture
def alice(world: World) -> Iterator[Console]:
    with Console(world.url) as console:
        assert console.sign_in(world.approvers["alice"]).status_code == 303
        yield console


def status_of(world: World, approval_id: str) -> str:
    """The approval's status as the API reports it (to alice)."""
    response = httpx.get(
        f"{world.url}/v1/approvals/{approval_id}",
        headers={"Authorization": f"Bearer {world.approvers['alice']}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """The response's Set-Cookie headers by cookie name."""
    out = {}
    for header in response.headers.get_list("set-cookie"):
        out[header.split("=", 1)[0]] = header
    return out


def plant(console: Console, session_id: str) -> None:
    """Make `console` send `session_id` as its session cookie (and no other)."""
    console.http.cookies.clear()
    console.http.cookies.set(COOKIE, session_id, domain="127.0.0.1", path="/console")


def problem(response: httpx.Response) -> str:
    match = re.search(r'id="(?:problem|sign-in-error)">(.*?)</p>', response.text, re.S)
    assert match is not None, response.text[:3000]
    return match.group(1)


# -- signed out ---------------------------------------------------------------------------


def test_every_console_route_signed_out_goes_to_sign_in(world: World) -> None:
    _, approval_id = world.pending_approval()
    with Console(world.url) as anonymous:
        for path in (
            "/console",
            "/console/",
            "/console/history",
            "/console/history?status=pending",
            f"/console/approvals/{approval_id}",
            "/console/approvals/unknown",
            "/console/events",
            "/console/no-such-page",
        ):
            response = anonymous.http.get(path)
            assert response.status_code == 303, (path, response.text)
            assert response.headers["location"].startswith(SIGN_IN), path
        for path in (
            f"/console/approvals/{approval_id}/approve",
            f"/console/approvals/{approval_id}/deny",
            "/console/sign-out",
        ):
            response = anonymous.post(path, comment="let it through")
            assert response.status_code == 303, (path, response.text)
            assert response.headers["location"] == SIGN_IN
        scripted = anonymous.http.get("/console", headers={"Accept": "application/json"})
        assert scripted.status_code == 401
        assert anonymous.http.get(SIGN_IN).status_code == 200
        for asset in ("/console/static/console.css", "/console/static/console.js"):
            assert anonymous.http.get(asset).status_code == 200, asset
    assert status_of(world, approval_id) == "pending", "nothing was decided signed out"


def test_the_sign_in_redirect_stays_on_the_console(world: World) -> None:
    """The page asked for before sign-in is where the browser goes after, but only a
    console path on this site: never another host (an open redirect)."""
    secret = world.approvers["alice"]
    for hostile in (
        "//evil.example/console",
        "https://evil.example/console",
        "/\\evil.example",
        "/console/../v1/status",
        "/console//evil.example",
        "/console/%2e%2e/v1/status",
        "javascript:alert(1)",
        "/console\r\nSet-Cookie: x=1",
    ):
        with Console(world.url) as console:
            response = console.sign_in(secret, next_url=hostile)
            assert response.status_code == 303, hostile
            assert response.headers["location"] == "/console", hostile
    with Console(world.url) as console:
        response = console.sign_in(secret, next_url="/console/history?status=denied")
        assert response.headers["location"] == "/console/history?status=denied"


# -- who may sign in ------------------------------------------------------------------------


def test_only_approver_secrets_sign_in(world: World) -> None:
    revoked = world.approvers["rex"]
    revoke_entry(world.approvers_file, "rex")
    refused = {
        "a wrong secret": "mcpa_" + "x" * 43,
        "an agent's API key": world.agent_key,
        "a proxy's client token": world.client_token,
        "the operator-only token": OPERATOR_TOKEN,
        "a revoked approver": revoked,
        "a JWT-shaped string": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
    }
    for what, secret in refused.items():
        with Console(world.url) as console:
            response = console.sign_in(secret)
            assert response.status_code in (401, 403), (what, response.status_code)
            assert COOKIE not in set_cookies(response), what
            assert console.session_cookie is None, what
            assert "not an approver" in problem(response) or "operator" in problem(response), what
            assert secret not in response.text, f"{what}: the secret is never echoed"
            assert console.http.get("/console").status_code == 303, what
    with Console(world.url) as console:
        assert console.sign_in(world.approvers["alice"]).status_code == 303


def test_the_sign_in_form_needs_its_own_token(world: World) -> None:
    """Login CSRF: a form posted without the token its page set (or with another) signs
    nobody in."""
    secret = world.approvers["alice"]
    with Console(world.url) as console:
        page = console.http.get(SIGN_IN)
        token = form_token(page.text)
        for form in (
            {"secret": secret},
            {"secret": secret, "csrf_token": ""},
            {"secret": secret, "csrf_token": token + "x"},
        ):
            response = console.http.post(SIGN_IN, data=form)
            assert response.status_code == 403, form
            assert console.session_cookie is None
        console.http.cookies.clear()
        response = console.http.post(SIGN_IN, data={"secret": secret, "csrf_token": token})
        assert response.status_code == 403, "the token without its cookie is worth nothing"
        assert console.session_cookie is None


def test_cookie_flags_and_security_headers(world: World) -> None:
    with Console(world.url) as console:
        page = console.http.get(SIGN_IN)
        pre = set_cookies(page)["mcp_policy_console_pre"].lower()
        assert "httponly" in pre and "samesite=strict" in pre and "path=/console" in pre
        response = console.sign_in(world.approvers["alice"])
        cookie = set_cookies(response)[COOKIE]
        flags = [part.strip().lower() for part in cookie.split(";")]
        assert "httponly" in flags
        assert "samesite=strict" in flags
        assert "path=/console" in flags
        assert "secure" not in flags, "plain HTTP on loopback: a Secure cookie would be lost"
        home = console.http.get("/console")
        csp = home.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert home.headers["x-frame-options"] == "DENY"
        assert home.headers["cache-control"] == "no-store"
        assert "unsafe-inline" not in csp


def test_the_session_id_is_rotated_at_sign_in(world: World) -> None:
    """A session id planted before sign-in (fixation) or held from a previous sign-in is
    never the one that is signed in."""
    with Console(world.url) as console:
        plant(console, "planted-by-an-attacker")
        console.sign_in(world.approvers["alice"])
        first = console.session_cookie
        assert first is not None and first != "planted-by-an-attacker"
        console.sign_in(world.approvers["alice"])
        second = console.session_cookie
        assert second is not None and second != first
        assert console.http.get("/console").status_code == 200
    with Console(world.url) as replay:
        plant(replay, first)
        assert replay.http.get("/console").status_code == 303, "the old id ended at sign-in"
        plant(replay, "planted-by-an-attacker")
        assert replay.http.get("/console").status_code == 303


def test_sign_out_ends_the_session_server_side(world: World, alice: Console) -> None:
    cookie = alice.session_cookie
    assert cookie is not None
    refused = alice.post("/console/sign-out", csrf_token="wrong")
    assert refused.status_code == 403
    assert alice.http.get("/console").status_code == 200, "a refused sign-out changes nothing"
    response = alice.post("/console/sign-out")
    assert response.status_code == 303
    assert response.headers["location"] == SIGN_IN
    with Console(world.url) as replay:
        plant(replay, cookie)
        assert replay.http.get("/console").status_code == 303, "the cookie names nothing now"
        assert replay.http.get("/console/events").status_code == 303


def test_a_revoked_approver_is_signed_out(tmp_path: Path) -> None:
    """A session lasts only as long as the approvers-file entry that opened it."""
    world = start_world(tmp_path)
    try:
        with Console(world.url) as rex:
            assert rex.sign_in(world.approvers["rex"]).status_code == 303
            assert rex.http.get("/console").status_code == 200
            revoke_entry(world.approvers_file, "rex")
            deadline = time.monotonic() + 10
            while rex.http.get("/console").status_code == 200:
                assert time.monotonic() < deadline, "rex's session outlived his entry"
                time.sleep(0.2)
            assert rex.http.get("/console").status_code == 303
    finally:
        world.serve.stop()


# -- CSRF ---------------------------------------------------------------------------------


def test_a_post_without_the_sessions_csrf_token_changes_nothing(world: World) -> None:
    with Console(world.url) as alice, Console(world.url) as other:
        alice.sign_in(world.approvers["alice"])
        other.sign_in(world.approvers["alice"])
        assert other.csrf != alice.csrf
        _, approval_id = world.pending_approval()
        path = f"/console/approvals/{approval_id}/approve"
        for token in (None, "", "x", alice.csrf + "x", alice.csrf[:-1], other.csrf):
            form = {"comment": "yes"} if token is None else {"comment": "yes", "csrf_token": token}
            response = alice.http.post(path, data=form)
            assert response.status_code == 403, token
            assert "CSRF" in problem(response)
            response = alice.http.post(
                path.replace("approve", "deny"),
                data={"comment": "no"},
                headers={"X-CSRF-Token": token or "", "Accept": "application/json"},
            )
            assert response.status_code == 403, token
            assert "CSRF" in response.json()["error"]["message"]
        assert status_of(world, approval_id) == "pending"
        assert alice.post(path).status_code == 303
        assert status_of(world, approval_id) == "approved"


def test_cross_site_posts_are_refused_by_the_guard(world: World, alice: Console) -> None:
    """The service's Origin rule runs before the console: a page on another site cannot
    post a form here, even with a token it stole."""
    _, approval_id = world.pending_approval()
    response = alice.http.post(
        f"/console/approvals/{approval_id}/approve",
        data={"csrf_token": alice.csrf},
        headers={"Origin": "http://evil.example"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "OriginNotAllowed"
    assert status_of(world, approval_id) == "pending"


def test_hostile_forms_are_refused_cleanly(world: World, alice: Console) -> None:
    _, approval_id = world.pending_approval()
    path = f"/console/approvals/{approval_id}/deny"
    token = alice.csrf
    cases: list[tuple[dict[str, Any], int]] = [
        ({"content": b"csrf_token=" + token.encode() + b"&comment=" + b"x" * 20_000}, 413),
        ({"json": {"csrf_token": token}}, 415),
        ({"content": b"csrf_token=" + token.encode() + b"&comment=%ff%fe"}, 400),
        ({"content": f"csrf_token={token}&csrf_token={token}".encode()}, 400),
        ({"content": b"&".join(b"f%d=1" % i for i in range(40))}, 400),
        ({"data": {"csrf_token": token, "comment": "x" * 5000}}, 422),
    ]
    for kwargs, expected in cases:
        headers = {}
        if "content" in kwargs:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        response = alice.http.post(path, headers=headers, **kwargs)
        assert response.status_code == expected, (str(kwargs)[:80], response.text[:500])
    assert status_of(world, approval_id) == "pending"


# -- what is shown ------------------------------------------------------------------------


def test_caller_text_is_shown_as_text(world: World, alice: Console) -> None:
    """Markup in arguments, in the policy's reason and in a comment is escaped on every
    page and in the event stream's cards."""
    script = "<script>alert('x')</script>"
    call = world.agent_call(PROBE_TOOL, note=script, **{script: "<img src=x onerror=alert(1)>"})
    call["principal"]["session_id"] = "s-<b>bold</b>"
    _, approval_id = world.pending_approval(call)
    denied = alice.post(f"/console/approvals/{approval_id}/deny", comment=script)
    assert denied.status_code == 303
    pages = {
        "approval": alice.http.get(f"/console/approvals/{approval_id}"),
        "history": alice.http.get("/console/history"),
    }
    _, pending_id = world.pending_approval(world.agent_call(PROBE_TOOL, note=script))
    pages["pending"] = alice.http.get("/console")
    for name, response in pages.items():
        assert response.status_code == 200, name
        assert "<script>" not in response.text.replace('<script src="/console/static/', ""), name
        assert "<img" not in response.text, name
        assert "<b>bold" not in response.text, name
    approval = pages["approval"].text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in approval
    assert "&lt;script&gt;alert(&#39;reason&#39;)&lt;/script&gt;" in approval
    assert PROBE_REASON not in approval
    assert pending_id in pages["pending"].text


def test_hostile_ids_answer_like_unknown_ones(world: World) -> None:
    """An id nobody has, one this approver may not view, and ids made to break things:
    the same 404 and the same words, never a 5xx."""
    with Console(world.url) as carol:  # only the valkey server's calls
        carol.sign_in(world.approvers["carol"])
        _, foreign = world.pending_approval()  # healthimaging: not carol's to view
        unknown = carol.http.get("/console/approvals/apr_0000")
        assert unknown.status_code == 404
        words = problem(unknown)
        for hostile in (
            foreign,
            "apr_" + "9" * 300,
            "%00",
            "..%2F..%2Fv1%2Fstatus",
            "<script>alert(1)<%2Fscript>",
            "apr_%E2%80%AE%00",
            "' OR 1=1 --",
            "%ff%fe",
            "💥" * 70,
        ):
            response = carol.http.get(f"/console/approvals/{hostile}")
            assert response.status_code == 404, (hostile, response.status_code)
            if "%2F" not in hostile:  # (with slashes it is no approval's path at all)
                assert problem(response) == words, hostile
            for verb in ("approve", "deny"):
                decided = carol.post(f"/console/approvals/{hostile}/{verb}")
                assert decided.status_code in (403, 404), (hostile, verb, decided.status_code)
        assert status_of(world, foreign) == "pending"
        listed = carol.http.get("/console")
        assert foreign not in listed.text
        assert carol.http.get("/console/history?page=not-a-token").status_code == 400
        assert carol.http.get("/console/history?status=maybe").status_code == 400
        assert carol.http.get("/console/history?since=yesterday").status_code == 400
        assert carol.http.get("/console/history?page=" + "A" * 400).status_code == 400


def test_four_eyes_hold_in_the_console(world: World) -> None:
    """uma is the user of the test calls: she does not see them and cannot decide them."""
    call, approval_id = world.pending_approval()
    with Console(world.url) as uma:
        uma.sign_in(world.approvers["uma"])
        assert approval_id not in uma.http.get("/console").text
        assert uma.http.get(f"/console/approvals/{approval_id}").status_code == 404
        for verb in ("approve", "deny"):
            response = uma.post(f"/console/approvals/{approval_id}/{verb}")
            assert response.status_code == 403
            assert "own behalf" in problem(response)
    assert status_of(world, approval_id) == "pending"
    assert world.decide(call)["verdict"] == "approval_required"


def test_the_callers_own_user_decides_only_what_policy_lets_her(world: World) -> None:
    """kim is the user behind AGENT: she may approve its OWN_TOOL call (by: caller, her
    user proven by the agent's key), not its other calls, which need another approver."""
    own_call, own_id = world.pending_approval(world.agent_call(OWN_TOOL))
    _, other_id = world.pending_approval(world.agent_call(PROBE_TOOL))
    with Console(world.url) as kim:
        kim.sign_in(world.approvers["kim"])
        home = kim.http.get("/console").text
        assert own_id in home and other_id not in home
        assert kim.post(f"/console/approvals/{other_id}/approve").status_code == 403
        assert kim.post(f"/console/approvals/{own_id}/approve").status_code == 303
    assert status_of(world, other_id) == "pending"
    assert world.decide(own_call)["verdict"] == "allow"


def test_approving_twice_is_a_conflict(world: World, alice: Console) -> None:
    call, approval_id = world.pending_approval()
    assert alice.post(f"/console/approvals/{approval_id}/approve").status_code == 303
    for verb in ("approve", "deny"):
        again = alice.post(f"/console/approvals/{approval_id}/{verb}")
        assert again.status_code == 409, verb
        assert "not pending" in problem(again)
    assert world.decide(call)["verdict"] == "allow"
    assert world.decide(call)["verdict"] == "approval_required", "the grant lets one call through"


def test_the_approval_page_tells_the_whole_story(world: World, alice: Console) -> None:
    call, approval_id = world.pending_approval()
    alice.post(f"/console/approvals/{approval_id}/approve", comment="looks right")
    used = world.decide(call)
    assert used["verdict"] == "allow"
    page = alice.http.get(f"/console/approvals/{approval_id}")
    assert page.status_code == 200
    text = page.text
    assert "used" in text and "alice" in text and "looks right" in text
    assert used["decision_id"] in text, "the decision that used the grant is named"
    session_id = call["principal"]["session_id"]
    assert f"Recent decisions of session <code>{session_id}</code>" in text
    assert text.count('class="this"') >= 1


def test_history_filters(world: World, alice: Console) -> None:
    valkey_call = {**approval_call(), "server": VALKEY}
    _, valkey_id = world.pending_approval(valkey_call)
    _, other_id = world.pending_approval()
    by_server = alice.http.get("/console/history", params={"server": VALKEY}).text
    assert valkey_id in by_server and other_id not in by_server
    agent = valkey_call["principal"]["agent_id"]
    by_agent = alice.http.get("/console/history", params={"agent": agent}).text
    assert valkey_id in by_agent and other_id not in by_agent
    denied = alice.http.get("/console/history", params={"status": "denied"}).text
    assert valkey_id not in denied
    future = alice.http.get("/console/history", params={"since": "2999-01-01T00:00"}).text
    assert valkey_id not in future and "No approvals match" in future
    past = alice.http.get("/console/history", params={"until": "2000-01-01T00:00"}).text
    assert valkey_id not in past


# -- the event stream -----------------------------------------------------------------------


def read_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])
            event = "message"


def test_the_event_stream_carries_only_what_the_person_may_view(world: World) -> None:
    with Console(world.url) as carol:
        carol.sign_in(world.approvers["carol"])
        with carol.http.stream("GET", "/console/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = read_events(stream)
            assert next(events)[0] == "hello"
            _, hidden = world.pending_approval()  # healthimaging: not carol's
            _, shown = world.pending_approval({**approval_call(), "server": VALKEY})
            seen = []
            for kind, data in events:
                assert kind == "approval", kind
                seen.append(data["id"])
                if data["id"] == shown:
                    assert data["type"] == "approval.requested"
                    assert "<script" not in data["html"]
                    break
            assert hidden not in seen


def test_the_event_stream_ends_at_sign_out_and_is_capped(world: World) -> None:
    with Console(world.url) as alice, contextlib.ExitStack() as streams:
        alice.sign_in(world.approvers["alice"])
        opened = [
            streams.enter_context(alice.http.stream("GET", "/console/events")) for _ in range(4)
        ]
        assert all(s.status_code == 200 for s in opened)
        one_more = alice.http.get("/console/events")
        assert one_more.status_code == 429
        first = read_events(opened[0])
        assert next(first)[0] == "hello"
        with Console(world.url) as other:
            plant(other, alice.session_cookie or "")
            other.csrf = alice.csrf
            assert other.post("/console/sign-out").status_code == 303
        kinds = [kind for kind, _ in first]  # the stream ends: the loop finishes
        assert kinds[-1] == "signed-out"


# -- expiry, single-token mode, TLS -----------------------------------------------------------


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, ssl.SSLContext]]:
    """Single-token mode (the operator token is the approver) over TLS, with sessions
    that last 2 s idle and 10 s at most."""
    tmp = tmp_path_factory.mktemp("console-short")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    serve = Serve(
        tmp,
        [],
        {
            "MCP_POLICY_APPROVER_TOKEN": OPERATOR_TOKEN,
            "MCP_POLICY_TLS_CERT": str(cert_path),
            "MCP_POLICY_TLS_KEY": str(key_path),
            "MCP_POLICY_CONSOLE_SESSION_IDLE_SECONDS": "2",
            "MCP_POLICY_CONSOLE_SESSION_MAX_SECONDS": "10",
        },
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    yield serve, context
    serve.stop()


def tls_console(serve: Serve, context: ssl.SSLContext) -> Console:
    console = Console(f"https://127.0.0.1:{serve.http_port}")
    console.http = httpx.Client(
        base_url=f"https://127.0.0.1:{serve.http_port}",
        verify=context,
        timeout=30,
        follow_redirects=False,
    )
    return console


def test_single_token_mode_signs_the_operator_in_with_a_secure_cookie(
    short: tuple[Serve, ssl.SSLContext],
) -> None:
    with tls_console(*short) as console:
        response = console.sign_in(OPERATOR_TOKEN)
        assert response.status_code == 303
        flags = [p.strip().lower() for p in set_cookies(response)[COOKIE].split(";")]
        assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags
        assert "operator" in console.http.get("/console").text


def test_sessions_expire_when_idle_and_at_their_age(short: tuple[Serve, ssl.SSLContext]) -> None:
    with tls_console(*short) as idle:
        idle.sign_in(OPERATOR_TOKEN)
        time.sleep(2.5)
        assert idle.http.get("/console").status_code == 303, "idle past 2 s: signed out"
    with tls_console(*short) as busy:
        busy.sign_in(OPERATOR_TOKEN)
        for _ in range(3):  # 3 s of activity: past the idle limit, still signed in
            time.sleep(1)
            assert busy.http.get("/console").status_code == 200
        deadline = time.monotonic() + 30
        while busy.http.get("/console").status_code == 200:
            assert time.monotonic() < deadline, "the session outlived its age"
            time.sleep(0.5)
        assert busy.http.get("/console").status_code == 303


def test_an_open_event_stream_neither_keeps_a_session_alive_nor_outlives_it(
    short: tuple[Serve, ssl.SSLContext],
) -> None:
    """The live stream (and its reconnections) is not the person's activity: the session
    still goes idle, and the stream ends then with a signed-out event."""
    with tls_console(*short) as console:
        console.sign_in(OPERATOR_TOKEN)
        with console.http.stream("GET", "/console/events") as stream:
            kinds = [kind for kind, _ in read_events(stream)]
        assert kinds[0] == "hello" and kinds[-1] == "signed-out"
        assert console.http.get("/console/events").status_code == 303
        assert console.http.get("/console").status_code == 303


def test_behind_a_gateway_path_links_and_cookies_carry_it(tmp_path: Path) -> None:
    """With public_url https://gw.example.test/policy (a gateway serving the service under
    /policy, stripping it), every link, redirect and cookie path the browser sees starts
    with /policy/console."""
    serve = Serve(
        tmp_path,
        [],
        {
            "MCP_POLICY_APPROVER_TOKEN": OPERATOR_TOKEN,
            "MCP_POLICY_PUBLIC_URL": "https://gw.example.test/policy",
        },
    )
    try:
        with httpx.Client(base_url=serve.url, timeout=30) as http:
            signed_out = http.get("/console/history")
            assert signed_out.status_code == 303
            assert signed_out.headers["location"] == (
                "/policy/console/sign-in?next=%2Fpolicy%2Fconsole%2Fhistory"
            )
            page = http.get("/console/sign-in")
            assert 'href="/policy/console/static/console.css"' in page.text
            assert 'action="/policy/console/sign-in"' in page.text
            assert "path=/policy/console" in set_cookies(page)["mcp_policy_console_pre"].lower()
            form = {
                "csrf_token": form_token(page.text),
                "secret": OPERATOR_TOKEN,
                "next": "/policy/console/history",
            }
            # (the gateway would send it to /policy/console: here it goes by hand)
            pre = page.cookies["mcp_policy_console_pre"]
            signed_in = http.post(
                "/console/sign-in",
                data=form,
                headers={"Cookie": f"mcp_policy_console_pre={pre}"},
            )
            assert signed_in.status_code == 303
            assert signed_in.headers["location"] == "/policy/console/history"
            assert "path=/policy/console" in set_cookies(signed_in)[COOKIE].lower()
    finally:
        serve.stop()
