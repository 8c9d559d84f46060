"""Redactions applied to a tool result: what `data.mcp.result_decision` said to replace.

The result policy answers `redact` with a list of entries, each a JSONPath (RFC 9535
subset: `$`, `.name`, `['name']`, `[n]`, `[*]`, `.*`, `..name`, `..['name']`, `..*`,
`..[n]`, `..[*]`) or an RE2 pattern, with a replacement and the rule that asked. Here they
are read (`redactions_of`, malformed entries are BadRedaction) and applied (`apply`) to a
copy of the `CallToolResult`; the input is never changed.

Where (issue 24 contract §3):
- Documents: `structuredContent` (and an object or array under any key MCP does not define,
  in the result or in a content block); a text block's `text` and a resource's `text` that
  hold JSON (an object or array); and anywhere in the result or inside a document, a string
  that is itself a document: JSON text, a JSON string literal of such text (JSON escaped
  twice), base64 of JSON, or base64 of gzip of JSON (HealthImaging's
  `image_set_metadata_blob`), nested up to MAX_EMBEDDING deep. A changed embedded document
  is written back as it came (compact JSON; base64 with the same alphabet, padding and line
  wrapping; gzip); an unchanged one keeps its exact text. A long one that occurs twice (the
  blob is in structuredContent and in the text block) is decoded and rewritten once.
- Paths apply at the root of every document, matched against the keys as the tool wrote
  them (names are exact and case-sensitive); the value is replaced whole. The first entry
  (in order) that selects a value replaces it and counts it.
- Patterns replace their matches in every string of every document, keys too, and in text
  and resource text that is not JSON; never in `_meta`, block types, URIs or binary data.
  The replacement is literal ($1 is $1). A pattern that matches the empty string is refused
  (it would replace between every two characters).
- Then every string a path redacted (>= MIN_SWEEP characters with a letter, or
  >= MIN_SWEEP_DIGITS without one; leaf strings of redacted
  objects and arrays too) is replaced wherever it still occurs, as a substring of any value
  or key anywhere in the result (decoded documents included), counted for its entry.
- Finally, the name a path ends in (PatientName of `$..PatientName`) still found in a
  string value that is not a document (prose, JSON that does not parse, a decoded payload
  that is not JSON) means the result cannot be redacted safely: `Applied.unredactable`
  says why and the result must not be forwarded (the service blocks it,
  `result.unredactable`). So does anything that cannot be checked whole: nesting past
  MAX_DEPTH, documents embedded past MAX_EMBEDDING, more than `max_decoded_bytes` decoded
  or parsed (gzip bombs are cut off as they inflate), a gzip stream that does not decode,
  a redacted value in a decoded payload that is not JSON, and a redacted value or name in
  `_meta` (forwarded as it is, less an upstream copy of the engine's own key). Nothing
  here raises on any input: a fault is reported as unredactable (fail closed).

Not covered: other encodings (base64 of plain text, hex, URL-encoding, a JSON document
inside prose) and names in another case or spelling; the name check stands guard where a
name shows, the sweep where a redacted value does.

Cost (this runs on every redacted answer): one walk per document, no recursion (deep input
cannot overflow the stack), the path automaton's transitions worked out once per set of
path positions, cheap tests (first character, length, a 6-byte base64 head) before any
decoding, and the pattern, sweep and name searches done once over the joined strings of
the whole result, string by string only where that finds something. Compiled paths,
patterns and their automaton are cached (bounded LRU) across calls.
"""

from __future__ import annotations

import binascii
import functools
import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from engine.jsonstrict import quote

DEFAULT_REPLACEMENT = "[REDACTED]"
# Nesting levels of one document (or of the result around its documents): past this the
# result is not walked further, and so cannot be redacted safely.
MAX_DEPTH = 64
# Documents inside documents (escaped JSON in a string, base64, base64 of gzip), counted
# from the result: past this a document is not decoded further, so cannot be redacted.
MAX_EMBEDDING = 8
# Redacted strings shorter than this are not swept from the rest of the result (a sex of
# "M" is not replaced in every word); those without a letter only from MIN_SWEEP_DIGITS on:
# a weight of "61.2" would be cut out of every DICOM UID that happens to hold those digits,
# while a birth date or a numeric patient id is long enough to be swept.
MIN_SWEEP = 4
MIN_SWEEP_DIGITS = 8
# The key the engine writes its decision under in `_meta`; an upstream copy is dropped.
ENGINE_META_KEY = "mcp-policy/result-decision"
# Longest path accepted, in steps (deeper ones could never match within MAX_DEPTH).
MAX_PATH_STEPS = MAX_DEPTH
# Swept values longer than this are searched with str.find rather than in the one RE2
# alternation (whose program grows with the bytes it holds).
_LONG_VALUE = 4096
# Documents at least this long that occur more than once are decoded once.
_MEMO_LENGTH = 1024
_CACHE_SIZE = 256


@dataclass(frozen=True)
class Redaction:
    rule: str
    path: str | None
    pattern: str | None
    replacement: str


@dataclass(frozen=True)
class Applied:
    result: dict[str, Any]
    counts: tuple[int, ...]  # values replaced, one per redaction, in their order
    unredactable: str | None  # why the result cannot be redacted safely (then do not use it)


class BadRedaction(ValueError):
    """A redaction entry that cannot be applied; the message says which and why."""


class _Unredactable(Exception):
    """Raised inside `apply` when the result cannot be redacted safely."""


# --------------------------------------------------------------------------------------
# Reading the entries.


def redactions_of(entries: Sequence[Any]) -> list[Redaction]:
    """The policy's `redactions` list as Redaction objects; BadRedaction naming the entry
    and what is wrong with it (not a list of objects, no rule, both or neither of path and
    pattern, a path outside the grammar, a pattern RE2 refuses, a replacement that is not a
    string). Paths and patterns are compiled here (and cached), so `apply` does not fail
    on them."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise BadRedaction(f"redactions is not a list (got {type(entries).__name__})")
    out = []
    for i, entry in enumerate(entries):
        where = f"redactions[{i}]"
        if not isinstance(entry, Mapping):
            raise BadRedaction(f"{where} is not an object")
        rule = entry.get("rule")
        if not isinstance(rule, str) or not rule:
            raise BadRedaction(f"{where} has no rule id (a non-empty string)")
        where = f"{where} (rule {quote(rule)})"
        has_path, has_pattern = "path" in entry, "pattern" in entry
        if has_path == has_pattern:
            raise BadRedaction(
                f"{where} has {'both' if has_path else 'neither'} of path and pattern; "
                "it needs exactly one"
            )
        replacement = entry.get("replacement", DEFAULT_REPLACEMENT)
        if not isinstance(replacement, str):
            raise BadRedaction(f"{where}: replacement is not a string")
        if not isinstance(entry.get("block_if_found", False), bool):
            raise BadRedaction(f"{where}: block_if_found is not a boolean")
        path, pattern = entry.get("path"), entry.get("pattern")
        try:
            if has_path:
                if not isinstance(path, str) or not path:
                    raise BadRedaction("path is not a non-empty string")
                _parsed_path(path)
            else:
                if not isinstance(pattern, str) or not pattern:
                    raise BadRedaction("pattern is not a non-empty string")
                _compiled_pattern(pattern)
        except BadRedaction as exc:
            raise BadRedaction(f"{where}: {exc}") from None
        out.append(Redaction(rule, path, pattern, replacement))
    return out


@dataclass(frozen=True)
class _Step:
    """One segment of a path: a name, an index or (both None) a wildcard; `descend` for
    the recursive-descent form (`..`)."""

    descend: bool
    name: str | None = None
    index: int | None = None


_BLANK = " \t\n\r"
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "/": "/", "\\": "\\"}
_MAX_INDEX = 2**53 - 1


def _name_first(c: str) -> bool:
    return (
        ("A" <= c <= "Z")
        or ("a" <= c <= "z")
        or c == "_"
        or (c >= "\x80" and not "\ud800" <= c <= "\udfff")
    )


class _PathReader:
    """RFC 9535's grammar for the subset the contract allows, read left to right."""

    def __init__(self, path: str) -> None:
        self.path, self.i = path, 0

    def fail(self, what: str) -> BadRedaction:
        return BadRedaction(f"path {quote(self.path)}: {what} at character {self.i}")

    def peek(self, ahead: int = 0) -> str:
        at = self.i + ahead
        return self.path[at] if at < len(self.path) else ""

    def blank(self) -> None:
        while self.peek() and self.peek() in _BLANK:
            self.i += 1

    def steps(self) -> tuple[_Step, ...]:
        if self.peek() != "$":
            raise self.fail("a path starts with $")
        self.i += 1
        steps = []
        while True:
            self.blank()
            if not self.peek():
                break
            if self.path.startswith("..", self.i):
                self.i += 2
                steps.append(self.after_dot(descend=True))
            elif self.peek() == ".":
                self.i += 1
                steps.append(self.after_dot(descend=False))
            elif self.peek() == "[":
                steps.append(self.bracket(descend=False))
            else:
                raise self.fail(f"unexpected {self.peek()!r}")
            if len(steps) > MAX_PATH_STEPS:
                raise self.fail(f"more than {MAX_PATH_STEPS} steps")
        if not steps:
            raise self.fail("the path selects the whole document; it must select inside it")
        return tuple(steps)

    def after_dot(self, descend: bool) -> _Step:
        c = self.peek()
        if c == "*":
            self.i += 1
            return _Step(descend)
        if descend and c == "[":
            return self.bracket(descend=True)
        if not _name_first(c):
            raise self.fail("a name, * or [ must follow the dot")
        start = self.i
        while self.peek() and (
            _name_first(self.peek()) or self.peek().isascii() and self.peek().isdigit()
        ):
            self.i += 1
        return _Step(descend, name=self.path[start : self.i])

    def bracket(self, descend: bool) -> _Step:
        self.i += 1  # [
        self.blank()
        c = self.peek()
        if c in ("'", '"'):
            step = _Step(descend, name=self.string(c))
        elif c == "*":
            self.i += 1
            step = _Step(descend)
        elif c == "-" or (c.isascii() and c.isdigit() and c):
            step = _Step(descend, index=self.integer())
        else:
            raise self.fail("expected a quoted name, an index or * in brackets")
        self.blank()
        if self.peek() != "]":
            raise self.fail("expected ] (one selector per bracket; no filters, slices or lists)")
        self.i += 1
        return step

    def integer(self) -> int:
        start = self.i
        if self.peek() == "-":
            self.i += 1
        digits = self.i
        while self.peek().isascii() and self.peek().isdigit() and self.peek():
            self.i += 1
        text = self.path[start : self.i]
        body = self.path[digits : self.i]
        if not body or (body[0] == "0" and (len(body) > 1 or text.startswith("-"))):
            raise self.fail(f"{text!r} is not an index")
        if len(body) > 16 or abs(int(text)) > _MAX_INDEX:
            raise self.fail("index out of range")
        return int(text)

    def string(self, delimiter: str) -> str:
        self.i += 1
        out: list[str] = []
        while True:
            c = self.peek()
            if not c:
                raise self.fail("unterminated string")
            self.i += 1
            if c == delimiter:
                return "".join(out)
            if c == "\\":
                e = self.peek()
                self.i += 1
                if e in _ESCAPES:
                    out.append(_ESCAPES[e])
                elif e == delimiter:
                    out.append(e)
                elif e == "u":
                    out.append(self.unicode_escape())
                else:
                    raise self.fail(f"invalid escape \\{e}")
            elif c < " " or "\ud800" <= c <= "\udfff":
                raise self.fail("a control character or lone surrogate in a name")
            else:
                out.append(c)

    def hex4(self) -> int:
        text = self.path[self.i : self.i + 4]
        if len(text) != 4 or any(ch not in "0123456789abcdefABCDEF" for ch in text):
            raise self.fail("\\u needs four hex digits")
        self.i += 4
        return int(text, 16)

    def unicode_escape(self) -> str:
        code = self.hex4()
        if 0xDC00 <= code <= 0xDFFF:
            raise self.fail("a lone low surrogate escape")
        if 0xD800 <= code <= 0xDBFF:
            if not self.path.startswith("\\u", self.i):
                raise self.fail("a high surrogate escape without its low half")
            self.i += 2
            low = self.hex4()
            if not 0xDC00 <= low <= 0xDFFF:
                raise self.fail("a high surrogate escape without its low half")
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        return chr(code)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parsed_path(path: str) -> tuple[_Step, ...]:
    return _PathReader(path).steps()


def _options(latin1: bool = False, max_mem: int | None = None) -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported as BadRedaction, not logged
    if latin1:
        options.encoding = re2.Options.Encoding.LATIN1
    if max_mem is not None:
        options.max_mem = max_mem
    return options


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compiled_pattern(pattern: str) -> Any:
    try:
        compiled = re2.compile(pattern, _options())
    except (re2.error, UnicodeEncodeError) as exc:
        raise BadRedaction(f"pattern {quote(pattern)} is not valid RE2 syntax: {exc}") from None
    if compiled.search(b"") is not None:
        raise BadRedaction(
            f"pattern {quote(pattern)} matches the empty string (it would replace nothing "
            "everywhere)"
        )
    return compiled


def _literals(values: Sequence[bytes], *, max_mem: int | None = None) -> Any:
    """One RE2 (Latin-1: byte for byte) matching any of `values`, longest first, so that at
    any place the longest value found there is the one matched."""
    ordered = sorted(set(values), key=len, reverse=True)
    pattern = b"|".join(re2.escape(value) for value in ordered)
    compiled = re2.compile(pattern, _options(latin1=True, max_mem=max_mem))
    # Not left in re2's own cache: swept values are the result's (patient) data.
    re2.purge()
    return compiled


def _encode(text: str) -> bytes:
    """UTF-8, with lone surrogates (which JSON escapes can carry) kept as they are."""
    return text.encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------------------
# The path automaton: a node is reached at a set of places (path number, step number);
# each set's transitions are worked out once, when first needed.


def _first(a: int | None, b: int | None) -> int | None:
    """The earlier of two redaction entries (the first in order wins a value)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


class _State:
    """One set of places: for each member name (or array index) a path step selects, the
    state its value is reached at and the entry that redacts it, if one does. Built when
    first used; two threads building one state at once only do the work twice."""

    def __init__(self, program: _Program, places: frozenset[tuple[int, int]]) -> None:
        self.program, self.places = program, places
        self.ready = False
        # member name -> (state of the member, entry that redacts it or None)
        self.names: dict[Any, tuple[_State, int | None]] = {}
        # any other member or element
        self.other: tuple[_State, int | None] = (self, None)
        self.indexes: list[tuple[int, frozenset[tuple[int, int]], int | None]] = []
        self.base: frozenset[tuple[int, int]] = frozenset()
        self.wild_target: int | None = None

    def build(self) -> None:
        wild_target: int | None = None
        keep: set[tuple[int, int]] = set()
        wild: set[tuple[int, int]] = set()
        named: dict[str, set[tuple[int, int]]] = {}
        named_target: dict[str, int | None] = {}
        indexed: dict[int, tuple[set[tuple[int, int]], int | None]] = {}
        for p, j in self.places:
            steps, entry = self.program.paths[p]
            step = steps[j]
            if step.descend:
                keep.add((p, j))
            last = j + 1 == len(steps)
            if step.name is not None:
                if last:
                    named_target[step.name] = _first(named_target.get(step.name), entry)
                    named.setdefault(step.name, set())
                else:
                    named.setdefault(step.name, set()).add((p, j + 1))
            elif step.index is not None:
                nxt, target = indexed.get(step.index, (set(), None))
                if last:
                    target = _first(target, entry)
                else:
                    nxt.add((p, j + 1))
                indexed[step.index] = (nxt, target)
            elif last:
                wild_target = _first(wild_target, entry)
            else:
                wild.add((p, j + 1))
        base = frozenset(keep | wild)
        state = self.program.state
        self.names = {
            name: (state(base | places), _first(wild_target, named_target.get(name)))
            for name, places in named.items()
        }
        self.indexes = [(i, frozenset(nxt), target) for i, (nxt, target) in indexed.items()]
        self.base, self.wild_target = base, wild_target
        self.other = (state(base), wild_target)
        self.ready = True

    def element(self, i: int, length: int) -> tuple[_State, int | None]:
        """The state and target of element `i` of an array of `length` (after build)."""
        if not self.indexes:
            return self.other
        places, target = set(self.base), self.wild_target
        for index, nxt, entry in self.indexes:
            if index == i or (index < 0 and length + index == i):
                places |= nxt
                target = _first(target, entry)
        return self.program.state(frozenset(places)), target


_MAX_STATES = 4096


class _Program:
    """The compiled form of one list of redactions (cached: a steady policy compiles once)."""

    def __init__(self, redactions: tuple[Redaction, ...]) -> None:
        self.redactions = redactions
        self.replacements = [r.replacement for r in redactions]
        self.paths: list[tuple[tuple[_Step, ...], int]] = []
        self.patterns: list[tuple[int, Any, bool, Any]] = []
        names: dict[str, None] = {}
        for entry, r in enumerate(redactions):
            if r.path is not None and r.pattern is None:
                steps = _parsed_path(r.path)
                self.paths.append((steps, entry))
                if steps[-1].name:  # a path ending in [n] or * names nothing to look for
                    names[steps[-1].name] = None
            elif r.pattern is not None and r.path is None:
                joinable, multiline = _joinable(r.pattern)
                probe = _probe(multiline) if multiline is not None else None
                self.patterns.append((entry, _compiled_pattern(r.pattern), joinable, probe))
            else:
                raise BadRedaction(f"redaction {entry} needs exactly one of path and pattern")
        self.names = tuple(names)
        self.name_search = _literals([_encode(n) for n in self.names]) if names else None
        self.states: dict[frozenset[tuple[int, int]], _State] = {}
        self.empty = self.state(frozenset())
        self.root = self.state(frozenset((p, 0) for p in range(len(self.paths))))

    def state(self, places: frozenset[tuple[int, int]]) -> _State:
        found = self.states.get(places)
        if found is None:
            found = _State(self, places)
            if len(self.states) < _MAX_STATES:
                self.states[places] = found
        return found


def _joinable(pattern: str) -> tuple[bool, str | None]:
    """Whether a match of `pattern` in one string is sure to show as a match in the strings
    joined with newlines (so one search over the joined text can rule out every string):
    true unless it anchors to the text's ends (\\A, \\z) or may turn multi-line mode off;
    with the multi-line variant to search with when it uses ^ or $."""
    if "\\A" in pattern or "\\z" in pattern or "-" in _flag_groups(pattern):
        return False, None
    if "^" in pattern or "$" in pattern:
        return True, "(?m)" + pattern
    return True, None


def _flag_groups(pattern: str) -> str:
    """The flag letters of every `(?flags)` / `(?flags:` group in `pattern`, concatenated."""
    out = []
    start = pattern.find("(?")
    while start != -1:
        end = start + 2
        while end < len(pattern) and pattern[end] not in ":)":
            end += 1
        out.append(pattern[start + 2 : end])
        start = pattern.find("(?", end)
    return "".join(out)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _probe(pattern: str) -> Any:
    """The multi-line variant of a pattern, to search joined strings with."""
    return re2.compile(pattern, _options())


@functools.lru_cache(maxsize=64)
def _program(redactions: tuple[Redaction, ...]) -> _Program:
    return _Program(redactions)


# --------------------------------------------------------------------------------------
# Embedded documents.


class _B64:
    """How a base64 string was written, to write a changed document back the same way."""

    __slots__ = ("urlsafe", "padded", "width", "newline", "trailing")

    def __init__(
        self, urlsafe: bool, padded: bool, width: int, newline: str, trailing: bool
    ) -> None:
        self.urlsafe, self.padded = urlsafe, padded
        self.width, self.newline, self.trailing = width, newline, trailing

    def encode(self, data: bytes) -> str:
        text = binascii.b2a_base64(data, newline=False).decode("ascii")
        if self.urlsafe:
            text = text.translate(_TO_URLSAFE)
        if not self.padded:
            text = text.rstrip("=")
        if self.width:
            lines = [text[i : i + self.width] for i in range(0, len(text), self.width)]
            text = self.newline.join(lines) + (self.newline if self.trailing else "")
        return text


_TO_URLSAFE = str.maketrans("+/", "-_")
_FROM_URLSAFE = str.maketrans("-_", "+/")
_GZIP = b"\x1f\x8b\x08"
# Fastest: a third of level 6's time on a MiB of DICOM metadata, for a tenth more bytes.
_GZIP_LEVEL = 1
_BOM = b"\xef\xbb\xbf"
_BYTES_BLANK = b" \t\r\n"
# First characters of a string that may be a document: JSON text, or base64 whose first
# byte is {, [, blank, a UTF-8 BOM or gzip's 0x1f.
_JSON_FIRST = frozenset("{[ \t\r\n")
_B64_FIRST = frozenset("eWICD7H")
_DOC_FIRST = _JSON_FIRST | _B64_FIRST | {'"'}  # and a JSON string literal holding one
# The fields MCP defines for a CallToolResult and its content blocks (schema 2025-11-25).
# An object or array under any other key is taken for a document (structured content by
# another name), under these it is not (besides structuredContent, which is one).
_RESULT_FIELDS = frozenset({"content", "isError", "_meta"})
_BLOCK_FIELDS = frozenset(
    {
        "type",
        "text",
        "data",
        "mimeType",
        "resource",
        "uri",
        "name",
        "title",
        "description",
        "size",
        "annotations",
        "icons",
        "_meta",
    }
)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A document with a duplicate key is not one: readers disagree on which value counts,
    # so it is checked as text (where the key's name makes it unredactable).
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique)


def _b64_bytes(text: str) -> tuple[bytes, _B64] | None:
    """`text` decoded as base64 (standard or URL-safe alphabet, padded or not, in lines of
    one width or not), with how it was written; None when it is not strictly base64."""
    newline = "\r\n" if "\r\n" in text else "\n" if "\n" in text else ""
    width, trailing, compact = 0, False, text
    if newline:
        trailing = text.endswith(newline)
        lines = (text[: -len(newline)] if trailing else text).split(newline)
        width = len(lines[0])
        if width == 0 or width % 4 or any(len(line) != width for line in lines[:-1]):
            return None
        if not 0 < len(lines[-1]) <= width:
            return None
        compact = "".join(lines)
    urlsafe = "-" in compact or "_" in compact
    if urlsafe:
        if "+" in compact or "/" in compact:
            return None
        compact = compact.translate(_FROM_URLSAFE)
    padded = compact.endswith("=") or len(compact) % 4 == 0
    if len(compact) % 4 == 1:
        return None
    compact += "=" * (-len(compact) % 4)
    try:
        data = binascii.a2b_base64(compact, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    return data, _B64(urlsafe, padded, width, newline, trailing)


def _b64_head(text: str) -> bytes | None:
    """The first 6 bytes `text` decodes to as base64, or None."""
    head = text[:8]
    if "-" in head or "_" in head:
        head = head.translate(_FROM_URLSAFE)
    try:
        return binascii.a2b_base64(head, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _dumps(value: Any, ascii_only: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))


def _utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Region:
    """A document (or the result around its documents): its rewritten value, the documents
    embedded in it (slots [container, key, region] to write their text back into), and
    whether anything in it changed."""

    __slots__ = (
        "kind",
        "original",
        "level",
        "value",
        "children",
        "changed",
        "b64",
        "bom",
        "height",
        "counted",
        "text",
    )

    def __init__(self, kind: str, original: str | None, level: int) -> None:
        self.kind = kind  # root (placed as is) | json | b64 | b64gz | quoted (a JSON string)
        self.original = original
        self.level = level
        self.value: Any = None
        self.children: list[list[Any]] = []
        self.changed = False
        self.b64: _B64 | None = None
        self.bom = False
        self.height = 1  # levels of documents it is, itself included
        self.counted: list[int] = []  # what paths replaced in it (to count each copy)
        self.text: str | None = None  # once materialised

    def encoded(self) -> str:
        """The document written back the way it came."""
        value = self.value[0] if self.kind == "quoted" else self.value
        text = _dumps(value)
        if self.kind in ("json", "quoted"):
            return text if _utf8(text) else _dumps(value, ascii_only=True)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \\u escape: escape it again
            data = _dumps(value, ascii_only=True).encode("ascii")
        if self.bom:
            data = _BOM + data
        if self.kind == "b64gz":
            packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
            data = packer.compress(data) + packer.flush()
        assert self.b64 is not None
        return self.b64.encode(data)


# --------------------------------------------------------------------------------------
# Applying.


def apply(
    result: Mapping[str, Any], redactions: Sequence[Redaction], *, max_decoded_bytes: int
) -> Applied:
    """`result` with `redactions` applied (module docstring), counts per redaction, or
    `unredactable` set (and an empty error result) when it cannot be redacted safely.
    Never raises; never changes `result`."""
    zeros = tuple(0 for _ in redactions)
    try:
        if not redactions:
            return Applied(dict(result), (), None)
        applier = _Applier(_program(tuple(redactions)), max_decoded_bytes)
        out = applier.run(result)
        return Applied(out, tuple(applier.counts), None)
    except _Unredactable as exc:
        why = str(exc)
    except BadRedaction as exc:
        why = f"the redactions are malformed: {exc}"
    except Exception as exc:  # never expected; fail closed all the same
        why = f"the result could not be walked ({type(exc).__name__})"
    return Applied({"content": [], "isError": True}, zeros, why)


class _Applier:
    def __init__(self, program: _Program, max_decoded_bytes: int) -> None:
        self.program = program
        self.counts = [0] * len(program.redactions)
        self.replacements = frozenset(program.replacements)
        self.budget = max_decoded_bytes
        self.decoded = 0
        # Every object and array written (in documents and around them), with its region
        # and whether patterns apply to its strings and keys: their string values that are
        # not documents are what patterns, the sweep and the name check look at.
        self.containers: list[tuple[Any, _Region, bool]] = []
        # Text and resource text that is not JSON: patterns apply (their block does not).
        self.texts: list[tuple[Any, Any, _Region]] = []
        # Those string values as the walk found them (patterns apply to the first list),
        # until anything is rewritten (then `values` reads them from the containers).
        self.found: tuple[list[str], list[str]] | None = ([], [])
        self.payloads: list[bytes] = []  # decoded content that is not a JSON document
        self.swept: dict[str, int] = {}  # redacted strings -> the entry that redacted them
        self.roots: list[_Region] = []
        self.memo: dict[str, _Region] = {}  # long documents by their text
        # The documents' slots by the object holding them, made when a key is first renamed.
        self.by_container: dict[int, list[list[Any]]] | None = None

    # -- the result and its parts ------------------------------------------------------

    def run(self, result: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(result, Mapping):
            raise _Unredactable("the result is not a JSON object")
        envelope = _Region("root", None, 0)
        meta = _Region("root", None, 0)
        out: dict[str, Any] = {}
        self.containers.append((out, envelope, False))
        for key, value in result.items():
            if key == "_meta":
                out[key] = self.meta(value, meta)
            elif key not in _RESULT_FIELDS and isinstance(value, (dict, list)):
                out[key] = self.structured(value)
            elif key == "content" and isinstance(value, list):
                blocks: list[Any] = list(value)
                out[key] = blocks
                self.containers.append((blocks, envelope, False))
                for i, block in enumerate(value):
                    self.block(block, envelope, blocks, i)
            else:
                self.plain(value, envelope, out, key)
        self.roots += (envelope, meta)
        self.apply_patterns()
        self.sweep()
        self.check_names()
        for region in self.roots:
            self.materialize(region)
        if meta.changed:
            raise _Unredactable(
                "_meta holds something the policy redacts, and _meta is forwarded unchanged"
            )
        return out

    def meta(self, value: Any, region: _Region) -> Any:
        """`_meta` as it is (less an upstream copy of the engine's key), walked only to
        find what the policy redacts in it (then the result is unredactable)."""
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != ENGINE_META_KEY}
        probe: dict[str, Any] = {}
        self.containers.append((probe, region, False))
        self.plain(value, region, probe, "_meta")
        return value

    def block(self, block: Any, region: _Region, container: list[Any], i: int) -> None:
        if not isinstance(block, dict):
            self.plain(block, region, container, i)
            return
        new: dict[Any, Any] = dict(block)
        container[i] = new
        self.containers.append((new, region, False))
        kind = block.get("type")
        for key, value in block.items():
            if key == "text" and kind == "text" and isinstance(value, str):
                self.text(value, region, new, key)
            elif key == "resource" and kind == "resource" and isinstance(value, dict):
                resource: dict[Any, Any] = dict(value)
                new[key] = resource
                self.containers.append((resource, region, False))
                for k, v in value.items():
                    if k == "text" and isinstance(v, str):
                        self.text(v, region, resource, k)
                    else:
                        self.plain(v, region, resource, k)
            elif key not in _BLOCK_FIELDS and isinstance(value, (dict, list)):
                new[key] = self.structured(value)
            else:
                self.plain(value, region, new, key)

    def structured(self, value: Any) -> Any:
        """A document that is JSON already (structuredContent, or an object or array under
        a key MCP does not define): walked from the paths' start."""
        region = _Region("root", None, 0)
        self.roots.append(region)
        region.value = self.walk(value, self.program.root, region, True)
        return region.value

    def text(self, value: str, region: _Region, container: Any, key: Any) -> None:
        """A text block's or resource's text: a document, or text patterns apply to."""
        container[key] = value
        if not self.document(value, region, container, key):
            self.texts.append((container, key, region))
            if self.found:
                self.found[1].append(value)

    def plain(self, value: Any, region: _Region, container: Any, key: Any) -> None:
        """Something outside any document (`container` is recorded): walked for the
        documents it may hold."""
        if isinstance(value, str):
            container[key] = value
            if not self.document(value, region, container, key) and self.found:
                self.found[1].append(value)
        elif isinstance(value, (dict, list)):
            container[key] = self.walk(value, self.program.empty, region, False)
        else:
            container[key] = value

    def document(self, value: str, region: _Region, container: Any, key: Any) -> bool:
        """Whether `value` (at container[key]) is a document; if so it is decoded and
        walked, and written back in place when materialised."""
        if len(value) > 1 and value[0] in _DOC_FIRST:
            doc = self.embedded(value, region)
            if doc is not None:
                container[key] = doc.value  # replaced by its text when materialised
                region.children.append([container, key, doc])
                return True
        return False

    # -- one document ------------------------------------------------------------------

    def walk(self, root: Any, state: _State, region: _Region, patterned: bool) -> Any:
        """A copy of `root` (an object or array) with the paths applied from `state`, its
        strings that are documents decoded and walked in turn."""
        top: Any = dict(root) if isinstance(root, dict) else list(root)
        stack: list[tuple[Any, Any, _State, int]] = [(root, top, state, 1)]
        replacements = self.program.replacements
        record = self.containers.append
        document = self.document
        assert self.found is not None  # walks come before any rewriting
        strings = self.found[0 if patterned else 1].append
        while stack:
            node, out, st, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise _Unredactable(f"it nests deeper than {MAX_DEPTH} levels")
            if not st.ready:
                st.build()
            record((out, region, patterned))
            names = st.names
            other, other_target = st.other
            child: Any
            if isinstance(out, dict):
                for key, value in node.items():
                    hit = names.get(key)
                    if hit is None:
                        nxt, target = other, other_target
                    else:
                        nxt, target = hit
                    if target is not None:
                        out[key] = replacements[target]
                        self.redacted(value, target, region)
                    elif isinstance(value, str):
                        if not (value and value[0] in _DOC_FIRST) or not document(
                            value, region, out, key
                        ):
                            strings(value)
                    elif isinstance(value, dict):
                        out[key] = child = dict(value)
                        stack.append((value, child, nxt, depth + 1))
                    elif isinstance(value, list):
                        out[key] = child = list(value)
                        stack.append((value, child, nxt, depth + 1))
            else:
                indexed = bool(st.indexes)
                length = len(node)
                nxt, target = other, other_target
                for i, value in enumerate(node):
                    if indexed:
                        nxt, target = st.element(i, length)
                    if target is not None:
                        out[i] = replacements[target]
                        self.redacted(value, target, region)
                    elif isinstance(value, str):
                        if not (value and value[0] in _DOC_FIRST) or not document(
                            value, region, out, i
                        ):
                            strings(value)
                    elif isinstance(value, dict):
                        out[i] = child = dict(value)
                        stack.append((value, child, nxt, depth + 1))
                    elif isinstance(value, list):
                        out[i] = child = list(value)
                        stack.append((value, child, nxt, depth + 1))
        return top

    def redacted(self, value: Any, entry: int, region: _Region) -> None:
        """Count a value replaced by a path, and keep its strings to sweep."""
        self.counts[entry] += 1
        region.changed = True
        stack = [value]
        while stack:
            node = stack.pop()
            if isinstance(node, str):
                if len(node) >= MIN_SWEEP_DIGITS or (
                    len(node) >= MIN_SWEEP and any(c.isalpha() for c in node)
                ):
                    self.swept.setdefault(node, entry)
            elif isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)

    # -- documents inside strings ------------------------------------------------------

    def spend(self, size: int) -> None:
        self.decoded += size
        if self.decoded > self.budget:
            raise _Unredactable(f"its embedded documents decode to more than {self.budget} bytes")

    def embedded(self, text: str, parent: _Region) -> _Region | None:
        """The document `text` holds (walked), or None when it holds none. A long one met
        again (HealthImaging's blob is in structuredContent and in the text block) is the
        same region: decoded, walked and written back once, its path counts counted for
        each copy."""
        known = self.memo.get(text) if len(text) >= _MEMO_LENGTH else None
        if known is not None and parent.level + known.height <= MAX_EMBEDDING:
            for entry, n in enumerate(known.counted):
                self.counts[entry] += n
            return known
        b64: _B64 | None = None
        bom = False
        if text[0] == '"':
            return self.quoted(text, parent)
        if text[0] in _JSON_FIRST:
            value = self.json_document(text)
            kind = "json"
        elif len(text) >= 8:
            found = self.base64_document(text)
            if found is None:
                return None
            value, kind, b64, bom = found
        else:
            return None
        if value is None:
            return None
        level = parent.level + 1
        if level > MAX_EMBEDDING:
            raise _Unredactable(f"documents are embedded more than {MAX_EMBEDDING} levels deep")
        region = _Region(kind, text, level)
        region.b64, region.bom = b64, bom
        memo = len(text) >= _MEMO_LENGTH
        before = list(self.counts) if memo else []
        region.value = self.walk(value, self.program.root, region, True)
        region.height = 1 + max((slot[2].height for slot in region.children), default=0)
        if memo:
            region.counted = [now - then for now, then in zip(self.counts, before, strict=True)]
            self.memo[text] = region
        return region

    def quoted(self, text: str, parent: _Region) -> _Region | None:
        """A JSON string literal whose string is a document (JSON escaped twice: the text
        of the text of a document), or None."""
        if text[-1] != '"':
            return None
        self.spend(len(text))
        try:
            inner = _DECODER.decode(text)
        except ValueError:
            return None
        if not isinstance(inner, str) or len(inner) < 2 or inner[0] not in _DOC_FIRST:
            return None
        level = parent.level + 1
        if level > MAX_EMBEDDING:
            raise _Unredactable(f"documents are embedded more than {MAX_EMBEDDING} levels deep")
        region = _Region("quoted", text, level)
        region.value = [inner]
        if not self.document(inner, region, region.value, 0):
            return None
        region.height = 1 + region.children[0][2].height
        return region

    def json_document(self, text: str) -> Any:
        """The object or array `text` is the JSON of, or None."""
        if not text:
            return None
        last = text[-1]
        if last not in "}]":
            if last not in _BLANK:
                return None
            stripped = text.rstrip(_BLANK)
            if not stripped or stripped[-1] not in "}]":
                return None
        if text[0] not in "{[" and text.lstrip(_BLANK)[:1] not in ("{", "["):
            return None
        self.spend(len(text))
        try:
            value = _DECODER.decode(text)
        except RecursionError:
            raise _Unredactable("a JSON text in it nests too deep to be checked") from None
        except ValueError:
            return None
        return value if isinstance(value, (dict, list)) else None

    def base64_document(self, text: str) -> tuple[Any, str, _B64, bool] | None:
        head = _b64_head(text)
        if head is None:
            return None
        gzipped = head.startswith(_GZIP)
        if not gzipped:
            start = head.removeprefix(_BOM).lstrip(_BYTES_BLANK)
            if start and start[:1] not in (b"{", b"["):
                return None
        decoded = _b64_bytes(text)
        if decoded is None:
            if gzipped:
                raise _Unredactable("a string starts as base64 of gzip but is not base64")
            return None
        data, b64 = decoded
        self.spend(len(data))
        if gzipped:
            data = self.gunzip(data)
        bom = data.startswith(_BOM)
        body = data[3:] if bom else data
        try:
            document = self.json_document(body.decode("utf-8"))
        except UnicodeDecodeError:
            document = None
        if document is None:
            self.payloads.append(data)
            return None
        return document, "b64gz" if gzipped else "b64", b64, bom

    def gunzip(self, data: bytes) -> bytes:
        """`data` inflated, member by member, never past the decoding budget."""
        out = []
        while True:
            room = self.budget - self.decoded
            inflater = zlib.decompressobj(31)
            try:
                chunk = inflater.decompress(data, room + 1)
            except zlib.error as exc:
                raise _Unredactable(f"a gzip stream in it does not decode ({exc})") from None
            self.spend(len(chunk))
            if not inflater.eof:
                raise _Unredactable("a gzip stream in it is cut short")
            out.append(chunk)
            data = inflater.unused_data
            if not data.strip(b"\0"):
                return b"".join(out)

    # -- after the walk: patterns, the sweep, names ------------------------------------

    def values(self, patterned: bool = False) -> list[str]:
        """Every string value (not key) that is not itself a document, nor a replacement a
        path put there; with `patterned`, those patterns apply to."""
        if self.found is not None:
            patterned_found, plain_found = self.found
            if patterned:
                return patterned_found + [container[key] for container, key, _ in self.texts]
            return patterned_found + plain_found
        replacements = self.replacements
        out: list[str] = []
        for container, _, applies in self.containers:
            if patterned and not applies:
                continue
            items = container.values() if isinstance(container, dict) else container
            out += [v for v in items if isinstance(v, str) and v not in replacements]
        if patterned:
            out += [container[key] for container, key, _ in self.texts]
        return out

    def keys(self, patterned: bool = False) -> list[str]:
        return [
            key
            for container, _, applies in self.containers
            if isinstance(container, dict) and (applies or not patterned)
            for key in container
            if isinstance(key, str)
        ]

    def rewrite(self, change: Callable[[str], str | None], patterned: bool = False) -> bool:
        """`change` applied to the strings `values` gives (None: unchanged); whether any
        changed."""
        replacements = self.replacements
        changed_any = False
        for container, region, applies in self.containers:
            if patterned and not applies:
                continue
            items = container.items() if isinstance(container, dict) else enumerate(container)
            changed = [
                (key, new)
                for key, value in items
                if isinstance(value, str)
                and value not in replacements
                and (new := change(value)) is not None
            ]
            for key, new in changed:
                container[key] = new
            if changed:
                region.changed = changed_any = True
                self.found = None
        if patterned:
            for container, key, region in self.texts:
                new = change(container[key])
                if new is not None:
                    container[key] = new
                    region.changed = changed_any = True
                    self.found = None
        return changed_any

    def rewrite_keys(self, change: Callable[[str], str | None], patterned: bool = False) -> bool:
        changed_any = False
        for container, region, applies in self.containers:
            if not isinstance(container, dict) or (patterned and not applies):
                continue
            renamed = {
                key: new
                for key in container
                if isinstance(key, str) and (new := change(key)) is not None
            }
            if renamed:
                self.rekey(container, region, renamed)
                changed_any = True
        return changed_any

    def rekey(self, d: dict[Any, Any], region: _Region, renamed: dict[Any, Any]) -> None:
        """Rename keys of `d` in place (order kept), with the documents' slots in it."""
        items = list(d.items())
        d.clear()
        for key, value in items:
            d[renamed.get(key, key)] = value
        if self.by_container is None:
            self.by_container = {}
            stack, seen = list(self.roots), set()
            while stack:
                parent = stack.pop()
                if id(parent) in seen:
                    continue
                seen.add(id(parent))
                for slot in parent.children:
                    self.by_container.setdefault(id(slot[0]), []).append(slot)
                    stack.append(slot[2])
        for slot in self.by_container.get(id(d), ()):
            if slot[1] in renamed:
                slot[1] = renamed[slot[1]]
        region.changed = True

    def apply_patterns(self) -> None:
        """Each pattern over the strings and keys of documents and text: searched once over
        all of them joined (when that is sure to find any match), string by string only
        when it found something."""
        program = self.program
        joined_values: bytes | None = None
        joined_keys: bytes | None = None
        for entry, compiled, joinable, probe in program.patterns:
            change = self.substitution(entry, compiled)
            if joinable and joined_values is None:
                joined_values = _encode("\n".join(self.values(patterned=True)))
            if not joinable or (probe or compiled).search(joined_values) is not None:
                if self.rewrite(change, patterned=True):
                    joined_values = None
            if joinable and joined_keys is None:
                joined_keys = _encode("\n".join(self.keys(patterned=True)))
            if not joinable or (probe or compiled).search(joined_keys) is not None:
                if self.rewrite_keys(change, patterned=True):
                    joined_keys = None

    def substitution(self, entry: int, compiled: Any) -> Callable[[str], str | None]:
        replacement = _encode(self.program.replacements[entry])

        def change(text: str) -> str | None:
            new, n = _substitute(compiled, text, replacement)
            if not n:
                return None
            self.counts[entry] += n
            return new

        return change

    def sweep(self) -> None:
        """Replace what paths redacted wherever else it still occurs."""
        if not self.swept:
            return
        values = {_encode(v): e for v, e in self.swept.items()}
        short = [v for v in values if len(v) <= _LONG_VALUE]
        long = [v for v in values if len(v) > _LONG_VALUE]
        search = _literals(short, max_mem=64 << 20) if short else None
        replace = {v: _encode(self.program.replacements[e]) for v, e in values.items()}
        for payload in self.payloads:
            if (search is not None and search.search(payload) is not None) or any(
                v in payload for v in long
            ):
                raise _Unredactable(
                    "a value the policy redacts is inside decoded content that is not JSON"
                )
        joined = _encode("\x00".join(self.values()) + "\x00\x00" + "\x00".join(self.keys()))
        found = set()
        if search is not None:
            found = {m.group() for m in search.finditer(joined)}
        found.update(v for v in long if v in joined)
        if not found:
            return
        # Only strings holding a value found need rewriting (unless a value holds the NUL
        # the strings were joined with, and so may have hidden another).
        hits = [_decode(v) for v in found]
        every = any(b"\x00" in v for v in values)

        def change(text: str) -> str | None:
            if not every and not any(h in text for h in hits):
                return None
            data, total = _encode(text), 0
            if search is not None:
                data, total = _substitute_literals(search, data, replace, values, self.counts)
            for v in long:
                n = data.count(v)
                if n:
                    data = data.replace(v, replace[v])
                    self.counts[values[v]] += n
                    total += n
            return _decode(data) if total else None

        self.rewrite(change)
        self.rewrite_keys(change)

    def check_names(self) -> None:
        """A path's last name in a string that is not a document: unredactable."""
        search = self.program.name_search
        if search is None:
            return
        found = search.search(_encode("\x00".join(self.values())))
        if found is None:
            for payload in self.payloads:
                found = search.search(payload)
                if found is not None:
                    break
        if found is not None:
            name = _decode(found.group())
            raise _Unredactable(
                f"{quote(name)}, a name the policy redacts, occurs in text that is not a "
                "JSON document (prose, or JSON that does not parse), where its value cannot "
                "be found"
            )

    def materialize(self, region: _Region) -> Any:
        """Write the documents embedded in `region` back as text (re-encoded if changed)."""
        if region.text is not None:
            return region.text
        for container, key, child in region.children:
            container[key] = self.materialize(child)
            if child.changed:
                region.changed = True
        if region.kind == "root":
            return region.value
        if region.text is None:
            region.text = region.encoded() if region.changed else region.original
        return region.text


def _substitute(compiled: Any, text: str, replacement: bytes) -> tuple[str, int]:
    """`text` with every non-empty match of `compiled` replaced, and how many."""
    data = _encode(text)
    pieces: list[bytes] = []
    last = n = 0
    for match in compiled.finditer(data):
        start, end = match.span()
        if start == end:
            continue
        pieces += (data[last:start], replacement)
        last, n = end, n + 1
    if not n:
        return text, 0
    pieces.append(data[last:])
    return _decode(b"".join(pieces)), n


def _substitute_literals(
    search: Any,
    data: bytes,
    replace: dict[bytes, bytes],
    entries: dict[bytes, int],
    counts: list[int],
) -> tuple[bytes, int]:
    pieces: list[bytes] = []
    last = n = 0
    for match in search.finditer(data):
        start, end = match.span()
        value = data[start:end]
        pieces += (data[last:start], replace[value])
        counts[entries[value]] += 1
        last, n = end, n + 1
    if not n:
        return data, 0
    pieces.append(data[last:])
    return b"".join(pieces), n
