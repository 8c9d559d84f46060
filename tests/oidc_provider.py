"""The tests' OpenID Provider (tests/oidc/provider.mjs: the certified `oidc-provider`) as a
process on loopback, and a person signing in at it without a browser.

`OpenIdProvider(redirect_uris, ...)` starts `node tests/oidc/provider.mjs <port>` and
waits for its "ready"; `stop()` ends it (SIGTERM). Its accounts: "alice" (roles
["approver"]) and "bob" (no role); any other login signs in with no claims. Registered
clients: the console (`CLIENT_ID`, public unless a secret is given) and "other-app".

`log_in(browser, authorize_url, login)` plays the person at the Provider's development
login form with httpx (any password) and returns the URL the Provider sends the browser
back to (the redirect URI with `code`, `state` and `iss`, or `error`);
`tokens_for(...)` runs a whole authorization code + PKCE flow for a client of the
Provider and returns its token answer (genuine ID tokens, for the hostile cases).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin

import httpx

from engine.policy.opa_process import free_loopback_port

OP_DIR = Path(__file__).resolve().parent / "oidc"
PROVIDER = OP_DIR / "provider.mjs"
CLIENT_ID = "mcp-policy-console"
OTHER_CLIENT_ID = "other-app"
APPROVER = "alice"
USER = "bob"
_FORM_ACTION = re.compile(r'<form[^>]*action="([^"]+)"')


class OpenIdProvider:
    def __init__(
        self,
        redirect_uris: Sequence[str],
        *,
        port: int | None = None,
        client_secret: str | None = None,
        claims_in: str = "id_token",
        advertised_token_endpoint: str | None = None,
    ) -> None:
        node = shutil.which("node")
        if node is None or not (OP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise AssertionError(
                "the test OpenID Provider needs node and tests/oidc/node_modules: run "
                "`make interop-deps`"
            )
        self.port = port or free_loopback_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("OIDC_")}
        environment.update(
            OIDC_REDIRECT_URIS=",".join(redirect_uris),
            OIDC_CLIENT_ID=CLIENT_ID,
            OIDC_CLAIMS_IN=claims_in,
        )
        if client_secret is not None:
            environment["OIDC_CLIENT_SECRET"] = client_secret
        if advertised_token_endpoint is not None:
            environment["OIDC_ADVERTISED_TOKEN_ENDPOINT"] = advertised_token_endpoint
        self.proc = subprocess.Popen(
            [node, str(PROVIDER), str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
            cwd=OP_DIR,
        )
        self.lines: list[str] = []
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError(f"the OpenID Provider exited: {''.join(self.lines)}")
            self.lines.append(line)
            if line.strip() == "ready":
                return
        self.stop()
        raise AssertionError(f"the OpenID Provider did not start: {''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.lines.append(self.proc.stdout.read())
            self.proc.stdout.close()


async def log_in(browser: httpx.AsyncClient, authorize_url: str, login: str) -> str:
    """Follow `authorize_url` through the Provider's login form as `login`; the URL the
    Provider then sends the browser to (off the Provider)."""
    return await _through_provider(browser, authorize_url, login=login)


async def abort_at_provider(browser: httpx.AsyncClient, authorize_url: str) -> str:
    """Follow `authorize_url` to the login form and cancel there (the form's abort link):
    the URL the Provider sends the browser back to, with error=access_denied."""
    return await _through_provider(browser, authorize_url, login=None)


async def _through_provider(browser: httpx.AsyncClient, url: str, login: str | None) -> str:
    origin = "/".join(url.split("/")[:3])
    for _ in range(10):
        answer = await browser.get(url)
        if answer.status_code in (302, 303):
            url = urljoin(url, answer.headers["location"])
            if not url.startswith(origin + "/"):
                return url
            continue
        assert answer.status_code == 200, answer.text
        action = _FORM_ACTION.search(answer.text)
        assert action is not None, answer.text
        if login is None:
            url = action.group(1) + "/abort"
            continue
        answer = await browser.post(
            action.group(1), data={"prompt": "login", "login": login, "password": "any"}
        )
        assert answer.status_code in (302, 303), answer.text
        url = urljoin(url, answer.headers["location"])
        if not url.startswith(origin + "/"):
            return url
    raise AssertionError(f"the Provider kept the browser at {url}")


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def tokens_for(
    op: OpenIdProvider,
    *,
    client_id: str,
    redirect_uri: str,
    login: str,
    nonce: str,
) -> dict[str, Any]:
    """A whole sign-in of `login` at the Provider for the public client `client_id`: its
    token answer (with a genuine, signed ID token)."""
    verifier, challenge = pkce_pair()
    query = {
        "client_id": client_id,
        "response_type": "code",
        "scope": "openid",
        "redirect_uri": redirect_uri,
        "state": secrets.token_urlsafe(16),
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with httpx.AsyncClient(timeout=10) as browser:
        back = await log_in(browser, f"{op.issuer}/auth?{urlencode(query)}", login)
        code = httpx.URL(back).params["code"]
        answer = await browser.post(
            f"{op.issuer}/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": client_id,
                "code_verifier": verifier,
            },
        )
    assert answer.status_code == 200, answer.text
    tokens: dict[str, Any] = answer.json()
    return tokens
