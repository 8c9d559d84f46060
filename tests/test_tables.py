"""Table tests in YAML (engine/authoring/tables.py): cases read with the place of everything
in them, run with the policy loaded as `serve` loads it (the real in-process OPA, the
framework's Rego with a team's directories), and every failure naming the file, the line
of the case and what differed.

Case files are written the way people and attackers write them: wrong expectations, the
call's time and proven roles, calls the service would refuse, and hostile files (bad
YAML, unknown keys, wrong types, values that are not JSON, aliases that would expand to
billions of values, Python tags, terminal escapes): each one a clear failure with its
line, never a traceback, and never a passing case.
"""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.authoring import tables
from engine.authoring.init import init
from engine.authoring.offline import OfflinePolicy
from engine.settings import PROJECT_ROOT
from tests.processes import CLI

# A rule package of the team's that reads the call's time and the principal's proof.
QUIET_HOURS = """\
package mcp.rules.quiet_hours

_admin if {
	input.principal.authenticated
	"mail-admin" in input.principal.roles
}

deny contains {"rule": "quiet_hours.weekend", "reason": "no mail on weekends"} if {
	input.tool.name == "send_email"
	time.weekday(time.parse_rfc3339_ns(input.request.time)) in {"Saturday", "Sunday"}
	not _admin
}
"""

MONDAY = "2026-12-07T09:00:00Z"
SATURDAY = "2026-12-12T09:00:00+01:00"


def call(to: str = "bob@example.com", when: str = MONDAY, principal: str = "") -> str:
    """A send_email call as a YAML flow mapping (one line)."""
    extra = f", principal: {principal}" if principal else ""
    return f"{{server: mail, tool: send_email, arguments: {{to: [{to}]}}, time: '{when}'{extra}}}"


def cases(*items: tuple[str, str, str]) -> str:
    """A case file of (name, call, expect) cases, three lines each: case k (from 0)
    starts at line 2 + 3k."""
    return "cases:\n" + "".join(
        f"  - name: {name}\n    call: {line}\n    expect: {expect}\n"
        for name, line, expect in items
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A team repository: the starter, and a package of its own that reads time and roles."""
    root = tmp_path_factory.mktemp("team")
    init(root)
    package = root / "rego" / "mcp" / "rules" / "quiet_hours"
    package.mkdir(parents=True)
    (package / "quiet_hours.rego").write_text(QUIET_HOURS)
    return root


@pytest.fixture(scope="module")
async def policy(repo: Path) -> AsyncIterator[OfflinePolicy]:
    paths = [PROJECT_ROOT / "rego", repo / "rego", repo / "policies"]
    async with await OfflinePolicy.load(paths) as loaded:
        yield loaded


def results(policy: OfflinePolicy, path: Path) -> list[tables.CaseResult]:
    """Every case of the file as `mcp-policy test` has it: the broken ones, then the run."""
    case_file = tables.read_case_file(path)
    return [*case_file.broken, *(tables.run_case(policy, case) for case in case_file.cases)]


def test_the_starter_cases_pass(policy: OfflinePolicy, repo: Path) -> None:
    outcome = results(policy, repo / "tests" / "mail.cases.yaml")
    assert len(outcome) == 4
    assert [r.problems for r in outcome] == [()] * 4
    assert outcome[0].name == "mail inside the company is limited to 20 an hour per user"
    assert outcome[0].line == 11


def test_each_failure_names_the_line_and_what_differed(
    policy: OfflinePolicy, tmp_path: Path
) -> None:
    path = tmp_path / "wrong.cases.yaml"
    path.write_text(
        cases(
            ("the right answer", call(), "{action: rate_limit, rule: catalog.rule.send_email}"),
            ("wrong action and rule", call(), "{action: allow, rule: catalog.rule.other}"),
            (
                "wrong reason",
                call("eve@elsewhere.org"),
                "{action: require_approval, reason_contains: mallory@x.org}",
            ),
            (
                "wrong limit",
                call(),
                "{action: rate_limit,"
                " rate_limits: [{max: 10, window_seconds: 3600, scope: session}]}",
            ),
            (
                "one limit too many",
                call(),
                "{rule: catalog.rule.send_email, rate_limits: [{max: 20}, {max: 20}]}",
            ),
            ("no limits at all", call(), "{action: rate_limit, rate_limits: []}"),
        )
    )
    outcome = {r.name: r for r in results(policy, path)}
    assert outcome["the right answer"].passed
    wrong = outcome["wrong action and rule"]
    assert (wrong.file, wrong.line) == (path, 5)
    assert wrong.problems == (
        "expected action allow, got rate_limit",
        "expected rule catalog.rule.other, got catalog.rule.send_email",
    )
    assert wrong.got.startswith("rate_limit by catalog.rule.send_email: ")
    assert "[limits: 20 per 3600s per user (catalog.rule.send_email)]" in wrong.got
    (reason,) = outcome["wrong reason"].problems
    assert reason.startswith("expected the reason to contain 'mallory@x.org', got '")
    assert "eve@elsewhere.org" in reason
    assert outcome["wrong limit"].problems == (
        "rate_limits[0].max: expected 10, got 20.0",
        "rate_limits[0].scope: expected session, got user",
    )
    assert outcome["one limit too many"].problems == (
        "expected 2 rate limit(s), got 1: 20 per 3600s per user (catalog.rule.send_email)",
    )
    assert outcome["no limits at all"].problems[0].startswith("expected 0 rate limit(s), got 1")


def test_the_time_and_the_proof_of_roles_reach_the_policy(
    policy: OfflinePolicy, tmp_path: Path
) -> None:
    admin = "{user_id: ana, roles: [mail-admin]"
    weekend = "{action: deny, rule: quiet_hours.weekend, reason_contains: weekends}"
    path = tmp_path / "time.cases.yaml"
    path.write_text(
        cases(
            ("a Monday", call(), "{action: rate_limit}"),
            ("a Saturday", call(when=SATURDAY), weekend),
            (
                "a proven mail admin on a Saturday",
                call(
                    when=SATURDAY,
                    principal=admin + ", authenticated: true, claims: {iss: corp}, scopes: [m]}",
                ),
                "{action: rate_limit}",
            ),
            ("a mail admin by its word", call(when=SATURDAY, principal=admin + "}"), weekend),
            (
                "vouched for by a proxy, not proven",
                call(when=SATURDAY, principal=admin + ", asserted_by: gateway}"),
                weekend,
            ),
            (
                "an unquoted YAML time with its offset",
                "{server: mail, tool: send_email, arguments: {to: [b@example.com]}, "
                "time: 2026-12-13T09:00:00Z}",
                "{rule: quiet_hours.weekend}",
            ),
        )
    )
    outcome = results(policy, path)
    assert [r.name for r in outcome if not r.passed] == []
    assert len(outcome) == 6


def test_a_call_the_service_would_refuse_fails_its_case(
    policy: OfflinePolicy, tmp_path: Path
) -> None:
    """Refused as /v1/decide refuses it (no case passes on a call no service decides),
    whatever the case expects."""
    roles = "[" + ", ".join(f"r{i}" for i in range(65)) + "]"
    path = tmp_path / "refused.cases.yaml"
    path.write_text(
        cases(
            (
                "arguments that are not an object",
                "{server: mail, tool: send_email, arguments: [bob@example.com]}",
                "{action: deny}",
            ),
            (
                "a session id with a control character",
                '{server: mail, tool: send_email, principal: {session_id: "s\\t1"}}',
                "{action: deny}",
            ),
            (
                "an agent id too long",
                f"{{server: mail, tool: send_email, principal: {{agent_id: {'a' * 300}}}}}",
                "{action: deny}",
            ),
            (
                "too many roles",
                f"{{server: mail, tool: send_email, principal: {{roles: {roles}}}}}",
                "{action: deny}",
            ),
        )
    )
    outcome = results(policy, path)
    assert len(outcome) == 4
    for result in outcome:
        (problem,) = result.problems
        assert problem.startswith("the call is not one the service would decide: "), problem
    assert "`arguments` must be a JSON object" in outcome[0].problems[0]
    assert "principal.session_id" in outcome[1].problems[0]
    assert "principal.agent_id" in outcome[2].problems[0]
    assert "principal.roles" in outcome[3].problems[0]


BILLION_LAUGHS = "cases:\n  - name: laughs\n    call:\n      server: s\n      tool: t\n" + (
    "      arguments:\n        a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(
        f"        a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
        for i in range(1, 9)
    )
    + "    expect: {action: deny}\n"
)

CASE = "cases:\n  - call: {server: s, tool: t}\n    expect: {action: deny}\n"

HOSTILE: list[tuple[str, str, int, str]] = [
    ("bad YAML", "cases:\n  - call: {server: s\n", 3, "not valid YAML, column"),
    ("two documents", CASE + "---\n" + CASE, 4, "expected a single document"),
    ("empty", "", 1, "empty; a case file has a top-level `cases:` list"),
    ("a list at the top", "- call: {}\n", 1, "the file must be a mapping, not a list"),
    ("unknown top-level key", CASE + "tests: []\n", 4, "unknown key 'tests' (allowed: cases)"),
    ("cases not a list", "cases: {a: 1}\n", 1, "cases must be a list, not a mapping"),
    ("no cases", "cases: []\n", 1, "cases: empty; a file needs at least one case"),
    ("cases left empty", "cases:\n", 1, "cases must be a list, not nothing (null)"),
    ("a case that is a string", "cases:\n  - deny everything\n", 2, "case 1 must be a mapping"),
    (
        "unknown case key",
        "cases:\n  - call: {server: s, tool: t}\n    expected: {action: deny}\n",
        3,
        "case 1: unknown key 'expected' (allowed: name, call, expect)",
    ),
    ("no expect", "cases:\n  - call: {server: s, tool: t}\n", 2, "case 1: 'expect' is missing"),
    ("no server", CASE.replace("server: s, ", ""), 2, "call: 'server' is missing"),
    ("a number as tool", CASE.replace("tool: t", "tool: 7"), 2, "call.tool must be a string"),
    (
        "unknown call key",
        CASE.replace("tool: t", "tool: t, verb: GET"),
        2,
        "call: unknown key 'verb'",
    ),
    (
        "an action that does not exist",
        CASE.replace("action: deny", "action: permit"),
        3,
        "expect.action 'permit' is not one of allow, deny, rate_limit, require_approval",
    ),
    (
        "nothing expected",
        CASE.replace("action: deny", "reason_contains: x"),
        3,
        "expect: give the action, the rule, or both",
    ),
    (
        "a key twice",
        "cases:\n  - call: {server: s, tool: t}\n    expect: {action: deny}\n"
        "    expect: {action: allow}\n",
        4,
        "case 1: 'expect' given twice (also at line 3)",
    ),
    (
        "roles as a string",
        CASE.replace("tool: t", "tool: t, principal: {roles: admin}"),
        2,
        "call.principal.roles must be a list",
    ),
    (
        "a time without its offset",
        CASE.replace("tool: t", "tool: t, time: '2026-12-07T09:00:00'"),
        2,
        "call.time must say its offset",
    ),
    (
        "a time that is not one",
        CASE.replace("tool: t", "tool: t, time: next tuesday"),
        2,
        "call.time 'next tuesday' is not an RFC 3339 time",
    ),
    (
        "a date for a time",
        CASE.replace("tool: t", "tool: t, time: 2026-12-07"),
        2,
        "call.time must be an RFC 3339 time",
    ),
    (
        "a YAML date as an argument",
        CASE.replace("tool: t", "tool: t, arguments: {when: 2026-12-07}"),
        2,
        "call.arguments.when: a YAML date is not JSON (quote it to make it a string)",
    ),
    (
        "binary as an argument",
        CASE.replace("tool: t", "tool: t, arguments: {blob: !!binary aGk=}"),
        2,
        "call.arguments.blob: a YAML binary value is not JSON",
    ),
    (
        "NaN as an argument",
        CASE.replace("tool: t", "tool: t, arguments: {n: .nan}"),
        2,
        "call.arguments.n: nan is not a JSON number",
    ),
    (
        "a number as a key",
        CASE.replace("tool: t", "tool: t, arguments: {1: one}"),
        2,
        "call.arguments: the key 1 must be a string",
    ),
    ("an anchor kept at the top", "base: &b {x: 1}\n" + CASE, 1, "unknown key 'base'"),
    (
        "a merge key inside the arguments",
        "cases:\n  - call:\n      server: s\n      tool: t\n      arguments: {<<: {x: 1}}\n"
        "    expect: {action: deny}\n",
        5,
        "call.arguments: YAML merge keys (<<) are not supported",
    ),
    (
        "a Python tag on a value",
        CASE.replace("server: s", "server: !!python/name:os.system ''"),
        2,
        "call.server: could not determine a constructor for the tag",
    ),
    (
        "a Python tag on the arguments",
        CASE.replace(
            "tool: t", "tool: t, arguments: !!python/object/apply:os.system [touch pwned]"
        ),
        2,
        "call.arguments: the YAML tag tag:yaml.org,2002:python/object/apply:os.system is not JSON",
    ),
    (
        "a custom tag on a mapping",
        CASE.replace("tool: t", "tool: t, arguments: !secret {a: 1}"),
        2,
        "call.arguments: the YAML tag !secret is not JSON",
    ),
    (
        "claims without proof",
        CASE.replace("tool: t", "tool: t, principal: {claims: {sub: x}}"),
        2,
        "call.principal.claims needs authenticated: true",
    ),
    (
        "proven and vouched for",
        CASE.replace("tool: t", "tool: t, principal: {authenticated: true, asserted_by: p}"),
        2,
        "call.principal.asserted_by is for a principal the service did not verify",
    ),
    (
        "a limit scope that does not exist",
        CASE.replace("action: deny", "action: deny, rate_limits: [{scope: galaxy}]"),
        3,
        "expect.rate_limits[0].scope 'galaxy' is not one of session, agent, user, global",
    ),
    (
        "a limit with a string max",
        CASE.replace("action: deny", "action: deny, rate_limits: [{max: ten}]"),
        3,
        "expect.rate_limits[0].max must be a number, not ten",
    ),
    ("billion laughs", BILLION_LAUGHS, 7, "more than 100000 values (aliases expand each time)"),
    (
        "nested too deeply",
        "cases:\n  - call: {server: s, tool: t, arguments: {a: " + "[" * 40 + "]" * 40 + "}}\n"
        "    expect: {action: deny}\n",
        2,
        "nested more than 32 deep",
    ),
    ("nested beyond the parser", "cases: " + "[" * 5000 + "]" * 5000 + "\n", 1, "nested too"),
]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [pytest.param(text, line, message, id=name) for name, text, line, message in HOSTILE],
)
def test_a_hostile_case_file_fails_with_its_place(
    policy: OfflinePolicy, tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = tmp_path / "hostile.cases.yaml"
    path.write_text(text)
    outcome = results(policy, path)
    assert outcome, "a hostile file must fail, not pass as empty"
    failed = [r for r in outcome if not r.passed]
    assert failed, [r.got for r in outcome]
    first = failed[0]
    assert first.file == path
    assert first.line == line or first.problems[0].startswith(f"line {line}: "), first
    assert any(message in problem for problem in first.problems), first.problems
    assert not (tmp_path / "pwned").exists()


def test_bytes_that_are_not_text_or_too_many(policy: OfflinePolicy, tmp_path: Path) -> None:
    binary = tmp_path / "binary.cases.yaml"
    binary.write_bytes(b"cases:\n  - name: caf\xe9\n")
    (broken,) = results(policy, binary)
    assert (broken.line, broken.problems) == (2, ("not UTF-8 text (byte 20)",))
    huge = tmp_path / "huge.cases.yaml"
    huge.write_bytes(b"cases:\n" + b"#" * tables.MAX_FILE_BYTES)
    (broken,) = results(policy, huge)
    assert broken.problems == (f"larger than {tables.MAX_FILE_BYTES} bytes",)
    missing = tables.read_case_file(tmp_path / "gone.cases.yaml")
    assert missing.broken[0].problems[0].startswith("cannot read: ")


def test_one_bad_case_leaves_the_others_running(policy: OfflinePolicy, tmp_path: Path) -> None:
    path = tmp_path / "mixed.cases.yaml"
    path.write_text(
        cases(
            ("fine", call(), "{action: rate_limit}"),
            ("fine", call(), "{action: rate_limit}"),
            ("broken", "{server: mail}", "{action: deny}"),
            ("also fine", call(), "{action: rate_limit}"),
        )
    )
    outcome = {(r.name, r.line): r.problems for r in results(policy, path)}
    assert outcome == {
        ("fine", 2): (),
        ("fine", 5): ("the name 'fine' is also the case's at line 2",),
        ("broken", 8): ("line 9: call: 'tool' is missing",),
        ("also fine", 11): (),
    }


def test_run_selects_cases_by_file_and_name(repo: Path) -> None:
    case_file = tables.read_case_file(repo / "tests" / "mail.cases.yaml")
    assert len(tables.select(case_file.cases, None)) == 4
    names = [c.name for c in tables.select(case_file.cases, re.compile("outside"))]
    assert names == ["mail to someone outside the company needs approval"]
    assert len(tables.select(case_file.cases, re.compile(r"mail\.cases\.yaml::"))) == 4
    assert tables.select(case_file.cases, re.compile("nothing like it")) == []


def test_mcp_policy_test_reports_hostile_files_without_a_traceback(
    repo: Path, tmp_path: Path
) -> None:
    """The command as CI runs it: each hostile file a failure with file:line, the JUnit
    report still well-formed XML, escape sequences in names shown escaped, exit 1."""
    case_dir = tmp_path / "cases"
    case_dir.mkdir()
    (case_dir / "bad.cases.yaml").write_text("cases:\n  - call: {server: s\n")
    (case_dir / "laughs.cases.yaml").write_text(BILLION_LAUGHS)
    (case_dir / "escape.cases.yaml").write_text(
        'cases:\n  - name: "\\e[2J\\x07 cleared \\0 \\uFFFE"\n'
        "    call: {server: mail, tool: send_email, arguments: {to: [bob@example.com]}}\n"
        "    expect: {action: allow}\n"
    )
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    done = subprocess.run(
        [*CLI, "test", "rego", "policies", "--cases", str(case_dir), "--junit", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=repo,
        env=env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert (
        f"FAIL  tables    {case_dir / 'bad.cases.yaml'}:3: bad.cases.yaml: not valid YAML"
        in done.stdout
    )
    assert f"{case_dir / 'laughs.cases.yaml'}:2: laughs: line 7: call.arguments.a4" in done.stdout
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "\\x1b[2J\\x07 cleared \\x00" in done.stdout
    assert "expected action allow, got rate_limit" in done.stdout
    assert done.stdout.splitlines()[-2].startswith("mcp-policy test: FAILED: 3 of ")
    root = ET.parse(report).getroot()
    tables_suites = [s for s in root if s.get("name", "").startswith("tables ")]
    assert sorted(s.get("failures") for s in tables_suites) == ["1", "1", "1"]
    names = [case.get("name", "") for suite in tables_suites for case in suite]
    assert "\ufffd[2J\ufffd cleared \ufffd \ufffd" in names
