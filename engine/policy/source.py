"""Read the policy from disk: Rego modules and YAML/JSON data, as one revisioned bundle.

Data files are placed the way `opa test rego/ policies/` and `opa run` place them: a
file's top-level object is merged at the data path of its directory relative to the
root it was found under, so what the service loads is exactly what `opa test` tested.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.errors import PolicyRejected

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


def merge_data(into: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Merge the data document `new` into `into`; PolicyRejected where both set a value."""
    for key, value in new.items():
        if key in into and isinstance(into[key], dict) and isinstance(value, dict):
            merge_data(into[key], value, f"{where}.{key}")
        elif key in into:
            raise PolicyRejected(
                f"data conflict at {where}.{key}", [f"{where}.{key} is defined twice"]
            )
        else:
            into[key] = value


def read_bundle(roots: list[Path]) -> PolicyBundle:
    """Collect `*.rego` (tests excluded) and data files under `roots`."""
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
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
                doc = _read_data(path)
                node = data
                for part in relative.parent.parts:
                    node = node.setdefault(part, {})
                merge_data(node, doc, "data" + "".join(f".{p}" for p in relative.parent.parts))
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
