"""A fleet, the way OPA users run one: OPA's configuration file, signed bundles pulled from a
bundle server, decisions uploaded to a collector, status reports — against a real bundle
server and collector on loopback (tests/fleet_world.py), bundles built by the pinned
`opa build`, replicas as separate `mcp-policy serve` processes sharing a real Redis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.errors import PolicyRejected
from engine.policy.fleet import check_events, merge_bundles
from engine.policy.source import PolicyBundle
from tests.conftest import copy_call
from tests.fleet_world import (
    FleetServer,
    make_keys,
    opa_build,
    opa_config,
    policy_dirs,
    tamper,
)
from tests.kv import KvPool
from tests.processes import CLI, Serve


def call(i: int, *, user: str | None = None) -> dict[str, Any]:
    """A copy_image_set call (allowed by the shipped policy) of its own agent and session,
    so no limit is shared."""
    body = copy_call(f"fleet-{i}")
    if user is None:
        del body["principal"]["user_id"]
    else:
        body["principal"]["user_id"] = user
    return body


def readyz(serve: Serve) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{serve.url}/readyz", timeout=10)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def wait_until(check: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def active(serve: Serve) -> str | None:
    _, body = readyz(serve)
    revision: str | None = body.get("bundles", {}).get("authz", {}).get("active_revision")
    return revision


def last_error(serve: Serve) -> str | None:
    _, body = readyz(serve)
    error: str | None = body["bundles"]["authz"]["last_error"]
    return error


def refused(serve: Serve) -> int:
    _, body = readyz(serve)
    count: int = body["bundles"]["authz"]["refused"]
    return count


def metrics(serve: Serve) -> str:
    return httpx.get(f"{serve.url}/metrics", timeout=10).text


def test_signed_bundles_are_pulled_verified_and_refused_when_they_should_be(
    tmp_path: Path,
) -> None:
    rego, data = policy_dirs(tmp_path)
    keys, stranger = make_keys(tmp_path), make_keys(tmp_path, "stranger")
    server = FleetServer()
    config = opa_config(tmp_path, server, keys=keys, decision_logs=False, status=True)
    serve = Serve(tmp_path, [], {}, "--opa-config", str(config))
    try:
        # No bundle yet: not ready, and every call is denied, never allowed.
        status, body = readyz(serve)
        assert status == 503 and body["policy_revision"] == "none"
        decision = serve.decide(call(1))
        assert decision["verdict"] == "deny" and decision["rule"] == "engine.unavailable"

        server.publish(
            opa_build([rego, data], tmp_path / "r1.tar.gz", "r1", signing_key=keys.private)
        )
        wait_until(lambda: readyz(serve)[0] == 200, what="ready on r1")
        decision = serve.decide(call(2))
        assert decision["verdict"] == "allow" and decision["policy_revision"] == "r1", decision
        assert 'mcp_policy_bundle_active{bundle="authz",revision="r1"} 1.0' in metrics(serve)

        # Each of these is refused with its reason; r1 keeps deciding.
        signed_r2 = opa_build([rego, data], tmp_path / "r2.tar.gz", "r2", signing_key=keys.private)
        wrong_key = opa_build(
            [rego, data], tmp_path / "r3.tar.gz", "r3", signing_key=stranger.private
        )
        unsigned = opa_build([rego, data], tmp_path / "r4.tar.gz", "r4")
        broken = tmp_path / "broken"
        shutil.copytree(data, broken)
        rules = broken / "rules.yaml"
        rules.write_text(
            rules.read_text().replace("\n      action: rate_limit", "\n      action: maybe", 1)
        )
        invalid = opa_build([rego, broken], tmp_path / "r5.tar.gz", "r5", signing_key=keys.private)
        cases = [
            (tamper(signed_r2, tmp_path / "tampered.tar.gz"), "digest"),
            (wrong_key, "verification"),
            (unsigned, "signatures"),
            (invalid, "maybe"),
        ]
        for n, (bundle, reason) in enumerate(cases, start=1):
            server.publish(bundle)
            wait_until(
                lambda reason=reason: reason in (last_error(serve) or ""),
                what=f"refusal of {bundle.name} ({reason}): {last_error(serve)}",
            )
            assert active(serve) == "r1", bundle.name
            decision = serve.decide(call(10 + n))
            assert decision["verdict"] == "allow" and decision["policy_revision"] == "r1"
        assert refused(serve) >= len(cases)
        assert f'mcp_policy_bundle_refused_total{{bundle="authz"}} {float(refused(serve))}' in (
            metrics(serve)
        )

        # The signed, valid new revision is taken.
        server.publish(signed_r2)
        wait_until(lambda: active(serve) == "r2", what="r2 active")
        decision = serve.decide(call(20))
        assert decision["policy_revision"] == "r2"
        # The status service heard of the activation, in OPA's format.
        server.wait(
            lambda r: any(
                s.get("bundles", {}).get("authz", {}).get("active_revision") == "r2"
                for s in r.statuses
            )
        )
        report = server.received.statuses[-1]
        assert report["labels"]["id"] and report["labels"]["version"]
    finally:
        serve.stop()
        server.stop()
    # The local decision log says which bundle and revision decided.
    records = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    decided = [r for r in records if r.get("event") == "decision"]
    assert {r["policy_revision"] for r in decided} >= {"r1", "r2", "none"}
    for record in decided:
        if record["policy_revision"] == "none":
            assert "bundles" not in record  # denied before any bundle
        else:
            assert record["bundles"] == {"authz": record["policy_revision"]}


def test_three_replicas_take_a_new_revision_and_every_decision_reaches_the_collector_once(
    tmp_path: Path, kv_pool: KvPool
) -> None:
    rego, data = policy_dirs(tmp_path)
    keys = make_keys(tmp_path)
    server = FleetServer()
    server.publish(opa_build([rego, data], tmp_path / "r1.tar.gz", "r1", signing_key=keys.private))
    config = opa_config(tmp_path, server, keys=keys, labels={"fleet": "test"})
    redis = kv_pool.get("redis")
    replicas = []
    try:
        for i in range(3):
            where = tmp_path / f"replica-{i}"
            where.mkdir()
            env = {
                "MCP_POLICY_REDIS_URL": redis.url,
                "MCP_POLICY_REDIS_PREFIX": f"fleet-{tmp_path.name}:",
                "MCP_POLICY_INSTANCE_ID": f"replica-{i}",
            }
            replicas.append(Serve(where, [], env, "--opa-config", str(config), measured=i == 0))
        for replica in replicas:
            wait_until(lambda r=replica: active(r) == "r1", what="r1 everywhere")
        server.publish(
            opa_build([rego, data], tmp_path / "r2.tar.gz", "r2", signing_key=keys.private)
        )
        for replica in replicas:
            wait_until(lambda r=replica: active(r) == "r2", what="r2 everywhere")
        answered: dict[str, tuple[int, dict[str, Any]]] = {}
        for n in range(60):
            replica = n % 3
            decision = replicas[replica].decide(call(100 + n))
            assert decision["policy_revision"] == "r2"
            answered[decision["decision_id"]] = (replica, decision)
        server.wait(lambda r: set(answered) <= set(r.ids()))
    finally:
        for replica in replicas:
            replica.stop()
        server.stop()
    ids = server.received.ids()
    assert all(ids[d] == 1 for d in answered), "a decision arrived twice"
    # Every event reads as OPA's own EventV1 (no field OPA does not know).
    assert check_events(server.received.events) == len(server.received.events)
    with pytest.raises(ValueError, match="unknown field"):
        check_events([{**server.received.events[0], "verdict": "allow"}])
    events = {e["decision_id"]: e for e in server.received.events}
    for decision_id, (replica, decision) in answered.items():
        event = events[decision_id]
        assert event["labels"]["id"] == f"replica-{replica}"
        assert event["labels"]["fleet"] == "test"
        assert event["path"] == "mcp/decision"
        assert event["bundles"] == {"authz": {"revision": "r2"}}
        assert event["result"]["verdict"] == decision["verdict"]
        assert event["result"]["policy"]["action"]
        assert event["input"]["tool"]["name"] == "copy_image_set"
        assert event["timestamp"] and event["metrics"]["timer_mcp_policy_decision_ns"] > 0


def test_a_collector_down_for_30_seconds_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rego, data = policy_dirs(tmp_path)
    server = FleetServer()
    config = opa_config(tmp_path, server, bundles=False, upload_delay=(1, 2))
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(config))
    try:
        server.stop()
        answered = [serve.decide(call(200 + n))["decision_id"] for n in range(40)]
        down_since = time.monotonic()
        wait_until(
            lambda: "mcp_policy_decision_upload_failing 1.0" in metrics(serve), what="failing"
        )
        text = metrics(serve)
        assert "mcp_policy_decision_upload_queued 40.0" in text, text
        time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
        server.start()
        server.wait(lambda r: set(answered) <= set(r.ids()), timeout=60)
        wait_until(
            lambda: "mcp_policy_decision_upload_failing 0.0" in metrics(serve), what="recovered"
        )
        assert 'mcp_policy_decision_upload_events_total{result="sent"} 40.0' in metrics(serve)
    finally:
        serve.stop()
        server.stop()
    assert all(server.received.ids()[d] == 1 for d in answered)


def test_sigterm_flushes_and_a_restart_sends_what_an_outage_kept(tmp_path: Path) -> None:
    rego, data = policy_dirs(tmp_path)
    server = FleetServer()
    # Uploads every 5 minutes: only the flush at SIGTERM can send these in time.
    config = opa_config(tmp_path, server, bundles=False, upload_delay=(300, 600))
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(config))
    first = [serve.decide(call(300 + n))["decision_id"] for n in range(10)]
    assert serve.stop() == 0
    assert set(first) <= set(server.received.ids())

    # The collector is down at SIGTERM: the decisions stay in the spool on disk, and the
    # next start of the replica (same state directory) sends them.
    server.stop()
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(config))
    second = [serve.decide(call(400 + n))["decision_id"] for n in range(10)]
    assert serve.stop() == 0
    server.start()
    quick = opa_config(tmp_path, server, bundles=False, upload_delay=(1, 1))
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(quick))
    try:
        server.wait(lambda r: set(second) <= set(r.ids()))
    finally:
        serve.stop()
        server.stop()
    ids = server.received.ids()
    assert all(ids[d] == 1 for d in first + second)


def test_decisions_are_masked_by_the_policy_as_opa_masks_them(tmp_path: Path) -> None:
    rego, data = policy_dirs(tmp_path)
    mask = tmp_path / "mask"
    mask.mkdir()
    (mask / "mask.rego").write_text(
        "package system.log\n\n"
        "# The user behind the agent is not the collector's business.\n"
        'mask contains "/input/principal/user_id"\n'
    )
    server = FleetServer()
    config = opa_config(tmp_path, server, bundles=False, labels={"region": "eu"})
    serve = Serve(tmp_path, [rego, data, mask], {}, "--opa-config", str(config))
    try:
        decision_id = serve.decide(call(500, user="alice@example.com"))["decision_id"]
        server.wait(lambda r: decision_id in r.ids())
    finally:
        serve.stop()
        server.stop()
    (event,) = [e for e in server.received.events if e["decision_id"] == decision_id]
    assert event["erased"] == ["/input/principal/user_id"]
    assert "user_id" not in event["input"]["principal"]
    assert "alice" not in json.dumps(event)
    assert event["labels"]["region"] == "eu"
    # Arguments go out as the local log keeps them: hashed by default.
    assert "arguments" not in event["input"]["tool"]
    assert len(event["input"]["tool"]["arguments_sha256"]) == 64


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"discovery": {"service": "x"}}, "discovery: not a key this engine runs"),
        ({"plugins": {"x": {}}}, "plugins: not a key this engine runs"),
        (
            {
                "services": {"s": {"url": "http://127.0.0.1:9"}},
                "bundles": {"b": {"polling": {"every": 1}}},
            },
            "bundles.b.polling.every",
        ),
        (
            {"services": {"s": {"url": "http://127.0.0.1:9"}}, "decision_logs": {"plugin": "x"}},
            "decision_logs.plugin",
        ),
        (
            {"services": {"s": {"url": "http://127.0.0.1:9"}}, "decision_logs": {"service": "t"}},
            'invalid service name "t"',
        ),
        ({"services": {"s": {}}}, "'url' is a required property"),
        (
            {
                "keys": {"k": {"key": "x", "algorithm": "RS256"}},
                "bundles": {"b": {"signing": {"keyid": "nope"}}},
            },
            "nope",
        ),
    ],
)
def test_an_opa_configuration_the_engine_would_not_run_is_refused_naming_the_key(
    tmp_path: Path, config: dict[str, Any], named: str
) -> None:
    path = tmp_path / "opa.yaml"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [
            *CLI,
            "serve",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--state-dir",
            str(tmp_path),
            "--opa-config",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_bundle_file_is_verified_loaded_and_reloaded(tmp_path: Path) -> None:
    rego, data = policy_dirs(tmp_path)
    keys = make_keys(tmp_path)
    bundle = tmp_path / "policy.tar.gz"
    opa_build([rego, data], bundle, "f1", signing_key=keys.private)
    env = {
        "MCP_POLICY_BUNDLE_VERIFICATION_KEY": str(keys.public),
        "MCP_POLICY_RELOAD_INTERVAL_SECONDS": "0.2",
    }
    serve = Serve(tmp_path, [], env, "--bundle", str(bundle))
    try:
        assert serve.decide(call(600))["policy_revision"] == "f1"
        opa_build([rego, data], tmp_path / "f2.tar.gz", "f2", signing_key=keys.private)
        (tmp_path / "f2.tar.gz").replace(bundle)
        wait_until(lambda: readyz(serve)[1]["policy_revision"] == "f2", what="f2 loaded")
        # A tampered file is refused at reload; f2 keeps deciding.
        tamper(bundle, tmp_path / "t.tar.gz").replace(bundle)
        wait_until(
            lambda: not readyz(serve)[1]["last_reload"]["ok"], what="the tampered file refused"
        )
        _, body = readyz(serve)
        assert body["policy_revision"] == "f2"
        assert any("digest" in e for e in body["last_reload"]["errors"]), body["last_reload"]
        assert serve.decide(call(601))["policy_revision"] == "f2"
    finally:
        serve.stop()
    # Started on a tampered file: refused, naming why.
    done = subprocess.run(
        [
            *CLI,
            "serve",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--state-dir",
            str(tmp_path),
            "--bundle",
            str(bundle),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 2, done.stderr
    assert "digest" in done.stderr and "Traceback" not in done.stderr


def test_several_bundles_make_one_policy_and_may_not_overlap() -> None:
    framework = PolicyBundle({"mcp/decision.rego": "package mcp\n"}, {}, "f1")
    catalog = PolicyBundle({}, {"mcp_policy": {"default": {"action": "deny"}}}, "c7")
    merged, revisions = merge_bundles({"framework": framework, "catalog": catalog})
    assert revisions == {"catalog": "c7", "framework": "f1"}
    assert list(merged.modules) == ["mcp-policy/bundles/framework/mcp/decision.rego"]
    assert merged.data == {"mcp_policy": {"default": {"action": "deny"}}}
    # The combined revision changes with either bundle's.
    again, _ = merge_bundles(
        {"framework": framework, "catalog": PolicyBundle({}, catalog.data, "c8")}
    )
    assert again.revision != merged.revision and merged.revision.startswith("bundles:")
    with pytest.raises(PolicyRejected, match="mcp_policy.default.action"):
        merge_bundles({"a": catalog, "b": PolicyBundle({}, catalog.data, "c9")})
