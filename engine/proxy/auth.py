"""The proxy's HTTP listener as an OAuth 2.1 resource server (MCP authorization).

With `--auth-issuer URL --auth-audience URL` every request to the MCP endpoint must carry
`Authorization: Bearer <JWT>`: a token the issuer signed (checked against its JWKS by
`engine.identity.JwtVerifier`) for this resource (RFC 8707: `aud` holds the audience URL).
With `--auth-keys FILE` an API key from that file (`mcp-policy keys add`) is accepted
instead; with both, either works. A token without two dots is not a JWT, so it is looked
up in the keys file first.

A request without a usable credential is answered here, before anything else sees it
(nothing is read from its body, no session is opened, nothing is decided or relayed):

- 401 with `WWW-Authenticate: Bearer resource_metadata="<metadata URL>"` when no token
  was sent, plus `error="invalid_token"` (or `invalid_request` for a malformed header, or
  a token in the URL, which is never accepted) and `error_description` when one was;
- 403 with `error="insufficient_scope", scope="..."` for a valid JWT without every
  `--auth-required-scope` (API keys are not OAuth grants: a key in the file is access);
- 503 when the credentials cannot be checked at all.

Each carries a JSON-RPC error (`id: null`) as its JSON body, so an MCP client shows why.

The protected resource metadata (RFC 9728) is served at
`/.well-known/oauth-protected-resource`, and at that path followed by the endpoint's path
(and the audience URL's path), so a client can find the issuer from the 401 alone.

`check_exposure` is the startup rule: without authentication the listener serves
loopback only, unless told `--insecure`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from mcp_types import INTERNAL_ERROR, INVALID_REQUEST
from starlette.responses import Response
from starlette.types import Scope

from engine.identity.base import CredentialRejected, Identity, IdentityUnavailable
from engine.identity.secrets_file import SecretsFile
from engine.transports.tls import is_loopback

if TYPE_CHECKING:
    from engine.identity.jwt import JwtVerifier

log = logging.getLogger(__name__)

WELL_KNOWN = "/.well-known/oauth-protected-resource"
BEARER_METHODS = ("header",)
# RFC 6750 §2.1: b64token.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6750 §3: error_description and scope are limited to these characters.
_NOT_ALLOWED_IN_CHALLENGE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
MAX_DESCRIPTION = 200
MAX_AUTHORIZATION_CHARS = 16 * 1024 + 16
METADATA_MAX_AGE = 300


class ListenRefused(Exception):
    """The listener would be reachable beyond loopback with no authentication."""


def check_exposure(host: str, *, authenticated: bool, insecure: bool) -> str | None:
    """Why the listener must not start on `host`, or None when it may."""
    if authenticated or insecure or is_loopback(host):
        return None
    return (
        f"refusing to serve MCP on {host} without authentication: give --auth-issuer and "
        "--auth-audience, or --auth-keys, or pass --insecure"
    )


@dataclass(frozen=True)
class AuthConfig:
    """What `--auth-*` configured."""

    issuer: str | None = None
    audience: str | None = None
    jwks_url: str | None = None
    required_scopes: tuple[str, ...] = ()
    roles_claim: str = "roles"
    leeway_seconds: float = 30.0
    keys_file: Path | None = None
    keys_check_interval: float = 1.0

    def problem(self) -> str | None:
        """What is wrong with this combination of settings, or None."""
        if (self.issuer is None) != (self.audience is None):
            return "--auth-issuer and --auth-audience go together"
        if self.issuer is None and self.keys_file is None:
            return "give --auth-issuer with --auth-audience, or --auth-keys"
        if self.issuer is None and (self.jwks_url is not None or self.required_scopes):
            return "--auth-jwks and --auth-required-scope go with --auth-issuer"
        for scope in self.required_scopes:
            if not scope or _NOT_ALLOWED_IN_CHALLENGE.search(scope) or " " in scope:
                return f"--auth-required-scope {scope!r} is not an OAuth scope token"
        if self.audience is not None:
            parts = urlsplit(self.audience)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
                return f"--auth-audience must be this resource's URL, got {self.audience!r}"
        return None


Owner = tuple[str, str, str, str]


def owner_of(identity: Identity | None) -> Owner | None:
    """Who a session belongs to: the same principal may renew its token and go on, any
    other credential is a stranger to the session."""
    if identity is None:
        return None
    return (identity.method, identity.subject, identity.agent_id or "", identity.user_id or "")


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def _challenge_text(text: str) -> str:
    text = _NOT_ALLOWED_IN_CHALLENGE.sub("?", text.replace('"', "'").replace("\\", "/"))
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def _origin(scope: Scope) -> str:
    """The request's own origin (scheme and Host), for a resource without an audience."""
    host = ""
    for key, value in scope.get("headers", []):
        if key == b"host":
            host = value.decode("latin-1")
            break
    if not host or _NOT_ALLOWED_IN_CHALLENGE.search(host) or "/" in host:
        server = scope.get("server") or ("127.0.0.1", 0)
        name = f"[{server[0]}]" if ":" in str(server[0]) else str(server[0])
        host = f"{name}:{server[1]}"
    scheme = "https" if scope.get("scheme") == "https" else "http"
    return f"{scheme}://{host}"


class ResourceServer:
    """Checks the bearer credential of every request; serves the resource's metadata."""

    def __init__(self, config: AuthConfig, *, path: str = "/mcp") -> None:
        problem = config.problem()
        if problem is not None:
            raise ValueError(problem)
        self.config = config
        self.path = "/" + path.strip("/")
        self.verifier: JwtVerifier | None = None
        self.keys: SecretsFile | None = None
        if config.issuer is not None:
            from engine.identity.jwt import JwtVerifier

            assert config.audience is not None
            self.verifier = JwtVerifier(
                issuer=config.issuer,
                audience=config.audience,
                jwks_url=config.jwks_url,
                leeway_seconds=config.leeway_seconds,
                roles_claim=config.roles_claim,
            )
        self._metadata_paths = {WELL_KNOWN, WELL_KNOWN + self.path}
        if config.audience is not None:
            resource_path = urlsplit(config.audience).path.rstrip("/")
            self._metadata_paths.add(WELL_KNOWN + resource_path)

    async def start(self) -> None:
        """Load the keys file and the issuer's keys; IdentityUnavailable when either
        cannot be used."""
        if self.config.keys_file is not None:
            self.keys = SecretsFile(
                self.config.keys_file,
                kind="api_key",
                check_interval=self.config.keys_check_interval,
            )
        if self.verifier is not None:
            await self.verifier.start()

    async def close(self) -> None:
        if self.verifier is not None:
            await self.verifier.close()

    # -- metadata (RFC 9728) -----------------------------------------------------------

    def serves(self, path: str) -> bool:
        return path in self._metadata_paths or path.rstrip("/") in self._metadata_paths

    def resource(self, scope: Scope) -> str:
        if self.config.audience is not None:
            return self.config.audience
        return _origin(scope) + self.path

    def metadata_url(self, scope: Scope) -> str:
        """Where the metadata of this resource is (RFC 9728 §3.1: the well-known part
        goes between the resource's origin and its path)."""
        parts = urlsplit(self.resource(scope))
        return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path.rstrip('/')}"

    def metadata(self, scope: Scope) -> dict[str, Any]:
        document: dict[str, Any] = {"resource": self.resource(scope)}
        if self.config.issuer is not None:
            document["authorization_servers"] = [self.config.issuer]
        document["scopes_supported"] = list(self.config.required_scopes)
        document["bearer_methods_supported"] = list(BEARER_METHODS)
        document["resource_name"] = "mcp-policy proxy"
        return document

    def metadata_response(self, scope: Scope) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            return Response("Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"})
        return Response(
            json.dumps(self.metadata(scope)),
            media_type="application/json",
            headers={
                "Cache-Control": f"public, max-age={METADATA_MAX_AGE}",
                "Access-Control-Allow-Origin": "*",
            },
        )

    # -- credentials -------------------------------------------------------------------

    async def authenticate(self, scope: Scope) -> Identity | Response:
        """The identity the request's bearer credential proves, or the response that
        refuses it (401, 403 or 503)."""
        query = scope.get("query_string", b"").decode("latin-1")
        if query and any(name == "access_token" for name, _ in parse_qsl(query, True)):
            return self.refusal(
                scope,
                401,
                "invalid_request",
                "a token in the URL is never accepted: send it as Authorization: Bearer <token>",
            )
        values = [v for k, v in scope.get("headers", []) if k == b"authorization"]
        if not values:
            return self.refusal(scope, 401, None, "this MCP endpoint needs a bearer token")
        if len(values) > 1:
            return self.refusal(scope, 401, "invalid_request", "more than one Authorization header")
        header = values[0].decode("latin-1")
        if len(header) > MAX_AUTHORIZATION_CHARS:
            return self.refusal(scope, 401, "invalid_token", "malformed token: too long")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return self.refusal(
                scope,
                401,
                "invalid_request",
                "the Authorization header must be 'Bearer <token>'",
            )
        if not _TOKEN68.fullmatch(token):
            return self.refusal(scope, 401, "invalid_token", "malformed token")
        try:
            identity = await self._verify(token)
        except CredentialRejected as exc:
            log.info("refused a bearer credential: %s", exc.message)
            return self.refusal(scope, 401, exc.error, exc.message)
        except IdentityUnavailable as exc:
            log.error("cannot check credentials: %s", exc.message)
            return _json_rpc_error(
                503, INTERNAL_ERROR, "the proxy cannot check credentials right now", None
            )
        if identity.method == "jwt":
            missing = [s for s in self.config.required_scopes if s not in identity.scopes]
            if missing:
                return self.refusal(
                    scope,
                    403,
                    "insufficient_scope",
                    f"the token lacks the scope {' '.join(missing)}",
                )
        return identity

    async def _verify(self, token: str) -> Identity:
        keys, verifier = self.keys, self.verifier
        if keys is not None and (verifier is None or not looks_like_jwt(token)):
            identity = keys.lookup(token)
            if identity is not None:
                return identity
            if verifier is None:
                raise CredentialRejected("unknown or revoked API key")
            raise CredentialRejected("neither a JWT nor a known (unrevoked) API key")
        assert verifier is not None
        return await verifier.verify(token)

    def challenge(self, scope: Scope, error: str | None, description: str) -> str:
        """The `WWW-Authenticate` value (RFC 6750 §3, RFC 9728 §5.1)."""
        parts = [f'resource_metadata="{self.metadata_url(scope)}"']
        if error is not None:
            parts.append(f'error="{error}"')
            parts.append(f'error_description="{_challenge_text(description)}"')
        if self.config.required_scopes and self.verifier is not None:
            parts.append(f'scope="{" ".join(self.config.required_scopes)}"')
        return "Bearer " + ", ".join(parts)

    def refusal(self, scope: Scope, status: int, error: str | None, description: str) -> Response:
        data: dict[str, Any] = {"resource_metadata": self.metadata_url(scope)}
        if error is not None:
            data["error"] = error
            data["error_description"] = description
        what = "Forbidden" if status == 403 else "Unauthorized"
        response = _json_rpc_error(status, INVALID_REQUEST, f"{what}: {description}", data)
        response.headers["WWW-Authenticate"] = self.challenge(scope, error, description)
        return response


def _json_rpc_error(status: int, code: int, message: str, data: Any) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    body = {"jsonrpc": "2.0", "id": None, "error": error}
    return Response(json.dumps(body), status_code=status, media_type="application/json")
