"""The package as a user installs it: a wheel built from this checkout, installed (not
editable) into a fresh virtualenv, and run from a directory that is not the checkout.

The wheel is built the way `pip install .` builds it (setuptools through pip), from a copy
of the checkout's sources so that setuptools' build/ and egg-info stay out of the
checkout; it is installed with `--no-deps` into a venv made by `python -m venv`, whose
dependencies are the checkout venv's own (one .pth line, added after the install: it adds
that site-packages to sys.path without running its .pth files, so the checkout's editable
install stays out). Nothing is fetched, and the installed `engine` is the only one the
venv can import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.policy.inprocess import CHECKOUT_LIBRARY, LIBRARY_NAME
from engine.policy.opa_process import CHECKOUT_OPA, OPA_VERSION
from engine.policy.source import read_bundle
from engine.settings import PROJECT_ROOT
from tests.conftest import copy_call

SOURCES = (
    "pyproject.toml",
    "README.md",
    "engine",
    "mcppolicy",
    "buf",
    "rego",
    "policies",
    "schema",
)
SHIPPED_REVISION = read_bundle([PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"]).revision


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site: Path  # the venv's site-packages
    elsewhere: Path  # a directory that is not the checkout, to run commands from

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "mcp-policy"

    def run(
        self, *args: str, env: dict[str, str] | None = None, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        # No MCP_POLICY_* of the test run, no .tools/bin on PATH, no PYTHONPATH.
        base = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
        base.pop("PYTHONPATH", None)
        base["PATH"] = "/usr/bin:/bin"
        base["XDG_STATE_HOME"] = str(self.elsewhere / "state")
        return subprocess.run(
            [str(self.command), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=self.elsewhere,
            env={**base, **(env or {})},
        )


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    for name in SOURCES:
        path = PROJECT_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(root), cwd=root)
    (wheel,) = root.glob("mcp_policy_engine-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel), cwd=root)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "checkout_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return Installed(wheel, venv, site, elsewhere)


def test_the_wheel_holds_the_code_the_shipped_policy_and_the_native_source(
    installed: Installed,
) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {
        path.relative_to(PROJECT_ROOT).as_posix()
        for path in (PROJECT_ROOT / "engine").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(modules - names)
    assert not missing, f"not in the wheel (a package missing in pyproject.toml?): {missing}"
    for top in ("rego", "policies", "schema"):
        shipped = {
            f"engine/_data/{path.relative_to(PROJECT_ROOT).as_posix()}"
            for path in (PROJECT_ROOT / top).rglob("*")
            if path.is_file()
        }
        assert shipped and shipped <= names, sorted(shipped - names)
    # The tests go along, so `opa test` runs on the installed copy (the service skips them).
    assert "engine/_data/rego/mcp/decision_test.rego" in names
    native = {"evaluator.go", "go.mod", "go.sum"}
    assert {f"engine/policy/native/{name}" for name in native} <= names
    assert "mcppolicy/v1/decision_pb2.py" in names
    assert "buf/validate/validate_pb2.py" in names


def test_the_venv_imports_the_installed_copy_not_the_checkout(installed: Installed) -> None:
    done = subprocess.run(
        [
            str(installed.venv / "bin" / "python"),
            "-c",
            "import engine, engine.settings as s; print(engine.__file__); print(s.PROJECT_ROOT)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=installed.elsewhere,
    )
    module, data = done.stdout.split()
    assert Path(module) == installed.site / "engine" / "__init__.py"
    assert Path(data) == installed.site / "engine" / "_data"


def test_validate_with_no_paths_checks_the_packaged_policy(installed: Installed) -> None:
    done = installed.run("validate", env={"MCP_POLICY_OPA_BINARY": str(CHECKOUT_OPA)})
    assert done.returncode == 0, done.stdout + done.stderr
    modules = [
        p for p in (PROJECT_ROOT / "rego").rglob("*.rego") if not p.name.endswith("_test.rego")
    ]
    data_files = list((PROJECT_ROOT / "policies").glob("*.yaml"))
    assert (
        f"mcp-policy validate: ok ({len(modules)} Rego modules, {len(data_files)} data files in "
        in done.stdout
    )
    assert str(installed.site / "engine" / "_data" / "rego") in done.stdout
    assert str(PROJECT_ROOT / "rego") not in done.stdout


def test_decide_with_an_opa_server_from_anywhere(installed: Installed) -> None:
    done = installed.run(
        "decide",
        env={"MCP_POLICY_ENGINE": "opa", "MCP_POLICY_OPA_BINARY": str(CHECKOUT_OPA)},
        stdin=json.dumps(copy_call()),
    )
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["verdict"] == "allow"
    assert decision["rule"] == "catalog.rule.copy_image_set"
    # The packaged copy is the checkout's policy: the same revision.
    assert decision["policy_revision"] == SHIPPED_REVISION


def test_without_opa_or_library_one_line_says_how_to_get_them(installed: Installed) -> None:
    call = json.dumps(copy_call())
    no_library = installed.run("decide", stdin=call)
    assert no_library.returncode == 2, no_library.stderr
    (line,) = no_library.stderr.strip().splitlines()
    assert "Traceback" not in line
    assert "set MCP_POLICY_ENGINE=opa" in line and "go build -buildmode=c-shared" in line
    assert str(installed.site / "engine" / "policy" / "native") in line
    assert "make tools" not in line  # there is no Makefile here

    no_opa = installed.run("decide", env={"MCP_POLICY_ENGINE": "opa"}, stdin=call)
    assert no_opa.returncode == 2, no_opa.stderr
    (line,) = no_opa.stderr.strip().splitlines()
    assert f"go install github.com/open-policy-agent/opa@v{OPA_VERSION}" in line
    assert "MCP_POLICY_OPA_BINARY" in line and "make tools" not in line


def test_a_library_built_into_the_package_is_found(installed: Installed) -> None:
    """What `go build` in the installed engine/policy/native/ (the hint) makes."""
    target = installed.site / "engine" / "policy" / "native" / LIBRARY_NAME
    shutil.copy2(CHECKOUT_LIBRARY, target)
    try:
        done = installed.run("decide", stdin=json.dumps(copy_call()))
        doctor = installed.run("doctor", "--http-port", "0", "--grpc-port", "0")
    finally:
        target.unlink()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["policy_revision"] == SHIPPED_REVISION
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"OK    library      {target} (OPA {OPA_VERSION})" in doctor.stdout


def test_doctor_runs_on_the_installed_copy(installed: Installed) -> None:
    done = installed.run(
        "doctor",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        env={"MCP_POLICY_ENGINE": "opa", "MCP_POLICY_OPA_BINARY": str(CHECKOUT_OPA)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert f"installed at {installed.site / 'engine'}" in lines[0]
    data = installed.site / "engine" / "_data"
    assert f"OK    policy path  {data / 'rego'}" in lines
    assert f"OK    policy path  {data / 'policies'}" in lines
    assert any(line.startswith(f"OK    policy       {SHIPPED_REVISION}") for line in lines)
    assert lines[-1] == "mcp-policy doctor: everything the service needs is usable"
