"""`mcp-policy build`: the policy as one OPA bundle, checked as `serve` checks it.

The bundles are built by the pinned `opa build` and read back by the real OPA: `opa
inspect`, and `opa run --server --bundle` verifying the signature, whose decisions are
compared with the running service's. Every refusal is asserted as a user sees it: one
`mcp-policy build:` line and the problems, exit 1, no traceback, and nothing written (an
older bundle at the output left as it was, no temporary file left beside it).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine import translate
from engine.authoring.build import Signing, build
from engine.models import DecideRequest, PolicyResult
from engine.policy.opa_process import find_opa, free_loopback_port
from engine.policy.source import read_bundle
from engine.settings import DEFAULT_POLICY_PATHS, DEFAULT_POLICY_SCHEMA
from engine.transports.server import Servers
from tests.clients import HttpClient
from tests.conftest import approval_call, copy_call, copy_policy
from tests.processes import CLI

OPA = find_opa()
OLD_BUNDLE = b"an older bundle, to be left alone by a build that fails"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without MCP_POLICY_* settings (the defaults, as a user has them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    return {**env, **extra}


def run_build(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "build", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env or clean_env(),
    )


def inspect(bundle: Path) -> dict[str, Any]:
    """What `opa inspect` reads in `bundle`."""
    done = subprocess.run(
        [OPA, "inspect", "--format", "json", str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def bundle_files(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:gz") as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def bundle_data(bundle: Path) -> Any:
    """The bundle's data document, as OPA loads it (its one /data.json)."""
    data = [
        json.loads(body)
        for name, body in bundle_files(bundle).items()
        if name.endswith("data.json")
    ]
    assert len(data) == 1, "opa build writes the data as one /data.json"
    return data[0]


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def assert_refused(result: subprocess.CompletedProcess[str], output: Path) -> list[str]:
    """A build that failed as a user should see it; the problem lines it printed."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    # The supervised OPA of the fallback logs to the same stderr (as root: a warning).
    lines = [line for line in result.stderr.splitlines() if not line.startswith('{"')]
    assert lines and lines[0].startswith("mcp-policy build: ") and "nothing written" in lines[0]
    assert not output.exists() or output.read_bytes() == OLD_BUNDLE
    if output.parent.is_dir():
        assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []
    return [line.strip() for line in lines[1:]]


def key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A new RSA key pair: the private key (PKCS#8 PEM) and the public key (PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = directory / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = directory / f"{name}.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


# --- building --------------------------------------------------------------------------


def test_build_the_shipped_policy(tmp_path: Path) -> None:
    """With no directories: what `serve` loads by default, as one bundle that `opa inspect`
    reads, its revision the policy's own, its modules the service's (no tests), its data
    exactly what read_bundle gives."""
    out = tmp_path / "bundle.tar.gz"
    result = run_build("-o", out)
    assert result.returncode == 0, result.stderr
    shipped = read_bundle(list(DEFAULT_POLICY_PATHS))
    data_files = [p for root in DEFAULT_POLICY_PATHS for p in root.rglob("*.yaml")]
    assert result.stdout.splitlines() == [
        f"mcp-policy build: wrote {out} (revision {shipped.revision}, "
        f"{len(shipped.modules)} Rego modules, {len(data_files)} data files, unsigned)"
    ]
    found = inspect(out)
    assert found["manifest"]["revision"] == shipped.revision
    files = {name for names in found["namespaces"].values() for name in names}
    assert files == {"/data.json"} | {"/" + module_id for module_id in shipped.modules}
    modules = files - {"/data.json"}
    assert not any(name.endswith("_test.rego") for name in modules)
    assert bundle_data(out) == as_json(shipped.data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar.gz"]


async def test_identical_policy_builds_the_identical_revision(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    first, second = tmp_path / "first.tar.gz", tmp_path / "second.tar.gz"
    built = await build([rego, data], first, schema=DEFAULT_POLICY_SCHEMA)
    again = await build([rego, data], second, schema=DEFAULT_POLICY_SCHEMA)
    assert built.revision == again.revision == read_bundle([rego, data]).revision
    assert inspect(second)["manifest"]["revision"] == built.revision

    rules = data / "rules.yaml"
    rules.write_text(rules.read_text().replace("max: 10", "max: 11"))
    changed = await build([rego, data], second, schema=DEFAULT_POLICY_SCHEMA)
    assert changed.revision != built.revision
    assert inspect(second)["manifest"]["revision"] == changed.revision

    named = await build([rego, data], second, schema=DEFAULT_POLICY_SCHEMA, revision="v7")
    assert named.revision == "v7" == inspect(second)["manifest"]["revision"]


async def test_the_bundles_data_is_read_bundles_wherever_the_files_are(tmp_path: Path) -> None:
    """Data files in subdirectories, JSON beside YAML, data beside Rego, several files
    merged into one place: the bundle's data document is exactly read_bundle's."""
    rego, data = copy_policy(tmp_path)
    shipped_files = len(list(data.glob("*.yaml")))  # policies/*.yaml
    (data / "teams" / "imaging").mkdir(parents=True)
    (data / "teams" / "imaging" / "limits.yaml").write_text("per_day: 40\nowners: [a, b]\n")
    (data / "teams" / "imaging" / "more.json").write_text('{"ids": {"x": [1, 2.5, null]}}')
    (data / "teams" / "note.yml").write_text("team_notes: {text: 'ünïcode ✓'}\n")
    (rego / "mcp" / "rules" / "input" / "extra.json").write_text('{"hint": true}')
    (data / "empty.yaml").write_text("")
    out = tmp_path / "bundle.tar.gz"
    built = await build([rego, data], out, schema=DEFAULT_POLICY_SCHEMA)
    expected = read_bundle([rego, data])
    assert built.data_files == shipped_files + 5
    assert bundle_data(out) == as_json(expected.data)
    assert bundle_data(out)["teams"]["imaging"] == {
        "per_day": 40,
        "owners": ["a", "b"],
        "ids": {"x": [1, 2.5, None]},
    }
    assert bundle_data(out)["mcp"]["rules"]["input"] == {"hint": True}


async def test_without_the_in_process_library_opa_checks_it_as_validate_does(
    tmp_path: Path,
) -> None:
    """MCP_POLICY_OPA_LIBRARY names no library: the policy is compiled by a supervised
    `opa run --server`, as `validate` has it, and a broken module is still refused."""
    env = clean_env(MCP_POLICY_OPA_LIBRARY=str(tmp_path / "no-library.so"))
    rego, data = copy_policy(tmp_path)
    out = tmp_path / "bundle.tar.gz"
    result = run_build(rego, data, "-o", out, env=env)
    assert result.returncode == 0, result.stderr
    assert inspect(out)["manifest"]["revision"] == read_bundle([rego, data]).revision

    broken = rego / "mcp" / "rules" / "broken" / "broken.rego"
    broken.parent.mkdir()
    broken.write_text("package mcp.rules.broken\n\ndeny contains x if {\n\tnope(x)\n}\n")
    out.write_bytes(OLD_BUNDLE)
    problems = assert_refused(run_build(rego, data, "-o", out, env=env), out)
    assert any(line.startswith(f"{broken}:4:") for line in problems), problems


# --- signed bundles, read by the real OPA ------------------------------------------------


@contextlib.asynccontextmanager
async def opa_serving(*args: str | Path) -> AsyncIterator[str]:
    """`opa run --server` with `args` (a bundle, a verification key), once its bundle is
    activated; its URL."""
    port = free_loopback_port()
    proc = await asyncio.create_subprocess_exec(
        OPA,
        "run",
        "--server",
        "--addr",
        f"127.0.0.1:{port}",
        "--skip-version-check",
        "--log-level",
        "error",
        *map(str, args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(300):
                assert proc.returncode is None, "opa refused the bundle"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/health?bundles")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("opa did not activate the bundle")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def opa_refuses(*args: str | Path) -> str:
    """What `opa run --server` with `args` said when it refused to start (it must)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [OPA, "run", "--server", "--addr", f"127.0.0.1:{free_loopback_port()}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0, "opa started with a bundle it should have refused"
    return done.stdout + done.stderr


def input_for(body: dict[str, Any]) -> dict[str, Any]:
    """The input document the service makes for the DecideRequest `body`."""
    request = DecideRequest.model_validate(body)
    call = translate.tool_call(request, max_depth=24)
    return translate.input_document(
        call, request, decision_id="build-test", now=datetime.now(UTC), transport="http"
    )


CALLS: dict[str, Callable[[], dict[str, Any]]] = {
    "allow": copy_call,
    "deny": lambda: copy_call(datastore_id="not-a-datastore"),
    "approval_required": approval_call,
}


async def test_a_signed_bundle_decides_as_the_service_does(
    tmp_path: Path, servers: Servers, http: HttpClient
) -> None:
    """The service's policy, built and signed (RS256), is verified by the real `opa run
    --bundle --verification-key` and decides copy_image_set as the service does: the same
    policy result for the same input, the same rule and revision as the service answers."""
    private, public = key_pair(tmp_path, "signer")
    paths = servers.runtime.settings.policy_paths
    out = tmp_path / "signed.tar.gz"
    built = await build(paths, out, schema=DEFAULT_POLICY_SCHEMA, signing=Signing(private))
    assert built.signed == "RS256"
    assert built.revision == servers.runtime.policy.revision
    assert any(name.endswith(".signatures.json") for name in bundle_files(out))

    async with (
        opa_serving("--bundle", out, "--verification-key", public) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as opa,
    ):
        data = (await opa.get("/v1/data/mcp_policy")).json()["result"]
        assert data == as_json(read_bundle(paths).data["mcp_policy"])
        for verdict, call in CALLS.items():
            body = call()
            answer = await opa.post("/v1/data/mcp/decision", json={"input": input_for(body)})
            from_bundle = PolicyResult.model_validate(answer.json()["result"])
            from_service, revision = await servers.runtime.policy.evaluate(input_for(body))
            assert from_bundle == from_service
            assert revision == built.revision
            decided = await http.decide(body)
            assert decided["verdict"] == verdict, decided
            assert decided["rule"] == from_bundle.rule
            assert decided["policy_revision"] == built.revision


async def test_a_signed_bundle_is_refused_with_another_key_or_when_tampered(
    tmp_path: Path,
) -> None:
    private, public = key_pair(tmp_path, "signer")
    _, other = key_pair(tmp_path, "other")
    rego, data = copy_policy(tmp_path)
    out = tmp_path / "signed.tar.gz"
    await build([rego, data], out, schema=DEFAULT_POLICY_SCHEMA, signing=Signing(private))

    said = await opa_refuses("--bundle", out, "--verification-key", other)
    assert "verif" in said, said

    # The data changed after signing (every call allowed): the signature no longer holds.
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(out, "r:gz") as source, tarfile.open(tampered, "w:gz") as target:
        for member in source.getmembers():
            body = source.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith("data.json"):
                doc = json.loads(body)
                doc["mcp_policy"]["default"] = {"action": "allow"}
                body = json.dumps(doc).encode()
                member.size = len(body)
            target.addfile(member, io.BytesIO(body))
    said = await opa_refuses("--bundle", tampered, "--verification-key", public)
    assert "data.json" in said or "digest" in said or "hash" in said, said

    unsigned = tmp_path / "unsigned.tar.gz"
    await build([rego, data], unsigned, schema=DEFAULT_POLICY_SCHEMA)
    said = await opa_refuses("--bundle", unsigned, "--verification-key", public)
    assert ".signatures.json" in said, said

    async with opa_serving("--bundle", out, "--verification-key", public):
        pass  # the right key: activated


# --- refusals: an invalid policy -------------------------------------------------------


def break_schema(rego: Path, data: Path) -> str:
    rules = data / "rules.yaml"
    limit = "      rate_limit:\n        max: 10\n        window: 60\n        scope: session\n"
    rules.write_text(rules.read_text().replace(limit, ""))
    line = rules.read_text().splitlines().index("    copy_image_set:") + 1
    return (
        f"{rules}:{line + 1}:7: data.mcp_policy.rules.copy_image_set: "
        "action rate_limit needs a rate_limit"
    )


def break_rego(rego: Path, data: Path) -> str:
    broken = rego / "mcp" / "rules" / "broken" / "broken.rego"
    broken.parent.mkdir()
    broken.write_text(
        "package mcp.rules.broken\n"
        "\n"
        'deny contains {"rule": "broken.call", "reason": "no"} if {\n'
        "\tno_such_function(input.tool.name)\n"
        "}\n"
    )
    return f"{broken}:4:"


def break_load_errors(rego: Path, data: Path) -> str:
    """A limit the schema's \\s takes (Python) but the Rego's (RE2) does not."""
    rules = data / "rules.yaml"
    limit = "      rate_limit:\n        max: 10\n        window: 60\n        scope: session\n"
    rules.write_text(rules.read_text().replace(limit, '      rate_limit: "10/minute\\u00a0"\n'))
    line = rules.read_text().splitlines().index("    copy_image_set:") + 1
    return (
        f"{rules}:{line + 1}:7: data.mcp.load_errors: mcp.rules.catalog: "
        'mcp_policy.rules["copy_image_set"]: rate_limit "10/minute\u00a0" cannot be read'
    )


def break_yaml(rego: Path, data: Path) -> str:
    rules = data / "rules.yaml"
    lines = rules.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == "copy_image_set:")
    lines.insert(at + 1, "    action: [unclosed")
    rules.write_text("\n".join(lines) + "\n")
    return f"{rules}:"


def add_a_date(rego: Path, data: Path) -> str:
    """YAML that is not JSON: the bundle could not carry what the service loads."""
    extra = data / "extra.yaml"
    extra.write_text("extra:\n  since: 2024-01-31\n")
    return f"{extra}:2:10: data.extra.since: a date is not JSON"


def add_a_conflict(rego: Path, data: Path) -> str:
    again = data / "again.yaml"
    again.write_text("mcp_policy:\n  default:\n    action: allow\n")
    return f"{again}:3:13: data.mcp_policy.default.action is defined twice (also at {data}"


def add_a_non_string_key(rego: Path, data: Path) -> str:
    extra = data / "extra.yaml"
    extra.write_text("extra:\n  7: seven\n")
    return f"{extra}:2:3: data.extra: the key 7 is not a string"


def add_bytes_that_are_not_text(rego: Path, data: Path) -> str:
    module = rego / "mcp" / "latin1.rego"
    module.write_bytes(b"package mcp.latin1\n\n# caf\xe9\n")
    return f"{module}: not UTF-8 text"


@pytest.mark.parametrize(
    "spoil",
    [
        break_schema,
        break_rego,
        break_load_errors,
        break_yaml,
        add_a_date,
        add_a_conflict,
        add_a_non_string_key,
        add_bytes_that_are_not_text,
    ],
)
def test_an_invalid_policy_is_refused_with_its_place_and_nothing_written(
    tmp_path: Path, spoil: Callable[[Path, Path], str]
) -> None:
    rego, data = copy_policy(tmp_path)
    expected = spoil(rego, data)
    out = tmp_path / "out" / "bundle.tar.gz"
    out.parent.mkdir()
    out.write_bytes(OLD_BUNDLE)
    problems = assert_refused(run_build(rego, data, "-o", out), out)
    assert any(line.startswith(expected) or expected in line for line in problems), problems


# --- refusals: hostile arguments ---------------------------------------------------------


def test_hostile_arguments_are_clear_errors(tmp_path: Path) -> None:
    rego, data = copy_policy(tmp_path)
    out = tmp_path / "out" / "bundle.tar.gz"
    out.parent.mkdir()
    out.write_bytes(OLD_BUNDLE)
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("this is not a key\n")
    _, public_only = key_pair(tmp_path, "public")
    private, _ = key_pair(tmp_path, "signer")
    a_file = data / "rules.yaml"
    policy: list[str | Path] = [rego, data, "-o", out]
    cases: list[tuple[list[str | Path], str]] = [
        ([tmp_path / "nowhere", data, "-o", out], f"{tmp_path / 'nowhere'}: no such directory"),
        ([rego, a_file, "-o", out], f"{a_file}: not a directory"),
        ([rego, data, "-o", tmp_path / "missing" / "b.tar.gz"], "does not exist"),
        ([rego, data, "-o", out.parent], "is a directory"),
        ([*policy, "--signing-key", not_a_key], "failed to parse PEM block"),
        ([*policy, "--signing-key", public_only], "unsupported key type: PUBLIC KEY"),
        # A key that is not a file is never handed to OPA, which would take the path itself
        # as an HMAC secret.
        (
            [*policy, "--signing-key", tmp_path / "typo.pem", "--signing-alg", "HS256"],
            f"--signing-key {tmp_path / 'typo.pem'}: no such file",
        ),
        (
            [*policy, "--signing-key", private, "--signing-alg", "XX999"],
            "unknown signature algorithm: XX999",
        ),
        ([*policy, "--signing-key", private, "--claims-file", tmp_path], "not a file"),
        ([*policy, "--claims-file", a_file], "need --signing-key"),
        ([*policy, "--revision", " "], "--revision: must not be empty"),
    ]
    for args, expected in cases:
        result = run_build(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr, (args, result.stderr)
        assert out.read_bytes() == OLD_BUNDLE
        assert not (tmp_path / "missing").exists()
        assert [p.name for p in out.parent.iterdir()] == ["bundle.tar.gz"], args


def test_a_missing_opa_says_how_to_get_it(tmp_path: Path) -> None:
    out = tmp_path / "bundle.tar.gz"
    result = run_build("-o", out, env=clean_env(MCP_POLICY_OPA_BINARY=str(tmp_path / "no-opa")))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPA not found" in lines[0], result.stderr
    assert not out.exists()


def test_a_teams_directories_are_built_with_the_installed_framework(tmp_path: Path) -> None:
    """A team's repository holds its data and rule packages, not the framework: the bundle
    of its directories carries the installed framework's Rego too, so it decides alone."""
    team = tmp_path / "team"
    shutil.copytree(DEFAULT_POLICY_PATHS[1], team / "policies")
    out = tmp_path / "bundle.tar.gz"
    result = run_build(team / "policies", "-o", out)
    assert result.returncode == 0, result.stderr
    files = {name for names in inspect(out)["namespaces"].values() for name in names}
    assert any(name.endswith("/mcp/decision.rego") for name in files), files
    whole = read_bundle([DEFAULT_POLICY_PATHS[0], team / "policies"])
    assert bundle_data(out) == as_json(whole.data)
    assert str(len(whole.modules)) + " Rego modules" in result.stdout
