"""What `mcp-policy validate` (and every load of the service, which reads the policy the same
way) says about a policy that is wrong: a value two files both set names both files and
lines; every problem of a rule is reported, not the first; a directory without the
framework's decision entry point is reported as such, with the command that fixes it.
Nothing ends in a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.errors import PolicyRejected
from engine.policy.source import read_bundle
from engine.settings import PROJECT_ROOT
from tests.conftest import HEALTHIMAGING, copy_policy
from tests.test_proxy_scan import cli, error_lines


def line_of(path: Path, text: str, after: str | None = None) -> int:
    """The 1-based line of `path` that is `text` (stripped), the first after `after`."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    start = lines.index(after) + 1 if after is not None else 0
    return lines.index(text, start) + 1


# Each case: given the copied rego/ and policies/ and a team directory beside them,
# write the clash and return the one error line validate must print.


def catalog_entry_in_two_directories(data: Path, team: Path) -> str:
    mine = team / "imaging.yaml"
    mine.write_text(
        "mcp_policy:\n"
        "  catalog:\n"
        f"    {HEALTHIMAGING}:\n"
        "      copy_image_set:\n"
        "        category: copy\n"
        "        risk: high\n"
    )
    shipped = data / "catalog.yaml"
    first = line_of(shipped, "category: write")
    return (
        f"{shipped}:{first}:19: data.mcp_policy.catalog.{HEALTHIMAGING}.copy_image_set.category"
        f" is defined twice (also at {mine}:5:19)"
    )


def default_in_the_same_directory(data: Path, team: Path) -> str:
    again = data / "again.yaml"  # read before rules.yaml: named first
    again.write_text("mcp_policy:\n  default:\n    action: allow\n")
    rules = data / "rules.yaml"
    line = line_of(rules, "action: deny", after="default:")
    return (
        f"{again}:3:13: data.mcp_policy.default.action is defined twice (also at {rules}:{line}:13)"
    )


def a_value_where_the_other_file_has_a_map(data: Path, team: Path) -> str:
    mine = team / "rules.yaml"
    mine.write_text("mcp_policy:\n  rules: none\n")
    rules = data / "rules.yaml"
    line = line_of(rules, "copy_image_set:")  # where the map of rules starts
    return f"{rules}:{line}:5: data.mcp_policy.rules is defined twice (also at {mine}:2:10)"


def a_file_placed_by_its_directory(data: Path, team: Path) -> str:
    nested = team / "mcp_policy" / "defaults.yaml"  # placed at data.mcp_policy
    nested.parent.mkdir()
    nested.write_text("default:\n  action: allow\n")
    rules = data / "rules.yaml"
    line = line_of(rules, "action: deny", after="default:")
    return (
        f"{rules}:{line}:13: data.mcp_policy.default.action is defined twice "
        f"(also at {nested}:2:11)"
    )


def a_json_file(data: Path, team: Path) -> str:
    extra = team / "extra.json"
    extra.write_text(json.dumps({"mcp_policy": {"default": {"action": "allow"}}}))
    rules = data / "rules.yaml"
    line = line_of(rules, "action: deny", after="default:")
    return f"{rules}:{line}:13: data.mcp_policy.default.action is defined twice (also at {extra})"


def a_directory_where_a_file_has_a_value(data: Path, team: Path) -> str:
    flat = team / "a.yaml"  # read first: a value at data.extra.catalog...
    flat.write_text("extra:\n  catalog: none\n")
    nested = team / "extra" / "catalog" / "servers.yaml"  # ...where this directory goes
    nested.parent.mkdir(parents=True)
    nested.write_text("srv: {}\n")
    return f"{flat}:2:12: data.extra.catalog is defined twice (also at {nested})"


CLASHES: list[Callable[[Path, Path], str]] = [
    catalog_entry_in_two_directories,
    default_in_the_same_directory,
    a_value_where_the_other_file_has_a_map,
    a_file_placed_by_its_directory,
    a_json_file,
    a_directory_where_a_file_has_a_value,
]


@pytest.mark.parametrize("clash", CLASHES, ids=lambda f: f.__name__)
async def test_a_value_set_twice_names_both_files_and_lines(
    tmp_path: Path, clash: Callable[[Path, Path], str]
) -> None:
    rego, data = copy_policy(tmp_path)
    team = tmp_path / "team"
    team.mkdir()
    expected = clash(data, team)

    status, out, _ = await cli("validate", str(rego), str(data), str(team))
    assert status == 2, out
    assert error_lines(out) == [expected]
    assert "Traceback" not in out

    # The service reads the policy with the same function: a load or reload is refused
    # with the same line.
    with pytest.raises(PolicyRejected) as refused:
        read_bundle([rego, data, team])
    assert refused.value.errors == [expected]


async def test_a_directory_given_twice_is_a_clash_not_a_crash(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    status, out, _ = await cli("validate", str(rego), str(data), str(data))
    assert status == 2, out
    [error] = error_lines(out)
    assert error.startswith(f"{data / 'catalog.yaml'}:")
    assert "is defined twice (also at " in error


async def test_single_files_clash_with_both_places(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    again = tmp_path / "again.yaml"
    again.write_text("mcp_policy:\n  default:\n    action: allow\n")
    rules = data / "rules.yaml"
    line = line_of(rules, "action: deny", after="default:")
    status, out, _ = await cli("validate", str(rules), str(again))
    assert status == 2, out
    assert (
        f"{rules}:{line}:13: data.mcp_policy.default.action is defined twice (also at {again}:3:13)"
    ) in error_lines(out)


async def test_every_problem_of_a_rule_is_reported(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    mine = tmp_path / "team" / "rules.yaml"
    mine.parent.mkdir()
    mine.write_text(
        "mcp_policy:\n"
        "  rules:\n"
        "    list_datastores:\n"
        "      action: rate_limit\n"
        "      reason: 5\n"
        "      rate_limit: {max: 0, window: 0, scope: team}\n"
        "      roles: imaging-admin\n"
        "      approval: {ttl: 60}\n"
        "      colour: red\n"
    )
    status, out, _ = await cli("validate", str(rego), str(data), str(mine.parent))
    assert status == 2, out
    rule = "data.mcp_policy.rules.list_datastores"
    assert sorted(error_lines(out)) == sorted(
        [
            f"{mine}:4:7: {rule}: Additional properties are not allowed ('colour' was unexpected)",
            f"{mine}:4:7: {rule}: approval goes only with action require_approval",
            f"{mine}:5:15: {rule}.reason: 5 is not of type 'string'",
            f"{mine}:6:25: {rule}.rate_limit.max: 0 is less than the minimum of 1",
            f"{mine}:6:46: {rule}.rate_limit.scope: 'team' is not one of "
            "['session', 'agent', 'user', 'global']",
            f"{mine}:6:36: {rule}.rate_limit.window: 0 is less than or equal to the minimum of 0",
            f"{mine}:7:14: {rule}.roles: 'imaging-admin' is not of type 'array'",
        ]
    )


async def test_a_rule_without_an_action_says_so_and_nothing_it_does_not_need(
    tmp_path: Path,
) -> None:
    rego, data = copy_policy(tmp_path)
    mine = tmp_path / "team" / "rules.yaml"
    mine.parent.mkdir()
    mine.write_text("mcp_policy:\n  rules:\n    list_datastores:\n      reason: why\n")
    status, out, _ = await cli("validate", str(rego), str(data), str(mine.parent))
    assert status == 2, out
    # Not also "action rate_limit needs a rate_limit": that if/then holds only because
    # the action is missing.
    assert error_lines(out) == [
        f"{mine}:4:7: data.mcp_policy.rules.list_datastores: 'action' is a required property"
    ]


FRAMEWORK = PROJECT_ROOT / "rego"


def team_repository(tmp: Path) -> Path:
    """A team's own directory: policy data and a rule package, no framework."""
    team = tmp / "team"
    (team / "rego" / "mcp" / "rules" / "mail").mkdir(parents=True)
    (team / "rego" / "mcp" / "rules" / "mail" / "mail.rego").write_text(
        "package mcp.rules.mail\n\n"
        'deny contains {"rule": "mail.never", "reason": "no"} if input.tool.name == "send"\n'
    )
    (team / "policies").mkdir()
    (team / "policies" / "catalog.yaml").write_text(
        "mcp_policy:\n  catalog:\n    mail:\n      send: {category: write, risk: high}\n"
        "  risk_defaults: {high: require_approval}\n  default: deny\n"
    )
    return team


async def test_validate_without_the_framework_says_it_is_missing(tmp_path: Path) -> None:
    team = team_repository(tmp_path)
    for paths in (
        [team / "rego", team / "policies"],
        [team / "policies"],
        [team / "policies" / "catalog.yaml"],
    ):
        status, out, _ = await cli("validate", *map(str, paths))
        assert status == 2, out
        [error] = error_lines(out)
        given = " ".join(map(str, paths))
        assert error.startswith(
            f"no decision entry point: nothing in {given} defines data.mcp.decision"
        ), error
        assert "The framework's Rego is missing: include it, e.g. " in error
        assert f"mcp-policy validate {FRAMEWORK} {given} " in error

    # As the message says: with the framework, the same directories pass.
    status, out, _ = await cli(
        "validate", str(FRAMEWORK), str(team / "rego"), str(team / "policies")
    )
    assert status == 0, out


async def test_a_package_named_mcp_is_not_the_entry_point(tmp_path: Path) -> None:
    team = team_repository(tmp_path)
    (team / "rego" / "mcp" / "own.rego").write_text(
        "package mcp\n\ndecisions := {}\n"  # a package mcp, but no decision
    )
    status, out, _ = await cli("validate", str(team / "rego"), str(team / "policies"))
    assert status == 2, out
    assert error_lines(out)[0].startswith("no decision entry point: ")


async def test_a_load_error_in_results_data_names_the_file_that_holds_it(tmp_path: Path) -> None:
    """A secret pattern of the team's own that is not RE2 (the schema checks its shape, the
    result rules its syntax, at load): the error points at the team's file and the pattern,
    not at the first file that has `results` (the shipped results.yaml)."""
    rego, data = copy_policy(tmp_path)
    mine = tmp_path / "team" / "secrets.yaml"
    mine.parent.mkdir()
    mine.write_text(
        "mcp_policy:\n"
        "  results:\n"
        "    secrets:\n"
        "      team_token:\n"
        "        description: a team token\n"
        "        regex: '(?<=token)-[0-9]+'\n"
    )
    status, out, _ = await cli("validate", str(rego), str(data), str(mine.parent))
    assert status == 2, out
    assert error_lines(out) == [
        f"{mine}:5:9: data.mcp.load_errors: mcp.result_rules.secrets: "
        'mcp_policy.results.secrets["team_token"]: regex is not a valid RE2 regular expression'
    ]
