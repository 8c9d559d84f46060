"""Who may approve, deny and look at approvals, and who is the operator: one place.

Three credentials are accepted on the approval API and the operator routes (decision
log, status, policy reload), as `Authorization: Bearer <credential>`:

- the **operator token** (`MCP_POLICY_APPROVER_TOKEN`, or the random one printed at
  start): always the operator. It is also an approver, named "operator", but only in
  *single-token mode*, when neither an approvers file nor an approver issuer is
  configured; with named approvers it may still list and read approvals, never decide.
- a **named approver** from the approvers file (`MCP_POLICY_APPROVERS_FILE`, managed with
  `mcp-policy approvers add|list|revoke`): a person, named by the entry, with an optional
  user_id and optional allowed servers/tools. An entry whose roles include "operator" may
  use the operator routes too; one whose roles include "caller" (`approvers add
  --caller-only`) is a user rather than an approver: it decides only its own agents' calls
  the policy lets the caller approve. A revoked entry stops working within seconds (401).
- an **OIDC/JWT approver** (`MCP_POLICY_APPROVER_ISSUER` + `_AUDIENCE`): a token the
  issuer signed whose role claim (`approver_role_claim`, default "roles") includes
  `approver_role` (default "approver"), named by its `sub` (also its user_id). The
  optional claims `mcp_policy_servers` / `mcp_policy_tools` (a list of strings or a
  space-separated string) limit it like the file's allowed servers/tools. JWT approvers
  are never operators.

`ApproverAuth.authenticate` proves one of them and returns the `Identity`; its `roles`
are what it may do here: "approver" (decide approvals) and/or "operator". The rules of
what an approver may view, approve or deny (four eyes, allowed servers/tools) are
`refusal` and `check_may_act`, used by every surface: reading one approval, deciding it,
and listing (the service's `page_approvals` pages through the store keeping only what
`refusal` lets the approver view). The body's `approver` field is checked by
`recorded_name`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from engine.errors import InvalidRequest, PermissionDenied, StateUnavailable, Unauthenticated
from engine.identity.base import CredentialRejected, Identity, IdentityUnavailable
from engine.identity.jwt import claim_words
from engine.identity.secrets_file import SecretsFile
from engine.models import Approval

if TYPE_CHECKING:
    from engine.identity.jwt import JwtVerifier
    from engine.settings import Settings

log = logging.getLogger(__name__)

APPROVER = "approver"  # may approve and deny (subject to four eyes and its allowed set)
# An approvers-file entry with this role is a user, not an approver: it may decide only the
# calls of its own agents that the policy lets the caller approve (`is_caller`).
CALLER = "caller"
OPERATOR = "operator"  # may read the decision log and status, reload the policy
OPERATOR_NAME = "operator"  # the name the operator token goes by
# Identity.claims key saying which credential proved an approver identity (JWT approvers
# are told apart by Identity.method, so a token's own claims can never pose as another).
CREDENTIAL = "credential"
SERVERS_CLAIM = "mcp_policy_servers"
TOOLS_CLAIM = "mcp_policy_tools"
MAX_SCOPE_VALUES = 256
MAX_SCOPE_CHARS = 256
# After the issuer could not be reached, approver JWTs are answered 503 for this long
# before the next attempt (so a flood of tokens cannot make the service hammer it).
ISSUER_RETRY_SECONDS = 5.0

# "oidc": a person signed in to the console through the approvers' OpenID Provider.
Credential = Literal["operator_token", "approvers_file", "jwt", "oidc"]
Verb = Literal["approve", "deny", "view"]

_NEEDS = "the approval API needs Authorization: Bearer <approver credential>"


def credential_of(identity: Identity) -> Credential:
    """Which credential proved `identity` (one from `ApproverAuth.authenticate`)."""
    if identity.method == "jwt":
        return "jwt"
    if identity.method == "oidc":
        return "oidc"
    if identity.claims.get(CREDENTIAL) == "operator_token":
        return "operator_token"
    return "approvers_file"


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated(_NEEDS)
    scheme, _, token = authorization.partition(" ")  # compared exactly: no stripping
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(_NEEDS)
    return token


def _words(claims: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    """A claim that is a list of strings or a space-separated string; None when absent."""
    return claim_words(claims, name, max_values=MAX_SCOPE_VALUES, max_chars=MAX_SCOPE_CHARS)


def allowed_from_claims(claims: Mapping[str, Any]) -> Mapping[str, tuple[str, ...]]:
    """The servers/tools a person proven by issuer claims may act on (`Identity.allowed`):
    the `mcp_policy_servers` / `mcp_policy_tools` claims, each absent: no limit. Shared by
    approver JWTs and the console's OpenID Connect sign-in. CredentialRejected for a claim
    of the wrong shape."""
    allowed: dict[str, tuple[str, ...]] = {}
    for key, claim in (("servers", SERVERS_CLAIM), ("tools", TOOLS_CLAIM)):
        values = _words(claims, claim)
        if values is not None:
            allowed[key] = values
    return MappingProxyType(allowed)


class ApproverAuth:
    """Proves approver and operator credentials; see the module docstring."""

    def __init__(
        self,
        *,
        operator_token: str,
        approvers: SecretsFile | None = None,
        jwt: JwtVerifier | None = None,
        approver_role: str = "approver",
    ) -> None:
        if not operator_token:
            raise ValueError("the operator token must not be empty")
        self._operator_token = operator_token.encode()
        self.approvers = approvers
        self.jwt = jwt
        self.approver_role = approver_role
        self.single_token = approvers is None and jwt is None
        roles = (OPERATOR, APPROVER) if self.single_token else (OPERATOR,)
        self.operator = Identity(
            method="approver",
            subject=OPERATOR_NAME,
            roles=roles,
            claims=MappingProxyType({CREDENTIAL: "operator_token"}),
        )
        self._jwt_started = False
        self._jwt_attempted_at: float | None = None
        self._jwt_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, operator_token: str) -> ApproverAuth:
        """From `approvers_file` and `approver_issuer`/`_audience`/`_jwks_url`/`_role*`.

        IdentityUnavailable when the approvers file is missing or invalid (a service told
        to use named approvers must not start without them)."""
        approvers = None
        if settings.approvers_file is not None:
            approvers = SecretsFile(settings.approvers_file, kind="approver")
        verifier = None
        if settings.approver_issuer is not None:
            from engine.identity.jwt import JwtVerifier

            if not settings.approver_audience:
                raise ValueError("approver_issuer needs approver_audience")
            verifier = JwtVerifier(
                issuer=settings.approver_issuer,
                audience=settings.approver_audience,
                jwks_url=settings.approver_jwks_url,
                roles_claim=settings.approver_role_claim,
            )
        return cls(
            operator_token=operator_token,
            approvers=approvers,
            jwt=verifier,
            approver_role=settings.approver_role,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch the approver issuer's keys, when one is configured. An issuer that cannot
        be reached does not stop the service (decisions need no approver): it is logged,
        approver JWTs are answered 503 and the issuer is tried again on use."""
        if self.jwt is None:
            return
        try:
            await self._start_jwt()
        except StateUnavailable as exc:
            log.warning("approver tokens cannot be verified yet: %s", exc.message)

    async def close(self) -> None:
        if self.jwt is not None:
            await self.jwt.close()
            self._jwt_started = False

    async def _start_jwt(self) -> None:
        assert self.jwt is not None
        async with self._jwt_lock:
            if self._jwt_started:
                return
            now = time.monotonic()
            if (
                self._jwt_attempted_at is not None
                and now - self._jwt_attempted_at < ISSUER_RETRY_SECONDS
            ):
                raise StateUnavailable(
                    "the approver token issuer could not be reached; try again shortly"
                )
            self._jwt_attempted_at = now
            try:
                await self.jwt.start()
            except IdentityUnavailable as exc:
                raise StateUnavailable(
                    f"the approver token issuer is unavailable: {exc.message}"
                ) from None
            self._jwt_started = True

    # -- authentication ----------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Identity:
        """The approver or operator `authorization` proves.

        Unauthenticated (401) without a bearer credential, or for one no configured source
        knows (a revoked or unknown approver token, an invalid or expired JWT) when named
        approvers are configured; PermissionDenied (403) for a valid token that is not an
        approver's (a JWT without the approver role) and, in single-token mode, for any
        token but the operator token (as before named approvers existed)."""
        token = _bearer(authorization)
        if hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._operator_token):
            return self.operator
        if self.approvers is not None:
            found = self.approvers.lookup(token)
            if found is not None:
                return self._file_approver(found)
        if self.jwt is not None and token.count(".") == 2:
            return await self._jwt_approver(token)
        if self.single_token:
            raise PermissionDenied("the credential presented is not the approver credential")
        raise CredentialRejected(
            "the credential presented is no approver credential: unknown, revoked or expired"
        )

    def _file_approver(self, found: Identity) -> Identity:
        person = (CALLER,) if CALLER in found.roles else (APPROVER,)
        roles = (*person, OPERATOR) if OPERATOR in found.roles else person
        return replace(
            found,
            roles=roles,
            claims=MappingProxyType({**found.claims, CREDENTIAL: "approvers_file"}),
        )

    async def _jwt_approver(self, token: str) -> Identity:
        assert self.jwt is not None
        if not self._jwt_started:
            await self._start_jwt()
        proven = await self.jwt.verify(token)  # CredentialRejected: 401
        if proven.user_id is None:
            raise PermissionDenied(
                "an approver token must name a person: this one has no sub claim"
            )
        if self.approver_role not in proven.roles:
            raise PermissionDenied(
                f"the token of {proven.user_id!r} is not an approver's: its "
                f"{self.jwt.roles_claim!r} claim does not include {self.approver_role!r}"
            )
        return Identity(
            method="jwt",
            subject=proven.user_id,
            agent_id=proven.agent_id,
            user_id=proven.user_id,
            roles=(APPROVER,),
            session_id=proven.session_id,
            claims=proven.claims,
            allowed=allowed_from_claims(proven.claims),
        )

    def require_operator(self, identity: Identity) -> Identity:
        if OPERATOR not in identity.roles:
            raise PermissionDenied(
                f"{identity.subject!r} is an approver, not an operator: the decision log, "
                "status and policy reload need the operator credential (the approver token) "
                'or an approvers-file entry with role "operator"'
            )
        return identity


# -- what an approver may act on -------------------------------------------------------------


def _listed(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values) or "none"


def is_caller(identity: Identity, approval: Approval) -> bool:
    """Whether `identity` is the person behind the call `approval` holds, as far as the
    approval's `approvable_by: caller` needs: a person who signed in (OIDC at the console,
    or an approvers-file entry; never a bearer JWT, which an agent may hold too) whose
    user_id is the call's user, and that user was proven (by the agent's credential or by
    a known proxy that verified it), not merely asserted."""
    return (
        credential_of(identity) in ("oidc", "approvers_file")
        and identity.user_id is not None
        and identity.user_id == approval.principal.user_id
        and approval.principal_proof != "none"
    )


def refusal(identity: Identity, approval: Approval, verb: Verb) -> str | None:
    """Why `identity` may not `verb` `approval`, or None when it may.

    An approval the policy lets the caller decide (`approvable_by: caller`) may be
    decided by the proven user behind the call (`is_caller`), as well as by approvers."""
    if approval.approvable_by == "caller" and is_caller(identity, approval):
        return None
    if credential_of(identity) == "operator_token":
        # The operator token proves no person, so there is no "own call" to refuse; with
        # named approvers configured it may only view.
        if verb != "view" and APPROVER not in identity.roles:
            return (
                "the operator credential cannot approve or deny while named approvers are "
                "configured: use your own approver credential"
            )
        return None
    if APPROVER not in identity.roles:
        return f"{identity.subject!r} is not an approver"
    name = identity.subject
    principal = approval.principal
    own = {identity.subject, identity.user_id, identity.agent_id} - {None}
    for field, value in (("user_id", principal.user_id), ("agent_id", principal.agent_id)):
        if value is not None and value in own:
            if verb == "view":
                return f"{name!r} cannot view a call made on their own behalf"
            return (
                f"{name!r} cannot {verb} a call made on their own behalf (the call's "
                f"{field} is {value!r}): another approver must decide it"
            )
    servers: Sequence[str] | None = identity.allowed.get("servers")
    if servers is not None and approval.server not in servers:
        return (
            f"{name!r} may not {verb} calls to server {approval.server!r} (tool "
            f"{approval.tool!r}); allowed servers: {_listed(servers)}"
        )
    tools: Sequence[str] | None = identity.allowed.get("tools")
    if tools is not None and approval.tool not in tools:
        return (
            f"{name!r} may not {verb} calls of tool {approval.tool!r}; allowed tools: "
            f"{_listed(tools)}"
        )
    return None


def check_may_act(identity: Identity, approval: Approval, verb: Verb) -> None:
    """PermissionDenied, saying why, unless `identity` may `verb` `approval`."""
    reason = refusal(identity, approval, verb)
    if reason is not None:
        raise PermissionDenied(reason)


def recorded_name(identity: Identity, declared: str | None) -> str:
    """The approver name an approval records: the proven one, never the body's.

    A body `approver` equal to the proven name (or none) is accepted; another is refused
    (InvalidRequest: 422 / INVALID_ARGUMENT). The operator token in single-token mode,
    which proves no person, records "operator" and ignores the body's name (clients of
    that mode always sent one)."""
    if declared is None or declared == identity.subject:
        return identity.subject
    if credential_of(identity) == "operator_token":
        return identity.subject
    raise InvalidRequest(
        f"approver is taken from your credential: you are {identity.subject!r}, not "
        f"{declared[:256]!r}; leave the field out",
        field="approver",
    )
