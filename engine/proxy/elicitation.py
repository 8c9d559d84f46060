"""The agent's MCP client asks its own user: URL-mode elicitation for a call that needs
a human's approval.

When a tools/call is answered `approval_required` and the decision carries the approval's
page in the console (`approval.url`), the proxy can send the user of the agent's MCP client
to that page instead of answering with the refusal text:

- protocol 2025-11-25, a client that declared `capabilities.elicitation.url` at
  initialize: the proxy sends it `elicitation/create` (`mode: "url"`, an `elicitationId`,
  the URL, a message naming the tool and the policy's reason) while it holds the call. The
  client's answer is the client's word only: `accept` means its user agreed to open the
  page, never that anyone approved. On accept the proxy waits for the approval
  (AwaitApproval, up to its expiry or `--elicitation-wait`), sends
  `notifications/elicitation/complete` once it is decided, and decides the identical call
  again: approved, it is forwarded; denied, the agent reads the approver's comment. On
  decline or cancel the agent gets the approval_required refusal at once (the approval
  stays pending). With `--elicitation-wait 0` the proxy holds no call: it answers with the
  spec's URLElicitationRequiredError (-32042) carrying the same elicitation, and sends the
  completion notification when the approval is decided; the client retries the identical
  call then, which the service lets through once it is granted.
- protocol 2026-07-28 (no server-initiated requests): the tools/call is answered with an
  input-required result whose one input request is the URL-mode elicitation, and a
  `requestState` the proxy signs (HMAC-SHA256, Python's hmac module, under a per-proxy
  secret) and binds to this exact call: the principal, the session, the server, the call's
  fingerprint (server, tool, canonical arguments), the approval id and an expiry. The
  client's retry with `inputResponses` and that state is forwarded only if the state
  verifies, matches the retried call exactly, has not been used before, and the service
  then lets the call through with that approval (the grant is used once). A forged,
  altered, expired, foreign or replayed state is a JSON-RPC error (-32602): nothing is
  decided, forwarded or used.

Approval is only ever what the approval store says. A client that declared no URL mode
(or a decision without a URL) gets today's behaviour: the refusal text, or with
`--approval-wait` the proxy waits for the approval before answering.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    URL_ELICITATION_REQUIRED,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS, is_version_at_least

from engine import jsonstrict
from engine.identity.base import Identity
from engine.models import Decision, Principal
from engine.service import DECISION_META_KEY

# Where the proxy's elicitation goes in a 2026-07-28 input-required result (and its answer
# in the retry's `inputResponses`).
INPUT_KEY: Final = "mcp-policy/approval"
# The first protocol version with URL-mode elicitation.
URL_MODE_SINCE: Final = "2025-11-25"
# How long the proxy holds a call for a human, at most (and never past the approval's
# expiry): the default approval lifetime of the service.
DEFAULT_WAIT: Final = 900.0
# A requestState lives until the approval expires, and never longer than this.
MAX_STATE_TTL: Final = 3600.0
SECRET_ENV: Final = "MCP_POLICY_ELICITATION_SECRET"
MIN_SECRET_BYTES: Final = 32
# The requestStates that were used, remembered until they expire (at most this many: past
# it the oldest are forgotten, and the service still lets a grant through only once).
SPENT_CAPACITY: Final = 100_000

_STATE_PREFIX: Final = "mcp-policy.1."
_STATE_VERSION: Final = 1
_MAX_STATE_CHARS: Final = 4096
_REASON_END: Final = "; a human must approve this call first"

Action = Literal["accept", "decline", "cancel"]
ACTIONS: Final = ("accept", "decline", "cancel")


class StateRefused(Exception):  # noqa: N818 - a refusal answered to the client, not a fault
    """A requestState that must not be acted on; the message says why (for the client)."""


@dataclass(frozen=True)
class CallBinding:
    """What a requestState is bound to: who calls (a digest of the principal and the
    credential that proved it), in which session, on which server, and which call."""

    principal: str
    session: str
    server: str
    call: str

    @classmethod
    def of(
        cls,
        principal: Principal,
        identity: Identity | None,
        *,
        server: str,
        tool: str,
        arguments: Any,
    ) -> CallBinding | None:
        """The binding of a call; None when its arguments have no canonical JSON (they
        could then match no state)."""
        who = {
            "agent_id": principal.agent_id,
            "user_id": principal.user_id,
            "credential": [identity.method, identity.subject] if identity is not None else None,
        }
        try:
            call = jsonstrict.sha256_hex({"server": server, "tool": tool, "arguments": arguments})
        except (TypeError, ValueError, UnicodeError):
            return None
        return cls(jsonstrict.sha256_hex(who), principal.session_id, server, call)


class RequestStates:
    """Signs the proxy's requestStates and checks the ones clients send back.

    A state is `mcp-policy.1.<payload>.<mac>`: the payload is base64url JSON (the binding,
    the approval id, an expiry and a nonce), the mac HMAC-SHA256 over the prefix and the
    payload. A state verifies once: its nonce is remembered as spent until it expires.
    """

    def __init__(self, secret: bytes, *, capacity: int = SPENT_CAPACITY) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the requestState secret must be at least {MIN_SECRET_BYTES} bytes "
                '(python -c "import secrets; print(secrets.token_hex(32))")'
            )
        self._key = secret
        self._capacity = capacity
        self._spent: OrderedDict[str, float] = OrderedDict()

    @classmethod
    def ephemeral(cls) -> RequestStates:
        """Under a random key held only by this process (states do not survive a restart
        of the proxy, nor pass between replicas)."""
        return cls(secrets.token_bytes(MIN_SECRET_BYTES))

    @classmethod
    def from_environment(cls, variable: str = SECRET_ENV) -> RequestStates:
        """Under the secret in `variable` when set (replicas that share it accept each
        other's states), else an ephemeral one; ValueError for a secret that is too short."""
        value = os.environ.get(variable)
        if not value:
            return cls.ephemeral()
        return cls(value.encode())

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._key, (_STATE_PREFIX + payload).encode(), hashlib.sha256).digest()
        return _b64(digest)

    def issue(self, binding: CallBinding, approval_id: str, expires_at: float) -> str:
        """A state for `binding` and `approval_id`, good until `expires_at` (epoch seconds)
        and never for more than MAX_STATE_TTL."""
        claims = {
            "v": _STATE_VERSION,
            "approval": approval_id,
            "principal": binding.principal,
            "session": binding.session,
            "server": binding.server,
            "call": binding.call,
            "exp": min(expires_at, time.time() + MAX_STATE_TTL),
            "nonce": uuid.uuid4().hex,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{_STATE_PREFIX}{payload}.{self._mac(payload)}"

    def redeem(self, token: str, binding: CallBinding) -> tuple[str, float]:
        """The approval id and expiry of a state issued for exactly `binding`, which is
        spent by this (a second redeem of it is refused); StateRefused otherwise."""
        if not is_ours(token) or len(token) > _MAX_STATE_CHARS or not token.isascii():
            raise StateRefused("requestState is not one this proxy issued")
        payload, dot, mac = token[len(_STATE_PREFIX) :].partition(".")
        if not dot or not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            raise StateRefused("requestState does not verify (forged or altered)")
        try:
            claims = json.loads(_unb64(payload))
            approval_id, expires, nonce = claims["approval"], claims["exp"], claims["nonce"]
        except (ValueError, KeyError, TypeError) as exc:  # signed, so never expected
            raise StateRefused("requestState does not verify (malformed)") from exc
        if claims.get("v") != _STATE_VERSION or not isinstance(approval_id, str):
            raise StateRefused("requestState does not verify (malformed)")
        now = time.time()
        if not isinstance(expires, int | float) or not now < expires:
            raise StateRefused("requestState expired; call the tool again")
        bound = CallBinding(
            claims.get("principal"), claims.get("session"), claims.get("server"), claims.get("call")
        )
        if bound != binding:
            raise StateRefused(
                "requestState was issued for another call, principal or session: retry "
                "exactly the call it was issued for, unchanged"
            )
        if not isinstance(nonce, str) or nonce in self._spent:
            raise StateRefused("requestState was already used; call the tool again")
        self._spend(nonce, float(expires), now)
        return approval_id, float(expires)

    def _spend(self, nonce: str, expires: float, now: float) -> None:
        spent = self._spent
        spent[nonce] = expires
        while spent:
            oldest, until = next(iter(spent.items()))
            if until > now and len(spent) <= self._capacity:
                break
            del spent[oldest]


def is_ours(state: Any) -> bool:
    """Whether a retry's requestState is one of the proxy's (any other is the upstream's,
    and goes to it untouched)."""
    return isinstance(state, str) and state.startswith(_STATE_PREFIX)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


@dataclass(frozen=True)
class ElicitationOptions:
    """How the proxy asks the agent's client (the same for every session of a proxy)."""

    enabled: bool = True
    # Seconds a call is held for a human at most (never past the approval's expiry); 0
    # holds none (2025-11-25: the -32042 error form).
    wait: float = DEFAULT_WAIT
    states: RequestStates = field(default_factory=RequestStates.ephemeral, compare=False)


# What a client can do.


def url_mode(capabilities: Any) -> bool:
    """Whether client capabilities declare URL-mode elicitation (`elicitation.url`; an
    empty `elicitation` means form mode only)."""
    if not isinstance(capabilities, dict):
        return False
    elicitation = capabilities.get("elicitation")
    return isinstance(elicitation, dict) and isinstance(elicitation.get("url"), dict)


def handshake_url_mode(version: str | None, capabilities: Any) -> bool:
    """A session of the initialize handshake at `version` whose client declared
    `capabilities` at initialize can be sent a URL-mode elicitation."""
    return (
        version is not None
        and version not in MODERN_PROTOCOL_VERSIONS
        and is_version_at_least(version, URL_MODE_SINCE)
        and url_mode(capabilities)
    )


def stateless_url_mode(params: dict[str, Any]) -> bool:
    """A 2026-07-28 request (its `_meta` names the version) from a client whose per-request
    capabilities declare URL-mode elicitation."""
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return False
    return meta.get(PROTOCOL_VERSION_META_KEY) in MODERN_PROTOCOL_VERSIONS and url_mode(
        meta.get(CLIENT_CAPABILITIES_META_KEY)
    )


# What the proxy sends.


def message_for(server: str, tool: str, decision: Decision) -> str:
    """The words the client shows its user: the tool, the server and the policy's reason."""
    reason = decision.reason
    end = reason.find(_REASON_END)
    if end > 0:
        reason = reason[:end]
    return (
        f"The call of tool {tool!r} on {server} needs a human's approval: {reason}. "
        "Open the page to see the call and approve or deny it."
    )


def url_params(message: str, url: str, elicitation_id: str | None) -> dict[str, Any]:
    """`elicitation/create` params in URL mode (2026-07-28 has no elicitationId)."""
    params: dict[str, Any] = {"mode": "url", "message": message, "url": url}
    if elicitation_id is not None:
        params["elicitationId"] = elicitation_id
    return params


def complete_params(elicitation_id: str) -> dict[str, Any]:
    """`notifications/elicitation/complete` params."""
    return {"elicitationId": elicitation_id}


def url_required_error(
    request_id: Any, message: str, url: str, elicitation_id: str
) -> dict[str, Any]:
    """The JSON-RPC error URLElicitationRequiredError (-32042), as a message."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": URL_ELICITATION_REQUIRED,
            "message": "This call needs a human's approval: open the page, then call again.",
            "data": {"elicitations": [url_params(message, url, elicitation_id)]},
        },
    }


def input_required(message: str, url: str, state: str, decision: Decision) -> dict[str, Any]:
    """A 2026-07-28 input-required result: the URL-mode elicitation and the signed state,
    with the decision under `_meta["mcp-policy/decision"]` as a refusal has it."""
    shown = decision.model_dump(
        mode="json", exclude={"mcp_result", "outcome_token"}, exclude_none=True
    )
    return {
        "resultType": "input_required",
        "inputRequests": {
            INPUT_KEY: {"method": "elicitation/create", "params": url_params(message, url, None)}
        },
        "requestState": state,
        "_meta": {DECISION_META_KEY: shown},
    }


def new_elicitation_id() -> str:
    return "mcp-policy-" + uuid.uuid4().hex


# What the client answers.


def answered(result: Any) -> Action | None:
    """The action of an ElicitResult (an `elicitation/create` result, or the proxy's entry
    of a retry's `inputResponses`); None when it is not one."""
    action = result.get("action") if isinstance(result, dict) else None
    return action if action in ACTIONS else None


@dataclass(frozen=True)
class Retry:
    """A 2026-07-28 retry carrying the proxy's requestState: the state, the client's answer
    to the proxy's elicitation (None: none), and the call's params without either."""

    state: str
    action: Action | None
    params: dict[str, Any]


def retry_of(params: dict[str, Any]) -> Retry | None:
    """The retry in a tools/call's params, when its requestState is the proxy's. The
    retry's `requestState` and `inputResponses` answer the proxy alone (the upstream never
    asked for anything): both are taken out of what is forwarded."""
    state = params.get("requestState")
    if not is_ours(state):
        return None
    assert isinstance(state, str)
    responses = params.get("inputResponses")
    action = answered(responses.get(INPUT_KEY)) if isinstance(responses, dict) else None
    rest = {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}
    return Retry(state, action, rest)
