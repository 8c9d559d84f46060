"""`mcp-policy migrate` rewrites 0.1 catalogs (a list) into the 0.2 map, and a 0.1 catalog
is refused at load with one line that names the file and the command that fixes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.errors import PolicyRejected
from engine.models import DecideRequest, Principal
from engine.policy.source import read_bundle
from engine.runtime import Runtime
from engine.settings import PROJECT_ROOT
from tests.conftest import (
    COPY_INFORMATION,
    DATASTORE,
    HEALTHIMAGING,
    IMAGE_SET,
    VALKEY,
    copy_policy,
    settings_for,
)

DESCRIPTION = (
    "AWS HealthImaging CopyImageSet: copy an image set, optionally into another "
    "datastore / over an existing destination"
)
# The shipped catalog as 0.1 wrote it.
OLD_CATALOG = f"""\
# Tool catalog: which MCP tools the policy knows, and how risky each one is.
#
# (the 0.1 header)

mcp_policy:
  catalog:
    # The real home of CopyImageSet.
    - server: {HEALTHIMAGING}
      tool: copy_image_set
      category: write
      risk: medium
      description: "{DESCRIPTION}"
    # PolicyLayer's listing.
    - server: {VALKEY}
      tool: copy_image_set
      category: write
      risk: medium
      description: "{DESCRIPTION}"
"""
ANY_SERVER_CATALOG = """\
mcp_policy:
  catalog:
    - tool: list_datastores
      category: read
      risk: low
      owner: imaging-team
    - server: null
      tool: get_image_set
      category: read
      risk: low
    - server: s1
      tool: delete_datastore
      category: delete
      risk: high
    - server: s1
      tool: list_datastores
      category: read
      risk: medium
"""


def migrate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    """`mcp-policy migrate <args>`: its status and its stdout and stderr lines."""
    capsys.readouterr()
    status = main(["migrate", *args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def test_migrate_rewrites_a_list_into_the_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(ANY_SERVER_CATALOG)
    status, out, err = migrate(capsys, str(tmp_path))
    assert status == 0, err
    assert out == [f"migrated {path} (4 entries under 2 servers)"]
    assert yaml.safe_load(path.read_text()) == {
        "mcp_policy": {
            "catalog": {
                "*": {
                    "list_datastores": {"category": "read", "risk": "low", "owner": "imaging-team"},
                    "get_image_set": {"category": "read", "risk": "low"},
                },
                "s1": {
                    "delete_datastore": {"category": "delete", "risk": "high"},
                    "list_datastores": {"category": "read", "risk": "medium"},
                },
            }
        }
    }


def test_migrate_keeps_the_leading_comment_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(OLD_CATALOG)
    status, _, err = migrate(capsys, str(tmp_path))
    assert status == 0, err
    text = path.read_text()
    header = OLD_CATALOG[: OLD_CATALOG.index("mcp_policy:")]
    assert text.startswith(header + "mcp_policy:\n")
    assert yaml.safe_load(text)["mcp_policy"]["catalog"] == {
        server: {
            "copy_image_set": {"category": "write", "risk": "medium", "description": DESCRIPTION}
        }
        for server in (HEALTHIMAGING, VALKEY)
    }


def test_migrate_twice_changes_nothing_the_second_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(OLD_CATALOG)
    assert migrate(capsys, str(tmp_path))[0] == 0
    once = path.read_bytes()
    before = path.stat().st_mtime_ns
    status, out, err = migrate(capsys, str(tmp_path))
    assert (status, out) == (0, [])
    assert err == ["mcp-policy migrate: nothing to migrate, every catalog is a map"]
    assert path.read_bytes() == once
    assert path.stat().st_mtime_ns == before


def test_migrate_check_changes_nothing_and_says_what_needs_migrating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(OLD_CATALOG)
    status, out, _ = migrate(capsys, "--check", str(tmp_path))
    assert status == 1
    assert out == [
        f"{path}: mcp_policy.catalog is a list (the 0.1 form), needs migrating "
        "(2 entries under 2 servers)"
    ]
    assert path.read_text() == OLD_CATALOG
    assert migrate(capsys, str(tmp_path))[0] == 0
    assert migrate(capsys, "--check", str(tmp_path))[:2] == (0, [])


def test_migrate_refuses_a_tool_catalogued_twice_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    twice = tmp_path / "a.yaml"
    twice.write_text(ANY_SERVER_CATALOG + "    - tool: list_datastores\n      category: x\n")
    other = tmp_path / "b.yaml"
    other.write_text(OLD_CATALOG)
    status, out, err = migrate(capsys, str(tmp_path))
    assert status == 2
    assert out == []
    assert err == [
        f'mcp-policy migrate: {twice}: tool "list_datastores" on any server is catalogued '
        "twice, at mcp_policy.catalog[0] (line 3) and mcp_policy.catalog[4] (line 19); "
        "keep one and run mcp-policy migrate again",
        "mcp-policy migrate: nothing was written",
    ]
    assert twice.read_text().startswith(ANY_SERVER_CATALOG)
    assert other.read_text() == OLD_CATALOG


def test_migrate_rewrites_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "servers" / "catalog.json"
    path.parent.mkdir()
    old = {
        "mcp_policy": {
            "catalog": [
                {"server": "s1", "tool": "t1", "category": "read", "risk": "low"},
                {"tool": "t2", "category": "write", "risk": "high", "description": "é"},
            ]
        },
        "other": [1, 2],
    }
    path.write_text(json.dumps(old))
    status, out, err = migrate(capsys, str(tmp_path))
    assert status == 0, err
    assert out == [f"migrated {path} (2 entries under 2 servers)"]
    assert json.loads(path.read_text()) == {
        "mcp_policy": {
            "catalog": {
                "s1": {"t1": {"category": "read", "risk": "low"}},
                "*": {"t2": {"category": "write", "risk": "high", "description": "é"}},
            }
        },
        "other": [1, 2],
    }


def test_migrate_leaves_other_files_byte_for_byte_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, data = copy_policy(tmp_path)
    unrelated = data / "compose.yml"
    unrelated.write_text("# not policy data\ncatalog:\n  - tool: x\nservices: {}\n")
    notes = data / "notes.json"
    notes.write_text('{"mcp_policy_notes": {"catalog": []}}')
    before = {p: p.read_bytes() for p in data.iterdir()}
    status, out, _ = migrate(capsys, str(data))
    assert (status, out) == (0, [])
    assert {p: p.read_bytes() for p in data.iterdir()} == before


def test_migrate_reports_a_file_that_is_not_yaml_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "catalog.yaml"
    old.write_text(OLD_CATALOG)
    broken = tmp_path / "broken.yaml"
    broken.write_text("mcp_policy:\n  catalog: [unclosed\n")
    status, out, err = migrate(capsys, str(tmp_path))
    assert status == 2
    assert out == []
    assert len(err) == 2
    assert err[0].startswith(f"mcp-policy migrate: {broken}:3:1: not valid YAML: ")
    assert old.read_text() == OLD_CATALOG


def test_migrate_is_a_subcommand_of_mcp_policy(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text(OLD_CATALOG)
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "migrate", "--check", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "needs migrating" in done.stdout
    assert "every other comment in that file is lost" in " ".join(
        subprocess.run(
            [sys.executable, "-m", "engine.cli", "migrate", "--help"],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            timeout=60,
        ).stdout.split()
    )


def test_read_bundle_refuses_a_0_1_catalog_in_one_line(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    catalog = data / "catalog.yaml"
    catalog.write_text(OLD_CATALOG)
    with pytest.raises(PolicyRejected) as caught:
        read_bundle([rego, data])
    line = (
        f"{catalog}: mcp_policy.catalog is a list (the 0.1 form); run: mcp-policy migrate {data}/"
    )
    assert caught.value.message == line
    assert caught.value.errors == [line]


async def decisions(tmp: Path, paths: list[Path]) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(verdict, rule, reason) for copy_image_set on both catalogued servers and for a
    tool the catalog does not know."""
    runtime = Runtime(settings_for(tmp, decision_log="off", policy_paths=paths))
    await runtime.start()
    out = {}
    try:
        for server, tool in [
            (HEALTHIMAGING, "copy_image_set"),
            (VALKEY, "copy_image_set"),
            (HEALTHIMAGING, "no_such_tool"),
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
                    principal=Principal(session_id="migrate-check"),
                    dry_run=True,
                ),
                transport="test",
            )
            out[server, tool] = (str(decision.verdict), decision.rule, decision.reason)
    finally:
        await runtime.stop()
    return out


async def test_a_migrated_0_1_catalog_loads_and_decides_as_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rego, data = copy_policy(tmp_path / "old")
    (data / "catalog.yaml").write_text(OLD_CATALOG)
    with pytest.raises(PolicyRejected, match=r"the 0\.1 form\); run: mcp-policy migrate "):
        await decisions(tmp_path / "refused", [rego, data])

    status, out, _ = migrate(capsys, str(data))
    assert (status, out) == (0, [f"migrated {data / 'catalog.yaml'} (2 entries under 2 servers)"])
    migrated = await decisions(tmp_path / "migrated", [rego, data])
    shipped = await decisions(
        tmp_path / "shipped", [PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"]
    )
    assert migrated == shipped
    assert {key: value[:2] for key, value in migrated.items()} == {
        (HEALTHIMAGING, "copy_image_set"): ("allow", "catalog.rule.copy_image_set"),
        (VALKEY, "copy_image_set"): ("allow", "catalog.rule.copy_image_set"),
        (HEALTHIMAGING, "no_such_tool"): ("deny", "catalog.default"),
    }
