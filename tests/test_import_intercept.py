"""`mcp-policy import intercept`: PolicyLayer Intercept policies as YAML rules and a generated
Rego package with generated tests.

The inputs are the policy files in tests/fixtures/intercept/, written the way Intercept's
policy reference describes the format (every construct: version, default, hide, per-tool
rules, conditions with each operator, rate_limit shorthands, state counters with increment
and increment_from, on_deny, "*" rules), and hostile files made up here. The outputs are
checked with the real tools: the pinned `opa fmt`, `opa check --strict`, `regal lint` and
`opa test` (the generated tests, over the framework's Rego without its own tests), a real
service started on the output with the framework, and OPA's evaluator in this process
(engine/authoring/offline.py) for many calls at once.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from engine import cli
from engine.authoring import import_intercept
from engine.authoring.offline import OfflinePolicy
from engine.policy.opa_process import find_opa
from engine.settings import DEFAULT_POLICY_SCHEMA, PROJECT_ROOT
from engine.transports.server import start_servers
from tests.clients import HttpClient
from tests.conftest import session, settings_for
from tests.processes import CLI

OPA = find_opa()
FIXTURES = Path(__file__).parent / "fixtures" / "intercept"
GITHUB, PAYMENTS, OPERATORS, OMISSIONS = (
    FIXTURES / f"{name}.yaml" for name in ("github", "payments", "operators", "omissions")
)
PREFIX = "mcp-policy import intercept"


def run_import(*args: str | Path) -> tuple[int, str, str]:
    """The command as a user runs it, in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    parsed = cli.build_parser().parse_args(["import", "intercept", *map(str, args)])
    status = import_intercept.run(parsed, out, err)
    return status, out.getvalue(), err.getvalue()


async def run_import_async(*args: str | Path) -> tuple[int, str, str]:
    """`run_import` for a test on the event loop (the command runs one of its own)."""
    return await asyncio.to_thread(run_import, *args)


def policy_paths(out: Path) -> list[Path]:
    """What a service loads for an imported repository: the framework's Rego and the output."""
    return [PROJECT_ROOT / "rego", out / "rego", out / "policies"]


def framework_without_tests(tmp: Path) -> Path:
    """The framework's Rego as a team's repository uses it: its own tests left out (they
    test the shipped data, which the team's repository does not hold)."""
    rego = tmp / "framework"
    shutil.copytree(PROJECT_ROOT / "rego", rego, ignore=shutil.ignore_patterns("*_test.rego"))
    return rego


def opa(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OPA, *map(str, args)], capture_output=True, text=True, timeout=300, check=False, cwd=cwd
    )


def data_of(out: Path, package: str) -> dict[str, Any]:
    doc = yaml.safe_load((out / "policies" / f"{package}.yaml").read_text())
    policy: dict[str, Any] = doc["mcp_policy"]
    return policy


def rego_of(out: Path, package: str, suffix: str = "") -> str:
    return (out / "rego" / "mcp" / "rules" / package / f"{package}{suffix}.rego").read_text()


def call(server: str, tool: str, sid: str | None = None, **arguments: Any) -> dict[str, Any]:
    sid = sid or session()
    return {
        "server": server,
        "tool": tool,
        "arguments": arguments,
        "principal": {"agent_id": f"agent-{sid}", "session_id": sid, "user_id": "user-1"},
    }


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """github.yaml, payments.yaml and operators.yaml imported in one run (by the CLI in a
    process of its own), each for a server of its own."""
    out = tmp_path_factory.mktemp("imported") / "repo"
    done = subprocess.run(
        [*CLI, "import", "intercept", GITHUB, PAYMENTS, OPERATORS, "-o", out]
        + ["--server", "github", "--server", "payments", "--server", "ops"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # 3: github's "*" limit is counted per tool, and operators' default deny overrules
    # the others' default allow (the rule for tools not in the catalog is one).
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    for file in (GITHUB, PAYMENTS):
        assert f"{file}:1: default: not converted: default allow: another policy" in done.stderr
    assert f'{GITHUB}:33: tools["*"].rules[0]: not converted: ' in done.stderr
    return out


# --- each construct ------------------------------------------------------------------------------


def test_hide_deny_and_rate_limit_shorthands_become_yaml_rules(imported: Path) -> None:
    github = data_of(imported, "intercept_github")
    assert set(github["catalog"]) == {"github"}
    catalog = github["catalog"]["github"]
    assert set(catalog) == {
        "create_issue",
        "create_pull_request",
        "delete_repository",
        "list_issues",
        "list_webhooks",
        "transfer_repository",
    }
    assert {entry["category"] for entry in catalog.values()} == {"imported"}
    assert github["rules"] == {
        "create_issue": {
            "action": "rate_limit",
            "rate_limit": {"max": 3, "window": 3600, "scope": "global"},
            "reason": "No more than 3 new issues an hour",
        },
        "create_pull_request": {
            "action": "rate_limit",
            "rate_limit": {"max": 2, "window": 86400, "scope": "global"},
        },
        "delete_repository": {
            "action": "deny",
            "reason": "Deleting a repository is not allowed from an agent",
        },
        "list_issues": "allow",
        "list_webhooks": {
            "action": "deny",
            "reason": 'tool "list_webhooks" is hidden by the policy',
        },
        "transfer_repository": {
            "action": "deny",
            "reason": 'tool "transfer_repository" is hidden by the policy',
        },
    }
    # The "*" rule is Rego: it applies to every tool of the server, listed or not.
    rego = rego_of(imported, "intercept_github")
    assert '_on_server if input.tool.server == "github"' in rego
    assert '"rule": "intercept_github.*.calls_per_minute"' in rego
    assert "rate_limit contains _limits[1] if _on_server" in rego


def test_state_counters_become_limits_and_conditions_become_rego(imported: Path) -> None:
    payments = data_of(imported, "intercept_payments")
    assert payments["rules"] == {
        # state {increment_from: args.amount} with lt 100001: a total of 100000 a day.
        "create_charge": {
            "action": "rate_limit",
            "rate_limit": {
                "max": 100000,
                "window": 86400,
                "scope": "global",
                "increment_from": "amount",
            },
            "reason": "The daily spending cap is reached",
        },
        # increment 5 with lte 10: two calls an hour.
        "create_refund": {
            "action": "rate_limit",
            "rate_limit": {"max": 2, "window": 3600, "scope": "global"},
        },
        # Counted from a nested argument: the limit is in the Rego.
        "create_transfer": "allow",
        "delete_customer": {"action": "deny", "reason": 'denied by rule "no deletions"'},
    }
    rego = rego_of(imported, "intercept_payments")
    assert '_lte(["amount"], 50000)' in rego
    assert '_in(["currency"], ["usd", "eur"])' in rego
    assert '_exists(["reason"])' in rego
    assert 'cost := _cost(["payment", "amount"])' in rego
    # create_charge's second limit (10 a minute) does not fit its YAML rule.
    assert '"rule": "intercept_payments.create_charge.charges_per_minute"' in rego
    default = yaml.safe_load((imported / "policies" / "intercept_default.yaml").read_text())
    assert default == {"mcp_policy": {"default": "deny"}}


def test_every_operator_becomes_a_rego_condition(imported: Path) -> None:
    rego = rego_of(imported, "intercept_operators")
    for expression in (
        '_eq(["environment"], "staging")',
        '_neq(["branch"], "main")',
        '_not_in(["region"], ["us-gov-west-1", "cn-north-1"])',
        '_gt(["replicas"], 0)',
        '_lt(["replicas"], 10)',
        '_gte(["timeout"], 30)',
        '_regex(["image"], "^registry\\\\.example\\\\.com/[a-z0-9-]+:v[0-9]+$")',
        '_contains(["labels"], "reviewed")',
        '_eq(["config", "mode"], "safe")',
        'not _exists(["force"])',
        '_regex(["path"], "^/app/src/")',
    ):
        assert f"\t{expression}\n" in rego, expression
    assert "load_errors contains" in rego


# --- the generated output, checked by the pinned tools -----------------------------------------


@pytest.fixture(scope="module")
def every_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each fixture imported on its own (one repository each), under one directory."""
    root = tmp_path_factory.mktemp("each")
    for path in (GITHUB, PAYMENTS, OPERATORS, OMISSIONS):
        status, _, err = run_import(path, "-o", root / path.stem)
        assert status in (0, 3), err
    yield root


def test_generated_rego_is_formatted_checked_and_lint_clean(every_fixture: Path) -> None:
    outputs = sorted(every_fixture.glob("*/rego"))
    assert len(outputs) == 4
    formatted = opa("fmt", "--list", "--fail", *outputs)
    assert formatted.returncode == 0 and formatted.stdout == "", formatted.stdout
    for out in outputs:
        checked = opa(
            "check", "--strict", "--schema", DEFAULT_POLICY_SCHEMA.parent,
            PROJECT_ROOT / "rego", out, out.parent / "policies",
        )  # fmt: skip
        assert checked.returncode == 0, checked.stderr
    regal = shutil.which("regal")
    assert regal is not None, "regal is pinned in .tools/bin (make setup)"
    linted = subprocess.run(
        [regal, "lint", "rego", *outputs],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=PROJECT_ROOT,  # the repository's Regal configuration
    )
    assert linted.returncode == 0, linted.stdout


def test_generated_tests_pass_with_the_pinned_opa_and_cover_every_line(
    every_fixture: Path, tmp_path: Path
) -> None:
    framework = framework_without_tests(tmp_path)
    for out in sorted(every_fixture.iterdir()):
        tested = opa("test", framework, out / "rego", out / "policies", "--format", "json")
        results = json.loads(tested.stdout)
        assert tested.returncode == 0, [r for r in results if r.get("fail")]
        names = {r["name"] for r in results}
        assert len(names) >= 5 and all(name.startswith("test_") for name in names)
        covered = opa("test", framework, out / "rego", out / "policies", "--coverage")
        report = json.loads(covered.stdout)["files"]
        generated = {name: file for name, file in report.items() if str(out) in name}
        assert len(generated) == 2, list(report)
        for name, file in generated.items():
            assert file["coverage"] == 100, (name, file.get("not_covered"))


def test_generated_tests_fail_when_the_policy_says_something_else(
    every_fixture: Path, tmp_path: Path
) -> None:
    """The generated tests are not a tautology: a changed limit or condition fails them."""
    out = tmp_path / "payments"
    shutil.copytree(every_fixture / "payments", out)
    data = out / "policies" / "intercept_payments.yaml"
    data.write_text(data.read_text().replace("max: 2\n", "max: 3\n"))
    rego = out / "rego" / "mcp" / "rules" / "intercept_payments" / "intercept_payments.rego"
    rego.write_text(rego.read_text().replace('["usd", "eur"]', '["usd"]'))
    tested = opa("test", framework_without_tests(tmp_path), out / "rego", out / "policies")
    assert tested.returncode != 0
    failed = [line for line in tested.stdout.splitlines() if line.endswith(")") and "FAIL" in line]
    assert any("test_decision" in line for line in failed), tested.stdout  # the YAML limit
    assert any("passes_at_edge" in line for line in failed), tested.stdout  # "eur"


# --- what the output decides, in a real service ------------------------------------------------


@pytest.fixture(scope="module")
async def service(
    imported: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[HttpClient]:
    tmp = tmp_path_factory.mktemp("service")
    running = await start_servers(settings_for(tmp, policy_paths=policy_paths(imported)))
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as client:
            yield HttpClient(client)
    finally:
        await running.stop()


async def test_service_denies_hidden_and_denied_tools(service: HttpClient) -> None:
    hidden = await service.decide(call("github", "transfer_repository", owner="o"))
    assert hidden["verdict"] == "deny"
    assert hidden["reason"] == 'tool "transfer_repository" is hidden by the policy'
    assert hidden["denies_tool"] is True  # a proxy removes it from tools/list
    denied = await service.decide(call("github", "delete_repository", repo="r"))
    assert (denied["verdict"], denied["rule"]) == ("deny", "catalog.rule.delete_repository")
    assert denied["reason"] == "Deleting a repository is not allowed from an agent"
    # On another server the tool is not the policy's: the default (deny, from operators).
    elsewhere = await service.decide(call("other-server", "list_issues"))
    assert (elsewhere["verdict"], elsewhere["rule"]) == ("deny", "catalog.default")


async def test_service_limits_calls_as_the_shorthand_says(service: HttpClient) -> None:
    # 3 an hour for every caller together (Intercept's counters are not per session).
    verdicts = [
        (await service.decide(call("github", "create_issue", title=f"t{i}")))["verdict"]
        for i in range(4)
    ]
    assert verdicts == ["allow", "allow", "allow", "rate_limited"]
    limited = await service.decide(call("github", "create_issue", title="again"))
    assert "(No more than 3 new issues an hour)" in limited["reason"]
    assert limited["rate_limit"]["limit"] == 3


async def test_service_checks_argument_conditions(service: HttpClient) -> None:
    too_much = await service.decide(call("payments", "create_charge", amount=60000, currency="usd"))
    assert (too_much["verdict"], too_much["reason"]) == (
        "deny",
        "A single charge may not exceed 500.00",
    )
    assert too_much["rule"] == "intercept_payments.create_charge.single_charge_cap"
    pounds = await service.decide(call("payments", "create_charge", amount=100, currency="gbp"))
    assert (pounds["verdict"], pounds["reason"]) == ("deny", "Only USD and EUR")
    # A refund needs a reason (exists) and at most 100.00.
    bare = await service.decide(call("payments", "create_refund", amount=50))
    assert bare["verdict"] == "deny"
    assert bare["reason"] == "Refunds above 100.00 or without a reason need a person"
    ok = await service.decide(call("payments", "create_refund", amount=50, reason="damaged"))
    assert ok["verdict"] == "allow"


async def test_service_counts_spend_from_the_argument(service: HttpClient) -> None:
    amounts = [40000, 40000, 30000, 20000]
    verdicts = [
        (await service.decide(call("payments", "create_charge", amount=a, currency="eur")))[
            "verdict"
        ]
        for a in amounts
    ]
    # 40000 + 40000 + 30000 would pass 100000 a day; 20000 still fits.
    assert verdicts == ["allow", "allow", "rate_limited", "allow"]
    unusable = await service.decide(call("payments", "create_charge", amount="10", currency="usd"))
    assert unusable["verdict"] == "deny"  # not a number: neither a charge nor a cost


async def test_service_counts_a_nested_argument_and_a_fixed_increment(service: HttpClient) -> None:
    transfers = [
        (await service.decide(call("payments", "create_transfer", payment={"amount": a})))[
            "verdict"
        ]
        for a in (600, 500, 400)
    ]
    assert transfers == ["allow", "rate_limited", "allow"]  # 1000 an hour in all
    missing = await service.decide(call("payments", "create_transfer", payment={}))
    assert missing["verdict"] == "deny"
    assert missing["rule"] == "intercept_payments.create_transfer.transfer_total.cost_invalid"
    # increment 5 against lte 10: two refunds an hour (the test above used one).
    refunds = [
        (await service.decide(call("payments", "create_refund", amount=1, reason="r")))["verdict"]
        for _ in range(2)
    ]
    assert refunds == ["allow", "rate_limited"]


async def test_service_applies_the_allowlist_and_every_operator(service: HttpClient) -> None:
    good: dict[str, Any] = {
        "environment": "staging",
        "branch": "feature/x",
        "region": "eu-west-1",
        "replicas": 3,
        "timeout": 30,
        "image": "registry.example.com/web:v12",
        "labels": ["reviewed", "small"],
        "config": {"mode": "safe"},
    }
    assert (await service.decide(call("ops", "deploy", **good)))["verdict"] == "allow"
    for change in (
        {"environment": "production"},
        {"branch": "main"},
        {"region": "cn-north-1"},
        {"replicas": 0},
        {"replicas": 10},
        {"timeout": 29.5},
        {"image": "docker.io/web:v12"},
        {"labels": ["small"]},
        {"config": {"mode": "fast"}},
        {"force": False},  # exists: false, whatever its value
        {"replicas": "3"},  # a number, not text
    ):
        decision = await service.decide(call("ops", "deploy", **{**good, **change}))
        assert decision["verdict"] == "deny", change
        assert decision["rule"] == "intercept_operators.deploy.target_checks"
    assert (await service.decide(call("ops", "read_logs")))["verdict"] == "allow"
    # default deny: a tool the policy does not list is refused.
    unlisted = await service.decide(call("ops", "shell", command="ls"))
    assert (unlisted["verdict"], unlisted["rule"]) == ("deny", "catalog.default")
    writes = await service.decide(
        call("ops", "write_file", path="/etc/passwd", content="generated")
    )
    assert writes["reason"] == "Writes only under /app/src/, generated content only"
    fine = await service.decide(
        call("ops", "write_file", path="/app/src/a.py", content="# generated")
    )
    assert fine["verdict"] == "allow"


# --- what is not converted ----------------------------------------------------------------------


def test_omissions_are_reported_written_down_and_fail_closed(tmp_path: Path) -> None:
    status, out, err = run_import(OMISSIONS, "-o", tmp_path / "repo")
    assert status == import_intercept.EXIT_OMISSIONS
    lines = [line.removeprefix(f"{PREFIX}: ") for line in err.splitlines()]
    where = str(OMISSIONS)
    assert f"{where}:5: owner: not converted: unknown key ignored" in "\n".join(lines)
    assert "not know); also 1 more: tools.search.rules[0].priority (line 18)" in err
    expected = {
        f"{where}:5: owner",
        f"{where}:22: tools.search.rules[1].conditions[0]",
        f'{where}:37: tools["*"].rules[0]',
    }
    omitted = {line.split(": not converted")[0] for line in lines if ": not converted:" in line}
    assert omitted == expected
    assert "2 tools catalogued" in out and "not converted: 4 (see above)" in out
    data = (tmp_path / "repo" / "policies" / "intercept_omissions.yaml").read_text()
    rego = rego_of(tmp_path / "repo", "intercept_omissions")
    for text in (data, rego):
        assert "# Not converted (the import printed these too):" in text
        assert "tools.search.rules[1].conditions[0]:" in text


async def test_omitted_parts_fail_closed(tmp_path: Path) -> None:
    status, _, err = await run_import_async(OMISSIONS, "-o", tmp_path / "repo")
    assert status == 3, err
    async with await OfflinePolicy.load(policy_paths(tmp_path / "repo")) as policy:

        def decide(tool: str, **arguments: Any) -> Any:
            return policy.evaluate(policy.input_for(call("any", tool, **arguments)))

        # "after the budget" reads a counter it cannot: search is denied, every call.
        search = decide("search", q="x")
        assert (search.action, search.rule) == (
            "deny",
            "intercept_omissions.search.after_the_budget",
        )
        assert search.denies_tool is True
        assert decide("fetch", bytes=10).action == "rate_limit"  # the "*" limit, per tool
        assert decide("fetch", bytes=2 << 20).action == "deny"


async def test_hiding_everything_or_a_wildcard_deny_refuses_every_call(tmp_path: Path) -> None:
    """hide: ["*"] and a deny rule under "*" refuse every tool of the server, listed or
    not, and nothing on another server (the default, allow, applies there)."""
    for name, text, rule, reason in (
        (
            "all-hidden",
            'version: "1"\nhide: ["*"]\ntools:\n  t:\n    rules: []\n',
            "intercept_all_hidden.*.hidden",
            'tool "{tool}" is hidden by the policy',
        ),
        (
            "all-denied",
            'version: "1"\ntools:\n  "*":\n    rules:\n'
            '      - {name: stop, action: deny, on_deny: "maintenance window"}\n'
            "  t:\n    rules: []\n",
            "intercept_all_denied.*.stop",
            "maintenance window",
        ),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        status, _, err = await run_import_async(path, "-o", tmp_path / name, "--server", "srv")
        assert status == 0, err
        assert "default allow: tools not in the catalog are allowed on every server" in err
        async with await OfflinePolicy.load(policy_paths(tmp_path / name)) as offline:
            for tool in ("t", "other"):
                result = offline.evaluate(offline.input_for(call("srv", tool)))
                assert (result.action, result.rule) == ("deny", rule)
                assert result.reason == reason.format(tool=tool) and result.denies_tool
            elsewhere = offline.evaluate(offline.input_for(call("another-srv", "t")))
            assert (elsewhere.action, elsewhere.rule) == ("allow", "catalog.default")


# --- hostile files ------------------------------------------------------------------------------


def rule(*lines: str) -> str:
    """A policy with one tool, t, whose one rule is `lines`."""
    return 'version: "1"\ntools:\n  t:\n    rules:\n' + "".join(f"      {x}\n" for x in lines)


def condition(text: str) -> str:
    return rule("- name: n", f"  conditions: [{text}]")


def counter(state: str) -> str:
    return rule(
        "- name: n", "  conditions: [{path: state.t.c, op: lte, value: 1}]", f"  state: {state}"
    )


def aliases(levels: int) -> str:
    """Each level ten times the one before: 10**levels values from a few lines."""
    text = 'version: "1"\nl0: &l0 [x, x, x, x, x, x, x, x, x, x]\n'
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n"
    return text


HOSTILE: list[tuple[str, str, str]] = [
    ("not-yaml", "tools: [\n", ":2:1: not valid YAML"),
    ("empty", "", "no document"),
    ("two-documents", 'version: "1"\n---\nversion: "1"\n', "2 documents; one policy per file"),
    ("a-list", "- 1\n", ":1: (top): the policy must be a mapping"),
    ("version", 'version: "2"\n', ':1: version: version must be "1", got "2"'),
    ("default", 'version: "1"\ndefault: maybe\n', 'default must be "allow" or "deny"'),
    ("tools-list", 'version: "1"\ntools: [a]\n', ":2: tools: tools must be a mapping, got a list"),
    ("rules-map", 'version: "1"\ntools:\n  t:\n    rules: {}\n', "rules must be a list"),
    ("hide-text", 'version: "1"\nhide: tool\n', "hide: hide must be a list, got text"),
    ("hide-empty", 'version: "1"\nhide: [" "]\n', "hide[0]: entry must not be empty"),
    ("hide-twice", 'version: "1"\nhide: [a, a]\n', 'hide[1]: "a" is listed twice'),
    ("no-name", rule("- action: deny"), "rule must have a name"),
    ("action", rule("- {name: n, action: approve}"), "action must be"),
    (
        "deny-conditions",
        rule("- {name: n, action: deny, conditions: [{path: args.a, op: eq, value: 1}]}"),
        "deny rules must not have conditions",
    ),
    ("no-conditions", rule("- {name: n}"), "at least one condition"),
    ("operator", condition("{path: args.a, op: like, value: x}"), 'unknown operator "like"'),
    ("in-text", condition("{path: args.a, op: in, value: x}"), "operator in requires a list"),
    ("lte-text", condition('{path: args.a, op: lte, value: "5"}'), "lte requires a numeric"),
    ("exists-text", condition('{path: args.a, op: exists, value: "yes"}'), "true or false"),
    ("path", condition("{path: input.a, op: eq, value: 1}"), 'path must start with "args."'),
    ("rate-text", rule("- {name: n, rate_limit: 5 per hour}"), 'must be "<count>/<window>"'),
    ("rate-zero", rule("- {name: n, rate_limit: 0/hour}"), "count must be a positive integer"),
    ("rate-week", rule("- {name: n, rate_limit: 5/week}"), 'hour or day, got "week"'),
    (
        "rate-huge",
        rule("- {name: n, rate_limit: 99999999999999999999/hour}"),
        "count must be a positive integer",
    ),
    (
        "rate-and-state",
        rule("- name: n", "  rate_limit: 5/hour", "  state: {counter: c, window: hour}"),
        "rate_limit cannot be combined with conditions or state",
    ),
    ("window", counter("{counter: c, window: week}"), "window must be minute, hour or day"),
    (
        "increment-float",
        counter("{counter: c, window: hour, increment: 1.5}"),
        "increment must be an integer, got 1.5",
    ),
    (
        "increment-huge",
        counter("{counter: c, window: hour, increment: 100000000000000000000}"),
        "increment is out of range",
    ),
    (
        "increment-from",
        counter("{counter: c, window: hour, increment_from: amount}"),
        'increment_from must start with "args."',
    ),
    (
        "counter-twice",
        rule(
            "- {name: a, conditions: [{path: state.t.c, op: lte, value: 1}],",
            "   state: {counter: c, window: hour}}",
            "- {name: b, conditions: [{path: state.t.c, op: lte, value: 2}],",
            "   state: {counter: c, window: day}}",
        ),
        'duplicate state counter "c" (also used by rules[0])',
    ),
    (
        "no-counter",
        condition("{path: state.t.missing, op: lte, value: 1}"),
        "no rule of that tool defines that counter",
    ),
    ("duplicate-key", 'version: "1"\nversion: "1"\n', ':2: the key "version" is defined twice'),
    ("python-tag", 'version: !!python/object:os.system "1"\n', "unsupported YAML value"),
    ("custom-tag", 'version: "1"\ntools: !evil {}\n', 'unsupported YAML tag "!evil"'),
    (
        "merge-key",
        'base: &b {rules: []}\nversion: "1"\ntools:\n  t:\n    <<: *b\n',
        "merge keys (<<) are not supported",
    ),
    ("alias-bomb", aliases(6), "more than 100000 values"),
    ("deep", 'version: "1"\nx: ' + "[" * 200 + "]" * 200 + "\n", "levels (YAML aliases?)"),
    ("deeper", 'version: "1"\nx: ' + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    ("tagged-bool", 'version: "1"\nx: !!int true\n', "unsupported YAML value"),
    ("big-int", 'version: "1"\nx: ' + "9" * 500 + "\n", "a number with too many digits"),
]


@pytest.mark.parametrize(("name", "text", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_files_intercept_would_refuse_write_nothing(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    status, out, err = run_import(path, "-o", tmp_path / "repo")
    assert status == import_intercept.EXIT_FAILED, err
    assert message in err
    assert f"{path}" in err and "nothing written" in err and "Traceback" not in err
    assert out == "" and not (tmp_path / "repo").exists()


def test_unreadable_files_write_nothing(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b'version: "1"\n\xff\xfe\n')
    large = tmp_path / "large.yaml"
    large.write_text('version: "1"\n' + "#" * (1 << 20) + "\n")
    for path, message in (
        (binary, "not UTF-8 text (byte 13)"),
        (large, "larger than 1 MiB"),
        (tmp_path / "missing.yaml", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        status, _, err = run_import(path, "-o", tmp_path / "repo")
        assert (status, message in err) == (1, True), err
    assert not (tmp_path / "repo").exists()


def test_an_invalid_regular_expression_is_refused_by_the_output_load_check(tmp_path: Path) -> None:
    path = tmp_path / "regex.yaml"
    path.write_text(
        'version: "1"\ntools:\n  t:\n    rules:\n      - name: n\n'
        '        conditions: [{path: args.a, op: regex, value: "(unclosed"}]\n'
    )
    status, _, err = run_import(path, "-o", tmp_path / "repo")
    assert status == 1
    assert 'tools.t.rules[0].conditions[0]: invalid regular expression "(unclosed"' in err
    assert not (tmp_path / "repo").exists()


async def test_regular_expressions_without_a_usable_example(tmp_path: Path) -> None:
    """A pattern the import cannot make up a match for, or whose made-up match RE2 does
    not take, costs the generated tests their passing call (noted), never correctness."""
    path = tmp_path / "patterns.yaml"
    path.write_text(
        'version: "1"\ntools:\n'
        "  intricate:\n    rules:\n"
        '      - {name: i, conditions: [{path: args.s, op: regex, value: "(?i)^ok"}]}\n'
        "  impossible:\n    rules:\n"
        '      - {name: n, conditions: [{path: args.s, op: regex, value: "^x$y"}]}\n'
    )
    status, _, err = await run_import_async(path, "-o", tmp_path / "repo")
    assert status == 0, err
    assert "tools.intricate.rules[0]: note: no call meeting every condition" in err
    assert "note: no generated test: the example call made up for a regular" in err
    tests = rego_of(tmp_path / "repo", "intercept_patterns", "_test")
    assert "passes" not in tests and "test_2_denies_when_condition_1_fails_1" in tests
    tested = opa("test", framework_without_tests(tmp_path), tmp_path / "repo" / "rego",
                 tmp_path / "repo" / "policies")  # fmt: skip
    assert tested.returncode == 0, tested.stdout
    async with await OfflinePolicy.load(policy_paths(tmp_path / "repo")) as offline:
        for tool, value, action in (
            ("intricate", "OK then", "allow"),
            ("intricate", "not ok", "deny"),
            ("impossible", "xy", "deny"),
        ):
            result = offline.evaluate(offline.input_for(call("s", tool, s=value)))
            assert result.action == action, (tool, value)


INJECTIONS = [
    '"}\ndeny contains {"rule": "x", "reason": "y"} if true\n#',
    '\\" + input.tool.name + \\"',
    "`raw` \u2028 \u2029 \x00 \x1b[31m \ud7ff ✓ # regal ignore:line-length",
    "# METADATA\n# title: evil\npackage evil",
    "}}}]]]))) if { true } else := true",
]


async def test_injection_attempts_stay_data(tmp_path: Path) -> None:
    """Rule names, messages, paths and values that would end a Rego string or comment
    (or a YAML scalar) if pasted in: each stays one value, and means what it says."""
    tools: dict[str, Any] = {}
    for i, evil in enumerate(INJECTIONS):
        tools[f"tool_{i}"] = {
            "rules": [
                {
                    "name": evil,
                    "conditions": [
                        {"path": "args.value", "op": "eq", "value": evil},
                        {"path": f"args.{evil.replace('.', '_')}", "op": "exists", "value": False},
                    ],
                    "on_deny": evil,
                }
            ]
        }
    policy = {"version": "1", "description": INJECTIONS[0], "hide": [INJECTIONS[3]], "tools": tools}
    path = tmp_path / "evil\n# name.yaml"
    path.write_text(json.dumps(policy))  # JSON is YAML: every character as written
    server = 'srv"} # \\ \u00e9'
    status, _, err = await run_import_async(path, "-o", tmp_path / "repo", "--server", server)
    # The hidden name is no MCP tool name: noted (calls naming it are denied anyway).
    assert status == 0, err
    repo = tmp_path / "repo"
    formatted = opa("fmt", "--list", "--fail", repo / "rego")
    assert formatted.returncode == 0, formatted.stdout
    module = repo / "rego" / "mcp" / "rules" / "intercept_evil_name" / "intercept_evil_name.rego"
    parsed = json.loads(opa("parse", "--format", "json", module).stdout)
    assert [term["value"] for term in parsed["package"]["path"]] == [
        "data", "mcp", "rules", "intercept_evil_name",
    ]  # fmt: skip
    names = {rule["head"]["ref"][0]["value"] for rule in parsed["rules"]}
    helpers = {"_on_server", "_call", "_args", "_value", "_same", "_eq", "_exists", "_denials"}
    passes = {f"_passes_{n}" for n in range(1, len(INJECTIONS) + 1)}
    assert names == helpers | passes | {"deny"}
    assert not any(
        line.startswith("package") for line in rego_of(repo, "intercept_evil_name").splitlines()[8:]
    )
    async with await OfflinePolicy.load(policy_paths(repo)) as offline:
        for i, evil in enumerate(INJECTIONS):
            passing = offline.evaluate(offline.input_for(call(server, f"tool_{i}", value=evil)))
            assert passing.action == "allow", evil
            failing = offline.evaluate(
                offline.input_for(call(server, f"tool_{i}", value=evil + "x"))
            )
            assert (failing.action, failing.reason) == ("deny", evil)
            assert failing.rule.startswith(f"intercept_evil_name.tool_{i}.")
        other = offline.evaluate(offline.input_for(call("srv", "tool_0", value=INJECTIONS[0])))
        assert other.rule == "catalog.default"  # the server name is matched exactly


def test_numbers_at_the_edges(tmp_path: Path) -> None:
    path = tmp_path / "edges.yaml"
    path.write_text(
        'version: "1"\ntools:\n'
        "  huge:\n    rules:\n      - name: cap\n"
        "        conditions: [{path: state.huge.c, op: lte, value: 1.0e300}]\n"
        "        state: {counter: c, window: day}\n"
        "  big:\n    rules:\n      - {name: most, rate_limit: 9223372036854775807/minute}\n"
        "  never:\n    rules:\n      - name: none\n"
        "        conditions: [{path: state.never.c, op: lt, value: 1}]\n"
        "        state: {counter: c, window: hour}\n"
        "  infinite:\n    rules:\n      - name: inf\n"
        "        conditions: [{path: args.size, op: lte, value: .inf}]\n"
        "  words:\n    rules:\n      - name: yaml 1.2\n"
        "        conditions: [{path: args.answer, op: in, value: [yes, no, on, 0x1f]}]\n"
    )
    status, _, err = run_import(path, "-o", tmp_path / "repo")
    assert status == 3, err  # .inf has no JSON form: not converted
    assert "tools.infinite.rules[0].conditions[0]: not converted: the value Infinity" in err
    rules = data_of(tmp_path / "repo", "intercept_edges")["rules"]
    assert rules["huge"]["rate_limit"]["max"] == 2**53  # held, noted
    assert rules["big"]["rate_limit"]["max"] == 2**53
    assert rules["never"]["action"] == "deny"  # lt 1: no call fits
    assert "the limit 9223372036854775807 is held at 9007199254740992" in err
    # YAML 1.2, as Intercept's Go reads it: yes/no/on are words; 0x1f is 31.
    assert '_in(["answer"], ["yes", "no", "on", 31])' in rego_of(
        tmp_path / "repo", "intercept_edges"
    )


async def test_values_of_another_type_fail_either_way(tmp_path: Path) -> None:
    """Intercept compares "5" and 5 by their printed text; where that text may be alike
    the import denies, for eq and neq alike (never an allow it cannot be sure of)."""
    path = tmp_path / "types.yaml"
    tools = {
        "same": {"path": "args.n", "op": "eq", "value": "5"},
        "other": {"path": "args.n", "op": "neq", "value": "5"},
        "listed": {"path": "args.n", "op": "not_in", "value": [1, "x"]},
    }
    policy = {
        "version": "1",
        "tools": {t: {"rules": [{"name": t, "conditions": [c]}]} for t, c in tools.items()},
    }
    path.write_text(yaml.safe_dump(policy))
    status, _, err = await run_import_async(path, "-o", tmp_path / "repo")
    assert status == 0, err
    async with await OfflinePolicy.load(policy_paths(tmp_path / "repo")) as offline:

        def action(tool: str, n: Any) -> str:
            return offline.evaluate(offline.input_for(call("s", tool, n=n))).action

        assert [action("same", n) for n in ("5", 5, True, ["5"])] == ["allow"] + ["deny"] * 3
        # 5 may print as "5" (so neither differs); true never prints as "5".
        assert [action("other", n) for n in ("6", "5", 5, 5.0, True)] == [
            "allow",
            "deny",
            "deny",
            "deny",
            "allow",
        ]
        # A list never prints as a number or as "x"; "1" may print as 1.
        assert [action("listed", n) for n in (2, "y", True, [1], 1, "x", "1")] == [
            "allow",
            "allow",
            "allow",
            "allow",
            "deny",
            "deny",
            "deny",
        ]


# --- into a repository that has a policy already --------------------------------------------


def test_importing_into_a_started_repository_keeps_its_default_and_passes_its_tests(
    tmp_path: Path,
) -> None:
    """`mcp-policy init`, then the import into it, then `mcp-policy test` as CI runs it:
    the repository's own default rule (deny) stays, payments.yaml's allow is reported as
    not converted, and every test of the repository passes, the generated ones too."""
    repo = tmp_path / "team"
    started = subprocess.run(
        [*CLI, "init", repo], capture_output=True, text=True, timeout=300, check=False
    )
    assert started.returncode == 0, started.stderr
    status, _, err = run_import(PAYMENTS, GITHUB, "-o", repo, "--server", "pay", "--server", "gh")
    assert status == 3, err
    assert "default allow: the repository's own default rule (policies/rules.yaml) stays" in err
    assert not (repo / "policies" / "intercept_default.yaml").exists()
    tests = rego_of(repo, "intercept_payments", "_test")
    assert 'decision.rule == "catalog.default"' in tests  # the repository's deny
    tested = subprocess.run(
        [*CLI, "test", "--coverage", "--threshold", "90"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=repo,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_tool_the_repository_has_already_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "team"
    (repo / "policies").mkdir(parents=True)
    catalog = repo / "policies" / "catalog.yaml"
    catalog.write_text(
        yaml.safe_dump(
            {"mcp_policy": {"catalog": {"*": {"create_charge": {"category": "w", "risk": "low"}}}}}
        )
    )
    status, out, err = run_import(PAYMENTS, "-o", repo)
    assert status == 1 and out == "", err
    assert "create_charge" in err and "nothing written" in err
    assert "mcp-policy-import." not in err  # the repository's files, not a staged copy
    assert sorted(p.name for p in repo.rglob("*") if p.is_file()) == ["catalog.yaml"]


# --- the command line ---------------------------------------------------------------------------


def test_servers_must_match_the_files(tmp_path: Path) -> None:
    for args, message in (
        ((GITHUB, PAYMENTS), "2 files and 0 --server names"),
        ((GITHUB, PAYMENTS, "--server", "a"), "2 files and 1 --server names"),
        ((GITHUB, PAYMENTS, "--server", "*", "--server", "b"), 'no --server "*"'),
        ((GITHUB, PAYMENTS, "--server", "a", "--server", "a"), "a --server is given twice"),
        ((GITHUB, "--server", "a\nb"), "a server name is 1-256 printable characters"),
        ((GITHUB, "--server", " a"), "a server name is 1-256 printable characters"),
    ):
        status, _, err = run_import(*args, "-o", tmp_path / "repo")
        assert (status, message in err) == (1, True), err
    assert not (tmp_path / "repo").exists()


def test_output_files_are_never_replaced_without_force(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert run_import(GITHUB, "-o", repo)[0] == 3
    data = repo / "policies" / "intercept_github.yaml"
    data.write_text("# edited by hand\n")
    status, _, err = run_import(GITHUB, "-o", repo)
    assert status == 1 and f"{data}: exists" in err and "--force" in err
    assert data.read_text() == "# edited by hand\n"
    status, out, _ = run_import(GITHUB, "-o", repo, "--force")
    assert status == 3 and f"wrote {data}" in out
    assert data.read_text().startswith("# Generated by `mcp-policy import intercept`")
    assert not [p for p in repo.rglob(".*") if p.is_file()]  # no temporary file left


def test_the_command_is_wired_into_mcp_policy(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "import", "intercept", PAYMENTS, "-o", tmp_path / "repo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"{PREFIX}: wrote {tmp_path / 'repo' / 'policies' / 'intercept_default.yaml'}"
        in done.stdout
    )
    assert "everything converted" in done.stdout
    # Windows slide (said once, with every place), and each counted argument.
    assert done.stderr.count(": note: ") == 3
    assert "windows slide" in done.stderr and "; also 1 more: tools.create_refund" in done.stderr
    helped = subprocess.run([*CLI, "import", "--help"], capture_output=True, text=True, check=False)
    assert "intercept" in helped.stdout
