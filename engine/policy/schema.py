"""The policy data's schema (schema/mcp_policy.schema.json): the one definition of the
shape of `data.mcp_policy`, checked by the loader at every load and by `validate`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema

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
