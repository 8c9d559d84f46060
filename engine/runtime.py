"""Wire the parts together from Settings, and take them down again.

A Runtime owns OPA (a supervised local process, or a client of an external one), the
running policy, the state stores, the decision log and the core service. The servers
(`grpc_server.create_server`, `http_app.create_app`) take a Runtime and only translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from engine.approver_auth import ApproverAuth
from engine.errors import bounded
from engine.identity.base import Identity
from engine.identity.callers import AgentCredentials, DecisionClients
from engine.identity.jwt import JwtVerifier
from engine.models import Approval, ApprovalStatus, Decision, PolicyResult, ResultDecision
from engine.notify.events import ApprovalEvents
from engine.notify.relay import RedisEventRelay
from engine.notify.webhooks import WebhookDispatcher, endpoints_from
from engine.obs import tracing
from engine.obs.metrics import Metrics
from engine.policy.fleet import BundleVerification, ConfigRejected, Fleet, load_config
from engine.policy.inprocess import InProcessOpa
from engine.policy.loader import BundleFile, Policy
from engine.policy.opa_process import OpaProcess
from engine.policy.source import PolicyBundle
from engine.service import DecisionService, Limits
from engine.settings import Settings
from engine.state.approvals import (
    ApprovalStore,
    MemoryApprovalStore,
    PendingCaps,
    RedisApprovalStore,
    SqliteApprovalStore,
)
from engine.state.decision_log import DecisionLog
from engine.state.ratelimit import (
    MemoryRateLimitStore,
    RateLimitStore,
    RedisRateLimitStore,
    SqliteRateLimitStore,
)

if TYPE_CHECKING:
    from engine.policy.rest import Opa

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0
# Open approvals the expiry watch takes over at start, per status (pending, granted).
MAX_WATCHED_AT_START = 10_000


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        webhooks = endpoints_from(settings)  # a mistake refuses to start before anything
        token = settings.approver_token.get_secret_value() if settings.approver_token else None
        self.generated_token = token is None
        self._approver_token = token or secrets.token_urlsafe(32)
        self.approver_auth = ApproverAuth.from_settings(settings, self._approver_token)
        self.opa_process: OpaProcess | None = None
        timeout = settings.opa_timeout_ms / 1000
        result_timeout = settings.result_timeout_ms / 1000
        self.opa: Opa | InProcessOpa
        if settings.opa_url is None and settings.engine == "inprocess":
            self.opa = InProcessOpa(timeout=timeout, result_timeout=result_timeout)
        else:
            opa_url = settings.opa_url
            if opa_url is None:
                self.opa_process = OpaProcess(settings.opa_binary)
                opa_url = self.opa_process.url
            from engine.policy.rest import Opa  # the REST client, for this engine only

            opa_token = settings.opa_token.get_secret_value() if settings.opa_token else None
            self.opa = Opa(opa_url, timeout=timeout, token=opa_token, result_timeout=result_timeout)
        fleet_config = load_config(settings.opa_config) if settings.opa_config else None
        pulled = bool(fleet_config and fleet_config.get("bundles"))
        if pulled and (settings.bundle is not None or "policy_paths" in settings.model_fields_set):
            raise ConfigRejected(
                f"{settings.opa_config}: bundles come from the bundle server, and "
                f"{'bundle' if settings.bundle else 'policy_paths'} names another policy: "
                "give one"
            )
        bundle_file = None
        if settings.bundle is not None:
            key = settings.bundle_verification_key
            verification = (
                BundleVerification(
                    key.get_secret_value(),
                    settings.bundle_verification_key_id,
                    settings.bundle_signing_alg,
                    settings.bundle_scope,
                )
                if key is not None
                else None
            )
            bundle_file = BundleFile(settings.bundle, verification)
        self.policy = Policy(
            self.opa,
            settings.policy_paths,
            settings.policy_schema,
            bundle_file=bundle_file,
            pulled=pulled,
        )
        self.fleet: Fleet | None = None
        if fleet_config is not None:
            log_settings = settings.decision_log_settings
            self.fleet = Fleet(
                fleet_config,
                replica_id=settings.instance_id or uuid.uuid4().hex,
                spool_dir=settings.state_dir / "decision-upload",
                arguments=log_settings.arguments,
                redact=frozenset(log_settings.redact),
            )
        self._redis: Any = None
        self.rate_limits, self.approvals = self._stores(settings)
        self.decision_log = DecisionLog(settings.decision_log_settings)
        self.metrics = Metrics()
        self.metrics.watch_policy(self.policy)
        self.metrics.watch_decision_log(self.decision_log)
        self.metrics.watch_decision_log(self.decision_log)
        self.tracer_provider = tracing.provider_for(settings.otel_exporter)
        self.decision_clients = DecisionClients(
            clients_file=settings.clients_file, mtls=settings.tls_client_ca is not None
        )
        self.agent_credentials = AgentCredentials(
            keys_file=settings.agent_keys_file,
            verifier=JwtVerifier(
                issuer=settings.agent_issuer,
                audience=settings.agent_audience or "",
                jwks_url=settings.agent_jwks_url,
                roles_claim=settings.agent_roles_claim,
            )
            if settings.agent_issuer
            else None,
        )
        self.service = DecisionService(
            self.policy,
            self.rate_limits,
            self.approvals,
            self.decision_log,
            Limits(
                approval_ttl=settings.approval_ttl_seconds,
                grant_ttl=settings.grant_ttl_seconds,
                max_json_depth=settings.max_json_depth,
                rate_limit_fail_open=settings.rate_limit_fail_mode == "open",
                result_max_bytes=settings.result_max_bytes,
            ),
            metrics=self.metrics,
            tracer=tracing.tracer_from(self.tracer_provider),
            credentials=self.agent_credentials,
            events=ApprovalEvents(self._approval_url),
        )
        self.webhooks = WebhookDispatcher(webhooks, self.service.events, self.metrics)
        if self.fleet is not None:
            self.metrics.watch_fleet(self.fleet)
            if self.fleet.uploads_enabled:
                self.service.upload = self._upload
                self.service.upload_result = self._upload_result
                self.policy.on_change.append(self._mask_with)
        self.store_status: dict[str, Any] = {
            "store": settings.store,
            "healthy": True,
            "error": None,
        }
        self.metrics.watch_state_store(lambda: self.store_status)
        # Approval events to and from the other replicas sharing the Redis store.
        self._relay: RedisEventRelay | None = None
        if settings.store == "redis" and settings.redis_url is not None:
            self._relay = RedisEventRelay(
                settings.redis_url.get_secret_value(),
                f"{settings.redis_prefix}approval-events",
                self.service.events,
                timeout=settings.redis_timeout_ms / 1000,
            )
        self._readiness_listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._watch: asyncio.Task[None] | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._last_ready: bool | None = None

    def _stores(self, settings: Settings) -> tuple[RateLimitStore, ApprovalStore]:
        caps = PendingCaps(
            per_agent=settings.approval_max_pending_per_agent,
            per_session=settings.approval_max_pending_per_session,
        )
        if settings.store == "memory":
            return MemoryRateLimitStore(), MemoryApprovalStore(caps=caps)
        if settings.store == "sqlite":
            busy = settings.sqlite_busy_timeout_ms
            return (
                SqliteRateLimitStore(settings.rate_limits_db, busy_timeout_ms=busy),
                SqliteApprovalStore(settings.approvals_db, busy_timeout_ms=busy, caps=caps),
            )
        if settings.redis_url is None:
            raise ValueError("state_store redis needs MCP_POLICY_REDIS_URL")
        import redis.asyncio

        from engine.state.ratelimit import RedisGate, cluster_client

        timeout = settings.redis_timeout_ms / 1000
        url = settings.redis_url.get_secret_value()
        gate = None
        if settings.redis_cluster:
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialWithJitterBackoff

            # The cluster client fails at once past max_connections per node; the gate
            # makes a burst wait briefly for a turn instead, as the pool below does.
            # Two quick retries (each after refreshing the slot map) ride out a
            # failover without holding a call for long when a node is simply down.
            self._redis = cluster_client(
                url,
                decode_responses=True,
                max_connections=settings.redis_max_connections,
                socket_timeout=timeout,
                socket_connect_timeout=max(1.0, timeout),
                health_check_interval=10,
                retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
            )
            gate = RedisGate(settings.redis_max_connections, wait=max(1.0, timeout))
        else:
            # A bounded pool: a burst of decisions waits briefly for a connection instead
            # of opening hundreds (or failing with "too many connections").
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url,
                decode_responses=True,
                max_connections=settings.redis_max_connections,
                timeout=max(1.0, timeout),
                socket_timeout=timeout,
                socket_connect_timeout=max(1.0, timeout),
                health_check_interval=10,
            )
            self._redis = redis.asyncio.Redis(connection_pool=pool)
        return (
            RedisRateLimitStore(self._redis, settings.redis_prefix, gate=gate),
            RedisApprovalStore(self._redis, settings.redis_prefix, gate=gate, caps=caps),
        )

    async def _open_approvals(self) -> list[Approval]:
        """The approvals open now (pending, or granted and unused), for the expiry watch:
        at most MAX_WATCHED_AT_START of each, newest first."""
        found: list[Approval] = []
        for status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED):
            after = None
            while len(found) < MAX_WATCHED_AT_START:
                page = await self.approvals.page(status, 500, after=after)
                found.extend(page.approvals)
                if page.next is None:
                    break
                after = page.next
        return found

    def _approval_url(self, approval_id: str) -> str:
        return f"{self.settings.console_base()}/approvals/{approval_id}"

    @property
    def approver_token(self) -> str:
        return self._approver_token

    async def start(self) -> None:
        """Start OPA (unless external), load the policy, open the stores.

        Raises PolicyRejected when the policy on disk does not compile.
        """
        self.decision_log.open()
        await self.rate_limits.open()
        await self.approvals.open()
        if self.opa_process is not None:
            await self.opa_process.start()
            self.opa_process.on_restart = self._after_opa_restart
        await self.opa.open()
        if not self.policy.pulled:
            await self.policy.load()
        if self.fleet is not None:
            self.fleet.start(self._activate_bundle)
            if self.policy.bundle is not None:
                await self._mask_with(self.policy.bundle)
        await self.agent_credentials.start()
        await self.approver_auth.start()
        await self.service.events.start(self.approvals.claim_expiry, await self._open_approvals())
        if self._relay is not None:
            await self._relay.start()
        await self.webhooks.start()
        self._watch = asyncio.create_task(self._watch_readiness(), name="readiness")
        if self.settings.reload_interval_seconds > 0:
            self._reloader = asyncio.create_task(self._watch_files(), name="policy-watch")

    async def _watch_files(self) -> None:
        """Hot reload: apply edits of the policy files; a broken edit is rejected and logged."""
        while True:
            await asyncio.sleep(self.settings.reload_interval_seconds)
            try:
                await self.policy.reload_if_changed()
            except Exception:
                log.exception("policy watch failed")

    def fleet_status(self) -> dict[str, Any]:
        """What /readyz shows of the fleet: each bundle (active revision, refusals and
        download errors, the last reason) and the decision-log upload's counts."""
        fleet = self.fleet
        if fleet is None:
            return {}
        out: dict[str, Any] = {}
        if fleet.bundles:
            out["bundles"] = {name: state.as_dict() for name, state in fleet.bundles.items()}
        if fleet.uploads_enabled:
            uploads = fleet.uploads
            out["decision_upload"] = {
                **fleet.stats(),
                "dropped_before_spool": uploads.dropped_here + uploads.feed_errors,
                "last_feed_error": uploads.last_feed_error,
            }
        return out

    async def _activate_bundle(self, bundle: PolicyBundle, revisions: dict[str, str]) -> None:
        """A bundle the fleet pulled and verified: validated and activated as policy
        directories are (PolicyRejected leaves the running revision serving)."""
        self.policy.note_bundles(bundle.revision, revisions)
        await self.policy.load(bundle)

    async def _mask_with(self, bundle: PolicyBundle) -> None:
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.use_policy, bundle)

    def _upload(
        self,
        decision: Decision,
        input_doc: dict[str, Any],
        result: PolicyResult | None,
        elapsed: float,
    ) -> None:
        if self.fleet is not None:
            bundles = self.policy.bundles_of(decision.policy_revision) or {}
            self.fleet.decision(decision, input_doc, result, elapsed, bundles)

    def _upload_result(
        self, decision: ResultDecision, input_doc: dict[str, Any], digest: str, elapsed: float
    ) -> None:
        if self.fleet is not None:
            bundles = self.policy.bundles_of(decision.policy_revision) or {}
            self.fleet.result_decision(decision, input_doc, digest, elapsed, bundles)

    async def _after_opa_restart(self) -> None:
        self.policy.mark_stale()
        await self.policy.ensure_loaded()

    async def ready(self) -> bool:
        """Ready: the policy is loaded, OPA answers and the shared state store (Redis)
        answers — unless rate limits fail open by choice (`rate_limit_fail_mode=open`),
        where a replica without its store still decides, so it is only reported.

        The decision log's health is not part of it: a log that cannot write must not stop
        decisions (a not-ready replica is taken out of service, and a shared disk that
        fills would take out every replica), so it is reported instead — in `/readyz`
        (`decision_log`), in `/metrics` and in the service log.
        """
        store_up = await self.check_store()
        if not store_up and self.settings.rate_limit_fail_mode == "closed":
            return False
        return self.policy.loaded and await self.opa.healthy()

    async def check_store(self) -> bool:
        """Whether the state store answers (a PING to Redis; the local stores always do),
        noted in `store_status` for /readyz and /metrics."""
        healthy, error = True, None
        if self._redis is not None:
            try:
                async with asyncio.timeout(max(1.0, self.settings.redis_timeout_ms / 1000)):
                    await self._redis.ping()
            except Exception as exc:  # any failure to answer is "down", with its reason
                healthy, error = False, bounded(f"{type(exc).__name__}: {exc}", 300)
        if healthy != self.store_status["healthy"]:
            if healthy:
                log.warning("the %s state store answers again", self.settings.store)
            else:
                log.error("the %s state store does not answer: %s", self.settings.store, error)
        self.store_status = {"store": self.settings.store, "healthy": healthy, "error": error}
        return healthy

    async def _watch_readiness(self) -> None:
        while True:
            await self.policy.ensure_loaded()
            ready = await self.ready()
            if ready != self._last_ready:
                self._last_ready = ready
                for listener in self._readiness_listeners:
                    await listener(ready)
            await asyncio.sleep(WATCH_INTERVAL)

    def add_readiness_listener(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Call `listener(ready)` now and whenever readiness changes."""
        self._readiness_listeners.append(listener)
        self._last_ready = None

    async def check_approver(self, authorization: str | None) -> Identity:
        """The approver (or operator) `authorization` proves; raises otherwise.

        What the identity may act on is `engine.approver_auth`'s to say."""
        return await self.approver_auth.authenticate(authorization)

    async def check_operator(self, authorization: str | None) -> Identity:
        """The operator `authorization` proves (decision log, status, reload)."""
        identity = await self.approver_auth.authenticate(authorization)
        return self.approver_auth.require_operator(identity)

    async def stop(self) -> None:
        for task in (self._watch, self._reloader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.webhooks.stop()
        if self._relay is not None:
            await self._relay.close()
        await self.service.events.close()
        await self.agent_credentials.close()
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.stop, self.settings.fleet_stop_timeout_seconds)
        await self.opa.close()
        await self.approver_auth.close()
        if self.opa_process is not None:
            await self.opa_process.stop()
        await self.rate_limits.close()
        await self.approvals.close()
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
        self.decision_log.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
