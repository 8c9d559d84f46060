"""Signing in to the approvals console with OpenID Connect: authorization code + PKCE.

The approvers' OpenID Provider is the one whose JWTs already prove approvers
(`approver_issuer`); the console is a client of it (`console_oidc_client_id`, with
`console_oidc_client_secret` for a confidential client, none for a public one proven by
PKCE alone), redirect URI `<console_base>/oidc/callback`.

- `GET /console/oidc/login?next=…`: reads the Provider's discovery document
  (`<issuer>/.well-known/openid-configuration`, which must name the same issuer), keeps a
  fresh state, nonce and PKCE verifier server-side in the console's pre-sign-in store
  (`session.begin_login`: the browser holds only a random key in a short-lived cookie), and
  sends the browser to the Provider with the state, the nonce and the S256 challenge.
- `GET /console/oidc/callback?code=…&state=…`: takes that pending sign-in (once: a
  replayed or forged state finds nothing), checks the state (and the `iss` parameter,
  RFC 9207), exchanges the code with the verifier (Authlib's `AsyncOAuth2Client`), and
  validates the ID token: its signature against the issuer's JWKS, `iss`, `aud` = the
  client id (`azp` too when present or when there are several audiences), `exp`, `iat`
  and the nonce (PyJWT, through `JwtVerifier`). Claims the ID token lacks (the role claim,
  `mcp_policy_servers` / `mcp_policy_tools`) are read from the userinfo endpoint when the
  Provider has one, its `sub` checked to be the same person.

The person is `Identity(method="oidc", subject=sub, user_id=sub)` with roles
("approver",) when the role claim (`approver_role_claim`) includes `approver_role`, and no
role otherwise: such a person may only decide their own agent's calls where the policy
lets the caller (`approver_auth.is_caller`); their servers/tools limits come from the
same claims as an approver JWT's (`approver_auth.allowed_from_claims`). Then the console's
`session.sign_in` opens the session.

Every failure (an `error` from the Provider, a missing, forged or replayed state, a code
the Provider refuses, an ID token that does not verify, a wrong nonce) ends on the
sign-in page with what went wrong, 4xx, and no session; a Provider that cannot be reached
(or answers 5xx) is 503. Nothing here is a 5xx of ours.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httpx2  # the HTTP client Authlib's is built on (mcp needs it too): its errors
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from engine import approver_auth
from engine.console import pages
from engine.console import session as sessions
from engine.errors import bounded
from engine.identity.base import CredentialRejected, Identity, IdentityUnavailable
from engine.identity.jwt import JwtVerifier, claim_words
from engine.identity.jwt import _check_url as check_url  # https, or http on loopback

if TYPE_CHECKING:
    from engine.runtime import Runtime
    from engine.settings import Settings

log = logging.getLogger(__name__)

LOGIN_PATH = "/oidc/login"
CALLBACK_PATH = "/oidc/callback"
SCOPE = "openid"
HTTP_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024  # the discovery document or a userinfo answer
# After the Provider could not be reached, sign-ins are answered 503 for this long before
# the next attempt (so a flood of clicks cannot make the service hammer it).
RETRY_SECONDS = approver_auth.ISSUER_RETRY_SECONDS
MAX_PARAM_CHARS = 2048  # a code, state or error longer than this was not made for us
MAX_SHOWN_CHARS = 200  # of the Provider's error text on the page


class SignInFailed(Exception):
    """Why a sign-in failed, for the person (`message`) and as an HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _unavailable(what: str) -> SignInFailed:
    return SignInFailed(
        f"The OpenID Provider cannot be reached ({what}); try again in a moment.",
        503,
    )


@dataclass(frozen=True)
class Metadata:
    """What the console uses of the Provider's discovery document."""

    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    iss_parameter: bool  # authorization_response_iss_parameter_supported (RFC 9207)


class OidcSignIn:
    """The console's OpenID Connect client: see the module docstring."""

    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        redirect_uri: str,
        role_claim: str,
        approver_role: str,
        jwks_url: str | None = None,
        http_timeout: float = HTTP_TIMEOUT_SECONDS,
    ) -> None:
        check_url(issuer, "the issuer")
        self.issuer = issuer
        self.client_id = client_id
        self._client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.role_claim = role_claim
        self.approver_role = approver_role
        self.jwks_url = jwks_url
        self.http_timeout = http_timeout
        self._metadata: Metadata | None = None
        self._lock = asyncio.Lock()
        self._failed_at: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcSignIn | None:
        """The client `settings` configure, or None without `console_oidc_client_id`."""
        if settings.console_oidc_client_id is None or settings.approver_issuer is None:
            return None
        secret = settings.console_oidc_client_secret
        return cls(
            issuer=settings.approver_issuer,
            client_id=settings.console_oidc_client_id,
            client_secret=secret.get_secret_value() if secret is not None else None,
            redirect_uri=settings.console_base() + CALLBACK_PATH,
            role_claim=settings.approver_role_claim,
            approver_role=settings.approver_role,
            jwks_url=settings.approver_jwks_url,
        )

    def _client(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self._client_secret,
            token_endpoint_auth_method="client_secret_basic" if self._client_secret else "none",
            scope=SCOPE,
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            timeout=self.http_timeout,
            trust_env=False,
            follow_redirects=False,
        )

    # -- the Provider's metadata and keys ----------------------------------------------

    async def metadata(self) -> Metadata:
        """The Provider's discovery document, fetched once (and again, after a failure,
        no sooner than RETRY_SECONDS later)."""
        if self._metadata is not None:
            return self._metadata
        async with self._lock:
            if self._metadata is not None:
                return self._metadata
            if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_SECONDS:
                raise _unavailable("it did not answer a moment ago")
            try:
                self._metadata = await self._discover()
            except SignInFailed:
                self._failed_at = time.monotonic()
                raise
            self._failed_at = None
            return self._metadata

    async def _discover(self) -> Metadata:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        async with self._client() as client:
            document = await _get_json(client, url, "discovery document")
        if not isinstance(document, dict):
            raise self._misconfigured(f"{url} is not a JSON object")
        if document.get("issuer") != self.issuer:
            raise self._misconfigured(
                f"{url} names issuer {bounded(str(document.get('issuer')), 200)!r}, not "
                f"{self.issuer!r}"
            )
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise self._misconfigured("the Provider does not support PKCE with S256")
        endpoints: dict[str, str | None] = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
            value = document.get(name)
            if value is None and name == "userinfo_endpoint":
                endpoints[name] = None
                continue
            if not isinstance(value, str):
                raise self._misconfigured(f"{url} has no {name}")
            try:
                check_url(value, f"the Provider's {name}")
            except ValueError as exc:
                raise self._misconfigured(str(exc)) from None
            endpoints[name] = value
        return Metadata(
            authorization_endpoint=str(endpoints["authorization_endpoint"]),
            token_endpoint=str(endpoints["token_endpoint"]),
            jwks_uri=str(endpoints["jwks_uri"]),
            userinfo_endpoint=endpoints["userinfo_endpoint"],
            iss_parameter=document.get("authorization_response_iss_parameter_supported") is True,
        )

    def _misconfigured(self, problem: str) -> SignInFailed:
        log.error("OpenID Connect sign-in: the Provider %s is unusable: %s", self.issuer, problem)
        return SignInFailed(
            f"Sign-in with {self.issuer} is not possible: {problem}. Tell the operator.", 503
        )

    # -- the flow ----------------------------------------------------------------------

    async def begin(self, next_url: str | None) -> tuple[str, dict[str, str]]:
        """(the Provider's authorization URL to send the browser to, what to keep for the
        callback: state, nonce, PKCE verifier and where to go after sign-in)."""
        metadata = await self.metadata()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters (RFC 7636: 43 to 128)
        async with self._client() as client:
            url, _ = client.create_authorization_url(
                metadata.authorization_endpoint, state=state, code_verifier=verifier, nonce=nonce
            )
        kept = {
            "state": state,
            "nonce": nonce,
            "verifier": verifier,
            "next": sessions.safe_next(next_url),
        }
        return str(url), kept

    async def finish(self, params: Mapping[str, str], kept: Mapping[str, str] | None) -> Identity:
        """The person the Provider's answer `params` (the callback's query) proves, for
        the sign-in `kept` (from `begin`, or None when this browser has none under way)."""
        error = params.get("error")
        if error is not None:
            description = params.get("error_description")
            said = bounded(error, MAX_SHOWN_CHARS)
            if description:
                said += f" ({bounded(description, MAX_SHOWN_CHARS)})"
            raise SignInFailed(f"The OpenID Provider did not sign you in: {said}.")
        if kept is None:
            raise SignInFailed(
                "No sign-in is under way in this browser (it expired, was completed already, "
                "or was started elsewhere): sign in again."
            )
        state = params.get("state")
        if not state:
            raise SignInFailed("The OpenID Provider's answer has no state: sign in again.")
        if not hmac.compare_digest(_bytes(state), _bytes(kept["state"])):
            raise SignInFailed(
                "The OpenID Provider's answer is not for the sign-in this browser started "
                "(state mismatch): sign in again."
            )
        metadata = await self.metadata()
        iss = params.get("iss")
        if (iss is not None or metadata.iss_parameter) and iss != self.issuer:
            raise SignInFailed(
                "The answer does not come from the configured OpenID Provider (its iss "
                "parameter is not the issuer): sign in again."
            )
        code = params.get("code")
        if not code:
            raise SignInFailed("The OpenID Provider's answer has no code: sign in again.")
        async with self._client() as client:
            tokens = await self._exchange(client, metadata, code, kept["verifier"])
            id_token = tokens.get("id_token")
            if not isinstance(id_token, str):
                raise SignInFailed("The OpenID Provider sent no ID token: sign in again.", 401)
            claims = await self._verify(metadata, id_token, kept["nonce"])
            wanted = (self.role_claim, approver_auth.SERVERS_CLAIM, approver_auth.TOOLS_CLAIM)
            if metadata.userinfo_endpoint is not None and not all(
                _present(claims, name) for name in wanted
            ):
                extra = await self._userinfo(client, metadata.userinfo_endpoint, claims["sub"])
                claims = {**claims, **{k: v for k, v in extra.items() if k not in claims}}
        return self._person(claims)

    async def _exchange(
        self, client: AsyncOAuth2Client, metadata: Metadata, code: str, verifier: str
    ) -> Mapping[str, Any]:
        try:
            token: Mapping[str, Any] = await client.fetch_token(
                metadata.token_endpoint,
                grant_type="authorization_code",
                code=code,
                code_verifier=verifier,
            )
        except OAuthError as exc:
            said = bounded(str(exc.error), MAX_SHOWN_CHARS)
            if exc.description:
                said += f" ({bounded(str(exc.description), MAX_SHOWN_CHARS)})"
            raise SignInFailed(
                f"The OpenID Provider refused to complete the sign-in: {said}. Sign in again."
            ) from None
        except httpx2.HTTPStatusError as exc:
            if exc.response.status_code >= 500:
                status = exc.response.status_code
                raise _unavailable(f"its token endpoint answered HTTP {status}") from None
            raise SignInFailed(
                "The OpenID Provider refused to complete the sign-in (HTTP "
                f"{exc.response.status_code}). Sign in again."
            ) from None
        except httpx2.HTTPError as exc:
            log.warning("OpenID Connect token request failed: %r", exc)
            raise _unavailable("its token endpoint did not answer") from None
        except ValueError as exc:  # not JSON, or not an object
            raise SignInFailed(
                f"The OpenID Provider's token answer is unusable: {bounded(str(exc), 200)}"
            ) from None
        return token

    async def _verify(self, metadata: Metadata, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims, once `JwtVerifier` (signature against the issuer's JWKS,
        iss, aud, exp, nbf, iat) and `_id_token_problem` (nonce, azp, ...) accept it. The
        keys are fetched for each sign-in (after the code was exchanged: only a real
        sign-in costs the Provider a request), so a rotated key needs no restart and
        nothing stays open between sign-ins."""
        verifier = JwtVerifier(
            issuer=self.issuer,
            audience=self.client_id,
            jwks_url=self.jwks_url or metadata.jwks_uri,
            roles_claim=self.role_claim,
            http_timeout=self.http_timeout,
        )
        try:
            await verifier.start()
            proven = await verifier.verify(id_token)
        except CredentialRejected as exc:
            raise SignInFailed(f"The ID token was refused: {exc.message}.", 401) from None
        except IdentityUnavailable as exc:
            log.warning("OpenID Connect ID token could not be checked: %s", exc.message)
            raise _unavailable("its signing keys could not be loaded") from None
        finally:
            await verifier.close()
        claims = dict(proven.claims)
        problem = _id_token_problem(claims, self.client_id, nonce)
        if problem is not None:
            raise SignInFailed(f"The ID token was refused: {problem}.", 401)
        return claims

    async def _userinfo(
        self, client: AsyncOAuth2Client, url: str, subject: str
    ) -> Mapping[str, Any]:
        document = await _get_json(client, url, "userinfo", with_token=True)
        if not isinstance(document, dict):
            raise SignInFailed("The OpenID Provider's userinfo answer is not a JSON object.")
        if document.get("sub") != subject:
            raise SignInFailed(
                "The OpenID Provider's userinfo names another person than the ID token."
            )
        return document

    def _person(self, claims: Mapping[str, Any]) -> Identity:
        subject = claims["sub"]
        try:
            roles = claim_words(claims, self.role_claim) or ()
            allowed = approver_auth.allowed_from_claims(claims)
        except CredentialRejected as exc:
            raise SignInFailed(f"The ID token was refused: {exc.message}.", 401) from None
        return Identity(
            method="oidc",
            subject=subject,
            user_id=subject,
            roles=(approver_auth.APPROVER,) if self.approver_role in roles else (),
            claims=MappingProxyType(dict(claims)),
            allowed=allowed,
        )


def _present(claims: Mapping[str, Any], name: str) -> bool:
    """Whether the claim `name` (dots for nesting) is there, well-formed or not."""
    try:
        return claim_words(claims, name) is not None
    except CredentialRejected:
        return True  # there, but not a list of words: `_person` says so


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _id_token_problem(claims: Mapping[str, Any], client_id: str, nonce: str) -> str | None:
    """What OpenID Connect Core 3.1.3.7 asks of an ID token beyond what `JwtVerifier`
    checked (signature, iss, aud contains the client, exp, nbf, iat when present)."""
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        return "it names nobody (no sub claim)"
    if "iat" not in claims:
        return "it has no iat claim"
    audience = claims.get("aud")
    azp = claims.get("azp")
    if isinstance(audience, list) and len(audience) > 1 and azp is None:
        return "it has several audiences and no azp claim"
    if azp is not None and azp != client_id:
        return f"it was issued to another client (azp is not {client_id!r})"
    given = claims.get("nonce")
    if not isinstance(given, str) or not hmac.compare_digest(_bytes(given), _bytes(nonce)):
        return "its nonce is not the one this sign-in sent (a replayed or injected token)"
    return None


async def _get_json(
    client: AsyncOAuth2Client, url: str, what: str, *, with_token: bool = False
) -> Any:
    """The JSON `url` answers (`what`: "discovery document", "userinfo"), without following
    redirects, at most MAX_DOCUMENT_BYTES. SignInFailed: 503 when the Provider cannot be
    reached or answers 5xx; otherwise 503 for the discovery document (nobody can sign in
    until the operator fixes it) and 400 for userinfo (this sign-in failed)."""
    status = 400 if with_token else 503
    body = bytearray()
    try:
        async with client.stream(
            "GET", url, withhold_token=not with_token, headers={"Accept": "application/json"}
        ) as response:
            if response.status_code >= 500:
                raise _unavailable(f"its {what} answered HTTP {response.status_code}")
            if response.status_code != 200:
                raise SignInFailed(
                    f"The OpenID Provider's {what} answered HTTP {response.status_code}.",
                    status,
                )
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise SignInFailed(
                        f"The OpenID Provider's {what} is larger than {MAX_DOCUMENT_BYTES} bytes.",
                        status,
                    )
    except httpx2.HTTPError as exc:
        log.warning("OpenID Connect: the %s (%s) failed: %r", what, url, exc)
        raise _unavailable(f"its {what} did not answer") from None
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise SignInFailed(f"The OpenID Provider's {what} is not JSON.", status) from None


# -- routes ------------------------------------------------------------------------------


def _single(request: Request, name: str) -> str | None:
    """The query parameter `name`: None when absent; SignInFailed when repeated or too long."""
    values = request.query_params.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise SignInFailed(f"The sign-in answer repeats {name}: sign in again.")
    if len(values[0]) > MAX_PARAM_CHARS:
        raise SignInFailed(f"The sign-in answer's {name} is too long: sign in again.")
    return values[0]


def add_routes(app: FastAPI, runtime: Runtime) -> None:
    """Add `/oidc/login` and `/oidc/callback` to the console app (mounted at /console),
    when `console_oidc_client_id` is set; the sign-in page then offers the button."""
    client = OidcSignIn.from_settings(runtime.settings)
    if client is None:
        return
    app.state.console_oidc = client
    sign_ins = runtime.metrics.console_sign_ins

    def failed(request: Request, failure: SignInFailed, next_url: str | None) -> Response:
        sign_ins.labels("oidc", "unavailable" if failure.status == 503 else "refused").inc()
        log.info("OpenID Connect sign-in refused: %s", failure.message)
        return pages.sign_in_page(
            request, error=failure.message, status=failure.status, next_url=next_url
        )

    @app.get(LOGIN_PATH)
    async def oidc_login(request: Request) -> Response:
        """Send the browser to the OpenID Provider (see the module docstring)."""
        next_url = request.query_params.get("next")
        try:
            url, kept = await client.begin(next_url)
        except SignInFailed as failure:
            return failed(request, failure, next_url)
        response = RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})
        sessions.begin_login(request, response, kept)
        return response

    @app.get(CALLBACK_PATH)
    async def oidc_callback(request: Request) -> Response:
        """The Provider's answer: sign the person in, or show why not."""
        cleared = Response()
        kept = sessions.take_login(request, cleared)  # once, whatever happens next
        next_url = kept.get("next") if kept is not None else None
        try:
            params = {
                name: value
                for name in ("code", "state", "iss", "error", "error_description")
                if (value := _single(request, name)) is not None
            }
            identity = await client.finish(params, kept)
        except SignInFailed as failure:
            response = failed(request, failure, next_url)
        else:
            sign_ins.labels("oidc", "signed_in").inc()
            log.info(
                "console sign-in: %r (oidc, %s)",
                identity.subject,
                "approver" if identity.roles else "caller only",
            )
            response = await sessions.sign_in(request, identity, next_url, cross_site=True)
        for cookie in cleared.headers.getlist("set-cookie"):
            response.headers.append("set-cookie", cookie)
        return response
