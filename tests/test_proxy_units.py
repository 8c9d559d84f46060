"""The proxy's parts on their own: reading agent lines, which tools are hidden (and how
often the decision service is asked), what counts as a failed call, the headers sent to
an HTTP upstream, and the scaffold's guesses. (The gRPC conversions: tests/test_wire.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.message import SessionMessage
from mcp_types import ErrorData, JSONRPCError, JSONRPCNotification, JSONRPCRequest, JSONRPCResponse

from engine.authoring.scan import classify, parameters
from engine.cli import build_parser
from engine.models import DecideRequest, Decision, Principal, Verdict
from engine.proxy.cli import PROXY_COMMANDS, run_proxy_command
from engine.proxy.core import MalformedMessage, call_failed
from engine.proxy.embedded import EmbeddedDecider
from engine.proxy.listing import ToolFilter, hides
from engine.proxy.stdio import parse_agent_line
from engine.proxy.upstream import HttpUpstream, exit_code
from engine.runtime import Runtime
from tests.conftest import HEALTHIMAGING, settings_for


def test_agent_lines() -> None:
    ok = parse_agent_line(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}')
    assert isinstance(ok, SessionMessage)
    assert isinstance(ok.message, JSONRPCRequest)

    garbage = parse_agent_line(b"{not json")
    assert isinstance(garbage, MalformedMessage)
    assert (garbage.error.code, garbage.request_id) == (-32700, None)

    batch = parse_agent_line(b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]')
    assert isinstance(batch, MalformedMessage)
    assert (batch.error.code, batch.request_id) == (-32600, None)
    assert "batches" in batch.error.message

    no_version = parse_agent_line(b'{"id": "a-1", "method": "ping"}')
    assert isinstance(no_version, MalformedMessage)
    assert (no_version.error.code, no_version.request_id) == (-32600, "a-1")

    scalar = parse_agent_line(b"42")
    assert isinstance(scalar, MalformedMessage)
    assert (scalar.error.code, scalar.request_id) == (-32600, None)


def decision(verdict: Verdict, rule: str, denies_tool: bool | None) -> Decision:
    return Decision(
        decision_id="d",
        verdict=verdict,
        reason="r",
        rule=rule,
        policy_revision="p",
        denies_tool=denies_tool,
    )


@pytest.mark.parametrize(
    ("verdict", "rule", "denies_tool", "hidden"),
    [
        (Verdict.DENY, "catalog.default", True, True),
        (Verdict.DENY, "team.no_exports_for_interns", True, True),
        (Verdict.DENY, "catalog.default", None, False),
        (Verdict.DENY, "copy_image_set.datastore_id_invalid", None, False),
        (Verdict.DENY, "engine.unavailable", False, False),
        (Verdict.APPROVAL_REQUIRED, "catalog.risk_default.high", True, False),
        (Verdict.RATE_LIMITED, "catalog.rule.copy_image_set", True, False),
    ],
)
def test_which_denials_hide_a_tool(
    verdict: Verdict, rule: str, denies_tool: bool | None, hidden: bool
) -> None:
    """Only the decision's denies_tool on a deny hides a tool, whatever the rule id."""
    assert hides(decision(verdict, rule, denies_tool)) is hidden


def test_what_counts_as_a_failed_call() -> None:
    def result(body: dict[str, Any]) -> JSONRPCResponse:
        return JSONRPCResponse(jsonrpc="2.0", id=1, result=body)

    error = JSONRPCError(jsonrpc="2.0", id=1, error=ErrorData(code=-32603, message="boom"))
    assert call_failed(error) is True
    assert call_failed(result({"content": [], "isError": True})) is True
    assert call_failed(result({"resultType": "input_required", "inputRequests": {}})) is True
    assert call_failed(result({"content": [], "isError": False})) is False
    assert call_failed(result({"content": []})) is False


def test_headers_for_an_http_upstream() -> None:
    upstream = HttpUpstream("http://upstream/mcp", [], object())  # type: ignore[arg-type]
    initialize = JSONRPCRequest(jsonrpc="2.0", id=0, method="initialize", params={})
    assert upstream.headers_for(initialize) == {}
    upstream.negotiated("2025-11-25")
    listing = JSONRPCRequest(jsonrpc="2.0", id=1, method="tools/list")
    assert upstream.headers_for(listing) == {"mcp-protocol-version": "2025-11-25"}
    modern = JSONRPCRequest(
        jsonrpc="2.0",
        id=2,
        method="tools/call",
        params={
            "name": "copy_image_set",
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"},
        },
    )
    assert upstream.headers_for(modern) == {
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "copy_image_set",
    }
    note = JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")
    assert upstream.headers_for(note) == {"mcp-protocol-version": "2025-11-25"}


def test_exit_codes_as_a_shell_reports_them() -> None:
    assert [exit_code(0), exit_code(3), exit_code(-15), exit_code(None)] == [0, 3, 143, 1]


def test_scan_guesses_from_annotations() -> None:
    def tool(**hints: Any) -> types.Tool:
        return types.Tool(
            name="t",
            input_schema={
                "type": "object",
                "properties": {"a": {"type": "array", "items": {"type": "string"}}},
                "required": ["a"],
            },
            annotations=types.ToolAnnotations(**hints) if hints else None,
        )

    def guess(found: Any) -> tuple[str, str]:
        return found.category, found.risk

    assert guess(classify(tool(read_only_hint=True))) == ("read", "low")
    assert guess(classify(tool(read_only_hint=False, destructive_hint=True))) == ("delete", "high")
    # Nothing in the annotations nor the name ("t"): the careful guess.
    assert guess(classify(tool())) == ("write", "medium")
    assert "readOnlyHint" in classify(tool(read_only_hint=True)).reason
    assert parameters(tool()) == ["a: array of string, required"]


class Counting(EmbeddedDecider):
    """The embedded decider, counting what it is asked."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.asked: list[DecideRequest] = []

    async def decide(self, request: DecideRequest) -> Decision:
        self.asked.append(request)
        return await super().decide(request)


@pytest.fixture(scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    tmp: Path = tmp_path_factory.mktemp("proxy-units")
    running = Runtime(settings_for(tmp, decision_log="off"))
    await running.start()
    yield running
    await running.stop()


async def test_tool_filter_asks_dry_runs_and_caches_per_revision(runtime: Runtime) -> None:
    decider = Counting(runtime)
    tools = ToolFilter(decider)
    names = ["copy_image_set", "delete_datastore", "list_datastores", "start_dicom_export_job"]
    principal = Principal(agent_id="a", session_id="listing")

    first = await tools.hidden(HEALTHIMAGING, names, principal)
    asked_first = len(decider.asked)
    second = await tools.hidden(HEALTHIMAGING, names, principal)

    assert first == second == {"delete_datastore", "list_datastores", "start_dicom_export_job"}
    assert asked_first == len(names)
    assert len(decider.asked) == len(names) + 1
    assert all(request.dry_run for request in decider.asked)
    assert all(request.arguments == {} for request in decider.asked)


def test_the_commands_fit_into_the_mcp_policy_parser() -> None:
    """`mcp-policy` has the three proxy commands beside the existing ones, which parse as
    before."""
    parser = build_parser()

    proxy = parser.parse_args(["proxy", "--embedded", "--agent-id", "a", "--", "srv", "--x"])
    assert proxy.command in PROXY_COMMANDS
    assert (proxy.command, proxy.embedded, proxy.agent_id) == ("proxy", True, "a")
    assert proxy.server_command == ["--", "srv", "--x"]
    assert parser.parse_args(["validate", "rego"]).command == "validate"
    assert parser.parse_args(["scan", "--url", "http://x/mcp"]).command == "scan"
    serve = parser.parse_args(["serve", "--http-port", "1"])
    assert (serve.command, serve.http_port) == ("serve", 1)
    assert parser.parse_args(["decide"]).command == "decide"
    # A usage mistake is reported without starting anything.
    assert run_proxy_command(parser.parse_args(["proxy", "--embedded"])) == 2
