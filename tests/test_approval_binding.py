"""A granted approval is used only by the principal it was opened for.

Found by review: an approval is bound to a fingerprint of (server, tool, arguments,
session), so once granted, any caller whose call matched the fingerprint could use it: an
agent that learned another agent's approval id and session id (a shared log, a guessable
session) sent the identical call with `approval_id` and spent the other agent's grant; the
same agent calling for another user could too, and a proxy retrying a granted call does
that by itself. Now every store (memory, SQLite, Redis, Valkey, a Redis Cluster) checks
the call's agent and user against the ones the approval recorded in the same atomic step
that uses the grant: a stranger gets `Use.NOT_YOURS`, learns nothing of the approval and
spends nothing, and the grant still lets its own principal through, once. The service
answers that refusal with a deny (rule approval.not_yours) over HTTP and gRPC, also when
the stranger presents a credential of its own and claims to be the other agent, and in a
dry run.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from engine.identity import add_entry
from engine.models import Approval, ApprovalStatus, Principal, ToolCall
from engine.state.approvals import (
    SQLITE_SCHEMA,
    ApprovalStore,
    RedisApprovalStore,
    SqliteApprovalStore,
    Stored,
    Use,
    UseResult,
    agent_key,
    fingerprint,
)
from engine.state.ratelimit import RedisGate, cluster_client
from engine.transports.server import Servers, start_servers
from tests import test_stores
from tests.clients import ApiError, GrpcClient, HttpClient
from tests.conftest import APPROVER_TOKEN, approval_call, session, settings_for
from tests.kv import KvCluster
from tests.test_stores import Backend, opened

# The store fixture of test_stores.py: every store kind (memory, SQLite, Redis, Valkey).
backend = test_stores.backend

Client = HttpClient | GrpcClient
RULE = "approval.not_yours"
CALL = ToolCall(server="srv", name="copy_image_set", arguments={"n": 1})
SESSION = "s-shared"
OWNER = Principal(agent_id="agent-a", session_id=SESSION, user_id="user-1")
STRANGERS = [
    Principal(agent_id="agent-b", session_id=SESSION, user_id="user-1"),  # another agent
    Principal(agent_id=None, session_id=SESSION, user_id="user-1"),  # no agent at all
    Principal(agent_id="agent-a", session_id=SESSION, user_id="user-2"),  # another user
    Principal(agent_id="agent-a", session_id=SESSION, user_id=None),  # the user left out
    Principal(agent_id="Agent-A", session_id=SESSION, user_id="user-1"),  # ids are exact
]
FP = fingerprint(CALL, SESSION)


def unique(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:10]}"


# -- every store ----------------------------------------------------------------------------


async def open_for(store: ApprovalStore, who: Principal, call: ToolCall = CALL) -> Approval:
    return await store.open_or_get(call, who, rule="r", reason="why", decision_id="dec_o", ttl=60)


async def granted_for(store: ApprovalStore, who: Principal) -> Approval:
    approval = await open_for(store, who)
    return await store.decide(approval.id, approve=True, approver="ops", comment="ok", grant_ttl=60)


async def use(store: ApprovalStore, approval_id: str, who: Principal, n: int = 0) -> UseResult:
    return await store.consume(
        approval_id, fingerprint(CALL, who.session_id), principal=who, decision_id=f"dec_{n}"
    )


async def a_stranger_spends_nothing_of_a_grant(backend: Backend) -> None:
    """Every stranger (another agent, no agent, another user of the agent, the user left
    out, an agent id that differs only in case) presenting the grant's id with the identical
    call in the same session is refused without learning anything; the grant is still
    there, and lets its own principal through exactly once."""
    store = await opened(backend.open_approvals())
    try:
        grant = await granted_for(store, OWNER)
        for n, stranger in enumerate(STRANGERS):
            assert fingerprint(CALL, stranger.session_id) == grant.fingerprint
            refused = await use(store, grant.id, stranger, n)
            assert refused == UseResult(Use.NOT_YOURS, None), stranger
        assert await store.get(grant.id) == grant, "nothing of the grant was spent"
        used = await use(store, grant.id, OWNER)
        assert used.use is Use.GRANTED and used.approval is not None
        assert used.approval.status is ApprovalStatus.USED
        assert (await use(store, grant.id, OWNER)).use is Use.USED
        for stranger in STRANGERS:
            assert (await use(store, grant.id, stranger)).use is Use.NOT_YOURS, "nor its state"
    finally:
        await store.close()


async def strangers_racing_the_owner_never_win(backend: Backend) -> None:
    """The check is part of the one atomic use: forty strangers racing the owner's twenty
    attempts leave exactly one use, the owner's."""
    store = await opened(backend.open_approvals())
    try:
        grant = await granted_for(store, OWNER)
        attempts: list[Awaitable[UseResult]] = []
        for n in range(60):
            who = OWNER if n % 3 == 0 else STRANGERS[n % 2]
            attempts.append(use(store, grant.id, who, n))
        results = await asyncio.gather(*attempts)
        by_owner = results[::3]
        by_strangers = [r for n, r in enumerate(results) if n % 3]
        assert [r.use for r in by_owner].count(Use.GRANTED) == 1
        assert {r.use for r in by_owner} == {Use.GRANTED, Use.USED}
        assert by_strangers == [UseResult(Use.NOT_YOURS, None)] * 40
        assert (await store.get(grant.id)).status is ApprovalStatus.USED
    finally:
        await store.close()


async def a_stranger_learns_nothing_of_an_approval_in_any_state(backend: Backend) -> None:
    """Pending, denied, used or expired: to a stranger every approval of another principal
    is only "not yours" (no status, no approver's comment), even for another call."""
    store = await opened(backend.open_approvals())
    try:
        calls = [ToolCall(server="srv", name="t", arguments={"i": i}) for i in range(4)]
        pending, denied, used, short = [await open_for(store, OWNER, c) for c in calls]
        await store.decide(denied.id, approve=False, approver="ops", comment="no!", grant_ttl=60)
        await store.decide(used.id, approve=True, approver="ops", comment="", grant_ttl=60)
        fp = fingerprint(calls[2], SESSION)
        assert (await store.consume(used.id, fp, principal=OWNER, decision_id="d")).use is (
            Use.GRANTED
        )
        await store.decide(short.id, approve=True, approver="ops", comment="", grant_ttl=0.05)
        await asyncio.sleep(0.1)
        for approval, call in zip((pending, denied, used, short), calls, strict=True):
            for stranger in STRANGERS:
                for fp in (fingerprint(call, SESSION), FP, "not-a-fingerprint"):
                    result = await store.consume(
                        approval.id, fp, principal=stranger, decision_id="d"
                    )
                    assert result == UseResult(Use.NOT_YOURS, None)
        assert (await store.get(pending.id)).status is ApprovalStatus.PENDING
        assert (await store.get(short.id)).status is ApprovalStatus.EXPIRED
    finally:
        await store.close()


async def another_user_of_the_agent_gets_an_approval_of_its_own(backend: Backend) -> None:
    """The same call of the same agent in the same session, for another user (or for none),
    never gets back the first user's approval, granted or not: it opens its own."""
    store = await opened(backend.open_approvals())
    try:
        first = await open_for(store, OWNER)
        other_user = STRANGERS[2]
        no_user = STRANGERS[3]
        theirs = await open_for(store, other_user)
        nobodys = await open_for(store, no_user)
        assert len({first.id, theirs.id, nobodys.id}) == 3
        assert theirs.principal == other_user and nobodys.principal == no_user
        grant = await store.decide(first.id, approve=True, approver="ops", comment="", grant_ttl=60)
        assert await open_for(store, OWNER) == grant, "the owner gets its grant back"
        assert (await open_for(store, other_user)).id == theirs.id
        assert (await open_for(store, other_user)).status is ApprovalStatus.PENDING
        assert (await open_for(store, no_user)).id == nobodys.id
        assert (await use(store, theirs.id, other_user)).use is Use.PENDING
        assert (await use(store, grant.id, OWNER)).use is Use.GRANTED
    finally:
        await store.close()


async def a_grant_without_agent_or_user_is_bound_to_none(backend: Backend) -> None:
    """An approval opened by a call without agent_id (or user_id) is used only by a call
    without it: a call that names an agent or a user is another principal."""
    store = await opened(backend.open_approvals())
    try:
        anonymous = Principal(session_id=SESSION)
        grant = await granted_for(store, anonymous)
        for who in (
            Principal(session_id=SESSION, agent_id="agent-a"),
            Principal(session_id=SESSION, user_id="user-1"),
            OWNER,
        ):
            assert (await use(store, grant.id, who)).use is Use.NOT_YOURS
        assert (await use(store, grant.id, anonymous)).use is Use.GRANTED
        agent_only = Principal(session_id=SESSION, agent_id="agent-a")
        theirs = await granted_for(store, agent_only)
        assert (await use(store, theirs.id, OWNER)).use is Use.NOT_YOURS, "a user added"
        assert (await use(store, theirs.id, agent_only)).use is Use.GRANTED
    finally:
        await store.close()


async def the_fingerprint_is_still_checked_for_the_owner(backend: Backend) -> None:
    store = await opened(backend.open_approvals())
    try:
        grant = await granted_for(store, OWNER)
        other_call = fingerprint(
            ToolCall(server="srv", name="copy_image_set", arguments={}), SESSION
        )
        other_session = fingerprint(CALL, "s-other")
        for fp in (other_call, other_session, ""):
            result = await store.consume(grant.id, fp, principal=OWNER, decision_id="d")
            assert result.use is Use.MISMATCH
        assert (await store.get(grant.id)).status is ApprovalStatus.APPROVED
        assert (await use(store, grant.id, OWNER)).use is Use.GRANTED
    finally:
        await store.close()


STORE_PROMISES: list[Callable[[Backend], Awaitable[None]]] = [
    a_stranger_spends_nothing_of_a_grant,
    strangers_racing_the_owner_never_win,
    a_stranger_learns_nothing_of_an_approval_in_any_state,
    another_user_of_the_agent_gets_an_approval_of_its_own,
    a_grant_without_agent_or_user_is_bound_to_none,
    the_fingerprint_is_still_checked_for_the_owner,
]


@pytest.mark.parametrize("case", STORE_PROMISES, ids=lambda case: case.__name__)
async def test_store_binds_grants(
    case: Callable[[Backend], Awaitable[None]], backend: Backend
) -> None:
    await case(backend)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvCluster]:
    running = KvCluster(tmp_path_factory.mktemp("cluster"))
    running.start()
    yield running
    running.stop()


@pytest.fixture
async def cluster_backend(cluster: KvCluster) -> AsyncIterator[Backend]:
    """test_stores' Backend on a Redis Cluster (as tests/test_redis_cluster.py makes it)."""
    clients: list[Any] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    gate = RedisGate(32)

    def client() -> Any:
        made = cluster_client(cluster.url, decode_responses=True, max_connections=32)
        clients.append(made)
        return made

    yield Backend(
        "redis-cluster",
        lambda: test_stores.MemoryRateLimitStore(),
        lambda: RedisApprovalStore(client(), prefix, gate=gate),
        persistent=True,
    )
    for made in clients:
        await made.aclose()


@pytest.mark.parametrize("case", STORE_PROMISES, ids=lambda case: case.__name__)
async def test_store_binds_grants_on_a_redis_cluster(
    case: Callable[[Backend], Awaitable[None]], cluster_backend: Backend
) -> None:
    await case(cluster_backend)


async def test_a_sqlite_file_from_before_the_binding_finds_approvals_by_user(
    tmp_path: Path,
) -> None:
    """A file written with the cap columns but before the user was indexed gets the user
    column when opened, filled from its records: each user's approval is found again by
    its call, and never another user's."""
    path = tmp_path / "approvals.sqlite3"
    first = SqliteApprovalStore(path)
    await first.open()
    try:
        mine = await granted_for(first, OWNER)
        no_user = await open_for(first, STRANGERS[3])
    finally:
        await first.close()
    with sqlite3.connect(path) as old:  # as the file was: no user_id column
        rows = old.execute("SELECT record FROM approval_records").fetchall()
        old.execute("DROP TABLE approval_records")
        old.executescript(SQLITE_SCHEMA)
        for name in ("agent_key", "session_id", "pending_until"):
            old.execute(f"ALTER TABLE approval_records ADD COLUMN {name}")
        for (record,) in rows:
            stored = Stored.model_validate_json(record)
            approval = stored.approval
            old.execute(
                "INSERT INTO approval_records (id, fingerprint, created_at, record, agent_key, "
                "session_id, pending_until) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    approval.id,
                    approval.fingerprint,
                    approval.created_at.timestamp(),
                    record,
                    agent_key(approval.principal),
                    approval.principal.session_id,
                    approval.expires_at.timestamp()
                    if approval.status is ApprovalStatus.PENDING
                    else None,
                ),
            )
    old.close()
    for _ in range(2):  # the second opening finds the column there
        store = SqliteApprovalStore(path)
        await store.open()
        try:
            assert await open_for(store, OWNER) == mine
            assert await open_for(store, STRANGERS[3]) == no_user
            theirs = await open_for(store, STRANGERS[2])
            assert theirs.id not in (mine.id, no_user.id)
            assert theirs.status is ApprovalStatus.PENDING
        finally:
            await store.close()
    with sqlite3.connect(path) as db:
        users = dict(db.execute("SELECT id, user_id FROM approval_records").fetchall())
    db.close()
    assert users[mine.id] == "user-1" and users[no_user.id] is None


# -- the service, over HTTP and gRPC ----------------------------------------------------------


def as_principal(call: dict[str, Any], **principal: Any) -> dict[str, Any]:
    """`call` with its principal's fields replaced (None: left out)."""
    who = {**call["principal"], **principal}
    return {**call, "principal": {k: v for k, v in who.items() if v is not None}}


def assert_not_yours(decision: dict[str, Any], approval_id: str) -> None:
    assert decision["verdict"] == "deny", decision
    assert decision["rule"] == RULE
    assert approval_id in decision["reason"]
    assert "another agent or user" in decision["reason"]
    assert not decision.get("approval"), "nothing of the approval is shown"
    assert "dr-ops" not in json.dumps(decision) and "secret comment" not in json.dumps(decision)
    assert decision["mcp_result"]["isError"] is True


async def test_another_agent_replaying_a_granted_call_is_denied(client: Client) -> None:
    """Agent B knows agent A's approval id and session id (and user): it sends A's approved
    call as its own, with and without the id. It is denied and opens only an approval of its
    own; A's grant is untouched and lets A through exactly once."""
    call = approval_call()
    approval_id = (await client.decide(call))["approval"]["id"]
    await client.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops", "secret comment")
    intruder = as_principal(call, agent_id=unique("agent-b"))

    for _ in range(3):
        assert_not_yours(await client.decide({**intruder, "approval_id": approval_id}), approval_id)
        dry = await client.decide({**intruder, "approval_id": approval_id, "dry_run": True})
        assert_not_yours(dry, approval_id)
        assert dry["dry_run"] is True
        anonymous = as_principal(call, agent_id=None)
        assert_not_yours(
            await client.decide({**anonymous, "approval_id": approval_id}), approval_id
        )
    retried = await client.decide(intruder)
    assert retried["verdict"] == "approval_required"
    assert retried["approval"]["id"] != approval_id, "an approval of its own"
    assert retried["approval"]["status"] == "pending"
    theirs = await client.get_approval(APPROVER_TOKEN, retried["approval"]["id"])
    assert theirs["principal"]["agent_id"] == intruder["principal"]["agent_id"]

    mine = await client.get_approval(APPROVER_TOKEN, approval_id)
    assert mine["status"] == "approved", "nothing of A's grant was spent"
    assert (await client.decide({**call, "approval_id": approval_id, "dry_run": True}))[
        "verdict"
    ] == "allow"
    granted = await client.decide({**call, "approval_id": approval_id})
    assert granted["verdict"] == "allow"
    assert granted["approval"]["status"] == "used"
    replay = await client.decide({**call, "approval_id": approval_id})
    assert (replay["verdict"], replay["rule"]) == ("deny", "engine.approval")
    assert "already used" in replay["reason"]
    assert_not_yours(await client.decide({**intruder, "approval_id": approval_id}), approval_id)


async def test_the_same_agent_for_another_user_is_denied(client: Client) -> None:
    """The agent A calls for another user (or for none) in the same session: the grant of
    user-1 is not theirs, and retrying the call asks for an approval of their own instead
    of handing out user-1's grant."""
    call = approval_call()
    approval_id = (await client.decide(call))["approval"]["id"]
    await client.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops", "secret comment")
    for user in ("user-2", None):
        other = as_principal(call, user_id=user)
        assert_not_yours(await client.decide({**other, "approval_id": approval_id}), approval_id)
        retried = await client.decide(other)
        assert retried["verdict"] == "approval_required"
        assert retried["approval"]["id"] != approval_id
        assert retried["approval"]["status"] == "pending"
    # The call of user-1 again, unchanged: its own grant lets it through, once.
    back = await client.decide(call)
    assert back["verdict"] == "allow"
    assert back["approval"] == {**back["approval"], "id": approval_id, "status": "used"}
    replay = await client.decide({**call, "approval_id": approval_id})
    assert (replay["verdict"], replay["rule"]) == ("deny", "engine.approval")


async def test_the_honest_path_still_works(client: Client) -> None:
    call = approval_call()
    first = await client.decide(call)
    approval_id = first["approval"]["id"]
    waiting = await client.decide({**call, "approval_id": approval_id})
    assert waiting["verdict"] == "approval_required"
    await client.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops", "ok")
    granted = await client.decide({**call, "approval_id": approval_id})
    assert granted["verdict"] == "allow"
    assert granted["approval"]["id"] == approval_id
    other_call = {**call, "arguments": {**call["arguments"], "source_image_set_id": "f" * 32}}
    assert (await client.decide(other_call))["approval"]["id"] != approval_id


async def test_hostile_approval_ids_are_refused_without_a_5xx(client: Client) -> None:
    call = approval_call()
    for bad in ("", "apr_", "apr_" + "0" * 32, "x" * 5000, "apr_\u202e", "apr_0\x00"):
        try:
            decision = await client.decide({**call, "approval_id": bad})
        except ApiError as refused:
            assert refused.status in (400, 422, "INVALID_ARGUMENT"), refused
            continue
        assert decision["verdict"] == "deny"
        assert decision["rule"] == "engine.approval"


# -- a stranger with a credential of its own ------------------------------------------------


@dataclass
class Keyed:
    servers: Servers
    keys: dict[str, str]  # agent -> its API key


@pytest.fixture(scope="module")
async def keyed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Keyed]:
    """A service that verifies agent API keys: agent-a (for ann) and agent-b (for bob)."""
    tmp = tmp_path_factory.mktemp("binding")
    path = tmp / "keys.yaml"
    keys = {
        agent: add_entry(path, "api_key", agent, agent_id=agent, user_id=user)
        for agent, user in (("agent-a", "ann"), ("agent-b", "bob"))
    }
    servers = await start_servers(settings_for(tmp, agent_keys_file=path))
    yield Keyed(servers, keys)
    await servers.stop()


@pytest.fixture(params=["http", "grpc"])
async def keyed_client(request: pytest.FixtureRequest, keyed: Keyed) -> AsyncIterator[Client]:
    if request.param == "http":
        async with httpx.AsyncClient(base_url=keyed.servers.http_url, timeout=30) as raw:
            yield HttpClient(raw)
    else:
        async with grpc.aio.insecure_channel(keyed.servers.grpc_target) as channel:
            yield GrpcClient(channel)


async def test_a_stranger_claiming_to_be_the_agent_is_denied(
    keyed: Keyed, keyed_client: Client
) -> None:
    """Agent B proves itself with its own key but claims A's agent, user and session: the
    proven principal is B, so A's grant is not its to use; A's own key still uses it.
    (Calls without a credential are believed as asserted on loopback, as everywhere in
    this service: the binding is as strong as the principal is proven.)"""
    sid = session()
    as_a = {**approval_call(sid), "credential": keyed.keys["agent-a"]}
    as_a["principal"] = {"agent_id": "agent-a", "session_id": sid, "user_id": "ann"}
    opened_ = await keyed_client.decide(as_a)
    assert opened_["verdict"] == "approval_required"
    approval_id = opened_["approval"]["id"]
    approval = await keyed_client.get_approval(APPROVER_TOKEN, approval_id)
    assert (approval["principal"]["agent_id"], approval["principal"]["user_id"]) == (
        "agent-a",
        "ann",
    )
    await keyed_client.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops", "secret comment")
    liar = {**as_a, "credential": keyed.keys["agent-b"], "approval_id": approval_id}
    for _ in range(2):
        assert_not_yours(await keyed_client.decide(liar), approval_id)
    assert (await keyed_client.get_approval(APPROVER_TOKEN, approval_id))["status"] == "approved"
    granted = await keyed_client.decide({**as_a, "approval_id": approval_id})
    assert granted["verdict"] == "allow"
    assert_not_yours(await keyed_client.decide(liar), approval_id)


async def test_a_proven_owner_uses_its_grant_once_and_a_liar_never(
    keyed: Keyed, keyed_client: Client
) -> None:
    """Liars and the owner at once (fewer than the session's limit of 10, so that every
    attempt reaches the grant): only the owner gets through, once."""
    sid = session()
    as_a = {**approval_call(sid), "credential": keyed.keys["agent-a"]}
    approval_id = (await keyed_client.decide(as_a))["approval"]["id"]
    await keyed_client.act(APPROVER_TOKEN, approval_id, "approve", "dr-ops", "secret comment")
    liar = {**as_a, "credential": keyed.keys["agent-b"], "approval_id": approval_id}
    results = await asyncio.gather(
        *[keyed_client.decide(liar) for _ in range(5)],
        *[keyed_client.decide({**as_a, "approval_id": approval_id}) for _ in range(4)],
    )
    for decision in results[:5]:
        assert_not_yours(decision, approval_id)
    owners = sorted((d["verdict"], d["rule"]) for d in results[5:])
    assert owners[0] == ("allow", "copy_image_set.existing_destination")
    assert owners[1:] == [("deny", "engine.approval")] * 3, "the others find it used"
    assert (await keyed_client.get_approval(APPROVER_TOKEN, approval_id))["status"] == "used"
