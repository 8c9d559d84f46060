"""Prometheus metrics, served at GET /metrics.

Label values come only from bounded sets: verdicts, result actions, rule ids (from the
policy), and tool names the policy catalog knows (any other tool is counted as "(unknown)",
so an agent inventing tool names cannot grow the series without bound).

Results (`DecisionService.decide_result`): `mcp_policy_result_decisions_total{action,rule}`,
`mcp_policy_result_redactions_total{rule}` (values replaced), the result policy's
evaluation in `mcp_policy_result_opa_seconds` beside the call's `mcp_policy_opa_seconds`,
and `mcp_policy_result_decision_seconds{transport}` end to end.

The decision log's series are read from it at scrape time:
`mcp_policy_decision_log_records_total{result}` — written (to every sink), dropped (lost
by a sink), suppressed (invalid_request events, and approval.too_many_pending decisions
past their per-agent budget, only counted in a summary record);
`mcp_policy_decision_log_modified_records_total{change}` — sanitised, truncated;
`mcp_policy_decision_log_failed_batches_total{sink}` — jsonl, database;
`mcp_policy_decision_log_healthy` (1 while the writer runs and every sink's last write
succeeded) and `mcp_policy_decision_log_queued` (records waiting for the writer).

Approval webhooks (engine/notify/webhooks.py), by endpoint (host:port, never a URL's path):
`mcp_policy_webhook_deliveries_total{endpoint,result}` — delivered, failed (gave up, or an
answer not retried), retried (attempts that failed and were tried again), dropped (lost
to a full queue); `mcp_policy_webhook_queue_depth{endpoint}` (events waiting) read at
scrape time; `mcp_policy_webhook_delivery_seconds{endpoint}` (event published to the
receiver's 2xx answer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from engine.notify.webhooks import EndpointStats
    from engine.policy.fleet import Fleet
    from engine.policy.loader import Policy
    from engine.state.decision_log import DecisionLog

UNKNOWN_TOOL = "(unknown)"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WEBHOOK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _ReloadCollector(Collector):
    """Policy loads and reloads, read from the Policy at scrape time."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "mcp_policy_policy_reloads", "Policy loads and reloads by result.", labels=["result"]
        )
        for result, count in sorted(self._policy.reloads.items()):
            family.add_metric([result], count)
        yield family
        active = GaugeMetricFamily(
            "mcp_policy_policy_revision",
            "The policy revision deciding now (1 for the active one; none before the first "
            "load): what each decision's policy_revision says.",
            labels=["revision"],
        )
        if self._policy.loaded and self._policy.revision:
            active.add_metric([self._policy.revision], 1.0)
        yield active


class _FleetCollector(Collector):
    """Bundles and the decision-log upload (OPA's plugins in the engine library), read at
    scrape time."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "mcp_policy_bundle_active",
            "The bundle revision active now, by bundle (1; none before the first activation).",
            labels=["bundle", "revision"],
        )
        refused = CounterMetricFamily(
            "mcp_policy_bundle_refused",
            "Bundles downloaded and refused (bad signature, tampered, invalid policy): the "
            "running revision kept serving.",
            labels=["bundle"],
        )
        failed = CounterMetricFamily(
            "mcp_policy_bundle_download_errors",
            "Bundle downloads that failed (server unreachable, HTTP error, unreadable bundle).",
            labels=["bundle"],
        )
        for name, state in sorted(self._fleet.bundles.items()):
            if state.revision is not None:
                active.add_metric([name, state.revision], 1.0)
            refused.add_metric([name], state.refused)
            failed.add_metric([name], state.download_errors)
        yield active
        yield refused
        yield failed
        if not self._fleet.uploads_enabled:
            return
        stats = self._fleet.stats()
        uploads = self._fleet.uploads
        queued = GaugeMetricFamily(
            "mcp_policy_decision_upload_queued",
            "Decisions waiting to be uploaded to the collector (in the spool on disk).",
        )
        queued.add_metric([], float(stats.get("queued", 0)))
        yield queued
        spool = GaugeMetricFamily(
            "mcp_policy_decision_upload_spool_bytes",
            "Bytes of decisions waiting in the spool (its cap: buffer_size_limit_bytes).",
        )
        spool.add_metric([], float(stats.get("spool_bytes", 0)))
        yield spool
        events = CounterMetricFamily(
            "mcp_policy_decision_upload_events",
            "Decisions by upload result: sent (acknowledged by the collector), dropped (the "
            "spool's cap, an event larger than an upload, or the engine's queue full).",
            labels=["result"],
        )
        events.add_metric(["sent"], float(stats.get("sent", 0)))
        events.add_metric(
            ["dropped"],
            float(stats.get("dropped", 0)) + uploads.dropped_here + uploads.feed_errors,
        )
        yield events
        failures = CounterMetricFamily(
            "mcp_policy_decision_upload_failures", "Uploads the collector did not acknowledge."
        )
        failures.add_metric([], float(stats.get("upload_failures", 0)))
        yield failures
        failing = GaugeMetricFamily(
            "mcp_policy_decision_upload_failing",
            "1 while the last upload to the collector failed (decisions wait in the spool).",
        )
        failing.add_metric([], 1.0 if stats.get("failing") else 0.0)
        yield failing


STAGES = ("translate", "evaluate", "enforce", "log", "metrics")


class StageTimes(Collector):
    """Where a decision's time goes, summed per stage: plain additions on the hot path
    (a Prometheus observation costs more than some stages), exported as summaries
    `mcp_policy_stage_seconds{stage}` (`_sum`, `_count`) at scrape time."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(STAGES, 0.0)
        self.count = 0

    def add(
        self, translate: float, evaluate: float, enforce: float, log: float, metrics: float
    ) -> None:
        sums = self.sums
        sums["translate"] += translate
        sums["evaluate"] += evaluate
        sums["enforce"] += enforce
        sums["log"] += log
        sums["metrics"] += metrics
        self.count += 1

    def collect(self) -> Iterator[Metric]:
        family = SummaryMetricFamily(
            "mcp_policy_stage_seconds",
            "Time of each stage of the decisions made (translate: the request to the OPA "
            "input; evaluate: the policy; enforce: limits and approvals; log: the decision "
            "log record; metrics: the counters).",
            labels=["stage"],
        )
        for stage in STAGES:
            family.add_metric([stage], count_value=self.count, sum_value=self.sums[stage])
        yield family


class _StoreCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        up = GaugeMetricFamily(
            "mcp_policy_state_store_up",
            "1 when the state store (rate limits, approvals) answers, 0 when it does not "
            "(every decision that needs it is then denied engine.state_unavailable).",
            labels=["store"],
        )
        up.add_metric([str(status["store"])], 1.0 if status["healthy"] else 0.0)
        yield up


class _DecisionLogCollector(Collector):
    """The decision log's counts and health, read from the DecisionLog at scrape time."""

    def __init__(self, log: DecisionLog) -> None:
        self._log = log

    def collect(self) -> Iterator[Metric]:
        health = self._log.health()
        records = CounterMetricFamily(
            "mcp_policy_decision_log_records",
            "Decision log records by result (written, dropped, suppressed).",
            labels=["result"],
        )
        records.add_metric(["written"], health["written"])
        records.add_metric(["dropped"], health["dropped"])
        suppressed = health["suppressed_invalid_requests"] + health["suppressed_decisions"]
        records.add_metric(["suppressed"], suppressed)
        yield records
        modified = CounterMetricFamily(
            "mcp_policy_decision_log_modified_records",
            "Decision log records stored changed: sanitised (text that is not valid "
            "Unicode), truncated (fields over their bound).",
            labels=["change"],
        )
        modified.add_metric(["sanitised"], health["sanitised"])
        modified.add_metric(["truncated"], health["truncated"])
        yield modified
        failed = CounterMetricFamily(
            "mcp_policy_decision_log_failed_batches",
            "Decision log batches a sink failed to write, wholly or partly.",
            labels=["sink"],
        )
        for sink, state in sorted(health["sinks"].items()):
            failed.add_metric([sink], state["failed_batches"])
        yield failed
        yield GaugeMetricFamily(
            "mcp_policy_decision_log_healthy",
            "1 while the decision log writer runs and every sink's last write succeeded.",
            value=1 if health["healthy"] else 0,
        )
        yield GaugeMetricFamily(
            "mcp_policy_decision_log_queued",
            "Decision log records waiting for the writer.",
            value=health["queued"],
        )


class _WebhookCollector(Collector):
    """Webhook deliveries and queue depths, read from the dispatcher at scrape time.
    Endpoints on the same host:port are summed (the label never holds a URL's path)."""

    def __init__(self, stats: Callable[[], list[EndpointStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        deliveries = CounterMetricFamily(
            "mcp_policy_webhook_deliveries",
            "Approval webhook events by endpoint and result (delivered, failed: given up "
            "or not retried, retried: a failed attempt tried again, dropped: lost to a "
            "full queue).",
            labels=["endpoint", "result"],
        )
        depth = GaugeMetricFamily(
            "mcp_policy_webhook_queue_depth",
            "Approval webhook events waiting in an endpoint's queue.",
            labels=["endpoint"],
        )
        counts: dict[str, list[int]] = {}
        for s in self._stats():
            total = counts.setdefault(s.label, [0, 0, 0, 0, 0])
            for i, value in enumerate((s.delivered, s.failed, s.retried, s.dropped, s.queued)):
                total[i] += value
        for label, (delivered, failed, retried, dropped, queued) in sorted(counts.items()):
            for result, value in (
                ("delivered", delivered),
                ("failed", failed),
                ("retried", retried),
                ("dropped", dropped),
            ):
                deliveries.add_metric([label, result], value)
            depth.add_metric([label], queued)
        yield deliveries
        yield depth


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._decision_log: DecisionLog | None = None
        self._decision_log_collector: _DecisionLogCollector | None = None
        self.stages = StageTimes()
        self.registry.register(self.stages)
        r = self.registry
        self.decisions = Counter(
            "mcp_policy_decisions",
            "Decisions by verdict, tool and deciding rule.",
            ["verdict", "tool", "rule"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "mcp_policy_decision_seconds",
            "Time to decide one call, end to end.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.opa_seconds = Histogram(
            "mcp_policy_opa_seconds",
            "Time OPA took to evaluate the decision.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.result_decisions = Counter(
            "mcp_policy_result_decisions",
            "Decisions on tool results by action (pass, redact, block) and deciding rule "
            "(the policy's, or result.unavailable, result.malformed_answer, "
            "result.unredactable when the engine blocked).",
            ["action", "rule"],
            registry=r,
        )
        self.result_redactions = Counter(
            "mcp_policy_result_redactions",
            "Values replaced in tool results, by the redaction's rule.",
            ["rule"],
            registry=r,
        )
        self.result_decision_seconds = Histogram(
            "mcp_policy_result_decision_seconds",
            "Time to decide on one tool result, end to end (redaction included).",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.result_opa_seconds = Histogram(
            "mcp_policy_result_opa_seconds",
            "Time OPA took to evaluate the result decision (beside mcp_policy_opa_seconds, "
            "the call decision's).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.opa_errors = Counter(
            "mcp_policy_opa_errors",
            "Evaluations that failed (the call was denied), by kind.",
            ["kind"],
            registry=r,
        )
        self.rate_limits = Counter(
            "mcp_policy_rate_limit_checks",
            "Rate-limit checks by outcome "
            "(allowed, limited, store_error, released, shadow_allowed, shadow_limited).",
            ["outcome"],
            registry=r,
        )
        self.approvals = Counter(
            "mcp_policy_approvals",
            "Approval events (requested, granted_use, refused_use, approved, denied).",
            ["event"],
            registry=r,
        )
        self.shadow = Counter(
            "mcp_policy_shadow",
            "Shadow rules that matched: what they would have done.",
            ["level", "rule"],
            registry=r,
        )
        self.approval_cap_refusals = Counter(
            "mcp_policy_approval_cap_refusals",
            "Calls denied (rule approval.too_many_pending) because they would have opened "
            "one approval more than the cap allows to wait at once, by cap (agent, session).",
            ["cap"],
            registry=r,
        )
        self.invalid_requests = Counter(
            "mcp_policy_invalid_requests",
            "Requests refused as malformed.",
            ["transport"],
            registry=r,
        )
        self.invalid_credentials = Counter(
            "mcp_policy_invalid_credentials",
            "Decisions denied because the agent credential they carried did not verify.",
            registry=r,
        )
        self.unauthenticated_callers = Counter(
            "mcp_policy_unauthenticated_callers",
            "Decision API calls refused because the caller proved nothing.",
            ["transport"],
            registry=r,
        )
        self.console_sign_ins = Counter(
            "mcp_policy_console_sign_ins",
            "Sign-ins to the approvals console by method (secret, oidc) and result "
            "(signed_in, refused, unavailable).",
            ["method", "result"],
            registry=r,
        )

        self.webhook_seconds = Histogram(
            "mcp_policy_webhook_delivery_seconds",
            "Time from an approval event's publication to the webhook receiver's 2xx answer "
            "(retries included), by endpoint (host:port).",
            ["endpoint"],
            buckets=WEBHOOK_BUCKETS,
            registry=r,
        )

    def watch_webhooks(self, stats: Callable[[], list[EndpointStats]]) -> None:
        """Export the webhook dispatcher's counts (`stats`, read at scrape time)."""
        self.registry.register(_WebhookCollector(stats))

    def watch_state_store(self, status: Callable[[], dict[str, Any]]) -> None:
        """Export whether the state store answers (`status`, read at scrape time: the
        readiness watch checks it every second)."""
        self.registry.register(_StoreCollector(status))

    def watch_fleet(self, fleet: Fleet) -> None:
        self.registry.register(_FleetCollector(fleet))

    def watch_policy(self, policy: Policy) -> None:
        self.registry.register(_ReloadCollector(policy))

    def watch_decision_log(self, log: DecisionLog) -> None:
        """Export `log`'s counts and health; calling it again for the same log is a no-op."""
        if self._decision_log is log:
            return
        if self._decision_log_collector is not None:
            self.registry.unregister(self._decision_log_collector)
        self._decision_log = log
        self._decision_log_collector = _DecisionLogCollector(log)
        self.registry.register(self._decision_log_collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
