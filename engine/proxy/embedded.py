"""`EmbeddedDecider`: the decision service in the proxy's own process (`--embedded`)."""

from __future__ import annotations

from engine.errors import EngineError, NotFound
from engine.identity.base import Identity
from engine.models import ApprovalRef, DecideRequest, DecideResultRequest, Decision, ResultDecision
from engine.proxy.decider import DecisionUnavailable
from engine.runtime import Runtime
from engine.settings import Settings

TRANSPORT = "proxy"


class EmbeddedDecider:
    """The decision service in this process, with its own OPA and state stores."""

    def __init__(self, runtime: Runtime, *, owned: bool = False) -> None:
        self.runtime = runtime
        self._owned = owned

    @classmethod
    async def start(cls, settings: Settings) -> EmbeddedDecider:
        """Start a Runtime (OPA, policy, stores) that `close()` stops again."""
        runtime = Runtime(settings)
        try:
            await runtime.start()
        except BaseException:
            await runtime.stop()
            raise
        return cls(runtime, owned=True)

    async def decide(self, request: DecideRequest, identity: Identity | None = None) -> Decision:
        return await self.runtime.service.decide(request, transport=TRANSPORT, identity=identity)

    async def decide_result(
        self, request: DecideResultRequest, identity: Identity | None = None
    ) -> ResultDecision:
        return await self.runtime.service.decide_result(
            request, transport=TRANSPORT, identity=identity
        )

    async def require_known(self) -> None:
        """The service is in this process: the identity goes to it as proven."""

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool:
        try:
            return await self.runtime.service.report_outcome(
                decision_id, outcome_token=outcome_token, succeeded=succeeded
            )
        except EngineError as exc:
            raise DecisionUnavailable(exc.message) from exc

    async def await_approval(self, approval_id: str, timeout: float) -> ApprovalRef | None:
        try:
            return await self.runtime.service.await_approval(approval_id, timeout)
        except NotFound:
            raise
        except EngineError as exc:
            raise DecisionUnavailable(exc.message) from exc

    async def close(self) -> None:
        if self._owned:
            await self.runtime.stop()
