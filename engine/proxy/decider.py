"""Where the proxy gets its decisions: one small interface, two implementations.

`Decider` is all the proxy core knows. `GrpcDecider` (`engine.proxy.grpc_decider`) asks a
running decision service over one long-lived gRPC channel (`--decision-url host:port`);
`EmbeddedDecider` (`engine.proxy.embedded`) runs the service in-process around its own
`Runtime` (`--embedded`), so one command serves a single user with nothing else running.
Both take and return the engine's domain models. Each is imported only by the proxy that
uses it: an embedded proxy loads no gRPC, a gRPC one no policy engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.identity.base import Identity
    from engine.models import (
        ApprovalRef,
        DecideRequest,
        DecideResultRequest,
        Decision,
        ResultDecision,
    )


class DecisionUnavailable(EngineError):
    """The decision service could not be asked (down, slow, or answering an error)."""


class ProxyUnknown(EngineError):
    """The decision service would not know this proxy: the principals the proxy verifies
    would reach it unproven, so the proxy must not serve (the message says the fix)."""


class Decider(Protocol):
    """Asks for decisions and reports outcomes; raises InvalidRequest or DecisionUnavailable.

    `identity` is the agent's credential as the proxy verified it (the HTTP listener with
    --auth-*): the decision's principal is then the one it proves, whatever
    `request.principal` says about agent, user and roles."""

    async def decide(
        self, request: DecideRequest, identity: Identity | None = None
    ) -> Decision: ...

    async def decide_result(
        self, request: DecideResultRequest, identity: Identity | None = None
    ) -> ResultDecision:
        """The decision on an allowed call's result (`identity` as for `decide`): pass,
        redact (`result` is the rewritten result) or block (`result` is the refusal).
        Raises InvalidRequest for a request the service refuses (a result that is no
        CallToolResult, say), DecisionUnavailable when the service cannot be asked: the
        proxy then hands the agent no part of the result."""
        ...

    async def require_known(self) -> None:
        """Before a listener that verifies agents (--auth-*) opens: ProxyUnknown when the
        decision service would not know this proxy, DecisionUnavailable when it cannot be
        asked. The one hand-off of a verified principal: what the proxy proved arrives as
        proven (asserted by this proxy) or the proxy does not start."""
        ...

    async def report_outcome(
        self, decision_id: str, outcome_token: str, *, succeeded: bool
    ) -> bool: ...

    async def await_approval(self, approval_id: str, timeout: float) -> ApprovalRef | None:
        """The approval once it is no longer pending, or as it stands after `timeout`
        seconds (at most `engine.models.MAX_AWAIT_SECONDS`): what a proxy holding a call
        for a human waits on, instead of deciding the call again and again. None when the
        service answered with nothing this proxy can read (treated as still pending);
        raises NotFound for an approval that does not exist, DecisionUnavailable when
        the service cannot be asked."""
        ...

    async def close(self) -> None: ...
