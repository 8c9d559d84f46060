"""Credentials: JWT/JWKS bearer tokens, API keys, client tokens, approvers (TLS peers next).

Every check returns an `Identity` (what was proven) or raises `CredentialRejected`.
`JwtVerifier` is imported on first use, so commands that never verify a JWT do not load
PyJWT and cryptography.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.identity.base import CredentialRejected, Identity, IdentityUnavailable, Method
from engine.identity.secrets_file import (
    Kind,
    SecretEntry,
    SecretsFile,
    add_entry,
    generate_secret,
    list_entries,
    revoke_entry,
)

if TYPE_CHECKING:
    from engine.identity.jwt import JwtVerifier

__all__ = [
    "CredentialRejected",
    "Identity",
    "IdentityUnavailable",
    "JwtVerifier",
    "Kind",
    "Method",
    "SecretEntry",
    "SecretsFile",
    "add_entry",
    "generate_secret",
    "list_entries",
    "revoke_entry",
]


def __getattr__(name: str) -> Any:
    if name == "JwtVerifier":
        from engine.identity.jwt import JwtVerifier

        return JwtVerifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
