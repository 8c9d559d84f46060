"""Which tools a `tools/list` result shows the agent.

A tool is hidden when the policy would deny every call to it, whatever the arguments. The
proxy finds that out by asking the decision service about a call to the tool with empty
arguments, and hides the tool only when the answer is a deny that the policy marks as
holding whatever the arguments: the decision's `denies_tool` (in Rego, a deny
contribution with `"whole_tool": true`; the shipped YAML rules mark the denies of their
chain that way: a tool outside the catalog, a tool or risk class whose rule says deny, an
unusable or missing rule; see `rego/mcp/decision.rego`).

Any other answer shows the tool: a deny that depends on the arguments (for example
`copy_image_set.datastore_id_invalid`, which empty arguments trigger), an allow, a limit,
an approval, or no answer at all (the decision service unreachable). So a hidden tool is
exactly one that is also denied at call time, and nothing is hidden that might be allowed.
What the policy says stays in Rego and YAML: this reads one field of the answer.

The probes are dry runs (`dry_run: true`): the service only looks at rate limits and
approvals, so listing tools consumes no one's quota and opens no approval. They are made
for the principal that lists, and appear in the decision log marked as dry runs.

Answers are cached per (server, policy revision, principal), since a policy may deny a
whole tool to some callers only (by role, say); each listing costs one decision to learn
the revision, plus one per tool not yet seen under that key. At most `MAX_CACHED` keys are
kept (the least recently used goes).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import anyio

from engine.errors import EngineError
from engine.models import DecideRequest, Decision, Principal, Verdict
from engine.proxy.decider import Decider

log = logging.getLogger(__name__)

MAX_CACHED = 1024

_Key = tuple[str, str, str]


def hides(decision: Decision) -> bool:
    """Whether `decision` (for a call with empty arguments) denies the whole tool."""
    return decision.verdict is Verdict.DENY and bool(decision.denies_tool)


class ToolFilter:
    """Probes and caches whole-tool denials; shared by every session of one proxy."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self._cache: OrderedDict[_Key, dict[str, bool]] = OrderedDict()

    def _known(self, server: str, revision: str, principal: Principal) -> dict[str, bool]:
        key = (server, revision, principal.model_dump_json())
        known = self._cache.get(key)
        if known is None:
            known = self._cache[key] = {}
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return known

    async def hidden(self, server: str, tools: list[str], principal: Principal) -> set[str]:
        """The names among `tools` that the policy denies whatever the arguments."""
        if not tools:
            return set()
        first = await self._probe(server, tools[0], principal)
        if first is None:
            return set()
        revision = first.policy_revision
        known = self._known(server, revision, principal)
        known[tools[0]] = hides(first)
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
                known[name] = hides(decision)
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
