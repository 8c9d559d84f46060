"""Which tools a `tools/list` result shows the agent.

A tool is hidden when the policy would deny every call to it, whatever the arguments. The
proxy finds that out by asking the decision service about a call to the tool with empty
arguments, and hides the tool only when the answer is `deny` with a rule the policy uses
for whole-tool decisions of its YAML catalog (see `rego/mcp/rules/catalog/` and
`policies/rules.yaml`):

- `catalog.default`            the tool is not in the catalog for this server (shipped: deny)
- `catalog.risk_default.<risk>` the tool's risk class says deny (shipped: critical)
- `catalog.rule.<tool>`        the tool's own rule says deny

Any other answer shows the tool: a deny that depends on the arguments (for example
`copy_image_set.datastore_id_invalid`, which empty arguments trigger), an allow, a limit,
an approval, or no answer at all (the decision service unreachable). So a hidden tool is
exactly one that is also denied at call time, and nothing is hidden that might be allowed.
This keys only on the verdict and on rule-id prefixes; what the policy says stays in Rego
and YAML.

The probes are dry runs (`dry_run: true`): the service only looks at rate limits and
approvals, so listing tools consumes no one's quota and opens no approval. They are made
for the session that lists, and appear in the decision log marked as dry runs.

Answers are cached per (server, policy revision): each listing costs one decision to
learn the revision, plus one per tool not yet seen under it.
"""

from __future__ import annotations

import logging

import anyio

from engine.errors import EngineError
from engine.models import DecideRequest, Decision, Principal, Verdict
from engine.proxy.decider import Decider

log = logging.getLogger(__name__)

HIDING_RULES = ("catalog.default",)
HIDING_PREFIXES = ("catalog.risk_default.",)


def hides(decision: Decision, tool: str) -> bool:
    """Whether `decision` (for `tool` with empty arguments) denies the whole tool."""
    if decision.verdict is not Verdict.DENY:
        return False
    rule = decision.rule
    return (
        rule in HIDING_RULES or rule.startswith(HIDING_PREFIXES) or rule == f"catalog.rule.{tool}"
    )


class ToolFilter:
    """Probes and caches whole-tool denials; shared by every session of one proxy."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self._cache: dict[tuple[str, str], dict[str, bool]] = {}

    async def hidden(self, server: str, tools: list[str], principal: Principal) -> set[str]:
        """The names among `tools` that the policy denies whatever the arguments."""
        if not tools:
            return set()
        first = await self._probe(server, tools[0], principal)
        if first is None:
            return set()
        revision = first.policy_revision
        known = self._cache.setdefault((server, revision), {})
        known[tools[0]] = hides(first, tools[0])
        missing = sorted({name for name in tools if name not in known})
        results: dict[str, Decision | None] = {}

        async def probe(name: str) -> None:
            results[name] = await self._probe(server, name, principal)

        async with anyio.create_task_group() as tg:
            for name in missing:
                tg.start_soon(probe, name)
        for name, decision in results.items():
            if decision is None:
                continue
            if decision.policy_revision == revision:
                known[name] = hides(decision, name)
        return {name for name in tools if known.get(name, False)}

    async def _probe(self, server: str, tool: str, principal: Principal) -> Decision | None:
        request = DecideRequest(
            server=server, tool=tool, arguments={}, principal=principal, dry_run=True
        )
        try:
            return await self.decider.decide(request)
        except EngineError as exc:
            log.warning("tools/list: could not ask about %s (shown): %s", tool, exc.message)
            return None
