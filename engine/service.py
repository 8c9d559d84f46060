"""The core: one `decide()` that knows no transport.

transport → translate → OPA → obligations (rate limit, approval) → decision log → transport.
Whatever fails on the way is a deny with the reason, never an allow.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine import translate
from engine.approvals import ApprovalStore, Use, fingerprint
from engine.decision_log import DecisionLog, DecisionQuery
from engine.errors import EngineError, PolicyUnavailable, StateUnavailable
from engine.models import (
    Approval,
    ApprovalRef,
    ApprovalStatus,
    DecideRequest,
    Decision,
    PolicyResult,
    RateLimitInfo,
    RateLimitSpec,
    ToolCall,
    Verdict,
)
from engine.policy import Policy
from engine.ratelimit import Limit, Outcome, RateLimitStore

log = logging.getLogger(__name__)

RULE_ENGINE_UNAVAILABLE = "engine.unavailable"
RULE_STATE_UNAVAILABLE = "engine.state_unavailable"
RULE_LIMIT_UNUSABLE = "engine.rate_limit"
RULE_APPROVAL = "engine.approval"


@dataclass
class Limits:
    approval_ttl: float
    grant_ttl: float
    max_json_depth: int
    rate_limit_fail_open: bool = False


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


class DecisionService:
    def __init__(
        self,
        policy: Policy,
        rate_limits: RateLimitStore,
        approvals: ApprovalStore,
        log_: DecisionLog,
        limits: Limits,
    ) -> None:
        self.policy = policy
        self.rate_limits = rate_limits
        self.approvals = approvals
        self.log = log_
        self.limits = limits

    async def decide(self, request: DecideRequest, *, transport: str) -> Decision:
        """Decide one call. Raises InvalidRequest for malformed calls; otherwise answers."""
        started = time.perf_counter()
        decision_id = "dec_" + uuid.uuid4().hex
        now = datetime.now(UTC)
        try:
            call = translate.tool_call(request, max_depth=self.limits.max_json_depth)
        except EngineError as exc:
            self.log.write(
                {
                    "event": "invalid_request",
                    "decision_id": decision_id,
                    "transport": transport,
                    "error": exc.message,
                }
            )
            raise
        input_doc = translate.input_document(
            call, request, decision_id=decision_id, now=now, transport=transport
        )
        revision = self.policy.revision
        matched: list[str] = []
        try:
            result = await self.policy.opa.evaluate(input_doc)
        except PolicyUnavailable as exc:
            if "undefined" in exc.message:
                self.policy.mark_stale()
            decision = self._refuse(
                decision_id,
                revision,
                Verdict.DENY,
                RULE_ENGINE_UNAVAILABLE,
                f"policy engine unavailable: {exc.message}",
            )
        else:
            matched = result.matched
            try:
                decision = await self._enforce(decision_id, revision, call, request, result)
            except StateUnavailable as exc:
                decision = self._refuse(
                    decision_id,
                    revision,
                    Verdict.DENY,
                    RULE_STATE_UNAVAILABLE,
                    f"state store unavailable: {exc}",
                )
        self.log.decision(
            decision,
            request,
            call,
            time=input_doc["request"]["time"],
            transport=transport,
            latency_ms=(time.perf_counter() - started) * 1000,
            matched=matched,
        )
        return decision

    async def _enforce(
        self,
        decision_id: str,
        revision: str,
        call: ToolCall,
        request: DecideRequest,
        result: PolicyResult,
    ) -> Decision:
        if result.action == "deny":
            return self._refuse(decision_id, revision, Verdict.DENY, result.rule, result.reason)
        limits, problem = self._limits(call, request, result.rate_limits)
        if problem is not None:
            return self._refuse(decision_id, revision, Verdict.DENY, RULE_LIMIT_UNUSABLE, problem)
        if result.action == "require_approval":
            return await self._approval(decision_id, revision, call, request, result, limits)
        outcome = await self._take(decision_id, limits)
        if not outcome.allowed:
            return self._rate_limited(decision_id, revision, outcome, limits)
        return Decision(
            decision_id=decision_id,
            verdict=Verdict.ALLOW,
            reason=result.reason,
            rule=result.rule,
            policy_revision=revision,
            rate_limit=self._limit_info(outcome, limits),
        )

    async def _approval(
        self,
        decision_id: str,
        revision: str,
        call: ToolCall,
        request: DecideRequest,
        result: PolicyResult,
        limits: list[tuple[Limit, RateLimitSpec]],
    ) -> Decision:
        spec = result.approval
        rule = spec.rule if spec else result.rule
        reason = (spec.reason if spec and spec.reason else result.reason) or "approval required"
        if request.approval_id is None:
            ttl = spec.ttl_seconds if spec and spec.ttl_seconds else self.limits.approval_ttl
            opened = await self.approvals.open_or_get(
                call,
                request.principal,
                rule=rule,
                reason=reason,
                decision_id=decision_id,
                ttl=ttl,
            )
            return self._approval_required(decision_id, revision, rule, reason, opened)
        # Take the rate-limit slot first so a blocked call does not burn its grant.
        outcome = await self._take(decision_id, limits)
        if not outcome.allowed:
            return self._rate_limited(decision_id, revision, outcome, limits)
        try:
            used = await self.approvals.consume(
                request.approval_id,
                fingerprint(call, request.principal.session_id),
                decision_id=decision_id,
            )
        except BaseException:
            await self._give_back(decision_id, limits)
            raise
        if used.use is not Use.GRANTED:
            await self._give_back(decision_id, limits)
        approval = used.approval
        if used.use is Use.GRANTED and approval is not None:
            return Decision(
                decision_id=decision_id,
                verdict=Verdict.ALLOW,
                reason=f"approved by {approval.approver}: {reason}",
                rule=rule,
                policy_revision=revision,
                rate_limit=self._limit_info(outcome, limits),
                approval=self._ref(approval),
            )
        if used.use is Use.PENDING and approval is not None:
            return self._approval_required(decision_id, revision, rule, reason, approval)
        why = {
            Use.NOT_FOUND: f"approval {request.approval_id} does not exist",
            Use.MISMATCH: f"approval {request.approval_id} was granted for a different call",
            Use.DENIED: "approval denied by {approver}: {comment}",
            Use.USED: f"approval {request.approval_id} was already used",
            Use.EXPIRED: f"approval {request.approval_id} expired",
        }[used.use]
        ref = None
        if approval is not None and used.use is not Use.MISMATCH:
            ref = self._ref(approval)
            why = why.format(approver=approval.approver, comment=approval.comment or "no comment")
        return self._refuse(decision_id, revision, Verdict.DENY, RULE_APPROVAL, why, approval=ref)

    def _limits(
        self, call: ToolCall, request: DecideRequest, specs: list[RateLimitSpec]
    ) -> tuple[list[tuple[Limit, RateLimitSpec]], str | None]:
        principal = request.principal
        out = []
        for spec in specs:
            subject = {
                "session": principal.session_id,
                "agent": principal.agent_id,
                "user": principal.user_id,
                "global": "*",
            }[spec.scope]
            if subject is None:
                return [], (
                    f"rate limit {spec.rule} is kept per {spec.scope}, but the request "
                    f"has no principal.{spec.scope}_id"
                )
            if spec.cost > spec.max:
                return [], (
                    f"this call costs {spec.cost:g} against rate limit {spec.rule}, more than "
                    f"the {spec.max:g} it allows in any {spec.window_seconds:g} s"
                )
            key = (spec.rule, spec.scope, subject, call.server, call.name)
            limit = Limit(key=key, max=spec.max, window=spec.window_seconds, cost=spec.cost)
            out.append((limit, spec))
        return out, None

    async def _take(self, decision_id: str, limits: list[tuple[Limit, RateLimitSpec]]) -> Outcome:
        """Reserve the call's slots under its decision id (all limits or none)."""
        if not limits:
            return Outcome(True, ())
        try:
            return await self.rate_limits.acquire([limit for limit, _ in limits], decision_id)
        except StateUnavailable as exc:
            if not self.limits.rate_limit_fail_open:
                raise
            log.warning("rate limits not enforced (fail-open): %s", exc)
            return Outcome(True, ())

    async def _give_back(self, decision_id: str, limits: list[tuple[Limit, RateLimitSpec]]) -> None:
        if limits:
            await self.rate_limits.release(decision_id)

    async def report_outcome(self, decision_id: str, *, succeeded: bool) -> bool:
        """The proxy reports how the upstream call went; a failure gives the slots back.

        Returns whether slots were given back. Reports are idempotent; a report for a
        decision that holds no reservation (denied, unknown, lapsed) changes nothing.
        """
        if succeeded:
            await self.rate_limits.forget(decision_id)
            released = False
        else:
            released = await self.rate_limits.release(decision_id)
        self.log.write(
            {
                "event": "outcome",
                "decision_id": decision_id,
                "succeeded": succeeded,
                "released": released,
            }
        )
        return released

    @staticmethod
    def _limit_info(
        outcome: Outcome, limits: list[tuple[Limit, RateLimitSpec]]
    ) -> RateLimitInfo | None:
        state = outcome.reported()
        if state is None:
            return None
        spec = next(spec for limit, spec in limits if limit is state.limit)
        return RateLimitInfo(
            limit=_number(spec.max),
            remaining=_number(state.remaining),
            window_seconds=spec.window_seconds,
            retry_after_seconds=round(state.retry_after, 3),
            rule=spec.rule,
            scope=spec.scope,
        )

    def _rate_limited(
        self,
        decision_id: str,
        revision: str,
        outcome: Outcome,
        limits: list[tuple[Limit, RateLimitSpec]],
    ) -> Decision:
        info = self._limit_info(outcome, limits)
        assert info is not None
        spec = next(spec for _, spec in limits if spec.rule == info.rule)
        what = spec.reason or f"at most {spec.max:g} per {spec.window_seconds:g} s"
        reason = f"rate limit exceeded ({what}); retry in {info.retry_after_seconds:g} s"
        return self._refuse(
            decision_id, revision, Verdict.RATE_LIMITED, info.rule, reason, rate_limit=info
        )

    def _approval_required(
        self, decision_id: str, revision: str, rule: str, reason: str, approval: Approval
    ) -> Decision:
        if approval.status is ApprovalStatus.APPROVED:
            next_step = (
                f"approval {approval.id} is granted; retry the same call with "
                f"approval_id {approval.id}"
            )
        else:
            next_step = (
                f"approval {approval.id} is pending; once a human approves it, retry "
                f"the same call with approval_id {approval.id}"
            )
        return self._refuse(
            decision_id,
            revision,
            Verdict.APPROVAL_REQUIRED,
            rule,
            f"{reason}; {next_step}",
            approval=self._ref(approval),
        )

    @staticmethod
    def _ref(approval: Approval) -> ApprovalRef:
        return ApprovalRef(id=approval.id, status=approval.status, expires_at=approval.expires_at)

    @staticmethod
    def _refuse(
        decision_id: str,
        revision: str,
        verdict: Verdict,
        rule: str,
        reason: str,
        *,
        rate_limit: RateLimitInfo | None = None,
        approval: ApprovalRef | None = None,
    ) -> Decision:
        decision = Decision(
            decision_id=decision_id,
            verdict=verdict,
            reason=reason,
            rule=rule,
            policy_revision=revision,
            rate_limit=rate_limit,
            approval=approval,
        )
        decision.mcp_result = mcp_result(decision)
        return decision

    # Operator operations (the transports check the approver credential first).

    async def list_decisions(self, query: DecisionQuery) -> tuple[list[dict[str, Any]], int | None]:
        return await self.log.query(query)

    async def status(self, since: datetime) -> dict[str, Any]:
        summary = await self.log.summary(since)
        pending = await self.approvals.list(ApprovalStatus.PENDING, 50)
        summary["pending_approvals"] = [a.model_dump(mode="json") for a in pending]
        return summary

    async def list_approvals(self, status: ApprovalStatus | None, limit: int) -> list[Approval]:
        return await self.approvals.list(status, max(1, min(limit, 1000)))

    async def get_approval(self, approval_id: str) -> Approval:
        return await self.approvals.get(approval_id)

    async def decide_approval(
        self, approval_id: str, *, approve: bool, approver: str, comment: str
    ) -> Approval:
        approval = await self.approvals.decide(
            approval_id,
            approve=approve,
            approver=approver,
            comment=comment,
            grant_ttl=self.limits.grant_ttl,
        )
        self.log.write(
            {
                "event": "approval",
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "approval_id": approval_id,
                "status": approval.status.value,
                "approver": approver,
            }
        )
        return approval


def mcp_result(decision: Decision) -> dict[str, Any]:
    """The MCP CallToolResult a proxy hands to the agent instead of calling the tool."""
    structured = decision.model_dump(mode="json", exclude={"mcp_result"}, exclude_none=True)
    return {
        "content": [
            {
                "type": "text",
                "text": f"Tool call refused ({decision.verdict.value}): {decision.reason}",
            }
        ],
        "isError": True,
        "structuredContent": structured,
    }
