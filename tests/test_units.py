"""Parsers and the policy reader on their own: strict JSON, the JSON-RPC shape, bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import jsonstrict, translate
from engine.errors import InvalidRequest, PolicyRejected
from engine.models import DecideRequest, Principal
from engine.policy.source import MODULE_PREFIX, read_bundle
from engine.settings import PROJECT_ROOT

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_strict_parser_reads_what_json_writes(value: Any) -> None:
    assert jsonstrict.loads(json.dumps(value), max_depth=100) == value


@given(st.text(max_size=200))
def test_strict_parser_fails_only_with_invalid_request(text: str) -> None:
    try:
        jsonstrict.loads(text, max_depth=8)
    except InvalidRequest as exc:
        assert exc.syntax
        assert exc.message


@given(json_values)
def test_canonical_form_ignores_key_order_and_integral_floats(value: Any) -> None:
    def shuffle(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: shuffle(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [shuffle(x) for x in v]
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**53:
            return float(v)
        return v

    assert jsonstrict.canonical(value) == jsonstrict.canonical(shuffle(value))


def _request(message: Any) -> DecideRequest:
    return DecideRequest.model_validate(
        {"server": "srv", "message": message, "principal": {"session_id": "s"}}
    )


@given(json_values)
def test_any_message_is_a_call_or_a_clear_error(message: Any) -> None:
    try:
        call = translate.tool_call(_request(message), max_depth=24)
    except InvalidRequest as exc:
        assert exc.field is not None and exc.field.startswith("message")
    else:
        assert isinstance(message, dict)
        assert message["method"] == "tools/call"
        assert call.name == message["params"]["name"]


def test_input_document_shape() -> None:
    from datetime import UTC, datetime

    request = _request(
        {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {"name": "t", "arguments": {"a": 1}},
        }
    )
    call = translate.tool_call(request, max_depth=24)
    doc = translate.input_document(
        call,
        request,
        decision_id="dec_1",
        now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        transport="http",
    )
    assert doc == {
        "tool": {"server": "srv", "name": "t", "arguments": {"a": 1}},
        "principal": {
            "agent_id": None,
            "session_id": "s",
            "user_id": None,
            "roles": [],
            "authenticated": False,
            "method": None,
            "scopes": [],
            "claims": {},
            "asserted_by": None,
        },
        "request": {
            "id": "dec_1",
            "time": "2026-01-02T03:04:05.000Z",
            "transport": "http",
            "jsonrpc_id": 9,
        },
        "context": {},
    }


def test_a_verified_identity_replaces_what_the_caller_asserted() -> None:
    from datetime import UTC, datetime

    from engine.identity.base import Identity

    request = _request(
        {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "t"}}
    ).model_copy(
        update={"principal": Principal(agent_id="liar", session_id="s", roles=["imaging-admin"])}
    )
    identity = Identity(
        method="jwt",
        subject="u-7",
        agent_id="agent-7",
        user_id="u-7",
        roles=("viewer",),
        scopes=("mcp",),
        claims={"sub": "u-7", "client_id": "agent-7"},
    )
    proven = request.model_copy(
        update={"principal": translate.proven_principal(request.principal, identity)}
    )
    doc = translate.input_document(
        translate.tool_call(proven, max_depth=24),
        proven,
        decision_id="dec_1",
        now=datetime(2026, 1, 2, tzinfo=UTC),
        transport="grpc",
        identity=identity,
        asserted_by="proxy-a",
    )
    assert doc["principal"] == {
        "agent_id": "agent-7",
        "session_id": "s",
        "user_id": "u-7",
        "roles": ["viewer"],
        "authenticated": True,
        "method": "jwt",
        "scopes": ["mcp"],
        "claims": {"sub": "u-7", "client_id": "agent-7"},
        "asserted_by": None,
    }


def test_shipped_bundle_excludes_tests_and_merges_data() -> None:
    bundle = read_bundle([PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"])
    assert bundle.modules
    assert all(m.startswith(MODULE_PREFIX) for m in bundle.modules)
    assert not any(m.endswith("_test.rego") for m in bundle.modules)
    policy = bundle.data["mcp_policy"]
    assert {"catalog", "rules", "default", "risk_defaults"} <= set(policy)


def test_bundle_revision_follows_content(tmp_path: Path) -> None:
    (tmp_path / "a.rego").write_text("package a\n\nx := 1\n")
    (tmp_path / "d.yaml").write_text("k: {v: 1}\n")
    first = read_bundle([tmp_path])
    assert read_bundle([tmp_path]).revision == first.revision
    (tmp_path / "d.yaml").write_text("k: {v: 2}\n")
    assert read_bundle([tmp_path]).revision != first.revision


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({"a.yaml": "k: {v: 1}\n", "b.yaml": "k: {v: 2}\n"}, "data conflict at data.k.v"),
        ({"a.yaml": "k: [1, 2]\n"}, "data.k must be an object"),
        ({"a.yaml": "- 1\n"}, "top level must be a mapping"),
        ({"a.yaml": "k: {\n"}, "not valid data"),
    ],
)
def test_bad_data_is_rejected(tmp_path: Path, files: dict[str, str], words: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PolicyRejected) as caught:
        read_bundle([tmp_path])
    assert words in caught.value.message


def test_data_in_subdirectories_lands_under_their_path(tmp_path: Path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "y" / "d.json").write_text('{"v": 1}')
    assert read_bundle([tmp_path]).data == {"x": {"y": {"v": 1}}}


async def test_policy_gate_never_mixes_evaluations_with_a_change() -> None:
    import asyncio

    from engine.errors import PolicyUnavailable
    from engine.policy.loader import Gate

    gate = Gate()
    events: list[str] = []
    reader_in = asyncio.Event()
    release_reader = asyncio.Event()

    async def reader(name: str, hold: asyncio.Event | None = None) -> None:
        async with gate.evaluating(wait=5):
            events.append(f"{name} in")
            if hold is not None:
                reader_in.set()
                await hold.wait()
            events.append(f"{name} out")

    async def writer() -> None:
        async with gate.changing():
            events.append("change in")
            await asyncio.sleep(0.05)
            events.append("change out")

    first = asyncio.create_task(reader("r1", release_reader))
    await reader_in.wait()
    change = asyncio.create_task(writer())
    await asyncio.sleep(0.02)
    late = asyncio.create_task(reader("r2"))
    await asyncio.sleep(0.02)
    assert events == ["r1 in"], "the change waits for r1; r2 waits for the change"
    release_reader.set()
    await asyncio.gather(first, change, late)
    assert events == ["r1 in", "r1 out", "change in", "change out", "r2 in", "r2 out"]

    async with gate.changing():
        with pytest.raises(PolicyUnavailable) as caught:
            async with gate.evaluating(wait=0.05):
                pass
    assert "being replaced" in caught.value.message
