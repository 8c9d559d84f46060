"""The fleet under attack, and on an operator's bad day: a bundle server answering garbage,
cut or hostile archives, bundles that must never replace the running revision, a server
that hangs; a collector that fails, hangs or acknowledges late; a spool past its cap; the
REST engine pulling bundles; a bearer token taken from the environment.

The assertion is always the same: no crash, no 5xx, never an allow the running revision
would not give, the running revision keeps serving, nothing lost or counted wrongly, and
the reason is visible (the service's log, /readyz, /metrics). Everything is real:
`mcp-policy serve` processes, the pinned `opa` (`opa build`, and the `opa run` the REST
engine supervises), a bundle server and collector on loopback (tests/fleet_world.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fleet_world import (
    FleetServer,
    make_keys,
    members,
    opa_build,
    opa_config,
    policy_dirs,
    tamper,
    tar_gz,
)
from tests.processes import CLI, Serve
from tests.test_fleet import active, call, metrics, readyz, wait_until

BUNDLE = "authz"
# A module that would let every call through, were it ever loaded.
EVIL_MODULE = b"""package mcp.rules.evil

allow contains {"rule": "evil.everything", "reason": "hostile"} if true
"""


def denied_call(i: int) -> dict[str, Any]:
    """A call of a tool no catalog lists: the shipped policy denies it (catalog.default)."""
    return {
        "server": "hostile.example",
        "tool": "not_in_any_catalog",
        "arguments": {},
        "principal": {"agent_id": f"hostile-{i}", "session_id": f"hostile-{i}"},
    }


def serving(serve: Serve, revision: str, n: int) -> None:
    """The service is up and ready, and decides as `revision` does: the allowed call
    allowed, the unknown tool denied by the catalog's default, both naming `revision`."""
    assert serve.proc.poll() is None, "the service died"
    status, body = readyz(serve)
    assert status == 200 and body["policy_revision"] == revision, body
    allowed = serve.decide(call(n))
    assert allowed["verdict"] == "allow" and allowed["policy_revision"] == revision, allowed
    denied = serve.decide(denied_call(n))
    assert (denied["verdict"], denied["rule"], denied["policy_revision"]) == (
        "deny",
        "catalog.default",
        revision,
    ), denied


def bundle_state(serve: Serve) -> dict[str, Any]:
    _, body = readyz(serve)
    state: dict[str, Any] = body["bundles"][BUNDLE]
    return state


def until_active(serve: Serve, revision: str) -> None:
    """Wait for `revision` to be the bundle's active one; say how the bundle stands if not."""
    try:
        wait_until(lambda: active(serve) == revision, what=f"{revision} active")
    except AssertionError:
        raise AssertionError(f"{revision} not active: {bundle_state(serve)}") from None


def tune(config: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Edit the OPA configuration file opa_config wrote."""
    doc = yaml.safe_load(config.read_text())
    edit(doc)
    config.write_text(yaml.safe_dump(doc))
    return config


def with_manifest(files: dict[str, bytes], revision: str) -> dict[str, bytes]:
    manifest = json.loads(files["/.manifest"])
    manifest["revision"] = revision
    return {**files, "/.manifest": json.dumps(manifest).encode()}


def permissive(files: dict[str, bytes]) -> dict[str, bytes]:
    """The bundle's files with the catalog's default turned to allow: every unknown tool
    is let through by a policy built of them."""
    data = json.loads(files["/data.json"])
    data["mcp_policy"]["default"] = {"action": "allow"}
    return {**files, "/data.json": json.dumps(data).encode()}


def edited(data: Path, into: Path, rule: str, action: str) -> Path:
    """A copy of the policy data `data` whose rules.yaml has `rule` (text ending in
    `action: ...`) given `action` instead."""
    shutil.copytree(data, into)
    rules = into / "rules.yaml"
    text = rules.read_text()
    assert rule in text, rule
    rules.write_text(text.replace(rule, rule.rsplit(": ", 1)[0] + f": {action}", 1))
    return into


def counter(text: str, name: str) -> float:
    match = re.search(rf'^{re.escape(name)}{{bundle="{BUNDLE}"}} (\S+)$', text, re.MULTILINE)
    assert match is not None, f"no {name} in /metrics"
    return float(match.group(1))


def supervised_opa(serve: Serve) -> str:
    """The URL of the `opa run` the service started (the REST engine), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    todo = [serve.proc.pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--addr" in argv and argv[0].endswith(b"opa"):
            return "http://" + argv[argv.index(b"--addr") + 1].decode()
    raise AssertionError("no opa process under the service")


def opa_modules(url: str) -> dict[str, str]:
    policies = httpx.get(f"{url}/v1/policies", timeout=10).json()["result"]
    return {p["id"]: p["raw"] for p in policies}


# ---------------------------------------------------------------- 1. a hostile bundle server


@pytest.mark.parametrize("engine", ["inprocess", "opa"])
def test_hostile_bundle_answers_never_replace_the_running_revision(
    tmp_path: Path, engine: str
) -> None:
    rego, data = policy_dirs(tmp_path)
    r1 = opa_build([rego, data], tmp_path / "r1.tar.gz", "r1")
    files = members(r1)
    server = FleetServer()
    server.publish(r1)
    # Unsigned bundles: the hostile content itself reaches the reader and the engine.
    config = opa_config(tmp_path, server, decision_logs=False)

    def limits(doc: dict[str, Any]) -> None:
        doc["bundles"][BUNDLE]["size_limit_bytes"] = 1_000_000
        doc["services"]["fleet"]["response_header_timeout_seconds"] = 2

    tune(config, limits)
    serve = Serve(tmp_path, [], {"MCP_POLICY_ENGINE": engine}, "--opa-config", str(config))
    try:
        until_active(serve, "r1")
        serving(serve, "r1", 0)
        opa_url = supervised_opa(serve) if engine == "opa" else None
        modules_r1 = opa_modules(opa_url) if opa_url else {}
        strict, allow_all = with_manifest(files, "x"), permissive(with_manifest(files, "x"))
        without_data = {k: v for k, v in allow_all.items() if k != "/data.json"}
        only_manifest = {"/.manifest": allow_all["/.manifest"]}
        cases: list[tuple[str, bytes | None, str, str]] = [
            ("garbage", b"\x1f\x8bnot a bundle" * 100, "gzip", "refused"),
            ("truncated", r1.read_bytes()[: len(r1.read_bytes()) // 2], "EOF", "refused"),
            (
                "path traversal",
                tar_gz({**strict, "../../../x.rego": EVIL_MODULE}),
                "not a plain path inside the bundle",
                "refused",
            ),
            (
                "tar bomb",
                tar_gz({**strict, "/data.json": b'{"pad": "' + b"0" * 20_000_000 + b'"}'}),
                "exceeds configured size_limit_bytes",
                "refused",
            ),
            (
                "Rego that does not compile",
                tar_gz(
                    {**allow_all, "/mcp/rules/evil/evil.rego": EVIL_MODULE + b"\nx := nosuch(1)\n"}
                ),
                "undefined function",
                "refused",
            ),
            (
                "data not an object",
                tar_gz({**without_data, "/data.json": b'["mcp_policy"]'}),
                "root value must be object",
                "refused",
            ),
            (
                "delta bundle",
                tar_gz(
                    {
                        **only_manifest,
                        "/patch.json": json.dumps(
                            {
                                "data": [
                                    {
                                        "op": "upsert",
                                        "path": "/mcp_policy/default",
                                        "value": {"action": "allow"},
                                    }
                                ]
                            }
                        ).encode(),
                    }
                ),
                "delta bundles are not supported",
                "refused",
            ),
            (
                "data without the framework",
                tar_gz({**only_manifest, "/data.json": allow_all["/data.json"]}),
                "data.mcp.decision is undefined",
                "refused",
            ),
            (
                "a decision that is not one",
                tar_gz(
                    {
                        **only_manifest,
                        "/data.json": allow_all["/data.json"],
                        "/mcp/decision.rego": b'package mcp\n\ndecision := "allow"\n',
                    }
                ),
                "data.mcp.decision is malformed",
                "refused",
            ),
            (
                "the running revision's name on other contents",
                tar_gz(permissive(with_manifest(files, "r1"))),
                "r1 is active with other contents",
                "refused",
            ),
            ("HTTP 500", None, "Internal Server Error", "download_errors"),
            ("a server that hangs", None, "timeout", "download_errors"),
        ]
        for n, (name, body, reason, count) in enumerate(cases, start=1):
            before = bundle_state(serve)[count]
            if body is not None:
                server.serve_bytes(body)
            elif name == "HTTP 500":
                server.bundle_status = 500
            else:
                server.hang_bundles.set()
                server.serve_bytes(tar_gz(allow_all))
                # The download hangs: decisions go on with the running revision meanwhile.
                for k in range(5):
                    serving(serve, "r1", 1000 + 10 * n + k)
            wait_until(
                lambda reason=reason: reason in (bundle_state(serve)["last_error"] or ""),
                what=f"{name}: {reason!r} in /readyz ({bundle_state(serve)['last_error']})",
            )
            state = bundle_state(serve)
            assert state[count] > before, (name, state)
            assert state["active_revision"] == "r1", (name, state)
            serving(serve, "r1", 100 + n)
            if opa_url is not None:
                # Nothing was pushed into the REST engine's OPA, under our ids or others.
                assert opa_modules(opa_url) == modules_r1, name
            server.bundle_status = 200
            server.hang_bundles.clear()
        text = metrics(serve)
        state = bundle_state(serve)
        assert counter(text, "mcp_policy_bundle_refused_total") == state["refused"]
        assert counter(text, "mcp_policy_bundle_download_errors_total") == state["download_errors"]
        assert f'mcp_policy_bundle_active{{bundle="{BUNDLE}",revision="r1"}} 1.0' in text

        # A good bundle is still taken after all that.
        server.publish(opa_build([rego, data], tmp_path / "r2.tar.gz", "r2"))
        until_active(serve, "r2")
        serving(serve, "r2", 200)

        # A server whose ETag never changes and which answers 200 whatever If-None-Match
        # says: each new content is taken, each poll of the same content changes nothing.
        server.serve_bytes(tar_gz(with_manifest(files, "r3")), etag="always-the-same")
        until_active(serve, "r3")
        server.serve_bytes(tar_gz(permissive(with_manifest(files, "r4"))), etag="always-the-same")
        until_active(serve, "r4")
        requests = server.received.bundle_requests
        wait_until(lambda: server.received.bundle_requests >= requests + 3, what="3 more polls")
        assert bundle_state(serve)["active_revision"] == "r4"
        # r4 is the permissive policy now running: the unknown tool is allowed, under r4.
        decision = serve.decide(denied_call(300))
        assert (decision["verdict"], decision["policy_revision"]) == ("allow", "r4"), decision
    finally:
        server.hang_bundles.clear()
        status = serve.stop()
        server.stop()
    assert status == 0
    log = "".join(serve.lines)
    assert "Traceback" not in log
    for name, _, reason, _ in cases:
        assert reason in log, f"{name}: {reason!r} not in the service's log"
    assert log.count("revision r4 activated") == 1
    assert "evil.everything" not in log


# ---------------------------------------------------------------- 2. a hostile collector


def upload_metrics(serve: Serve) -> dict[str, float]:
    text = metrics(serve)
    out = {}
    for name, pattern in (
        ("sent", r'^mcp_policy_decision_upload_events_total\{result="sent"\} (\S+)$'),
        ("dropped", r'^mcp_policy_decision_upload_events_total\{result="dropped"\} (\S+)$'),
        ("queued", r"^mcp_policy_decision_upload_queued (\S+)$"),
        ("failing", r"^mcp_policy_decision_upload_failing (\S+)$"),
        ("failures", r"^mcp_policy_decision_upload_failures_total (\S+)$"),
    ):
        match = re.search(pattern, text, re.MULTILINE)
        assert match is not None, f"no {name} in /metrics"
        out[name] = float(match.group(1))
    return out


def decide_quickly(serve: Serve, body: dict[str, Any]) -> dict[str, Any]:
    """A decision that must be answered within 5 s (the collector's outage is longer)."""
    response = httpx.post(f"{serve.url}/v1/decide", json=body, timeout=5)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_a_collector_that_fails_or_hangs_never_holds_decisions_and_loses_nothing(
    tmp_path: Path,
) -> None:
    rego, data = policy_dirs(tmp_path)
    server = FleetServer()
    config = opa_config(tmp_path, server, bundles=False, upload_delay=(1, 1))
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(config))
    answered: list[str] = []
    try:
        for n, status in enumerate((500, 413)):
            server.collector_status = status
            posts = server.received.refused_posts
            answered += [decide_quickly(serve, call(100 * n + i))["decision_id"] for i in range(20)]
            server.wait(lambda r, posts=posts: r.refused_posts > posts)
            wait_until(lambda: upload_metrics(serve)["failing"] == 1.0, what=f"failing on {status}")
            _, body = readyz(serve)
            assert f"HTTP {status}" in body["decision_upload"]["last_error"], body
        # A collector that takes the upload and never answers: decisions are answered
        # while an upload is held.
        server.collector_status = 200
        server.hang_collector.set()
        started = server.received.uploads_started
        server.wait(lambda r: r.uploads_started > started)
        answered += [decide_quickly(serve, call(300 + i))["decision_id"] for i in range(20)]
        assert readyz(serve)[0] == 200  # a collector's outage is not the service's
        wait_until(lambda: upload_metrics(serve)["queued"] == 60.0, what="60 queued")
        assert server.received.events == []
        assert upload_metrics(serve)["sent"] == 0.0
        server.hang_collector.clear()
        server.wait(lambda r: set(answered) <= set(r.ids()), timeout=60)
        wait_until(lambda: upload_metrics(serve)["queued"] == 0.0, what="nothing queued")
        counts = upload_metrics(serve)
        assert (counts["sent"], counts["dropped"], counts["failing"]) == (60.0, 0.0, 0.0)
        assert counts["failures"] >= 3
    finally:
        server.hang_collector.clear()
        status = serve.stop()
        server.stop()
    assert status == 0
    ids = server.received.ids()
    assert all(ids[d] == 1 for d in answered), "a decision arrived twice"
    assert len(server.received.events) == 60


def test_a_collector_slow_to_acknowledge_gets_duplicates_of_identical_events_only(
    tmp_path: Path,
) -> None:
    """A collector slower than the client's response-header timeout (OPA's default is
    10 s; 2 s here to keep the test short) takes an upload the client has given up on:
    the client sends it again. What arrives twice is the same event (same decision_id,
    same bytes), so a collector idempotent by decision_id sees each decision once; the
    service counts each decision sent once."""
    rego, data = policy_dirs(tmp_path)
    server = FleetServer()
    config = opa_config(tmp_path, server, bundles=False, upload_delay=(1, 1))
    tune(config, lambda doc: doc["services"]["fleet"].update(response_header_timeout_seconds=2))
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(config))
    try:
        # Slow, but within the timeout: each decision arrives once.
        server.collector_delay = 1.0
        first = [decide_quickly(serve, call(i))["decision_id"] for i in range(10)]
        server.wait(lambda r: set(first) <= set(r.ids()))
        assert all(server.received.ids()[d] == 1 for d in first)
        # Slower than the timeout: taken, yet not acknowledged in time.
        server.collector_delay = 4.0
        second = [decide_quickly(serve, call(100 + i))["decision_id"] for i in range(10)]
        server.wait(lambda r: set(second) <= set(r.ids()))
        wait_until(lambda: upload_metrics(serve)["failing"] == 1.0, what="failing")
        server.collector_delay = 0.0
        wait_until(lambda: upload_metrics(serve)["queued"] == 0.0, what="acknowledged")
        counts = upload_metrics(serve)
        assert (counts["sent"], counts["dropped"], counts["failing"]) == (20.0, 0.0, 0.0)
    finally:
        server.collector_delay = 0.0
        status = serve.stop()
        server.stop()
    assert status == 0
    ids = server.received.ids()
    assert all(ids[d] == 1 for d in first)
    assert all(ids[d] >= 2 for d in second), "the late acknowledgement led to no resend"
    by_id: dict[str, set[str]] = {}
    for event in server.received.events:
        by_id.setdefault(event["decision_id"], set()).add(json.dumps(event, sort_keys=True))
    assert all(len(versions) == 1 for versions in by_id.values()), "a resend differed"
    assert set(by_id) == set(first + second)


# ---------------------------------------------------------------- 3. the spool's cap

SPOOL_CAP = 65536


def test_past_the_spool_cap_the_oldest_decisions_go_counted_and_the_rest_arrive_once(
    tmp_path: Path,
) -> None:
    rego, data = policy_dirs(tmp_path)
    server = FleetServer()
    config = opa_config(tmp_path, server, bundles=False, upload_delay=(1, 1))
    tune(
        config,
        lambda doc: doc["decision_logs"]["reporting"].update(buffer_size_limit_bytes=SPOOL_CAP),
    )
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(config))
    total = 300
    try:
        server.stop()
        answered = [decide_quickly(serve, call(i))["decision_id"] for i in range(total)]
        wait_until(
            lambda: (c := upload_metrics(serve))["queued"] + c["dropped"] == total,
            what="every decision spooled or dropped",
        )
        counts = upload_metrics(serve)
        assert counts["dropped"] > 0 and counts["sent"] == 0.0, counts
        _, body = readyz(serve)
        uploads = body["decision_upload"]
        assert uploads["spool_bytes"] <= SPOOL_CAP and uploads["spool_cap_bytes"] == SPOOL_CAP
        assert uploads["dropped"] == counts["dropped"]
        server.start()
        wait_until(lambda: upload_metrics(serve)["queued"] == 0.0, timeout=60, what="drained")
        counts = upload_metrics(serve)
    finally:
        status = serve.stop()
        server.stop()
    assert status == 0
    assert counts["sent"] + counts["dropped"] == total, counts
    ids = server.received.ids()
    assert all(n == 1 for n in ids.values()), "a decision arrived twice"
    # The ones that arrived are the newest, every one of them: the dropped are the oldest.
    kept = total - int(counts["dropped"])
    assert set(ids) == set(answered[-kept:]), (len(ids), kept)
    log = "".join(serve.lines)
    assert f"past its cap of {SPOOL_CAP} bytes" in log and "oldest decisions" in log


def test_the_cap_dropping_an_upload_in_flight_counts_each_decision_once(tmp_path: Path) -> None:
    """The spool is near its cap when the collector comes back, slowly; while the first
    upload (everything spooled) is in flight, more decisions push the cap to drop the
    oldest segments, the very ones being sent. The collector acknowledges them: each
    decision is counted once, as sent, and nothing is left queued (it was counted dropped
    and sent, and queued went below zero)."""
    rego, data = policy_dirs(tmp_path)
    server = FleetServer()
    config = opa_config(tmp_path, server, bundles=False, upload_delay=(1, 1))
    tune(
        config,
        lambda doc: doc["decision_logs"]["reporting"].update(buffer_size_limit_bytes=SPOOL_CAP),
    )
    serve = Serve(tmp_path, [rego, data], {}, "--opa-config", str(config))
    answered: list[str] = []
    try:
        server.stop()
        while readyz(serve)[1]["decision_upload"]["spool_bytes"] < SPOOL_CAP * 0.75:
            answered.append(decide_quickly(serve, call(len(answered)))["decision_id"])
            wait_until(lambda: upload_metrics(serve)["queued"] == len(answered), what="spooled")
        # Slow, but within the client's timeout: acknowledged, once.
        server.collector_delay = 6.0
        server.start()
        server.wait(lambda r: r.uploads_started > 0)
        answered += [decide_quickly(serve, call(1000 + i))["decision_id"] for i in range(20)]
        server.wait(lambda r: r.posts > 0, timeout=60)
        server.collector_delay = 0.0
        wait_until(
            lambda: (c := upload_metrics(serve))["sent"] + c["dropped"] >= len(answered),
            timeout=60,
            what="every decision sent or dropped",
        )
        counts = upload_metrics(serve)
    finally:
        server.collector_delay = 0.0
        status = serve.stop()
        server.stop()
    assert status == 0
    ids = server.received.ids()
    assert all(n == 1 for n in ids.values()), "a decision arrived twice"
    assert set(ids) <= set(answered)
    assert counts["sent"] == len(ids), (counts, len(ids))
    assert counts["sent"] + counts["dropped"] == len(answered), counts
    assert counts["queued"] == 0.0, counts


# ---------------------------------------------------------------- 4. the REST engine


def test_the_rest_engine_pulls_verifies_validates_and_pushes_bundles_into_its_opa(
    tmp_path: Path,
) -> None:
    rego, data = policy_dirs(tmp_path)
    keys = make_keys(tmp_path)
    server = FleetServer()
    server.publish(opa_build([rego, data], tmp_path / "r1.tar.gz", "r1", signing_key=keys.private))
    config = opa_config(tmp_path, server, keys=keys)
    serve = Serve(tmp_path, [], {"MCP_POLICY_ENGINE": "opa"}, "--opa-config", str(config))
    try:
        until_active(serve, "r1")
        serving(serve, "r1", 0)
        opa_url = supervised_opa(serve)
        held = opa_modules(opa_url)
        assert held and all(m.startswith(f"mcp-policy/bundles/{BUNDLE}/") for m in held), held

        # A permissive r2, signed: tampered after signing, then with data the schema
        # refuses, then as it was signed.
        allow_all = edited(data, tmp_path / "allow-all", "default:\n    action: deny", "allow")
        r2 = opa_build([rego, allow_all], tmp_path / "r2.tar.gz", "r2", signing_key=keys.private)
        broken = edited(allow_all, tmp_path / "broken", "\n      action: rate_limit", "maybe")
        invalid = opa_build([rego, broken], tmp_path / "r3.tar.gz", "r3", signing_key=keys.private)
        for n, (bundle, reason) in enumerate(
            [(tamper(r2, tmp_path / "tampered.tar.gz"), "digest"), (invalid, "maybe")], start=1
        ):
            server.publish(bundle)
            wait_until(
                lambda reason=reason: reason in (bundle_state(serve)["last_error"] or ""),
                what=f"{bundle.name} refused ({reason})",
            )
            serving(serve, "r1", n)
            assert opa_modules(opa_url) == held, bundle.name

        server.publish(r2)
        until_active(serve, "r2")
        # The decision comes from the OPA process, with r2's data in it.
        decision = serve.decide(denied_call(10))
        assert (decision["verdict"], decision["policy_revision"]) == ("allow", "r2"), decision
        default = httpx.get(f"{opa_url}/v1/data/mcp_policy/default", timeout=10).json()
        assert default["result"] == {"action": "allow"}
        assert set(opa_modules(opa_url)) == set(held)
        server.wait(lambda r: decision["decision_id"] in r.ids())
        events = {e["decision_id"]: e for e in server.received.events}
        assert events[decision["decision_id"]]["bundles"] == {BUNDLE: {"revision": "r2"}}
    finally:
        status = serve.stop()
        server.stop()
    assert status == 0 and "Traceback" not in "".join(serve.lines)


# ---------------------------------------------------------------- 5. a token from the environment


def bearer_config(tmp_path: Path, server: FleetServer, token_ref: str) -> Path:
    """opa_config with the service's bearer token written as `token_ref` (`${VAR}`)."""
    tmp_path.mkdir(exist_ok=True)
    config = opa_config(tmp_path, server)
    text = config.read_text()
    text = text.replace(
        f"url: {server.url}\n",
        f"url: {server.url}\n    credentials:\n      bearer:\n        token: {token_ref}\n",
    )
    config.write_text(text)
    assert f"token: {token_ref}\n" in config.read_text()
    return config


def test_a_bearer_token_from_the_environment_works_fails_visibly_and_is_never_shown(
    tmp_path: Path,
) -> None:
    rego, data = policy_dirs(tmp_path)
    token = "tok-" + secrets.token_urlsafe(24)
    server = FleetServer(bearer=token)
    server.publish(opa_build([rego, data], tmp_path / "r1.tar.gz", "r1"))
    config = bearer_config(tmp_path, server, "${FLEET_TOKEN}")
    shown: list[str] = []
    good = Serve(tmp_path / "good", [], {"FLEET_TOKEN": token}, "--opa-config", str(config))
    try:
        # The right token: bundles and uploads go through.
        until_active(good, "r1")
        decision_id = good.decide(call(1))["decision_id"]
        server.wait(lambda r: decision_id in r.ids())
        assert server.received.unauthorized == 0
        # The server now wants another token: download errors, named, r1 keeps serving.
        server.bearer = "tok-" + secrets.token_urlsafe(24)
        server.publish(opa_build([rego, data], tmp_path / "r2.tar.gz", "r2"))
        wait_until(
            lambda: "Unauthorized" in (bundle_state(good)["last_error"] or ""),
            what="the refused token in /readyz",
        )
        serving(good, "r1", 2)
        shown += [readyz(good)[1].__repr__(), metrics(good)]
    finally:
        good.stop()
    shown += good.lines

    # Started with a wrong token, and with an empty one: never ready, every call denied,
    # the reason in /readyz; no crash.
    quoted = bearer_config(tmp_path / "quoted", server, '"${FLEET_TOKEN}"')
    for n, env in enumerate(({"FLEET_TOKEN": "not-the-token"}, {})):
        serve = Serve(tmp_path / f"bad-{n}", [], env, "--opa-config", str(quoted))
        try:
            wait_until(
                lambda serve=serve: "Unauthorized" in (bundle_state(serve)["last_error"] or ""),
                what="the download error in /readyz",
            )
            status, body = readyz(serve)
            assert status == 503 and body["policy_revision"] == "none", body
            decision = serve.decide(call(10 + n))
            assert (decision["verdict"], decision["rule"]) == ("deny", "engine.unavailable")
            assert bundle_state(serve)["download_errors"] >= 1
            shown += [repr(body), metrics(serve)]
        finally:
            assert serve.stop() == 0
        shown += serve.lines
    server.stop()
    everything = "".join(shown)
    assert token not in everything and server.bearer not in everything
    assert "Traceback" not in everything


@pytest.mark.parametrize(
    ("token", "said"),
    [
        # YAML: mapping values are not allowed here
        ("tok: with a colon", "not YAML or JSON: line 18, column"),
        # YAML: an undefined alias, which YAML's message names
        ("*tok-alias-like-value", "not YAML or JSON: line 18, column"),
        # an integer once parsed, not the string the schema wants
        ("12345678901234567890", "${FLEET_TOKEN} is not of type 'string'"),
        # unset: an empty value, null once parsed
        (None, "${FLEET_TOKEN}: not set in the environment, or empty"),
    ],
)
def test_a_token_that_breaks_the_configuration_is_refused_without_showing_it(
    tmp_path: Path, token: str | None, said: str
) -> None:
    server = FleetServer()
    config = bearer_config(tmp_path, server, "${FLEET_TOKEN}")
    env = {k: v for k, v in os.environ.items() if k != "FLEET_TOKEN"}
    if token is not None:
        env["FLEET_TOKEN"] = token
    done = subprocess.run(
        [*CLI, "serve", "--http-port", "0", "--grpc-port", "0", "--state-dir", str(tmp_path)]
        + ["--opa-config", str(config), "--log-level", "DEBUG"],  # DEBUG: the traceback too
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    server.stop()
    assert done.returncode != 0
    assert str(config) in done.stderr and said in done.stderr, done.stderr
    if token is not None:
        secret = token.lstrip("*")
        assert secret not in done.stderr and secret[:8] not in done.stderr, done.stderr
