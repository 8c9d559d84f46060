"""`mcp-policy validate`: check policy YAML and Rego the way the service would load them.

Every data file (YAML or JSON) is parsed, and each syntax error is reported with its
file, line and column; a catalog still in the 0.1 list form is refused with the
`mcp-policy migrate` command that fixes it. The data is checked against the policy
schema the service enforces (`schema/mcp_policy.schema.json`: unknown keys, actions,
risks, malformed limits), each problem named by its data path, placed in the YAML file
that holds it and narrowed to its most specific reason. The Rego modules (tests
excluded, as the service loads them) and the data are then loaded into a real OPA
(started for the check), whose compiler errors come back as `file:row:col: message`
with the module's path on disk. Then, as at every load, `data.mcp.load_errors` is
evaluated once: each message a rule package reports about the data is an error. Last,
the decision entry point the service asks (`data.mcp.decision`) must be defined: a team's
own directories without the framework's Rego are reported as such, with the fix.

Every problem is reported, not the first: every syntax error, every place the schema
refuses (each problem of a rule on its own line), every load error, and a value two files
both set with both places.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from engine.errors import EngineError, PolicyRejected, PolicyUnavailable
from engine.policy import schema as policy_schema
from engine.policy.opa_process import OpaProcess
from engine.policy.rest import Opa
from engine.policy.source import (
    DATA_SUFFIXES,
    MODULE_PREFIX,
    MergedFile,
    PolicyBundle,
    merge_file,
    read_bundle,
)
from engine.settings import DEFAULT_POLICY_PATHS

LOAD_TIMEOUT = 30.0
LOAD_ERRORS_QUERY = "data.mcp.load_errors"
DECISION_QUERY = "data.mcp.decision"


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


def schema_errors(data: dict[str, Any], schema: Path, files: list[Path]) -> list[str]:
    """What the service's policy schema refuses in `data`, each with its place and its
    most specific reason (`engine.policy.schema.explained`, as the service says it when it
    refuses a reload)."""
    return policy_schema.explained(data, policy_schema.load(schema), files)


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
    data_ok = not report.errors
    if bundle.data and schema is not None:
        problems = schema_errors(bundle.data, schema, data_files)
        report.errors += problems
        data_ok = data_ok and not problems
    opa = OpaProcess(opa_binary)
    await opa.start()
    client = Opa(opa.url, timeout=LOAD_TIMEOUT)
    try:
        await client.open()
        await client.load(bundle)
        if data_ok:
            # As the service does: the data passed the schema, then the rule packages'
            # own load-time checks (data.mcp.load_errors) must report nothing.
            report.errors += [
                _place_load_error(message, data_files) for message in await load_errors(opa.url)
            ]
        if not await has_decision(opa.url):
            report.errors.append(no_framework(paths))
    except PolicyRejected as exc:
        report.errors += [_with_paths(message, module_paths) for message in exc.errors]
    except EngineError as exc:
        report.errors.append(exc.message)
    finally:
        await client.close()
        await opa.stop()
    return report


async def load_errors(opa_url: str) -> list[str]:
    """`data.mcp.load_errors` of the policy OPA holds (no input), sorted; [] when the
    loaded Rego does not define it. PolicyUnavailable when OPA cannot answer."""
    url = f"{opa_url.rstrip('/')}/v1/{LOAD_ERRORS_QUERY.replace('.', '/')}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=LOAD_TIMEOUT)) as http,
            http.post(url, json={}) as response,
        ):
            response.raise_for_status()
            body = await response.json()
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise PolicyUnavailable(f"could not evaluate {LOAD_ERRORS_QUERY}: {exc}") from exc
    result = body.get("result") if isinstance(body, dict) else None
    if result is None:
        return []
    if not isinstance(result, list):
        return [f"{LOAD_ERRORS_QUERY} must be a set of strings, got {json.dumps(result)}"]
    return sorted(str(message) for message in result)


async def has_decision(opa_url: str) -> bool:
    """Whether the policy OPA holds defines the decision entry point (data.mcp.decision,
    defined for any input when the framework's Rego is loaded). PolicyUnavailable when
    OPA cannot answer."""
    url = f"{opa_url.rstrip('/')}/v1/{DECISION_QUERY.replace('.', '/')}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=LOAD_TIMEOUT)) as http,
            http.post(url, json={"input": {}}) as response,
        ):
            response.raise_for_status()
            body = await response.json()
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise PolicyUnavailable(f"could not evaluate {DECISION_QUERY}: {exc}") from exc
    return isinstance(body, dict) and body.get("result") is not None


def no_framework(paths: list[Path]) -> str:
    """The error for a policy without the decision entry point, with the command that
    checks it together with the framework (its Rego as this installation has it)."""
    framework = DEFAULT_POLICY_PATHS[0]
    given = " ".join(str(path) for path in paths)
    return (
        f"no decision entry point: nothing in {given} defines {DECISION_QUERY}, which the "
        "service asks for every call. The framework's Rego is missing: include it, e.g. "
        f"mcp-policy validate {framework} {given} (the framework's rego/ of this "
        "installation; with its shipped policy data too, add "
        f"{DEFAULT_POLICY_PATHS[1]})"
    )


# "mcp.rules.catalog: mcp_policy.rules[\"x\"]: ..." -> the data path it names.
_DATA_PATH = re.compile(r'^[\w.]+: mcp_policy\.(\w+(?:\.\w+)*)(?:\[("(?:[^"\\]|\\.)*")\])?')


def _place_load_error(message: str, files: list[Path]) -> str:
    """A load error with the YAML place of the data it names, when it names one: the file
    that holds the whole path (`mcp_policy.results.secrets["x"]`: the file with that
    pattern, not the first file with `results`), else the first with its top key."""
    found = _DATA_PATH.match(message)
    where = None
    if found is not None:
        keys = found[1].split(".")
        path: list[str | int] = ["mcp_policy", *keys]
        if found[2] is not None:
            try:
                path.append(json.loads(found[2]))
            except ValueError:
                pass
        where = policy_schema.locate(path, files)
        if where is None and len(keys) > 1:  # (a single key: as before, where it is or none)
            where = policy_schema.locate(["mcp_policy", keys[0]], files)
    return f"{where + ': ' if where else ''}{LOAD_ERRORS_QUERY}: {message}"


def _bundle_of_files(
    files: list[tuple[Path, Path]], modules: dict[str, str], report: Report
) -> PolicyBundle:
    """The bundle when single files were named: their data merged at the top, as
    `read_bundle` merges the files of one directory."""
    data: dict[str, Any] = {}
    merged: list[MergedFile] = []
    for _, path in files:
        if path.suffix not in DATA_SUFFIXES:
            continue
        try:
            merge_file(data, path, [], merged)
        except PolicyRejected as exc:
            report.errors += exc.errors
    return PolicyBundle(modules=modules, data=data)
