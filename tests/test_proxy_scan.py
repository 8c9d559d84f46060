"""`mcp-policy scan` writes a server's catalog file from its live tools, which merges with
the shipped policy: category and risk guessed from the tools' annotations, else from their
names (the real HealthImaging server's 39 tools, which have no annotations), each marked
as a guess; `--skip-catalogued` leaves out what the policy catalogues already, and
`--cases` writes starter table tests that pass on the policy. `mcp-policy validate`
accepts that, and reports broken Rego and YAML with file and line, schema errors by their
most specific reason, load errors, and a catalog still in the 0.1 form."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mcp_types as types
import yaml

from engine.authoring import tables
from engine.authoring.offline import OfflinePolicy
from engine.authoring.scan import Scanned, classify, placeholder, scaffold, starter_cases, target
from engine.authoring.validate import schema_errors
from engine.models import DecideRequest, Principal, Verdict
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import (
    COPY_INFORMATION,
    DATASTORE,
    HEALTHIMAGING,
    IMAGE_SET,
    copy_policy,
    settings_for,
)
from tests.fixtures import real_server as real
from tests.fixtures.proxy_harness import FIXTURE, PROXY, HttpFixture, clean_env


async def cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `mcp-policy <args>`; its status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env() if env is None else env,
        cwd=str(PROJECT_ROOT),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# A second MCP server for the scans (argv: its name, then "empty" for no tools): its own
# tools, and one that shares its name with the shipped policy's copy_image_set.
OTHER_SERVER = """\
import sys

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

server = MCPServer(sys.argv[1], version="2.0.0")

if sys.argv[2:] != ["empty"]:

    @server.tool(description="Read a note.", annotations=ToolAnnotations(readOnlyHint=True))
    async def read_note(note_id: str) -> str:
        return ""

    @server.tool(
        description="Delete every note.",
        annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True),
    )
    async def purge_notes() -> str:
        return ""

    @server.tool(description="Copy an image set (not the AWS one).")
    async def copy_image_set(source: str) -> str:
        return ""

server.run()
"""
NOTES = "example.notes-server"
STAGING = "imaging-staging"


def other_server(tmp: Path, name: str, *extra: str) -> list[str]:
    script = tmp / "other_server.py"
    script.write_text(OTHER_SERVER)
    return [sys.executable, str(script), name, *extra]


async def test_scan_writes_a_catalog_file_of_the_server_alone(tmp_path: Path) -> None:
    out = tmp_path / "scanned.yaml"
    status, _, err = await cli("scan", "--out", str(out), "--", *FIXTURE)
    assert status == 0, err

    text = out.read_text()
    doc = yaml.safe_load(text)
    # Only the server's part of the catalog: nothing that would clash with
    # policies/rules.yaml when the files are merged. The fixture declares its tools as the
    # real server does, without annotations: the verb of each name is the guess, marked
    # as one.
    assert doc == {
        "mcp_policy": {
            "catalog": {
                HEALTHIMAGING: {
                    "copy_image_set": {"category": "write", "risk": "medium", "guessed": True},
                    "delete_datastore": {"category": "delete", "risk": "high", "guessed": True},
                    "list_datastores": {"category": "read", "risk": "low", "guessed": True},
                    "start_dicom_export_job": {
                        "category": "write",
                        "risk": "medium",
                        "guessed": True,
                    },
                }
            }
        }
    }
    assert "category: read  # guessed: the name says it reads (list)" in text
    # Descriptions and parameters as comments.
    assert "#   Copy an image set." in text
    assert "#     datastore_id: string, required" in text
    assert "#     copy_image_set_information: object, required" in text
    assert "#     source_datastore_id: string | null, optional (default null)" in text
    assert "force" not in text
    assert "annotations:" not in text


async def test_scan_writes_the_annotations_a_server_gives(tmp_path: Path) -> None:
    out = tmp_path / "scanned.yaml"
    status, _, err = await cli("scan", "--out", str(out), "--", *other_server(tmp_path, NOTES))
    assert status == 0, err
    text = out.read_text()
    assert "#   annotations: readOnlyHint=true" in text
    # The header says which rule each tool gets and where to give it its own.
    header = text[: text.index("mcp_policy:")]
    assert "low -> allow, medium and high -> require_approval" in header
    assert "add it to `rules` in policies/rules.yaml, keyed by the tool name" in header
    assert "beside policies/*.yaml" in header
    assert "--policy rego/ --policy policies/ --policy <that directory>" in header


async def test_scanned_servers_merge_with_the_shipped_policy_and_decide(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    beside = data / f"{STAGING}.yaml"  # beside policies/*.yaml
    own_dir = tmp_path / "scanned"  # a directory of its own, another --policy
    status, _, err = await cli(
        "scan", "--server-name", STAGING, "--out", str(beside), "--", *FIXTURE
    )
    assert status == 0, err
    status, _, err = await cli(
        "scan", "--out", str(own_dir / "notes.yaml"), "--", *other_server(tmp_path, NOTES)
    )
    assert status == 0, err
    notes = (own_dir / "notes.yaml").read_text()
    assert yaml.safe_load(notes)["mcp_policy"]["catalog"] == {
        NOTES: {
            "read_note": {"category": "read", "risk": "low", "guessed": True},
            "purge_notes": {"category": "delete", "risk": "high", "guessed": True},
            "copy_image_set": {"category": "write", "risk": "medium", "guessed": True},
        }
    }
    # The server's own annotations come first; a tool without them, by its name.
    assert "category: read  # guessed: annotation readOnlyHint=true" in notes
    assert "category: delete  # guessed: annotation destructiveHint=true" in notes
    assert "category: write  # guessed: the name says it writes (copy)" in notes

    status, out, _ = await cli("validate", str(rego), str(data), str(own_dir))
    assert status == 0, out
    assert out.startswith("mcp-policy validate: ok")

    runtime = Runtime(
        settings_for(tmp_path, decision_log="off", policy_paths=[rego, data, own_dir])
    )
    await runtime.start()
    try:
        got = {}
        for server, tool in [
            (STAGING, "list_datastores"),
            (STAGING, "delete_datastore"),
            (STAGING, "copy_image_set"),
            (NOTES, "read_note"),
            (NOTES, "purge_notes"),
            (NOTES, "copy_image_set"),
            (NOTES, "list_datastores"),
            (HEALTHIMAGING, "copy_image_set"),
            (HEALTHIMAGING, "list_datastores"),
        ]:
            decision = await runtime.service.decide(
                DecideRequest(
                    server=server,
                    tool=tool,
                    arguments={
                        "datastore_id": DATASTORE,
                        "source_image_set_id": IMAGE_SET,
                        "copy_image_set_information": COPY_INFORMATION,
                    },
                    principal=Principal(session_id="scan-check"),
                    dry_run=True,
                ),
                transport="test",
            )
            got[server, tool] = (decision.verdict, decision.rule)
    finally:
        await runtime.stop()
    assert got == {
        # The guessed risk picks the shipped risk default...
        (STAGING, "list_datastores"): (Verdict.ALLOW, "catalog.risk_default.low"),
        (STAGING, "delete_datastore"): (
            Verdict.APPROVAL_REQUIRED,
            "catalog.risk_default.high",
        ),
        (NOTES, "read_note"): (Verdict.ALLOW, "catalog.risk_default.low"),
        (NOTES, "purge_notes"): (Verdict.APPROVAL_REQUIRED, "catalog.risk_default.high"),
        # ...unless rules.yaml has a rule for the tool's name (on every server).
        (STAGING, "copy_image_set"): (Verdict.ALLOW, "catalog.rule.copy_image_set"),
        (NOTES, "copy_image_set"): (Verdict.ALLOW, "catalog.rule.copy_image_set"),
        (HEALTHIMAGING, "copy_image_set"): (Verdict.ALLOW, "catalog.rule.copy_image_set"),
        # A tool catalogued for one server only is unknown on the others.
        (NOTES, "list_datastores"): (Verdict.DENY, "catalog.default"),
        (HEALTHIMAGING, "list_datastores"): (Verdict.DENY, "catalog.default"),
    }


async def test_scan_of_a_server_without_tools_writes_an_empty_catalog(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    out = data / "empty.yaml"
    status, _, err = await cli(
        "scan", "--out", str(out), "--", *other_server(tmp_path, "example.empty", "empty")
    )
    assert status == 0, err
    assert yaml.safe_load(out.read_text()) == {"mcp_policy": {"catalog": {"example.empty": {}}}}
    status, text, _ = await cli("validate", str(rego), str(data))
    assert status == 0, text


# --- guesses, --skip-catalogued, starter table tests ------------------------------------


def catalog_of(text: str) -> dict[str, dict[str, Any]]:
    """server -> tool -> entry of a scanned file."""
    found: dict[str, dict[str, Any]] = yaml.safe_load(text)["mcp_policy"]["catalog"]
    return found


async def test_scan_guesses_the_real_servers_tools_and_its_starter_cases_pass(
    tmp_path: Path,
) -> None:
    """The real HealthImaging server (39 tools, no annotations) is no longer all
    write/medium: each tool is guessed from its name and marked as a guess; the tools the
    shipped catalog has (copy_image_set, get_image_set_metadata, search_image_sets) are
    left out with their places; the file merges with the shipped policy; the starter cases
    expect what that policy decides."""
    recorder = real.Recorder()
    rego, data = copy_policy(tmp_path)
    out, cases = data / "healthimaging.yaml", tmp_path / "tests" / "healthimaging.cases.yaml"
    try:
        env = real.aws_env(clean_env(), recorder.url, tmp_path)
        status, _, err = await cli(
            "scan",
            "--policy",
            str(rego),
            "--policy",
            str(data),
            "--skip-catalogued",
            "--out",
            str(out),
            "--cases",
            str(cases),
            "--",
            *real.command(),
            env=env,
            timeout=180,
        )
    finally:
        recorder.stop()
    assert status == 0, err
    assert recorder.requests == [], "listing tools reaches no AWS endpoint"
    text = out.read_text()
    entries = catalog_of(text)[HEALTHIMAGING]
    shipped = ("copy_image_set", "get_image_set_metadata", "search_image_sets")
    assert len(entries) == 36  # 39 tools, 3 already catalogued
    for name in shipped:
        assert name not in entries
        assert f"# {name}: already catalogued ({data / 'catalog.yaml'}:" in text
    assert all(entry["guessed"] is True for entry in entries.values())
    kinds = {(e["category"], e["risk"]) for e in entries.values()}
    assert kinds == {("read", "low"), ("write", "medium"), ("write", "high"), ("delete", "high")}
    guessed = {name: (e["category"], e["risk"]) for name, e in entries.items()}
    for name, expected in {
        "get_datastore": ("read", "low"),
        "list_datastores": ("read", "low"),
        "list_image_set_versions": ("read", "low"),
        "create_datastore": ("write", "medium"),
        "update_image_set_metadata": ("write", "medium"),
        "start_dicom_import_job": ("write", "medium"),
        "tag_resource": ("write", "medium"),
        "delete_datastore": ("delete", "high"),
        "remove_series_from_image_set": ("delete", "high"),
        "bulk_delete_by_criteria": ("delete", "high"),
        "bulk_update_patient_metadata": ("write", "high"),
    }.items():
        assert guessed[name] == expected, name

    status, report, _ = await cli("validate", str(rego), str(data))
    assert status == 0, report

    case_file = tables.read_case_file(cases)
    assert case_file.broken == []
    assert sorted(case.name for case in case_file.cases) == sorted(entries)
    async with await OfflinePolicy.load([rego, data]) as policy:
        results = [tables.run_case(policy, case) for case in case_file.cases]
    assert [r.problems for r in results if not r.passed] == []
    expected_rules = {case.name: case.expect.rule for case in case_file.cases}
    assert expected_rules["get_datastore"] == "catalog.risk_default.low"
    assert expected_rules["delete_datastore"] == "catalog.risk_default.high"
    assert expected_rules["create_datastore"] == "catalog.risk_default.medium"


def annotated(name: str, **hints: bool) -> types.Tool:
    annotations = types.ToolAnnotations(**hints) if hints else None
    return types.Tool(name=name, input_schema={"type": "object"}, annotations=annotations)


def test_scan_guesses_from_annotations_first_then_the_name() -> None:
    cases = [
        # The server's own hints come first...
        (annotated("delete_everything", readOnlyHint=True), ("read", "low")),
        (annotated("get_thing", destructiveHint=True), ("delete", "high")),
        # ...a tool it says is not read-only is never guessed a read...
        (annotated("get_thing", readOnlyHint=False), ("write", "medium")),
        (annotated("get_thing", readOnlyHint=False, destructiveHint=False), ("write", "medium")),
        (annotated("delete_thing", readOnlyHint=False), ("delete", "high")),
        # ...and hints that say neither leave it to the name.
        (annotated("get_thing", idempotentHint=True, openWorldHint=True), ("read", "low")),
        (annotated("listThings"), ("read", "low")),
        (annotated("github_list_issues"), ("read", "low")),
        (annotated("describe-stack"), ("read", "low")),
        (annotated("Delete.Repo"), ("delete", "high")),
        (annotated("purge_notes"), ("delete", "high")),
        (annotated("bulk_delete_by_criteria"), ("delete", "high")),
        (annotated("bulk_update_patient_metadata"), ("write", "high")),
        (annotated("create_user"), ("write", "medium")),
        # Nothing to go by: a write, as before.
        (annotated("frobnicate"), ("write", "medium")),
        (annotated("getaway_car"), ("write", "medium")),
        (annotated("bulk"), ("write", "medium")),
    ]
    for tool, expected in cases:
        guess = classify(tool)
        assert (guess.category, guess.risk) == expected, (tool.name, guess)


async def test_scan_without_skip_warns_and_the_clash_names_both_places(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    beside = data / "healthimaging.yaml"
    status, _, err = await cli("scan", "--out", str(beside), "--", *FIXTURE)
    assert status == 0, err
    assert "already catalogues 1 of these tools" in err
    assert "copy_image_set" in err and "--skip-catalogued" in err

    status, out, _ = await cli("validate", str(rego), str(data))
    assert status == 2, out
    shipped = data / "catalog.yaml"
    first = shipped.read_text().splitlines().index("      copy_image_set:") + 2
    scanned = beside.read_text().splitlines().index("      copy_image_set:") + 2
    assert error_lines(out) == [
        f"{shipped}:{first}:19: data.mcp_policy.catalog.{HEALTHIMAGING}.copy_image_set.category"
        f" is defined twice (also at {beside}:{scanned}:19)"
    ]


async def test_scan_leaves_out_tools_catalogued_for_any_server(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    (data / "any.yaml").write_text(
        "mcp_policy:\n"
        "  catalog:\n"
        '    "*":\n'
        "      list_datastores: {category: read, risk: low}\n"
        "      delete_datastore: {category: delete, risk: critical}\n"
        "      start_dicom_export_job: {category: write, risk: high}\n"
    )
    out = data / "healthimaging.yaml"
    status, _, err = await cli(
        "scan", "--policy", str(rego), "--policy", str(data), "--skip-catalogued",
        "--out", str(out), "--", *FIXTURE,
    )  # fmt: skip
    assert status == 0, err
    text = out.read_text()
    # Every tool is catalogued (copy_image_set for this server, the others under "*"):
    # an empty map, which merges.
    assert catalog_of(text) == {HEALTHIMAGING: {}}
    assert f'# list_datastores: already catalogued ({data / "any.yaml"}:4:24 under "*")' in text
    assert "# copy_image_set: already catalogued" in text
    status, report, _ = await cli("validate", str(rego), str(data))
    assert status == 0, report


async def test_scan_refuses_a_policy_it_cannot_read(tmp_path: Path) -> None:
    out = tmp_path / "scanned.yaml"
    status, stdout, err = await cli(
        "scan", "--policy", str(tmp_path / "nowhere"), "--out", str(out), "--", *FIXTURE
    )
    assert status == 2
    assert stdout == ""
    assert f"the policy cannot be read: {tmp_path / 'nowhere'}" in err
    assert not out.exists()


def test_starter_placeholders_come_from_the_input_schema() -> None:
    assert placeholder({"type": "string"}) == "example"
    assert placeholder({"type": ["null", "integer"]}) == 1
    assert placeholder({"anyOf": [{"type": "null"}, {"type": "boolean"}]}) is False
    assert placeholder({"type": "string", "default": "d", "enum": ["a"]}) == "d"
    assert placeholder({"type": "string", "enum": ["a", "b"]}) == "a"
    assert placeholder({"type": "number", "default": float("nan")}) == 1
    assert placeholder({"type": "array"}) == []
    nested = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": {}}, "required": ["x"]}},
        "required": ["inner", "not-a-property"],
    }
    assert placeholder(nested) == {"inner": {"x": "example"}}
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(50):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    depth, value = 0, placeholder(deep)
    while isinstance(value, dict):
        depth, value = depth + 1, value["a"]
    assert depth <= 6


async def test_starter_cases_keep_hostile_names_and_leave_out_calls_the_service_refuses() -> None:
    names = ["true", "1e3", 'q"\\', "é😀", "a\nmcp_policy:\n  rules: {}", "x" * 300]
    tools = [
        types.Tool(
            name=name,
            input_schema={
                "type": "object",
                "properties": {"p\nq: 1": {"type": "string", "default": "v\u2028w"}},
                "required": ["p\nq: 1"],
            },
        )
        for name in names
    ]
    deep: Any = "bottom"
    for _ in range(40):  # a default nested deeper than the service takes arguments
        deep = {"d": deep}
    schema = {"type": "object", "properties": {"p": {"default": deep}}, "required": ["p"]}
    tools.append(types.Tool(name="deep", input_schema=schema))
    scanned = Scanned(server="srv\nrules: {}", version="1", tools=tools)
    text = await starter_cases(scanned, "srv\nrules: {}", target([]), {}, now=datetime.now(UTC))
    assert text is not None
    doc = yaml.safe_load(text)
    # A case for each tool the catalog file holds (names the catalog takes), the server
    # and arguments read back exactly as the server sent them.
    assert [case["call"]["tool"] for case in doc["cases"]] == ["true", "1e3"]
    for case in doc["cases"]:
        assert case["call"]["server"] == "srv\nrules: {}"
        assert case["call"]["arguments"] == {"p\nq: 1": "v\u2028w"}
        expected = {"action": "require_approval", "rule": "catalog.risk_default.medium"}
        assert case["expect"] == expected
    # A call the service would refuse gets no case, and a comment that says why.
    assert "# deep: guessed write/medium" in text
    assert "#   no case: the service would not decide this call: " in text


def test_scaffold_keeps_hostile_names_inside_their_strings_and_comments() -> None:
    names = ["true", "null", "1e3", "a\nmcp_policy:\n  rules: {}", "x\u2028y", 'q"\\', "é😀"]
    tools = [
        types.Tool(
            name=name,
            description="line\nmcp_policy:\x85  default: allow",
            input_schema={"type": "object", "properties": {"p\nq: 1": {"type": "string"}}},
        )
        for name in names
    ]
    text = scaffold(Scanned(server="srv\nrules: {}", version="1\n2", tools=[*tools, tools[0]]))
    doc = yaml.safe_load(text)
    assert list(doc) == ["mcp_policy"]
    assert list(doc["mcp_policy"]) == ["catalog"]
    assert list(doc["mcp_policy"]["catalog"]) == ["srv\nrules: {}"]
    # Names the catalog takes (MCP's: 1-128 of [A-Za-z0-9_.-]) are kept as they are, the
    # others left out, each named (escaped) in a comment: the file always loads.
    assert list(doc["mcp_policy"]["catalog"]["srv\nrules: {}"]) == ["true", "null", "1e3"]
    assert "# a\\x0amcp_policy:\\x0a  rules: {}: not a tool name the catalog takes" in text
    assert schema_errors(doc, SCHEMA, []) == []


async def test_scan_a_server_at_a_url(tmp_path: Path) -> None:
    server = HttpFixture.start(clean_env(), tmp_path / "server.log")
    try:
        status, out, err = await cli("scan", "--url", server.url, "--server-name", "imaging")
    finally:
        server.stop()
    assert status == 0, err
    catalog = yaml.safe_load(out)["mcp_policy"]["catalog"]
    assert list(catalog) == ["imaging"]
    assert len(catalog["imaging"]) == 4


async def test_scan_reports_a_server_it_cannot_start(tmp_path: Path) -> None:
    status, out, err = await cli("scan", "--", str(tmp_path / "no-such-server"))
    assert status != 0
    assert out == ""
    assert "could not list the server's tools" in err


async def test_validate_the_shipped_policy() -> None:
    status, out, _ = await cli("validate")
    assert status == 0, out
    assert "ok" in out


async def test_validate_reports_broken_rego_with_file_and_line(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    broken = rego / "mcp" / "rules" / "broken" / "broken.rego"
    broken.parent.mkdir()
    broken.write_text(
        "package mcp.rules.broken\n"
        "\n"
        'deny contains {"rule": "broken.call", "reason": "no"} if {\n'
        "\tno_such_function(input.tool.name)\n"
        "}\n"
    )
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status != 0
    assert f"{broken}:4:" in out
    assert "no_such_function" in out


async def test_validate_reports_broken_yaml_with_file_and_line(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    rules = data / "rules.yaml"
    lines = rules.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == "copy_image_set:")
    lines.insert(at + 1, "    action: [unclosed")
    rules.write_text("\n".join(lines) + "\n")
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status != 0
    assert f"{rules}:{at + 2}:" in out or f"{rules}:{at + 3}:" in out


async def test_validate_reports_data_the_schema_refuses(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    rules = data / "rules.yaml"
    rules.write_text(rules.read_text().replace("action: rate_limit", "action: rate_limited"))
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status != 0
    assert "data.mcp_policy.rules.copy_image_set" in out


def error_lines(out: str) -> list[str]:
    """The errors `mcp-policy validate` printed (one indented line each)."""
    return [line.strip() for line in out.splitlines() if line.startswith("  ")]


async def test_validate_refuses_a_0_1_catalog_with_the_fix(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    catalog = data / "catalog.yaml"
    catalog.write_text(
        "mcp_policy:\n"
        "  catalog:\n"
        f"    - server: {HEALTHIMAGING}\n"
        "      tool: copy_image_set\n"
        "      category: write\n"
        "      risk: medium\n"
    )
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status == 2, out
    assert error_lines(out) == [
        f"{catalog}: mcp_policy.catalog is a list (the 0.1 form); run: mcp-policy migrate {data}/"
    ]


async def test_validate_reports_load_errors_the_schema_accepts(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    rules = data / "rules.yaml"
    text = rules.read_text()
    limit = "      rate_limit:\n        max: 10\n        window: 60\n        scope: session\n"
    assert limit in text
    # A no-break space the schema's \s takes (Python) but the Rego's \s does not (RE2).
    rules.write_text(text.replace(limit, '      rate_limit: "10/minute\\u00a0"\n'))
    line = rules.read_text().splitlines().index("    copy_image_set:") + 1
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status == 2, out
    errors = error_lines(out)
    assert len(errors) == 1, out
    assert errors[0].startswith(
        f"{rules}:{line + 1}:7: data.mcp.load_errors: mcp.rules.catalog: "
        'mcp_policy.rules["copy_image_set"]: rate_limit "10/minute\u00a0" cannot be read'
    )


async def test_validate_reports_the_load_errors_of_any_rule_package(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    package = rego / "mcp" / "rules" / "mine" / "mine.rego"
    package.parent.mkdir()
    package.write_text(
        "package mcp.rules.mine\n"
        "\n"
        'load_errors contains "copy_image_set must have a reason" if {\n'
        "\tnot data.mcp_policy.rules.copy_image_set.reason\n"
        "}\n"
    )
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status == 2, out
    assert error_lines(out) == [
        "data.mcp.load_errors: mcp.rules.mine: copy_image_set must have a reason"
    ]

    rules = data / "rules.yaml"
    rules.write_text(
        rules.read_text().replace(
            "\n      action: rate_limit\n", "\n      action: rate_limit\n      reason: copies\n"
        )
    )
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status == 0, out


SCHEMA = PROJECT_ROOT / "schema" / "mcp_policy.schema.json"


def test_schema_errors_name_the_most_specific_reason() -> None:
    def errors(rule: object) -> list[str]:
        return schema_errors({"mcp_policy": {"rules": {"x": rule}}}, SCHEMA, [])

    assert errors({"action": "rate_limit"}) == [
        "data.mcp_policy.rules.x: action rate_limit needs a rate_limit"
    ]
    assert errors({"action": "deny", "rate_limit": "1/minute"}) == [
        "data.mcp_policy.rules.x: action deny takes no rate_limit"
    ]
    assert errors({"action": "allow", "approval": {"ttl": 60}}) == [
        "data.mcp_policy.rules.x: approval goes only with action require_approval"
    ]
    enum = "['allow', 'deny', 'rate_limit', 'require_approval']"
    assert errors("maybe") == [f"data.mcp_policy.rules.x: 'maybe' is not one of {enum}"]
    assert errors({"action": "maybe"}) == [
        f"data.mcp_policy.rules.x.action: 'maybe' is not one of {enum}"
    ]
    assert errors({"reason": "no action"}) == [
        "data.mcp_policy.rules.x: 'action' is a required property"
    ]
    assert errors(
        {"action": "rate_limit", "rate_limit": {"max": 1, "window": 60, "scope": "team"}}
    ) == [
        "data.mcp_policy.rules.x.rate_limit.scope: 'team' is not one of "
        "['session', 'agent', 'user', 'global']"
    ]
    assert errors(5) == [
        'data.mcp_policy.rules.x: 5 is not one of "allow", "deny", "rate_limit", '
        '"require_approval" or a map with action'
    ]
    assert not any("any of the given schemas" in e for e in errors({"action": "rate_limit"}))


async def test_validate_prints_the_reason_with_the_place(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    rules = data / "rules.yaml"
    text = rules.read_text()
    limit = "      rate_limit:\n        max: 10\n        window: 60\n        scope: session\n"
    rules.write_text(text.replace(limit, ""))
    line = rules.read_text().splitlines().index("    copy_image_set:") + 1
    status, out, _ = await cli("validate", str(rego), str(data))
    assert status == 2, out
    assert error_lines(out) == [
        f"{rules}:{line + 1}:7: data.mcp_policy.rules.copy_image_set: "
        "action rate_limit needs a rate_limit"
    ]
