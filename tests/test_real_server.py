"""The real awslabs.healthimaging-mcp-server (PyPI, its own virtualenv: `make real-server`),
against the fixture that stands in for it and behind the proxy with the shipped policy.

The fixture server (tests/fixtures/imaging_server.py) is what nearly every proxy test runs
as its upstream, so it must declare what the real server declares: every tool it serves is
compared here with the real server's, field by field (name, description, inputSchema,
outputSchema, annotations). Then the real server runs behind `mcp-policy proxy --embedded`,
and the shipped policy decides its copy_image_set calls before any of them could reach AWS.
Nothing here talks to AWS: the real server's medical-imaging endpoint is a loopback
recorder (tests/fixtures/real_server.py), which must see no request at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from engine.settings import PROJECT_ROOT
from tests.conftest import (
    COPY_INFORMATION,
    DATASTORE,
    DATASTORE_2,
    HEALTHIMAGING,
    IMAGE_SET,
    INTO_EXISTING,
    copy_policy,
)
from tests.fixtures import real_server as real
from tests.fixtures.imaging_server import IMAGE_SETS_ENV
from tests.fixtures.proxy_harness import (
    FIXTURE,
    INTEROP_ENV,
    SUMMARY_TOOL,
    clean_env,
    decision_of,
    embedded_args,
    stdio_session,
)

# The real server's tools that the fixture serves (a subset: the real one has 39), and the
# two read tools its image-set variant (IMAGING_FIXTURE_IMAGE_SETS) serves besides.
SERVED = ["copy_image_set", "delete_datastore", "list_datastores", "start_dicom_export_job"]
IMAGE_SET_TOOLS = ["get_image_set_metadata", "search_image_sets"]


@pytest.fixture
def recorder() -> Iterator[real.Recorder]:
    running = real.Recorder()
    yield running
    running.stop()


async def listing(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """serverInfo's name and every tool, as the SDK's stdio client reads them from the
    server `command` (each tool as it is on the wire)."""
    params = StdioServerParameters(
        command=command[0], args=command[1:], env=env, cwd=str(PROJECT_ROOT)
    )
    with log.open("a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            initialized = await session.initialize()
            tools = await session.list_tools()
    return {
        "name": initialized.server_info.name,
        "tools": {
            tool.name: tool.model_dump(mode="json", by_alias=True, exclude_none=True)
            for tool in tools.tools
        },
    }


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def test_the_installed_real_server_is_the_pinned_one() -> None:
    """The fixture mirrors 0.1.1; a new pin is compared anew by the test below."""
    assert real.version() == "0.1.1"


async def test_the_fixture_serves_the_real_servers_tools_as_declared(
    tmp_path: Path, recorder: real.Recorder
) -> None:
    """Every tool the fixture serves is one of the real server's, declared identically;
    listing them needs no AWS (the recorder sees nothing)."""
    env = real.aws_env(clean_env(), recorder.url, tmp_path)
    theirs = await listing(real.command(), env, tmp_path / "real.log")
    ours = await listing(FIXTURE, clean_env(), tmp_path / "fixture.log")

    assert ours["name"] == theirs["name"] == HEALTHIMAGING
    assert sorted(ours["tools"]) == SERVED
    for name, tool in ours["tools"].items():
        assert tool == theirs["tools"][name], name
    assert recorder.requests == []
    # What the shipped policy's force rules stand for is a flag other servers may pass: the
    # real copy_image_set has no such parameter, and copy_image_set_information is required.
    schema = theirs["tools"]["copy_image_set"]["inputSchema"]
    assert sorted(schema["properties"]) == [
        "copy_image_set_information",
        "datastore_id",
        "source_datastore_id",
        "source_image_set_id",
    ]
    assert sorted(schema["required"]) == [
        "copy_image_set_information",
        "datastore_id",
        "source_image_set_id",
    ]


async def test_the_interop_variant_adds_only_a_tool_the_real_server_lacks(
    tmp_path: Path, recorder: real.Recorder
) -> None:
    """IMAGING_FIXTURE_INTEROP serves the same tools, plus summarize_image_set (a tool
    without an outputSchema, for the interop suite), which the real server does not have."""
    env = real.aws_env(clean_env(), recorder.url, tmp_path)
    theirs = await listing(real.command(), env, tmp_path / "real.log")
    ours = await listing(FIXTURE, clean_env(**{INTEROP_ENV: "1"}), tmp_path / "fixture.log")

    assert sorted(ours["tools"]) == sorted([*SERVED, SUMMARY_TOOL])
    assert SUMMARY_TOOL not in theirs["tools"]
    for name in SERVED:
        assert ours["tools"][name] == theirs["tools"][name], name


async def test_the_image_set_variant_serves_two_more_of_the_real_servers_tools(
    tmp_path: Path, recorder: real.Recorder
) -> None:
    """IMAGING_FIXTURE_IMAGE_SETS (the result-policy tests) adds get_image_set_metadata and
    search_image_sets, declared as the real server declares them: their outputs (the
    base64 metadata blob, the DICOM tag summaries) are what the result policy rewrites."""
    env = real.aws_env(clean_env(), recorder.url, tmp_path)
    theirs = await listing(real.command(), env, tmp_path / "real.log")
    ours = await listing(FIXTURE, clean_env(**{IMAGE_SETS_ENV: "1"}), tmp_path / "fixture.log")

    assert sorted(ours["tools"]) == sorted([*SERVED, *IMAGE_SET_TOOLS])
    for name in ours["tools"]:
        assert ours["tools"][name] == theirs["tools"][name], name
    blob = theirs["tools"]["get_image_set_metadata"]["outputSchema"]["properties"]
    assert sorted(blob) == ["content_encoding", "content_type", "image_set_metadata_blob"]
    assert recorder.requests == []


# -- behind the proxy ------------------------------------------------------------------


def copy(**extra: Any) -> dict[str, Any]:
    return {
        "datastore_id": DATASTORE,
        "source_image_set_id": IMAGE_SET,
        "copy_image_set_information": COPY_INFORMATION,
        **extra,
    }


async def test_the_shipped_policy_decides_the_real_servers_copies(
    tmp_path: Path, recorder: real.Recorder
) -> None:
    """`mcp-policy proxy --embedded -- <real server>` with the shipped policy: the copies it
    refuses come back as refusals the client reads (decision under _meta); an allowed copy
    reaches the real server and comes back as that server's own error (it fails before any
    request: it passes boto3 parameters CopyImageSet does not have), never as a hang. AWS
    (the recorder) sees no request."""
    rego, data = copy_policy(tmp_path)
    env = real.aws_env(clean_env(), recorder.url, tmp_path)
    log = tmp_path / "proxy.log"
    proxy = [*embedded_args(tmp_path, [rego, data]), "--", *real.command()]
    refused = {
        "into an existing image set": (
            copy(copy_image_set_information=INTO_EXISTING),
            "approval_required",
            "copy_image_set.existing_destination",
        ),
        "across datastores": (
            copy(source_datastore_id=DATASTORE_2),
            "approval_required",
            "copy_image_set.cross_datastore",
        ),
        "with force, which the real tool does not declare": (
            copy(force=True),
            "approval_required",
            "copy_image_set.force_overwrite",
        ),
        "without copy_image_set_information": (
            {"datastore_id": DATASTORE, "source_image_set_id": IMAGE_SET},
            "deny",
            "copy_image_set.copy_image_set_information_invalid",
        ),
        "with a destination that is no image set": (
            copy(copy_image_set_information={**COPY_INFORMATION, "destinationImageSet": "x"}),
            "deny",
            "copy_image_set.copy_image_set_information_invalid",
        ),
        "with a malformed datastore id": (
            copy(datastore_id="ds-1"),
            "deny",
            "copy_image_set.datastore_id_invalid",
        ),
    }
    async with stdio_session(proxy, env, log) as session:
        listed = await session.list_tools()
        answers = {
            what: await session.call_tool("copy_image_set", args)
            for what, (args, _, _) in refused.items()
        }
        allowed = await session.call_tool("copy_image_set", copy(source_datastore_id=DATASTORE))

    # Only the catalogued tools are listed, as the real server declares them.
    assert sorted(tool.name for tool in listed.tools) == [
        "copy_image_set",
        "get_image_set_metadata",
        "search_image_sets",
    ]
    for what, (_, verdict, rule) in refused.items():
        answer = answers[what]
        assert answer.is_error is True, what
        decision = decision_of(answer)
        assert (decision["verdict"], decision["rule"]) == (verdict, rule), what
        assert text_of(answer) == f"Tool call refused ({verdict}): {decision['reason']}", what

    assert allowed.is_error is True
    assert "mcp-policy/decision" not in (allowed.meta or {})
    assert text_of(allowed) == "Error executing tool copy_image_set"
    logged = log.read_text()
    assert 'Unknown parameter in input: "sourceDatastoreId"' in logged
    assert recorder.requests == []
