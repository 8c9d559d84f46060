"""The policy's answers checked, the same way for both engines: `data.mcp.decision` as a
PolicyResult, `data.mcp.result_decision` as a ResultPolicyResult."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from engine.errors import PolicyUnavailable
from engine.models import PolicyResult, ResultAction, ResultDecision, ResultPolicyResult

# Where a rewritten or refused result carries its result decision: in `_meta`, as a call's
# refusal carries its decision (DECISION_META_KEY), never in `structuredContent`.
RESULT_META_KEY = "mcp-policy/result-decision"

# The undefined answer of `data.mcp.result_decision`: a policy without result rules (an
# older bundle, say) loads and decides calls; each of its results is blocked, saying why.
NO_RESULT_DECISION = (
    "the policy has no result_decision (data.mcp.result_decision is undefined): it was "
    "written before results were decided on, or its rego/mcp/result_decision.rego is missing"
)


def checked_result(value: Any) -> PolicyResult:
    """`data.mcp.decision`'s value as a PolicyResult; a malformed one is PolicyUnavailable
    naming its first three problems."""
    try:
        return PolicyResult.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'decision'}: {e['msg']}"
            for e in exc.errors()[:3]
        )
        raise PolicyUnavailable(
            f"the policy gave a malformed decision ({problems})", kind="malformed"
        ) from exc


def checked_result_decision(value: Any) -> ResultPolicyResult:
    """`data.mcp.result_decision`'s value as a ResultPolicyResult; a malformed one is
    PolicyUnavailable (kind malformed) naming its first three problems."""
    try:
        answer = ResultPolicyResult.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'result_decision'}: {e['msg']}"
            for e in exc.errors()[:3]
        )
        raise PolicyUnavailable(
            f"the policy gave a malformed result decision ({problems})", kind="malformed"
        ) from exc
    return consistent(answer)


def consistent(answer: ResultPolicyResult) -> ResultPolicyResult:
    """`answer`, unless it passes a result it lists redactions for (redactions come with
    the action redact only): that is a malformed answer, never a pass."""
    if answer.action is ResultAction.PASS and answer.redactions:
        raise PolicyUnavailable(
            "the policy gave a malformed result decision (action pass with redactions)",
            kind="malformed",
        )
    return answer


def result_meta(decision: ResultDecision) -> dict[str, Any]:
    """What a rewritten or refused result carries under `_meta[RESULT_META_KEY]`."""
    return {
        "action": decision.action.value,
        "rule": decision.rule,
        "reason": decision.reason,
        "decision_id": decision.decision_id,
        "redactions": [r.model_dump(exclude_none=True) for r in decision.redactions],
    }


def with_meta(result: dict[str, Any], decision: ResultDecision) -> dict[str, Any]:
    """`result` (a shallow copy) with the decision under `_meta[RESULT_META_KEY]`; the rest
    of its `_meta` as it was (the key is the engine's: a tool's own value is replaced)."""
    meta = result.get("_meta")
    return {
        **result,
        "_meta": {
            **(meta if isinstance(meta, dict) else {}),
            RESULT_META_KEY: result_meta(decision),
        },
    }


def refusal(decision: ResultDecision) -> dict[str, Any]:
    """The CallToolResult the agent gets instead of a blocked result: the reason as text,
    `isError` true, the decision in `_meta` (valid for any tool: no structuredContent)."""
    return {
        "content": [{"type": "text", "text": decision.reason}],
        "isError": True,
        "_meta": {RESULT_META_KEY: result_meta(decision)},
    }
