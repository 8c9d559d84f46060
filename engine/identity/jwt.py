"""OAuth 2.1 bearer tokens: JWTs verified against the issuer's JWKS.

`start()` finds the issuer's `jwks_uri` in its metadata (RFC 8414, then OpenID Connect
discovery), checks the metadata names the configured issuer, and loads the keys. `verify()`
then needs no I/O for a token signed by a known key: PyJWT checks the signature with the
cached `PyJWK` for the token's (kid, alg), then iss, aud (RFC 8707: the resource URL),
exp, nbf and iat with the leeway. A token naming an unknown kid refreshes the JWKS, at most
once per `refresh_min_interval` and one fetch at a time, so a key rotation needs no restart
and a flood of made-up kids cannot make the service hammer the issuer. The keys are also
refreshed in the background once they are `jwks_max_age` old, so a key the issuer removed
stops being accepted without a restart.

`none` and the HMAC algorithms are always refused, whatever the allow-list says: a JWKS
holds public keys, and an HS256 "signature" made with a public key as the secret must never
verify. Symmetric (`oct`) keys in a JWKS are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from jwt.types import Options

from engine.identity.base import CredentialRejected, Identity, IdentityUnavailable
from engine.models import principal_id_problem

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

# Algorithms this verifier can use, by key type (and curve): the only asymmetric ones PyJWT
# implements. `none` and HS* are not here, so no allow-list can turn them on.
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_CURVE_ALGORITHMS = {
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-384"): ("ES384",),
    ("EC", "P-521"): ("ES512",),
    ("EC", "secp256k1"): ("ES256K",),
    ("OKP", "Ed25519"): ("EdDSA",),
    ("OKP", "Ed448"): ("EdDSA",),
}
SUPPORTED_ALGORITHMS = frozenset(
    _RSA_ALGORITHMS + tuple(alg for algs in _CURVE_ALGORITHMS.values() for alg in algs)
)
NEVER_ALLOWED = frozenset({"none", "HS256", "HS384", "HS512"})

MAX_TOKEN_CHARS = 16 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024  # issuer metadata or a JWKS
MAX_CACHED_HEADERS = 1024
# The bounds of `models.Principal`: a claim that cannot be a principal is refused here.
MAX_ID_CHARS = 256
MAX_ROLES = 64

_DECODE_OPTIONS: Options = {
    "require": ["exp", "iss", "aud"],
    "verify_signature": True,
    "verify_exp": True,
    "verify_nbf": True,
    "verify_iat": True,
    "verify_iss": True,
    "verify_aud": True,
    "verify_sub": True,
    "verify_jti": True,
    "strict_aud": False,
    "enforce_minimum_key_length": True,
}


def discovery_urls(issuer: str) -> tuple[str, str]:
    """The RFC 8414 metadata URL (well-known part inserted before the issuer's path) and
    the OpenID Connect discovery URL (appended to it) for `issuer`."""
    parts = urlsplit(issuer)
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    return (
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}{path}/.well-known/openid-configuration",
    )


def _check_url(url: str, what: str) -> None:
    """https, or http to a loopback address (a test issuer, a sidecar)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        if host == "localhost":
            return
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_loopback:
                return
    raise ValueError(f"{what} must be an https URL (or http on loopback), got {url!r}")


class JwtVerifier:
    """Verifies bearer JWTs from one issuer for one audience (this resource's URL)."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        algorithms: Sequence[str] = ("RS256", "ES256", "EdDSA"),
        leeway_seconds: float = 30,
        roles_claim: str = "roles",
        refresh_min_interval: float = 30.0,
        http_timeout: float = 5.0,
        jwks_max_age: float = 300.0,
    ) -> None:
        _check_url(issuer, "the issuer")
        parts = urlsplit(issuer)
        if parts.query or parts.fragment:
            raise ValueError(f"the issuer has no query or fragment (RFC 8414), got {issuer!r}")
        if jwks_url is not None:
            _check_url(jwks_url, "the JWKS URL")
        if not audience:
            raise ValueError("the audience (this resource's URL) is required")
        unknown = sorted(set(algorithms) - SUPPORTED_ALGORITHMS - NEVER_ALLOWED)
        if unknown:
            raise ValueError(
                f"unsupported JWT algorithm(s) {', '.join(unknown)}; "
                f"use some of {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
            )
        allowed = frozenset(algorithms) & SUPPORTED_ALGORITHMS
        refused = sorted(set(algorithms) & NEVER_ALLOWED)
        if refused:
            log.warning("JWT algorithm(s) %s are never accepted; ignored", ", ".join(refused))
        if not allowed:
            raise ValueError("no usable JWT algorithm allowed")
        if leeway_seconds < 0 or refresh_min_interval < 0 or http_timeout <= 0:
            raise ValueError("leeway and refresh interval must be >= 0, the timeout > 0")
        self.issuer = issuer
        self.audience = audience
        self.algorithms = allowed
        self.leeway_seconds = float(leeway_seconds)
        self.roles_claim = roles_claim
        self.refresh_min_interval = float(refresh_min_interval)
        self.http_timeout = float(http_timeout)
        self.jwks_max_age = float(jwks_max_age)
        self.jwks_url = jwks_url
        self._session: aiohttp.ClientSession | None = None
        # (kid, alg) -> key; (None, alg) when the JWKS has exactly one key for alg, for
        # tokens without a kid.
        self._keys: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self._headers: dict[str, tuple[str, str | None]] = {}  # see _header
        self._lock = asyncio.Lock()
        self._fetched_at = 0.0  # last successful JWKS fetch (monotonic)
        self._attempted_at = 0.0  # last fetch attempt, whatever its outcome (monotonic)
        self._background: asyncio.Task[None] | None = None
        self.jwks_fetches = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Discover the JWKS URL (unless given) and load the keys; IdentityUnavailable if
        the issuer cannot be reached or its metadata or keys are unusable."""
        if self._session is None:
            import aiohttp  # here: only a service with an issuer to ask needs it

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.http_timeout),
                headers={"Accept": "application/json"},
            )
        try:
            if self.jwks_url is None:
                self.jwks_url = await self._discover()
            async with self._lock:
                await self._load_jwks()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        task, self._background = self._background, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- verification ------------------------------------------------------------------

    async def verify(self, token: str) -> Identity:
        """The identity `token` proves; CredentialRejected naming the problem otherwise."""
        if self._session is None:
            raise IdentityUnavailable("the JWT verifier is not started")
        if not isinstance(token, str) or not token:
            raise CredentialRejected("malformed token: empty")
        if len(token) > MAX_TOKEN_CHARS:
            raise CredentialRejected(f"malformed token: longer than {MAX_TOKEN_CHARS} characters")
        alg, kid = self._header(token)
        self._maybe_refresh_in_background()
        key = self._keys.get((kid, alg))
        if key is None:
            await self._refresh_for(kid, alg)
            key = self._keys.get((kid, alg))
            if key is None:
                raise CredentialRejected(self._no_key_message(kid, alg))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options=_DECODE_OPTIONS,
            )
        except jwt.ExpiredSignatureError:
            raise CredentialRejected("token expired") from None
        except jwt.ImmatureSignatureError as exc:
            raise CredentialRejected(f"token not yet valid: {exc}") from None
        except jwt.InvalidAudienceError:
            raise CredentialRejected(
                f"token is not for this resource: aud does not contain {self.audience!r}"
            ) from None
        except jwt.InvalidIssuerError:
            raise CredentialRejected(
                f"token is from another issuer: iss is not {self.issuer!r}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise CredentialRejected(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise CredentialRejected("bad token signature") from None
        except jwt.InvalidAlgorithmError as exc:
            raise CredentialRejected(f"token algorithm not allowed: {exc}") from None
        except jwt.DecodeError as exc:
            raise CredentialRejected(f"malformed token: {exc}") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise CredentialRejected(f"invalid token: {exc}") from None
        _check_registered_claims(claims)
        return _identity(claims, self.roles_claim)

    def _header(self, token: str) -> tuple[str, str | None]:
        """The token's (alg, kid), alg allowed. A token's first segment repeats across all
        tokens an issuer signs with one key, so its parse is remembered (a bounded cache of
        headers that passed): `jwt.decode` then parses the token once, not twice."""
        segment = token.partition(".")[0]
        known = self._headers.get(segment)
        if known is not None:
            return known
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise CredentialRejected(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            allowed = ", ".join(sorted(self.algorithms))
            raise CredentialRejected(f"token algorithm {alg!r} is not allowed (allowed: {allowed})")
        kid: str | None = header.get("kid")  # PyJWT checked it is a string when present
        if len(self._headers) >= MAX_CACHED_HEADERS:
            self._headers.clear()
        self._headers[segment] = (alg, kid)
        return alg, kid

    def _no_key_message(self, kid: str | None, alg: str) -> str:
        if kid is not None and any(k == kid for k, _ in self._keys):
            return f"the issuer's key {kid!r} is not a {alg} key"
        if kid is None:
            return f"token has no kid and the issuer has no single {alg} key"
        return f"unknown signing key: the issuer's JWKS has no key {kid!r}"

    # -- keys --------------------------------------------------------------------------

    async def _refresh_for(self, kid: str | None, alg: str) -> None:
        """Reload the JWKS for a token whose key is not cached, unless it was (tried to be)
        loaded less than refresh_min_interval ago. One fetch at a time: callers that waited
        for another's fetch look at its result rather than fetching again."""
        async with self._lock:
            if (kid, alg) in self._keys:
                return
            if time.monotonic() - self._attempted_at < self.refresh_min_interval:
                return
            try:
                await self._load_jwks()
            except IdentityUnavailable as exc:
                log.warning("JWKS refresh failed, keeping the keys already loaded: %s", exc)

    def _maybe_refresh_in_background(self) -> None:
        if self._background is not None or self._session is None:
            return
        now = time.monotonic()
        if now - self._fetched_at < self.jwks_max_age:
            return
        if now - self._attempted_at < self.refresh_min_interval:
            return
        self._background = asyncio.get_running_loop().create_task(self._refresh_stale())

    async def _refresh_stale(self) -> None:
        try:
            async with self._lock:
                if time.monotonic() - self._fetched_at < self.jwks_max_age:
                    return
                await self._load_jwks()
        except IdentityUnavailable as exc:
            log.warning("JWKS refresh failed, keeping the keys already loaded: %s", exc)
        finally:
            self._background = None

    async def _load_jwks(self) -> None:
        """Fetch the JWKS and replace the cached keys. Called with the lock held."""
        assert self.jwks_url is not None
        try:
            self.jwks_fetches += 1
            status, document = await self._get_json(self.jwks_url)
            if status != 200:
                raise IdentityUnavailable(f"JWKS {self.jwks_url} answered HTTP {status}")
            self._keys = self._parse_jwks(document)
            self._fetched_at = time.monotonic()
        finally:
            self._attempted_at = time.monotonic()

    def _parse_jwks(self, document: Any) -> dict[tuple[str | None, str], jwt.PyJWK]:
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise IdentityUnavailable(f"JWKS {self.jwks_url} is not a JSON object with keys")
        found: dict[tuple[str | None, str], jwt.PyJWK] = {}
        per_alg: dict[str, list[jwt.PyJWK]] = {}
        for data in keys:
            if not isinstance(data, dict):
                continue
            kid = data.get("kid")
            kid = kid if isinstance(kid, str) else None
            for alg in self._algorithms_for(data):
                try:
                    key = jwt.PyJWK(data, algorithm=alg)
                except jwt.PyJWTError as exc:
                    log.debug("JWKS key %r unusable for %s: %s", kid, alg, exc)
                    continue
                per_alg.setdefault(alg, []).append(key)
                if kid is not None:
                    found.setdefault((kid, alg), key)
        for alg, candidates in per_alg.items():
            if len(candidates) == 1:
                found[(None, alg)] = candidates[0]
        if not found:
            raise IdentityUnavailable(
                f"JWKS {self.jwks_url} has no usable signing key for "
                f"{', '.join(sorted(self.algorithms))}"
            )
        return found

    def _algorithms_for(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        """The allowed algorithms a JWK may verify: by its kty (and crv), narrowed to its
        `alg` when it names one; none for encryption or symmetric keys."""
        use = data.get("use")
        if use is not None and use != "sig":
            return ()
        ops = data.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            return ()
        kty = data.get("kty")
        if kty == "RSA":
            candidates: tuple[str, ...] = _RSA_ALGORITHMS
        else:
            candidates = _CURVE_ALGORITHMS.get((str(kty), str(data.get("crv"))), ())
        named = data.get("alg")
        if named is not None:
            candidates = tuple(a for a in candidates if a == named)
        return tuple(a for a in candidates if a in self.algorithms)

    # -- HTTP --------------------------------------------------------------------------

    async def _discover(self) -> str:
        problems: list[str] = []
        for url in discovery_urls(self.issuer):
            try:
                status, metadata = await self._get_json(url)
            except IdentityUnavailable as exc:
                problems.append(exc.message)
                continue
            if status != 200:
                problems.append(f"{url} answered HTTP {status}")
                continue
            if not isinstance(metadata, dict):
                raise IdentityUnavailable(f"issuer metadata {url} is not a JSON object")
            if metadata.get("issuer") != self.issuer:
                raise IdentityUnavailable(
                    f"issuer metadata {url} names issuer {metadata.get('issuer')!r}, "
                    f"not the configured {self.issuer!r}"
                )
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise IdentityUnavailable(f"issuer metadata {url} has no jwks_uri")
            try:
                _check_url(jwks_uri, "the issuer's jwks_uri")
            except ValueError as exc:
                raise IdentityUnavailable(f"issuer metadata {url}: {exc}") from None
            return jwks_uri
        raise IdentityUnavailable(f"no metadata for issuer {self.issuer!r}: " + "; ".join(problems))

    async def _get_json(self, url: str) -> tuple[int, Any]:
        """(status, parsed JSON body, or None unless 200). No redirects, bounded size."""
        import aiohttp

        if self._session is None:
            raise IdentityUnavailable("the JWT verifier is not started")
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    return response.status, None
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise IdentityUnavailable(
                            f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes"
                        )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise IdentityUnavailable(f"cannot fetch {url}: {exc!r}") from None
        try:
            return 200, json.loads(bytes(body))
        except (ValueError, RecursionError) as exc:
            raise IdentityUnavailable(f"{url} is not JSON: {exc}") from None


# -- claims → Identity ---------------------------------------------------------------------

# RFC 7519 §4.1: the time claims are NumericDate (a JSON number), the others strings (`aud`
# also a list of strings). PyJWT converts what it compares (`int("99999999999")` passes as
# an `exp`), so the JSON types are checked here, after the signature: a registered claim of
# the wrong type refuses the token.
_NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
_STRING_CLAIMS = ("iss", "sub", "jti")


def _check_registered_claims(claims: Mapping[str, Any]) -> None:
    for name in _NUMERIC_DATE_CLAIMS:
        value = claims.get(name)
        if name in claims and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise CredentialRejected(f"token claim {name!r} must be a number (a NumericDate)")
    for name in _STRING_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            raise CredentialRejected(f"token claim {name!r} must be a string")
    audience = claims.get("aud")
    if "aud" in claims and not (
        isinstance(audience, str)
        or (isinstance(audience, list) and all(isinstance(a, str) for a in audience))
    ):
        raise CredentialRejected("token claim 'aud' must be a string or a list of strings")


def _claim_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise CredentialRejected(f"token claim {name!r} must be a string")
    if len(value) > MAX_ID_CHARS:
        raise CredentialRejected(f"token claim {name!r} is longer than {MAX_ID_CHARS} characters")
    problem = principal_id_problem(value)  # it becomes principal.agent_id/user_id/session_id
    if problem is not None:
        raise CredentialRejected(f"token claim {name!r} {problem}")
    return value


def claim_words(
    claims: Mapping[str, Any],
    name: str,
    *,
    max_values: int = MAX_ROLES,
    max_chars: int = MAX_ID_CHARS,
) -> tuple[str, ...] | None:
    """A list of strings or a space-separated string; None when absent."""
    value: Any = claims.get(name)
    if value is None and "." in name and name not in claims:
        value = claims  # a nested claim, e.g. Keycloak's realm_access.roles
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    if isinstance(value, str):
        words = tuple(value.split())
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        words = tuple(value)
    else:
        raise CredentialRejected(
            f"token claim {name!r} must be a list of strings or a space-separated string"
        )
    if len(words) > max_values or any(len(w) > max_chars for w in words):
        raise CredentialRejected(
            f"token claim {name!r} has more than {max_values} values or one longer than "
            f"{max_chars} characters"
        )
    return words


def _identity(claims: dict[str, Any], roles_claim: str) -> Identity:
    user_id = _claim_str(claims, "sub")
    agent_id = _claim_str(claims, "client_id") or _claim_str(claims, "azp")
    subject = user_id or agent_id
    if subject is None:
        raise CredentialRejected("token names no subject: it has no sub or client_id claim")
    scopes = claim_words(claims, "scope")
    if scopes is None:
        scopes = claim_words(claims, "scp")
    return Identity(
        method="jwt",
        subject=subject,
        agent_id=agent_id,
        user_id=user_id,
        roles=claim_words(claims, roles_claim) or (),
        scopes=scopes or (),
        session_id=_claim_str(claims, "sid"),
        claims=MappingProxyType(claims),
    )
