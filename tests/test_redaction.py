"""Redactions applied to tool results (engine/policy/redaction.py), on their own.

Pure unit tests: no service, no OPA. Every path form and pattern; each kind of document
(structuredContent, JSON text blocks, resource text, JSON, base64 and base64 of gzip
inside strings) written back as it came; the sweep of redacted values; and hostile results
(deep nesting, huge strings, lone surrogates, names hidden in nested arrays and in JSON
escaped once, twice, thrice, in base64 of gzip inside escaped JSON, gzip bombs, invalid
base64, prose): each either comes out with no value the policy redacts anywhere in it, not
even encoded, or is reported unredactable. Never an exception.
"""

from __future__ import annotations

import base64
import binascii
import copy
import gzip
import json
import random
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.policy import redaction
from engine.policy.redaction import Applied, BadRedaction, Redaction, apply, redactions_of
from tests.strategies import FUZZ, hostile_strings, hostile_values

MIB = 1024 * 1024
BUDGET = 16 * MIB
NAME = "DOE^JOHN^Q7x"  # the patient: never to be seen again
PID = "PID-4711-XYZ"
BIRTH = "19700101"

PATIENT_PATHS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "OtherPatientNames",
]


def dicom_redactions() -> list[Redaction]:
    """What the shipped phi.dicom_patient rule asks for (a subset of its paths)."""
    return redactions_of(
        [
            {"rule": "phi.dicom_patient", "path": f"$..{name}", "replacement": "[REDACTED]"}
            for name in PATIENT_PATHS
        ]
    )


def metadata(instances: int = 3, seed: int = 1) -> dict[str, Any]:
    """DICOM-shaped image set metadata, as HealthImaging's GetImageSetMetadata has it."""
    rng = random.Random(seed)

    def uid() -> str:
        return "1.2.840." + ".".join(str(rng.randint(1, 10**9)) for _ in range(4))

    series_uid = uid()
    return {
        "SchemaVersion": "1.1",
        "DatastoreID": "a" * 32,
        "ImageSetID": "b" * 32,
        "Patient": {
            "DICOM": {
                "PatientBirthDate": BIRTH,
                "PatientSex": "M",
                "PatientID": PID,
                "PatientName": NAME,
            }
        },
        "Study": {
            "DICOM": {
                "StudyTime": "101010",
                "AccessionNumber": "ACC-1",
                "StudyID": "S-1",
                "StudyInstanceUID": uid(),
                "StudyDate": "20200101",
            },
            "Series": {
                series_uid: {
                    "DICOM": {"Modality": "CT", "SeriesInstanceUID": series_uid},
                    "Instances": {
                        uid(): {
                            "DICOM": {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"},
                            "ImageFrames": [
                                {
                                    "ID": f"{rng.getrandbits(128):032x}",
                                    "PixelDataChecksumFromBaseToFullResolution": [
                                        {"Width": 512, "Height": 512, "Checksum": i}
                                    ],
                                }
                            ],
                        }
                        for i in range(instances)
                    },
                }
            },
        },
    }


def blob(document: Any) -> str:
    return base64.b64encode(gzip.compress(json.dumps(document).encode())).decode()


def unblob(text: str) -> Any:
    return json.loads(gzip.decompress(base64.b64decode(text)))


def server_result(document: Any) -> dict[str, Any]:
    """The real server's get_image_set_metadata answer: the blob as structuredContent and
    the same object as JSON text in a text block."""
    content = {
        "image_set_metadata_blob": blob(document),
        "content_type": "application/json",
        "content_encoding": "gzip",
    }
    return {
        "content": [{"type": "text", "text": json.dumps(content)}],
        "structuredContent": content,
        "isError": False,
    }


def run(
    result: Any, redactions: list[Redaction], budget: int = BUDGET, *, deep: bool = False
) -> Applied:
    """apply(), checking on the way that it left its input as it was (for `deep` input,
    past what copy.deepcopy can copy, only its top)."""
    before = copy.copy(result) if deep else copy.deepcopy(result)
    applied = apply(result, redactions, max_decoded_bytes=budget)
    assert result == before, "apply changed its input"
    assert len(applied.counts) == len(redactions)
    return applied


def _texts(value: Any, depth: int = 0) -> Iterator[str]:
    """Every string in `value`, and everything a lenient client could decode from any of
    them (JSON, base64 with any alphabet, gzip), recursively: where a secret could hide."""
    stack = [(value, depth)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            for key, item in node.items():
                stack.append((key, level))
                stack.append((item, level))
        elif isinstance(node, list):
            stack.extend((item, level) for item in node)
        elif isinstance(node, str):
            yield node
            if level > 12:
                continue
            try:
                stack.append((json.loads(node), level + 1))
            except (ValueError, RecursionError):
                pass
            for data in _lenient_base64(node):
                if data[:2] == b"\x1f\x8b":
                    try:
                        data = zlib.decompressobj(31).decompress(data, 64 * MIB)
                    except zlib.error:
                        continue
                text = data.decode("utf-8", "ignore")
                if text:
                    stack.append((text, level + 1))


def _lenient_base64(text: str) -> Iterator[bytes]:
    if len(text) < 8 or not text.isascii():
        return
    compact = "".join(text.split())
    for alphabet in (None, b"-_"):
        try:
            yield base64.b64decode(compact + "==", altchars=alphabet, validate=False)
        except (binascii.Error, ValueError):
            pass


def assert_clean(applied: Applied, *secrets: str) -> None:
    """No secret anywhere in the applied result, nor in anything decoded from it; or the
    applier said the result cannot be redacted safely."""
    if applied.unredactable is not None:
        assert applied.result == {"content": [], "isError": True}
        return
    dumped = json.dumps(applied.result)
    for secret in secrets:
        # Booleans asserted, so a failure never has pytest print megabytes of result.
        leaked = secret in dumped or json.dumps(secret)[1:-1] in dumped
        assert not leaked, f"{secret!r} is in the result"
        for text in _texts(applied.result):
            leaked = secret in text
            assert not leaked, f"{secret!r} decodes from {text[:200]!r}"


# --------------------------------------------------------------------------------------
# Reading the redactions.


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("$.a", [(False, "a", None)]),
        ("$['a']", [(False, "a", None)]),
        ('$["a"]', [(False, "a", None)]),
        ("$[ 'a' ]", [(False, "a", None)]),
        ("$[0]", [(False, None, 0)]),
        ("$[-1]", [(False, None, -1)]),
        ("$[*]", [(False, None, None)]),
        ("$.*", [(False, None, None)]),
        ("$..a", [(True, "a", None)]),
        ("$..['a b']", [(True, "a b", None)]),
        ("$..*", [(True, None, None)]),
        ("$..[2]", [(True, None, 2)]),
        ("$..[*]", [(True, None, None)]),
        ("$.a_1.\u00e9t\u00e9", [(False, "a_1", None), (False, "\u00e9t\u00e9", None)]),
        ("$['it\\'s']", [(False, "it's", None)]),
        ('$["say \\"hi\\""]', [(False, 'say "hi"', None)]),
        ("$['\\u00e9\\n\\/']", [(False, "\u00e9\n/", None)]),
        ("$['\\ud83d\\ude00']", [(False, "\U0001f600", None)]),
        ("$.Study..Patient[0].*", [(False, "Study", None), (True, "Patient", None),
                                   (False, None, 0), (False, None, None)]),
    ],
)  # fmt: skip
def test_every_path_form_is_read(
    path: str, steps: list[tuple[bool, str | None, int | None]]
) -> None:
    (entry,) = redactions_of([{"rule": "r", "path": path}])
    assert entry == Redaction("r", path, None, "[REDACTED]")
    parsed = redaction._parsed_path(path)
    assert [(s.descend, s.name, s.index) for s in parsed] == steps


@pytest.mark.parametrize(
    "path",
    [
        "",
        "a",
        "$",
        "$.",
        "$..",
        "$a",
        "$.1a",
        "$.a-b",
        "$[",
        "$['a'",
        "$['a]",
        "$[a]",
        "$[01]",
        "$[-0]",
        "$[1.5]",
        "$[1:2]",
        "$[?@.a]",
        "$['a','b']",
        "$[0,1]",
        "$['\\x']",
        "$['\\ud800']",
        "$['\\udc00']",
        "$['\ud800']",
        "$['a\nb']",
        "$[99999999999999999]",
        "$" + ".a" * 65,
    ],
)
def test_paths_outside_the_grammar_are_refused(path: str) -> None:
    with pytest.raises(BadRedaction, match=r"redactions\[0\] \(rule 'r'\)"):
        redactions_of([{"rule": "r", "path": path}])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("$..a", "not a list"),
        ({"rule": "r", "path": "$.a"}, "not a list"),
        (None, "not a list"),
        ([["r", "$.a"]], r"redactions\[0\] is not an object"),
        ([{"path": "$.a"}], "no rule id"),
        ([{"rule": "", "path": "$.a"}], "no rule id"),
        ([{"rule": 7, "path": "$.a"}], "no rule id"),
        ([{"rule": "r", "path": "$.a", "pattern": "x"}], "both of path and pattern"),
        ([{"rule": "r"}], "neither of path and pattern"),
        ([{"rule": "r", "path": ""}], "path is not a non-empty string"),
        ([{"rule": "r", "path": ["$.a"]}], "path is not a non-empty string"),
        ([{"rule": "r", "pattern": ""}], "pattern is not a non-empty string"),
        ([{"rule": "r", "pattern": "(unclosed"}], "not valid RE2"),
        ([{"rule": "r", "pattern": "(?<=x)y"}], "not valid RE2"),  # look-behind: not RE2
        ([{"rule": "r", "pattern": "a*"}], "matches the empty string"),
        ([{"rule": "r", "pattern": "x", "replacement": 3}], "replacement is not a string"),
        ([{"rule": "r", "pattern": "x", "replacement": None}], "replacement is not a string"),
        ([{"rule": "ok", "path": "$.a"}, {"rule": "bad", "path": "$["}], r"redactions\[1\]"),
    ],
)
def test_malformed_redactions_are_named(entries: Any, message: str) -> None:
    with pytest.raises(BadRedaction, match=message):
        redactions_of(entries)


def test_redactions_keep_their_order_and_default_replacement() -> None:
    read = redactions_of(
        [
            {"rule": "b", "pattern": "AKIA[0-9A-Z]{16}", "replacement": "<key>"},
            {"rule": "a", "path": "$..x", "reason": "extra keys are ignored"},
        ]
    )
    assert read == [
        Redaction("b", None, "AKIA[0-9A-Z]{16}", "<key>"),
        Redaction("a", "$..x", None, "[REDACTED]"),
    ]


def test_a_malformed_redaction_given_to_apply_is_unredactable_not_an_exception() -> None:
    applied = apply({"content": []}, [Redaction("r", "$[", None, "x")], max_decoded_bytes=10)
    assert applied.unredactable is not None and "malformed" in applied.unredactable
    applied = apply({"content": []}, [Redaction("r", None, None, "x")], max_decoded_bytes=10)
    assert applied.unredactable is not None


# --------------------------------------------------------------------------------------
# Paths.

DOC = {"a": {"b": "x1", "c": ["p", "q", {"b": "x2"}]}, "b": "x3", "B": "UPPER"}


@pytest.mark.parametrize(
    ("path", "expected", "count"),
    [
        ("$.a.b", {"a": {"b": "R", "c": ["p", "q", {"b": "x2"}]}, "b": "x3"}, 1),
        ("$['a'][\"b\"]", {"a": {"b": "R", "c": ["p", "q", {"b": "x2"}]}, "b": "x3"}, 1),
        ("$.a.c[0]", {"a": {"b": "x1", "c": ["R", "q", {"b": "x2"}]}, "b": "x3"}, 1),
        ("$.a.c[-1]", {"a": {"b": "x1", "c": ["p", "q", "R"]}, "b": "x3"}, 1),
        ("$.a.c[-4]", DOC, 0),
        ("$.a.c[3]", DOC, 0),
        ("$.a.c[*]", {"a": {"b": "x1", "c": ["R", "R", "R"]}, "b": "x3"}, 3),
        ("$.a.*", {"a": {"b": "R", "c": "R"}, "b": "x3"}, 2),
        ("$[*]", {"a": "R", "b": "R"}, 3),
        ("$..b", {"a": {"b": "R", "c": ["p", "q", {"b": "R"}]}, "b": "R"}, 3),
        ("$..['b']", {"a": {"b": "R", "c": ["p", "q", {"b": "R"}]}, "b": "R"}, 3),
        ("$..*", {"a": "R", "b": "R"}, 3),
        ("$..[0]", {"a": {"b": "x1", "c": ["R", "q", {"b": "x2"}]}, "b": "x3"}, 1),
        ("$..[*]", {"a": "R", "b": "R"}, 3),  # [*] selects members too (RFC 9535)
        ("$..c[2].b", {"a": {"b": "x1", "c": ["p", "q", {"b": "R"}]}, "b": "x3"}, 1),
        ("$.b.c", DOC, 0),  # through a string: nothing
        ("$.a.b[0]", DOC, 0),
        ("$.zz", DOC, 0),
    ],
)
def test_every_path_form_applies_at_the_document_root(
    path: str, expected: dict[str, Any], count: int
) -> None:
    redactions = redactions_of([{"rule": "r", "path": path, "replacement": "R"}])
    applied = run({"content": [], "structuredContent": DOC}, redactions)
    assert applied.unredactable is None
    want = {**expected, "B": expected.get("B", "UPPER")}
    if path in ("$[*]", "$..*", "$..[*]"):
        want = {"a": "R", "b": "R", "B": "R"}
    assert applied.result["structuredContent"] == want
    assert applied.counts == (count,)


def test_names_are_exact_and_case_sensitive() -> None:
    """`$..PatientName` is PatientName: not patientname, not PATIENTNAME, not Patient
    Name. Those keys are left as they are, and the name in other case in prose is not the
    name (documented: names are exact, case-sensitive)."""
    document = {
        "patientname": "a",
        "PATIENTNAME": "b",
        "PatientName ": "c",
        "PatientName": "Smith^Anna",
    }
    result = {
        "content": [{"type": "text", "text": "patientname and PATIENTNAME are not the name"}],
        "structuredContent": document,
    }
    applied = run(result, redactions_of([{"rule": "r", "path": "$..PatientName"}]))
    assert applied.unredactable is None
    assert applied.result["structuredContent"] == {**document, "PatientName": "[REDACTED]"}
    assert applied.result["content"] == result["content"]


def test_the_first_entry_wins_a_value_and_counts_it() -> None:
    redactions = redactions_of(
        [
            {"rule": "one", "path": "$.Patient.DICOM.PatientName", "replacement": "1"},
            {"rule": "two", "path": "$..PatientName", "replacement": "2"},
            {"rule": "three", "path": "$..Patient"},
        ]
    )
    document = {"Patient": {"DICOM": {"PatientName": "x"}}, "Other": {"PatientName": "y"}}
    applied = run({"structuredContent": document}, redactions)
    # $..Patient replaces the Patient object whole (rule three): its name is not reached.
    assert applied.result["structuredContent"] == {
        "Patient": "[REDACTED]",
        "Other": {"PatientName": "2"},
    }
    assert applied.counts == (0, 1, 1)


def test_nothing_to_redact_and_no_redactions() -> None:
    result = {"content": [{"type": "text", "text": "hello"}], "isError": False}
    assert apply(result, [], max_decoded_bytes=10) == Applied(result, (), None)
    applied = run(result, dicom_redactions())
    assert applied == Applied(result, (0,) * len(PATIENT_PATHS), None)


# --------------------------------------------------------------------------------------
# Patterns.


def test_patterns_replace_in_values_keys_and_plain_text() -> None:
    key = "AKIAABCDEFGHIJKLMNOP"
    redactions = redactions_of(
        [{"rule": "secrets", "pattern": "AKIA[0-9A-Z]{16}", "replacement": "<key $1 \\1>"}]
    )
    result = {
        "content": [
            {"type": "text", "text": f"your key is {key}, again {key}."},
            {"type": "resource", "resource": {"uri": "x:/1", "text": f"[{key}"}},
            {"type": "text", "text": json.dumps({key: [f"a{key}b"]})},
        ],
        "structuredContent": {"k": {key: key}, "list": [key, 1, None]},
        "_meta": {"trace": "unchanged"},
    }
    applied = run(result, redactions)
    assert applied.unredactable is None
    r = "<key $1 \\1>"  # replacements are literal
    assert applied.result["content"][0]["text"] == f"your key is {r}, again {r}."
    assert applied.result["content"][1]["resource"] == {"uri": "x:/1", "text": f"[{r}"}
    assert json.loads(applied.result["content"][2]["text"]) == {r: [f"a{r}b"]}
    assert applied.result["structuredContent"] == {"k": {r: r}, "list": [r, 1, None]}
    assert applied.counts == (8,)
    assert_clean(applied, key)


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("^secret", "secret one", "X one"),
        ("secret$", "a secret", "a X"),
        ("^secret$", "secret", "X"),
        ("\\Asecret\\z", "secret", "X"),
        ("(?i)SeCrEt", "my SECRET", "my X"),
        ("(?-m:^secret)", "secret", "X"),
        ("\\bsecret\\b", "secret,secrets", "X,secrets"),
        ("\\bsecret\\b", "a\nsecret", "a\nX"),
        ("(?s)s.cret", "s\ncret", "X"),
        ("é+", "café", "cafX"),
    ],
)
def test_anchored_patterns_match_each_string_on_its_own(
    pattern: str, text: str, expected: str
) -> None:
    """A search over all strings joined must not lose a match that ^, $, \\A or \\z allow
    in one string: the pattern is checked on its own for each string."""
    redactions = redactions_of([{"rule": "r", "pattern": pattern, "replacement": "X"}])
    result = {"structuredContent": {"first": "nothing here", "second": [text]}}
    applied = run(result, redactions)
    assert applied.result["structuredContent"]["second"] == [expected]
    assert applied.result["structuredContent"]["first"] == "nothing here"


def test_patterns_do_not_touch_what_is_outside_documents_and_text() -> None:
    """Block types, URIs, image data and _meta are not text: a pattern leaves them."""
    redactions = redactions_of([{"rule": "r", "pattern": "image|text", "replacement": "X"}])
    result = {
        "content": [
            {"type": "image", "data": "aW1hZ2U=", "mimeType": "image/png"},
            {"type": "text", "text": "an image of text"},
        ],
        "_meta": {"note": "text"},
    }
    applied = run(result, redactions)
    assert applied.unredactable is None
    assert applied.result["content"][0] == result["content"][0]
    assert applied.result["content"][1] == {"type": "text", "text": "an X of X"}
    assert applied.result["_meta"] == {"note": "text"}


def test_patterns_apply_in_order_each_seeing_the_last() -> None:
    redactions = redactions_of(
        [
            {"rule": "a", "pattern": "cat", "replacement": "dog"},
            {"rule": "b", "pattern": "dog", "replacement": "bird"},
        ]
    )
    applied = run({"structuredContent": {"x": "cat dog", "cat": 1}}, redactions)
    assert applied.result["structuredContent"] == {"x": "bird bird", "bird": 1}
    assert applied.counts == (2, 3)


# --------------------------------------------------------------------------------------
# Documents, written back the way they came.


def test_healthimaging_metadata_blob_in_both_places() -> None:
    """get_image_set_metadata as the real server answers: base64 of gzip'd DICOM JSON in
    structuredContent and, as JSON text, in a text block. Both copies come back redacted,
    re-encoded the same way; everything else as it was."""
    document = metadata(instances=4)
    result = server_result(document)
    applied = run(result, dicom_redactions())
    assert applied.unredactable is None
    structured = applied.result["structuredContent"]
    assert set(structured) == {"image_set_metadata_blob", "content_type", "content_encoding"}
    assert structured["content_type"] == "application/json"
    redacted = unblob(structured["image_set_metadata_blob"])
    expected = copy.deepcopy(document)
    expected["Patient"]["DICOM"] = {
        "PatientBirthDate": "[REDACTED]",
        "PatientSex": "[REDACTED]",
        "PatientID": "[REDACTED]",
        "PatientName": "[REDACTED]",
    }
    assert redacted == expected
    (block,) = applied.result["content"]
    in_text = json.loads(block["text"])
    assert unblob(in_text["image_set_metadata_blob"]) == expected
    # Counted for each copy: name, id, birth date, sex; the rest never occurred.
    assert applied.counts == (2, 2, 2, 2, 0, 0, 0)
    assert_clean(applied, NAME, PID, BIRTH)


def test_an_unchanged_document_keeps_its_exact_text() -> None:
    text = '{ "b" : 1,\n  "a": "\\u00e9" }'
    encoded = base64.b64encode(gzip.compress(b'{"x":  [1, 2]}', mtime=7)).decode()
    result = {
        "content": [{"type": "text", "text": text}, {"type": "text", "text": "plain words"}],
        "structuredContent": {"blob": encoded, "escaped": json.dumps({"y": 1}, indent=2)},
    }
    applied = run(result, dicom_redactions())
    assert applied.result == result


def test_a_changed_json_text_is_compact_and_keeps_unicode() -> None:
    text = json.dumps({"PatientName": NAME, "Note": "Größe \u2028 ✓"}, indent=4)
    applied = run({"content": [{"type": "text", "text": text}]}, dicom_redactions())
    assert applied.result["content"][0]["text"] == (
        '{"PatientName":"[REDACTED]","Note":"Größe \u2028 ✓"}'
    )


@pytest.mark.parametrize("kind", ["text", "resource"])
def test_resource_text_is_a_document_too(kind: str) -> None:
    text = json.dumps([{"PatientName": NAME}])
    block = (
        {"type": "text", "text": text}
        if kind == "text"
        else {"type": "resource", "resource": {"uri": "file:///m.json", "text": text}}
    )
    applied = run({"content": [block]}, dicom_redactions())
    got = block_text(applied.result["content"][0])
    assert json.loads(got) == [{"PatientName": "[REDACTED]"}]
    assert applied.counts[0] == 1


def block_text(block: dict[str, Any]) -> str:
    text = block["text"] if block["type"] == "text" else block["resource"]["text"]
    assert isinstance(text, str)
    return text


def _b64(data: bytes, *, urlsafe: bool = False, padded: bool = True, width: int = 0) -> str:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    if not padded:
        text = text.rstrip("=")
    if width:
        text = "\n".join(text[i : i + width] for i in range(0, len(text), width)) + "\n"
    return text


@pytest.mark.parametrize(
    ("urlsafe", "padded", "width", "gzipped"),
    [
        (False, True, 0, False),
        (False, True, 0, True),
        (True, False, 0, True),
        (True, True, 0, False),
        (False, False, 0, False),
        (False, True, 76, True),
        (False, True, 64, False),
    ],
)
def test_base64_documents_round_trip_as_they_came(
    urlsafe: bool, padded: bool, width: int, gzipped: bool
) -> None:
    # Characters that make base64 use + and / (or - and _).
    document = {"PatientName": NAME, "x": "\u00ff\u00fe>>>???" * 20}
    data = json.dumps(document).encode()
    if gzipped:
        data = gzip.compress(data, mtime=0)
    text = _b64(data, urlsafe=urlsafe, padded=padded, width=width)
    assert ("-" in text or "_" in text) == urlsafe  # so the alphabet can be told
    applied = run({"structuredContent": {"b": text}}, dicom_redactions())
    assert applied.unredactable is None
    out = applied.result["structuredContent"]["b"]
    compact = "".join(out.split())
    theirs, other = ("-_", "+/") if urlsafe else ("+/", "-_")
    assert not any(c in compact for c in other)
    if not gzipped:  # the same characters again, so the same alphabet shows
        assert any(c in compact for c in theirs)
    assert (len(compact) % 4 == 0) if padded else ("=" not in compact)
    if width:
        lines = out.split("\n")
        assert lines[-1] == "" and all(len(line) == width for line in lines[:-2])
    raw = base64.b64decode("".join(out.split()) + "==", altchars=b"-_" if urlsafe else None)
    if gzipped:
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    assert json.loads(raw) == {**document, "PatientName": "[REDACTED]"}


def test_a_utf8_bom_is_kept() -> None:
    data = b"\xef\xbb\xbf" + json.dumps({"PatientName": NAME}).encode()
    applied = run({"structuredContent": {"b": base64.b64encode(data).decode()}}, dicom_redactions())
    raw = base64.b64decode(applied.result["structuredContent"]["b"])
    assert raw.startswith(b"\xef\xbb\xbf")
    assert json.loads(raw[3:]) == {"PatientName": "[REDACTED]"}


def test_gzip_with_several_members_is_read_whole() -> None:
    data = gzip.compress(b'{"PatientName": "') + gzip.compress(NAME.encode() + b'"}')
    applied = run({"structuredContent": {"b": base64.b64encode(data).decode()}}, dicom_redactions())
    assert unblob(applied.result["structuredContent"]["b"]) == {"PatientName": "[REDACTED]"}


@pytest.mark.parametrize("times", [1, 2, 3, 5])
def test_names_in_json_escaped_again_and_again(times: int) -> None:
    inner: Any = {"nested": [[{"PatientName": NAME}]]}
    for _ in range(times):
        inner = {"payload": json.dumps(inner)}
    applied = run({"content": [{"type": "text", "text": json.dumps(inner)}]}, dicom_redactions())
    assert applied.unredactable is None
    assert applied.counts[0] == 1
    assert_clean(applied, NAME)
    value: Any = json.loads(applied.result["content"][0]["text"])
    for _ in range(times):
        value = json.loads(value["payload"])
    assert value == {"nested": [[{"PatientName": "[REDACTED]"}]]}


@pytest.mark.parametrize("times", [2, 3, 4])
def test_names_in_json_text_of_json_text(times: int) -> None:
    """JSON escaped twice or more with nothing around it: a JSON string literal whose string
    is the JSON text of the document."""
    text: Any = [{"PatientName": NAME}]
    for _ in range(times):
        text = json.dumps(text)
    for result in (
        {"content": [{"type": "text", "text": text}]},
        {"structuredContent": {"s": text}},
    ):
        applied = run(result, dicom_redactions())
        assert applied.unredactable is None and applied.counts[0] == 1
        assert_clean(applied, NAME)
    out = applied.result["structuredContent"]["s"]
    for _ in range(times):
        out = json.loads(out)
    assert out == [{"PatientName": "[REDACTED]"}]


def test_base64_gzip_inside_escaped_json_inside_a_text_block() -> None:
    document = metadata(instances=2)
    inner = json.dumps({"wrapped": json.dumps({"blob": blob(document)})})
    applied = run({"content": [{"type": "text", "text": inner}]}, dicom_redactions())
    assert applied.unredactable is None
    assert_clean(applied, NAME, PID, BIRTH)
    outer = json.loads(applied.result["content"][0]["text"])
    got = unblob(json.loads(outer["wrapped"])["blob"])
    assert got["Patient"]["DICOM"]["PatientName"] == "[REDACTED]"
    assert got["Study"] == document["Study"]


def test_names_hidden_in_nested_arrays_and_content_blocks() -> None:
    hidden = [[[[{"PatientName": NAME}]]], [{"x": [{"y": [{"PatientName": NAME}]}]}]]
    result = {
        "content": [
            {"type": "text", "text": json.dumps(hidden)},
            {"type": "resource_link", "uri": "x:/1", "annotations": {"a": [json.dumps(hidden)]}},
        ],
        "structuredContent": {"deep": hidden},
        "other": [hidden],
    }
    applied = run(result, dicom_redactions())
    assert applied.unredactable is None
    # Two each in structuredContent, in the text, in the JSON in an annotation, and under
    # `other` (an object or array under a key MCP does not define is a document too).
    assert applied.counts[0] == 8
    assert_clean(applied, NAME)
    redacted = [
        [[[{"PatientName": "[REDACTED]"}]]],
        [{"x": [{"y": [{"PatientName": "[REDACTED]"}]}]}],
    ]
    assert applied.result["other"] == [redacted]
    assert applied.result["structuredContent"] == {"deep": redacted}


# --------------------------------------------------------------------------------------
# The sweep: a redacted value is gone from everywhere.


def test_a_redacted_value_is_swept_from_everywhere_else() -> None:
    result = {
        "content": [
            {"type": "text", "text": f"Report for {NAME}; id {PID}; sex M, born {BIRTH}."},
            {"type": "text", "text": json.dumps({"comment": f"seen: {NAME}", NAME: 1})},
        ],
        "structuredContent": {
            "Patient": {"PatientName": NAME, "PatientID": PID, "PatientBirthDate": BIRTH},
            "PatientSex": "M",
            "elsewhere": [f"{PID}/{PID}", {"k": f"x{NAME}y"}],
        },
    }
    applied = run(result, dicom_redactions())
    assert applied.unredactable is None
    text = applied.result["content"][0]["text"]
    # "M" is shorter than MIN_SWEEP: not swept from every word.
    assert text == "Report for [REDACTED]; id [REDACTED]; sex M, born [REDACTED]."
    assert json.loads(applied.result["content"][1]["text"]) == {
        "comment": "seen: [REDACTED]",
        "[REDACTED]": 1,
    }
    assert applied.result["structuredContent"]["elsewhere"] == [
        "[REDACTED]/[REDACTED]",
        {"k": "x[REDACTED]y"},
    ]
    # PatientName: 1 by path + 4 swept; PatientID: 1 + 3; birth date 1 + 1; sex 1.
    assert applied.counts[:4] == (5, 4, 2, 1)
    assert_clean(applied, NAME, PID, BIRTH)


def test_short_numbers_are_not_swept_out_of_uids_but_long_ones_are() -> None:
    uid = "1.2.826.0.1.3680043.8.498.61.2.12345678"
    result = {
        "content": [],
        "structuredContent": {
            "Patient": {"DICOM": {"PatientWeight": "61.2", "PatientID": "12345678"}},
            "Series": {uid: {"SeriesInstanceUID": uid}},
        },
    }
    redactions = redactions_of(
        [
            {"rule": "phi", "path": "$..PatientWeight", "replacement": "[REDACTED]"},
            {"rule": "phi", "path": "$..PatientID", "replacement": "[REDACTED]"},
        ]
    )
    applied = apply(result, redactions, max_decoded_bytes=1 << 20)
    assert applied.unredactable is None
    series = applied.result["structuredContent"]["Series"]
    # "61.2" (no letter, under MIN_SWEEP_DIGITS) stays in the UID; the 8-digit id does not.
    (key,) = series
    assert key == series[key]["SeriesInstanceUID"] == uid.replace("12345678", "[REDACTED]")
    assert "61.2" in key
    assert applied.counts == (1, 3)


def test_the_sweep_and_patterns_reach_into_encoded_documents() -> None:
    """A redacted value (or a pattern's match) inside a base64+gzip blob that no path
    touches: the blob is rewritten all the same."""
    redactions = [
        *dicom_redactions(),
        *redactions_of([{"rule": "key", "pattern": "AKIA[0-9A-Z]{16}", "replacement": "K"}]),
    ]
    result = {
        "structuredContent": {
            "Patient": {"PatientName": NAME},
            "notes": blob({"by": f"{NAME}", "cred": "AKIAABCDEFGHIJKLMNOP"}),
            "same": blob({"unrelated": 1}),
        }
    }
    applied = run(result, redactions)
    out = applied.result["structuredContent"]
    assert unblob(out["notes"]) == {"by": "[REDACTED]", "cred": "K"}
    assert out["same"] == result["structuredContent"]["same"]
    assert applied.counts[0] == 2 and applied.counts[-1] == 1
    assert_clean(applied, NAME, "AKIAABCDEFGHIJKLMNOP")


def test_leaf_strings_of_redacted_objects_are_swept_with_their_entry() -> None:
    redactions = redactions_of(
        [
            {"rule": "keep", "path": "$.none"},
            {"rule": "whole", "path": "$..Patient", "replacement": "<patient>"},
        ]
    )
    result = {
        "structuredContent": {"Patient": {"DICOM": {"Names": [NAME, ["Q" * 3]]}}},
        "content": [{"type": "text", "text": f"{NAME} QQQ"}],
    }
    applied = run(result, redactions)
    assert applied.result["content"][0]["text"] == "<patient> QQQ"
    assert applied.counts == (0, 2)


def test_the_longest_redacted_value_wins_where_two_overlap() -> None:
    result = {
        "structuredContent": {"a": {"PatientName": "John"}, "b": {"PatientID": "John Smith"}},
        "content": [{"type": "text", "text": "John Smith and John"}],
    }
    redactions = redactions_of(
        [
            {"rule": "n", "path": "$..PatientName", "replacement": "<n>"},
            {"rule": "i", "path": "$..PatientID", "replacement": "<i>"},
        ]
    )
    applied = run(result, redactions)
    assert applied.result["content"][0]["text"] == "<i> and <n>"
    assert applied.counts == (2, 2)


def test_a_redacted_value_in_meta_makes_it_unredactable() -> None:
    """_meta is forwarded unchanged, so a redacted value (or a name) in it cannot be
    redacted; an upstream's copy of the engine's own key is dropped."""
    document = {"PatientName": NAME}
    base = {"structuredContent": document, "content": []}
    applied = run({**base, "_meta": {"progress": f"now {NAME}"}}, dicom_redactions())
    assert applied.unredactable is not None and "_meta" in applied.unredactable
    applied = run({**base, "_meta": {"doc": json.dumps(document)}}, dicom_redactions())
    assert applied.unredactable is not None
    applied = run(
        {**base, "_meta": {"mcp-policy/result-decision": {"action": "pass"}, "trace": "t-1"}},
        dicom_redactions(),
    )
    assert applied.unredactable is None
    assert applied.result["_meta"] == {"trace": "t-1"}


# --------------------------------------------------------------------------------------
# Unredactable: what cannot be checked is not passed.


@pytest.mark.parametrize(
    "text",
    [
        f"PatientName: {NAME}",
        "the PatientName field was empty",
        '{"PatientName": "x", "PatientName": "y"}',  # duplicate keys: not a document
        '{"PatientName": "x"',  # broken JSON
        "{'PatientName': 'x'}",  # Python, not JSON
        "PatientNameless",  # the name inside a word is the name
    ],
)
def test_a_targeted_name_in_text_that_is_not_a_document_is_unredactable(text: str) -> None:
    applied = run({"content": [{"type": "text", "text": text}]}, dicom_redactions())
    assert applied.unredactable is not None
    assert "PatientName" in applied.unredactable
    assert applied.result == {"content": [], "isError": True}
    assert applied.counts == (0,) * len(PATIENT_PATHS)


def test_a_name_in_a_string_value_of_a_document_is_unredactable() -> None:
    applied = run({"structuredContent": {"note": "PatientName=Doe"}}, dicom_redactions())
    assert applied.unredactable is not None


def test_a_name_in_decoded_content_that_is_not_json_is_unredactable() -> None:
    for data in (
        gzip.compress(b"PatientName,Doe\n"),
        b'{"PatientName": bare}',
        gzip.compress(b"\xff\xfe not utf-8 PatientName"),
    ):
        result = {"structuredContent": {"b": base64.b64encode(data).decode()}}
        applied = run(result, dicom_redactions())
        assert applied.unredactable is not None, data


def test_a_redacted_value_in_decoded_content_that_is_not_json_is_unredactable() -> None:
    result = {
        "structuredContent": {
            "Patient": {"PatientName": NAME},
            "csv": base64.b64encode(gzip.compress(f"name,{NAME}".encode())).decode(),
        }
    }
    applied = run(result, dicom_redactions())
    assert applied.unredactable is not None


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_deep_nesting_in_structured_content_is_unredactable() -> None:
    for depth in (redaction.MAX_DEPTH + 1, 10**5):
        deep = _nested(depth, {"PatientName": NAME})
        why = run({"structuredContent": {"d": deep}}, dicom_redactions(), deep=True).unredactable
        # (Only the reason in the assertion: pytest cannot print 10**5 nested lists.)
        assert why is not None and "deeper" in why
    shallow = _nested(redaction.MAX_DEPTH - 2, {"PatientName": NAME})
    applied = run({"structuredContent": {"d": shallow}}, dicom_redactions())
    assert applied.unredactable is None and applied.counts[0] == 1


def test_deep_nesting_in_an_embedded_string_is_unredactable() -> None:
    for text in (
        "[" * 10**5 + json.dumps({"PatientName": NAME}) + "]" * 10**5,
        "[" * 10**5 + "]" * 10**5,
        "[" * 10**5 + '{"PatientName": "' + NAME,
    ):
        for place in ("text", "string"):
            result = (
                {"content": [{"type": "text", "text": text}]}
                if place == "text"
                else {"structuredContent": {"s": text}}
            )
            applied = run(result, dicom_redactions())
            assert_clean(applied, NAME)
    # Past the depth of one document in a string, and past the nesting of documents.
    applied = run(
        {"structuredContent": {"s": json.dumps(_nested(100, {"PatientName": NAME}))}},
        dicom_redactions(),
    )
    assert applied.unredactable is not None
    inner: Any = {"PatientName": NAME}
    for _ in range(redaction.MAX_EMBEDDING + 1):
        inner = {"p": json.dumps(inner)}
    applied = run({"structuredContent": inner}, dicom_redactions())
    assert applied.unredactable is not None and "embedded" in applied.unredactable


def test_a_gzip_bomb_is_cut_off_and_unredactable() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = packer.compress(b"[" + b" " * (64 * MIB)) + packer.compress(b"]") + packer.flush()
    assert len(bomb) < 100_000
    text = base64.b64encode(bomb).decode()
    applied = run({"structuredContent": {"b": text}}, dicom_redactions(), budget=4 * MIB)
    assert applied.unredactable is not None and "bytes" in applied.unredactable
    # Within the budget it is simply a document.
    small = base64.b64encode(gzip.compress(b"[" + b" " * 1000 + b"]")).decode()
    assert run({"structuredContent": {"b": small}}, dicom_redactions()).unredactable is None


def test_the_decoding_budget_counts_every_document() -> None:
    document = {"PatientName": NAME, "pad": "x" * 5000}
    blobs = [blob({**document, "n": i}) for i in range(10)]
    result = {"structuredContent": {"blobs": blobs}}
    assert run(result, dicom_redactions(), budget=1 * MIB).unredactable is None
    applied = run(result, dicom_redactions(), budget=20_000)
    assert applied.unredactable is not None


@pytest.mark.parametrize(
    "data",
    [
        gzip.compress(b'{"PatientName": "x"}')[:-9],  # cut short
        b"\x1f\x8b\x08" + b"garbage" * 5,  # not deflate
        gzip.compress(b'{"a": 1}') + b"trailing",  # garbage after the stream
    ],
)
def test_a_broken_gzip_stream_is_unredactable(data: bytes) -> None:
    applied = run({"structuredContent": {"b": base64.b64encode(data).decode()}}, dicom_redactions())
    assert applied.unredactable is not None and "gzip" in applied.unredactable


@pytest.mark.parametrize(
    "text",
    [
        "H4sI!!!!not base64 at all",
        "H4sIAAAAAAAA" + "%" * 10,
        "eyJQYXRpZW50TmFtZSI6ICJET0UifQ=" + "=" * 3,
        "eyJQYXRpZW50TmFtZSI6*ICJET0UifQ==",
        "eyJQYXRpZW50" + "\u00e9" * 4,
        "e",
        "eyJQ",
        "====",
    ],
)
def test_invalid_base64_never_raises(text: str) -> None:
    for result in (
        {"structuredContent": {"b": text, "PatientName": NAME}},
        {"content": [{"type": "text", "text": text}]},
    ):
        applied = run(result, dicom_redactions())
        assert_clean(applied, NAME)


# --------------------------------------------------------------------------------------
# Hostile text.


def test_huge_strings() -> None:
    huge = "x" * (10 * MIB)
    result = {
        "content": [
            {"type": "text", "text": huge + NAME},
            {"type": "text", "text": "[" + huge + "]"},
            {"type": "text", "text": "eyJ" + "A" * (10 * MIB)},
        ],
        "structuredContent": {"PatientName": NAME, "big": huge, "b": "{" + huge},
    }
    applied = run(result, dicom_redactions(), budget=64 * MIB)
    assert applied.unredactable is None
    assert applied.result["content"][0]["text"] == huge + "[REDACTED]"
    assert_clean(applied, NAME)
    # Past the decoding budget: unredactable, not slow, not an exception.
    applied = run(result, dicom_redactions(), budget=MIB)
    assert applied.unredactable is not None


def test_lone_surrogates_and_replacement_characters() -> None:
    """Lone surrogates (which a JSON \\u escape can carry into a string) and U+FFFD pass
    through patterns and the sweep as they are; re-encoded documents stay UTF-8."""
    odd = "\ud800 \udfff \ufffd"
    redactions = [*dicom_redactions(), *redactions_of([{"rule": "p", "pattern": "secret"}])]
    escaped = '{"PatientName": "\\ud800' + NAME + '", "n": "\\udc00 secret"}'
    result = {
        "content": [
            {"type": "text", "text": f"{odd} secret {NAME} {odd}"},
            {"type": "text", "text": escaped},
            {"type": "text", "text": "\ufffd\ufffd"},
        ],
        "structuredContent": {
            "PatientName": NAME,
            odd: [odd, f"{odd}{NAME}"],
            "b": base64.b64encode(gzip.compress(escaped.encode())).decode(),
        },
    }
    applied = run(result, redactions)
    assert applied.unredactable is None
    content = applied.result["content"]
    assert content[0]["text"] == f"{odd} [REDACTED] [REDACTED] {odd}"
    assert json.loads(content[1]["text"]) == {"PatientName": "[REDACTED]", "n": "\udc00 [REDACTED]"}
    assert content[1]["text"].encode("utf-8")  # written back with the surrogate escaped
    assert content[2]["text"] == "\ufffd\ufffd"
    assert applied.result["structuredContent"][odd] == [odd, f"{odd}[REDACTED]"]
    assert unblob(applied.result["structuredContent"]["b"])["n"] == "\udc00 [REDACTED]"
    assert_clean(applied, NAME)


def test_results_of_odd_shapes_never_raise() -> None:
    redactions = dicom_redactions()
    for result in (
        {},
        {"content": None, "structuredContent": "text", "isError": "yes"},
        {"content": "PatientName"},
        {"content": [None, 1, "x", [], {"type": 5}, {"type": "text", "text": 5}]},
        {"content": [{"type": "resource", "resource": "x"}], "structuredContent": []},
        {"structuredContent": {"a": {1: "x"}}},  # a key that is not a string
        {"structuredContent": {"a": (1, 2), "b": b"bytes", "c": float("nan")}},
        {"_meta": None},
        {"_meta": "PatientName"},
    ):
        applied = apply(result, redactions, max_decoded_bytes=BUDGET)
        assert isinstance(applied, Applied)
    assert apply([], redactions, max_decoded_bytes=BUDGET).unredactable is not None  # type: ignore[arg-type]
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    why = apply({"structuredContent": cyclic}, redactions, max_decoded_bytes=BUDGET).unredactable
    assert why is not None


# --------------------------------------------------------------------------------------
# Property: the patient, hidden anywhere in any encoding, never comes out.


def _json_text(value: Any) -> bool:
    try:
        return isinstance(json.loads(value), (dict, list))
    except (TypeError, ValueError):
        return False


def _hide(value: Any, how: list[str]) -> Any:
    """`value` wrapped as `how` says: in JSON text, arrays, objects, base64, base64 of gzip
    (the encodings are of documents: JSON text of an object or array)."""
    for step in how:
        if step == "json":
            value = json.dumps(value)
        elif step == "list":
            value = [value]
        elif step == "object":
            value = {"k": value}
        elif isinstance(value, (dict, list)) or _json_text(value):
            data = (value if isinstance(value, str) else json.dumps(value)).encode()
            if step == "b64gz":
                data = gzip.compress(data, mtime=0)
            value = base64.b64encode(data).decode()
    return value


def _place(host: Any, secret: Any, rng: random.Random) -> Any:
    """`host` with `secret` put at a random place in it (or beside it)."""
    containers: list[Any] = []
    stack = [host]
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list)):
            containers.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
    if not containers:
        return [host, secret]
    target = rng.choice(containers)
    if isinstance(target, dict):
        target[f"k{rng.randint(0, 99)}"] = secret
    else:
        target.insert(rng.randint(0, len(target)), secret)
    return host


@FUZZ
@given(
    host=hostile_values(max_depth=4, max_long=2000),
    how=st.lists(st.sampled_from(["json", "list", "object", "b64", "b64gz"]), max_size=5),
    where=st.sampled_from(["structured", "text", "resource", "prose", "other"]),
    seed=st.integers(0, 2**16),
    noise=hostile_strings(max_long=200),
)
def test_a_hidden_patient_never_comes_out(
    host: Any, how: list[str], where: str, seed: int, noise: str
) -> None:
    rng = random.Random(seed)
    record = {"PatientName": NAME, "PatientID": PID, "noise": noise}
    if where == "prose":  # prose is not decoded: there the name must show (to block it)
        how = [step for step in how if step in ("json", "list", "object")]
    hidden = _place(copy.deepcopy(host), _hide(record, how), rng)
    if where == "structured":
        result: dict[str, Any] = {"structuredContent": {"x": hidden}}
    elif where == "text":
        result = {"content": [{"type": "text", "text": json.dumps(hidden)}]}
    elif where == "resource":
        result = {"content": [{"type": "resource", "resource": {"text": json.dumps(hidden)}}]}
    elif where == "prose":
        result = {"content": [{"type": "text", "text": f"{noise} {json.dumps(hidden)[:-1]}"}]}
    else:
        result = {"isError": False, "other": hidden, "structuredContent": {"PatientName": NAME}}
    applied = run(result, dicom_redactions())
    assert_clean(applied, NAME, PID)


@FUZZ
@given(value=hostile_values(max_depth=5, max_long=5000))
def test_results_without_anything_to_redact_come_back_as_they_were(value: Any) -> None:
    result = {
        "content": [{"type": "text", "text": json.dumps(value)}],
        "structuredContent": {"v": value},
    }
    applied = run(result, redactions_of([{"rule": "r", "path": "$..NeverThere7"}]))
    assert applied == Applied(result, (0,), None)
