"""`mcp-policy doctor` as a user runs it: what it reports, and its exit status, in a good
setup and in broken ones (each broken one names what is wrong, on its own line)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.policy.inprocess import CHECKOUT_LIBRARY
from engine.policy.opa_process import CHECKOUT_OPA, OPA_VERSION, free_loopback_port
from engine.policy.source import read_bundle
from engine.settings import PROJECT_ROOT
from tests.conftest import copy_policy
from tests.processes import CLI

SHIPPED = read_bundle([PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"])
SHIPPED_REVISION = SHIPPED.revision


def doctor(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    base["MCP_POLICY_STATE_DIR"] = str(tmp / "state")
    return subprocess.run(
        [*CLI, "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **env},
    )


def line(result: subprocess.CompletedProcess[str], check: str) -> str:
    """The one line of the report about `check` (the first, when there are several)."""
    for text in result.stdout.splitlines():
        if text[6:].split("  ")[0] == check:
            return text
    raise AssertionError(f"no {check!r} line in:\n{result.stdout}{result.stderr}")


FREE_PORTS = ("--http-port", "0", "--grpc-port", "0")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_good_setup_is_all_ok_and_exits_0(tmp_path: Path) -> None:
    result = doctor(tmp_path, *FREE_PORTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # the report is all there is
    assert "mcp-policy-engine 0.1.0, run from the checkout" in line(result, "package")
    assert line(result, "engine").startswith("OK    engine       inprocess")
    assert line(result, "library") == f"OK    library      {CHECKOUT_LIBRARY} (OPA {OPA_VERSION})"
    assert line(result, "opa") == f"OK    opa          {CHECKOUT_OPA} (OPA {OPA_VERSION})"
    assert f"OK    policy path  {PROJECT_ROOT / 'rego'}" in result.stdout.splitlines()
    assert f"OK    policy path  {PROJECT_ROOT / 'policies'}" in result.stdout.splitlines()
    assert line(result, "policy").startswith(
        f"OK    policy       {SHIPPED_REVISION} ({len(SHIPPED.modules)} Rego"
    )
    assert line(result, "store") == f"OK    store        sqlite in {tmp_path / 'state'}: writable"
    assert line(result, "http") == "OK    http         127.0.0.1:(any free port), TLS off: free"
    assert result.stdout.splitlines()[-1].endswith("everything the service needs is usable")
    assert not (tmp_path / "state").exists()  # it changes nothing


def test_json_says_the_same_for_machines(tmp_path: Path) -> None:
    result = doctor(tmp_path, *FREE_PORTS, "--json", MCP_POLICY_ENGINE="opa")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    by_check: dict[str, Any] = {}
    for finding in report["findings"]:
        by_check.setdefault(finding["check"], finding)
    assert by_check["engine"]["facts"]["engine"] == "opa"
    assert "library" not in by_check  # not used by this engine
    assert by_check["opa"]["facts"] == {"path": str(CHECKOUT_OPA), "opa_version": OPA_VERSION}
    assert by_check["policy"]["facts"]["revision"] == SHIPPED_REVISION
    assert "an opa process" in by_check["policy"]["detail"]
    assert by_check["grpc"]["facts"] == {
        "host": "127.0.0.1",
        "port": 0,
        "tls": "off",
        "free": True,
    }


def test_a_missing_policy_directory_fails(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = doctor(tmp_path, *FREE_PORTS, "--policy", str(missing))
    assert result.returncode == 1
    assert line(result, "policy path") == f"FAIL  policy path  {missing}: no such directory"
    assert line(result, "policy").startswith("FAIL  policy")
    assert line(result, "store").startswith("OK")  # the rest is still looked at
    assert result.stdout.splitlines()[-1] == "mcp-policy doctor: not usable as is"


@pytest.mark.parametrize("listener", ["http", "grpc"])
def test_a_port_in_use_fails(tmp_path: Path, taken_port: int, listener: str) -> None:
    other = "grpc" if listener == "http" else "http"
    result = doctor(tmp_path, f"--{listener}-port", str(taken_port), f"--{other}-port", "0")
    assert result.returncode == 1
    assert line(result, listener) == (
        f"FAIL  {listener:<11}  127.0.0.1:{taken_port}, TLS off: in use (another process "
        "listens there: a service already running?)"
    )
    assert line(result, other).startswith("OK")


def test_a_missing_library_fails_saying_how_to_build_it(tmp_path: Path) -> None:
    result = doctor(tmp_path, *FREE_PORTS, MCP_POLICY_OPA_LIBRARY=str(tmp_path / "no.so"))
    assert result.returncode == 1
    library = line(result, "library")
    assert library.startswith(f"FAIL  library      MCP_POLICY_OPA_LIBRARY={tmp_path / 'no.so'}")
    assert "make tools" in library
    # The policy is still read and checked, but nothing can compile it.
    assert line(result, "policy").startswith(f"WARN  policy       {SHIPPED_REVISION}")
    assert "not compiled" in line(result, "policy")


def test_a_missing_opa_fails_only_for_the_opa_engine(tmp_path: Path) -> None:
    gone = str(tmp_path / "no-opa")
    inprocess = doctor(tmp_path, *FREE_PORTS, MCP_POLICY_OPA_BINARY=gone)
    assert inprocess.returncode == 0, inprocess.stdout
    assert line(inprocess, "opa").startswith(f"WARN  opa          OPA not found ('{gone}'")
    server = doctor(tmp_path, *FREE_PORTS, MCP_POLICY_OPA_BINARY=gone, MCP_POLICY_ENGINE="opa")
    assert server.returncode == 1
    assert line(server, "opa").startswith("FAIL  opa")
    assert f"go install github.com/open-policy-agent/opa@v{OPA_VERSION}" in line(server, "opa")


def test_a_policy_the_schema_refuses_fails_with_its_place(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    rules = yaml.safe_load((data / "rules.yaml").read_text())
    rules["mcp_policy"]["rules"]["copy_image_set"]["action"] = "maybe"
    (data / "rules.yaml").write_text(yaml.safe_dump(rules))
    result = doctor(tmp_path, *FREE_PORTS, "--policy", str(rego), "--policy", str(data))
    assert result.returncode == 1
    policy = line(result, "policy")
    assert policy.startswith(f"FAIL  policy       {data / 'rules.yaml'}:")
    assert "data.mcp_policy.rules.copy_image_set.action" in policy and "maybe" in policy


def test_a_rego_error_fails_with_opas_message(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    (rego / "mcp" / "decision.rego").write_text("package mcp\n\ndecision := {\n")
    result = doctor(tmp_path, *FREE_PORTS, "--policy", str(rego), "--policy", str(data))
    assert result.returncode == 1
    assert line(result, "policy").startswith(
        f"FAIL  policy       {rego / 'mcp' / 'decision.rego'}:"
    )


def test_a_store_that_does_not_answer_fails(tmp_path: Path) -> None:
    closed = free_loopback_port()
    redis = doctor(
        tmp_path, *FREE_PORTS, MCP_POLICY_REDIS_URL=f"redis://u:secret@127.0.0.1:{closed}/0"
    )
    assert redis.returncode == 1
    store = line(redis, "store")
    assert store.startswith(f"FAIL  store        redis at redis://127.0.0.1:{closed}/0: ")
    assert "does not answer PING" in store and "secret" not in redis.stdout
    (tmp_path / "file").write_text("")
    sqlite = doctor(tmp_path, *FREE_PORTS, MCP_POLICY_STATE_DIR=str(tmp_path / "file"))
    assert sqlite.returncode == 1
    assert (
        line(sqlite, "store")
        == f"FAIL  store        sqlite in {tmp_path / 'file'}: not a directory"
    )


def test_an_exposed_host_without_tls_fails(tmp_path: Path) -> None:
    result = doctor(tmp_path, *FREE_PORTS, "--host", "0.0.0.0")
    assert result.returncode == 1
    assert line(result, "exposure").startswith("FAIL  exposure     refusing to serve on 0.0.0.0")
    allowed = doctor(tmp_path, *FREE_PORTS, "--host", "0.0.0.0", "--insecure")
    assert allowed.returncode == 0, allowed.stdout


def test_the_opa_configuration_and_a_bundle_file_are_checked(tmp_path: Path) -> None:
    from tests.fleet_world import make_keys, opa_build, tamper

    # A key OPA knows that the engine does not run: named, the check fails.
    config = tmp_path / "opa.yaml"
    config.write_text("services: {s: {url: 'http://127.0.0.1:9'}}\ndiscovery: {service: s}\n")
    result = doctor(tmp_path, *FREE_PORTS, "--opa-config", str(config))
    assert result.returncode == 1
    assert "discovery: not a key this engine runs" in line(result, "opa config")
    # Bundles from a server: the policy is checked as it arrives, not here.
    config.write_text(
        "services: {s: {url: 'http://127.0.0.1:9'}}\nbundles: {authz: {service: s}}\n"
    )
    result = doctor(tmp_path, *FREE_PORTS, "--opa-config", str(config))
    assert "1 bundles" in line(result, "opa config") and line(result, "opa config")[:4] == "OK  "
    assert "pulled from the bundle server" in line(result, "policy")
    # A signed bundle file: verified and compiled; tampered: refused, naming why.
    keys = make_keys(tmp_path)
    rego, data = copy_policy(tmp_path)
    bundle = opa_build([rego, data], tmp_path / "b.tar.gz", "b1", signing_key=keys.private)
    key = {"MCP_POLICY_BUNDLE_VERIFICATION_KEY": str(keys.public)}
    result = doctor(tmp_path, *FREE_PORTS, "--bundle", str(bundle), **key)
    assert result.returncode == 0, result.stdout
    assert "b1" in line(result, "policy") and "verified" in line(result, "policy")
    tampered = tamper(bundle, tmp_path / "t.tar.gz")
    result = doctor(tmp_path, *FREE_PORTS, "--bundle", str(tampered), **key)
    assert result.returncode == 1
    assert "digest mismatch" in line(result, "policy")
