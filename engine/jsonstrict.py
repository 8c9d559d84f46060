"""Strict JSON: what a security decision may be built on.

The standard parser quietly keeps the last of two duplicate keys, accepts NaN and
Infinity, turns 1e400 into infinity, raises an unrelated ValueError for integer literals
past Python's digit limit, and lets escaped lone UTF-16 surrogates ("\\ud800") through
as strings that no UTF-8 encoder (SQLite, protobuf, the policy engine, the upstream
server) can carry — so a policy and an upstream server could read one request two ways,
or a later step fail after quota was taken. Here every one of these is an InvalidRequest
naming where it is, as is nesting deeper than a limit. Every transport (HTTP, gRPC's
`message` text, the proxy, the console commands) parses through `loads`.

`canonical` is the one serialisation used wherever bytes must be stable (approval
fingerprints, argument hashes). `quote` is how error messages cite input: never more
than a bound, so an error never echoes megabytes back.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from engine.errors import InvalidRequest

JSONValue = Any

# Integer literals longer than this are refused: no policy needs them, and Python's own
# limit (4300 digits) would otherwise surface as an unrelated error.
MAX_INTEGER_DIGITS = 100
QUOTE_LIMIT = 64


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` cut to `limit` characters (with how long it was), for messages."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        return repr(text[:limit]) + f"… ({len(text)} characters)"
    return repr(text)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidRequest(f"duplicate key {quote(key)} in JSON object", syntax=True)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not valid JSON (non-finite numbers are refused)", syntax=True)


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INTEGER_DIGITS:
        raise InvalidRequest(
            f"an integer of {len(text)} digits; at most {MAX_INTEGER_DIGITS} are accepted",
            syntax=True,
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest(
            f"the number {quote(text, 24)} is out of range (it overflows to infinity)",
            syntax=True,
        )
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates,
    parse_constant=_reject_constant,
    parse_int=_parse_int,
    parse_float=_parse_float,
)


BODY = "request body"


def loads(text: str | bytes, *, max_depth: int, what: str = BODY) -> JSONValue:
    """Parse `text` strictly; raise InvalidRequest naming the problem (and where: fields
    of a request body by their own names, those of anything else under `what`)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"{what} is not UTF-8: {exc.reason} at byte {exc.start}", syntax=True
            ) from exc
    try:
        value = _DECODER.decode(text)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{what}: {exc.message}", syntax=True) from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})",
            syntax=True,
        ) from exc
    except RecursionError as exc:
        raise InvalidRequest(f"{what} nests deeper than {max_depth} levels", syntax=True) from exc
    except ValueError as exc:  # anything else the number parsers refuse
        raise InvalidRequest(f"{what} has a number that cannot be read", syntax=True) from exc
    check_value(value, max_depth=max_depth, what=what, root="" if what == BODY else what)
    return value


def check_text(text: str, *, what: str) -> None:
    """Raise InvalidRequest if `text` holds a lone surrogate (it cannot be UTF-8)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{what} holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at "
            f"character {exc.start}; strings must be valid Unicode",
            field=what,
            syntax=True,
        ) from exc


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if key.isidentifier() and len(key) <= QUOTE_LIMIT:
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{quote(key)}]"


def check_value(value: JSONValue, *, max_depth: int, what: str, root: str | None = None) -> None:
    """Raise InvalidRequest, naming where, if `value` nests deeper than `max_depth`, holds
    a non-finite number, or a string or key that is not valid Unicode.

    Places are named as paths from `root` (`what` unless given; "" for a whole request
    body, so its fields are named as the API spells them: `arguments.datastore_id`)."""
    start = what if root is None else root
    stack: list[tuple[Any, int, str]] = [(value, 1, start)]
    while stack:
        node, depth, where = stack.pop()
        name = where or what
        if isinstance(node, str):
            check_text(node, what=name)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise InvalidRequest(f"{name} is a non-finite number ({node})", field=name)
        elif isinstance(node, dict):
            if depth > max_depth:
                raise InvalidRequest(f"{what} nests deeper than {max_depth} levels", syntax=True)
            for key, item in node.items():
                if not isinstance(key, str):
                    raise InvalidRequest(f"{name} has a key that is not a string", field=name)
                check_text(key, what=f"a key in {name}")
                stack.append((item, depth + 1, _path(where, key)))
        elif isinstance(node, list):
            if depth > max_depth:
                raise InvalidRequest(f"{what} nests deeper than {max_depth} levels", syntax=True)
            stack.extend((item, depth + 1, _path(where, i)) for i, item in enumerate(node))


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
