"""Interoperability with MCP clients no one here wrote: every refusal is readable by each.

Two real clients: the official TypeScript SDK (`@modelcontextprotocol/sdk` 1.32.2, installed
by `make interop-deps` into tests/interop/node_modules, driven by tests/interop/client.mjs)
and the Python SDK (`mcp` 2.3.0, in the venv). Each talks to `mcp-policy proxy` over stdio
(the client spawns `mcp-policy proxy --embedded ... -- <fixture server>`) and over streamable
HTTP (one in-process proxy for the module, a fixture child per MCP session), at each
protocol version it can be made to speak, and calls a tool with an outputSchema
(copy_image_set, declared as the real server declares it) and one with none
(summarize_image_set) so that the policy allows, denies, rate-limits and asks for approval.
Whatever the verdict, the client returns a result (it never throws), `isError` says whether
the call was refused, the reason is the text content and the decision is under
`_meta["mcp-policy/decision"]` (never `structuredContent`, which the TypeScript client checks
against the outputSchema even for errors). Refused calls never reach the server. tools/list
through the proxy passes each SDK's own validation.

Protocol versions. The TypeScript SDK has no option for it: `Client.connect()` always asks
for 2025-11-25 in `initialize` and accepts 2025-11-25, 2025-06-18, 2025-03-26, 2024-11-05
and 2024-10-07; it has no 2026-07-28 at all. client.mjs applies a plan's version by
rewriting the outgoing initialize request in a wrapping Transport. Asked for 2026-07-28
that way, the server answers the handshake with 2025-11-25 (its newest handshake version)
and the SDK goes on with that. The Python SDK's `ClientSession.initialize()` always asks
for 2025-11-25; 2025-06-18 is asked for here with the session's public `send_request` and
`adopt()` (what initialize() does, with another version); 2026-07-28 is `Client`'s default
`mode="auto"` (server/discover, falling back to the handshake). Over stdio the proxy relays
2026-07-28 as is, and its HTTP listener speaks it too (stateless, beside the session
protocols). Pinned to 2026-07-28 the Python client sends no server/discover; the proxy
then learns the server's name from the `serverInfo` that 2026-07-28 results carry.

And one end-to-end run against the real `awslabs.healthimaging-mcp-server` from PyPI
(`make real-server` installs it into .tools/realserver/), with AWS replaced by a loopback
recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mcp_types
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from engine.proxy.core import ProxyOptions
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.http import HttpProxy, start_http_proxy
from engine.proxy.upstream import open_child
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import (
    COPY_INFORMATION,
    DATASTORE,
    DATASTORE_2,
    HEALTHIMAGING,
    INTO_EXISTING,
    add_tools,
    copy_policy,
    settings_for,
)
from tests.fixtures import real_server as real
from tests.fixtures.proxy_harness import (
    FIXTURE,
    INTEROP_ENV,
    INTEROP_LIMIT,
    PROXY,
    RECORD_ENV,
    SUMMARY_TOOL,
    calls,
    clean_env,
    embedded_args,
    interop_policy,
)

INTEROP_DIR = PROJECT_ROOT / "tests" / "interop"
CLIENT_MJS = INTEROP_DIR / "client.mjs"
TS_SDK = "@modelcontextprotocol/sdk"
TS_SDK_VERSION = "1.32.2"
COPY_TOOL = "copy_image_set"
DECISION_KEY = "mcp-policy/decision"
CLIENT_TIMEOUT = 120

Step = dict[str, Any]
Line = dict[str, Any]


# The TypeScript client.


@pytest.fixture(scope="session")
def node() -> str:
    """`node`, with the pinned TypeScript SDK installed; a loud failure otherwise."""
    found = shutil.which("node")
    if found is None:
        pytest.fail("no `node` on PATH: the interop suite needs Node.js >= 18 (see `make test`)")
    package = INTEROP_DIR / "node_modules" / TS_SDK / "package.json"
    if not package.exists():
        pytest.fail(
            f"{TS_SDK} is not installed in {INTEROP_DIR / 'node_modules'}: run `make interop-deps` "
            "(npm ci --prefix tests/interop)"
        )
    installed = json.loads(package.read_text())["version"]
    assert installed == TS_SDK_VERSION, (
        f"{TS_SDK} {installed} is installed, the lock file pins {TS_SDK_VERSION}: "
        "run `make interop-deps`"
    )
    return found


async def run_ts(node: str, plan: dict[str, Any], log: Path) -> list[Line]:
    """One Node process runs the whole plan; its JSON lines: connect, then one per step."""
    with log.open("a") as errlog:
        proc = await asyncio.create_subprocess_exec(
            node,
            str(CLIENT_MJS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errlog,
            cwd=str(INTEROP_DIR),
        )
        try:
            out, _ = await asyncio.wait_for(
                proc.communicate(json.dumps(plan).encode()), CLIENT_TIMEOUT
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(
                f"client.mjs did not finish; its log:\n{log.read_text()}"
            ) from None
    assert proc.returncode == 0, f"client.mjs exited {proc.returncode}; log:\n{log.read_text()}"
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert len(lines) == 1 + len(plan["steps"]), f"{out.decode()}\nlog:\n{log.read_text()}"
    return lines


# The Python client, printing the same lines.


def dump(result: Any) -> Any:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


async def handshake(session: ClientSession, version: str) -> None:
    """ClientSession.initialize(), but asking for `version` (it always asks for 2025-11-25)."""
    result = await session.send_request(
        mcp_types.InitializeRequest(
            params=mcp_types.InitializeRequestParams(
                protocol_version=version,
                capabilities=mcp_types.ClientCapabilities(),
                client_info=mcp_types.Implementation(name="mcp-policy-interop-py", version="1"),
            )
        ),
        mcp_types.InitializeResult,
    )
    session.adopt(result)
    await session.send_notification(mcp_types.InitializedNotification())


def threw(op: str, exc: BaseException) -> Line:
    line: Line = {"op": op, "ok": False, "threw": f"{type(exc).__name__}: {exc}"}
    if isinstance(exc, MCPError):
        line["code"] = exc.error.code
    return line


async def run_steps(session: Client | ClientSession, steps: list[Step]) -> list[Line]:
    lines: list[Line] = []
    for step in steps:
        try:
            if step["op"] == "listTools":
                result: Any = await session.list_tools()
            else:
                result = await session.call_tool(
                    step["name"], step.get("arguments", {}), meta=step.get("meta")
                )
        except Exception as exc:  # the throw is the finding: report it, never hide it
            lines.append(threw(step["op"], exc))
        else:
            lines.append({"op": step["op"], "ok": True, "result": dump(result)})
    return lines


def connected(session: Client | ClientSession, requested: str) -> Line:
    info = (
        session.server_info if isinstance(session, ClientSession) else session.session.server_info
    )
    return {
        "op": "connect",
        "ok": True,
        "result": {
            "requested": requested,
            "negotiated": session.protocol_version,
            "serverInfo": dump(info) if info is not None else None,
        },
    }


def py_transport(spec: dict[str, Any], errlog: Any) -> Any:
    if spec["type"] == "stdio":
        params = StdioServerParameters(
            command=spec["command"], args=spec["args"], env=spec["env"], cwd=spec["cwd"]
        )
        return stdio_client(params, errlog=errlog)
    return streamable_http_client(spec["url"])


async def run_py(plan: dict[str, Any], log: Path) -> list[Line]:
    """The plan with the Python SDK: "2025-06-18" and "2025-11-25" over the initialize
    handshake (ClientSession), "auto" and "2026-07-28" with Client in that mode."""
    version, steps = plan["protocolVersion"], plan["steps"]
    skipped = [{"op": s["op"], "ok": False, "skipped": "the connection failed"} for s in steps]
    with log.open("a") as errlog:
        async with contextlib.AsyncExitStack() as stack:
            session: Client | ClientSession
            try:
                transport = py_transport(plan["transport"], errlog)
                if version in ("auto", "2026-07-28"):
                    session = await stack.enter_async_context(Client(transport, mode=version))
                else:
                    read, write = await stack.enter_async_context(transport)
                    session = await stack.enter_async_context(ClientSession(read, write))
                    if version == "2025-11-25":
                        await session.initialize()
                    else:
                        await handshake(session, version)
            except Exception as exc:  # reported as the connection's throw
                return [threw("connect", exc), *skipped]
            return [connected(session, version), *await run_steps(session, steps)]
    raise AssertionError("the client's exit swallowed an exception")


# What each step must give.


@dataclass(frozen=True)
class Expect:
    tool: str
    verdict: str  # allow | deny | rate_limited | approval_required
    rule: str | None = None
    reason: str | None = None  # a part of the decision's reason


def copy_arguments(image_set: str) -> dict[str, Any]:
    """What the real copy_image_set takes, for a plain copy of `image_set`."""
    return {
        "datastore_id": DATASTORE,
        "source_image_set_id": image_set,
        "copy_image_set_information": COPY_INFORMATION,
    }


def matrix_steps(image_set: str) -> tuple[list[Step], list[Expect]]:
    """listTools, then for each tool: INTEROP_LIMIT allowed calls, a denied one, one that
    needs approval, and one over the limit; last a tool outside the catalog."""
    steps: list[Step] = [{"op": "listTools"}]
    expects: list[Expect] = []
    # Per tool: its arguments, what makes a call need approval, the rule and a part of the
    # reason: a copy into an existing image set; summarize_image_set's force.
    tools = {
        COPY_TOOL: (
            copy_arguments(image_set),
            {"copy_image_set_information": INTO_EXISTING},
            "existing_destination",
            "changing it",
        ),
        SUMMARY_TOOL: (
            {"datastore_id": DATASTORE, "image_set_id": image_set},
            {"force": True},
            "force",
            "force=true",
        ),
    }
    for tool, (args, needs_approval, approval_rule, why) in tools.items():
        for _ in range(INTEROP_LIMIT):
            steps.append({"op": "callTool", "name": tool, "arguments": args})
            expects.append(Expect(tool, "allow"))
        steps.append(
            {"op": "callTool", "name": tool, "arguments": {**args, "datastore_id": "not-hex"}}
        )
        expects.append(
            Expect(tool, "deny", f"{tool}.datastore_id_invalid", "32-character lowercase hex id")
        )
        steps.append({"op": "callTool", "name": tool, "arguments": {**args, **needs_approval}})
        expects.append(Expect(tool, "approval_required", f"{tool}.{approval_rule}", why))
        steps.append({"op": "callTool", "name": tool, "arguments": args})
        expects.append(Expect(tool, "rate_limited", f"catalog.rule.{tool}", "rate limit exceeded"))
    steps.append(
        {"op": "callTool", "name": "delete_datastore", "arguments": {"datastore_id": DATASTORE}}
    )
    expects.append(
        Expect("delete_datastore", "deny", "catalog.default", "not in the policy catalog")
    )
    return steps, expects


def texts(result: dict[str, Any]) -> list[str]:
    return [block["text"] for block in result.get("content", []) if block.get("type") == "text"]


def check_refusal(line: Line, expect: Expect, where: str) -> dict[str, Any]:
    """A refusal the client returned (not threw): isError, the reason as the text, the
    decision under _meta, no structuredContent. Returns the decision."""
    assert line["ok"] is True, f"{where}: the client threw on a refusal: {line}"
    result = line["result"]
    assert result.get("isError") is True, f"{where}: {result}"
    assert "structuredContent" not in result, f"{where}: a refusal carries structuredContent"
    decision = (result.get("_meta") or {}).get(DECISION_KEY)
    assert isinstance(decision, dict), f"{where}: no decision under _meta: {result}"
    assert decision["verdict"] == expect.verdict, f"{where}: {decision}"
    if expect.rule is not None:
        assert decision["rule"] == expect.rule, f"{where}: {decision}"
    if expect.reason is not None:
        assert expect.reason in decision["reason"], f"{where}: {decision}"
    assert texts(result) == [f"Tool call refused ({expect.verdict}): {decision['reason']}"]
    if expect.verdict == "rate_limited":
        assert decision["rate_limit"]["limit"] == INTEROP_LIMIT
        assert decision["rate_limit"]["remaining"] == 0
    if expect.verdict == "approval_required":
        assert decision["approval"]["status"] == "pending"
        assert decision["approval"]["id"] in texts(result)[0]
    return decision


def check_allowed(line: Line, expect: Expect, image_set: str, where: str) -> None:
    assert line["ok"] is True, f"{where}: the client threw on an allowed call: {line}"
    result = line["result"]
    assert result.get("isError") is False, f"{where}: {result}"
    assert DECISION_KEY not in (result.get("_meta") or {}), f"{where}: {result}"
    if expect.tool == COPY_TOOL:
        structured = result["structuredContent"]
        assert structured["datastore_id"] == DATASTORE
        assert structured["source_image_set_properties"]["image_set_id"] == image_set
    else:
        assert "structuredContent" not in result, f"{where}: {result}"
        assert any(image_set in text for text in texts(result)), f"{where}: {result}"


def check_listing(line: Line, where: str) -> None:
    """tools/list passed the client's own validation; both tools are there as declared."""
    assert line["ok"] is True, f"{where}: listTools threw: {line}"
    tools = {tool["name"]: tool for tool in line["result"]["tools"]}
    assert {COPY_TOOL, SUMMARY_TOOL} <= set(tools), f"{where}: {sorted(tools)}"
    assert "delete_datastore" not in tools  # outside the catalog: hidden
    schema = tools[COPY_TOOL]["outputSchema"]
    assert sorted(schema["required"]) == [
        "datastore_id",
        "destination_image_set_properties",
        "source_image_set_properties",
    ]
    assert "outputSchema" not in tools[SUMMARY_TOOL]


def check_matrix(
    lines: list[Line], expects: list[Expect], image_set: str, negotiated: str, where: str
) -> None:
    connect, listing, *results = lines
    assert connect["ok"] is True, f"{where}: the connection failed: {connect}"
    assert connect["result"]["negotiated"] == negotiated, f"{where}: {connect}"
    check_listing(listing, where)
    assert len(results) == len(expects)
    for number, (line, expect) in enumerate(zip(results, expects, strict=True), start=1):
        step = f"{where}, call {number} ({expect.tool}, {expect.verdict})"
        if expect.verdict == "allow":
            check_allowed(line, expect, image_set, step)
        else:
            check_refusal(line, expect, step)


def check_reached(record: Path, image_set: str) -> None:
    """The server saw exactly the allowed calls, each with exactly its arguments (and on
    2026-07-28 the per-request `_meta` the client sent, left out here)."""
    seen = [
        {"tool": call["tool"], "arguments": call["arguments"]}
        for call in calls(record)
        if image_set in json.dumps(call) or call["tool"] == "delete_datastore"
    ]
    copy = {"tool": COPY_TOOL, "arguments": copy_arguments(image_set)}
    summary = {
        "tool": SUMMARY_TOOL,
        "arguments": {"datastore_id": DATASTORE, "image_set_id": image_set},
    }
    assert seen == [copy] * INTEROP_LIMIT + [summary] * INTEROP_LIMIT


# The proxies.


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return interop_policy(tmp_path_factory.mktemp("interop-policy"))


def stdio_transport(
    tmp: Path,
    policy: list[Path],
    env: dict[str, str],
    upstream: list[str],
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    return {
        "type": "stdio",
        "command": PROXY[0],
        "args": [*PROXY[1:], "proxy", *embedded_args(tmp, policy), *extra, "--", *upstream],
        "env": env,
        "cwd": str(PROJECT_ROOT),
    }


@dataclass
class HttpSetup:
    proxy: HttpProxy
    record: Path


@pytest.fixture(scope="module")
async def http_proxy(
    tmp_path_factory: pytest.TempPathFactory, policy: list[Path]
) -> AsyncIterator[HttpSetup]:
    """One HTTP proxy for the module (decisions from a Runtime with the interop policy); each
    MCP session gets its own fixture child, all recording into one file."""
    tmp = tmp_path_factory.mktemp("interop-http")
    runtime = Runtime(settings_for(tmp, decision_log="off", policy_paths=policy))
    await runtime.start()
    record = tmp / "calls.jsonl"
    env = clean_env(**{RECORD_ENV: str(record), INTEROP_ENV: "1"})
    running = await start_http_proxy(
        "127.0.0.1",
        0,
        decider=EmbeddedDecider(runtime),
        options=ProxyOptions(),
        open_upstream=lambda: open_child(FIXTURE, env),
    )
    try:
        yield HttpSetup(running, record)
    finally:
        await running.stop()
        await runtime.stop()


# (client, proxy transport, the version asked for, the version the session then speaks)
MATRIX = [
    ("ts", "stdio", "2025-06-18", "2025-06-18"),
    ("ts", "stdio", "2025-11-25", "2025-11-25"),
    ("ts", "stdio", "2026-07-28", "2025-11-25"),
    ("ts", "http", "2025-06-18", "2025-06-18"),
    ("ts", "http", "2025-11-25", "2025-11-25"),
    ("ts", "http", "2026-07-28", "2025-11-25"),
    ("py", "stdio", "2025-06-18", "2025-06-18"),
    ("py", "stdio", "2025-11-25", "2025-11-25"),
    ("py", "stdio", "auto", "2026-07-28"),
    ("py", "stdio", "2026-07-28", "2026-07-28"),
    ("py", "http", "2025-06-18", "2025-06-18"),
    ("py", "http", "2025-11-25", "2025-11-25"),
    ("py", "http", "auto", "2026-07-28"),
    ("py", "http", "2026-07-28", "2026-07-28"),
]


@pytest.mark.parametrize(
    ("client", "transport", "requested", "negotiated"),
    MATRIX,
    ids=[f"{c}-{t}-{r}" for c, t, r, _ in MATRIX],
)
async def test_every_refusal_is_a_result_the_client_reads(
    client: str,
    transport: str,
    requested: str,
    negotiated: str,
    tmp_path: Path,
    policy: list[Path],
    http_proxy: HttpSetup,
    request: pytest.FixtureRequest,
) -> None:
    """The TypeScript client asked for 2026-07-28 (which it cannot speak) settles on the
    server's 2025-11-25; the Python client in auto mode speaks 2026-07-28 over stdio and
    over HTTP.

    The Python client pinned to 2026-07-28 sends no server/discover; the stdio proxy then
    names the server from the first result's `_meta` (see
    test_pinned_2026_client_and_a_proxy_without_a_name), but this row's first call would
    come before that, so it is started with --server-name."""
    image_set = uuid.uuid4().hex
    steps, expects = matrix_steps(image_set)
    if transport == "stdio":
        record = tmp_path / "calls.jsonl"
        env = clean_env(**{RECORD_ENV: str(record), INTEROP_ENV: "1"})
        pinned = client == "py" and requested == "2026-07-28"
        extra = ("--server-name", HEALTHIMAGING) if pinned else ()
        spec = stdio_transport(tmp_path, policy, env, FIXTURE, extra)
    else:
        record = http_proxy.record
        spec = {"type": "http", "url": http_proxy.proxy.url}
    plan = {"transport": spec, "protocolVersion": requested, "steps": steps}
    where = f"{client} over {transport}, asked for {requested}"

    log = tmp_path / "client.log"
    if client == "ts":
        lines = await run_ts(request.getfixturevalue("node"), plan, log)
    else:
        lines = await run_py(plan, log)

    check_matrix(lines, expects, image_set, negotiated, where)
    check_reached(record, image_set)


async def test_pinned_2026_client_and_a_proxy_without_a_name(
    tmp_path: Path, policy: list[Path]
) -> None:
    """A 2026-07-28 client need not send server/discover (the Python SDK pinned to the
    version does not). The stdio proxy then learns the server's name from the
    `io.modelcontextprotocol/serverInfo` that 2026-07-28 results carry in `_meta`: the
    first tools/list is already filtered, and calls are decided as usual."""
    record = tmp_path / "calls.jsonl"
    env = clean_env(**{RECORD_ENV: str(record), INTEROP_ENV: "1"})
    image_set = uuid.uuid4().hex
    args = copy_arguments(image_set)
    plan = {
        "transport": stdio_transport(tmp_path, policy, env, FIXTURE),
        "protocolVersion": "2026-07-28",
        "steps": [
            {"op": "listTools"},
            {"op": "callTool", "name": COPY_TOOL, "arguments": args},
            {"op": "callTool", "name": "delete_datastore", "arguments": {}},
        ],
    }
    connect, listing, call, denied = await run_py(plan, tmp_path / "client.log")

    assert connect["ok"] is True
    assert connect["result"]["negotiated"] == "2026-07-28"
    assert listing["ok"] is True
    assert "delete_datastore" not in {tool["name"] for tool in listing["result"]["tools"]}
    assert call["ok"] is True and call["result"].get("isError") is not True, call
    check_refusal(denied, Expect("delete_datastore", "deny", "catalog.default"), "pinned")
    assert [c["arguments"]["source_image_set_id"] for c in calls(record)] == [image_set]


async def test_the_typescript_client_asks_for_2025_11_25_by_itself(
    tmp_path: Path, policy: list[Path], node: str
) -> None:
    """Without a version in the plan, client.mjs changes nothing: the SDK's own choice."""
    env = clean_env(**{INTEROP_ENV: "1"})
    plan = {"transport": stdio_transport(tmp_path, policy, env, FIXTURE), "steps": []}
    (connect,) = await run_ts(node, plan, tmp_path / "client.log")
    assert connect["result"] == {
        "requested": "2025-11-25",
        "negotiated": "2025-11-25",
        "serverInfo": {"name": HEALTHIMAGING, "version": "0.0.1-fixture"},
    }


# The real awslabs.healthimaging-mcp-server (tests/fixtures/real_server.py).


@pytest.fixture(scope="session")
def real_server() -> list[str]:
    """The real server's command, from its own virtualenv (`make real-server`)."""
    return real.command()


@pytest.fixture
def recorder() -> Iterator[real.Recorder]:
    running = real.Recorder()
    yield running
    running.stop()


def aws_env(recorder: real.Recorder, tmp: Path) -> dict[str, str]:
    return real.aws_env(clean_env(), recorder.url, tmp)


def real_server_policy(tmp: Path) -> list[Path]:
    """The shipped policy, plus list_datastores as a low-risk (allowed) tool: an allowed
    call whose request does reach AWS (the server's copy_image_set never gets that far)."""
    rego, data = copy_policy(tmp)
    entry = {"server": HEALTHIMAGING, "tool": "list_datastores", "category": "read", "risk": "low"}
    add_tools(data, catalog=[entry])
    return [rego, data]


def real_steps(image_set: str) -> list[Step]:
    copy = {**copy_arguments(image_set), "source_datastore_id": DATASTORE}
    return [
        {"op": "listTools"},
        {"op": "callTool", "name": COPY_TOOL, "arguments": copy},
        {"op": "callTool", "name": "list_datastores", "arguments": {}},
        {"op": "callTool", "name": COPY_TOOL, "arguments": {**copy, "datastore_id": "ds-1"}},
        {
            "op": "callTool",
            "name": COPY_TOOL,
            "arguments": {**copy, "source_datastore_id": DATASTORE_2},
        },
        {"op": "callTool", "name": "delete_datastore", "arguments": {"datastore_id": DATASTORE}},
    ]


def check_real_server(
    lines: list[Line], recorder: real.Recorder, server_log: Path | None, where: str
) -> None:
    connect, listing, copied, listed, malformed, cross, delete = lines
    assert connect["ok"] is True, f"{where}: {connect}"
    assert connect["result"]["serverInfo"]["name"] == HEALTHIMAGING

    # tools/list passed the client's validation; all but the catalogued tools are hidden.
    assert listing["ok"] is True, f"{where}: {listing}"
    tools = {tool["name"]: tool for tool in listing["result"]["tools"]}
    assert sorted(tools) == [
        COPY_TOOL,
        "get_image_set_metadata",
        "list_datastores",
        "search_image_sets",
    ]
    assert sorted(tools[COPY_TOOL]["outputSchema"]["required"]) == [
        "datastore_id",
        "destination_image_set_properties",
        "source_image_set_properties",
    ]

    # Allowed: forwarded, and the server's own error comes back as a result.
    for line, tool in ((copied, COPY_TOOL), (listed, "list_datastores")):
        assert line["ok"] is True, f"{where}: {line}"
        assert line["result"]["isError"] is True
        assert DECISION_KEY not in (line["result"].get("_meta") or {})
        assert texts(line["result"]) == [f"Error executing tool {tool}"]
    # copy_image_set reached the server, which failed before any request: it passes boto3
    # sourceDatastoreId/destinationDatastoreId, which CopyImageSet does not have.
    if server_log is not None:
        logged = server_log.read_text()
        assert "ParamValidationError" in logged
        assert 'Unknown parameter in input: "sourceDatastoreId"' in logged

    # Refused: read as results, never forwarded.
    check_refusal(
        malformed, Expect(COPY_TOOL, "deny", "copy_image_set.datastore_id_invalid"), where
    )
    check_refusal(
        cross, Expect(COPY_TOOL, "approval_required", "copy_image_set.cross_datastore"), where
    )
    check_refusal(delete, Expect("delete_datastore", "deny", "catalog.default"), where)

    # What reached "AWS": the one ListDatastores, signed with the fake key; no CopyImageSet,
    # no DeleteDatastore.
    assert [(r.method, r.path) for r in recorder.requests] == [("GET", "/datastore")]
    assert f"Credential={real.FAKE_KEY_ID}/" in recorder.requests[0].authorization


async def test_real_server_behind_the_stdio_proxy_typescript_client(
    tmp_path: Path, node: str, real_server: list[str], recorder: real.Recorder
) -> None:
    """The original bug: the real server declares a strict outputSchema for copy_image_set,
    and the TypeScript client read every refusal of it without throwing."""
    spec = stdio_transport(
        tmp_path, real_server_policy(tmp_path), aws_env(recorder, tmp_path), real_server
    )
    log = tmp_path / "client.log"
    lines = await run_ts(node, {"transport": spec, "steps": real_steps(uuid.uuid4().hex)}, log)
    assert lines[0]["result"]["negotiated"] == "2025-11-25"
    check_real_server(lines, recorder, log, "TypeScript client, stdio proxy, real server")


async def test_real_server_behind_the_stdio_proxy_python_client(
    tmp_path: Path, real_server: list[str], recorder: real.Recorder
) -> None:
    spec = stdio_transport(
        tmp_path, real_server_policy(tmp_path), aws_env(recorder, tmp_path), real_server
    )
    plan = {"transport": spec, "protocolVersion": "auto", "steps": real_steps(uuid.uuid4().hex)}
    log = tmp_path / "client.log"
    lines = await run_py(plan, log)
    assert lines[0]["result"]["negotiated"] == "2026-07-28", lines[0]
    check_real_server(lines, recorder, log, "Python client (auto), stdio proxy, real server")


async def test_real_server_behind_the_http_proxy_typescript_client(
    tmp_path: Path, node: str, real_server: list[str], recorder: real.Recorder
) -> None:
    runtime = Runtime(
        settings_for(tmp_path, decision_log="off", policy_paths=real_server_policy(tmp_path))
    )
    await runtime.start()
    env = aws_env(recorder, tmp_path)
    try:
        running = await start_http_proxy(
            "127.0.0.1",
            0,
            decider=EmbeddedDecider(runtime),
            options=ProxyOptions(),
            open_upstream=lambda: open_child(real_server, env),
        )
        try:
            plan = {
                "transport": {"type": "http", "url": running.url},
                "steps": real_steps(uuid.uuid4().hex),
            }
            lines = await run_ts(node, plan, tmp_path / "client.log")
        finally:
            await running.stop()
    finally:
        await runtime.stop()
    # (The server's log is this process's stderr here, so only the stdio tests read it.)
    check_real_server(lines, recorder, None, "TypeScript client, HTTP proxy, real server")
