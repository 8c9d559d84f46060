"""Hostile bodies through the gateway protocols (Envoy ext_authz, forward-auth, AuthZEN):
each is refused as malformed (HTTP 400 or a denied Check with 400), never a 5xx or an
allow, and nothing is consumed from the session it names."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.clients import HttpClient
from tests.conftest import COPY_INFORMATION, DATASTORE, HEALTHIMAGING, IMAGE_SET, session
from tests.test_extauthz import Envoy, envoy  # noqa: F401 (the fixture)
from tests.test_gateway_http import forwarded

ARGS = (
    f'{{"datastore_id":"{DATASTORE}","source_image_set_id":"{IMAGE_SET}",'
    f'"copy_image_set_information":{json.dumps(COPY_INFORMATION)}'
)


def call_text(extra: str = "", name: str = '"copy_image_set"', jsonrpc_id: str = "7") -> str:
    return (
        f'{{"jsonrpc":"2.0","id":{jsonrpc_id},"method":"tools/call",'
        f'"params":{{"name":{name},"arguments":{ARGS}{extra}}}}}}}'
    )


HOSTILE: list[tuple[str, str | bytes]] = [
    ("surrogate-tool", call_text(name='"copy\\ud800"')),
    ("surrogate-argument", call_text(',"x":"\\udfff"')),
    ("surrogate-key", call_text(',"\\ud83d":1')),
    ("huge-integer", call_text(',"n":' + "9" * 5000)),
    ("huge-id", call_text(jsonrpc_id="1" * 5000)),
    ("float-overflow", call_text(',"n":1e400')),
    ("nan", call_text(',"n":NaN')),
    ("duplicate-key", call_text(',"datastore_id":"x"')),
    ("deep", call_text(',"d":' + '{"a":' * 40 + "1" + "}" * 40)),
    ("not-utf8", call_text().encode() + b"\xff"),
]
IDS = [case for case, _ in HOSTILE]


def raw(body: str | bytes) -> bytes:
    return body if isinstance(body, bytes) else body.encode()


async def full_quota_via_forward_auth(http: HttpClient, sid: str, *, used: int = 0) -> None:
    """One good call through forward-auth, then a dry run: only the good calls counted."""
    ok = await http.raw.post("/v1/check", content=call_text(), headers=forwarded(sid))
    assert ok.status_code == 200, ok.text
    decision = await http.raw.post(
        "/v1/decide",
        json={
            "server": HEALTHIMAGING,
            "tool": "copy_image_set",
            "arguments": {
                "datastore_id": DATASTORE,
                "source_image_set_id": IMAGE_SET,
                "copy_image_set_information": COPY_INFORMATION,
            },
            "principal": {"session_id": sid, "agent_id": f"agent-{sid}", "user_id": "user-1"},
            "dry_run": True,
        },
    )
    left = decision.json()["rate_limit"]["remaining"]
    assert left == 10 - (used + 1) - 1, "a refused body took a slot"


@pytest.mark.parametrize(("case", "body"), HOSTILE, ids=IDS)
async def test_forward_auth_refuses_hostile_bodies(
    http: HttpClient, case: str, body: str | bytes
) -> None:
    sid = session()
    answer = await http.raw.post("/v1/check", content=raw(body), headers=forwarded(sid))
    assert answer.status_code == 400, (case, answer.status_code, answer.text[:300])
    assert answer.json()["error"]["code"] in (-32700, -32600, -32602)
    assert len(answer.content) < 4096
    await full_quota_via_forward_auth(http, sid)


@pytest.mark.parametrize(("case", "body"), HOSTILE, ids=IDS)
async def test_extauthz_refuses_hostile_bodies(
    envoy: Envoy,  # noqa: F811
    http: HttpClient,
    case: str,
    body: str | bytes,
) -> None:
    sid = session()
    answer = await envoy.check(body, sid=sid)
    assert not answer.ok
    assert answer.http_status == 400, (case, answer)
    assert len(str(answer.body)) < 4096
    allowed = await envoy.check(call_text(), sid=sid)
    assert allowed.ok
    await full_quota_via_forward_auth(http, sid, used=1)


def evaluation(sid: str, arguments: Any) -> dict[str, Any]:
    return {
        "subject": {"type": "agent", "id": f"agent-{sid}", "properties": {"session_id": sid}},
        "action": {"name": "tools/call"},
        "resource": {"type": "mcp_tool", "id": f"{HEALTHIMAGING}/copy_image_set"},
        "context": {"arguments": arguments},
    }


@pytest.mark.parametrize(
    "poison",
    ['"\\ud800"', "9" * 5000, "1e400", "NaN", '{"a":1,"a":2}', '{"a":' * 40 + "1" + "}" * 40],
    ids=["surrogate", "huge-integer", "float-overflow", "nan", "duplicate-key", "deep"],
)
async def test_authzen_refuses_hostile_bodies(http: HttpClient, poison: str) -> None:
    sid = session()
    text = (
        '{"subject":{"type":"agent","id":"agent-'
        + sid
        + '","properties":{"session_id":"'
        + sid
        + '"}},'
        '"action":{"name":"tools/call"},'
        f'"resource":{{"type":"mcp_tool","id":"{HEALTHIMAGING}/copy_image_set"}},'
        '"context":{"arguments":{"datastore_id":' + poison + "}}}"
    )
    answer = await http.raw.post(
        "/access/v1/evaluation", content=text, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text[:300]
    assert set(answer.json()) == {"error"}
    good = evaluation(
        sid,
        {
            "datastore_id": DATASTORE,
            "source_image_set_id": IMAGE_SET,
            "copy_image_set_information": COPY_INFORMATION,
        },
    )
    first = (await http.raw.post("/access/v1/evaluation", json=good)).json()
    assert first["decision"] is True
    assert first["context"]["rate_limit"]["remaining"] == 9, "the refused body took nothing"
