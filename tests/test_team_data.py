"""The framework's own Rego tests hold whatever data a team loads beside them: the shipped
tests that check the shipped policy end to end take the shipped data as a value
(rego/mcp/shipped/shipped_test.rego, `with data.mcp_policy as …`), never the data that
happens to be loaded. Run as a team runs them — `opa test rego/ policies/ <its directory>`
with more catalog entries and rules, or `opa test rego/ <its directory>` with a policy of
its own in place of policies/ — they all pass, and the team's own tests run beside them.

The value is what policies/*.yaml loads (checked here), so the shipped data stays tested."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from engine.policy.source import read_bundle
from engine.settings import PROJECT_ROOT

REGO = PROJECT_ROOT / "rego"
POLICIES = PROJECT_ROOT / "policies"

# Every tool and server name the shipped tests call, so the team's data touches all of them.
TOOLS = [
    *("copy_image_set", "delete_datastore", "list_datastores", "search_image_sets"),
    "get_image_set_metadata",
    *("update_image_set_metadata", "unlisted", "read_thing", "write_thing", "odd_thing"),
    *("drop_thing", "admin_thing", "pay", "t", "t2", "other", "Other", "s", "get", "drop"),
    *("odd", "nope", "y", "Copy_Image_Set", "COPY_IMAGE_SET", "whoami"),
]
SERVERS = ["srv", "srv-a", "srv-b", "srv-z", "x", "awslabs.s3-mcp-server"]
CRITICAL = {"category": "admin", "risk": "critical"}

TEAM_PACKAGE = """\
package mcp.rules.team

deny contains {"rule": "team.no_mail", "reason": "no mail"} if input.tool.name == "send_mail"
"""
TEAM_TEST = """\
package mcp.rules.team_test

import data.mcp.rules.team

test_team_denies_mail if {
	{d.rule | some d in team.deny} == {"team.no_mail"} with input as {"tool": {"name": "send_mail"}}
}
"""


def opa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["opa", *args], capture_output=True, text=True, timeout=300, check=False, cwd=PROJECT_ROOT
    )


def opa_test(*paths: Path) -> list[dict[str, Any]]:
    """Every test `opa test` ran over `paths`; fails the test when any of them failed."""
    done = opa("test", "--format", "json", *map(str, paths))
    results: list[dict[str, Any]] = json.loads(done.stdout)
    failed = [f"{r['package']}.{r['name']}" for r in results if r.get("fail") or r.get("error")]
    assert failed == [], done.stdout[-4000:] + done.stderr
    assert done.returncode == 0, done.stderr
    return results


def team_directories(root: Path, policy: dict[str, Any]) -> list[Path]:
    """A team's rego/ (a rule package with its test) and policies/ (its data), as its
    repository has them: two directories to load."""
    package = root / "rego" / "mcp" / "rules" / "team"
    package.mkdir(parents=True)
    (package / "team.rego").write_text(TEAM_PACKAGE)
    (package / "team_test.rego").write_text(TEAM_TEST)
    (root / "policies").mkdir()
    (root / "policies" / "team.yaml").write_text(yaml.safe_dump({"mcp_policy": policy}))
    return [root / "rego", root / "policies"]


def more_data(root: Path) -> list[Path]:
    """Catalog entries and rules beside the shipped ones (none clashes with them): every
    name the shipped tests use, on any server and on theirs, critical, denied."""
    catalog: dict[str, Any] = {"*": dict.fromkeys(TOOLS, CRITICAL)}
    catalog.update({server: dict.fromkeys(TOOLS, CRITICAL) for server in SERVERS})
    # Not the tools the shipped catalog has on these servers: the same tool on the same
    # server in two files is an error.
    shipped = {"copy_image_set", "get_image_set_metadata", "search_image_sets"}
    catalog["awslabs.healthimaging-mcp-server"] = {
        name: CRITICAL for name in TOOLS if name not in shipped
    }
    catalog["awslabs.valkey-mcp-server"] = dict.fromkeys(TOOLS[1:], CRITICAL)
    rules = {name: {"action": "deny", "reason": "the team says no"} for name in TOOLS[1:]}
    return team_directories(root, {"catalog": catalog, "rules": rules})


def own_policy(root: Path) -> list[Path]:
    """A whole policy of the team's own, loaded in place of policies/: the opposite of the
    shipped one wherever it can be."""
    catalog = {"*": {name: {"category": "read", "risk": "low"} for name in TOOLS}}
    policy = {
        "catalog": catalog,
        "rules": dict.fromkeys(TOOLS, "allow"),
        "risk_defaults": {"low": "deny", "medium": "allow", "high": "allow", "critical": "allow"},
        "default": "allow",
    }
    return team_directories(root, policy)


def test_the_shipped_tests_data_is_what_policies_loads() -> None:
    done = opa(
        "eval",
        "--format",
        "json",
        "-d",
        str(REGO / "mcp" / "shipped" / "shipped_test.rego"),
        "data.mcp.shipped_test.policy",
    )
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)["result"][0]["expressions"][0]["value"]
    shipped = read_bundle([POLICIES]).data["mcp_policy"]
    assert value == shipped, (
        "rego/mcp/shipped/shipped_test.rego must hold what policies/*.yaml loads: "
        "change it with policies/"
    )


def test_the_shipped_tests_pass_beside_a_teams_data(tmp_path: Path) -> None:
    alone = {(r["package"], r["name"]) for r in opa_test(REGO, POLICIES)}
    team = more_data(tmp_path / "team")

    # The team's data is loaded where the policy reads it, and changes what the shipped
    # tests' calls get (without the fixture they would see it): copy_image_set on a server
    # outside the shipped catalog is now a critical tool.
    call = {
        "tool": {"server": "awslabs.s3-mcp-server", "name": "copy_image_set", "arguments": {}},
        "principal": {"session_id": "s-1"},
    }
    input_file = tmp_path / "input.json"
    input_file.write_text(json.dumps(call))
    for paths, tool in (
        ([REGO, POLICIES], {"known": False}),
        ([REGO, POLICIES, *team], {"known": True, **CRITICAL}),
    ):
        data = [arg for path in paths for arg in ("-d", str(path))]
        done = opa(
            "eval", "--format", "json", *data, "-i", str(input_file), "data.mcp.decision.tool"
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["result"][0]["expressions"][0]["value"] == tool

    together = {(r["package"], r["name"]) for r in opa_test(REGO, POLICIES, *team)}
    assert together == alone | {("data.mcp.rules.team_test", "test_team_denies_mail")}


def test_the_shipped_tests_pass_with_a_teams_own_policy_instead_of_policies(
    tmp_path: Path,
) -> None:
    alone = {(r["package"], r["name"]) for r in opa_test(REGO, POLICIES)}
    team = own_policy(tmp_path / "team")
    together = {(r["package"], r["name"]) for r in opa_test(REGO, *team)}
    assert together == alone | {("data.mcp.rules.team_test", "test_team_denies_mail")}
    # And with no data at all.
    assert {(r["package"], r["name"]) for r in opa_test(REGO)} == alone
