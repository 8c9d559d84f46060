"""Console sessions: who is signed in to the approvals console, kept on the server.

A session is an entry in a `SessionStore` held in this process's memory (a restart signs
everybody out; replicas do not share sessions, so a load balancer in front of several
needs sticky sessions). The browser holds only a random id in the cookie `COOKIE`:
`HttpOnly`, `SameSite=Strict`, `Path=/console` (behind a gateway that serves the service
under a path, that path + /console: `base_path`), and `Secure` when the service serves
TLS (`settings.tls_cert`). The store keeps the SHA-256 of the id, never the id itself.

- `sign_in(request, identity, next_url)` ends whatever session the request carried, opens
  a new one under a new id (no fixation) and answers 303 to `next_url` (only a path under
  the console's; anything else goes to the console's home page). After a cross-site
  redirect (the OpenID Provider sending the browser back), pass `cross_site=True`: a
  `SameSite=Strict` cookie is not sent on the rest of a redirect chain that began on
  another site, so the answer is a small page that moves on by itself (a same-site
  navigation, which carries it).
- `current(request)` is the signed-in `ConsoleSession`, or None: no cookie, an unknown id,
  idle longer than `console_session_idle_seconds`, older than
  `console_session_max_seconds`, signed out, or its credential no longer valid (an
  approvers-file entry revoked or changed). Each call counts as activity unless
  `touch=False` (requests the page's script makes by itself).
- `sign_out(request)` ends the session server-side (streams it holds end too).
- CSRF: each session has a random `csrf` token. Every form carries it as the hidden field
  `CSRF_FIELD`; a fetch sends it as the header `CSRF_HEADER`. `check_csrf(session, given)`
  compares with `hmac.compare_digest`; the routes call it on every POST.

Before sign-in (OpenID Connect: state, nonce, PKCE verifier), a scratch space:
`begin_login(request, response, data)` keeps `data` (a dict of strings) server-side under a random
key sent in its own short-lived cookie `LOGIN_COOKIE` (`HttpOnly`, `SameSite=Lax` so the
Provider's redirect back carries it, the console's path, `Secure` under TLS, at most
`LOGIN_TTL_SECONDS`); `take_login(request, response)` returns that data once (it is
removed as it is read, and the cookie cleared), or None when missing, expired or used.

The store is `request.app.state.console_sessions` (the console app sets it; routes added to
the console app, such as OpenID Connect sign-in, find it there).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from engine.identity.base import Identity

if TYPE_CHECKING:
    from engine.settings import Settings

COOKIE = "mcp_policy_console"
LOGIN_COOKIE = "mcp_policy_console_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
HOME = "/console"
LOGIN_TTL_SECONDS = 600.0
MAX_SESSIONS = 10_000  # beyond this the least recently used session is ended
MAX_LOGINS = 10_000  # pending sign-ins (OpenID Connect) kept at once
MAX_ID_CHARS = 128  # a cookie value longer than this was not made here
MAX_NEXT_CHARS = 2048


def base_path(settings: Settings) -> str:
    """The console's path as people reach it: /console, after public_url's path when the
    service is behind a gateway that serves it under a prefix (which it strips)."""
    prefix = urlsplit(settings.public_url).path.rstrip("/") if settings.public_url else ""
    return prefix + HOME


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class ConsoleSession:
    """One signed-in person. `identity` is what the credential proved at sign-in."""

    key: str  # the SHA-256 of the cookie's id
    identity: Identity
    csrf: str
    created: float
    last_seen: float
    # False once the credential behind the identity stopped being valid (e.g. revoked).
    still_valid: Callable[[], bool] | None = None
    streams: int = 0  # open event streams (the routes cap them)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def expires_at(self, idle: float, absolute: float) -> float:
        """The monotonic time at which the session ends unless used again."""
        return min(self.last_seen + idle, self.created + absolute)


class SessionStore:
    """The console's sessions and pending sign-ins, in memory (see the module docstring)."""

    def __init__(
        self,
        *,
        idle_seconds: float,
        max_seconds: float,
        secure: bool,
        base: str = HOME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base  # where people reach the console (the cookies' path)
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.secure = secure
        self.clock = clock
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()
        self._logins: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionStore:
        return cls(
            idle_seconds=settings.console_session_idle_seconds,
            max_seconds=settings.console_session_max_seconds,
            secure=settings.tls_cert is not None,
            base=base_path(settings),
        )

    def __len__(self) -> int:
        return len(self._sessions)

    # -- sessions --------------------------------------------------------------------------

    def open(
        self, identity: Identity, still_valid: Callable[[], bool] | None = None
    ) -> tuple[str, ConsoleSession]:
        """A new session for `identity`: (the id for the cookie, the session)."""
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        session = ConsoleSession(
            key=_digest(session_id),
            identity=identity,
            csrf=secrets.token_urlsafe(32),
            created=now,
            last_seen=now,
            still_valid=still_valid,
        )
        self._sessions[session.key] = session
        # Least recently used first: the expired ones go, then (past the cap) the oldest.
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if len(self._sessions) <= MAX_SESSIONS and now < oldest.expires_at(
                self.idle_seconds, self.max_seconds
            ):
                break
            self.end(oldest)
        return session_id, session

    def find(self, session_id: str | None, *, touch: bool = True) -> ConsoleSession | None:
        """The live session `session_id` names, or None (ending it if it has expired)."""
        if not session_id or len(session_id) > MAX_ID_CHARS:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock()
        if now >= session.expires_at(self.idle_seconds, self.max_seconds) or (
            session.still_valid is not None and not session.still_valid()
        ):
            self.end(session)
            return None
        if touch:
            session.last_seen = now
            self._sessions.move_to_end(key)
        return session

    def alive(self, session: ConsoleSession) -> bool:
        """Whether `session` is still in force (without counting this as activity)."""
        if session.ended.is_set() or self._sessions.get(session.key) is not session:
            return False
        if self.clock() >= session.expires_at(self.idle_seconds, self.max_seconds) or (
            session.still_valid is not None and not session.still_valid()
        ):
            self.end(session)
            return False
        return True

    def expires_in(self, session: ConsoleSession) -> float:
        """Seconds until `session` ends unless used again."""
        return session.expires_at(self.idle_seconds, self.max_seconds) - self.clock()

    def end(self, session: ConsoleSession) -> None:
        """End `session` server-side; its cookie no longer names anything."""
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        session.ended.set()

    # -- pending sign-ins ------------------------------------------------------------------

    def keep_login(self, data: Mapping[str, str]) -> str:
        key = secrets.token_urlsafe(32)
        now = self.clock()
        self._logins[_digest(key)] = (now + LOGIN_TTL_SECONDS, dict(data))
        # Oldest first (they all live as long): the expired ones go, then past the cap.
        while len(self._logins) > MAX_LOGINS or next(iter(self._logins.values()))[0] <= now:
            self._logins.popitem(last=False)
        return key

    def take_login(self, key: str | None) -> dict[str, str] | None:
        if not key or len(key) > MAX_ID_CHARS:
            return None
        found = self._logins.pop(_digest(key), None)
        if found is None or self.clock() >= found[0]:
            return None
        return found[1]


def store_of(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.console_sessions
    return store


def set_cookie(
    store: SessionStore, response: Response, name: str, value: str, *, max_age: int, lax: bool
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=store.base,
        secure=store.secure,
        httponly=True,
        samesite="lax" if lax else "strict",
    )


def _clear_cookie(store: SessionStore, response: Response, name: str, *, lax: bool) -> None:
    response.delete_cookie(
        name,
        path=store.base,
        secure=store.secure,
        httponly=True,
        samesite="lax" if lax else "strict",
    )


def safe_next(next_url: str | None, home: str = HOME) -> str:
    """`next_url` when it is a path under `home` (the console) on this site; otherwise
    `home`.

    Refuses anything that could leave the site: a scheme, `//host`, a backslash (which
    browsers read as a slash), control characters, dot segments."""
    if not next_url or len(next_url) > MAX_NEXT_CHARS:
        return home
    if any(ord(ch) < 0x21 or ch == "\\" or ord(ch) == 0x7F for ch in next_url):
        return home
    path = next_url.split("?", 1)[0].split("#", 1)[0]
    if path != home and not path.startswith(home + "/"):
        return home
    if "//" in path or any(part in (".", "..") for part in path.split("/")):
        return home
    if "%" in path:  # no encoded slashes or dots: console paths never need escapes
        return home
    return next_url


def current(request: Request, *, touch: bool = True) -> ConsoleSession | None:
    """The signed-in session of `request`, or None (see the module docstring).
    `touch=False`: a request the person did not make (the live stream reconnecting, a
    background refresh), which does not count as activity."""
    return store_of(request).find(request.cookies.get(COOKIE), touch=touch)


async def sign_in(
    request: Request,
    identity: Identity,
    next_url: str | None,
    *,
    still_valid: Callable[[], bool] | None = None,
    cross_site: bool = False,
) -> Response:
    """Sign `identity` in: end the request's session (if any), open one under a new id,
    set the cookie, and send the browser on to `next_url` (checked by `safe_next`).

    The caller has proven `identity` and decided that it may use the console.
    `still_valid`, when given, is asked on every later request whether the credential still
    holds (False ends the session). `cross_site=True` answers 200 with a page that moves on
    by itself instead of 303 (see the module docstring)."""
    store = store_of(request)
    previous = store.find(request.cookies.get(COOKIE), touch=False)
    if previous is not None:
        store.end(previous)
    session_id, _ = store.open(identity, still_valid)
    target = safe_next(next_url, store.base)
    response: Response
    if cross_site:
        quoted = escape(target, quote=True)
        response = HTMLResponse(
            "<!doctype html><meta charset=utf-8>"
            f'<meta http-equiv="refresh" content="0;url={quoted}">'
            f'<title>Signed in</title><p>Signed in. <a href="{quoted}">Continue</a></p>',
            headers={"Cache-Control": "no-store"},
        )
    else:
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
    max_age = int(store.max_seconds)
    set_cookie(store, response, COOKIE, session_id, max_age=max_age, lax=False)
    return response


def sign_out(request: Request, response: Response) -> None:
    """End the request's session server-side and clear its cookie on `response`."""
    store = store_of(request)
    session = store.find(request.cookies.get(COOKIE), touch=False)
    if session is not None:
        store.end(session)
    _clear_cookie(store, response, COOKIE, lax=False)


def check_token(expected: str | None, given: str | None) -> bool:
    """Whether `given` is `expected` (both present; compared in constant time)."""
    if not expected or not given or len(given) > MAX_ID_CHARS:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def check_csrf(session: ConsoleSession, given: str | None) -> bool:
    """Whether `given` is `session`'s CSRF token (constant-time)."""
    return check_token(session.csrf, given)


def begin_login(request: Request, response: Response, data: Mapping[str, str]) -> None:
    """Keep `data` (state, nonce, PKCE verifier, where to go next) server-side for the
    sign-in under way, and set `LOGIN_COOKIE` on `response` to find it again."""
    store = store_of(request)
    key = store.keep_login(data)
    set_cookie(store, response, LOGIN_COOKIE, key, max_age=int(LOGIN_TTL_SECONDS), lax=True)


def take_login(request: Request, response: Response) -> dict[str, str] | None:
    """The data `begin_login` kept for this browser, once; clears the cookie on
    `response`. None when there is none, it expired or it was taken already."""
    store = store_of(request)
    _clear_cookie(store, response, LOGIN_COOKIE, lax=True)
    return store.take_login(request.cookies.get(LOGIN_COOKIE))
