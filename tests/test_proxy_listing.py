"""tools/list filtering: the decision's `denies_tool`, asked per principal.

The shipped policy plus a user package that denies copy_image_set to interns whatever the
arguments ("whole_tool": true). Decisions come from a real Runtime (the in-process OPA),
through the proxy's ToolFilter as the proxy uses it: one filter for every session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.models import DecideRequest, Decision, Principal
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.listing import MAX_CACHED, ToolFilter
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import settings_for

SERVER = "awslabs.healthimaging-mcp-server"
TOOLS = ["copy_image_set", "delete_datastore", "list_datastores"]

INTERNS = """package mcp.rules.interns

deny contains {
	"rule": "interns.no_copies",
	"reason": "interns may not copy image sets",
	"whole_tool": true,
} if {
	input.tool.name == "copy_image_set"
	"intern" in input.principal.roles
}

# Denies the call for its arguments, not the whole tool.
deny contains {"rule": "interns.no_force", "reason": "no force"} if {
	input.tool.name == "delete_datastore"
	"intern" in input.principal.roles
}
"""


class Counting(EmbeddedDecider):
    """The embedded decider, counting what it is asked."""

    asked: int = 0

    async def decide(self, request: DecideRequest, identity: object = None) -> Decision:
        self.asked += 1
        return await super().decide(request)


@pytest.fixture
async def decider(tmp_path: Path) -> AsyncIterator[Counting]:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "interns.rego").write_text(INTERNS)
    runtime = Runtime(
        settings_for(
            tmp_path,
            decision_log="off",
            policy_paths=[PROJECT_ROOT / "rego", PROJECT_ROOT / "policies", extra],
        )
    )
    await runtime.start()
    try:
        yield Counting(runtime)
    finally:
        await runtime.stop()


def _principal(session: str, *roles: str) -> Principal:
    return Principal(agent_id="a-1", session_id=session, user_id="u-1", roles=list(roles))


async def test_hidden_are_the_whole_tool_denies_for_that_principal(decider: Counting) -> None:
    listing = ToolFilter(decider)
    staff = await listing.hidden(SERVER, TOOLS, _principal("s-1"))
    intern = await listing.hidden(SERVER, TOOLS, _principal("s-2", "intern"))
    # Not in the catalog: hidden for everyone. copy_image_set: hidden for the intern only,
    # by the user package's whole-tool deny. delete_datastore's intern deny is per call
    # (no whole_tool), and the tool is hidden anyway by the catalog's deny.
    assert staff == {"delete_datastore", "list_datastores"}
    assert intern == {"copy_image_set", "delete_datastore", "list_datastores"}


async def test_answers_cached_per_principal_and_revision(decider: Counting) -> None:
    listing = ToolFilter(decider)
    staff, intern = _principal("s-1"), _principal("s-2", "intern")
    await listing.hidden(SERVER, TOOLS, staff)
    first = decider.asked
    assert first == len(TOOLS)
    # The same principal again: only the probe that learns the revision.
    assert await listing.hidden(SERVER, TOOLS, staff) == {"delete_datastore", "list_datastores"}
    assert decider.asked == first + 1
    # Another principal is asked about every tool, and is answered for itself.
    assert "copy_image_set" in await listing.hidden(SERVER, TOOLS, intern)
    assert decider.asked == first + 1 + len(TOOLS)


async def test_cache_keeps_at_most_max_cached_principals(decider: Counting) -> None:
    listing = ToolFilter(decider)
    for n in range(MAX_CACHED + 5):
        await listing.hidden(SERVER, TOOLS[:1], _principal(f"s-{n}"))
    assert len(listing._cache) == MAX_CACHED
