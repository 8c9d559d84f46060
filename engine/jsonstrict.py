"""Strict JSON: what a security decision may be built on.

The standard parser quietly keeps the last of two duplicate keys and accepts NaN and
Infinity; a policy and an upstream server could then read one request two ways. Here
both are errors, as is nesting deeper than a limit. `canonical` is the one serialisation
used wherever bytes must be stable (approval fingerprints, argument hashes).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

from engine.errors import InvalidRequest

JSONValue = Any


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidRequest(f"duplicate key {key!r} in JSON object", syntax=True)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not valid JSON (non-finite numbers are refused)", syntax=True)


_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def loads(text: str | bytes, *, max_depth: int, what: str = "request body") -> JSONValue:
    """Parse `text` strictly; raise InvalidRequest naming the problem."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"{what} is not UTF-8: {exc.reason}", syntax=True) from exc
    try:
        value = _DECODER.decode(text)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{what}: {exc.message}", syntax=True) from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", syntax=True) from exc
    except RecursionError as exc:
        raise InvalidRequest(f"{what} nests deeper than {max_depth} levels", syntax=True) from exc
    check_depth(value, max_depth=max_depth, what=what)
    return value


def check_depth(value: JSONValue, *, max_depth: int, what: str) -> None:
    """Raise InvalidRequest if `value` nests objects/arrays deeper than `max_depth`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise InvalidRequest(f"{what} nests deeper than {max_depth} levels", syntax=True)
        stack.extend((child, depth + 1) for child in children)


def check_finite(value: JSONValue, *, what: str) -> None:
    """Raise InvalidRequest if a float in `value` is NaN or infinite."""
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise InvalidRequest(f"{what} contains a non-finite number ({node})", field=what)
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def normalise_numbers(value: JSONValue) -> JSONValue:
    """Integral floats become ints, so 10 and 10.0 are one value (as in JSON and Rego)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: normalise_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalise_numbers(item) for item in value]
    return value


def canonical(value: JSONValue) -> str:
    """One stable text for a JSON value: sorted keys, no spaces, integral floats as ints."""
    return json.dumps(
        normalise_numbers(value),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def sha256_hex(value: JSONValue) -> str:
    return hashlib.sha256(canonical(value).encode("utf-8")).hexdigest()
