"""The identity layer with real keys and real HTTP: a small issuer on loopback serves OAuth
metadata and a JWKS, tokens are minted with PyJWT, credential files are real files, and
the console commands run as the installed `mcp-policy` script."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from engine.errors import Conflict, NotFound, Unauthenticated
from engine.identity import (
    CredentialRejected,
    Identity,
    IdentityUnavailable,
    JwtVerifier,
    SecretsFile,
    add_entry,
    generate_secret,
    list_entries,
    revoke_entry,
)
from tests.fixtures.issuer import Issuer, Key, b64, unsigned

AUDIENCE = "https://mcp.example.test/mcp"
MCP_POLICY = Path(sys.executable).with_name("mcp-policy")


# -- keys and tokens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "RS256": Key("rsa-1", "RS256"),
        "ES256": Key("ec-1", "ES256"),
        "EdDSA": Key("ed-1", "EdDSA"),
        "RS256-next": Key("rsa-2", "RS256"),
        "RS256-stranger": Key("rsa-x", "RS256"),
    }


# -- the issuer -----------------------------------------------------------------------------


@pytest.fixture
async def issuer(keys: dict[str, Key]) -> AsyncIterator[Issuer]:
    server = Issuer(audience=AUDIENCE)
    server.jwks = [keys[alg].jwk for alg in ("RS256", "ES256", "EdDSA")]
    await server.start()
    yield server
    await server.stop()


async def started(issuer: Issuer, **options: Any) -> JwtVerifier:
    verifier = JwtVerifier(issuer=issuer.issuer, audience=AUDIENCE, **options)
    await verifier.start()
    return verifier


@pytest.fixture
async def verifier(issuer: Issuer) -> AsyncIterator[JwtVerifier]:
    v = await started(issuer)
    yield v
    await v.close()


async def rejected(verifier: JwtVerifier, token: str) -> CredentialRejected:
    with pytest.raises(CredentialRejected) as caught:
        await verifier.verify(token)
    assert caught.value.error == "invalid_token"
    assert isinstance(caught.value, Unauthenticated)
    return caught.value


# -- valid tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_valid_token_gives_identity(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key], alg: str
) -> None:
    claims = issuer.claims(
        roles=["imaging-admin", "reader"], scope="tools:call tools:list", sid="s-1", tenant="t9"
    )
    identity = await verifier.verify(keys[alg].sign(claims))
    assert identity == Identity(
        method="jwt",
        subject="alice",
        agent_id="agent-a",
        user_id="alice",
        roles=("imaging-admin", "reader"),
        scopes=("tools:call", "tools:list"),
        session_id="s-1",
        claims=claims,
    )
    assert identity.claims["tenant"] == "t9"
    assert identity.allowed == {}


async def test_azp_space_separated_roles_and_scp_list(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    claims = issuer.claims(client_id=None, azp="agent-b", roles="a b  c", scp=["x", "y"])
    identity = await verifier.verify(keys["ES256"].sign(claims))
    assert (identity.agent_id, identity.roles, identity.scopes) == (
        "agent-b",
        ("a", "b", "c"),
        ("x", "y"),
    )
    assert identity.session_id is None


async def test_client_credentials_token_is_named_by_client_id(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    identity = await verifier.verify(keys["RS256"].sign(issuer.claims(sub=None)))
    assert (identity.subject, identity.agent_id, identity.user_id) == ("agent-a", "agent-a", None)
    assert identity.roles == () and identity.scopes == ()


async def test_custom_and_nested_roles_claim(issuer: Issuer, keys: dict[str, Key]) -> None:
    verifier = await started(issuer, roles_claim="realm_access.roles")
    try:
        token = keys["RS256"].sign(issuer.claims(realm_access={"roles": ["ops"]}))
        assert (await verifier.verify(token)).roles == ("ops",)
    finally:
        await verifier.close()


async def test_audience_list_containing_ours(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    token = keys["EdDSA"].sign(issuer.claims(aud=["https://other.test/", AUDIENCE]))
    assert (await verifier.verify(token)).subject == "alice"


async def test_within_leeway_accepted(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    now = int(time.time())
    just_expired = issuer.claims(exp=now - 10, iat=now - 300)
    assert (await verifier.verify(keys["RS256"].sign(just_expired))).subject == "alice"
    nearly_valid = issuer.claims(nbf=now + 10, iat=now + 10)
    assert (await verifier.verify(keys["RS256"].sign(nearly_valid))).subject == "alice"


# -- refused tokens ---------------------------------------------------------------------------


async def test_expired(verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]) -> None:
    now = int(time.time())
    token = keys["RS256"].sign(issuer.claims(exp=now - 120, iat=now - 600))
    assert "expired" in (await rejected(verifier, token)).message


async def test_not_yet_valid(verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]) -> None:
    now = int(time.time())
    token = keys["ES256"].sign(issuer.claims(nbf=now + 120))
    assert "not yet valid" in (await rejected(verifier, token)).message
    token = keys["ES256"].sign(issuer.claims(iat=now + 120))
    assert "not yet valid" in (await rejected(verifier, token)).message


async def test_wrong_issuer(verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]) -> None:
    token = keys["RS256"].sign(issuer.claims(iss="https://evil.test"))
    assert "another issuer" in (await rejected(verifier, token)).message
    token = keys["RS256"].sign(issuer.claims(iss=None))
    assert "'iss'" in (await rejected(verifier, token)).message


async def test_wrong_audience(verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]) -> None:
    token = keys["RS256"].sign(issuer.claims(aud="https://other.test/mcp"))
    assert "not for this resource" in (await rejected(verifier, token)).message
    token = keys["RS256"].sign(issuer.claims(aud=["https://a.test", "https://b.test"]))
    assert "not for this resource" in (await rejected(verifier, token)).message
    token = keys["RS256"].sign(issuer.claims(aud=None))
    assert "'aud'" in (await rejected(verifier, token)).message


async def test_exp_required(verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]) -> None:
    token = keys["EdDSA"].sign(issuer.claims(exp=None))
    assert "'exp'" in (await rejected(verifier, token)).message


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", "str-future"),
        ("nbf", True),
        ("exp", [4102444800]),
        ("exp", {"value": 4102444800}),
        ("nbf", "0"),
        ("iat", "str-now"),
        ("sub", 12345),
        ("jti", 7),
        ("aud", {"aud": "AUDIENCE"}),
        ("aud", ["AUDIENCE", 3]),
    ],
)
async def test_registered_claims_of_the_wrong_type_refused(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key], claim: str, value: Any
) -> None:
    """A numeric string is not a NumericDate, a list is not an issuer: whatever PyJWT would
    convert or let through, a registered claim of the wrong JSON type refuses the token."""
    now = int(time.time())
    value = (
        {
            "str-future": str(now + 3600),
            "str-now": str(now),
            "ISSUER": issuer.issuer,
            "AUDIENCE": issuer.audience,
        }.get(value, value)
        if isinstance(value, str)
        else value
    )
    if isinstance(value, list):
        value = [{"ISSUER": issuer.issuer, "AUDIENCE": issuer.audience}.get(v, v) for v in value]
    if isinstance(value, dict):
        value = {k: {"AUDIENCE": issuer.audience}.get(v, v) for k, v in value.items()}
    token = keys["RS256"].sign(issuer.claims(**{claim: value}))
    message = (await rejected(verifier, token)).message.lower()
    names = {"iss": "issuer", "sub": "subject", "jti": "jwt id"}
    assert claim in message or names.get(claim, "-") in message, message


async def test_numeric_dates_may_be_fractional(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    now = time.time()
    token = keys["RS256"].sign(issuer.claims(exp=now + 300.5, iat=now - 0.25))
    assert (await verifier.verify(token)).subject == "alice"


async def test_alg_none_refused(verifier: JwtVerifier, issuer: Issuer) -> None:
    for alg in ("none", "None", "NONE"):
        token = unsigned({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, issuer.claims()) + "."
        assert "not allowed" in (await rejected(verifier, token)).message


async def test_hs256_with_public_key_as_secret_refused(
    issuer: Issuer, keys: dict[str, Key]
) -> None:
    """The classic confusion attack: HMAC 'signed' with the RSA public key's PEM, and the
    allow-list even naming HS256: still refused."""
    verifier = await started(issuer, algorithms=("RS256", "HS256"))
    try:
        pem = keys["RS256"].public_pem()
        signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, issuer.claims())
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        message = (await rejected(verifier, f"{signing_input}.{b64(mac)}")).message
        assert "'HS256' is not allowed" in message
    finally:
        await verifier.close()


async def test_symmetric_key_in_jwks_is_never_used(issuer: Issuer, keys: dict[str, Key]) -> None:
    secret = b"a-shared-secret-of-thirty-two-bytes!"
    issuer.jwks.append({"kty": "oct", "kid": "sym", "k": b64(secret), "alg": "HS256"})
    verifier = await started(issuer, algorithms=("RS256", "HS256"))
    try:
        token = jwt.encode(issuer.claims(), secret, algorithm="HS256", headers={"kid": "sym"})
        await rejected(verifier, token)
        assert (await verifier.verify(keys["RS256"].sign(issuer.claims()))).subject == "alice"
    finally:
        await verifier.close()


async def test_tampered_payload(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    for alg in ("RS256", "ES256", "EdDSA"):
        header, _, signature = keys[alg].sign(issuer.claims(roles=["reader"])).split(".")
        forged = b64(json.dumps(issuer.claims(roles=["imaging-admin"])).encode())
        message = (await rejected(verifier, f"{header}.{forged}.{signature}")).message
        assert message == "bad token signature"


async def test_signed_by_a_key_of_another_algorithm(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    """An ES256 token naming the RSA key's kid does not verify with it."""
    token = jwt.encode(
        issuer.claims(), keys["ES256"].private, algorithm="ES256", headers={"kid": "rsa-1"}
    )
    assert "not a ES256 key" in (await rejected(verifier, token)).message


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "..", "eyJhbGciOiJSUzI1NiJ9.e30.!!!!", "x" * 20_000],
)
async def test_malformed(verifier: JwtVerifier, token: str) -> None:
    assert "malformed" in (await rejected(verifier, token)).message


async def test_bad_claim_shapes(
    verifier: JwtVerifier, issuer: Issuer, keys: dict[str, Key]
) -> None:
    for claims, problem in [
        (issuer.claims(sub=None, client_id=None), "no subject"),
        (issuer.claims(roles={"admin": True}), "'roles' must be"),
        (issuer.claims(client_id=7), "'client_id' must be a string"),
        (issuer.claims(sub="x" * 300), "longer than 256"),
        (issuer.claims(roles=[str(i) for i in range(65)]), "more than 64"),
    ]:
        assert problem in (await rejected(verifier, keys["RS256"].sign(claims))).message


# -- key rotation and refresh -------------------------------------------------------------


async def test_unknown_kid_refreshes_once_and_rotation_needs_no_restart(
    issuer: Issuer, keys: dict[str, Key]
) -> None:
    verifier = await started(issuer, refresh_min_interval=0.2)
    old, new = keys["RS256"], keys["RS256-next"]
    try:
        old_token = old.sign(issuer.claims())
        assert (await verifier.verify(old_token)).subject == "alice"
        assert issuer.jwks_fetches == 1

        # the issuer publishes a new key and signs with it: verified after one refresh
        issuer.jwks = [old.jwk, new.jwk]
        await asyncio.sleep(0.25)
        assert (await verifier.verify(new.sign(issuer.claims(sub="bob")))).subject == "bob"
        assert issuer.jwks_fetches == 2
        assert (await verifier.verify(new.sign(issuer.claims()))).subject == "alice"
        assert (await verifier.verify(old_token)).subject == "alice"
        assert issuer.jwks_fetches == 2  # known keys: no I/O

        # the old key is withdrawn: once the keys are refreshed, its tokens fail
        issuer.jwks = [new.jwk]
        await asyncio.sleep(0.25)
        stranger = keys["RS256-stranger"].sign(issuer.claims())
        assert "unknown signing key" in (await rejected(verifier, stranger)).message
        assert issuer.jwks_fetches == 3
        assert "unknown signing key" in (await rejected(verifier, old_token)).message
        assert (await verifier.verify(new.sign(issuer.claims()))).subject == "alice"
    finally:
        await verifier.close()


async def test_unknown_kid_flood_fetches_at_most_once_per_interval(
    issuer: Issuer, keys: dict[str, Key]
) -> None:
    verifier = await started(issuer, refresh_min_interval=0.5)
    try:
        assert issuer.jwks_fetches == 1
        stranger = keys["RS256-stranger"]
        flood = [
            jwt.encode(
                issuer.claims(), stranger.private, algorithm="RS256", headers={"kid": f"k{i}"}
            )
            for i in range(200)
        ]
        # inside the interval after start: no fetch at all
        results = await asyncio.gather(*(verifier.verify(t) for t in flood), return_exceptions=True)
        assert all(isinstance(r, CredentialRejected) for r in results)
        assert issuer.jwks_fetches == 1

        # after it, concurrently and while the issuer is slow: one fetch, whoever asks
        await asyncio.sleep(0.6)
        issuer.jwks_delay = 0.1
        results = await asyncio.gather(*(verifier.verify(t) for t in flood), return_exceptions=True)
        assert all(isinstance(r, CredentialRejected) for r in results)
        assert issuer.jwks_fetches == 2
        for token in flood[:50]:
            await rejected(verifier, token)
        assert issuer.jwks_fetches == 2
        assert (await verifier.verify(keys["ES256"].sign(issuer.claims()))).subject == "alice"
    finally:
        await verifier.close()


async def test_keys_refreshed_in_background_when_old(issuer: Issuer, keys: dict[str, Key]) -> None:
    """A key the issuer withdrew stops verifying once the cache is jwks_max_age old, even
    if no unknown kid ever asks for a refresh."""
    verifier = await started(issuer, refresh_min_interval=0.1, jwks_max_age=0.2)
    try:
        token = keys["ES256"].sign(issuer.claims())
        assert (await verifier.verify(token)).subject == "alice"
        issuer.jwks = [keys["RS256"].jwk]
        refused = None
        for _ in range(100):
            await asyncio.sleep(0.05)
            try:
                await verifier.verify(token)
            except CredentialRejected as exc:
                refused = exc
                break
        assert refused is not None and "unknown signing key" in refused.message
    finally:
        await verifier.close()


async def test_failed_refresh_keeps_known_keys(issuer: Issuer, keys: dict[str, Key]) -> None:
    verifier = await started(issuer, refresh_min_interval=0.0)
    try:
        issuer.jwks = []  # an unusable JWKS: the keys already loaded stay
        await rejected(verifier, keys["RS256-stranger"].sign(issuer.claims()))
        assert issuer.jwks_fetches == 2
        assert (await verifier.verify(keys["RS256"].sign(issuer.claims()))).subject == "alice"
    finally:
        await verifier.close()


# -- discovery --------------------------------------------------------------------------------


async def test_discovery_falls_back_to_openid_configuration(keys: dict[str, Key]) -> None:
    server = Issuer(audience=AUDIENCE, oauth=False)
    server.jwks = [keys["EdDSA"].jwk]
    await server.start()
    try:
        verifier = await started(server)
        try:
            assert server.requests["/.well-known/oauth-authorization-server"] == 1
            assert server.requests["/.well-known/openid-configuration"] == 1
            token = keys["EdDSA"].sign(server.claims())
            assert (await verifier.verify(token)).subject == "alice"
        finally:
            await verifier.close()
    finally:
        await server.stop()


@pytest.mark.parametrize("oauth", [True, False])
async def test_discovery_for_an_issuer_with_a_path(keys: dict[str, Key], oauth: bool) -> None:
    server = Issuer("/tenant", audience=AUDIENCE, oauth=oauth, oidc=not oauth)
    server.jwks = [keys["ES256"].jwk]
    await server.start()
    try:
        verifier = await started(server)
        try:
            used = (
                "/.well-known/oauth-authorization-server/tenant"
                if oauth
                else "/tenant/.well-known/openid-configuration"
            )
            assert server.requests[used] == 1
            token = keys["ES256"].sign(server.claims())
            assert (await verifier.verify(token)).user_id == "alice"
            other = keys["ES256"].sign(server.claims(iss=server.base))
            assert "another issuer" in (await rejected(verifier, other)).message
        finally:
            await verifier.close()
    finally:
        await server.stop()


async def test_metadata_naming_another_issuer_fails_start(issuer: Issuer) -> None:
    issuer.metadata_issuer = "https://evil.test"
    verifier = JwtVerifier(issuer=issuer.issuer, audience=AUDIENCE)
    with pytest.raises(IdentityUnavailable) as caught:
        await verifier.start()
    assert "'https://evil.test'" in caught.value.message
    assert "not the configured" in caught.value.message


async def test_start_fails_clearly_without_metadata_or_keys(issuer: Issuer) -> None:
    issuer.oauth = issuer.oidc = False
    with pytest.raises(IdentityUnavailable) as caught:
        await JwtVerifier(issuer=issuer.issuer, audience=AUDIENCE).start()
    assert "no metadata for issuer" in caught.value.message and "HTTP 404" in caught.value.message

    issuer.oauth = True
    issuer.jwks = []
    with pytest.raises(IdentityUnavailable) as caught:
        await JwtVerifier(issuer=issuer.issuer, audience=AUDIENCE).start()
    assert "no usable signing key" in caught.value.message

    unreachable = JwtVerifier(issuer="http://127.0.0.1:9", audience=AUDIENCE, http_timeout=2)
    with pytest.raises(IdentityUnavailable) as caught:
        await unreachable.start()
    assert "cannot fetch" in caught.value.message


async def test_explicit_jwks_url_skips_discovery(issuer: Issuer, keys: dict[str, Key]) -> None:
    issuer.oauth = issuer.oidc = False
    verifier = await started(issuer, jwks_url=f"{issuer.base}/jwks")
    try:
        assert (await verifier.verify(keys["RS256"].sign(issuer.claims()))).subject == "alice"
        assert sum(n for path, n in issuer.requests.items() if "well-known" in path) == 0
    finally:
        await verifier.close()


async def test_configuration_mistakes_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="https"):
        JwtVerifier(issuer="http://issuer.example.com", audience=AUDIENCE)
    with pytest.raises(ValueError, match="unsupported"):
        JwtVerifier(issuer="https://issuer.example.com", audience=AUDIENCE, algorithms=["XS1"])
    with pytest.raises(ValueError, match="no usable"):
        JwtVerifier(issuer="https://issuer.example.com", audience=AUDIENCE, algorithms=["HS256"])
    verifier = JwtVerifier(issuer="https://issuer.example.com", audience=AUDIENCE)
    with pytest.raises(IdentityUnavailable, match="not started"):
        await verifier.verify("a.b.c")


# -- credential files ---------------------------------------------------------------------


def test_add_lookup_revoke(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.yaml"
    secret = add_entry(
        path, "api_key", "agent-a", agent_id="agent-a", user_id="alice", roles=["imaging-admin"]
    )
    assert secret.startswith("mcpk_") and len(secret) > 40
    keys = SecretsFile(path, kind="api_key", check_interval=0)
    identity = keys.lookup(secret)
    assert identity is not None
    assert (identity.method, identity.subject, identity.agent_id, identity.user_id) == (
        "api_key",
        "agent-a",
        "agent-a",
        "alice",
    )
    assert identity.roles == ("imaging-admin",)
    assert "sha256" not in identity.claims and identity.claims["name"] == "agent-a"
    for wrong in ("", secret + "x", secret[:-1], generate_secret("api_key"), "\ud800", "x" * 5000):
        assert keys.lookup(wrong) is None

    revoked = revoke_entry(path, "agent-a")
    assert revoked.revoked and revoked.revoked_at
    assert keys.lookup(secret) is None
    assert [e.revoked for e in list_entries(path)] == [True]
    with pytest.raises(NotFound):
        revoke_entry(path, "agent-b")
    with pytest.raises(Conflict):
        add_entry(path, "api_key", "agent-a")


def test_revocation_seen_within_the_check_interval(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    secret = add_entry(path, "api_key", "agent-a", agent_id="agent-a")
    other = add_entry(path, "api_key", "agent-b", agent_id="agent-b")
    keys = SecretsFile(path, kind="api_key", check_interval=0.05)
    assert keys.lookup(secret) is not None
    revoke_entry(path, "agent-a")
    time.sleep(0.1)
    assert keys.lookup(secret) is None
    identity = keys.lookup(other)
    assert identity is not None and identity.subject == "agent-b"


def test_bad_yaml_keeps_the_last_good_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    secret = add_entry(path, "api_key", "agent-a", agent_id="agent-a")
    keys = SecretsFile(path, kind="api_key", check_interval=0)
    good = path.read_text()
    with caplog.at_level(logging.WARNING, logger="engine.identity.secrets_file"):
        path.write_text("entries: [ {name: broken\n")
        for _ in range(5):
            assert keys.lookup(secret) is not None
        path.write_text("entries:\n- name: agent-a\n  sha256: abc\n")  # valid YAML, bad entry
        for _ in range(5):
            assert keys.lookup(secret) is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per bad version of the file, not one per lookup
    assert "not valid YAML" in warnings[0].getMessage()
    assert "last good entries" in warnings[0].getMessage()
    assert "sha256 must be 64 hex digits" in warnings[1].getMessage()

    fixed = good.replace("revoked: false", "revoked: true")
    assert fixed != good
    path.write_text(fixed)
    assert keys.lookup(secret) is None


def test_file_holds_hashes_only_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "approvers.yaml"
    secrets_ = [
        add_entry(path, "approver", "carol", user_id="carol", servers=["s1"], tools=["t1", "t2"]),
        add_entry(path, "approver", "dave", user_id="dave"),
    ]
    text = path.read_text()
    for secret in secrets_:
        assert secret.startswith("mcpa_")
        assert secret not in text
        assert secret.removeprefix("mcpa_") not in text
        assert hashlib.sha256(secret.encode()).hexdigest() in text
    assert text.startswith("# mcp-policy approver file: secrets are stored only as SHA-256")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    approvers = SecretsFile(path, kind="approver")
    carol = approvers.lookup(secrets_[0])
    assert carol is not None and carol.method == "approver" and carol.user_id == "carol"
    assert carol.allowed == {"servers": ("s1",), "tools": ("t1", "t2")}
    dave = approvers.lookup(secrets_[1])
    assert dave is not None and dave.allowed == {}


def test_lookup_compares_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clients.yaml"
    secret = add_entry(path, "client_token", "proxy-1")
    assert secret.startswith("mcpc_")
    clients = SecretsFile(path, kind="client_token", check_interval=60)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    identity = clients.lookup(secret)
    assert identity is not None and identity.method == "client_token"
    assert identity.subject == "proxy-1"
    assert clients.lookup(generate_secret("client_token")) is None
    assert len(calls) == 2  # a hit and a miss both go through compare_digest
    digest = hashlib.sha256(secret.encode()).hexdigest().encode()
    assert calls[0] == (digest, digest)


def test_missing_wrong_kind_and_hand_written_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "keys.yaml"
    with pytest.raises(IdentityUnavailable) as caught:
        SecretsFile(missing, kind="api_key")
    assert str(missing) in caught.value.message

    keys = tmp_path / "keys.yaml"
    add_entry(keys, "api_key", "agent-a")
    with pytest.raises(IdentityUnavailable, match="is a api_key file, not a approver file"):
        SecretsFile(keys, kind="approver")

    secret = "hand-made-secret-for-a-test"
    hand = tmp_path / "hand.yaml"
    hand.write_text(
        "# mcp-policy keys file: secrets are stored only as SHA-256 hashes\n"
        "entries:\n"
        "  - name: agent-a\n"
        f"    sha256: {hashlib.sha256(secret.encode()).hexdigest().upper()}\n"
        "    agent_id: agent-a\n"
        "    user_id: alice\n"
        "    roles: [imaging-admin]\n"
        "    created: 2026-12-01T10:00:00Z\n"
        "    revoked: false\n"
    )
    identity = SecretsFile(hand, kind="api_key").lookup(secret)
    assert identity is not None and identity.claims["created"] == "2026-12-01T10:00:00Z"

    typo = tmp_path / "typo.yaml"
    typo.write_text(hand.read_text().replace("revoked: false", "revokd: true"))
    with pytest.raises(IdentityUnavailable, match="unknown field"):
        SecretsFile(typo, kind="api_key")


# -- console commands ---------------------------------------------------------------------


def mcp_policy(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MCP_POLICY_STATE_DIR": str(state)}
    return subprocess.run(
        [str(MCP_POLICY), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_keys_commands_through_the_console_script(tmp_path: Path) -> None:
    state = tmp_path / "state"
    added = mcp_policy(
        "keys",
        "add",
        "agent-a",
        "--user-id",
        "alice",
        "--role",
        "imaging-admin",
        "--role",
        "r2",
        state=state,
    )
    assert added.returncode == 0, added.stderr
    secret = added.stdout.strip()
    assert added.stdout == secret + "\n" and secret.startswith("mcpk_")
    assert "shown only this once" in added.stderr and secret not in added.stderr

    path = state / "keys.yaml"
    identity = SecretsFile(path, kind="api_key").lookup(secret)
    assert identity is not None
    assert (identity.agent_id, identity.user_id, identity.roles) == (
        "agent-a",
        "alice",
        ("imaging-admin", "r2"),
    )

    listed = mcp_policy("keys", "list", state=state)
    assert listed.returncode == 0, listed.stderr
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in listed.stdout and digest not in listed.stdout
    assert digest[:8] in listed.stdout
    assert "agent-a" in listed.stdout and "active" in listed.stdout

    again = mcp_policy("keys", "add", "agent-a", state=state)
    assert again.returncode == 3 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "already has an entry named 'agent-a'" in again.stderr

    revoked = mcp_policy("keys", "revoke", "agent-a", state=state)
    assert revoked.returncode == 0, revoked.stderr
    assert SecretsFile(path, kind="api_key").lookup(secret) is None
    assert "revoked" in mcp_policy("keys", "list", state=state).stdout

    unknown = mcp_policy("keys", "revoke", "agent-z", state=state)
    assert unknown.returncode == 3 and unknown.stderr.count("\n") == 1
    assert "no entry named 'agent-z'" in unknown.stderr


def test_approvers_and_clients_commands(tmp_path: Path) -> None:
    state = tmp_path / "state"
    own = tmp_path / "elsewhere" / "approvers.yaml"
    added = mcp_policy(
        "approvers",
        "add",
        "carol",
        "--server",
        "awslabs.healthimaging-mcp-server",
        "--tool",
        "copy_image_set",
        "--file",
        str(own),
        state=state,
    )
    assert added.returncode == 0, added.stderr
    carol = SecretsFile(own, kind="approver").lookup(added.stdout.strip())
    assert carol is not None and carol.user_id == "carol"
    assert carol.allowed == {
        "servers": ("awslabs.healthimaging-mcp-server",),
        "tools": ("copy_image_set",),
    }
    listed = mcp_policy("approvers", "list", "--file", str(own), state=state)
    assert "copy_image_set" in listed.stdout and added.stdout.strip() not in listed.stdout

    client = mcp_policy("clients", "add", "proxy-1", state=state)
    assert client.returncode == 0 and client.stdout.startswith("mcpc_")
    assert (state / "clients.yaml").exists() and not (state / "approvers.yaml").exists()

    missing = mcp_policy("approvers", "list", state=state)
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1
    assert "no such file" in missing.stderr

    bad = mcp_policy("clients", "add", "not a name", state=state)
    assert bad.returncode == 3 and bad.stderr.count("\n") == 1 and bad.stdout == ""
