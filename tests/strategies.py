"""Hypothesis strategies for hostile input, and the settings profiles the fuzz tests use.

Two families:

- JSON. `hostile_strings()` and `hostile_values()` are *valid* JSON content that is odd
  (NUL, U+2028, bidi overrides, non-characters, combining marks, homoglyphs, very long
  strings, integers up to the 100-digit bound, extreme floats, nesting up to a bound): a
  request made of them may be decided, and then only as the policy decides. `poisoned(value)`
  writes a value as JSON text with one defect the strict parser must refuse spliced into
  one of its containers: a lone UTF-16 surrogate escape in a key or a string, an integer
  literal past the digit bound, a float that overflows, NaN or Infinity, nesting past any
  limit, a duplicate key (also one spelled with escapes), or broken syntax.
  `hostile_json_text()` is such text around a random value; `with_invalid_utf8(text)`
  splices bytes that are not UTF-8 into it.
- Protobuf. `protobuf_mutations(valid)` mutates a valid serialisation at the wire level:
  truncation, bit flips, invalid UTF-8 spliced into a length-delimited field (also inside
  nested messages), wrong wire types, huge or overlong length prefixes, duplicated and
  unknown fields, field number 0, raw garbage; `deep_struct_field(number)` is a Struct
  nested past protobuf's recursion limit.

Profiles (applied per test with `@FUZZ`, never loaded globally, so the other Hypothesis tests
of the suite keep their own settings): `fuzz-quick` (the default: few examples,
`derandomize=True` so `make test` always runs the same examples and never turns red by
luck, no example database since there is nothing to replay) and `fuzz` (selected with
HYPOTHESIS_PROFILE=fuzz, as `make fuzz` does: many random examples and the example
database in .hypothesis/, so a failure found once is tried first on the next run).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from engine.models import principal_id_problem
from tests.conftest import DATASTORE, HEALTHIMAGING, IMAGE_SET, VALKEY

QUICK_EXAMPLES = 50
FUZZ_EXAMPLES = 2000
_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "fuzz-quick",
    max_examples=QUICK_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_DATA,
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_DATA,
)
PROFILE = "fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "fuzz-quick"
FUZZ = settings(settings.get_profile(PROFILE))

# --------------------------------------------------------------------------------------
# Valid but hostile JSON content.

ODD_CHARACTERS = (
    "\x00\x01\x08\x1b\x7f\x85\xa0\xad"  # NUL, controls, NEL, NBSP, soft hyphen
    "\u200b\u200c\u200d\u200e\u200f\u2028\u2029"  # zero widths, marks, line/para separators
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"  # bidi embeddings and overrides
    "\ufeff\ufffd\ufffe\uffff\ufdd0\ufdef\U0001fffe\U0010fffe\U0010ffff"  # BOM, non-characters
    "\u0301\u0336\u20dd\u0489"  # combining marks
    "\U0001f600\U0001f308\ufe0f"  # astral, variation selector
    "\u0130\u0131\u017f\u212a\uff43\u0441"  # case-mapping traps and homoglyphs
    "\\\"/'<>&%{}$"
)
HOSTILE_WORDS = (
    "",
    " ",
    "\t",
    "\r\n",
    "copy_image_set\x00",
    "copy_image_set\u200b",
    "copy_image_set ",
    "COPY_IMAGE_SET",
    "\u0441opy_image_set",  # Cyrillic es
    "copy_image_set\u0301",
    "\u202ecopy_image_set",
    "copy_image_set/../delete_datastore",
    "../../etc/passwd",
    "%00",
    "%ff",
    "${jndi:ldap://x/a}",
    "{{7*7}}",
    "'; DROP TABLE decisions; --",
    "<script>alert(1)</script>",
    "\\ud800",  # the six characters, not a surrogate
    "null",
    "true",
    "__proto__",
    "constructor",
    "NaN",
    "Infinity",
    "1e400",
)
# Names the shipped copy_image_set rules look at; hostile extra arguments avoid them.
COPY_ARGUMENT_NAMES = frozenset(
    {
        "datastore_id",
        "source_image_set_id",
        "source_datastore_id",
        "copy_image_set_information",
        "force",
    }
)


def hostile_strings(*, max_long: int = 50_000, max_size: int = 40) -> st.SearchStrategy[str]:
    """Valid Unicode strings (never a lone surrogate) that are odd in every other way."""
    parts: list[st.SearchStrategy[str]] = [
        st.sampled_from(HOSTILE_WORDS),
        st.text(st.sampled_from(ODD_CHARACTERS + "az09_.-"), min_size=1, max_size=max_size),
        st.text(st.characters(codec="utf-8"), max_size=max_size),
        st.builds(
            lambda base, n: base + "\u0301" * n,
            st.sampled_from("aZ_"),
            st.integers(1, min(2000, max(1, max_long))),
        ),
    ]
    if max_long >= 1000:
        parts.append(
            st.builds(
                lambda unit, n: unit * n,
                st.sampled_from(["x", "\u202e", "\x00", "\U0001f600", "\u00e9", "\\", '"']),
                st.integers(1000, max_long),
            )
        )
    return st.one_of(parts)


def hostile_ints() -> st.SearchStrategy[int]:
    """Integers up to the 100-digit bound the strict parser accepts."""
    return st.one_of(
        st.integers(-(2**70), 2**70),
        st.sampled_from(
            [0, -1, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]
        ),
        st.integers(1, 100).map(lambda digits: 10**digits - 1),
        st.integers(1, 100).map(lambda digits: -(10**digits - 1)),
    )


def hostile_floats() -> st.SearchStrategy[float]:
    """Finite floats, the extremes included (subnormals, the largest double, -0.0)."""
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([-0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-320]),
    )


def _nest(value: Any, depth: int, kind: str) -> Any:
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def hostile_values(
    max_depth: int = 5, *, max_long: int = 20_000, key_long: int = 300
) -> st.SearchStrategy[Any]:
    """Valid JSON values of hostile content, nesting at most `max_depth` containers."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        hostile_ints(),
        hostile_floats(),
        hostile_strings(max_long=max_long),
    )
    keys = hostile_strings(max_long=key_long)
    value: st.SearchStrategy[Any] = scalars
    for _ in range(min(max_depth, 4)):
        value = st.one_of(
            scalars,
            st.lists(value, max_size=4),
            st.dictionaries(keys, value, max_size=4),
        )
    ladder = st.builds(
        _nest, scalars, st.integers(1, max(1, max_depth)), st.sampled_from(["list", "dict"])
    )
    return st.one_of(value, ladder) if max_depth > 0 else scalars


def hostile_objects(max_depth: int = 5, **kwargs: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        hostile_strings(max_long=300), hostile_values(max_depth - 1, **kwargs), max_size=4
    )


# --------------------------------------------------------------------------------------
# Poison: what the strict parser must refuse.

LONE_SURROGATES = (
    "\\ud800",
    "\\udbff",
    "\\udc00",
    "\\udfff",
    "\\uD83D",
    "\\uDE00\\uD83D",  # a pair in the wrong order
    "\\ud800\\u0041",  # a high surrogate before a letter
    "\\ud800\\ud800",
)
SYNTAX_ERRORS = (
    "'single'",
    "undefined",
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
    "[1,]",
    '{"a":1,}',
    "[1 2]",
    '"unterminated',
    '"\\x41"',
    '"\\u12"',
    '"tab\there"',  # a raw control character in a string
    '"nul\x00"',
    "/*c*/1",
    "tru",
    "nul",
    "-NaN",
    "\u00a01",  # NBSP is not JSON whitespace
)


def _string_text(value: str, ensure_ascii: bool) -> str:
    """The inside of a JSON string literal for `value`, without the quotes."""
    return json.dumps(value, ensure_ascii=ensure_ascii)[1:-1]


def lone_surrogate_literals() -> st.SearchStrategy[str]:
    """A JSON string literal holding an escaped lone surrogate among other text."""
    return st.builds(
        lambda before, bad, after, ascii_: (
            '"' + _string_text(before, ascii_) + bad + _string_text(after, ascii_) + '"'
        ),
        hostile_strings(max_long=200, max_size=8),
        st.sampled_from(LONE_SURROGATES),
        hostile_strings(max_long=200, max_size=8),
        st.booleans(),
    )


def poison_values() -> st.SearchStrategy[str]:
    """JSON text, in value position, that the strict parser must refuse."""
    return st.one_of(
        lone_surrogate_literals(),
        st.builds(
            lambda sign, digits: sign + "1" + "7" * (digits - 1),
            st.sampled_from(["", "-"]),
            st.integers(101, 5000),
        ),
        st.sampled_from(
            ["1e400", "-1e400", "1E+309", "2e308", "1.8e308", "-1e99999", "123456789e999"]
        ),
        st.integers(309, 100_000).map(lambda exponent: f"1e{exponent}"),
        st.integers(310, 2000).map(lambda digits: "1" * digits + ".5"),
        st.sampled_from(["NaN", "Infinity", "-Infinity"]),
        st.integers(31, 5000).map(lambda depth: "[" * depth + "]" * depth),
        st.integers(31, 3000).map(lambda depth: '{"a":' * depth + "0" + "}" * depth),
        st.sampled_from(SYNTAX_ERRORS),
    )


def _escaped(key: str) -> str:
    """`key` as a JSON string literal with every character \\u-escaped."""
    return '"' + "".join(f"\\u{unit:04x}" for unit in _utf16_units(key)) + '"'


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def poison_members() -> st.SearchStrategy[str]:
    """Object members (`"key":value`, or two of them) the strict parser must refuse."""
    keys = hostile_strings(max_long=100, max_size=12)
    return st.one_of(
        lone_surrogate_literals().map(lambda key: key + ":1"),
        keys.map(lambda key: f"{json.dumps(key)}:1,{json.dumps(key)}:2"),
        keys.map(lambda key: f"{json.dumps(key)}:1,{_escaped(key)}:2"),
        st.tuples(keys, poison_values()).map(lambda kv: f"{json.dumps(kv[0])}:{kv[1]}"),
    )


# Keys a poison is never added under (so that, with a benign stand-in for the poison, the
# text around it is exactly the valid request it was made from).
RESERVED_KEYS = COPY_ARGUMENT_NAMES | {"jsonrpc", "id", "method", "params", "name", "arguments"}
SENTINEL_VALUE = "\ue000poison-value-5f1c\ue000"
SENTINEL_KEY = "\ue000poison-member-5f1c\ue000"


def _containers(value: Any) -> list[Any]:
    found: list[Any] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            found.append(node)
            stack.extend(node)
    return found


@st.composite
def poisoned(
    draw: st.DrawFn,
    value: Any,
    *,
    values: st.SearchStrategy[str] | None = None,
    members: st.SearchStrategy[str] | None = None,
) -> str:
    """`value` (a dict or list) as JSON text with one poison in one of its containers.

    `values` and `members` replace the poison (say with something benign, to check that
    what is left around the poison is a valid request)."""
    values = poison_values() if values is None else values
    members = poison_members() if members is None else members
    tree = copy.deepcopy(value)
    host = draw(st.sampled_from(_containers(tree)))
    as_member = isinstance(host, dict) and draw(st.booleans())
    if isinstance(host, dict):
        if as_member:
            host[SENTINEL_KEY] = 0
        else:
            fresh = hostile_strings(max_long=100, max_size=12).filter(
                lambda key: key not in host and key not in RESERVED_KEYS
            )
            host[draw(fresh)] = SENTINEL_VALUE
    else:
        host.insert(draw(st.integers(0, len(host))), SENTINEL_VALUE)
    ascii_ = draw(st.booleans())
    item, key = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    text = json.dumps(tree, ensure_ascii=ascii_, separators=(item, key))
    if as_member:
        placeholder = json.dumps(SENTINEL_KEY, ensure_ascii=ascii_) + key + "0"
        return text.replace(placeholder, draw(members), 1)
    return text.replace(json.dumps(SENTINEL_VALUE, ensure_ascii=ascii_), draw(values), 1)


def hostile_json_text(max_depth: int = 4) -> st.SearchStrategy[str]:
    """JSON-looking text with at least one defect the strict parser must refuse."""
    containers = st.one_of(
        hostile_objects(max_depth, max_long=2000),
        st.lists(hostile_values(max_depth - 1, max_long=2000), max_size=4),
    )
    return st.one_of(containers.flatmap(poisoned), poison_values())


INVALID_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\xaf",  # overlong '/'
    b"\xc0\x80",  # overlong NUL
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",  # an encoded surrogate (CESU-8)
    b"\xed\xbf\xbf",
    b"\xe2\x82",  # truncated
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf8\x88\x80\x80\x80",
)


@st.composite
def with_invalid_utf8(draw: st.DrawFn, text: str) -> bytes:
    """`text` as UTF-8 with one sequence that is not UTF-8 spliced in at a character
    boundary (one only: two fragments side by side can make a valid character)."""
    at = draw(st.integers(0, len(text)))
    return text[:at].encode() + draw(st.sampled_from(INVALID_UTF8)) + text[at:].encode()


def garbage_text() -> st.SearchStrategy[str]:
    """One line of text that is not JSON (for line-framed transports: no newline)."""

    def is_not_json(text: str) -> bool:
        if not text.strip(" \t\r\x0b\x0c"):
            return False
        try:
            json.loads(text)
        except ValueError:
            return True
        return False

    return st.one_of(
        st.text(st.characters(codec="utf-8", exclude_characters="\n"), min_size=1, max_size=80),
        st.text(st.sampled_from(ODD_CHARACTERS + '{}[]":,'), min_size=1, max_size=80),
    ).filter(is_not_json)


# --------------------------------------------------------------------------------------
# Protobuf wire format.

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


def encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


WireField = tuple[int, int, bytes]  # (field number, wire type, payload as on the wire)


def parse_fields(data: bytes) -> list[WireField] | None:
    """The top-level fields of a serialised message, or None if it is not one."""
    fields: list[WireField] = []
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _read_varint(data, pos)
            number, wire = tag >> 3, tag & 7
            start = pos
            if wire == VARINT:
                _, pos = _read_varint(data, pos)
            elif wire == I64:
                pos += 8
            elif wire == I32:
                pos += 4
            elif wire == LEN:
                length, pos = _read_varint(data, pos)
                pos += length
                start = pos - length
            else:
                return None
            if number == 0 or pos > len(data):
                return None
            fields.append((number, wire, data[start:pos]))
    except ValueError:
        return None
    return fields


def encode_field(number: int, wire: int, payload: bytes) -> bytes:
    tag = encode_varint((number << 3) | wire)
    if wire == LEN:
        return tag + encode_varint(len(payload)) + payload
    return tag + payload


def encode_fields(fields: list[WireField]) -> bytes:
    return b"".join(encode_field(*field) for field in fields)


def deep_struct_field(number: int, depth: int) -> bytes:
    """Field `number` holding a google.protobuf.Struct nested `depth` levels deep
    ({"a": {"a": ...}}) — past protobuf's recursion limit (100) when depth is large."""
    struct_bytes = b""
    for _ in range(depth):
        value = encode_field(5, LEN, struct_bytes)  # Value.struct_value
        entry = encode_field(1, LEN, b"a") + encode_field(2, LEN, value)  # FieldsEntry
        struct_bytes = encode_field(1, LEN, entry)  # Struct.fields
    return encode_field(number, LEN, struct_bytes)


HUGE_LENGTHS = (2**31 - 1, 2**31, 2**32, 2**32 + 5, 2**63 - 1, 2**64 - 1)
OVERLONG_VARINT = b"\xff" * 10 + b"\x01"  # 11 bytes: longer than any varint


def _mutate_nested(
    draw: st.DrawFn, fields: list[WireField], leaf: Callable[[bytes], bytes]
) -> list[WireField]:
    """Apply `leaf` to the payload of one length-delimited field, possibly inside a
    nested message (walking into payloads that parse as messages)."""
    candidates = [i for i, (_, wire, _) in enumerate(fields) if wire == LEN]
    if not candidates:
        return fields
    i = draw(st.sampled_from(candidates))
    number, wire, payload = fields[i]
    inner = parse_fields(payload) if payload else None
    if inner and draw(st.booleans()):
        payload = encode_fields(_mutate_nested(draw, inner, leaf))
    else:
        payload = leaf(payload)
    return [*fields[:i], (number, wire, payload), *fields[i + 1 :]]


@st.composite
def _one_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "flip",
                "overwrite",
                "insert",
                "delete",
                "utf8",
                "wire-type",
                "huge-length",
                "duplicate",
                "unknown-field",
                "field-zero",
                "garbage-tail",
            ]
        )
    )
    fields = parse_fields(data) or []
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip" and data:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            bit = draw(st.integers(0, len(out) * 8 - 1))
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)
    if kind == "overwrite" and data:
        at = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        return data[:at] + chunk + data[at + len(chunk) :]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if kind == "delete" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + data[at + draw(st.integers(1, 8)) :]
    if kind == "utf8" and fields:

        def splice(payload: bytes) -> bytes:
            at = draw(st.integers(0, len(payload)))
            return payload[:at] + draw(st.sampled_from(INVALID_UTF8)) + payload[at:]

        return encode_fields(_mutate_nested(draw, fields, splice))
    if kind == "wire-type" and fields:
        i = draw(st.integers(0, len(fields) - 1))
        number, wire, payload = fields[i]
        new_wire = draw(st.sampled_from([w for w in range(8) if w != wire]))
        raw_value = encode_field(number, wire, payload)[len(encode_varint(number << 3 | wire)) :]
        changed = encode_varint((number << 3) | new_wire) + raw_value
        return encode_fields(fields[:i]) + changed + encode_fields(fields[i + 1 :])
    if kind == "huge-length" and any(wire == LEN for _, wire, _ in fields):
        i = draw(st.sampled_from([i for i, f in enumerate(fields) if f[1] == LEN]))
        number, _, payload = fields[i]
        prefix = draw(
            st.one_of(st.sampled_from(HUGE_LENGTHS).map(encode_varint), st.just(OVERLONG_VARINT))
        )
        changed = encode_varint((number << 3) | LEN) + prefix + payload
        return encode_fields(fields[:i]) + changed + encode_fields(fields[i + 1 :])
    if kind == "duplicate" and fields:
        field = draw(st.sampled_from(fields))
        return data + encode_field(*field)
    if kind == "unknown-field":
        number = draw(st.sampled_from([99, 1000, 19000, 19999, 2**29 - 1]))
        wire = draw(st.sampled_from([VARINT, I64, LEN, I32]))
        payload = {VARINT: b"\x01", I64: b"\x00" * 8, I32: b"\x00" * 4}.get(wire, b"xyz")
        return data + encode_field(number, wire, payload)
    if kind == "field-zero":
        return data + b"\x00\x01"
    return data + draw(st.binary(min_size=1, max_size=16))


@st.composite
def protobuf_mutations(draw: st.DrawFn, valid: bytes, *, deep_field: int | None = None) -> bytes:
    """`valid` (a serialised message) after one to three wire-level mutations; with
    `deep_field`, sometimes that field as a Struct nested past the recursion limit."""
    if deep_field is not None and draw(st.integers(0, 9)) == 0:
        return valid + deep_struct_field(deep_field, draw(st.integers(90, 400)))
    data = valid
    for _ in range(draw(st.integers(1, 3))):
        data = draw(_one_mutation(data))
    return data


def protobuf_noise(valid: bytes, *, deep_field: int | None = None) -> st.SearchStrategy[bytes]:
    """Raw bytes for a method: random bytes, or mutations of its valid request."""
    return st.one_of(
        st.binary(max_size=256),
        protobuf_mutations(valid, deep_field=deep_field),
    )


# --------------------------------------------------------------------------------------
# Requests of this service's API, built from the above.

COPY_ARGS: dict[str, Any] = {
    "datastore_id": DATASTORE,
    "source_image_set_id": IMAGE_SET,
    "copy_image_set_information": {"sourceImageSet": {"latestVersionId": "1"}},
}
HEX_ID = re.compile(r"[0-9a-f]{32}")
OTHER_SESSION = "s-fuzz-other-session"  # a second principal in duplicate-member bodies


def request_ids() -> st.SearchStrategy[int | str]:
    """JSON-RPC request ids that are usable (a string or an integer), odd ones included."""
    return st.one_of(hostile_ints(), hostile_strings(max_long=2000))


def extra_arguments() -> st.SearchStrategy[dict[str, Any]]:
    """Hostile arguments the shipped policy does not look at (none of copy_image_set's)."""
    return st.dictionaries(
        hostile_strings(max_long=300).filter(lambda key: key not in COPY_ARGUMENT_NAMES),
        hostile_values(4),
        max_size=3,
    )


def tools_call(request_id: int | str, name: str, arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def fuzz_agent(session_id: str) -> str:
    """The agent of `session_id`'s calls: the session's own, so that no two sessions share
    the shipped per-agent copy limit (20 a minute) by accident."""
    return f"fuzz-agent-{session_id}"


def _members(session_id: str) -> dict[str, str]:
    """A valid decide body's members as JSON text (an allowed copy for `session_id`)."""
    return {
        "server": json.dumps(HEALTHIMAGING),
        "tool": json.dumps("copy_image_set"),
        "arguments": json.dumps(COPY_ARGS),
        "principal": json.dumps({"agent_id": fuzz_agent(session_id), "session_id": session_id}),
    }


def _join(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(name)}:{text}" for name, text in members) + "}"


BODY_PLACEMENTS = (
    "arguments",
    "context",
    "message-text",
    "message-object",
    "field",
    "principal",
    "top-level",
    "whole",
    "utf8",
)


@st.composite
def malformed_decide_bodies(
    draw: st.DrawFn,
    session_id: str,
    *,
    placements: tuple[str, ...] = BODY_PLACEMENTS,
    values: st.SearchStrategy[str] | None = None,
    members: st.SearchStrategy[str] | None = None,
) -> bytes:
    """A POST /v1/decide body for an allowed copy by `session_id`, made malformed by one
    poison (see `poisoned`) in its arguments, context, message (as text or object), a
    field, the principal, a duplicate top-level member, the whole text (truncated,
    trailing data, not an object, nested) or bytes that are not UTF-8.

    With `values` and `members` (benign stand-ins) and the first four placements, the
    body is the valid request it was made from, give or take a harmless extra key."""
    poison = {"values": values, "members": members}
    body = _members(session_id)
    placement = draw(st.sampled_from(placements))
    arguments = {**COPY_ARGS, "notes": draw(hostile_values(3))}
    if placement == "arguments":
        body["arguments"] = draw(poisoned(arguments, **poison))
    elif placement == "context":
        body["context"] = draw(poisoned({"trace": draw(hostile_values(3))}, **poison))
    elif placement in ("message-text", "message-object"):
        call = tools_call(draw(request_ids()), "copy_image_set", arguments)
        text = draw(poisoned(call, **poison))
        del body["tool"], body["arguments"]
        body["message"] = (
            json.dumps(text, ensure_ascii=draw(st.booleans()))
            if placement == "message-text"
            else text
        )
    elif placement == "field":
        name = draw(st.sampled_from(["tool", "server", "approval_id", "dry_run", "message"]))
        body[name] = draw(poison_values() if values is None else values)
    elif placement == "principal":
        body["principal"] = draw(
            poisoned({"agent_id": fuzz_agent(session_id), "session_id": session_id}, **poison)
        )
    elif placement == "top-level":
        items = list(body.items())
        duplicate = draw(
            st.sampled_from(
                [
                    ("tool", json.dumps("delete_datastore")),
                    ("tool", json.dumps("copy_image_set")),
                    ("server", json.dumps(VALKEY)),
                    ("arguments", json.dumps({})),
                    ("arguments", json.dumps(COPY_ARGS)),
                    ("principal", json.dumps({"session_id": OTHER_SESSION})),
                    ("principal", json.dumps({"session_id": session_id})),
                    ("dry_run", "true"),
                ]
            )
        )
        if duplicate[0] not in body:  # a member the body lacks: give it twice
            items.insert(draw(st.integers(0, len(items))), (duplicate[0], "false"))
        items.insert(draw(st.integers(0, len(items))), duplicate)
        text = _join(items)
        if draw(st.booleans()):  # or a poisoned member of its own
            text = text[:-1] + "," + draw(poison_members()) + "}"
        return text.encode()
    elif placement == "whole":
        clean = _join(list(body.items()))
        kind = draw(st.sampled_from(["truncated", "trailing", "not-an-object", "nested"]))
        if kind == "truncated":
            text = clean[: draw(st.integers(0, len(clean) - 1))]
        elif kind == "trailing":
            text = clean + draw(st.sampled_from([" x", "}", ",", "\x00", clean, "[]"]))
        elif kind == "not-an-object":
            text = draw(st.sampled_from([f"[{clean}]", json.dumps(clean), "null", "1", "[]"]))
        else:
            depth = draw(st.integers(30, 3000))
            text = "[" * depth + clean + "]" * depth
        return text.encode()
    text = _join(list(body.items()))
    if placement == "utf8":
        return draw(with_invalid_utf8(text))
    return text.encode()


def _not_a_copy_id(value: Any) -> bool:
    return not (isinstance(value, str) and HEX_ID.fullmatch(value))


@st.composite
def hostile_decide_bodies(draw: st.DrawFn, session_id: str) -> tuple[dict[str, Any], str]:
    """A valid decide body (a dict) with hostile values, and what the shipped policy must
    answer: `deny <rule>` (an odd tool or server name is an unknown tool; an odd
    datastore id is an invalid one), or `allow` for a dry run whose hostile content is in
    places the policy does not look at (arguments it ignores, context, principal)."""
    body: dict[str, Any] = {
        "server": HEALTHIMAGING,
        "tool": "copy_image_set",
        "arguments": dict(COPY_ARGS),
        "principal": {"agent_id": fuzz_agent(session_id), "session_id": session_id},
    }
    kind = draw(st.sampled_from(["tool", "server", "datastore", "payload"]))
    if kind == "tool":
        body["tool"] = draw(hostile_strings().filter(lambda s: s not in ("", "copy_image_set")))
        expected = "deny catalog.default"
    elif kind == "server":
        body["server"] = draw(
            hostile_strings(max_long=256).filter(
                lambda s: 0 < len(s) <= 256 and s not in (HEALTHIMAGING, VALKEY)
            )
        )
        expected = "deny catalog.default"
    elif kind == "datastore":
        body["arguments"]["datastore_id"] = draw(hostile_values(4).filter(_not_a_copy_id))
        expected = "deny copy_image_set.datastore_id_invalid"
    else:
        body["arguments"].update(draw(extra_arguments()))
        body["arguments"]["notes"] = draw(hostile_values(5))
        body["context"] = draw(hostile_objects(5))
        short = hostile_strings(max_long=256).filter(lambda s: 0 < len(s) <= 256)
        # odd ids, yet ids (tests/test_principal_ids.py has the spoiled ones)
        odd_id = short.filter(lambda s: principal_id_problem(s) is None)
        body["principal"]["agent_id"] = draw(odd_id)
        body["principal"]["user_id"] = draw(odd_id)
        body["principal"]["roles"] = draw(
            st.lists(hostile_strings(max_long=256).filter(lambda s: len(s) <= 256), max_size=5)
        )
        body["dry_run"] = True
        expected = "allow"
    if draw(st.booleans()):  # the same call as a JSON-RPC message, as object or as text
        call = tools_call(draw(request_ids()), body.pop("tool"), body.pop("arguments"))
        body["message"] = json.dumps(call) if draw(st.booleans()) else call
    return body, expected


# --------------------------------------------------------------------------------------
# Lines an agent sends a stdio proxy.


def hostile_tools_calls() -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed JSON-RPC tools/call requests with hostile ids, names and arguments; some
    are copies the policy allows (valid ids, hostile content where the policy ignores it)."""
    allowed_shape = st.builds(
        lambda extra, notes: {**COPY_ARGS, **extra, "notes": notes},
        extra_arguments(),
        hostile_values(4),
    )
    calls = st.builds(
        tools_call,
        request_ids(),
        st.one_of(st.just("copy_image_set"), hostile_strings(max_long=2000)),
        st.one_of(allowed_shape, hostile_values(4)),
    )
    meta = st.fixed_dictionaries({"progressToken": hostile_values(2)})
    return st.tuples(calls, st.none() | meta).map(
        lambda pair: (
            pair[0]
            if pair[1] is None
            else {**pair[0], "params": {**pair[0]["params"], "_meta": pair[1]}}
        )
    )


@dataclass(frozen=True)
class AgentLine:
    """One line for the proxy and the answer it must get: `parse-error` (-32700, id null),
    `invalid` (-32600 with `request_id`, null when the line has no usable id), `answer`
    (a result or an error with `request_id`) or `none` (a notification). `call` is the
    message of a well-formed tools/call line."""

    data: bytes
    expect: str
    request_id: int | str | None = None
    call: dict[str, Any] | None = None


BAD_IDS: tuple[Any, ...] = (None, True, False, 1.5, 1e20, -0.0, {}, [], [1], {"id": 1})


@st.composite
def agent_lines(draw: st.DrawFn) -> AgentLine:
    call = draw(hostile_tools_calls())
    ascii_ = draw(st.booleans())

    def dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=ascii_).encode()

    kind = draw(
        st.sampled_from(
            [
                "call",
                "call",
                "poisoned",
                "garbage",
                "not-utf8",
                "batch",
                "bad-id",
                "notification",
                "not-a-message",
                "not-an-object",
                "other-notification",
            ]
        )
    )
    if kind == "call":
        return AgentLine(dumps(call), "answer", call["id"], call)
    if kind == "poisoned":
        return AgentLine(draw(poisoned(call)).encode(), "parse-error")
    if kind == "garbage":
        return AgentLine(draw(garbage_text()).encode(), "parse-error")
    if kind == "not-utf8":
        return AgentLine(draw(with_invalid_utf8(json.dumps(call))), "parse-error")
    if kind == "batch":
        return AgentLine(dumps(draw(st.sampled_from([[call], [call, call], []]))), "invalid")
    if kind == "bad-id":
        return AgentLine(dumps({**call, "id": draw(st.sampled_from(BAD_IDS))}), "invalid")
    if kind == "notification":
        return AgentLine(dumps({k: v for k, v in call.items() if k != "id"}), "invalid")
    if kind == "not-a-message":
        broken = draw(
            st.sampled_from(
                [
                    {"jsonrpc": "1.0"},
                    {"jsonrpc": 2.0},
                    {"jsonrpc": None},
                    {"method": 7},
                    {"method": None},
                    {"result": {}},
                    {"error": {"code": 1, "message": "x"}},
                ]
            )
        )
        message = {**call, **broken}
        if draw(st.booleans()) and "jsonrpc" in broken:
            del message["jsonrpc"]
        return AgentLine(dumps(message), "invalid", call["id"])
    if kind == "other-notification":  # relayed, never answered
        method, key = draw(
            st.sampled_from(
                [
                    ("notifications/cancelled", "requestId"),
                    ("notifications/progress", "progressToken"),
                ]
            )
        )
        params = {key: draw(hostile_values(2)), "reason": draw(hostile_strings(max_long=2000))}
        return AgentLine(dumps({"jsonrpc": "2.0", "method": method, "params": params}), "none")
    scalar = draw(st.one_of(st.none(), st.booleans(), hostile_ints(), hostile_strings()))
    return AgentLine(dumps(scalar), "invalid")
