"""The core: one `decide()` that knows no transport.

transport → translate → OPA → obligations (rate limit, approval) → decision log → transport.
Whatever fails on the way is a deny with the reason, never an allow.

Shadow rules (listed by the policy in `shadow`) are reported, logged and counted, never
enforced: a shadow rate limit counts in a shadow counter of its own, only for calls that
really go through. A `dry_run` request answers what would happen and changes nothing:
limits are only looked at, approvals neither created nor used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from engine import approver_auth, translate
from engine.errors import (
    EngineError,
    InvalidRequest,
    NotFound,
    PolicyUnavailable,
    StateUnavailable,
    Unauthenticated,
)
from engine.identity.base import CredentialRejected, Identity
from engine.identity.callers import AgentCredentials
from engine.models import (
    Approval,
    ApprovalRef,
    ApprovalStatus,
    DecideRequest,
    Decision,
    PolicyResult,
    PrincipalProof,
    RateLimitInfo,
    RateLimitSpec,
    ShadowSpec,
    ToolCall,
    Verdict,
)
from engine.notify.events import ApprovalEvents, EventType
from engine.obs import tracing
from engine.obs.metrics import UNKNOWN_TOOL, Metrics
from engine.policy.loader import Policy
from engine.state.approvals import (
    ApprovalCursor,
    ApprovalPage,
    ApprovalStore,
    TooManyPending,
    Use,
    UseResult,
    agent_key,
    fingerprint,
    use_of,
)
from engine.state.decision_log import DecisionLog, DecisionQuery
from engine.state.ratelimit import Limit, Outcome, RateLimitStore
from engine.transports import paging

log = logging.getLogger(__name__)

RULE_ENGINE_UNAVAILABLE = "engine.unavailable"
RULE_STATE_UNAVAILABLE = "engine.state_unavailable"
RULE_LIMIT_UNUSABLE = "engine.rate_limit"
RULE_APPROVAL = "engine.approval"
RULE_TOO_MANY_PENDING = "approval.too_many_pending"
RULE_NOT_YOURS = "approval.not_yours"
RULE_INVALID_CREDENTIAL = "identity.invalid_credential"
RULE_UNPROVEN_CALLER = "identity.unproven_caller"

UNPROVEN_CALLER_REASON = (
    "the caller says it verified this principal, but this decision service does not know "
    "the caller, so it cannot believe it; give the caller a client token "
    "(mcp-policy clients add NAME, MCP_POLICY_CLIENTS_FILE) or a client certificate "
    "(MCP_POLICY_TLS_CLIENT_CA)"
)


class _Rejected(Exception):
    """The call's principal cannot be believed: `rule` and the message say why."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


# Where a refusal's CallToolResult carries the structured decision: in `_meta`, which no
# client validates against the tool's outputSchema (`structuredContent` would be, and a
# decision never matches a tool's own output). A stable, documented key.
DECISION_META_KEY = "mcp-policy/decision"

Limits_ = list[tuple[Limit, RateLimitSpec]]


@dataclass
class Limits:
    approval_ttl: float
    grant_ttl: float
    max_json_depth: int
    rate_limit_fail_open: bool = False


def reservation(decision_id: str, outcome_token: str) -> str:
    """The key a decision's rate-limit slots are held under in the store.

    It is derived from the decision's secret outcome token, which only the caller that
    asked for the decision is given: knowing a decision id (it is in the decision log)
    is not enough to give its slots back.
    """
    digest = hashlib.sha256(f"{decision_id}\x00{outcome_token}".encode()).hexdigest()
    return "rsv_" + digest[:40]


@dataclass(frozen=True)
class Ctx:
    """What every step of one decision needs to know."""

    decision_id: str
    revision: str
    call: ToolCall
    request: DecideRequest
    outcome_token: str
    proof: PrincipalProof = "none"
    asserted_by: str | None = None

    @property
    def dry_run(self) -> bool:
        return self.request.dry_run

    @property
    def reservation(self) -> str:
        return reservation(self.decision_id, self.outcome_token)


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
        metrics: Metrics | None = None,
        tracer: trace.Tracer | None = None,
        credentials: AgentCredentials | None = None,
        events: ApprovalEvents | None = None,
    ) -> None:
        self.policy = policy
        self.rate_limits = rate_limits
        self.approvals = approvals
        self.log = log_
        self.limits = limits
        self.metrics = metrics or Metrics()
        self.tracer = tracer or trace.NoOpTracer()
        self.credentials = credentials or AgentCredentials()
        self.events = events or ApprovalEvents()
        # Hands each decision to the collector upload (engine.policy.fleet), when configured.
        self.upload: (
            Callable[[Decision, dict[str, Any], PolicyResult | None, float], None] | None
        ) = None

    async def decide(
        self,
        request: DecideRequest,
        *,
        transport: str,
        identity: Identity | None = None,
        asserted_by: str | None = None,
    ) -> Decision:
        """Decide one call. Raises InvalidRequest for malformed calls; otherwise answers.

        A call that gets no decision (an unexpected error or a cancellation on the way)
        holds nothing: what it reserved is given back before the error leaves.

        `identity` is the agent's verified credential, when there is one: the principal
        (for the policy, the limits, approvals and the log) is then the one it proves.
        `asserted_by` names the authenticated proxy that asserted the principal."""
        if identity is not None:
            request = request.model_copy(
                update={"principal": translate.proven_principal(request.principal, identity)}
            )
        decision_id = "dec_" + uuid.uuid4().hex
        outcome_token = secrets.token_urlsafe(24)
        try:
            return await self._decide(
                request, transport, decision_id, outcome_token, identity, asserted_by
            )
        except InvalidRequest:
            raise  # refused before anything was taken
        except BaseException:
            if not request.dry_run:
                await self._release_quietly(decision_id, outcome_token)
            raise

    async def _decide(
        self,
        request: DecideRequest,
        transport: str,
        decision_id: str,
        outcome_token: str,
        identity: Identity | None,
        asserted_by: str | None,
    ) -> Decision:
        started = time.perf_counter()
        now = datetime.now(UTC)
        with tracing.span(self.tracer, "decide") as span:
            span.set_attribute("mcp_policy.decision_id", decision_id)
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
            span.set_attribute("mcp.server", call.server)
            span.set_attribute("mcp.tool", call.name)
            rejected: _Rejected | None = None
            if request.credential is not None:
                try:
                    identity = await self.credentials.verify(request.credential)
                except CredentialRejected as exc:
                    rejected = _Rejected(
                        RULE_INVALID_CREDENTIAL,
                        f"the agent's credential was not accepted: {exc.message}",
                    )
                else:
                    proven = translate.proven_principal(request.principal, identity)
                    request = request.model_copy(update={"principal": proven})
            if request.principal_verified and identity is None and asserted_by is None:
                # A principal a caller proved arrives proven (asserted by that caller) or
                # not at all: never decided as if nobody had proven anything.
                rejected = _Rejected(RULE_UNPROVEN_CALLER, UNPROVEN_CALLER_REASON)
            input_doc = translate.input_document(
                call,
                request,
                decision_id=decision_id,
                now=now,
                transport=transport,
                identity=identity,
                asserted_by=asserted_by,
            )
            proof: PrincipalProof = "none"
            if identity is not None:
                proof = "credential"
            elif request.principal_verified and asserted_by is not None:
                proof = "caller"
            ctx = Ctx(
                decision_id,
                self.policy.revision,
                call,
                request,
                outcome_token,
                proof,
                asserted_by if identity is None else None,
            )
            translated = time.perf_counter()
            evaluated = translated
            result: PolicyResult | None = None
            shadow: list[dict[str, Any]] = []
            try:
                if rejected is not None:
                    raise rejected
                result, revision = await self._evaluate(input_doc)
                evaluated = time.perf_counter()
                ctx = dataclasses.replace(ctx, revision=revision)
            except _Rejected as exc:
                # Never decided on the fields the caller declared instead.
                if exc.rule == RULE_INVALID_CREDENTIAL:
                    self.metrics.invalid_credentials.inc()
                else:
                    self.metrics.unauthenticated_callers.labels(transport).inc()
                decision = self._refuse(ctx, Verdict.DENY, exc.rule, str(exc))
            except PolicyUnavailable as exc:
                if exc.kind == "undefined":
                    self.policy.mark_stale()
                self.metrics.opa_errors.labels(exc.kind).inc()
                decision = self._refuse(
                    ctx,
                    Verdict.DENY,
                    RULE_ENGINE_UNAVAILABLE,
                    f"policy engine unavailable: {exc.message}",
                )
            else:
                try:
                    decision = await self._enforce(ctx, result)
                    shadow = await self._shadow(ctx, result, decision)
                except StateUnavailable as exc:
                    if not ctx.dry_run:
                        await self._release_quietly(decision_id, outcome_token)
                    self.metrics.rate_limits.labels("store_error").inc()
                    decision = self._refuse(
                        ctx, Verdict.DENY, RULE_STATE_UNAVAILABLE, f"state store unavailable: {exc}"
                    )
            if request.dry_run:
                decision.dry_run = True
            span.set_attribute("mcp_policy.verdict", decision.verdict.value)
            span.set_attribute("mcp_policy.rule", decision.rule)
        enforced = time.perf_counter()
        elapsed = enforced - started
        if evaluated == translated:  # refused before or while evaluating: no enforce stage
            evaluated = enforced
        if not request.dry_run:
            known = result is not None and result.tool is not None and result.tool.known
            self.metrics.decisions.labels(
                decision.verdict.value, call.name if known else UNKNOWN_TOOL, decision.rule
            ).inc()
            self.metrics.decision_seconds.labels(transport).observe(elapsed)
        counted = time.perf_counter()
        written = self.log.decision(
            decision,
            request,
            call,
            time=input_doc["request"]["time"],
            transport=transport,
            latency_ms=elapsed * 1000,
            matched=result.matched if result else [],
            shadow=shadow,
            dry_run=request.dry_run,
            flood_key=_flood_key(request, result, decision),
            bundles=self.policy.bundles_of(decision.policy_revision),
            input_doc=input_doc,
            result=result,
        )
        if written is not None:  # MCP_POLICY_DECISION_LOG_SYNC=always: an allow waits for it
            at = input_doc["request"]["time"]
            decision = await self._once_written(ctx, decision, written, at, transport, started)
        if self.upload is not None:
            self.upload(decision, input_doc, result, elapsed)
        self.metrics.stages.add(
            translated - started,
            evaluated - translated,
            enforced - evaluated,
            time.perf_counter() - counted,
            counted - enforced,
        )
        return decision

    async def _once_written(
        self,
        ctx: Ctx,
        decision: Decision,
        written: Awaitable[None],
        at: str,
        transport: str,
        started: float,
    ) -> Decision:
        """The allow once its record is written; a deny (engine.state_unavailable, its
        slots given back, logged) when it could not be: an allow not on record is not given."""
        try:
            await written
        except StateUnavailable as exc:
            await self._release_quietly(ctx.decision_id, ctx.outcome_token)
            refused = self._refuse(
                ctx,
                Verdict.DENY,
                RULE_STATE_UNAVAILABLE,
                f"decision log unavailable, so the allow was not given: {exc}",
            )
            self.log.decision(
                refused,
                ctx.request,
                ctx.call,
                time=at,
                transport=transport,
                latency_ms=(time.perf_counter() - started) * 1000,
                matched=[],
            )
            return refused
        return decision

    async def _evaluate(self, input_doc: dict[str, Any]) -> tuple[PolicyResult, str]:
        """The policy's result and the revision it was evaluated with."""
        with tracing.span(self.tracer, "opa.evaluate"):
            started = time.perf_counter()
            evaluated = await self.policy.evaluate(input_doc)
            self.metrics.opa_seconds.observe(time.perf_counter() - started)
            return evaluated

    async def _enforce(self, ctx: Ctx, result: PolicyResult) -> Decision:
        if result.action == "deny":
            return self._refuse(
                ctx, Verdict.DENY, result.rule, result.reason, denies_tool=result.denies_tool
            )
        limits, problem = self._limits(ctx, result.rate_limits)
        if problem is not None:
            return self._refuse(ctx, Verdict.DENY, RULE_LIMIT_UNUSABLE, problem)
        if result.action == "require_approval":
            return await self._approval(ctx, result, limits)
        outcome = await self._take(ctx, limits)
        if not outcome.allowed:
            return self._rate_limited(ctx, outcome, limits)
        return Decision(
            decision_id=ctx.decision_id,
            verdict=Verdict.ALLOW,
            reason=shown(result.reason),
            rule=result.rule,
            policy_revision=ctx.revision,
            rate_limit=self._limit_info(outcome, limits),
            outcome_token=self._token_for(ctx, outcome),
        )

    async def _approval(self, ctx: Ctx, result: PolicyResult, limits: Limits_) -> Decision:
        spec = result.approval
        rule = spec.rule if spec else result.rule
        reason = (spec.reason if spec and spec.reason else result.reason) or "approval required"
        request = ctx.request
        if request.approval_id is None:
            if ctx.dry_run:
                return self._refuse(
                    ctx,
                    Verdict.APPROVAL_REQUIRED,
                    rule,
                    f"{reason}; a human approval would be required",
                )
            ttl = spec.ttl_seconds if spec and spec.ttl_seconds else self.limits.approval_ttl
            try:
                with tracing.span(self.tracer, "approvals.open"):
                    opened = await self.approvals.open_or_get(
                        ctx.call,
                        request.principal,
                        rule=rule,
                        reason=reason,
                        decision_id=ctx.decision_id,
                        ttl=ttl,
                        approvable_by=spec.by if spec else "approvers",
                        proof=ctx.proof,
                        asserted_by=ctx.asserted_by,
                    )
            except TooManyPending as full:  # the store's cap: nothing was opened or taken
                self.metrics.approval_cap_refusals.labels(full.scope).inc()
                return self._refuse(ctx, Verdict.DENY, RULE_TOO_MANY_PENDING, full.reason)
            if opened.decision_id == ctx.decision_id:  # opened by this very call
                self.metrics.approvals.labels("requested").inc()
                self.events.publish(EventType.REQUESTED, opened)
            if opened.status is ApprovalStatus.DENIED:  # asked again: the answer stands
                return self._refuse(
                    ctx,
                    Verdict.DENY,
                    RULE_APPROVAL,
                    f"approval denied by {opened.approver}: {opened.comment or 'no comment'}",
                    approval=self._ref(opened),
                )
            if opened.status is not ApprovalStatus.APPROVED:
                return self._approval_required(ctx, rule, reason, opened)
            # The identical call of the same principal, granted and not used yet: the
            # agent called the same tool again, unchanged, as it was told. The grant is
            # used here (with the same checks as an explicit approval_id).
            request = request.model_copy(update={"approval_id": opened.id})
            ctx = dataclasses.replace(ctx, request=request)
        assert request.approval_id is not None
        # Take the rate-limit slot first so a blocked call does not burn its grant.
        outcome = await self._take(ctx, limits)
        if not outcome.allowed:
            return self._rate_limited(ctx, outcome, limits)
        try:
            used = await self._use(ctx, request.approval_id)
        except BaseException:
            await self._give_back(ctx, limits)
            raise
        if used.use is not Use.GRANTED:
            await self._give_back(ctx, limits)
        self.metrics.approvals.labels(
            "granted_use" if used.use is Use.GRANTED else "refused_use"
        ).inc()
        approval = used.approval
        if used.use is Use.GRANTED and approval is not None:
            if not ctx.dry_run:
                self.events.publish(EventType.USED, approval)
            return Decision(
                decision_id=ctx.decision_id,
                verdict=Verdict.ALLOW,
                reason=shown(f"approved by {approval.approver}: {reason}"),
                rule=rule,
                policy_revision=ctx.revision,
                rate_limit=self._limit_info(outcome, limits),
                approval=self._ref(approval),
                outcome_token=self._token_for(ctx, outcome),
            )
        if used.use is Use.PENDING and approval is not None:
            return self._approval_required(ctx, rule, reason, approval)
        if used.use is Use.NOT_YOURS:  # nothing of the other principal's approval is shown
            return self._refuse(
                ctx,
                Verdict.DENY,
                RULE_NOT_YOURS,
                f"approval {request.approval_id} was opened for another agent or user: only "
                "the principal it was opened for may use it; call without approval_id to ask "
                "for an approval of your own",
            )
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
        return self._refuse(ctx, Verdict.DENY, RULE_APPROVAL, why, approval=ref)

    async def _use(self, ctx: Ctx, approval_id: str) -> UseResult:
        """Use the grant, if it is this principal's (or, in a dry run, only look at it)."""
        principal = ctx.request.principal
        fp = fingerprint(ctx.call, principal.session_id)
        with tracing.span(self.tracer, "approvals.use"):
            if not ctx.dry_run:
                return await self.approvals.consume(
                    approval_id, fp, principal=principal, decision_id=ctx.decision_id
                )
            try:
                approval = await self.approvals.get(approval_id)
            except NotFound:
                return UseResult(Use.NOT_FOUND, None)
            use = use_of(approval, fp, principal)
            return UseResult(use, None if use is Use.NOT_YOURS else approval)

    def _limits(self, ctx: Ctx, specs: list[RateLimitSpec]) -> tuple[Limits_, str | None]:
        principal = ctx.request.principal
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
                    f"this call costs {spec.cost:g} against rate limit {spec.rule}, more "
                    f"than the {spec.max:g} it allows in any {spec.window_seconds:g} s"
                )
            key = (spec.rule, spec.scope, subject, ctx.call.server, ctx.call.name)
            limit = Limit(key=key, max=spec.max, window=spec.window_seconds, cost=spec.cost)
            out.append((limit, spec))
        return out, None

    async def _take(self, ctx: Ctx, limits: Limits_) -> Outcome:
        """Reserve the call's slots under its decision id (all limits or none); a dry run
        only looks."""
        if not limits:
            return Outcome(True, ())
        try:
            with tracing.span(self.tracer, "ratelimit.acquire"):
                outcome = await self.rate_limits.acquire(
                    [limit for limit, _ in limits], ctx.reservation, record=not ctx.dry_run
                )
        except StateUnavailable as exc:
            if not self.limits.rate_limit_fail_open:
                raise
            self.metrics.rate_limits.labels("store_error").inc()
            log.warning("rate limits not enforced (fail-open): %s", exc)
            return Outcome(True, ())
        if not ctx.dry_run:
            self.metrics.rate_limits.labels("allowed" if outcome.allowed else "limited").inc()
        return outcome

    async def _give_back(self, ctx: Ctx, limits: Limits_) -> None:
        if limits and not ctx.dry_run:
            await self.rate_limits.release(ctx.reservation)

    async def _release_quietly(self, decision_id: str, outcome_token: str) -> None:
        """Release whatever a decision holds, on the way out of a failure."""
        try:
            await self.rate_limits.release(reservation(decision_id, outcome_token))
        except Exception as exc:  # noqa: BLE001 - the first failure is the one to report
            log.warning("could not give back the slots of %s: %s", decision_id, exc)

    @staticmethod
    def _token_for(ctx: Ctx, outcome: Outcome) -> str | None:
        """The outcome token, for a decision that holds slots a report could give back."""
        if ctx.dry_run or not outcome.states:
            return None
        return ctx.outcome_token

    async def abandon(self, decision: Decision) -> None:
        """Give back the slots of a decision that could not be delivered to its caller."""
        if decision.outcome_token:
            await self.report_outcome(
                decision.decision_id, outcome_token=decision.outcome_token, succeeded=False
            )

    async def _shadow(
        self, ctx: Ctx, result: PolicyResult, decision: Decision
    ) -> list[dict[str, Any]]:
        """What the shadow rules would have done; shadow limits count only real passes."""
        out = []
        for spec in result.shadow:
            would: str = spec.level
            if spec.level == "rate_limit":
                would = await self._shadow_limit(ctx, spec, decision)
            self.metrics.shadow.labels(spec.level, spec.rule).inc()
            out.append(
                {"level": spec.level, "rule": spec.rule, "reason": spec.reason, "would": would}
            )
        return out

    async def _shadow_limit(self, ctx: Ctx, spec: ShadowSpec, decision: Decision) -> str:
        if decision.verdict is not Verdict.ALLOW or ctx.dry_run or spec.max is None:
            return "not_counted"
        limited = RateLimitSpec(
            rule=spec.rule,
            max=spec.max,
            window_seconds=spec.window_seconds or 1,
            scope=spec.scope or "session",
            cost=spec.cost,
        )
        limits, problem = self._limits(ctx, [limited])
        if problem is not None:
            return "rate_limit"
        shadow_limits = [
            Limit(key=("shadow", *lim.key), max=lim.max, window=lim.window, cost=lim.cost)
            for lim, _ in limits
        ]
        try:
            outcome = await self.rate_limits.acquire(shadow_limits, f"{ctx.decision_id}:shadow")
        except StateUnavailable as exc:  # a shadow rule never changes the verdict
            log.warning("shadow rate limit %s not counted: %s", spec.rule, exc)
            return "not_counted"
        self.metrics.rate_limits.labels(
            "shadow_allowed" if outcome.allowed else "shadow_limited"
        ).inc()
        return "pass" if outcome.allowed else "rate_limit"

    async def report_outcome(
        self, decision_id: str, *, outcome_token: str, succeeded: bool
    ) -> bool:
        """The proxy reports how the upstream call went; a failure gives the slots back.

        Only a report that carries the decision's outcome token reaches its slots (they
        are held under a key derived from it). Returns whether slots were given back:
        at most once per decision, and never after a success was reported. A report for
        a decision that holds no reservation (denied, unknown, lapsed, already reported,
        or a wrong token: these are not told apart) changes nothing.
        """
        if not outcome_token:
            raise Unauthenticated(
                "an outcome report needs the decision's outcome_token (given only to the "
                "caller that asked for the decision)"
            )
        key = reservation(decision_id, outcome_token)
        if succeeded:
            matched = await self.rate_limits.forget(key)
            released = False
        else:
            released = matched = await self.rate_limits.release(key)
            if released:
                self.metrics.rate_limits.labels("released").inc()
        record: dict[str, Any] = {
            "event": "outcome",
            "decision_id": decision_id,
            "succeeded": succeeded,
            "released": released,
        }
        if not matched:
            # Anyone can send these; they are flood-controlled like invalid requests.
            record = {
                "event": "invalid_request",
                "transport": "outcome",
                "decision_id": decision_id,
                "error": "an outcome report that matched no held reservation",
            }
        self.log.write(record)
        return released

    @staticmethod
    def _limit_info(outcome: Outcome, limits: Limits_) -> RateLimitInfo | None:
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

    def _rate_limited(self, ctx: Ctx, outcome: Outcome, limits: Limits_) -> Decision:
        info = self._limit_info(outcome, limits)
        assert info is not None
        spec = next(spec for _, spec in limits if spec.rule == info.rule)
        what = spec.reason or f"at most {spec.max:g} per {spec.window_seconds:g} s"
        reason = f"rate limit exceeded ({what}); retry in {info.retry_after_seconds:g} s"
        return self._refuse(ctx, Verdict.RATE_LIMITED, info.rule, reason, rate_limit=info)

    def _approval_required(self, ctx: Ctx, rule: str, reason: str, approval: Approval) -> Decision:
        url = self.events.url(approval.id)
        where = f" at {url}" if url else ""
        next_step = (
            f"a human must approve this call first (approval {approval.id}, pending{where}); "
            "call the same tool again unchanged once a human approves"
        )
        return self._refuse(
            ctx,
            Verdict.APPROVAL_REQUIRED,
            rule,
            f"{reason}; {next_step}",
            approval=self._ref(approval),
        )

    def _ref(self, approval: Approval) -> ApprovalRef:
        return ApprovalRef(
            id=approval.id,
            status=approval.status,
            expires_at=approval.expires_at,
            url=self.events.url(approval.id),
        )

    def _refuse(
        self,
        ctx: Ctx,
        verdict: Verdict,
        rule: str,
        reason: str,
        *,
        rate_limit: RateLimitInfo | None = None,
        approval: ApprovalRef | None = None,
        denies_tool: bool = False,
    ) -> Decision:
        decision = Decision(
            decision_id=ctx.decision_id,
            verdict=verdict,
            reason=shown(reason),
            rule=rule,
            policy_revision=ctx.revision,
            rate_limit=rate_limit,
            approval=approval,
            dry_run=ctx.dry_run or None,
            denies_tool=denies_tool or None,
        )
        decision.mcp_result = mcp_result(decision)
        return decision

    # Operator operations (the transports check the approver credential first).

    async def list_decisions(self, query: DecisionQuery) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the decision log, and the opaque token of the next (None at the end)."""
        records, position = await self.log.query(query)
        return records, None if position is None else paging.encode_token(position)

    async def get_decision(self, decision_id: str) -> dict[str, Any]:
        """One logged decision (NotFound when the log has none with this id)."""
        return await self.log.get(decision_id)

    async def status(self, since: datetime) -> dict[str, Any]:
        summary = await self.log.summary(since)
        pending = await self.approvals.list(ApprovalStatus.PENDING, 50)
        summary["pending_approvals"] = [a.model_dump(mode="json") for a in pending]
        return summary

    async def page_approvals(
        self,
        viewer: Identity,
        status: ApprovalStatus | None,
        size: int,
        after: ApprovalCursor | None = None,
    ) -> ApprovalPage:
        """A page of the approvals `viewer` may see (approver_auth), newest first, from
        `after`: what both transports list. A page may hold fewer than `size` (those the
        viewer may not see are skipped) and still have a next one."""

        def visible(approval: Approval) -> bool:
            return approver_auth.refusal(viewer, approval, "view") is None

        page = await self.approvals.page(status, size, after=after, keep=visible)
        return ApprovalPage([self.events.with_url(a) for a in page.approvals], page.next)

    async def get_approval(self, approval_id: str) -> Approval:
        return self.events.with_url(await self.approvals.get(approval_id))

    async def await_approval(self, approval_id: str, timeout: float) -> ApprovalRef:
        """The approval's state once it is no longer pending, or after `timeout` seconds
        (what a proxy waiting for a human asks). Woken by this replica's events; a change
        made on another replica is seen on the next read, at least every second."""
        deadline = time.monotonic() + timeout
        while True:
            approval = await self.approvals.get(approval_id)
            left = deadline - time.monotonic()
            if approval.status is not ApprovalStatus.PENDING or left <= 0:
                return self._ref(approval)
            await self.events.wait_change(approval_id, min(left, 1.0))

    async def decide_approval(
        self,
        approval_id: str,
        *,
        approve: bool,
        approver: str | Identity,
        comment: str,
        declared: str | None = None,
    ) -> Approval:
        """Approve or deny a pending approval.

        `approver` is the credential's proven identity (the transports pass it): the
        approval records its name, never `declared` (the body's `approver`, refused when
        it names someone else), and `approver_auth` refuses an approver the call's own
        principal (four eyes) or one not allowed the call's server or tool. A plain name
        is for in-process callers, which are trusted as they are."""
        verb: approver_auth.Verb = "approve" if approve else "deny"
        if isinstance(approver, Identity):
            name = approver_auth.recorded_name(approver, declared)
            approver_auth.check_may_act(approver, await self.approvals.get(approval_id), verb)
            method: str = approver_auth.credential_of(approver)
        else:
            name, method = approver, "in_process"
        approval = await self.approvals.decide(
            approval_id,
            approve=approve,
            approver=name,
            comment=comment,
            grant_ttl=self.limits.grant_ttl,
        )
        self.metrics.approvals.labels("approved" if approve else "denied").inc()
        self.events.publish(EventType.APPROVED if approve else EventType.DENIED, approval)
        event: dict[str, Any] = {
            "event": "approval",
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "approval_id": approval_id,
            "status": approval.status.value,
            "approver": name,
            "approver_method": method,
        }
        if declared is not None and declared != name:
            event["declared_approver"] = declared  # single-token mode: the body's label
        self.log.write(event)
        return self.events.with_url(approval)


def _flood_key(
    request: DecideRequest, result: PolicyResult | None, decision: Decision
) -> str | None:
    """For a refusal by the approval cap (which any agent can repeat at no cost): its agent,
    whose records the decision log keeps within a per-agent budget. None for the rest."""
    if (
        decision.verdict is Verdict.DENY
        and decision.rule == RULE_TOO_MANY_PENDING
        and result is not None
        and result.action == "require_approval"
    ):
        return agent_key(request.principal)
    return None


MAX_REASON_CHARS = 1024
# Control and format characters (bidi overrides, zero-width marks), surrogates, private use
# and unassigned code points: shown as escapes, never passed raw into text a model reads.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def shown(reason: str) -> str:
    """A reason as the caller is told it: bounded, invisible characters escaped.

    Reasons quote what the caller sent (a tool name, an argument); the answer must not
    grow with the request nor carry characters that reorder or hide text."""
    if len(reason) > MAX_REASON_CHARS:
        reason = f"{reason[:MAX_REASON_CHARS]}… ({len(reason)} characters)"
    if reason.isascii() and reason.isprintable():
        return reason
    return "".join(
        _escape(ch) if unicodedata.category(ch) in _HIDDEN_CATEGORIES else ch for ch in reason
    )


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def mcp_result(decision: Decision) -> dict[str, Any]:
    """The MCP CallToolResult a proxy hands to the agent instead of calling the tool.

    Valid for every tool, whatever its outputSchema: the reason as text, `isError: true`,
    and the decision under `_meta["mcp-policy/decision"]`; never `structuredContent`,
    which clients check against the tool's output schema even for errors."""
    structured = decision.model_dump(
        mode="json", exclude={"mcp_result", "outcome_token"}, exclude_none=True
    )
    return {
        "content": [
            {
                "type": "text",
                "text": f"Tool call refused ({decision.verdict.value}): {decision.reason}",
            }
        ],
        "isError": True,
        "_meta": {DECISION_META_KEY: structured},
    }
