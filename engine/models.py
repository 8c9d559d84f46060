"""Typed domain of the engine: requests, policy results, decisions, approvals.

These are what `service.decide()` takes and returns. The HTTP API exposes them as they
are (so its OpenAPI schema is this file); the gRPC edge converts them to and from the
generated protobuf messages.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool
from pydantic_core import PydanticCustomError

Id = Annotated[str, Field(min_length=1, max_length=256)]

# A principal id (agent, session, user) keys rate limits, approvals and the decision log,
# compared byte for byte: " a-1" or "a-1\n" would be another principal that looks like
# a-1 wherever it is shown. So none begins or ends with whitespace (Unicode separators,
# \p{Z}) or holds a control character anywhere (C0, DEL, C1: \p{Cc}). The same rule as one
# regular expression (RE2 and Rust syntax), in the HTTP API's schema and as the
# buf.validate `pattern` of the principal fields in proto/mcppolicy/v1/types.proto.
PRINCIPAL_ID_PATTERN = r"^[^\p{Cc}\p{Z}](?:[^\p{Cc}]*[^\p{Cc}\p{Z}])?$"


def principal_id_problem(text: str) -> str | None:
    """What keeps `text` from being a principal id (PRINCIPAL_ID_PATTERN), or None."""
    if not (text.isascii() and text.isprintable()):  # printable ASCII holds no control
        for i, char in enumerate(text):
            if unicodedata.category(char) == "Cc":
                return f"holds a control character (U+{ord(char):04X}) at character {i}"
    for where, edge in (("begins", text[:1]), ("ends", text[-1:])):
        if edge and unicodedata.category(edge).startswith("Z"):
            return f"{where} with whitespace (U+{ord(edge):04X})"
    return None


def _principal_id(text: str) -> str:
    problem = principal_id_problem(text)
    if problem is not None:
        raise PydanticCustomError(
            "principal_id",
            "{problem}: a principal id never begins or ends with whitespace nor holds a "
            "control character (C0, DEL, C1)",
            {"problem": problem},
        )
    return text


PrincipalId = Annotated[
    str,
    Field(min_length=1, max_length=256, json_schema_extra={"pattern": PRINCIPAL_ID_PATTERN}),
    AfterValidator(_principal_id),
]


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    RATE_LIMITED = "rate_limited"
    APPROVAL_REQUIRED = "approval_required"


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    USED = "used"
    EXPIRED = "expired"


class Principal(BaseModel):
    """Who makes the call. Limits are kept per session unless the policy scopes them wider."""

    model_config = ConfigDict(extra="forbid")

    agent_id: PrincipalId | None = None
    session_id: PrincipalId
    user_id: PrincipalId | None = None
    roles: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=64)


class CallRequest(BaseModel):
    """The fields that name one tool call and who makes it: `tool` + `arguments`, or the
    raw JSON-RPC `message`. Shared by the call decision (`DecideRequest`) and the decision
    on its result (`DecideResultRequest`), so both are read and checked alike."""

    model_config = ConfigDict(extra="forbid")

    server: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="The MCP server the call is addressed to."
    )
    tool: str | None = Field(default=None, description="Tool name (with `arguments`).")
    arguments: Any = Field(default=None, description="Tool arguments, a JSON object.")
    message: Any = Field(
        default=None,
        description="The raw MCP JSON-RPC 2.0 `tools/call` request (object or its JSON text).",
    )
    principal: Principal
    context: dict[str, Any] = Field(default_factory=dict)
    dry_run: StrictBool = Field(
        default=False,
        description="Answer what would happen without consuming quota or creating or using "
        "approvals.",
    )
    credential: Annotated[str, Field(min_length=1, max_length=8192)] | None = Field(
        default=None,
        description="The agent's own credential (its raw bearer token: a JWT or an API key). "
        "The service verifies it and takes the principal's agent, user and roles from it; "
        "one that does not verify is denied (rule identity.invalid_credential). Never logged.",
    )
    principal_verified: StrictBool = Field(
        default=False,
        description="The caller verified the principal's agent, user and roles itself (a "
        "proxy or gateway that checked the agent's token). The service believes that only "
        "from a caller it has authenticated (a client token or certificate): from any other "
        "caller the call is denied (rule identity.unproven_caller), never decided on a "
        "principal weaker than the one the caller proved.",
    )


class DecideRequest(CallRequest):
    """One tool call to decide: `tool` + `arguments`, or the raw JSON-RPC `message`."""

    approval_id: Id | None = None


class DecideResultRequest(CallRequest):
    """The result of one tool call to decide on (POST /v1/decide-result, DecideResult): the
    call as it was decided (the same fields as DecideRequest but `approval_id`) and the
    `CallToolResult` the tool answered. Its shape (`content` a list, `isError` a boolean,
    `structuredContent` and `_meta` objects) and its strings are checked by
    `translate.tool_result`, as `arguments` is by `translate.tool_call`."""

    decision_id: Id | None = Field(
        default=None,
        description="The call decision's id, when the caller has it: recorded beside the "
        "result decision (`input.request.call_decision_id`), trusted for nothing.",
    )
    result: dict[str, Any] = Field(
        description="The MCP CallToolResult exactly as the tool answered it (`content`, "
        "`structuredContent`?, `isError`?, `_meta`?, any other keys)."
    )


class ResultAction(StrEnum):
    PASS = "pass"
    REDACT = "redact"
    BLOCK = "block"


class RedactionCount(BaseModel):
    """One redaction a result decision applied: its rule, what it replaced (a JSON path or a
    text pattern) and how many values it replaced. Never the values."""

    rule: str
    path: str | None = None
    pattern: str | None = None
    count: int = 0


class ResultShadowSpec(BaseModel):
    """A shadow contribution to a result decision: reported, never enforced."""

    model_config = ConfigDict(extra="ignore")

    level: Literal["pass", "redact", "block"]
    rule: str
    reason: str = ""


class ResultPolicyResult(BaseModel):
    """What `data.mcp.result_decision` must look like; anything else is a malformed answer.
    The redaction entries are checked where they are read (`policy.redaction.redactions_of`)."""

    model_config = ConfigDict(extra="ignore")

    action: ResultAction
    rule: Annotated[str, Field(min_length=1)]
    reason: str = ""
    redactions: list[Any] = Field(default_factory=list)
    matched: list[str] = Field(default_factory=list)
    shadow: list[ResultShadowSpec] = Field(default_factory=list)


class ResultDecision(BaseModel):
    """The answer about one tool result: pass it on as it is, pass the rewritten `result`
    (redact), or hand the agent the refusal in `result` instead (block)."""

    decision_id: str
    action: ResultAction
    rule: str
    reason: str
    policy_revision: str
    redactions: list[RedactionCount] = Field(
        default_factory=list,
        description="On redact: each redaction that replaced something (rule, path or "
        "pattern, how many values); never the values.",
    )
    matched: list[str] = Field(default_factory=list)
    shadow: list[ResultShadowSpec] = Field(default_factory=list)
    dry_run: bool | None = Field(default=None, description="True when the request was a dry run.")
    result: dict[str, Any] | None = Field(
        default=None,
        description="What to hand to the agent: null on pass (the tool's result as it is); "
        "on redact the rewritten result, on block a refusal (the reason as text, `isError` "
        'true); both carry the decision under `_meta["mcp-policy/result-decision"]`.',
    )


class ToolCall(BaseModel):
    """A validated call: what the policy sees under `input.tool`."""

    server: str
    name: str
    arguments: dict[str, Any]
    jsonrpc_id: str | int | None = None


class RateLimitSpec(BaseModel):
    """One limit from the policy result: at most `max` calls in any `window_seconds`."""

    model_config = ConfigDict(extra="ignore")

    rule: str
    max: Annotated[float, Field(gt=0)]
    window_seconds: Annotated[float, Field(gt=0)]
    scope: Literal["session", "agent", "user", "global"] = "session"
    reason: str = ""
    cost: Annotated[float, Field(ge=0)] = 1


# Who may decide an approval: the approvers (four eyes: never the call's own user or
# agent), or also the caller, the user proven behind the agent (see engine.approver_auth).
ApprovableBy = Literal["approvers", "caller"]
# How the principal of a call was established: by the agent's credential, which this
# service verified; by a known proxy or gateway that verified it (`asserted_by`); or
# neither (the caller's word).
PrincipalProof = Literal["credential", "caller", "none"]


class ApprovalSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rule: str
    reason: str = ""
    ttl_seconds: Annotated[float, Field(gt=0)] | None = None
    by: ApprovableBy = "approvers"


class ShadowSpec(BaseModel):
    """A shadow rule that matched: reported, never enforced."""

    model_config = ConfigDict(extra="ignore")

    level: Literal["allow", "deny", "rate_limit", "require_approval"]
    rule: str
    reason: str = ""
    max: Annotated[float, Field(gt=0)] | None = None
    window_seconds: Annotated[float, Field(gt=0)] | None = None
    scope: Literal["session", "agent", "user", "global"] | None = None
    cost: Annotated[float, Field(ge=0)] = 1


class ToolInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    known: bool = False
    category: str | None = None
    risk: str | None = None


class PolicyResult(BaseModel):
    """What `data.mcp.decision` must look like; anything else is a malformed result."""

    model_config = ConfigDict(extra="ignore")

    action: Literal["allow", "deny", "rate_limit", "require_approval"]
    rule: Annotated[str, Field(min_length=1)]
    reason: str = ""
    rate_limits: list[RateLimitSpec] = Field(default_factory=list)
    approval: ApprovalSpec | None = None
    matched: list[str] = Field(default_factory=list)
    shadow: list[ShadowSpec] = Field(default_factory=list)
    denies_tool: StrictBool = False
    tool: ToolInfo | None = None


class RateLimitInfo(BaseModel):
    limit: int | float
    remaining: int | float
    window_seconds: float
    retry_after_seconds: float
    rule: str
    scope: str


class ApprovalRef(BaseModel):
    id: str
    status: ApprovalStatus
    expires_at: datetime
    url: str | None = Field(
        default=None,
        description="The approval's page in the approvals console (from the setting "
        "public_url), for a proxy or gateway to show whoever can approve.",
    )


class Decision(BaseModel):
    """The structured answer to a proxy."""

    decision_id: str
    verdict: Verdict
    reason: str
    rule: str
    policy_revision: str
    rate_limit: RateLimitInfo | None = None
    approval: ApprovalRef | None = None
    mcp_result: dict[str, Any] | None = Field(
        default=None,
        description="For every non-allow verdict: an MCP CallToolResult to hand to the agent.",
    )
    dry_run: bool | None = Field(default=None, description="True when nothing was changed.")
    denies_tool: bool | None = Field(
        default=None,
        description="True on a deny that holds for every call to this tool on this server "
        "by this principal, whatever the arguments (the policy says so: a proxy hides such "
        "a tool from tools/list).",
    )
    outcome_token: str | None = Field(
        default=None,
        description="For an allowed call that holds rate-limit slots: the secret that "
        "POST /v1/decisions/{id}/outcome needs. Only the caller that asked gets it; the "
        "decision log never stores it.",
    )


class Approval(BaseModel):
    """A request for a human to let one exact call through, once."""

    id: str
    status: ApprovalStatus
    server: str
    tool: str
    arguments: dict[str, Any]
    principal: Principal
    rule: str
    reason: str
    decision_id: str
    fingerprint: str
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None = None
    approver: str | None = None
    comment: str | None = None
    approvable_by: ApprovableBy = "approvers"
    principal_proof: PrincipalProof = "none"
    asserted_by: str | None = Field(
        default=None, description="The known proxy or gateway that verified the principal."
    )
    used_at: datetime | None = None
    used_by_decision: str | None = Field(
        default=None, description="The decision whose call the grant let through."
    )
    url: str | None = Field(default=None, description="The approval's page in the console.")


class OutcomeReport(BaseModel):
    """Body of POST /v1/decisions/{id}/outcome: how the upstream call went."""

    model_config = ConfigDict(extra="forbid")

    succeeded: StrictBool
    outcome_token: Annotated[str, Field(max_length=256)] | None = Field(
        default=None,
        description="The decision's `outcome_token` (required): only the caller given the "
        "decision can report its outcome.",
    )


class OutcomeAck(BaseModel):
    decision_id: str
    released: bool = Field(description="Whether the call's rate-limit slots were given back.")


class ApprovalAction(BaseModel):
    """Body of approve / deny. Who approves is taken from the credential, not from here."""

    model_config = ConfigDict(extra="forbid")

    approver: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None,
        description="Optional, for compatibility: who approves is the approver the "
        "credential proves. When given it must be that name (else 422).",
    )
    comment: Annotated[str, Field(max_length=4096)] = ""


# The longest one AwaitApproval (POST /v1/approvals/{id}/await) waits: a caller that wants
# to wait longer asks again.
MAX_AWAIT_SECONDS = 300.0


class ApprovalWait(BaseModel):
    """Body of POST /v1/approvals/{id}/await: how long to wait, at most, for the approval to
    be decided (approved, denied, used or expired)."""

    model_config = ConfigDict(extra="forbid")

    timeout_seconds: Annotated[
        float, Field(ge=0, le=MAX_AWAIT_SECONDS, allow_inf_nan=False, strict=True)
    ] = Field(
        default=0,
        description="Seconds to wait at most, 0 to 300; 0 answers at once with the "
        "approval's state.",
    )
