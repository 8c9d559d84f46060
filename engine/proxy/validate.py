"""`mcp-policy validate`: check policy YAML and Rego the way the service would load them.

Every data file (YAML or JSON) is parsed, and each syntax error is reported with its
file, line and column. The data is checked against the policy schema the service
enforces (`schema/mcp_policy.schema.json`: unknown keys, actions, risks, malformed
limits), each problem named by its data path and placed in the YAML file that holds it.
The Rego modules (tests excluded, as the service loads them) and the data are then
loaded into a real OPA (started for the check), whose compiler errors come back as
`file:row:col: message` with the module's path on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import best_match

from engine.errors import EngineError, PolicyRejected
from engine.policy.opa_process import OpaProcess
from engine.policy.rest import Opa
from engine.policy.source import DATA_SUFFIXES, MODULE_PREFIX, PolicyBundle, read_bundle
from engine.policy.source import _merge as merge

LOAD_TIMEOUT = 30.0


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    modules: int = 0
    data_files: int = 0

    @property
    def valid(self) -> bool:
        return not self.errors


def _files(paths: list[Path]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(root, file) pairs for every policy file under `paths`, and paths that are missing."""
    found: list[tuple[Path, Path]] = []
    missing: list[str] = []
    for path in paths:
        if path.is_dir():
            found += [(path, p) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            found.append((path.parent, path))
        else:
            missing.append(f"{path}: no such file or directory")
    return found, missing


def data_error(path: Path, text: str) -> str | None:
    """The syntax error of one data file as `file:line:col: problem`, or None."""
    try:
        doc: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        return f"{path}:{exc.lineno}:{exc.colno}: {exc.msg}"
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return f"{where}: {problem or exc}"
    except yaml.YAMLError as exc:
        return f"{path}: {exc}"
    if doc is not None and not isinstance(doc, dict):
        return f"{path}:1:1: the top level must be a mapping, not {type(doc).__name__}"
    return None


def locate(path: list[str | int], files: list[Path]) -> str | None:
    """`file:line:col` of the YAML node at data `path`, in the first file that has it."""
    for file in files:
        if file.suffix == ".json":
            continue
        try:
            node: Any = yaml.compose(file.read_text("utf-8"))
        except yaml.YAMLError:
            continue
        for key in path:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == key), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
                node = node.value[key] if key < len(node.value) else None
            else:
                node = None
            if node is None:
                break
        if node is not None:
            mark = node.start_mark
            return f"{file}:{mark.line + 1}:{mark.column + 1}"
    return None


def schema_errors(data: dict[str, Any], schema: Path, files: list[Path]) -> list[str]:
    """What the service's policy schema refuses in `data`, each with its place.

    The same schema `Policy.validate` enforces at load time; `best_match` names the
    innermost problem (the unknown action, not "matches none of the rule shapes").
    """
    validator = jsonschema.Draft202012Validator(json.loads(schema.read_text("utf-8")))
    out = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path))):
        best = best_match([error]) or error
        path = list(best.absolute_path)
        where = locate(path, files)
        what = "data." + ".".join(str(part) for part in path)
        out.append(f"{where + ': ' if where else ''}{what}: {best.message}")
    return out


def _with_paths(message: str, module_paths: dict[str, Path]) -> str:
    """OPA names modules by their ids; put the file on disk in their place."""
    for module_id, path in module_paths.items():
        if message.startswith(module_id + ":"):
            return str(path) + message[len(module_id) :]
    return message


async def validate(
    paths: list[Path], *, opa_binary: str = "opa", schema: Path | None = None
) -> Report:
    report = Report()
    files, missing = _files(paths)
    report.errors += missing
    modules: dict[str, str] = {}
    module_paths: dict[str, Path] = {}
    data_files: list[Path] = []
    for root, path in files:
        if path.suffix == ".rego" and not path.name.endswith("_test.rego"):
            module_id = f"{MODULE_PREFIX}{root.name}/{path.relative_to(root).as_posix()}"
            modules[module_id] = path.read_text("utf-8")
            module_paths[module_id] = path
        elif path.suffix in DATA_SUFFIXES:
            report.data_files += 1
            data_files.append(path)
            problem = data_error(path, path.read_text("utf-8"))
            if problem is not None:
                report.errors.append(problem)
    report.modules = len(modules)
    bundle = PolicyBundle(modules=modules, data={})
    if not report.errors and all(path.is_dir() for path in paths):
        try:
            bundle = read_bundle(paths)
        except PolicyRejected as exc:
            report.errors += exc.errors or [exc.message]
    elif not report.errors:
        bundle = _bundle_of_files(files, modules, report)
    opa = OpaProcess(opa_binary)
    await opa.start()
    client = Opa(opa.url, timeout=LOAD_TIMEOUT)
    if bundle.data and schema is not None:
        report.errors += schema_errors(bundle.data, schema, data_files)
    try:
        await client.open()
        await client.load(bundle)
    except PolicyRejected as exc:
        report.errors += [_with_paths(message, module_paths) for message in exc.errors]
    except EngineError as exc:
        report.errors.append(exc.message)
    finally:
        await client.close()
        await opa.stop()
    return report


def _bundle_of_files(
    files: list[tuple[Path, Path]], modules: dict[str, str], report: Report
) -> PolicyBundle:
    """The bundle when single files were named: their data merged at the top, as
    `read_bundle` merges the files of one directory."""
    data: dict[str, Any] = {}
    for _, path in files:
        if path.suffix not in DATA_SUFFIXES:
            continue
        text = path.read_text("utf-8")
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        try:
            merge(data, doc or {}, "data")
        except PolicyRejected as exc:
            report.errors += [f"{path}: {error}" for error in exc.errors]
    return PolicyBundle(modules=modules, data=data)
