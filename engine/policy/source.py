"""Read the policy from disk: Rego modules and YAML/JSON data, as one revisioned bundle.

Data files are placed the way `opa test rego/ policies/` and `opa run` place them: a
file's top-level object is merged at the data path of its directory relative to the
root it was found under, so what the service loads is exactly what `opa test` tested.
Two files that set one value are refused with both places (`file:line:col` in each).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.errors import PolicyRejected
from engine.policy.schema import locate

DATA_SUFFIXES = (".yaml", ".yml", ".json")
# Ids of the modules this service manages in OPA; others (a shared OPA) are left alone.
MODULE_PREFIX = "mcp-policy/"


@dataclass(frozen=True)
class PolicyBundle:
    """Rego modules by id and the data document, with a revision: the one given (a
    bundle's manifest revision), else a digest of both."""

    modules: dict[str, str]
    data: dict[str, Any]
    revision: str = ""

    def __post_init__(self) -> None:
        if self.revision:
            return
        digest = hashlib.sha256()
        for module_id in sorted(self.modules):
            digest.update(module_id.encode())
            digest.update(b"\0")
            digest.update(self.modules[module_id].encode())
            digest.update(b"\0")
        digest.update(json.dumps(self.data, sort_keys=True, separators=(",", ":")).encode())
        object.__setattr__(self, "revision", "sha256:" + digest.hexdigest()[:16])


class DataConflict(PolicyRejected):
    """Two data documents set the value at one path: `keys`, below `where`."""

    def __init__(self, where: str, keys: list[str]) -> None:
        what = where + "".join(f".{key}" for key in keys)
        super().__init__(f"data conflict at {what}", [f"{what} is defined twice"])
        self.keys = keys


def merge_data(into: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Merge the data document `new` into `into`; DataConflict where both set a value."""
    _merge(into, new, where, [])


def _merge(into: dict[str, Any], new: dict[str, Any], where: str, keys: list[str]) -> None:
    for key, value in new.items():
        if key in into and isinstance(into[key], dict) and isinstance(value, dict):
            _merge(into[key], value, where, [*keys, key])
        elif key in into:
            raise DataConflict(where, [*keys, key])
        else:
            into[key] = value


@dataclass(frozen=True)
class MergedFile:
    """A data file merged: where it is placed (its directory's parts). Its document is read
    again only to place a conflict (what was merged is part of the merged data now)."""

    path: Path
    parts: list[str]


def merge_file(data: dict[str, Any], path: Path, parts: list[str], read: list[MergedFile]) -> None:
    """Merge the data file `path` into `data` at the path `parts` (its directory, relative
    to its root), after the files in `read` (to which it is added). PolicyRejected for a
    value that an earlier file sets too, naming both places: `file:line:col: data.<path>
    is defined twice (also at file:line:col)`, the earlier file first."""
    doc = _read_data(path)
    node = data
    for depth, part in enumerate(parts):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _placed(parts[: depth + 1], path, parts, read)
        node = child
    try:
        merge_data(node, doc, "data" + "".join(f".{p}" for p in parts))
    except DataConflict as exc:
        raise _placed([*parts, *exc.keys], path, parts, read) from None
    read.append(MergedFile(path, parts))


def _placed(
    keys: list[str], path: Path, parts: list[str], read: list[MergedFile]
) -> PolicyRejected:
    """The conflict at data `keys` between `path` and the first earlier file that sets it."""
    what = "data" + "".join(f".{key}" for key in keys)
    here = _place(keys, path, parts)
    earlier = next((r for r in read if _sets(r, keys)), None)
    if earlier is None:  # not found again: name this file only
        line = f"{here}: {what} is defined twice"
    else:
        first = _place(keys, earlier.path, earlier.parts)
        line = f"{first}: {what} is defined twice (also at {here})"
    return PolicyRejected(f"data conflict at {what}", [line])


def _sets(read: MergedFile, keys: list[str]) -> bool:
    """Whether the file `read` puts a value at data `keys` (or is placed below them)."""
    if len(read.parts) >= len(keys):
        return read.parts[: len(keys)] == keys
    if keys[: len(read.parts)] != read.parts:
        return False
    try:
        node: Any = _read_data(read.path)
    except PolicyRejected:
        return False
    for key in keys[len(read.parts) :]:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _place(keys: list[str], path: Path, parts: list[str]) -> str:
    """`file:line:col` of data `keys` in the YAML file `path` (placed at `parts`), else
    the file's name."""
    inside: list[str | int] = list(keys[len(parts) :])
    return (locate(inside, [path]) if inside else None) or str(path)


def read_bundle(roots: list[Path]) -> PolicyBundle:
    """Collect `*.rego` (tests excluded) and data files under `roots`."""
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    read: list[MergedFile] = []
    for root in roots:
        if not root.is_dir():
            raise PolicyRejected(f"policy directory {root} does not exist", [str(root)])
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(root)
            if path.suffix == ".rego":
                if not path.name.endswith("_test.rego"):
                    modules[f"{MODULE_PREFIX}{root.name}/{relative.as_posix()}"] = path.read_text(
                        "utf-8"
                    )
            elif path.suffix in DATA_SUFFIXES:
                merge_file(data, path, list(relative.parent.parts), read)
    for key, value in data.items():
        if not isinstance(value, dict):
            raise PolicyRejected(
                f"data.{key} must be an object (each top-level data key is loaded on its own)",
                [f"data.{key}: {type(value).__name__}"],
            )
    return PolicyBundle(modules=modules, data=data)


def data_files(roots: list[Path]) -> list[Path]:
    """The data files (YAML, JSON) under `roots`, in the order `read_bundle` reads them."""
    return [
        path
        for root in roots
        if root.is_dir()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in DATA_SUFFIXES
    ]


def _read_data(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text("utf-8")
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise PolicyRejected(f"{path}: not valid data: {exc}", [f"{path}: {exc}"]) from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise PolicyRejected(f"{path}: top level must be a mapping", [str(path)])
    policy = doc.get("mcp_policy")
    if isinstance(policy, dict) and isinstance(policy.get("catalog"), list):
        # The 0.1 catalog (a list of {server, tool, ...}); the Rego now reads a map.
        line = (
            f"{path}: mcp_policy.catalog is a list (the 0.1 form); "
            f"run: mcp-policy migrate {path.parent}/"
        )
        raise PolicyRejected(line, [line])
    return doc


_DECISION_PACKAGE = re.compile(r"^package\s+mcp\s*$", re.MULTILINE)


def has_framework(root: Path) -> bool:
    """Whether `root` holds the decision entry point (a module of `package mcp`)."""
    return root.is_dir() and any(
        _DECISION_PACKAGE.search(path.read_text("utf-8", errors="replace"))
        for path in root.rglob("*.rego")
        if path.is_file() and not path.name.endswith("_test.rego")
    )


def with_framework(dirs: list[Path]) -> list[Path]:
    """A team's policy directories made whole: the installed framework's Rego first when
    none of them holds the decision entry point, the shipped policy data last when none
    holds data. Empty: the shipped rego/ and policies/."""
    from engine.settings import DEFAULT_POLICY_PATHS

    framework, shipped_data = DEFAULT_POLICY_PATHS
    paths = list(dirs) or [framework, shipped_data]
    if not any(has_framework(path) for path in paths):
        paths.insert(0, framework)
    if not data_files(paths):
        paths.append(shipped_data)
    return paths
