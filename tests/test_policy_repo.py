"""A team's policy repository: `mcp-policy init` writes one, `mcp-policy test` tests it
against the framework this package ships, and the CI files it writes run as written.

Everything is real: the CLI in a subprocess, the pinned OPA (`opa check`, `opa test`), the
in-process OPA library for the load checks and table tests, the checkout's Regal for the
starter's lint. A broken repository — a failing test, data the schema refuses, Rego that
does not compile or is not --strict clean, coverage under the threshold, a table case that
differs, files where serve would misread them — fails with each problem at its place, exit
1, never a traceback; a missing tool or a bad command line is exit 2, in one line.

The CI files are run as written from a wheel of this checkout installed into a fresh
virtualenv, in the initialised repository (the only files on disk besides the installed
package): every `run:` step of the GitHub workflow and the `script:` of the GitLab job,
each in bash with -e and pipefail as those runners do. One line is replaced: the `pip
install "mcp-policy-engine==…"` by the install of the local wheel (with the checkout's
dependencies, so nothing is fetched). What the CI providers set up themselves is stood in
for here: Python (GitHub's setup-python, GitLab's before_script: the virtualenv on PATH)
and Go (setup-go, the golang image: this machine's Go on PATH, GOBIN on PATH, and the
module cache as the Go proxy, so `go install` and `go build` fetch nothing). Then a broken
rule makes the same commands fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import __version__
from engine.authoring.init import PYTHON_VERSION, go_version, templates
from engine.policy.opa_process import CHECKOUT_OPA, OPA_VERSION
from engine.settings import PROJECT_ROOT
from tests.processes import CLI
from tests.test_install import SOURCES

REGAL = PROJECT_ROOT / ".tools" / "bin" / "regal"
OUTBOUND = Path("rego/mcp/rules/outbound_mail/outbound_mail.rego")
STARTER_FILES = [
    ".github/workflows/policy.yml",
    ".gitlab-ci.yml",
    ".regal/config.yaml",
    "README.md",
    "policies/catalog.yaml",
    "policies/rules.yaml",
    "rego/mcp/rules/outbound_mail/outbound_mail.rego",
    "rego/mcp/rules/outbound_mail/outbound_mail_test.rego",
    "tests/mail.cases.yaml",
]
TEAM_TESTS = {
    "test_mail_inside_the_company_needs_nothing",
    "test_mail_outside_the_company_needs_approval",
    "test_recipients_must_be_a_list_of_addresses",
    "test_other_tools_and_servers_are_left_alone",
}
CI_TEST_COMMAND = "mcp-policy test --coverage --threshold 90 --junit report.xml"
PIP_LINE = re.compile(r'^pip install "mcp-policy-engine==([^"]+)"$', re.MULTILINE)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without MCP_POLICY_* settings (a user's defaults)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    return {**env, **extra}


def mcp_policy(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
        env=env or clean_env(),
    )


def starter(tmp_path: Path, name: str = "repo") -> Path:
    repo = tmp_path / name
    done = mcp_policy("init", repo, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return repo


def junit_cases(path: Path) -> list[dict[str, Any]]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    return [
        {
            "suite": suite.get("name"),
            "name": case.get("name"),
            "classname": case.get("classname"),
            "file": case.get("file"),
            "line": case.get("line"),
            "failure": (failure.get("message") if (failure := case.find("failure")) is not None
                        else None),
            "skipped": case.find("skipped") is not None,
        }
        for suite in root
        for case in suite
    ]  # fmt: skip


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


# --- init ------------------------------------------------------------------------------------


def test_init_writes_a_starter_repository_that_passes_its_own_ci_checks(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    done = mcp_policy("init", repo, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"mcp-policy init: wrote 9 files to {repo}:"
    written = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert written == STARTER_FILES
    assert sorted(relative.as_posix() for _, relative in templates()) == STARTER_FILES
    # The starter's Rego: opa fmt clean, Regal clean (its own config), every line covered.
    fmt = subprocess.run(
        [CHECKOUT_OPA, "fmt", "--list", "--fail", "rego"], cwd=repo, capture_output=True, text=True
    )
    assert (fmt.returncode, fmt.stdout) == (0, ""), fmt.stdout + fmt.stderr
    assert REGAL.is_file(), "make setup builds Regal into .tools/bin"
    lint = subprocess.run([REGAL, "lint", "rego"], cwd=repo, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "No violations found" in lint.stdout
    tested = mcp_policy(
        "test", "--coverage", "--threshold", "100", "--junit", "report.xml", cwd=repo
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    lines = tested.stdout.splitlines()
    framework = PROJECT_ROOT / "rego"
    assert (
        lines[0] == f"mcp-policy test: rego, policies on the framework in {framework}; data: yours"
    )
    assert lines[1] == (
        f"  serve loads the same policy with: mcp-policy serve --policy {PROJECT_ROOT / 'rego'} "
        "--policy rego --policy policies"
    )
    assert "PASS  check     opa check --strict --schema: no problems" in lines
    assert "PASS  rego      4 tests passed" in lines
    assert "PASS  coverage  coverage of your Rego (at least 100%): 100.0% (32 of 32 lines)" in lines
    assert "PASS  tables    tests/mail.cases.yaml: 4 cases passed" in lines
    assert lines[-2] == "mcp-policy test: ok (11 checks passed)"
    cases = junit_cases(repo / "report.xml")
    assert not [case for case in cases if case["failure"] or case["skipped"]]
    rego = [case for case in cases if case["suite"] == "rego"]
    # Only the team's tests ran: none of the framework's own (they test the shipped data).
    assert {case["name"].rsplit(".", 1)[1] for case in rego} == TEAM_TESTS
    assert {case["classname"] for case in rego} == {"data.mcp.rules.outbound_mail_test"}
    assert {case["file"] for case in rego} == {
        "rego/mcp/rules/outbound_mail/outbound_mail_test.rego"
    }
    table = [case for case in cases if case["suite"] == "tables tests/mail.cases.yaml"]
    assert [(case["line"], case["classname"]) for case in table] == [
        ("11", "tests/mail.cases.yaml"),
        ("23", "tests/mail.cases.yaml"),
        ("35", "tests/mail.cases.yaml"),
        ("45", "tests/mail.cases.yaml"),
    ]


def test_the_ci_files_install_the_package_by_name_and_run_the_tests(tmp_path: Path) -> None:
    repo = starter(tmp_path)
    github = yaml.safe_load((repo / ".github/workflows/policy.yml").read_text())
    gitlab = yaml.safe_load((repo / ".gitlab-ci.yml").read_text())
    steps = github["jobs"]["test"]["steps"]
    uses = {step["uses"].split("@")[0]: step.get("with", {}) for step in steps if "uses" in step}
    assert uses["actions/setup-python"] == {"python-version": PYTHON_VERSION}
    assert uses["actions/setup-go"]["go-version"] == go_version()
    assert gitlab["policy"]["image"] == f"golang:{go_version()}"
    assert gitlab["policy"]["artifacts"]["reports"]["junit"] == "report.xml"
    for script in ("\n".join(step["run"] for step in steps if "run" in step),
                   "\n".join(gitlab["policy"]["script"])):  # fmt: skip
        assert PIP_LINE.findall(script) == [__version__]  # by name, this engine's version
        assert f"go install github.com/open-policy-agent/opa@v{OPA_VERSION}\n" in script
        assert script.rstrip().endswith(CI_TEST_COMMAND) or f"\n{CI_TEST_COMMAND}" in script
        assert "://" not in script and "--index-url" not in script and "-i " not in script
    for path in (".github/workflows/policy.yml", ".gitlab-ci.yml", "README.md"):
        assert "://" not in (repo / path).read_text(), path


def test_init_never_overwrites_and_names_what_is_in_the_way(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "policies").mkdir(parents=True)
    (repo / "policies" / "rules.yaml").write_text("ours\n")
    (repo / "tests").mkdir()
    outside = tmp_path / "outside.yaml"
    (repo / "tests" / "mail.cases.yaml").symlink_to(outside)  # dangling
    (repo / ".github").write_text("a file where a directory goes\n")
    (tmp_path / "elsewhere").mkdir()
    (repo / "rego").symlink_to(tmp_path / "elsewhere")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    done = mcp_policy("init", repo, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"mcp-policy init: nothing written to {repo}:",
        f"  {repo / '.github'}: not a directory",
        f"  {repo / 'policies/rules.yaml'}: exists (init never overwrites)",
        f"  {repo / 'rego'}: a symlink (init writes only into real directories)",
        f"  {repo / 'tests/mail.cases.yaml'}: exists (init never overwrites)",
    ]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (repo / "policies" / "rules.yaml").read_text() == "ours\n"
    assert not outside.exists() and not any((tmp_path / "elsewhere").iterdir())
    # Into an empty directory that exists, or beside other files, it writes.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "NOTES").write_text("kept\n")
    assert mcp_policy("init", tmp_path / "empty", cwd=tmp_path).returncode == 0
    assert (tmp_path / "empty" / "NOTES").read_text() == "kept\n"
    again = mcp_policy("init", tmp_path / "empty", cwd=tmp_path)
    assert again.returncode == 1
    assert len(again.stderr.splitlines()) == 1 + len(STARTER_FILES)


# --- test: what fails, and where -------------------------------------------------------------

UNTESTED_RULE = """
# METADATA
# title: Allow contributions
# description: outbound_mail.to_self
# scope: document
allow contains {"rule": "outbound_mail.to_self"} if {
	_applies
	count(input.tool.arguments.to) == 1
	input.tool.arguments.to[0] == input.principal.user_id
	not input.tool.arguments.cc
	not input.tool.arguments.bcc
}
"""


def _failing_test(repo: Path) -> None:
    rewrite(repo / OUTBOUND, '{"example.com"}', '{"example.org"}')


def _schema(repo: Path) -> None:
    rewrite(repo / "policies/rules.yaml", "max: 20", "max: 0")


def _syntax(repo: Path) -> None:
    rewrite(repo / OUTBOUND, "_applies if {", "_applies if {{")


def _strict(repo: Path) -> None:
    rewrite(
        repo / OUTBOUND,
        "package mcp.rules.outbound_mail\n",
        "package mcp.rules.outbound_mail\n\nimport data.nothing\n",
    )


def _untested(repo: Path) -> None:
    with (repo / OUTBOUND).open("a") as handle:
        handle.write(UNTESTED_RULE)


def _case(repo: Path) -> None:
    rewrite(repo / "tests/mail.cases.yaml", "action: require_approval", "action: allow")


def _cases_in_policies(repo: Path) -> None:
    shutil.copy(repo / "tests/mail.cases.yaml", repo / "policies/mail.cases.yaml")


def _framework_module(repo: Path) -> None:
    (repo / "rego/mcp/decision.rego").write_text("package mcp\n\ndecision := {}\n")


REFUSED = "FAIL  load      the policy loads as serve loads it: the policy is refused: 1 problem(s)"
BROKEN = {
    "a failing Rego test": (
        _failing_test,
        [
            "FAIL  rego      rego/mcp/rules/outbound_mail/outbound_mail_test.rego:12: "
            "data.mcp.rules.outbound_mail_test.test_mail_inside_the_company_needs_nothing: FAIL",
            "FAIL  coverage  coverage of your Rego (at least 90%): not measured: the Rego tests "
            "fail",
            "FAIL  tables    tests/mail.cases.yaml:11: mail inside the company is limited to 20 an "
            "hour per user: expected action rate_limit, got require_approval",
        ],
    ),
    "data the schema refuses": (
        _schema,
        [
            REFUSED,
            "                policies/rules.yaml:25:14: data.mcp_policy.rules.send_email.rate_limit"
            ".max: 0 is less than the minimum of 1",
            "SKIP  tables    tests/mail.cases.yaml: 4 not run: the policy did not load",
        ],
    ),
    "Rego that does not parse": (
        _syntax,
        [
            REFUSED,
            "FAIL  rego      opa test: opa test could not load the Rego",
        ],
    ),
    "Rego that is not --strict clean": (
        _strict,
        [
            "FAIL  check     rego/mcp/rules/outbound_mail/outbound_mail.rego:17: "
            "opa check --strict --schema: 1 problem(s)",
            "                rego/mcp/rules/outbound_mail/outbound_mail.rego:17:1: "
            "rego_compile_error: import data.nothing unused",
        ],
    ),
    "coverage under the threshold": (
        _untested,
        [
            "PASS  rego      4 tests passed",
            "FAIL  coverage  coverage of your Rego (at least 90%): 84.2% (32 of 38 lines) "
            "is below 90%",
            "                rego/mcp/rules/outbound_mail/outbound_mail.rego: not covered: lines "
            "76-81",
        ],
    ),
    "a table case that differs": (
        _case,
        [
            "FAIL  tables    tests/mail.cases.yaml:23: mail to someone outside the company needs "
            "approval: expected action allow, got require_approval",
        ],
    ),
    "a table-test file in a policy directory": (
        _cases_in_policies,
        [
            "FAIL  load      the repository's files are where serve expects them: 1 file(s) out "
            "of place",
            "                policies/mail.cases.yaml: a table-test file in a policy directory, "
            "which serve would load as policy data: keep it outside them (in tests/)",
        ],
    ),
    "a module with a framework module's id": (
        _framework_module,
        [
            "                rego/mcp/decision.rego: has the module id of "
            f"{PROJECT_ROOT / 'rego/mcp/decision.rego'} "
            "(mcp-policy/rego/mcp/decision.rego); serve would load only one of them: rename the "
            "file or its directory",
        ],
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_repository_fails_with_each_problem_at_its_place(
    tmp_path: Path, broken: str
) -> None:
    repo = starter(tmp_path)
    edit, expected = BROKEN[broken]
    edit(repo)
    done = mcp_policy("test", "--coverage", "--threshold", "90", "--junit", "report.xml", cwd=repo)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for line in expected:
        assert line in lines, f"{line!r} not in:\n{done.stdout}"
    failures = [case for case in junit_cases(repo / "report.xml") if case["failure"]]
    assert failures
    assert re.match(r"^mcp-policy test: FAILED: \d+ of \d+ checks failed$", lines[-2])


def test_usage_problems_and_missing_tools_exit_2_in_one_line(tmp_path: Path) -> None:
    repo = starter(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = [
        (empty, (), {}, "mcp-policy test: no policy directories: name them"),
        (repo, ("nowhere",), {}, "mcp-policy test: nowhere: no such directory"),
        (repo, ("README.md",), {}, "mcp-policy test: README.md: not a directory"),
        (repo, ("--cases", "nowhere"), {}, "mcp-policy test: --cases nowhere: no such file"),
        (repo, ("--run", "(unclosed"), {}, "mcp-policy test: --run '(unclosed': not a regular"),
        (repo, ("--threshold", "150"), {}, "mcp-policy test: --threshold 150: a percentage"),
        (repo, ("--junit", "no/dir/r.xml"), {}, "mcp-policy test: --junit no/dir/r.xml: no dir"),
        (
            repo,
            (),
            {"MCP_POLICY_OPA_BINARY": str(tmp_path / "no-opa")},
            "mcp-policy test: OPA not found (",
        ),
        (
            repo,
            (),
            {"MCP_POLICY_OPA_LIBRARY": str(tmp_path / "no-library.so")},
            f"mcp-policy test: MCP_POLICY_OPA_LIBRARY={tmp_path / 'no-library.so'}: no such file",
        ),
    ]
    for cwd, args, env, message in problems:
        done = mcp_policy("test", *args, cwd=cwd, env=clean_env(**env))
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stderr.splitlines()[-1].startswith(message), (message, done.stderr)
    assert not (repo / "no").exists()


def test_a_bad_flag_is_a_usage_error(tmp_path: Path) -> None:
    done = mcp_policy("test", "--threshold", "ninety", cwd=tmp_path)
    assert done.returncode == 2
    assert "argument --threshold: invalid float value: 'ninety'" in done.stderr


def test_without_data_of_its_own_the_shipped_data_is_used(tmp_path: Path) -> None:
    """A repository of Rego only, on top of the shipped catalog and rules."""
    repo = tmp_path / "repo"
    package = repo / "rego" / "mcp" / "rules" / "no_force"
    package.mkdir(parents=True)
    (package / "no_force.rego").write_text(
        "package mcp.rules.no_force\n\n"
        'deny contains {"rule": "no_force.forbidden", "reason": "never force"} if {\n'
        '\tinput.tool.name == "copy_image_set"\n'
        "\tinput.tool.arguments.force == true\n"
        "}\n"
    )
    (package / "no_force_test.rego").write_text(
        "package mcp.rules.no_force_test\n\n"
        "import data.mcp.rules.no_force\n\n"
        "test_force_is_denied if {\n"
        '\tcount(no_force.deny) == 1 with input as {"tool": {"name": "copy_image_set", '
        '"arguments": {"force": true}}}\n'
        "}\n"
    )
    (repo / "tests").mkdir()
    (repo / "tests" / "copy.cases.yaml").write_text(
        "cases:\n"
        "  - name: a plain copy passes the shipped rule\n"
        "    call:\n"
        "      server: awslabs.healthimaging-mcp-server\n"
        "      tool: copy_image_set\n"
        "      arguments:\n"
        "        datastore_id: 0123456789abcdef0123456789abcdef\n"
        "        source_image_set_id: 00112233445566778899aabbccddeeff\n"
        "        copy_image_set_information: {sourceImageSet: {latestVersionId: '1'}}\n"
        "    expect: {action: rate_limit, rule: catalog.rule.copy_image_set}\n"
    )
    done = mcp_policy("test", "--coverage", "--threshold", "100", cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    shipped = PROJECT_ROOT / "policies"
    assert lines[0].endswith(f"; data: the shipped {shipped} (no data of your own)")
    assert lines[1].endswith(f"--policy rego --policy {shipped}")
    assert "PASS  rego      1 tests passed" in lines
    assert "PASS  tables    tests/copy.cases.yaml: 1 cases passed" in lines


def test_run_selects_rego_tests_and_table_cases(tmp_path: Path) -> None:
    repo = starter(tmp_path)
    done = mcp_policy("test", "--run", "outside", "--junit", "report.xml", cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(
        case["name"] for case in junit_cases(repo / "report.xml") if case["suite"] != "load"
    )
    assert names == [
        "data.mcp.rules.outbound_mail_test.test_mail_outside_the_company_needs_approval",
        "mail to someone outside the company needs approval",
        "opa check --strict --schema",
    ]


# --- the CI files, as written, from an installed package ----------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built as `pip install .` builds it (tests/test_install.py)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in SOURCES:
        path = PROJECT_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel",
         "--no-deps", "--no-build-isolation", str(source), "-w", str(root)],
        capture_output=True, text=True, timeout=300, check=False, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (built,) = root.glob("mcp_policy_engine-*.whl")
    return built


def go_env() -> dict[str, str]:
    """Go as a CI runner has it set up, working from this machine's module cache only."""
    go = shutil.which("go")
    assert go is not None, "Go builds OPA and the engine's library (make setup needs it too)"
    found = json.loads(
        subprocess.run(
            [go, "env", "-json", "GOMODCACHE", "GOCACHE", "GOROOT"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return {
        "GOMODCACHE": found["GOMODCACHE"],
        "GOCACHE": found["GOCACHE"],
        "GOPROXY": (Path(found["GOMODCACHE"]) / "cache" / "download").as_uri(),
        "GOFLAGS": "-buildvcs=false",
        "GOTOOLCHAIN": "local",
        "GOROOT_BIN": str(Path(found["GOROOT"]) / "bin"),
    }


def ci_scripts(repo: Path, provider: str) -> list[str]:
    """The shell scripts of the CI file, as the runner runs them: each `run:` step (GitHub),
    or the job's `script:` lines in one shell (GitLab)."""
    if provider == "github":
        steps = yaml.safe_load((repo / ".github/workflows/policy.yml").read_text())["jobs"]["test"]
        return [step["run"] for step in steps["steps"] if "run" in step]
    job = yaml.safe_load((repo / ".gitlab-ci.yml").read_text())["policy"]
    return ["\n".join(job["script"])]


def run_ci(
    repo: Path, provider: str, wheel: Path, venv: Path
) -> list[subprocess.CompletedProcess[str]]:
    """Run the CI file's scripts in `repo` until one fails; the pip install of the package
    replaced by the install of `wheel` into `venv` (and nothing else changed)."""
    site = Path(
        subprocess.run(
            [venv / "bin/python", "-c", "import sysconfig as s; print(s.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    local_install = (
        f"{sys.executable} -m pip --disable-pip-version-check -q --python {venv / 'bin/python'} "
        f"install --no-deps --no-index --force-reinstall {wheel}"
        # The dependencies: the checkout venv's, added after the install (test_install.py).
        f" && echo {sysconfig.get_paths()['purelib']} > {site / 'checkout_dependencies.pth'}"
    )
    go = go_env()
    gobin = venv.parent / "gobin"
    env = {
        "HOME": os.environ["HOME"],
        "LANG": "C.UTF-8",
        "PATH": f"{venv / 'bin'}:{gobin}:{go.pop('GOROOT_BIN')}:/usr/bin:/bin",
        "GOBIN": str(gobin),
        **go,
    }
    scripts = ci_scripts(repo, provider)
    assert sum(len(PIP_LINE.findall(script)) for script in scripts) == 1
    done = []
    for script in scripts:
        ran = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
             PIP_LINE.sub(lambda _: local_install, script)],
            capture_output=True, text=True, timeout=600, check=False, cwd=repo, env=env,
        )  # fmt: skip
        done.append(ran)
        if ran.returncode != 0:
            break
    return done


@pytest.mark.parametrize("provider", ["github", "gitlab"])
def test_the_ci_files_run_as_written_from_an_installed_package(
    tmp_path: Path, wheel: Path, provider: str
) -> None:
    repo = starter(tmp_path)
    venv = tmp_path / "env" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    done = run_ci(repo, provider, wheel, venv)
    output = "\n".join(d.stdout + d.stderr for d in done)
    assert [d.returncode for d in done] == [0] * len(ci_scripts(repo, provider)), output
    installed = next(venv.glob("lib/python*/site-packages"))
    assert f"on the framework in {installed / 'engine/_data/rego'}; data: yours" in output
    assert str(PROJECT_ROOT / "rego") not in output  # the installed framework, not ours
    assert (installed / "engine/policy/native/libmcppolicy_opa.so").is_file()
    assert "mcp-policy test: ok (11 checks passed)" in output
    cases = junit_cases(repo / "report.xml")
    assert len(cases) == 11 and not [case for case in cases if case["failure"]]
    # The installed package carries the starter (package data): its init writes the same.
    again = subprocess.run(
        [venv / "bin/mcp-policy", "init", "again"], cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    for name in STARTER_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (repo / name).read_bytes(), name

    _failing_test(repo)  # a broken rule: the same commands now fail, at the test
    (repo / "report.xml").unlink()
    done = run_ci(repo, provider, wheel, venv)
    output = "\n".join(d.stdout + d.stderr for d in done)
    assert done[-1].returncode == 1, output
    assert CI_TEST_COMMAND in ci_scripts(repo, provider)[len(done) - 1]
    assert "mcp-policy test: FAILED: 4 of 11 checks failed" in done[-1].stdout
    failed = {case["name"] for case in junit_cases(repo / "report.xml") if case["failure"]}
    assert "data.mcp.rules.outbound_mail_test.test_mail_inside_the_company_needs_nothing" in failed
