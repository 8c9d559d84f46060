"""`mcp-policy test`: a team's policy repository tested against the installed framework, as CI
runs it.

A team keeps its own Rego and YAML in its own repository (`mcp-policy init` writes one);
the framework — the decision entry point and the rule packages in the shipped rego/ — comes
with this package. The policy under test is the one `serve` loads with the framework's
rego/ and the team's directories (`--policy FRAMEWORK/rego --policy rego --policy
policies`; the command prints it):

- the team's directories (DIR…, default rego/ and policies/ of the working directory);
- the framework's Rego modules, never its *_test.rego: the framework's own tests are run
  against the shipped data, in this project's CI, never against a team's data;
- the data: the team's own (every YAML/JSON file in its directories). The shipped
  policies/ are an example, not a base: they are used only when the team has no data file
  at all (say, a repository of Rego rules on top of the shipped catalog), as `serve` would
  load them then too.

The checks, each a test case of the report (and of the JUnit XML with --junit):

- load: the repository's layout (a team module with the id of a framework module would
  replace it; a table-test file in a policy directory would be loaded as data), then the
  policy read, checked and compiled exactly as `serve` loads it (`OfflinePolicy.load`: the
  schema with file:line, OPA's compiler, `data.mcp.load_errors`);
- check: the pinned `opa check --strict --schema` over the framework and the team's Rego
  (schema-typed reads of data.mcp_policy, unused variables and imports, …);
- rego: the pinned `opa test` over the framework's modules and the team's directories (so
  only the team's tests run, on the team's data), one case per test;
- coverage (--coverage, --threshold N): the share of the team's own Rego lines (its
  modules, not its tests, not the framework) OPA's coverage report marks covered,
  computed here from OPA's per-file covered / not-covered lines;
- tables: every `*.cases.yaml` under tests/ (or --cases), run with `OfflinePolicy` on the
  loaded policy (engine.authoring.tables).

Output and exit status fit CI: a line per failure with its place, a summary line; exit 0
when everything passed, 1 when something failed, 2 when a tool is missing (OPA, the
in-process library: the message says how to get it) or the command line is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.authoring import tables
from engine.authoring.offline import OfflinePolicy
from engine.errors import EngineError, PolicyRejected, bounded
from engine.policy.opa_process import OPA_VERSION, ToolMissing, find_opa
from engine.policy.source import MODULE_PREFIX, data_files
from engine.settings import DEFAULT_POLICY_SCHEMA, PROJECT_ROOT

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed
EXIT_USAGE = 2  # a tool is missing (the message says how to get it), or a bad command line
OPA_TIMEOUT = 600.0  # one `opa check` / `opa test` run
DEFAULT_DIRS = ("rego", "policies")
DEFAULT_CASES = "tests"
MAX_LINE = 2000  # characters of one printed line

FRAMEWORK = PROJECT_ROOT / "rego"
SHIPPED_DATA = PROJECT_ROOT / "policies"
SCHEMA_DIR = PROJECT_ROOT / "schema"

HELP = "test a policy repository against the framework: load, opa check, opa test, tables"
DESCRIPTION = """\
Test a team's policy directories (default: rego/ and policies/ here) with the framework
this package ships (its rego/ modules, not its tests; its policies/ only when the team has
no data of its own), as `serve` loads them: the load-time checks (schema, compile,
data.mcp.load_errors), `opa check --strict` with the schema, the team's Rego tests with
the pinned `opa test` (--coverage: of the team's own Rego files only), and the YAML table
tests (*.cases.yaml, default: under tests/). --junit writes a JUnit XML report.
Exit 0: all passed; 1: a failure; 2: a tool is missing or the command line is wrong.
"""


class UsageProblem(Exception):
    """The command line cannot be run as given (exit 2)."""


@dataclass
class Check:
    """One test case of the report: a failure when `failure` is set."""

    kind: str  # load | check | rego | coverage | tables: the report's column
    group: str  # the JUnit test suite
    name: str
    failure: str | None = None
    details: list[str] = field(default_factory=list)
    info: str = ""  # what a passing check says
    file: str | None = None
    line: int | None = None
    skipped: bool = False
    seconds: float = 0.0
    classname: str = ""  # JUnit's: the Rego test's package, the case's file; else the group

    @property
    def failed(self) -> bool:
        return self.failure is not None


@dataclass(frozen=True)
class Plan:
    dirs: tuple[Path, ...]  # the team's policy directories, as given
    shipped_data: Path | None  # the shipped policies/, when the team has no data
    cases: tuple[Path, ...]  # table-test files and directories
    pattern: re.Pattern[str] | None
    coverage: bool
    threshold: float | None
    junit: Path | None
    opa: str
    framework: Path = FRAMEWORK

    @property
    def policy_paths(self) -> list[Path]:
        """What `serve --policy` loads, in order."""
        return [self.framework, *self.dirs, *([self.shipped_data] if self.shipped_data else [])]


# --- the command line --------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dirs",
        nargs="*",
        type=Path,
        metavar="DIR",
        help="your policy directories, as serve --policy takes them beside the framework "
        "(default: rego/ and policies/ here, those that exist)",
    )
    parser.add_argument(
        "--cases",
        type=Path,
        action="append",
        metavar="PATH",
        help="table-test files (*.cases.yaml) or directories of them; repeat for several "
        "(default: tests/ here, when it exists)",
    )
    parser.add_argument(
        "--coverage",
        action="store_true",
        help="report how much of your own Rego (not its tests, not the framework) is covered",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="N",
        help="fail when less than N percent of your Rego lines are covered (implies --coverage)",
    )
    parser.add_argument(
        "--junit", type=Path, metavar="FILE", help="also write a JUnit XML report to FILE"
    )
    parser.add_argument(
        "--run",
        metavar="REGEX",
        help="only the Rego tests whose name matches (opa test -r) and the table cases whose "
        "FILE::NAME matches",
    )
    parser.add_argument(
        "--opa-binary",
        default="opa",
        help="the opa to run (MCP_POLICY_OPA_BINARY; default: the pinned)",
    )


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`mcp-policy test`; the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        plan = make_plan(args, Path.cwd())
        opa = find_opa(plan.opa)
    except UsageProblem as exc:
        print(f"mcp-policy test: {_printable(str(exc))}", file=err)
        return EXIT_USAGE
    except ToolMissing as exc:
        print(f"mcp-policy test: {exc.message}", file=err)
        return EXIT_USAGE
    plan = dataclasses.replace(plan, opa=opa)
    _header(plan, out, err)
    try:
        checks = asyncio.run(_loaded_checks(plan))
    except ToolMissing as exc:
        print(f"mcp-policy test: {exc.message}", file=err)
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="mcp-policy-test-") as temp:
        staged = stage_framework(plan.framework, Path(temp) / "framework")
        checks.append(opa_check(plan, staged))
        rego = opa_tests(plan, staged)
        checks += rego
        if plan.coverage:
            failed = any(check.failed for check in rego)
            checks.append(coverage(plan, staged, tests_failed=failed))
    report(checks, out)
    if plan.junit is not None:
        try:
            write_junit(checks, plan.junit)
        except OSError as exc:
            print(f"mcp-policy test: cannot write {plan.junit}: {exc.strerror or exc}", file=err)
            return EXIT_USAGE
        print(f"mcp-policy test: JUnit report in {plan.junit}", file=out)
    return EXIT_FAILED if any(check.failed for check in checks) else EXIT_OK


def make_plan(args: argparse.Namespace, cwd: Path) -> Plan:
    """What to test, from the command line; UsageProblem names what is wrong."""
    dirs = list(dict.fromkeys(args.dirs))
    if not dirs:
        dirs = [Path(name) for name in DEFAULT_DIRS if (cwd / name).is_dir()]
        if not dirs:
            raise UsageProblem(
                "no policy directories: name them (mcp-policy test DIR…) or run where rego/ or "
                "policies/ is (mcp-policy init DIR writes a starter repository)"
            )
    for path in dirs:
        if not (cwd / path).is_dir():
            what = "not a directory" if (cwd / path).exists() else "no such directory"
            raise UsageProblem(f"{path}: {what}")
    cases = list(args.cases or [])
    for path in cases:
        if not (cwd / path).exists():
            raise UsageProblem(f"--cases {path}: no such file or directory")
    if not args.cases and (cwd / DEFAULT_CASES).is_dir():
        cases = [Path(DEFAULT_CASES)]
    pattern = None
    if args.run is not None:
        try:
            pattern = re.compile(args.run)
        except re.error as exc:
            raise UsageProblem(f"--run {args.run!r}: not a regular expression ({exc})") from exc
    threshold = args.threshold
    if threshold is not None and not 0 <= threshold <= 100:
        raise UsageProblem(f"--threshold {threshold:g}: a percentage from 0 to 100")
    if args.junit is not None and not (cwd / args.junit).parent.is_dir():
        raise UsageProblem(f"--junit {args.junit}: no directory {args.junit.parent}")
    has_data = bool(data_files([cwd / path for path in dirs]))
    return Plan(
        dirs=tuple(dirs),
        shipped_data=None if has_data else SHIPPED_DATA,
        cases=tuple(cases),
        pattern=pattern,
        coverage=args.coverage or threshold is not None,
        threshold=threshold,
        junit=args.junit,
        opa=args.opa_binary,
    )


def _header(plan: Plan, out: TextIO, err: TextIO) -> None:
    version = _opa_version(plan.opa)
    shown = ", ".join(str(path) for path in plan.dirs)
    data = (
        f"the shipped {plan.shipped_data} (no data of your own)"
        if plan.shipped_data is not None
        else "yours"
    )
    print(f"mcp-policy test: {shown} on the framework in {plan.framework}; data: {data}", file=out)
    serve = ["mcp-policy", "serve"] + [
        arg for path in plan.policy_paths for arg in ("--policy", str(path))
    ]
    print(f"  serve loads the same policy with: {shlex.join(serve)}", file=out)
    if version != OPA_VERSION:
        print(
            f"mcp-policy test: warning: {plan.opa} is OPA {version or '(unknown version)'}, "
            f"not the pinned {OPA_VERSION}: its answers may differ from the service's",
            file=err,
        )


def _opa_version(opa: str) -> str | None:
    try:
        done = subprocess.run(
            [opa, "version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^Version: (\S+)", done.stdout, re.MULTILINE)
    return found[1] if found else None


# --- the repository as serve loads it, and the table tests ---------------------------------


async def _loaded_checks(plan: Plan) -> list[Check]:
    """The load checks (the layout, the policy as serve loads it) and the table cases run
    on the loaded policy; ToolMissing without the in-process library."""
    checks: list[Check] = []
    layout = layout_problems(plan)
    if layout:
        checks.append(
            Check(
                "load",
                "load",
                "the repository's files are where serve expects them",
                failure=f"{len(layout)} file(s) out of place",
                details=layout,
            )
        )
    files = [tables.read_case_file(path) for path in tables.find_case_files(plan.cases)]
    load = Check("load", "load", "the policy loads as serve loads it")
    started = time.monotonic()
    try:
        policy = await OfflinePolicy.load(plan.policy_paths, schema=DEFAULT_POLICY_SCHEMA)
    except EngineError as exc:
        if isinstance(exc, ToolMissing):
            raise
        errors = exc.errors if isinstance(exc, PolicyRejected) and exc.errors else [exc.message]
        load.failure = f"the policy is refused: {len(errors)} problem(s)"
        load.details = [_module_to_file(line, plan) for line in errors]
        load.seconds = time.monotonic() - started
        return [load, *checks, *_table_checks(None, files, plan.pattern)]
    try:
        load.seconds = time.monotonic() - started
        data = len(data_files(plan.policy_paths))
        load.info = (
            f"revision {policy.revision}, {len(policy.bundle.modules)} Rego modules, "
            f"{data} data files"
        )
        return [load, *checks, *_table_checks(policy, files, plan.pattern)]
    finally:
        await policy.close()


def layout_problems(plan: Plan) -> list[str]:
    """What in the team's directories `serve` would load other than the team means: a
    module whose id is a framework module's (or another team directory's), which would
    replace it; a table-test file, which would be loaded as data."""
    owners: dict[str, Path] = {}
    problems: list[str] = []
    for root in [plan.framework, *plan.dirs]:
        for path in sorted(root.rglob("*.rego")):
            if path.name.endswith("_test.rego") or not path.is_file():
                continue
            module_id = f"{MODULE_PREFIX}{root.name}/{path.relative_to(root).as_posix()}"
            if module_id in owners:
                problems.append(
                    f"{path}: has the module id of {owners[module_id]} ({module_id}); serve "
                    "would load only one of them: rename the file or its directory"
                )
            else:
                owners[module_id] = path
        if root == plan.framework:
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and tables.is_case_file(path):
                problems.append(
                    f"{path}: a table-test file in a policy directory, which serve would load "
                    f"as policy data: keep it outside them (in {DEFAULT_CASES}/)"
                )
    return problems


def _module_to_file(message: str, plan: Plan) -> str:
    """OPA names modules by id; put the file in their place."""
    if not message.startswith(MODULE_PREFIX):
        return message
    for root in [plan.framework, *plan.dirs]:
        prefix = f"{MODULE_PREFIX}{root.name}/"
        if not message.startswith(prefix):
            continue
        relative = message[len(prefix) :].split(":", 1)[0]
        if (root / relative).is_file():
            return str(root / relative) + message[len(prefix) + len(relative) :]
    return message


def _table_checks(
    policy: OfflinePolicy | None,
    files: Sequence[tables.CaseFile],
    pattern: re.Pattern[str] | None,
) -> list[Check]:
    checks: list[Check] = []
    for case_file in files:
        group = f"tables {case_file.path}"
        for broken in case_file.broken:
            if pattern is not None and not pattern.search(tables.case_id(broken.file, broken.name)):
                continue
            checks.append(_case_check(group, broken))
        for case in tables.select(case_file.cases, pattern):
            if policy is None:
                checks.append(
                    Check(
                        "tables",
                        group,
                        case.name,
                        file=str(case.file),
                        line=case.line,
                        classname=str(case.file),
                        skipped=True,
                        info="the policy did not load",
                    )
                )
                continue
            started = time.monotonic()
            result = tables.run_case(policy, case)
            check = _case_check(group, result)
            check.seconds = time.monotonic() - started
            checks.append(check)
    return checks


def _case_check(group: str, result: tables.CaseResult) -> Check:
    check = Check(
        "tables",
        group,
        result.name,
        file=str(result.file),
        line=result.line,
        classname=str(result.file),
    )
    if not result.passed:
        check.failure = result.problems[0]
        check.details = list(result.problems[1:])
        if result.got:
            check.details.append(f"decision: {result.got}")
    return check


# --- OPA: check, test, coverage --------------------------------------------------------------


def stage_framework(framework: Path, into: Path) -> Path:
    """A copy of the framework's Rego modules without its tests (`opa test` would run them,
    and they test the shipped data only), as `into`."""
    for path in sorted(framework.rglob("*.rego")):
        if path.is_file() and not path.name.endswith("_test.rego"):
            target = into / path.relative_to(framework)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    into.mkdir(parents=True, exist_ok=True)
    return into


def _opa(plan: Plan, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [plan.opa, *args],
        capture_output=True,
        text=True,
        timeout=OPA_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _roots(plan: Plan, staged: Path, *, data: bool = True) -> list[str]:
    shipped = [str(plan.shipped_data)] if data and plan.shipped_data is not None else []
    return [str(staged), *(str(path) for path in plan.dirs), *shipped]


def _unstaged(text: str, staged: Path, plan: Plan) -> str:
    return text.replace(str(staged), str(plan.framework))


def opa_check(plan: Plan, staged: Path) -> Check:
    """`opa check --strict --schema` over the framework's modules and the team's Rego."""
    name = "opa check --strict --schema"
    check = Check("check", "check", name)
    started = time.monotonic()
    try:
        done = _opa(
            plan,
            "check",
            "--strict",
            "--schema",
            str(SCHEMA_DIR),
            "--format",
            "json",
            *_roots(plan, staged, data=False),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        check.failure = f"opa check did not run: {exc}"
        return check
    check.seconds = time.monotonic() - started
    if done.returncode == 0:
        check.info = "no problems"
        return check
    problems = _check_errors(done.stdout) or _check_errors(done.stderr)
    if problems is None:
        problems = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    check.details = [_unstaged(line, staged, plan) for line in problems]
    check.failure = f"{len(check.details)} problem(s)"
    first = re.match(r"^(.+?):(\d+):", check.details[0]) if check.details else None
    if first:
        check.file, check.line = first[1], int(first[2])
    return check


def _check_errors(text: str) -> list[str] | None:
    """`opa check --format json`'s errors as `file:row:col: code: message` lines."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("errors"), list):
        return None
    lines = []
    for error in doc["errors"]:
        if not isinstance(error, dict):
            continue
        where = error.get("location") or {}
        place = f"{where.get('file', '')}:{where.get('row', 0)}:{where.get('col', 0)}: "
        lines.append(f"{place if where else ''}{error.get('code', '')}: {error.get('message', '')}")
    return lines


def _run_filter(plan: Plan) -> list[str]:
    return ["-r", plan.pattern.pattern] if plan.pattern is not None else []


def opa_tests(plan: Plan, staged: Path) -> list[Check]:
    """The team's Rego tests, one check each, with the pinned `opa test`."""
    try:
        done = _opa(plan, "test", *_roots(plan, staged), "--format", "json", *_run_filter(plan))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Check("rego", "rego", "opa test", failure=f"opa test did not run: {exc}")]
    try:
        results = json.loads(done.stdout)
    except ValueError:
        results = None
    if not isinstance(results, list):
        lines = [_unstaged(line, staged, plan) for line in done.stderr.splitlines() if line]
        return [
            Check(
                "rego",
                "rego",
                "opa test",
                failure="opa test could not load the Rego",
                details=lines or [f"exit status {done.returncode}"],
            )
        ]
    checks = [_test_check(result, staged, plan) for result in results if isinstance(result, dict)]
    return sorted(checks, key=lambda check: (check.file or "", check.line or 0, check.name))


def _test_check(result: dict[str, Any], staged: Path, plan: Plan) -> Check:
    package = str(result.get("package", ""))
    name = f"{package}.{result.get('name', '')}"
    where = result.get("location") or {}
    check = Check(
        "rego",
        "rego",
        name,
        file=_unstaged(str(where.get("file", "")), staged, plan) or None,
        line=int(where["row"]) if isinstance(where.get("row"), int) else None,
        skipped=bool(result.get("skip")),
        seconds=float(result.get("duration", 0) or 0) / 1e9,
        classname=package,
    )
    error = result.get("error")
    if error:
        message = error.get("message", error) if isinstance(error, dict) else error
        check.failure = f"error: {message}"
    elif result.get("fail"):
        check.failure = "FAIL"
    if check.failed:
        check.details = _printed(result.get("output"))
    return check


def _printed(output: object) -> list[str]:
    """What a test printed (OPA's JSON carries it base64-encoded)."""
    if not isinstance(output, str) or not output:
        return []
    try:
        text = base64.b64decode(output, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        text = output
    return [f"printed: {line}" for line in text.splitlines()]


def coverage(plan: Plan, staged: Path, *, tests_failed: bool) -> Check:
    """The team's own Rego lines covered by its tests, against --threshold."""
    name = "coverage of your Rego"
    if plan.threshold is not None:
        name += f" (at least {plan.threshold:g}%)"
    check = Check("coverage", "coverage", name)
    if tests_failed:
        check.failure = "not measured: the Rego tests fail"
        return check
    started = time.monotonic()
    try:
        done = _opa(
            plan,
            "test",
            *_roots(plan, staged),
            "--coverage",
            "--format",
            "json",
            *_run_filter(plan),
        )
        report_doc = json.loads(done.stdout)
        files = report_doc["files"] if isinstance(report_doc, dict) else None
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        check.failure = f"OPA's coverage report could not be read: {exc}"
        return check
    check.seconds = time.monotonic() - started
    if not isinstance(files, dict):
        check.failure = "OPA's coverage report has no files"
        return check
    mine = {path: info for path, info in files.items() if _is_team_module(path, plan)}
    covered = sum(_lines(info, "covered_lines") for info in mine.values())
    total = covered + sum(_lines(info, "not_covered_lines") for info in mine.values())
    check.details = [
        f"{path}: not covered: lines {_rows(info.get('not_covered'))}"
        for path, info in sorted(mine.items())
        if isinstance(info, dict) and _lines(info, "not_covered_lines")
    ]
    if total == 0:
        check.info = "no Rego lines of your own to cover"
        return check
    percent = 100.0 * covered / total
    check.info = f"{percent:.1f}% ({covered} of {total} lines)"
    if plan.threshold is not None and covered * 100 < plan.threshold * total:
        check.failure = f"{check.info} is below {plan.threshold:g}%"
    return check


def _is_team_module(path: str, plan: Plan) -> bool:
    if path.endswith("_test.rego"):
        return False
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in plan.dirs)


def _lines(info: object, key: str) -> int:
    value = info.get(key, 0) if isinstance(info, dict) else 0
    return value if isinstance(value, int) and value >= 0 else 0


def _rows(ranges: object) -> str:
    """OPA's not-covered ranges as `3, 7-9`."""
    rows: set[int] = set()
    for item in ranges if isinstance(ranges, list) else []:
        try:
            start, end = int(item["start"]["row"]), int(item["end"]["row"])
        except (KeyError, TypeError, ValueError):
            continue
        rows.update(range(start, min(end, start + 10_000) + 1))
    spans: list[str] = []
    for row in sorted(rows):
        if spans and row - 1 in rows:
            spans[-1] = f"{spans[-1].split('-')[0]}-{row}"
        else:
            spans.append(str(row))
    return ", ".join(spans)


# --- the report ------------------------------------------------------------------------------

_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _printable(text: str) -> str:
    """One line for a terminal or a CI log: control characters (a case name's escape
    sequences) shown escaped, not acted on; long lines cut."""
    shown = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}", text.replace("\n", "\\n"))
    return bounded(shown, MAX_LINE)


def _place(check: Check) -> str:
    if check.file is None:
        return ""
    return f"{check.file}:{check.line}" if check.line is not None else check.file


def report(checks: Sequence[Check], out: TextIO) -> None:
    """A line per failure (with its details indented), the passes counted per suite."""
    for kind in ("load", "check", "rego", "coverage", "tables"):
        mine = [check for check in checks if check.kind == kind]
        if kind == "rego" and not mine:
            print(f"PASS  {kind:<9} no Rego tests of your own", file=out)
        for group in dict.fromkeys(check.group for check in mine):
            _report_group(kind, [check for check in mine if check.group == group], out)
    failed = sum(check.failed for check in checks)
    ran = sum(not check.skipped for check in checks)
    if failed:
        print(f"mcp-policy test: FAILED: {failed} of {ran} checks failed", file=out)
    else:
        print(f"mcp-policy test: ok ({ran} checks passed)", file=out)


def _report_group(kind: str, checks: list[Check], out: TextIO) -> None:
    passed = [check for check in checks if not check.failed and not check.skipped]
    skipped = [check for check in checks if check.skipped]
    if kind in ("rego", "tables") and passed:
        what = "tests" if kind == "rego" else "cases"
        where = "" if kind == "rego" else f"{checks[0].group.removeprefix('tables ')}: "
        print(_printable(f"PASS  {kind:<9} {where}{len(passed)} {what} passed"), file=out)
    elif passed:
        for check in passed:
            info = f": {check.info}" if check.info else ""
            print(_printable(f"PASS  {kind:<9} {check.name}{info}"), file=out)
    if skipped:
        where = checks[0].group.removeprefix("tables ") + ": " if kind == "tables" else ""
        why = f": {skipped[0].info}" if skipped[0].info else ""
        print(_printable(f"SKIP  {kind:<9} {where}{len(skipped)} not run{why}"), file=out)
    for check in checks:
        if not check.failed:
            continue
        place = _place(check)
        line = f"FAIL  {kind:<9} {place + ': ' if place else ''}{check.name}: {check.failure}"
        print(_printable(line), file=out)
        for detail in check.details:
            print(_printable(f"{'':16}{detail}"), file=out)


# JUnit XML (the de facto schema CI systems read: testsuites > testsuite > testcase, with
# failure and skipped children). XML 1.0 cannot carry every character: the others become
# U+FFFD.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def junit(checks: Iterable[Check]) -> ET.ElementTree[ET.Element]:
    checks = list(checks)
    root = ET.Element("testsuites", name="mcp-policy test")
    _counts(root, checks)
    for group in dict.fromkeys(check.group for check in checks):
        mine = [check for check in checks if check.group == group]
        suite = ET.SubElement(root, "testsuite", name=_xml(group))
        _counts(suite, mine)
        for check in mine:
            case = ET.SubElement(
                suite,
                "testcase",
                name=_xml(check.name),
                classname=_xml(check.classname or f"mcp-policy.{check.group}"),
                time=f"{check.seconds:.3f}",
            )
            if check.file is not None:
                case.set("file", _xml(check.file))
            if check.line is not None:
                case.set("line", str(check.line))
            if check.failed:
                failure = ET.SubElement(
                    case, "failure", message=_xml(bounded(check.failure or "", MAX_LINE))
                )
                place = _place(check)
                failure.text = _xml(
                    "\n".join(
                        [f"{place}: {check.failure}" if place else str(check.failure)]
                        + check.details
                    )
                )
            elif check.skipped:
                ET.SubElement(case, "skipped", message=_xml(check.info))
    return ET.ElementTree(root)


def _counts(element: ET.Element, checks: Sequence[Check]) -> None:
    element.set("tests", str(len(checks)))
    element.set("failures", str(sum(check.failed for check in checks)))
    element.set("errors", "0")
    element.set("skipped", str(sum(check.skipped and not check.failed for check in checks)))
    element.set("time", f"{sum(check.seconds for check in checks):.3f}")


def write_junit(checks: Iterable[Check], path: Path) -> None:
    """The report, written whole or not at all (beside the target, then renamed)."""
    tree = junit(checks)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as handle:
            tree.write(handle, encoding="utf-8", xml_declaration=True)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
