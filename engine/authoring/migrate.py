"""`mcp-policy migrate`: rewrite 0.1 policy catalogs (a list) into the map form of 0.2.

0.1 wrote the catalog as a list, `catalog: [{server, tool, category, risk, ...}]` (no
`server`, or `server: null`, for the tool on any server); 0.2 reads a map, server name
(`"*"`: any server) -> tool name -> entry, so several files merge into one catalog and a
decision looks a tool up by key. Every policy data file (`*.yaml`, `*.yml`, `*.json`)
under the given paths whose `mcp_policy.catalog` is a list is rewritten into that map;
each entry keeps its other fields, in their order. Any other file (a catalog already a
map, data that is not policy data) is left byte for byte alone, so a second run changes
nothing.

All or nothing: when a file cannot be read, is not valid YAML or JSON, or catalogues
the same tool on the same server twice, each problem is reported on one line and no
file is written. A file is written by renaming a complete temporary file over it, so it
is never seen half written. A YAML file keeps its leading comment block (the comment
lines before its first key); other comments in it are lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

DATA_SUFFIXES = (".yaml", ".yml", ".json")
ANY_SERVER = "*"
EXIT_OK = 0
EXIT_NEEDS_MIGRATING = 1  # with --check
EXIT_ERROR = 2

HELP = "rewrite 0.1 policy catalogs (a list of entries) into the 0.2 map form"
DESCRIPTION = """\
Rewrite every policy data file (*.yaml, *.yml, *.json) under the given directories
whose mcp_policy.catalog is a list (the 0.1 form) into the map form the service reads:
server name ("*" for entries without a server) -> tool name -> entry. Other files are
left untouched, so running it again changes nothing. Prints one line per file changed.

Comments: a rewritten YAML file keeps its leading comment block (the comment lines
before its first key); every other comment in that file is lost, so review the diff.

Exit status: 0 done (or nothing to do); 1 with --check when a file needs migrating;
2 when a file is not valid YAML/JSON or catalogues a tool twice (nothing is written).
"""


class MigrateError(Exception):
    """A file that cannot be migrated; the message is one line naming it."""


@dataclass(frozen=True)
class Migration:
    """A file to rewrite: its new text, and how many entries and servers it holds."""

    path: Path
    text: str
    entries: int
    servers: int


def _parse(path: Path, text: str) -> Any:
    """The document in `text`, or MigrateError naming the place of its syntax error."""
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise MigrateError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p) or str(exc)
        raise MigrateError(f"{where}: not valid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise MigrateError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def _old_catalog(doc: Any) -> list[Any] | None:
    """The 0.1 catalog list of a policy document, or None when it has none."""
    policy = doc.get("mcp_policy") if isinstance(doc, dict) else None
    catalog = policy.get("catalog") if isinstance(policy, dict) else None
    return catalog if isinstance(catalog, list) else None


def _entry_lines(text: str) -> list[int] | None:
    """The line of each entry of mcp_policy.catalog in `text` (JSON reads as YAML
    here too), or None when they cannot be placed."""
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return None
    for key in ("mcp_policy", "catalog"):
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((v for k, v in node.value if k.value == key), None)
    if not isinstance(node, yaml.SequenceNode):
        return None
    return [item.start_mark.line + 1 for item in node.value]


def catalog_map(entries: list[Any], where: list[str]) -> dict[str, dict[str, Any]]:
    """The 0.2 catalog for the 0.1 `entries`; `where[i]` names entry i in messages.

    Entries without a server (or `server: null`) go under "*"; every other field is kept.
    MigrateError for an entry that is not a map with a tool and a server name, and for
    two entries for the same (server, tool)."""
    catalog: dict[str, dict[str, Any]] = {}
    first: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise MigrateError(f"{where[index]} is not a map (server, tool, category, risk)")
        tool = entry.get("tool")
        if not isinstance(tool, str) or not tool:
            raise MigrateError(f"{where[index]} has no tool name (a non-empty string)")
        server = entry.get("server")
        if server is None:
            server = ANY_SERVER
        if not isinstance(server, str) or not server:
            raise MigrateError(
                f"{where[index]}: server must be a server name, or absent for any server"
            )
        if (server, tool) in first:
            on = "any server" if server == ANY_SERVER else f"server {json.dumps(server)}"
            raise MigrateError(
                f"tool {json.dumps(tool)} on {on} is catalogued twice, at "
                f"{where[first[server, tool]]} and {where[index]}; keep one and run "
                "mcp-policy migrate again"
            )
        first[server, tool] = index
        fields = {k: v for k, v in entry.items() if k not in ("server", "tool")}
        catalog.setdefault(server, {})[tool] = fields
    return catalog


def _leading_comments(text: str) -> str:
    """The comment block a YAML file starts with (comment and blank lines)."""
    lines = text.splitlines(keepends=True)
    count = 0
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            break
        count += 1
    block = "".join(lines[:count])
    return block if not block or block.endswith("\n") else block + "\n"


def migrate_text(path: Path, text: str) -> Migration | None:
    """The rewritten file for `text` when its catalog is in the 0.1 form, else None.
    MigrateError when it cannot be parsed or its catalog cannot be converted."""
    doc = _parse(path, text)
    entries = _old_catalog(doc)
    if entries is None:
        return None
    lines = _entry_lines(text)
    where = [
        f"mcp_policy.catalog[{i}]" + (f" (line {lines[i]})" if lines else "")
        for i in range(len(entries))
    ]
    try:
        catalog = catalog_map(entries, where)
    except MigrateError as exc:
        raise MigrateError(f"{path}: {exc}") from exc
    doc["mcp_policy"]["catalog"] = catalog
    if path.suffix == ".json":
        new = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    else:
        body = yaml.safe_dump(
            doc, sort_keys=False, allow_unicode=True, default_flow_style=False, width=4096
        )
        new = _leading_comments(text) + body
    return Migration(path=path, text=new, entries=len(entries), servers=len(catalog))


def data_files(paths: list[Path]) -> list[Path]:
    """Every data file under `paths` (directories or files), each once, in order.
    MigrateError for a path that does not exist."""
    found: dict[Path, Path] = {}
    for path in paths:
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            candidates = [path]
        else:
            raise MigrateError(f"{path}: no such file or directory")
        for candidate in candidates:
            if candidate.suffix in DATA_SUFFIXES:
                found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def plan(paths: list[Path]) -> tuple[list[Migration], list[str]]:
    """The files to rewrite under `paths`, and every problem found (one line each)."""
    try:
        files = data_files(paths)
    except MigrateError as exc:
        return [], [str(exc)]
    migrations: list[Migration] = []
    problems: list[str] = []
    for path in files:
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
            continue
        try:
            migration = migrate_text(path, text)
        except MigrateError as exc:
            problems.append(str(exc))
            continue
        if migration is not None:
            migrations.append(migration)
    return migrations, problems


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` (a symlink's target) with `text` in one rename, keeping its mode."""
    target = path.resolve()
    mode = stat.S_IMODE(target.stat().st_mode)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def run(
    paths: list[Path], *, check: bool = False, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`mcp-policy migrate [--check] PATH...`; the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    migrations, problems = plan(paths)
    if problems:
        for problem in problems:
            print(f"mcp-policy migrate: {problem}", file=err)
        print("mcp-policy migrate: nothing was written", file=err)
        return EXIT_ERROR
    for migration in migrations:
        summary = f"{_count(migration.entries, 'entry', 'entries')} under " + _count(
            migration.servers, "server", "servers"
        )
        if check:
            print(
                f"{migration.path}: mcp_policy.catalog is a list (the 0.1 form), "
                f"needs migrating ({summary})",
                file=out,
            )
            continue
        try:
            write_atomically(migration.path, migration.text)
        except OSError as exc:
            print(
                f"mcp-policy migrate: {migration.path}: cannot write: {exc.strerror or exc}",
                file=err,
            )
            return EXIT_ERROR
        print(f"migrated {migration.path} ({summary})", file=out)
    if not migrations:
        print("mcp-policy migrate: nothing to migrate, every catalog is a map", file=err)
    if check and migrations:
        return EXIT_NEEDS_MIGRATING
    return EXIT_OK
