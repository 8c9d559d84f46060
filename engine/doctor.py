"""`mcp-policy doctor`: what the service would find if it started now, one line each.

The first thing to run when something is off. It reads the same settings as `serve`
(flags, then MCP_POLICY_* variables) and reports: the package and where it runs from, the
policy engine (the in-process library and its OPA version, or the OPA server), the `opa`
binary, the policy directories and schema, whether the policy loads (read, checked
against the schema as `validate` checks it, compiled by the configured engine) and its
revision, the state store (and whether it answers), and the two listeners (TLS, and
whether each port is free). Exit 0 when everything the service needs is usable, 1
otherwise; `--json` prints the same as one JSON document. It changes nothing: no policy
is pushed to an external OPA, the state directory is not created, no port is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.metadata
import json
import os
import socket
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

import engine
from engine.authoring.validate import schema_errors, validate
from engine.errors import EngineError, PolicyRejected
from engine.policy.fleet import BundleVerification, ConfigRejected, load_config, read_bundle_file
from engine.policy.inprocess import LOAD_ERRORS_QUERY, InProcessOpa, library_version
from engine.policy.opa_process import OPA_VERSION, ToolMissing, find_opa
from engine.policy.source import DATA_SUFFIXES, MODULE_PREFIX, PolicyBundle, read_bundle
from engine.settings import IN_CHECKOUT, Settings
from engine.transports.tls import StartupRefused, check_exposure, load_server_tls

DISTRIBUTION = "mcp-policy-engine"
OPA_VERSION_TIMEOUT = 5.0  # `opa version`
PROBE_TIMEOUT = 2.0  # Redis PING, an external OPA's /health
COMPILE_TIMEOUT = 60.0  # compiling the policy (the in-process library, or validate's OPA)

Status = Literal["ok", "warn", "fail"]


@dataclass
class Finding:
    """One line of the report. `fail` makes the exit status 1; `warn` does not."""

    check: str
    status: Status
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, status: Status, detail: str, **facts: Any) -> Finding:
        finding = Finding(check, status, detail, facts)
        self.findings.append(finding)
        return finding

    @property
    def ok(self) -> bool:
        return all(finding.status != "fail" for finding in self.findings)


# --- the package --------------------------------------------------------------------------


def _package(report: Report) -> None:
    where = Path(engine.__file__).resolve().parent
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    how = f"run from the checkout {where.parent}" if IN_CHECKOUT else f"installed at {where}"
    report.add(
        "package",
        "ok",
        f"{DISTRIBUTION} {version}, {how}",
        version=version,
        path=str(where),
        checkout=IN_CHECKOUT,
    )


# --- the policy engine --------------------------------------------------------------------


def _opa_version(path: str) -> str:
    """`opa version`'s Version line (RuntimeError with the reason when it does not say)."""
    try:
        done = subprocess.run(
            [path, "version"],
            capture_output=True,
            text=True,
            timeout=OPA_VERSION_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"`opa version` did not answer within {OPA_VERSION_TIMEOUT:.0f} s"
        ) from exc
    except OSError as exc:
        raise RuntimeError(f"cannot run it: {exc.strerror or exc}") from exc
    for line in done.stdout.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Version" and value.strip():
            return value.strip()
    raise RuntimeError(f"`opa version` exited {done.returncode} without a version")


def _without_credentials(url: str) -> str:
    """`url` with no user or password (never print a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    return parts._replace(netloc=host, query="", fragment="").geturl()


async def _opa_server_answers(url: str, token: str | None) -> str | None:
    """Why the external OPA at `url` does not answer /health, or None."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as http,
            http.get(f"{url.rstrip('/')}/health", headers=headers) as response,
        ):
            if response.status != 200:
                return f"/health answered HTTP {response.status}"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"does not answer ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
    return None


async def _engine(report: Report, settings: Settings) -> str | None:
    """The engine lines; which engine can compile the policy ("inprocess", "opa", None)."""
    if settings.opa_url is not None:
        shown = _without_credentials(settings.opa_url)
        token = settings.opa_token.get_secret_value() if settings.opa_token else None
        problem = await _opa_server_answers(settings.opa_url, token)
        report.add(
            "engine",
            "fail" if problem else "ok",
            f"opa server at {shown} (MCP_POLICY_OPA_URL)" + (f": {problem}" if problem else ""),
            engine="opa",
            opa_url=shown,
        )
    elif settings.engine == "inprocess":
        report.add(
            "engine",
            "ok",
            "inprocess (OPA's evaluator in the service's process)",
            engine="inprocess",
        )
    else:
        report.add("engine", "ok", "opa (an `opa run --server` the service starts)", engine="opa")

    compiler: str | None = None
    if settings.opa_url is None and settings.engine == "inprocess":
        try:
            path, version = library_version()
        except ToolMissing as exc:
            report.add("library", "fail", exc.message)
        else:
            report.add(
                "library", "ok", f"{path} (OPA {version})", path=str(path), opa_version=version
            )
            compiler = "inprocess"

    # The binary: what MCP_POLICY_ENGINE=opa starts, and what `mcp-policy validate` runs.
    needed = settings.opa_url is None and settings.engine == "opa"
    try:
        binary = find_opa(settings.opa_binary)
        version = _opa_version(binary)
    except ToolMissing as exc:
        why = "" if needed else " (needed only by MCP_POLICY_ENGINE=opa and `validate`)"
        report.add("opa", "fail" if needed else "warn", exc.message + why)
    except RuntimeError as exc:
        report.add("opa", "fail" if needed else "warn", f"{binary}: {exc}", path=binary)
    else:
        other = version != OPA_VERSION
        report.add(
            "opa",
            "warn" if other else "ok",
            f"{binary} (OPA {version}"
            + (f"; the engine is tested with {OPA_VERSION})" if other else ")"),
            path=binary,
            opa_version=version,
        )
        if needed or (compiler is None and settings.opa_url is not None):
            compiler = "opa"
    return compiler


# --- the policy ---------------------------------------------------------------------------


def _paths(report: Report, settings: Settings) -> bool:
    """A line per policy directory and one for the schema; whether all are there."""
    usable = True
    for path in settings.policy_paths:
        if path.is_dir():
            report.add("policy path", "ok", str(path), path=str(path), exists=True)
        else:
            usable = False
            what = "not a directory" if path.exists() else "no such directory"
            report.add("policy path", "fail", f"{path}: {what}", path=str(path), exists=False)
    schema = settings.policy_schema
    if schema is None:
        report.add("schema", "warn", "none (MCP_POLICY_POLICY_SCHEMA unset: data not checked)")
    elif not schema.is_file():
        usable = False
        report.add("schema", "fail", f"{schema}: no such file", path=str(schema))
    else:
        try:
            json.loads(schema.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            usable = False
            report.add("schema", "fail", f"{schema}: not a JSON schema ({exc})", path=str(schema))
        else:
            report.add("schema", "ok", str(schema), path=str(schema))
    return usable


def _data_files(paths: list[Path]) -> list[Path]:
    return [
        path
        for root in paths
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in DATA_SUFFIXES
    ]


def _errors_line(errors: list[str]) -> str:
    more = f" (and {len(errors) - 1} more: `mcp-policy validate` lists them)" if errors[1:] else ""
    return f"{errors[0]}{more}"


def _on_disk(message: str, paths: list[Path]) -> str:
    """OPA names a module by its id (read_bundle's); put its file's path in its place."""
    for root in paths:
        module_id = f"{MODULE_PREFIX}{root.name}/"
        if message.startswith(module_id):
            return f"{root}/{message[len(module_id) :]}"
    return message


async def _compile(bundle: PolicyBundle, settings: Settings, compiler: str) -> list[str]:
    """OPA's compiler errors and the rule packages' load errors, as the service loads it."""
    if compiler == "inprocess":
        opa = InProcessOpa(timeout=settings.opa_timeout_ms / 1000)
        await opa.open()
        try:
            await opa.load(bundle, check=LOAD_ERRORS_QUERY)
        except PolicyRejected as exc:
            return [_on_disk(error, settings.policy_paths) for error in exc.errors or [exc.message]]
        finally:
            await opa.close()
        return []
    # With an OPA of its own, never the external one (nothing is pushed anywhere).
    checked = await validate(
        settings.policy_paths, opa_binary=settings.opa_binary, schema=settings.policy_schema
    )
    return checked.errors


async def _policy(report: Report, settings: Settings, compiler: str | None) -> None:
    paths = settings.policy_paths
    try:
        bundle = await asyncio.to_thread(read_bundle, paths)
    except PolicyRejected as exc:
        report.add("policy", "fail", _errors_line(exc.errors or [exc.message]))
        return
    files = _data_files(paths)
    counts = f"{len(bundle.modules)} Rego modules, {len(files)} data files"
    facts = {"revision": bundle.revision, "modules": len(bundle.modules), "data_files": len(files)}
    if settings.policy_schema is not None:
        problems = schema_errors(bundle.data, settings.policy_schema, files)
        if problems:
            report.add("policy", "fail", _errors_line(problems), errors=problems, **facts)
            return
    if compiler is None:
        report.add(
            "policy",
            "warn",
            f"{bundle.revision} ({counts}; read and checked, not compiled: no usable engine)",
            **facts,
        )
        return
    try:
        async with asyncio.timeout(COMPILE_TIMEOUT):
            errors = await _compile(bundle, settings, compiler)
    except (EngineError, RuntimeError, OSError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, EngineError) else str(exc) or type(exc).__name__
        report.add("policy", "fail", f"could not be compiled: {message}", **facts)
        return
    if errors:
        report.add("policy", "fail", _errors_line(errors), errors=errors, **facts)
        return
    by = "OPA in this process" if compiler == "inprocess" else "an opa process"
    report.add("policy", "ok", f"{bundle.revision} ({counts}; loads, compiled by {by})", **facts)


def _fleet(report: Report, settings: Settings) -> str:
    """The OPA configuration file's line; where the policy comes from ("bundles", "file",
    "directories")."""
    if settings.opa_config is not None:
        try:
            config = load_config(settings.opa_config)
        except ConfigRejected as exc:
            report.add("opa config", "fail", str(exc), path=str(settings.opa_config))
            return "bundles" if settings.bundle is None else "file"
        parts = [f"{len(config.get('bundles') or {})} bundles"]
        parts += [part for part in ("decision_logs", "status") if config.get(part)]
        report.add(
            "opa config",
            "ok",
            f"{settings.opa_config} ({', '.join(parts)})",
            path=str(settings.opa_config),
        )
        if config.get("bundles"):
            return "bundles"
    return "file" if settings.bundle is not None else "directories"


async def _bundle_file(report: Report, settings: Settings, compiler: str | None) -> None:
    """The bundle file: read (and verified) and compiled as `serve --bundle` loads it."""
    assert settings.bundle is not None
    key = settings.bundle_verification_key
    verification = (
        BundleVerification(
            key.get_secret_value(),
            settings.bundle_verification_key_id,
            settings.bundle_signing_alg,
            settings.bundle_scope,
        )
        if key is not None
        else None
    )
    try:
        bundle = await asyncio.to_thread(read_bundle_file, settings.bundle, verification)
    except (PolicyRejected, ToolMissing) as exc:
        report.add("policy", "fail", exc.message, path=str(settings.bundle))
        return
    facts = {"revision": bundle.revision, "modules": len(bundle.modules)}
    if settings.policy_schema is not None:
        problems = schema_errors(bundle.data, settings.policy_schema, [])
        if problems:
            report.add("policy", "fail", _errors_line(problems), errors=problems, **facts)
            return
    if compiler != "inprocess":
        report.add("policy", "warn", f"{bundle.revision} (read, not compiled here)", **facts)
        return
    errors = await _compile(bundle, settings, compiler)
    if errors:
        report.add("policy", "fail", _errors_line(errors), errors=errors, **facts)
        return
    signed = "verified" if verification else "not verified"
    report.add("policy", "ok", f"{bundle.revision} ({settings.bundle}, {signed}; loads)", **facts)


# --- the state store ----------------------------------------------------------------------


def _writable_dir(path: Path) -> str | None:
    """Why the service could not write under `path` (creating it if need be), or None."""
    if path.is_dir():
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            return f"not writable ({exc.strerror or exc})"
        return None
    if path.exists():
        return "not a directory"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"does not exist, and {parent} is not writable"
    return None


async def _redis_answers(settings: Settings) -> str | None:
    """Why the Redis at redis_url does not answer PING, or None."""
    import redis.asyncio

    from engine.state.ratelimit import cluster_client

    assert settings.redis_url is not None
    url = settings.redis_url.get_secret_value()
    options: dict[str, Any] = {
        "socket_timeout": PROBE_TIMEOUT,
        "socket_connect_timeout": PROBE_TIMEOUT,
    }
    client: Any = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT * 2):
            client = (
                cluster_client(url, **options)
                if settings.redis_cluster
                else redis.asyncio.Redis.from_url(url, **options)
            )
            await client.ping()
    except (redis.RedisError, OSError, TimeoutError, ValueError) as exc:
        return f"does not answer PING ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
    return None


async def _store(report: Report, settings: Settings) -> None:
    store = settings.store
    if store == "memory":
        report.add("store", "ok", "memory (this process only; forgotten on restart)", store=store)
    elif store == "sqlite":
        problem = _writable_dir(settings.state_dir)
        report.add(
            "store",
            "fail" if problem else "ok",
            f"sqlite in {settings.state_dir}" + (f": {problem}" if problem else ": writable"),
            store=store,
            state_dir=str(settings.state_dir),
        )
    else:
        if settings.redis_url is None:
            report.add("store", "fail", "redis needs MCP_POLICY_REDIS_URL", store=store)
            return
        shown = _without_credentials(settings.redis_url.get_secret_value())
        kind = "redis cluster" if settings.redis_cluster else "redis"
        problem = await _redis_answers(settings)
        report.add(
            "store",
            "fail" if problem else "ok",
            f"{kind} at {shown}" + (f": {problem}" if problem else ": answers PING"),
            store=store,
            redis_url=shown,
        )


# --- the listeners ------------------------------------------------------------------------


def listen_problem(host: str, port: int) -> str | None:
    """Why the service could not listen on host:port now, or None (port 0: any free one).

    Binds the way the HTTP listener does (SO_REUSEADDR, so a port with connections in
    TIME_WAIT counts as free) and lets go at once."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror})"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "in use (another process listens there: a service already running?)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine"
        if exc.errno == errno.EACCES:
            return "permission denied (ports below 1024 need privileges)"
        return exc.strerror or str(exc)
    return None


def _listeners(report: Report, settings: Settings) -> None:
    tls = "off"
    tls_ok = True
    try:
        loaded = load_server_tls(settings)
    except StartupRefused as exc:
        tls_ok = False
        report.add("tls", "fail", exc.message)
    else:
        if loaded is not None:
            tls = "mTLS" if loaded.client_ca is not None else "on"
    refused = check_exposure(settings)
    if refused is not None:
        report.add("exposure", "fail", refused, host=settings.host)
    for name, port in (("http", settings.http_port), ("grpc", settings.grpc_port)):
        problem = listen_problem(settings.host, port)
        where = f"{settings.host}:{port}" if port else f"{settings.host}:(any free port)"
        report.add(
            name,
            "fail" if problem else "ok",
            f"{where}, TLS {tls}: " + (problem or "free"),
            host=settings.host,
            port=port,
            tls=tls if tls_ok else "broken",
            free=problem is None,
        )


# --- the whole report ---------------------------------------------------------------------


async def diagnose(settings: Settings) -> Report:
    report = Report()
    _package(report)
    compiler = await _engine(report, settings)
    source = _fleet(report, settings)
    if source == "bundles":
        report.add("policy", "ok", "pulled from the bundle server (checked as it arrives)")
    elif source == "file":
        await _bundle_file(report, settings, compiler)
    elif _paths(report, settings):
        await _policy(report, settings, compiler)
    else:
        report.add("policy", "fail", "not loaded: a policy path or the schema is missing")
    await _store(report, settings)
    _listeners(report, settings)
    return report


def render(report: Report) -> str:
    width = max(len(finding.check) for finding in report.findings)
    lines = [
        f"{finding.status.upper():<4}  {finding.check:<{width}}  {finding.detail}"
        for finding in report.findings
    ]
    verdict = "everything the service needs is usable" if report.ok else "not usable as is"
    return "\n".join([*lines, f"mcp-policy doctor: {verdict}"])


def as_json(report: Report) -> str:
    return json.dumps(
        {"ok": report.ok, "findings": [asdict(finding) for finding in report.findings]},
        indent=2,
    )


def run(settings: Settings, *, json_output: bool = False) -> int:
    """`mcp-policy doctor`: print the report; 0 when all is usable, 1 otherwise."""
    report = asyncio.run(diagnose(settings))
    print(as_json(report) if json_output else render(report), flush=True)
    return 0 if report.ok else 1
