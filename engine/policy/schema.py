"""The policy data's schema (schema/mcp_policy.schema.json): the one definition of the
shape of `data.mcp_policy`, checked by the loader at every load and by `validate`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError

# The data key the schema describes; everything the YAML rules say lives under it.
KEY = "mcp_policy"


def load(path: Path) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return schema


def problems(
    data: dict[str, Any], schema: dict[str, Any]
) -> Iterator[tuple[list[str | int], jsonschema.ValidationError]]:
    """Each place in `data` (a path from its root, e.g. ["mcp_policy", "rules", "x"]) the
    schema refuses, with jsonschema's error; nothing when `data` has no KEY."""
    if KEY not in data:
        return
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(data[KEY]), key=lambda e: list(map(str, e.path))):
        yield [KEY, *error.absolute_path], error


def explained(data: dict[str, Any], schema: dict[str, Any], files: list[Path]) -> list[str]:
    """What `schema` refuses in `data`, one line each: the place in the YAML file that holds
    it (`file:line:col`, when one of `files` does), the data path, and the most specific
    reason: into the oneOf branch written for the value's type (the unknown action, not
    "is not valid under any of the given schemas"), and the schema's if/then rules said in
    words ("action rate_limit needs a rate_limit"). What `mcp-policy validate` prints and
    what a refused load or reload says. Every problem of a value is said, not only the
    first (a rule with a bad reason and a bad limit: both)."""
    out = []
    for _, error in problems(data, schema):
        for best in _narrow(error, schema):
            message = (_no_branch(best, schema) if best.context else None) or _explain(best, schema)
            path: list[str | int] = [KEY, *best.absolute_path]
            where = locate(path, files)
            what = "data." + ".".join(str(part) for part in path)
            line = f"{where + ': ' if where else ''}{what}: {message}"
            if line not in out:
                out.append(line)
    return out


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


def _resolve(root: dict[str, Any], schema: Any) -> Any:
    """`schema` with a local `$ref` ("#/$defs/...") followed; anything else as is."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 16:
        ref: str = schema["$ref"]
        if not ref.startswith("#/"):
            break
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            break
        schema, seen = node, seen + 1
    return schema


def _fits(error: ValidationError, root: dict[str, Any]) -> bool:
    """Whether the schema that refused the instance is meant for its JSON type: a
    `type` it has, or the values of an `enum` or `const` it allows. A oneOf branch for
    strings does not fit a map; its error says less than the map branch's."""
    if error.validator == "type":
        return False
    schema = _resolve(root, error.schema)
    if not isinstance(schema, dict):
        return True
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return any(checker.is_type(error.instance, kind) for kind in kinds)
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list):
        return any(type(value) is type(error.instance) for value in values)
    return True


def _narrow(error: ValidationError, root: dict[str, Any]) -> list[ValidationError]:
    """The most specific errors under `error`: into the one oneOf/anyOf branch written
    for the value's type (a branch fits unless it refuses the value itself for its type),
    then every error of that branch, each narrowed in turn, less those of an if/then
    whose `if` holds only because its key is missing (`{reason: x}` lacks an action; it
    does not also need the rate_limit of action rate_limit). [`error`] when no single
    branch fits."""
    if not error.context:
        return [error]
    branches: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    fitting = [
        errors
        for errors in branches.values()
        if all(sub.relative_path or _fits(sub, root) for sub in errors)
    ]
    if len(fitting) != 1:
        return [error]
    kept = [sub for sub in fitting[0] if not _vacuous(sub, root)] or fitting[0]
    ordered = sorted(kept, key=lambda sub: (list(map(str, sub.path)), sub.message))
    return [best for sub in ordered for best in _narrow(sub, root)]


def _vacuous(error: ValidationError, root: dict[str, Any]) -> bool:
    """An error of an if/then whose `if` tests a key the value does not have."""
    found = _rule_of(error, root)
    if found is None:
        return False
    condition = _condition(found)
    return (
        condition is not None
        and isinstance(error.instance, dict)
        and condition[0] not in error.instance
    )


def _rule_of(error: ValidationError, root: dict[str, Any]) -> Any:
    """The if/then member of the schema an error of its `then` comes from; None for any
    other error."""
    path = list(error.relative_schema_path)
    if "then" not in path:
        return None
    at = len(path) - 1 - path[::-1].index("then")
    node: Any = error.parent.validator_value if error.parent is not None else root
    for part in path[:at]:
        node = _resolve(root, node)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return _resolve(root, node)


def _condition(member: Any) -> tuple[str, Any, bool] | None:
    """(key, value, negated) of an `if` that tests one property for a const."""
    test = member.get("if") if isinstance(member, dict) else None
    negated = isinstance(test, dict) and set(test) == {"not"}
    if negated and isinstance(test, dict):
        test = test["not"]
    props = test.get("properties") if isinstance(test, dict) else None
    if not isinstance(props, dict) or len(props) != 1:
        return None
    ((key, want),) = props.items()
    if not isinstance(want, dict) or "const" not in want:
        return None
    return key, want["const"], negated


def _explain(error: ValidationError, root: dict[str, Any]) -> str:
    """The message for `error`; for the schema's if/then rules ("action rate_limit ->
    required rate_limit") a sentence saying so instead of jsonschema's wording."""
    member = _rule_of(error, root)
    if member is None:
        return error.message
    condition = _condition(member)
    then = member.get("then") if isinstance(member, dict) else None
    if condition is None or not isinstance(then, dict):
        return error.message
    key, value, negated = condition
    when = f"{key} {value}"
    needed = then.get("required")
    if error.validator == "required" and not negated and isinstance(needed, list):
        return f"{when} needs a {', '.join(map(str, needed))}"
    inner = then.get("not")
    refused = inner.get("required") if isinstance(inner, dict) else None
    if error.validator == "not" and isinstance(refused, list):
        names = ", ".join(map(str, refused))
        return f"{names} goes only with {when}" if negated else f"{when} takes no {names}"
    return error.message


def _no_branch(error: ValidationError, root: dict[str, Any]) -> str | None:
    """For a oneOf/anyOf no branch of which fits the value's type: what it may be."""
    if error.validator not in ("oneOf", "anyOf") or not isinstance(error.validator_value, list):
        return None
    wants = []
    for branch in error.validator_value:
        schema = _resolve(root, branch)
        if not isinstance(schema, dict):
            return None
        if "enum" in schema:
            wants.append("one of " + ", ".join(json.dumps(v) for v in schema["enum"]))
        elif schema.get("type") == "object":
            keys = schema.get("required") or []
            wants.append("a map" + (f" with {', '.join(keys)}" if keys else ""))
        elif isinstance(schema.get("type"), str):
            wants.append(f"a {schema['type']}")
        else:
            return None
    return f"{json.dumps(error.instance, default=str)} is not " + " or ".join(wants)
