"""`mcp-policy scan` writes a policy scaffold from a live MCP server's tools, and
`mcp-policy validate` accepts it, and reports broken Rego and YAML with file and line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from engine.models import DecideRequest, Principal, Verdict
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import DATASTORE, HEALTHIMAGING, copy_policy, settings_for
from tests.fixtures.proxy_harness import FIXTURE, PROXY, HttpFixture, clean_env


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `mcp-policy <args>`; its status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=str(PROJECT_ROOT),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_scan_writes_a_scaffold_that_validate_accepts_and_the_service_loads(
    tmp_path: Path,
) -> None:
    scaffold = tmp_path / "scanned" / "policy.yaml"
    status, _, err = await cli("scan", "--out", str(scaffold), "--", *FIXTURE)
    assert status == 0, err

    text = scaffold.read_text()
    doc = yaml.safe_load(text)["mcp_policy"]
    assert {(e["server"], e["tool"], e["category"], e["risk"]) for e in doc["catalog"]} == {
        (HEALTHIMAGING, "copy_image_set", "write", "medium"),
        (HEALTHIMAGING, "delete_datastore", "delete", "high"),
        (HEALTHIMAGING, "list_datastores", "read", "low"),
        (HEALTHIMAGING, "start_dicom_export_job", "write", "medium"),
    }
    assert doc["rules"] == {
        "copy_image_set": {"action": "require_approval"},
        "delete_datastore": {"action": "require_approval"},
        "list_datastores": {"action": "allow"},
        "start_dicom_export_job": {"action": "require_approval"},
    }
    assert doc["default"] == {"action": "deny"}
    # Descriptions, parameters and annotations as comments.
    assert "#   Copy an image set (AWS HealthImaging CopyImageSet)." in text
    assert "#     datastore_id: string, required" in text
    assert "#     copy_image_set_information: object | null, optional (default null)" in text
    assert "#     force: boolean, optional (default false)" in text
    assert "#   annotations: readOnlyHint=true" in text

    status, out, _ = await cli("validate", str(PROJECT_ROOT / "rego"), str(scaffold.parent))
    assert status == 0, out
    assert out.startswith("mcp-policy validate: ok")

    runtime = Runtime(
        settings_for(
            tmp_path, decision_log="off", policy_paths=[PROJECT_ROOT / "rego", scaffold.parent]
        )
    )
    await runtime.start()
    try:
        verdicts = {}
        for tool in ("list_datastores", "delete_datastore"):
            decision = await runtime.service.decide(
                DecideRequest(
                    server=HEALTHIMAGING,
                    tool=tool,
                    arguments={"datastore_id": DATASTORE},
                    principal=Principal(session_id="scan-check"),
                    dry_run=True,
                ),
                transport="test",
            )
            verdicts[tool] = decision.verdict
    finally:
        await runtime.stop()
    assert verdicts == {
        "list_datastores": Verdict.ALLOW,
        "delete_datastore": Verdict.APPROVAL_REQUIRED,
    }


async def test_scan_a_server_at_a_url(tmp_path: Path) -> None:
    server = HttpFixture.start(clean_env(), tmp_path / "server.log")
    try:
        status, out, err = await cli("scan", "--url", server.url, "--server-name", "imaging")
    finally:
        server.stop()
    assert status == 0, err
    catalog = yaml.safe_load(out)["mcp_policy"]["catalog"]
    assert {entry["server"] for entry in catalog} == {"imaging"}
    assert len(catalog) == 4


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
