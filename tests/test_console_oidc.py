"""Signing in to the approvals console through a real OpenID Provider.

The Provider is the certified `oidc-provider` (tests/oidc/provider.mjs, tests/oidc_provider.py)
on loopback; the console is the real service's. In a real Chromium: the approver (alice,
role "approver") signs in and approves; the plain user (bob, no role, the proven user
behind agent-b) signs in and may decide only his own agent's call the policy lets the
caller approve, never someone else's, never an approvers-only one, never one whose user
was merely asserted. Without a browser, as an attacker: forged, missing and replayed
state, a replayed code, the Provider's error, an ID token with a wrong nonce, for another
client or signed by someone else, a broken token endpoint, the Provider down. Every
refusal is the sign-in page with a message, 4xx (503 for an unreachable Provider), and
no session.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from engine.console.oidc import OidcSignIn
from engine.console.session import COOKIE, LOGIN_COOKIE
from engine.identity import add_entry
from engine.policy.opa_process import free_loopback_port
from engine.settings import Settings
from tests.browser import chromium, screenshot, wait_for
from tests.conftest import (
    APPROVER_TOKEN,
    DATASTORE,
    HEALTHIMAGING,
    IMAGE_SET,
    add_tools,
    approval_call,
    copy_policy,
    session,
)
from tests.oidc_provider import (
    APPROVER,
    CLIENT_ID,
    OTHER_CLIENT_ID,
    USER,
    OpenIdProvider,
    abort_at_provider,
    log_in,
    tokens_for,
)
from tests.processes import Serve

# A tool whose calls the caller may approve (approval: {by: caller}).
OWN_TOOL = "update_image_set_metadata"
APPROVALS_AUDIENCE = "mcp-policy-approvals"  # approver JWTs' audience (unused here)


@dataclass
class Site:
    """A service (`mcp-policy serve`, a process of its own: the browser's requests must not
    wait for the test's event loop) whose console signs people in at `op`; agents with
    API keys: agent-a (user ann) and agent-b (user bob, who is also "bob" at the
    Provider)."""

    serve: Serve
    op: OpenIdProvider
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.serve.url

    @property
    def callback(self) -> str:
        return f"{self.url}/console/oidc/callback"

    def stop(self) -> None:
        try:
            self.serve.stop()
        finally:
            self.op.stop()


def _policy(tmp: Path) -> list[Path]:
    rego, data = copy_policy(tmp)
    add_tools(
        data,
        catalog=[
            {"server": HEALTHIMAGING, "tool": OWN_TOOL, "category": "write", "risk": "medium"}
        ],
        rules={OWN_TOOL: {"action": "require_approval", "approval": {"by": "caller"}}},
    )
    return [rego, data]


def service(
    tmp: Path, issuer: str, keys_file: Path | None = None, client_secret: str | None = None
) -> Serve:
    """`mcp-policy serve` with OpenID Connect sign-in at `issuer` for the console."""
    env = {
        "MCP_POLICY_APPROVER_TOKEN": APPROVER_TOKEN,
        "MCP_POLICY_APPROVER_ISSUER": issuer,
        "MCP_POLICY_APPROVER_AUDIENCE": APPROVALS_AUDIENCE,
        "MCP_POLICY_CONSOLE_OIDC_CLIENT_ID": CLIENT_ID,
        "MCP_POLICY_APPROVAL_MAX_PENDING_PER_AGENT": "100000",
        "MCP_POLICY_APPROVAL_MAX_PENDING_PER_SESSION": "100000",
    }
    if keys_file is not None:
        env["MCP_POLICY_AGENT_KEYS_FILE"] = str(keys_file)
    if client_secret is not None:
        env["MCP_POLICY_CONSOLE_OIDC_CLIENT_SECRET"] = client_secret
    return Serve(tmp, _policy(tmp), env)


def start_site(tmp: Path, client_secret: str | None = None, **op_options: Any) -> Site:
    """The service, told where the Provider will listen, then the Provider (which needs
    the console's redirect URI, hence the service's port, first)."""
    keys_file = tmp / "keys.yaml"
    keys = {
        agent: add_entry(keys_file, "api_key", agent, agent_id=agent, user_id=user)
        for agent, user in (("agent-a", "ann"), ("agent-b", USER))
    }
    op_port = free_loopback_port()
    serve = service(tmp, f"http://127.0.0.1:{op_port}", keys_file, client_secret)
    try:
        op = OpenIdProvider(
            [f"{serve.url}/console/oidc/callback"],
            port=op_port,
            client_secret=client_secret,
            **op_options,
        )
    except BaseException:
        serve.stop()
        raise
    return Site(serve, op, keys)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    running = start_site(tmp_path_factory.mktemp("oidc"))
    yield running
    running.stop()


@pytest.fixture
def chrome() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


# -- calls that need approval ---------------------------------------------------------------


async def _ask(site: Site, call: dict[str, Any]) -> tuple[dict[str, Any], str]:
    async with httpx.AsyncClient(base_url=site.url, timeout=30) as api:
        answer = await api.post("/v1/decide", json=call)
    assert answer.status_code == 200, answer.text
    decision: dict[str, Any] = answer.json()
    assert decision["verdict"] == "approval_required", decision
    return call, str(decision["approval"]["id"])


async def _verdict(site: Site, call: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=site.url, timeout=30) as api:
        answer = await api.post("/v1/decide", json=call)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["verdict"])


async def _status(site: Site, approval_id: str) -> str:
    async with httpx.AsyncClient(base_url=site.url, timeout=30) as api:
        answer = await api.get(
            f"/v1/approvals/{approval_id}", headers={"Authorization": f"Bearer {APPROVER_TOKEN}"}
        )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["status"])


def own_call(site: Site, agent: str) -> dict[str, Any]:
    """A call of OWN_TOOL (approvable by its proven user), proven by the agent's key."""
    return {
        "server": HEALTHIMAGING,
        "tool": OWN_TOOL,
        "arguments": {"datastore_id": DATASTORE, "image_set_id": IMAGE_SET},
        "principal": {"session_id": session()},
        "credential": site.keys[agent],
    }


def approvers_only_call(site: Site, agent: str) -> dict[str, Any]:
    """A call only an approver may approve (four eyes), proven by the agent's key."""
    return {
        **approval_call(),
        "principal": {"session_id": session()},
        "credential": site.keys[agent],
    }


# -- in a real browser -------------------------------------------------------------------------


def sign_in_with_provider(
    driver: WebDriver, site: Site, login: str, start: str, shots: Path | None = None
) -> None:
    """Open `start` signed out, take the console's "Sign in with <issuer>" button, and log
    in at the Provider's form as `login` (screenshots of both pages into `shots`)."""
    driver.get(site.url + start)
    button = wait_for(driver, lambda d: d.find_elements(By.ID, "oidc-sign-in"))[0]
    assert button.text == f"Sign in with {site.op.issuer}"
    if shots is not None:
        screenshot(driver, shots / "oidc-sign-in.png")
    button.click()
    wait_for(driver, lambda d: d.current_url.startswith(site.op.issuer))
    if shots is not None:
        screenshot(driver, shots / "oidc-provider-login.png")
    driver.find_element(By.NAME, "login").send_keys(login)
    driver.find_element(By.NAME, "password").send_keys("any password")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(driver, lambda d: d.current_url.startswith(site.url + "/console"))
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "header .me"))
    assert driver.find_element(By.CSS_SELECTOR, "header .me").text == login


def click_decide(driver: WebDriver, approval_id: str, verb: str) -> None:
    """Click the card's approve or deny button; wait until the page shows it decided (on
    the pending list the card leaves, on its own page its status changes)."""
    card = driver.find_element(By.ID, f"approval-{approval_id}")
    card.find_element(By.CSS_SELECTOR, f"button.{verb}").click()

    def decided(d: WebDriver) -> bool:
        try:
            cards = d.find_elements(By.ID, f"approval-{approval_id}")
            return not cards or cards[0].get_attribute("data-status") != "pending"
        except StaleElementReferenceException:
            return False

    wait_for(driver, decided)


def post_from_page(driver: WebDriver, path: str) -> int:
    """POST from the signed-in page with its CSRF token (as the page's script would); the
    HTTP status."""
    status: int = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", headers: {
            "X-CSRF-Token": document.body.dataset.csrf,
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json"}, body: "comment=mine"})
          .then(r => done(r.status), () => done(-1));
        """,
        path,
    )
    return status


async def test_the_approver_signs_in_through_the_provider_and_approves(
    site: Site, chrome: WebDriver, tmp_path: Path
) -> None:
    call, approval_id = await _ask(site, approvers_only_call(site, "agent-b"))
    sign_in_with_provider(
        chrome, site, APPROVER, f"/console/approvals/{approval_id}", shots=tmp_path
    )
    assert chrome.current_url == f"{site.url}/console/approvals/{approval_id}"
    screenshot(chrome, tmp_path / "oidc-approval.png")
    click_decide(chrome, approval_id, "approve")
    assert await _status(site, approval_id) == "approved"
    assert await _verdict(site, call) == "allow"
    assert await _verdict(site, call) == "approval_required", "the grant is used once"

    chrome.get(site.url + "/console")
    wait_for(chrome, lambda d: d.find_elements(By.ID, "pending"))
    screenshot(chrome, tmp_path / "oidc-pending.png")
    cookie = chrome.get_cookie(COOKIE)
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert chrome.get_cookie(LOGIN_COOKIE) is None, "the pending sign-in is gone"


async def test_a_user_decides_only_their_own_agents_call_where_the_policy_lets_them(
    site: Site, chrome: WebDriver, tmp_path: Path
) -> None:
    mine_call, mine = await _ask(site, own_call(site, "agent-b"))
    _, anns = await _ask(site, own_call(site, "agent-a"))
    _, approvers_only = await _ask(site, approvers_only_call(site, "agent-b"))
    asserted_call = own_call(site, "agent-b")
    del asserted_call["credential"]  # bob merely claimed, not proven
    asserted_call["principal"] = {"agent_id": "agent-b", "user_id": USER, "session_id": session()}
    _, asserted = await _ask(site, asserted_call)

    sign_in_with_provider(chrome, site, USER, "/console")
    wait_for(chrome, lambda d: d.find_elements(By.ID, f"approval-{mine}"))
    shown = {e.get_attribute("data-id") for e in chrome.find_elements(By.CSS_SELECTOR, ".card")}
    assert mine in shown
    assert not shown & {anns, approvers_only, asserted}, "bob sees only his own to decide"
    screenshot(chrome, tmp_path / "oidc-caller.png")

    for other in (anns, approvers_only, asserted):
        assert post_from_page(chrome, f"/console/approvals/{other}/approve") in (403, 404)
        assert post_from_page(chrome, f"/console/approvals/{other}/deny") in (403, 404)
        chrome.get(f"{site.url}/console/approvals/{other}")
        assert "There is no approval with this id that you may view." in chrome.page_source
    for other in (anns, approvers_only, asserted):
        assert await _status(site, other) == "pending"

    chrome.get(site.url + "/console")
    wait_for(chrome, lambda d: d.find_elements(By.ID, f"approval-{mine}"))
    click_decide(chrome, mine, "approve")
    assert await _status(site, mine) == "approved"
    assert await _verdict(site, mine_call) == "allow"


# -- without a browser, as an attacker -----------------------------------------------------------


async def begin(site: Site, browser: httpx.AsyncClient, next_url: str = "/console") -> str:
    """Start a sign-in at the console: the Provider URL it sends the browser to."""
    answer = await browser.get(f"{site.url}/console/oidc/login?" + urlencode({"next": next_url}))
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert location.startswith(site.op.issuer + "/"), location
    query = parse_qs(urlsplit(location).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
    assert query["client_id"] == [CLIENT_ID] and query["nonce"] and query["state"]
    assert query["redirect_uri"] == [site.callback]
    return location


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def refused(answer: httpx.Response, status: int, words: str) -> None:
    """The sign-in page with `words`, `status`, and no session cookie set."""
    assert answer.status_code == status, answer.text
    assert 'id="sign-in-error"' in answer.text
    assert words in answer.text, answer.text
    assert not any(c.startswith(COOKIE + "=") for c in answer.headers.get_list("set-cookie"))


async def signed_out(site: Site, browser: httpx.AsyncClient) -> None:
    answer = await browser.get(f"{site.url}/console")
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/console/sign-in")


async def test_a_whole_sign_in_without_a_browser(site: Site) -> None:
    """The reference for the hostile cases below: the same steps, unaltered, sign in."""
    async with httpx.AsyncClient(timeout=30) as browser:
        back = await log_in(browser, await begin(site, browser, "/console/history"), APPROVER)
        assert back.startswith(site.callback + "?")
        assert query_of(back)["iss"] == site.op.issuer
        answer = await browser.get(back)
        assert answer.status_code == 200, answer.text
        assert 'content="0;url=/console/history"' in answer.text
        assert any(c.startswith(COOKIE + "=") for c in answer.headers.get_list("set-cookie"))
        home = await browser.get(f"{site.url}/console/history")
        assert (
            home.status_code == 200
            and f'<span class="me" title="signed in">{APPROVER}<' in home.text
        )
        metrics = (await browser.get(f"{site.url}/metrics")).text
        assert 'mcp_policy_console_sign_ins_total{method="oidc",result="signed_in"}' in metrics


async def test_a_confidential_client_signs_in_with_its_secret(tmp_path: Path) -> None:
    """With a client secret, the code exchange authenticates the console
    (client_secret_basic) as well as sending the PKCE verifier."""
    confidential = start_site(tmp_path, client_secret="console-" + secrets.token_urlsafe(16))
    try:
        async with httpx.AsyncClient(timeout=30) as browser:
            back = await log_in(browser, await begin(confidential, browser), APPROVER)
            assert (await browser.get(back)).status_code == 200
            assert (await browser.get(f"{confidential.url}/console")).status_code == 200
    finally:
        confidential.stop()


async def test_a_forged_or_missing_state_signs_nobody_in(site: Site) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        back = await log_in(browser, await begin(site, browser), APPROVER)
        params = query_of(back)
        forged = {**params, "state": secrets.token_urlsafe(32)}
        answer = await browser.get(site.callback, params=forged)
        refused(answer, 400, "state mismatch")
        await signed_out(site, browser)
        # The sign-in was taken by that answer: the genuine one cannot follow it.
        answer = await browser.get(back)
        refused(answer, 400, "No sign-in is under way")

        back = await log_in(browser, await begin(site, browser), APPROVER)
        missing = {k: v for k, v in query_of(back).items() if k != "state"}
        refused(await browser.get(site.callback, params=missing), 400, "has no state")
        await signed_out(site, browser)

        back = await log_in(browser, await begin(site, browser), APPROVER)
        twice = [*query_of(back).items(), ("state", "again")]
        refused(await browser.get(site.callback, params=twice), 400, "repeats state")
        await signed_out(site, browser)

        back = await log_in(browser, await begin(site, browser), APPROVER)
        huge = {**query_of(back), "state": "s" * 5000}
        refused(await browser.get(site.callback, params=huge), 400, "state is too long")
        await signed_out(site, browser)

        back = await log_in(browser, await begin(site, browser), APPROVER)
        no_code = {k: v for k, v in query_of(back).items() if k != "code"}
        refused(await browser.get(site.callback, params=no_code), 400, "has no code")
        await signed_out(site, browser)


async def test_an_answer_naming_another_issuer_signs_nobody_in(site: Site) -> None:
    """Mix-up (RFC 9207): the Provider names itself in `iss`; an answer naming another
    issuer, or none from this Provider that always names itself, is refused before its
    code is used."""
    async with httpx.AsyncClient(timeout=30) as browser:
        for iss in ("https://idp.attacker.example", None):
            back = await log_in(browser, await begin(site, browser), APPROVER)
            params = {k: v for k, v in query_of(back).items() if k != "iss"}
            if iss is not None:
                params["iss"] = iss
            answer = await browser.get(site.callback, params=params)
            refused(answer, 400, "does not come from the configured OpenID Provider")
            await signed_out(site, browser)


async def test_an_answer_for_another_browser_signs_nobody_in(site: Site) -> None:
    """Login CSRF: the attacker's own genuine answer, sent to a victim's browser that has
    no sign-in under way (or another one), signs the victim in as nobody."""
    async with (
        httpx.AsyncClient(timeout=30) as attacker,
        httpx.AsyncClient(timeout=30) as victim,
    ):
        back = await log_in(attacker, await begin(site, attacker), USER)
        refused(await victim.get(back), 400, "No sign-in is under way")
        await begin(site, victim)  # the victim's own sign-in, with a state of its own
        refused(await victim.get(back), 400, "state mismatch")
        await signed_out(site, victim)


async def test_a_replayed_answer_or_code_signs_nobody_in(site: Site) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        back = await log_in(browser, await begin(site, browser), APPROVER)
        first = await browser.get(back)
        assert first.status_code == 200
        session_cookie = browser.cookies.get(COOKIE)
        assert session_cookie
        replay = await browser.get(back)
        refused(replay, 400, "No sign-in is under way")
        assert browser.cookies.get(COOKIE) == session_cookie, "the replay changed nothing"

    async with httpx.AsyncClient(timeout=30) as thief:
        refused(await thief.get(back), 400, "No sign-in is under way")
        # The stolen code under a sign-in of the thief's own: the Provider refuses it (used
        # already, and not for this sign-in's PKCE verifier).
        state = query_of(await begin(site, thief))["state"]
        answer = await thief.get(site.callback, params={**query_of(back), "state": state})
        refused(answer, 400, "refused to complete the sign-in")
        await signed_out(site, thief)


async def test_the_providers_error_is_shown(site: Site) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        back = await abort_at_provider(browser, await begin(site, browser))
        assert query_of(back)["error"] == "access_denied"
        refused(await browser.get(back), 400, "access_denied")
        await signed_out(site, browser)
        refused(await browser.get(back), 400, "access_denied")


async def test_an_id_token_with_another_nonce_signs_nobody_in(site: Site) -> None:
    """Token injection: the attacker saw the victim's authorization request (its state and
    PKCE challenge) and has the Provider issue a code for it under a nonce of the
    attacker's choosing. The code exchange succeeds (the challenge is the victim's); the
    ID token's nonce is not the one the victim's sign-in sent."""
    async with (
        httpx.AsyncClient(timeout=30) as victim,
        httpx.AsyncClient(timeout=30) as attacker,
    ):
        seen = query_of(await begin(site, victim))
        injected = {**seen, "nonce": "attacker-" + secrets.token_urlsafe(8)}
        back = await log_in(attacker, f"{site.op.issuer}/auth?{urlencode(injected)}", APPROVER)
        answer = await victim.get(back)
        refused(answer, 401, "nonce")
        await signed_out(site, victim)


async def test_the_provider_down_is_a_clear_503(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    serve = service(tmp_path, dead)
    try:
        async with httpx.AsyncClient(base_url=serve.url, timeout=30) as browser:
            for _ in range(2):  # the second within the retry pause: no new attempt, same page
                answer = await browser.get("/console/oidc/login")
                refused(answer, 503, "cannot be reached")
                assert LOGIN_COOKIE not in answer.headers.get("set-cookie", "")
            answer = await browser.get("/console/sign-in")
            assert f"Sign in with {dead}" in answer.text
    finally:
        serve.stop()


# -- a token endpoint that lies -------------------------------------------------------------------


@dataclass
class Rigged:
    """A Provider whose discovery document names `TokenEndpoint` as its token endpoint
    (a stand-in between the console and the real one), and claims in userinfo."""

    site: Site
    endpoint: TokenEndpoint


@dataclass
class TokenEndpoint:
    """Relays token requests to the real Provider, or answers `answer` (status, body,
    content type) instead; `hang_up` closes the connection without an answer."""

    upstream: str = ""
    answer: tuple[int, str, str] | None = None
    hang_up: bool = False
    access_token: str | None = None  # relay, with this access token in the answer instead
    requests: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(form)
        if self.hang_up:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)
        if self.answer is not None:
            status, body, content_type = self.answer
            return web.Response(status=status, text=body, content_type=content_type)
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        async with httpx.AsyncClient(timeout=30) as client:
            real = await client.post(self.upstream, data=form, headers=headers)
        body = real.content
        if self.access_token is not None and real.status_code == 200:
            body = json.dumps({**real.json(), "access_token": self.access_token}).encode()
        return web.Response(status=real.status_code, body=body, content_type="application/json")


@pytest.fixture(scope="module")
async def rigged(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rigged]:
    endpoint = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/token", endpoint.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_loopback_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        running = start_site(
            tmp_path_factory.mktemp("rigged"),
            claims_in="userinfo",
            advertised_token_endpoint=f"http://127.0.0.1:{port}/token",
        )
        endpoint.upstream = f"{running.op.issuer}/token"
        try:
            yield Rigged(running, endpoint)
        finally:
            running.stop()
    finally:
        await runner.cleanup()


@pytest.fixture
def endpoint(rigged: Rigged) -> Iterator[TokenEndpoint]:
    yield rigged.endpoint
    rigged.endpoint.answer, rigged.endpoint.hang_up = None, False
    rigged.endpoint.access_token = None


async def test_roles_from_userinfo_make_an_approver(
    rigged: Rigged, endpoint: TokenEndpoint
) -> None:
    """A Provider that puts only sub in the ID token (its conformIdTokenClaims): the role
    claim is read from userinfo; alice may see an approvers-only call there, bob may not."""
    site = rigged.site
    _, approval_id = await _ask(site, approvers_only_call(site, "agent-a"))
    for login, sees in ((APPROVER, True), (USER, False)):
        async with httpx.AsyncClient(timeout=30) as browser:
            back = await log_in(browser, await begin(site, browser), login)
            assert (await browser.get(back)).status_code == 200
            page = await browser.get(f"{site.url}/console/approvals/{approval_id}")
            assert (page.status_code == 200) is sees, page.text
    assert endpoint.requests and endpoint.requests[-1]["client_id"] == CLIENT_ID
    assert "code_verifier" in endpoint.requests[-1]


async def test_userinfo_of_another_person_signs_nobody_in(
    rigged: Rigged, endpoint: TokenEndpoint
) -> None:
    """Token substitution: alice's genuine ID token comes with bob's access token, so
    userinfo (where this Provider keeps the roles) speaks of bob. Refused: the roles of one
    person are never joined to another's sign-in."""
    site = rigged.site
    bobs = await tokens_for(
        site.op, client_id=CLIENT_ID, redirect_uri=site.callback, login=USER, nonce="n"
    )
    endpoint.access_token = bobs["access_token"]
    async with httpx.AsyncClient(timeout=30) as browser:
        back = await log_in(browser, await begin(site, browser), APPROVER)
        refused(await browser.get(back), 400, "userinfo names another person")
        await signed_out(site, browser)


def _forged(site: Site, nonce: str, **claims: Any) -> str:
    """An ID token that says all the right things, signed by a key of the attacker's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    body = {
        "iss": site.op.issuer,
        "sub": APPROVER,
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 300,
        "nonce": nonce,
        "roles": ["approver"],
        **claims,
    }
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "test-op-1"})


Answer = tuple[int, str, str]


async def _callback_with(
    rigged: Rigged,
    browser: httpx.AsyncClient,
    answer: Answer | Callable[[dict[str, str]], Answer] | None,
) -> httpx.Response:
    """A sign-in whose code exchange the stand-in answers with `answer` (or what
    `answer(the authorization request's parameters)` returns)."""
    site = rigged.site
    params = query_of(await begin(site, browser))
    rigged.endpoint.answer = answer(params) if callable(answer) else answer
    return await browser.get(
        site.callback,
        params={"code": "a-code", "state": params["state"], "iss": site.op.issuer},
    )


async def test_an_id_token_for_another_client_signs_nobody_in(
    rigged: Rigged, endpoint: TokenEndpoint
) -> None:
    """A genuine ID token of the same Provider, issued to another relying party."""
    site = rigged.site
    other = await tokens_for(
        site.op, client_id=OTHER_CLIENT_ID, redirect_uri=site.callback, login=APPROVER, nonce="n"
    )
    async with httpx.AsyncClient(timeout=30) as browser:
        body = f'{{"access_token": "x", "token_type": "Bearer", "id_token": "{other["id_token"]}"}}'
        answer = await _callback_with(rigged, browser, (200, body, "application/json"))
        refused(answer, 401, f"aud does not contain {CLIENT_ID!r}".replace("'", "&#39;"))
        await signed_out(site, browser)


async def test_a_forged_id_token_signs_nobody_in(rigged: Rigged, endpoint: TokenEndpoint) -> None:
    """Everything right (issuer, audience, this sign-in's nonce, the Provider's key id)
    but the signature, which is the attacker's."""
    site = rigged.site

    def forged(params: dict[str, str]) -> Answer:
        token = _forged(site, params["nonce"])
        body = f'{{"access_token": "x", "token_type": "Bearer", "id_token": "{token}"}}'
        return 200, body, "application/json"

    async with httpx.AsyncClient(timeout=30) as browser:
        refused(await _callback_with(rigged, browser, forged), 401, "bad token signature")
        await signed_out(site, browser)


@pytest.mark.parametrize(
    ("answer", "status", "words"),
    [
        ((400, '{"error": "invalid_grant"}', "application/json"), 400, "invalid_grant"),
        ((200, "<html>hello</html>", "text/html"), 400, "unusable"),
        (
            (200, '{"access_token": "x", "token_type": "Bearer"}', "application/json"),
            401,
            "no ID token",
        ),
        ((502, "bad gateway", "text/plain"), 503, "cannot be reached"),
    ],
    ids=["refused", "not-json", "no-id-token", "provider-5xx"],
)
async def test_a_broken_token_endpoint_signs_nobody_in(
    rigged: Rigged,
    endpoint: TokenEndpoint,
    answer: tuple[int, str, str],
    status: int,
    words: str,
) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        refused(await _callback_with(rigged, browser, answer), status, words)
        await signed_out(rigged.site, browser)


async def test_a_token_endpoint_that_hangs_up_is_a_503(
    rigged: Rigged, endpoint: TokenEndpoint
) -> None:
    endpoint.hang_up = True
    async with httpx.AsyncClient(timeout=30) as browser:
        refused(await _callback_with(rigged, browser, None), 503, "did not answer")
        await signed_out(rigged.site, browser)


async def test_the_pkce_verifier_matches_the_challenge(
    rigged: Rigged, endpoint: TokenEndpoint
) -> None:
    """What the console sends the token endpoint: the verifier of the challenge it sent
    the Provider, the code, its redirect URI, and no secret (a public client)."""
    site = rigged.site
    async with httpx.AsyncClient(timeout=30) as browser:
        sent = query_of(await begin(site, browser))
        endpoint.answer = (400, '{"error": "invalid_grant"}', "application/json")
        await browser.get(
            site.callback,
            params={"code": "the-code", "state": sent["state"], "iss": site.op.issuer},
        )
    request = endpoint.requests[-1]
    assert 43 <= len(request["code_verifier"]) <= 128
    digest = hashlib.sha256(request["code_verifier"].encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == sent["code_challenge"]
    assert (request["code"], request["redirect_uri"]) == ("the-code", site.callback)
    assert request["grant_type"] == "authorization_code"
    assert "client_secret" not in request


def test_the_settings_go_together() -> None:
    """A client id needs the issuer it is a client of; a secret needs its client id."""
    with pytest.raises(ValidationError, match="console_oidc_client_id needs approver_issuer"):
        Settings(console_oidc_client_id=CLIENT_ID)
    with pytest.raises(ValidationError, match="needs console_oidc_client_id"):
        Settings(
            approver_issuer="https://idp.example",
            approver_audience=APPROVALS_AUDIENCE,
            console_oidc_client_secret="s",
        )
    configured = Settings(
        approver_issuer="https://idp.example",
        approver_audience=APPROVALS_AUDIENCE,
        console_oidc_client_id=CLIENT_ID,
        public_url="https://policy.example/base",
    )
    client = OidcSignIn.from_settings(configured)
    assert client is not None
    assert client.redirect_uri == "https://policy.example/base/console/oidc/callback"
    assert OidcSignIn.from_settings(Settings()) is None
