"""Who may ask for decisions, and the agent credentials a decision may carry.

`DecisionClients` proves the caller of `Decide` / `ReportOutcome` (a proxy or gateway):
by its TLS client certificate (the name `engine.transports.tls` checked) or by a bearer client
token from the clients file (`mcp-policy clients add`). With neither configured the
service answers anyone who reaches it (loopback, one user); with either, a caller that
proves nothing gets UNAUTHENTICATED / 401 before anything is parsed, decided, logged as a
decision or counted.

`AgentCredentials` verifies the agent's own credential when a request carries one
(`credential`: the agent's raw bearer token, a JWT from the configured issuer or an API
key from the keys file): the principal then comes from the credential, never from the
request's self-declared fields.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from engine.errors import Unauthenticated
from engine.identity.base import CredentialRejected, Identity
from engine.identity.jwt import JwtVerifier
from engine.identity.secrets_file import SecretsFile


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def gateway_session(
    header: str | None, *, credential: str | None, agent: str | None, peer: str | None
) -> str:
    """The agent session of a call a gateway forwards: its `Mcp-Session-Id`, else one
    derived from the agent's credential, else from the agent the gateway names, else from
    the client's address — never one session shared by every caller without a header."""
    if header:
        return header
    for kind, value in (("credential", credential), ("agent", agent), ("peer", peer)):
        if value:
            digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
            return f"{kind}-{digest[:32]}"
    return "anonymous"


class DecisionClients:
    """Proves the callers of the decision API."""

    def __init__(self, *, clients_file: Path | None, mtls: bool) -> None:
        self._file = SecretsFile(clients_file, kind="client_token") if clients_file else None
        self._mtls = mtls

    @property
    def required(self) -> bool:
        return self._file is not None or self._mtls

    def authenticate(self, authorization: str | None, peer: str | None) -> str | None:
        """The proven caller's name (None when nothing is required and nothing proven);
        raise Unauthenticated otherwise."""
        token = bearer(authorization)
        if token is not None and self._file is not None:
            found = self._file.lookup(token)
            if found is not None:
                return found.subject
            raise CredentialRejected("the client token is not valid (unknown or revoked)")
        if peer is not None:
            return f"tls:{peer}"
        if self.required:
            raise Unauthenticated(
                "the decision API needs a client certificate or Authorization: Bearer "
                "<client token>"
            )
        return None


class AgentCredentials:
    """Verifies an agent credential sent with a decision request."""

    def __init__(
        self,
        *,
        keys_file: Path | None = None,
        verifier: JwtVerifier | None = None,
    ) -> None:
        self._keys = SecretsFile(keys_file, kind="api_key") if keys_file else None
        self._verifier = verifier

    @property
    def configured(self) -> bool:
        return self._keys is not None or self._verifier is not None

    async def start(self) -> None:
        if self._verifier is not None:
            await self._verifier.start()

    async def close(self) -> None:
        if self._verifier is not None:
            with contextlib.suppress(Exception):
                await self._verifier.close()

    async def verify(self, credential: str) -> Identity:
        """The identity `credential` proves; CredentialRejected when it proves none."""
        if not self.configured:
            raise CredentialRejected(
                "this service verifies no agent credentials (set MCP_POLICY_AGENT_ISSUER "
                "or MCP_POLICY_AGENT_KEYS_FILE)"
            )
        looks_like_jwt = credential.count(".") == 2
        if self._keys is not None and not looks_like_jwt:
            found = self._keys.lookup(credential)
            if found is not None:
                return found
            raise CredentialRejected("the API key is not valid (unknown or revoked)")
        if self._verifier is None:
            raise CredentialRejected("the credential is not a valid API key")
        return await self._verifier.verify(credential)
