"""`mcp-policy init DIR`: start a team's policy repository.

It writes the starter this package carries (engine/authoring/starter/, package data):

    policies/catalog.yaml, policies/rules.yaml   one example tool (send_email on "mail")
                                                 with a YAML rule, risk defaults, default
    rego/mcp/rules/outbound_mail/                an example rule package (arguments: mail
                                                 leaving the company needs approval) and
                                                 its tests: Rego v1, `opa fmt` and Regal
                                                 clean, every line covered
    tests/mail.cases.yaml                        table tests (engine.authoring.tables)
    .github/workflows/policy.yml, .gitlab-ci.yml CI: install the engine by its package
                                                 name, the OPA it pins and its in-process
                                                 library, then `mcp-policy test --coverage
                                                 --threshold 90 --junit report.xml`
    .regal/config.yaml, README.md

Templates whose names start with `dot-` are written as dot files (package data leaves dot
files out). `@NAME@` in a template is this engine's value (its version, the OPA and Go
versions it pins, the library's file name), so the CI files install what wrote them.

Nothing is ever overwritten: when any file to write is there already (or a directory on
the way is a file or a symlink), init names them all and writes nothing (exit 1). A file
appears whole or not at all, and is created exclusively (a file or a symlink put there
meanwhile is refused, not followed).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TextIO

from engine import __version__
from engine.policy.inprocess import LIBRARY_NAME, NATIVE_DIR
from engine.policy.opa_process import OPA_VERSION

EXIT_OK = 0
EXIT_REFUSED = 1

STARTER = Path(__file__).resolve().parent / "starter"
HIDDEN_PREFIX = "dot-"
PYTHON_VERSION = "3.11"  # what the CI files set up: the oldest the package supports

HELP = "write a starter policy repository: policies, a Rego package, table tests, CI files"
DESCRIPTION = """\
Write a starter policy repository into DIR (created if missing): policies/ (a catalog and
rules with one example tool), rego/ (an example rule package and its tests), tests/ (table
tests), CI files for GitHub Actions and GitLab CI that run `mcp-policy test`, and a README.
Nothing is overwritten: if any of those files exists, init names them and writes nothing.
"""


class InitRefused(Exception):
    """Files are in the way; nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="where to write the repository")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`mcp-policy init`; the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        written = init(args.dir)
    except InitRefused as exc:
        print(f"mcp-policy init: nothing written to {args.dir}:", file=err)
        for problem in exc.problems:
            print(f"  {problem}", file=err)
        return EXIT_REFUSED
    print(f"mcp-policy init: wrote {len(written)} files to {args.dir}:", file=out)
    for path in written:
        print(f"  {path.relative_to(args.dir)}", file=out)
    print(f"next: cd {args.dir} && mcp-policy test", file=out)
    return EXIT_OK


def templates() -> list[tuple[Path, Path]]:
    """(template, path in the repository) for every starter file."""
    out = []
    for path in sorted(STARTER.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        relative = Path(
            *(
                "." + part.removeprefix(HIDDEN_PREFIX) if part.startswith(HIDDEN_PREFIX) else part
                for part in path.relative_to(STARTER).parts
            )
        )
        out.append((path, relative))
    return out


def values() -> dict[str, str]:
    """What `@NAME@` stands for in the templates."""
    return {
        "PACKAGE_VERSION": __version__,
        "OPA_VERSION": OPA_VERSION,
        "GO_VERSION": go_version(),
        "PYTHON_VERSION": PYTHON_VERSION,
        "LIBRARY_NAME": LIBRARY_NAME,
    }


def go_version() -> str:
    """The Go release the in-process library needs (its go.mod's `go` line, major.minor)."""
    found = re.search(r"^go (\d+\.\d+)", (NATIVE_DIR / "go.mod").read_text("utf-8"), re.M)
    if found is None:
        raise RuntimeError(f"{NATIVE_DIR / 'go.mod'} names no Go version")
    return found[1]


def render(text: str, names: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        if match[1] not in names:
            raise RuntimeError(f"a starter template names @{match[1]}@, which has no value")
        return names[match[1]]

    return re.sub(r"@([A-Z_]+)@", value, text)


def in_the_way(directory: Path, paths: list[Path]) -> list[str]:
    """Every reason not to write `paths` (relative to `directory`): a file there already
    (or a symlink, even a dangling one), or a directory on the way that is not one."""
    problems: list[str] = []
    seen: set[Path] = set()
    for relative in paths:
        for parent in [Path(*relative.parts[:i]) for i in range(len(relative.parts))]:
            where = directory / parent
            if where in seen:
                continue
            seen.add(where)
            if where.is_symlink():
                problems.append(f"{where}: a symlink (init writes only into real directories)")
            elif os.path.lexists(where) and not where.is_dir():
                problems.append(f"{where}: not a directory")
        target = directory / relative
        if os.path.lexists(target):
            problems.append(f"{target}: exists (init never overwrites)")
    return problems


def init(directory: Path) -> list[Path]:
    """Write the starter repository into `directory`; the files written. InitRefused,
    naming every file in the way, when anything is (then nothing is written)."""
    names = values()
    planned = [
        (relative, render(template.read_text("utf-8"), names)) for template, relative in templates()
    ]
    problems = in_the_way(directory, [relative for relative, _ in planned])
    if problems:
        raise InitRefused(problems)
    written: list[Path] = []
    for relative, text in planned:
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _create(target, text)
        except FileExistsError as exc:
            raise InitRefused([f"{target}: appeared while init was writing"]) from exc
        written.append(target)
    return written


def _create(target: Path, text: str) -> None:
    """Write `target`, which must not exist (not even as a symlink): O_EXCL, and O_NOFOLLOW
    where the system has it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
