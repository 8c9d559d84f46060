"""What every credential check returns: a proven `Identity`, or `CredentialRejected`.

The verifiers (`jwt.JwtVerifier`, `secrets_file.SecretsFile`, TLS peers) each prove one
kind of credential; the transports turn the result into `input.principal` (agents) or
into the right to ask for decisions (proxies) and to approve calls (approvers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import EngineError, Unauthenticated

# "oidc": a person who signed in to the approvals console through an OpenID Provider.
Method = Literal["jwt", "api_key", "client_token", "tls", "approver", "oidc"]


@dataclass(frozen=True)
class Identity:
    """Who proved themselves, and how. Only what the credential proved is here."""

    method: Method
    # The proven name: a JWT's `sub` (or `client_id` for client-credential tokens), the
    # key's, client's or approver's name in its file, a certificate's SAN.
    subject: str
    agent_id: str | None = None
    user_id: str | None = None
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    session_id: str | None = None  # a JWT's `sid` claim when present
    # Every verified claim (JWT), or the entry's public fields (files): never a secret.
    claims: Mapping[str, Any] = field(default_factory=dict)
    # Restrictions from a file entry, e.g. {"servers": (...), "tools": (...)} for approvers.
    allowed: Mapping[str, Any] = field(default_factory=dict)


class CredentialRejected(Unauthenticated):
    """A credential was presented and is not valid; `message` says what is wrong with it.

    `error` is the RFC 6750 error code for the `WWW-Authenticate` challenge
    (`invalid_token`, `invalid_request`, `insufficient_scope`).
    """

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.error = error


class IdentityUnavailable(EngineError):
    """An identity source cannot be used: the issuer's metadata or JWKS could not be
    fetched or are unusable, or a credentials file is missing or invalid."""
