"""Principal ids (agent, session, user) that look like another principal's, tried as an
attacker would: whitespace at either end, control characters anywhere (C0, DEL, C1).

Ids key rate limits, approvals and the decision log byte for byte, so "s-1 " or "s-1\\n"
would be a fresh principal that reads as s-1 everywhere it is shown. Each is refused where
it enters: the HTTP API (422) and gRPC (INVALID_ARGUMENT), naming the field; a token's or
an API key's ids; the proxy's --agent-id/--user-id and its Mcp-Policy-Session header (400).
The assertion is always the same: no 5xx, no allow, nothing consumed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.errors import InvalidRequest
from engine.identity.secrets_file import add_entry
from engine.models import PRINCIPAL_ID_PATTERN, Principal
from engine.proxy.core import ProxyOptions
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.http import start_http_proxy
from engine.proxy.upstream import open_child
from engine.runtime import Runtime
from engine.transports.server import start_servers
from mcppolicy.v1 import types_pb2
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import copy_call, session, settings_for
from tests.fixtures.issuer import Issuer
from tests.fixtures.proxy_harness import FIXTURE, PROXY, RECORD_ENV, calls, clean_env, copy_args
from tests.test_proxy_auth import modern_call, modern_headers
from tests.test_wire_rules import _rules

Client = HttpClient | GrpcClient
AUDIENCE = "https://pdp.example/principal-ids"
INTERNALS = ("Traceback", "<class", "ValidationError", "Exception")

# (case id, how to spoil a good id): whitespace at either end, controls anywhere.
SPOILED: list[tuple[str, Any]] = [
    ("leading-space", lambda good: " " + good),
    ("trailing-space", lambda good: good + " "),
    ("tab", lambda good: good + "\t"),
    ("newline", lambda good: good + "\n"),
    ("carriage-return-inside", lambda good: good[:2] + "\r" + good[2:]),
    ("nul-inside", lambda good: good[:2] + "\x00" + good[2:]),
    ("escape-inside", lambda good: "\x1b[31m" + good),
    ("del", lambda good: good + "\x7f"),
    ("next-line-c1", lambda good: "\u0085" + good),
    ("csi-c1-inside", lambda good: good[:2] + "\u009b" + good[2:]),
    ("line-separator", lambda good: good + "\u2028"),
    ("paragraph-separator", lambda good: "\u2029" + good),
    ("no-break-space", lambda good: good + "\u00a0"),
    ("ideographic-space", lambda good: "\u3000" + good),
]
FIELDS = ["session_id", "agent_id", "user_id"]


async def quota_untouched(client: Client, sid: str) -> None:
    """The session has all of its quota: nothing above took a slot."""
    decision = await client.decide(copy_call(sid))
    assert decision["verdict"] == "allow", decision
    assert decision["rate_limit"]["remaining"] == 9, "a refused request took a slot"


def refusal_names(failed: ApiError, client: Client, field: str) -> None:
    assert failed.status == (422 if client.name == "http" else "INVALID_ARGUMENT"), failed
    assert f"principal.{field}" in failed.message, failed.message
    assert not any(word in failed.message for word in INTERNALS), failed.message


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(("case", "spoil"), SPOILED, ids=[c for c, _ in SPOILED])
async def test_a_spoiled_id_is_refused_naming_its_field(
    client: Client, field: str, case: str, spoil: Any
) -> None:
    """Over HTTP (422) and gRPC (INVALID_ARGUMENT): the field is named, the session's quota
    is untouched, and no approval is opened (the call would need one)."""
    sid = session()
    body = copy_call(sid)
    good = body["principal"][field]
    body["principal"][field] = spoil(good)
    for call in (body, {**body, "dry_run": True}):
        with pytest.raises(ApiError) as failed:
            await client.decide(call)
        refusal_names(failed.value, client, field)
    await quota_untouched(client, sid)


async def test_ids_that_only_look_odd_are_accepted(client: Client) -> None:
    """The rule refuses what it says and no more: inner spaces, other scripts and
    invisible format characters (not whitespace, not controls) are ids like any other."""
    for odd in ("a b", "dr. Müller", "агент-1", "x\u200by", "s\u2028s", "😀"):
        sid = f"{odd}-{uuid.uuid4().hex[:6]}"
        body = copy_call(sid)
        body["principal"]["agent_id"] = f"agent {odd}"
        body["principal"]["user_id"] = odd
        decision = await client.decide(body)
        assert decision["verdict"] == "allow", (odd, decision)
        assert decision["rate_limit"]["remaining"] == 9


async def test_the_http_and_grpc_rules_are_one_pattern() -> None:
    """The buf.validate pattern of each principal field is the HTTP API's (its schema)."""
    schema = Principal.model_json_schema()["properties"]
    for field in FIELDS:
        assert _rules(types_pb2.Principal, field).string.pattern == PRINCIPAL_ID_PATTERN
        options = schema[field].get("anyOf", [schema[field]])
        assert [o["pattern"] for o in options if o.get("type") == "string"] == [
            PRINCIPAL_ID_PATTERN
        ]


# -- ids that come from credentials ----------------------------------------------------


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    running = Issuer(audience=AUDIENCE)
    await running.start()
    yield running
    await running.stop()


async def test_a_token_whose_ids_are_spoiled_is_not_accepted(
    tmp_path: Path, issuer: Issuer
) -> None:
    """A verified token whose sub, client_id or sid would be a spoiled principal id: the
    credential is not accepted (a deny naming the claim), never a 5xx, nothing taken."""
    servers = await start_servers(
        settings_for(tmp_path, agent_issuer=issuer.issuer, agent_audience=AUDIENCE)
    )
    try:
        async with httpx.AsyncClient(base_url=servers.http_url) as raw:
            http = HttpClient(raw)
            for claim, value in [
                ("sub", "alice "),
                ("sub", "\u00a0alice"),
                ("client_id", "agent-a\n"),
                ("azp", "agent\x7f"),
                ("sid", "\u2028s-1"),
            ]:
                sid = session()
                claims = {claim: value} if claim != "azp" else {"client_id": None, claim: value}
                body = {**copy_call(sid), "credential": issuer.token(**claims)}
                decision = await http.decide(body)
                assert decision["verdict"] == "deny", (claim, decision)
                assert decision["rule"] == "identity.invalid_credential", decision
                assert f"token claim '{claim}'" in decision["reason"], decision
                await quota_untouched(http, sid)
            fine = await http.decide({**copy_call(), "credential": issuer.token(sub="al ice")})
            assert fine["verdict"] == "allow", fine
    finally:
        await servers.stop()


def test_an_api_key_entry_with_a_spoiled_id_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    for field, value in [("agent_id", "agent-k "), ("user_id", "\tkim"), ("agent_id", "k\u0085")]:
        with pytest.raises(InvalidRequest) as refused:
            add_entry(keys, "api_key", "key-1", **{field: value})
        assert field in str(refused.value)
    assert not keys.exists(), "nothing was written"
    add_entry(keys, "api_key", "key-1", agent_id="agent k", user_id="kim")


# -- the proxy --------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--agent-id", "--user-id"])
@pytest.mark.parametrize("value", [" a", "a\t", "a\x7fb", "\u2028a", ""])
async def test_the_proxy_refuses_a_spoiled_id_flag(flag: str, value: str) -> None:
    """Refused before anything starts (usage error, exit status 2), naming the flag."""
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "proxy",
        "--embedded",
        flag,
        value,
        "--",
        *FIXTURE,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, (out, err)
    assert f"argument {flag}:" in err.decode()
    assert out == b""


async def test_the_proxy_refuses_a_spoiled_session_header(tmp_path: Path) -> None:
    """A 2026-07-28 call naming its decision session in Mcp-Policy-Session: a value that is
    not an id (the header takes letters, digits and ._:@- only) is a 400 naming the header;
    nothing is decided or forwarded. The same call with a good value goes through."""
    record = tmp_path / "calls.jsonl"
    runtime = Runtime(settings_for(tmp_path, decision_log="off"))
    await runtime.start()
    env = clean_env(**{RECORD_ENV: str(record)})
    running = await start_http_proxy(
        "127.0.0.1",
        0,
        decider=EmbeddedDecider(runtime),
        options=ProxyOptions(),
        open_upstream=lambda: open_child(FIXTURE, env),
    )
    args = copy_args()
    headers = modern_headers("tools/call", "copy_image_set")
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            # (DEL and the other controls no HTTP client sends in a header: h11 refuses them)
            for value in ["s 1", "s\t1", "s\x85", "s\u00a0", "s" * 129]:
                answer = await raw.post(
                    running.url,
                    json=modern_call(1, "copy_image_set", args),
                    headers={**headers, "mcp-policy-session": value.encode("latin-1")},
                )
                assert answer.status_code == 400, (value, answer.text)
                assert "mcp-policy-session" in answer.json()["error"]["message"]
            assert calls(record) == []
            good = await raw.post(
                running.url,
                json=modern_call(2, "copy_image_set", args),
                headers={**headers, "mcp-policy-session": "s-1"},
            )
    finally:
        await running.stop()
        await runtime.stop()
    assert good.status_code == 200, good.text
    assert [c["arguments"] for c in calls(record)] == [args]
