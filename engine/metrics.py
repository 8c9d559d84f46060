"""Prometheus metrics, served at GET /metrics.

Label values come only from bounded sets: verdicts, rule ids (from the policy), and tool
names the policy catalog knows (any other tool is counted as "(unknown)", so an agent
inventing tool names cannot grow the series without bound).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from engine.policy import Policy

UNKNOWN_TOOL = "(unknown)"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.invalid_requests = Counter(
            "mcp_policy_invalid_requests",
            "Requests refused as malformed.",
            ["transport"],
            registry=r,
        )

    def watch_policy(self, policy: Policy) -> None:
        self.registry.register(_ReloadCollector(policy))

    def render(self) -> bytes:
        return generate_latest(self.registry)
