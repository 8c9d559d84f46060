"""The core: one `decide()` that knows no transport.

transport → translate → OPA → obligations (rate limit, approval) → decision log → transport.
Whatever fails on the way is a deny with the reason, never an allow.

Shadow rules (listed by the policy in `shadow`) are reported, logged and counted, never
enforced: a shadow rate limit counts in a shadow counter of its own, only for calls that
really go through. A `dry_run` request answers what would happen and changes nothing:
limits are only looked at, approvals neither created nor used.

`decide_result()` is the second entry point: the result of a call (its CallToolResult)
goes to `data.mcp.result_decision` with the call's input, and comes back to pass, rewritten
(`engine.policy.redaction` applies the redactions) or refused. It takes nothing from the
state stores; whatever fails on its way is a block, never a pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import secrets
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

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
    CallRequest,
    DecideRequest,
    DecideResultRequest,
    Decision,
    PolicyResult,
    PrincipalProof,
    RateLimitInfo,
    RateLimitSpec,
    RedactionCount,
    ResultAction,
    ResultDecision,
    ResultPolicyResult,
    ShadowSpec,
    ToolCall,
    Verdict,
)
from engine.notify.events import ApprovalEvents, EventType
from engine.obs import tracing
from engine.obs.metrics import UNKNOWN_TOOL, Metrics
from engine.policy import redaction
from engine.policy import result as result_policy
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

# A result decision the engine makes itself (the policy's answer could not be had or used):
# always a block.
RULE_RESULT_UNAVAILABLE = "result.unavailable"
RULE_RESULT_MALFORMED = "result.malformed_answer"
RULE_RESULT_UNREDACTABLE = "result.unredactable"
# A result whose JSON is larger than this is checked, evaluated and redacted on a worker
# thread: the event loop, which answers every other call meanwhile, is not held while OPA
# reads it or the redactions walk it. Smaller ones are decided inline, where the thread
# hand-off (~0.1 ms) would be most of the cost. Measured with the shipped rules: a 30 KB
# image set's metadata takes ~4 ms to pass and ~10 ms to redact, a 0.9 MiB one ~90 ms and
# ~200 ms, against ~1 ms for a call decision.
RESULT_THREAD_BYTES = 16 * 1024
# How many bytes the documents embedded in a result (JSON text, base64, base64 of gzip)
# may decode to, per byte of the largest result decided on: past that, the result cannot
# be checked whole, so it cannot be redacted safely (blocked, result.unredactable).
DECODED_BYTES_PER_RESULT_BYTE = 16

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
_Call = TypeVar("_Call", bound=CallRequest)


@dataclass
class Limits:
    approval_ttl: float
    grant_ttl: float
    max_json_depth: int
    rate_limit_fail_open: bool = False
    result_max_bytes: int = 1024 * 1024  # what the result policy is told (result_info)


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
        # And each decision on a result: its input without the result, the result's SHA-256.
        self.upload_result: Callable[[ResultDecision, dict[str, Any], str, float], None] | None = (
            None
        )

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
                self._log_invalid(decision_id, transport, exc)
                raise
            span.set_attribute("mcp.server", call.server)
            span.set_attribute("mcp.tool", call.name)
            request, identity, rejected, input_doc = await self._call_input(
                call, request, identity, asserted_by, decision_id, now, transport
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
                self._count_rejected(exc, transport)
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

    async def _call_input(
        self,
        call: ToolCall,
        request: _Call,
        identity: Identity | None,
        asserted_by: str | None,
        decision_id: str,
        now: datetime,
        transport: str,
    ) -> tuple[_Call, Identity | None, _Rejected | None, dict[str, Any]]:
        """The principal as `_principal` establishes it, and the call's input document on
        it: what a call decision and a result decision both start from."""
        request, identity, rejected = await self._principal(request, identity, asserted_by)
        input_doc = translate.input_document(
            call,
            request,
            decision_id=decision_id,
            now=now,
            transport=transport,
            identity=identity,
            asserted_by=asserted_by,
        )
        return request, identity, rejected, input_doc

    async def _principal(
        self, request: _Call, identity: Identity | None, asserted_by: str | None
    ) -> tuple[_Call, Identity | None, _Rejected | None]:
        """The request with the principal its credential proves (when it carries one), the
        identity, and why the principal cannot be believed (None when it can): a credential
        that does not verify, or a principal said to be verified by an unknown caller."""
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
        return request, identity, rejected

    def _count_rejected(self, rejected: _Rejected, transport: str) -> None:
        if rejected.rule == RULE_INVALID_CREDENTIAL:
            self.metrics.invalid_credentials.inc()
        else:
            self.metrics.unauthenticated_callers.labels(transport).inc()

    def _log_invalid(self, decision_id: str, transport: str, exc: EngineError) -> None:
        """A request refused as invalid, in the log (what was wrong, never the request)."""
        self.log.write(
            {
                "event": "invalid_request",
                "decision_id": decision_id,
                "transport": transport,
                "error": exc.message,
            }
        )

    async def decide_result(
        self,
        request: DecideResultRequest,
        *,
        transport: str,
        identity: Identity | None = None,
        asserted_by: str | None = None,
    ) -> ResultDecision:
        """Decide on the result of one tool call (`data.mcp.result_decision`): pass it on,
        rewrite it (redact) or refuse it (block). Raises InvalidRequest for a malformed
        request; every other failure (the policy cannot be evaluated in time, has no
        result_decision, answers something malformed, asks for a redaction that cannot be
        applied, or one that cannot be applied safely) is a block, never a pass.

        The principal is established as `decide` does (`identity`, the request's
        credential, `asserted_by` for a principal a known caller verified). The result is
        encoded once: its size (`input.result_info.size_bytes`), its SHA-256 (the log's
        `result_sha256`) and the policy's input are taken from those bytes. A result of
        more than RESULT_THREAD_BYTES is evaluated and redacted on a worker thread. A dry
        run is decided and answered the same, logged as a dry run, and not counted."""
        if identity is not None:
            request = request.model_copy(
                update={"principal": translate.proven_principal(request.principal, identity)}
            )
        decision_id = "rdec_" + uuid.uuid4().hex
        started = time.perf_counter()
        now = datetime.now(UTC)
        with tracing.span(self.tracer, "decide_result") as span:
            span.set_attribute("mcp_policy.decision_id", decision_id)
            large = not small(request.result, RESULT_THREAD_BYTES)
            try:
                call = translate.tool_call(request, max_depth=self.limits.max_json_depth)
                if large:  # checked and encoded (tens of ms for a MiB) off the event loop
                    result, result_json = await asyncio.to_thread(
                        _checked, request.result, self.limits.max_json_depth
                    )
                else:
                    result, result_json = _checked(request.result, self.limits.max_json_depth)
            except EngineError as exc:
                self._log_invalid(decision_id, transport, exc)
                raise
            span.set_attribute("mcp.server", call.server)
            span.set_attribute("mcp.tool", call.name)
            request, identity, rejected, input_doc = await self._call_input(
                call, request, identity, asserted_by, decision_id, now, transport
            )
            document = translate.result_document(
                input_doc,
                request.decision_id,
                size_bytes=len(result_json),
                max_bytes=self.limits.result_max_bytes,
            )
            if rejected is not None:  # never decided on the principal the caller declared
                self._count_rejected(rejected, transport)
                decision = self._result_refused(
                    decision_id, self.policy.revision, rejected.rule, str(rejected)
                )
            else:
                decision = await self._judge_result(
                    decision_id, document, result, result_json, large
                )
            if request.dry_run:
                decision.dry_run = True
            span.set_attribute("mcp_policy.result_action", decision.action.value)
            span.set_attribute("mcp_policy.rule", decision.rule)
        elapsed = time.perf_counter() - started
        digest = hashlib.sha256(result_json).hexdigest()
        if not request.dry_run:
            self._count_result(decision, transport, elapsed)
        written = self.log.result_decision(
            decision,
            request,
            call,
            call_decision_id=request.decision_id,
            time=input_doc["request"]["time"],
            transport=transport,
            latency_ms=elapsed * 1000,
            result_sha256=digest,
            size_bytes=len(result_json),
            bundles=self.policy.bundles_of(decision.policy_revision),
            input_doc=document,
        )
        if written is not None:  # MCP_POLICY_DECISION_LOG_SYNC=always: handed on once written
            try:
                await written
            except StateUnavailable as exc:
                decision = self._result_refused(
                    decision_id,
                    decision.policy_revision,
                    RULE_STATE_UNAVAILABLE,
                    f"decision log unavailable, so the result was not handed on: {exc}",
                )
                self.log.result_decision(
                    decision,
                    request,
                    call,
                    call_decision_id=request.decision_id,
                    time=input_doc["request"]["time"],
                    transport=transport,
                    latency_ms=(time.perf_counter() - started) * 1000,
                    result_sha256=digest,
                    size_bytes=len(result_json),
                )
        if self.upload_result is not None:
            self.upload_result(decision, document, digest, elapsed)
        return decision

    async def _judge_result(
        self,
        decision_id: str,
        document: dict[str, Any],
        result: dict[str, Any],
        result_json: bytes,
        large: bool,
    ) -> ResultDecision:
        """The result decision on `result`, evaluated and, for redact, applied (on a worker
        thread when `large`)."""
        try:
            answer, revision = await self._evaluate_result(document, result, result_json, large)
        except PolicyUnavailable as exc:
            rule = RULE_RESULT_MALFORMED if exc.kind == "malformed" else RULE_RESULT_UNAVAILABLE
            return self._result_refused(
                decision_id,
                self.policy.revision,
                rule,
                f"result withheld: the result policy could not be evaluated: {exc.message}",
            )
        decision = ResultDecision(
            decision_id=decision_id,
            action=answer.action,
            rule=answer.rule,
            reason=shown(answer.reason),
            policy_revision=revision,
            matched=answer.matched,
            shadow=answer.shadow,
        )
        if answer.action is ResultAction.BLOCK:
            if not decision.reason:
                decision.reason = f"result withheld by the policy (rule {shown(answer.rule)})"
            decision.result = result_policy.refusal(decision)
        elif answer.action is ResultAction.REDACT:
            return await self._redact(decision, answer, result, large)
        return decision

    async def _redact(
        self,
        decision: ResultDecision,
        answer: ResultPolicyResult,
        result: dict[str, Any],
        large: bool,
    ) -> ResultDecision:
        """`decision` (redact) with the rewritten result, or a block when the redactions
        cannot be read (result.malformed_answer) or applied safely (result.unredactable)."""
        try:
            redactions = redaction.redactions_of(answer.redactions)
        except redaction.BadRedaction as exc:
            return self._result_refused(
                decision.decision_id,
                decision.policy_revision,
                RULE_RESULT_MALFORMED,
                f"result withheld: the result policy asked for a redaction that cannot be "
                f"applied: {exc}",
                answer,
            )
        work = functools.partial(
            redaction.apply,
            result,
            redactions,
            max_decoded_bytes=self.limits.result_max_bytes * DECODED_BYTES_PER_RESULT_BYTE,
        )
        try:
            applied = await asyncio.to_thread(work) if large else work()
        except Exception:  # the applier is not expected to raise: blocked all the same
            log.exception("redacting result %s failed", decision.decision_id)
            applied = None
        if applied is None or applied.unredactable is not None:
            why = applied.unredactable if applied is not None else "the redaction failed"
            return self._result_refused(
                decision.decision_id,
                decision.policy_revision,
                RULE_RESULT_UNREDACTABLE,
                f"result withheld: it cannot be redacted safely: {why}",
                answer,
            )
        for entry, count in zip(answer.redactions, applied.counts, strict=True):
            if count and entry.get("block_if_found") is True:
                # What must never pass, even redacted, found where only the engine looks
                # (a document it decoded): the whole result is blocked, as Rego would have.
                decision.action = ResultAction.BLOCK
                decision.rule = entry["rule"]
                reason = entry.get("block_reason")
                decision.reason = (
                    shown(reason)
                    if isinstance(reason, str) and reason
                    else (f"result withheld by the policy (rule {shown(entry['rule'])})")
                )
                decision.result = result_policy.refusal(decision)
                return decision
        # What was redacted: the redactions that replaced something (a policy may ask for
        # dozens of paths a result does not hold; the rule ids asked are in `matched`).
        decision.redactions = [
            RedactionCount(rule=r.rule, path=r.path, pattern=r.pattern, count=count)
            for r, count in zip(redactions, applied.counts, strict=True)
            if count
        ]
        if not decision.redactions:
            # Nothing the policy named is in this result: it goes on as it came, and is
            # counted and logged as passed (the rules that asked are in `matched`).
            decision.action = ResultAction.PASS
            decision.reason = f"nothing to redact ({decision.reason})"
            return decision
        decision.result = result_policy.with_meta(applied.result, decision)
        return decision

    async def _evaluate_result(
        self,
        document: dict[str, Any],
        result: dict[str, Any],
        result_json: bytes,
        large: bool,
    ) -> tuple[ResultPolicyResult, str]:
        with tracing.span(self.tracer, "opa.evaluate_result"):
            started = time.perf_counter()
            evaluated = await self.policy.evaluate_result(
                {**document, "result": result},
                translate.result_input(document, result_json),
                in_thread=large,
            )
            self.metrics.result_opa_seconds.observe(time.perf_counter() - started)
            return evaluated

    @staticmethod
    def _result_refused(
        decision_id: str,
        revision: str,
        rule: str,
        reason: str,
        answer: ResultPolicyResult | None = None,
    ) -> ResultDecision:
        """A block the engine decided (the principal, or the policy's answer, could not be
        used), with the refusal to hand the agent."""
        decision = ResultDecision(
            decision_id=decision_id,
            action=ResultAction.BLOCK,
            rule=rule,
            reason=shown(reason),
            policy_revision=revision,
            matched=answer.matched if answer is not None else [],
            shadow=answer.shadow if answer is not None else [],
        )
        decision.result = result_policy.refusal(decision)
        return decision

    def _count_result(self, decision: ResultDecision, transport: str, elapsed: float) -> None:
        metrics = self.metrics
        metrics.result_decisions.labels(decision.action.value, decision.rule).inc()
        for applied in decision.redactions:
            if applied.count:
                metrics.result_redactions.labels(applied.rule).inc(applied.count)
        for spec in decision.shadow:
            metrics.shadow.labels(spec.level, spec.rule).inc()
        metrics.result_decision_seconds.labels(transport).observe(elapsed)

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


def _checked(result: Any, max_depth: int) -> tuple[dict[str, Any], bytes]:
    """The tool result checked (`translate.tool_result`) and its one encoding: compact JSON
    in UTF-8, whose length is its size and whose digest names it."""
    checked = translate.tool_result(result, max_depth=max_depth)
    return checked, json.dumps(checked, separators=(",", ":"), ensure_ascii=False).encode()


# Nodes `small` looks at, at most, before it calls a value large.
SMALL_NODES = 4096


def small(value: Any, limit: int) -> bool:
    """Whether the JSON of `value` is surely under about `limit` bytes: a walk of at most
    SMALL_NODES nodes (strings by their length, anything else a few bytes), so the answer
    costs next to nothing for a result of any size. Deciding where to do the work needs
    it before the result is encoded."""
    size, seen = 0, 0
    stack = [value]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > SMALL_NODES:
            return False
        if isinstance(node, str):
            size += len(node) + 2
        elif isinstance(node, dict | list):
            if len(node) > SMALL_NODES:
                return False
            if isinstance(node, dict):
                size += 2 + sum(4 + len(k) for k in node if isinstance(k, str))
                stack.extend(node.values())
            else:
                size += 2 + len(node)
                stack.extend(node)
        else:
            size += 8
        if size > limit:
            return False
    return True


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
