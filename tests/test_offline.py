"""The policy evaluated without a service (engine/authoring/offline.py) answers as the
service's policy does, and refuses what the service refuses."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from engine.authoring.offline import OfflinePolicy
from engine.errors import InvalidRequest, PolicyRejected
from engine.settings import DEFAULT_POLICY_PATHS
from engine.transports.server import Servers
from tests.clients import HttpClient
from tests.conftest import approval_call, copy_call, copy_policy


async def test_offline_answers_as_the_service_does(servers: Servers) -> None:
    async with (
        await OfflinePolicy.load(servers.runtime.settings.policy_paths) as offline,
        httpx.AsyncClient(base_url=servers.http_url) as http,
    ):
        assert offline.revision == servers.runtime.policy.revision
        client = HttpClient(http)
        rules = set()
        for call in (copy_call(), approval_call(), copy_call(datastore_id="not-hex")):
            decision = await client.decide(call)
            result = offline.evaluate(offline.input_for(call))
            assert result.rule == decision["rule"]
            rules.add(result.rule)
        assert len(rules) == 3  # an allow, an approval and a deny


async def test_offline_refuses_a_bad_call_and_a_bad_policy(tmp_path: Path) -> None:
    async with await OfflinePolicy.load(list(DEFAULT_POLICY_PATHS)) as offline:
        with pytest.raises(InvalidRequest, match="server"):
            offline.input_for({"tool": "copy_image_set"})
        with pytest.raises(InvalidRequest, match="timezone"):
            offline.input_for(copy_call(), time=datetime(2026, 12, 7, 9, 0))
        doc = offline.input_for(copy_call(), time=datetime(2026, 12, 7, 9, 0, tzinfo=UTC))
        assert doc["request"]["time"] == "2026-12-07T09:00:00.000Z"
    rego, data = copy_policy(tmp_path)
    rules = data / "rules.yaml"
    rules.write_text(
        rules.read_text().replace("\n      action: rate_limit", "\n      action: x", 1)
    )
    with pytest.raises(PolicyRejected, match="rules.yaml"):
        await OfflinePolicy.load([rego, data])
