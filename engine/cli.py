"""`mcp-policy`: serve the decision service, or decide one call from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from engine import approvals_cli, jsonstrict, translate
from engine import status as status_view
from engine.authoring import build as build_command
from engine.authoring import explain as explain_command
from engine.authoring import import_intercept as import_command
from engine.authoring import init as init_command
from engine.authoring import migrate as migrate_command
from engine.authoring import replay as replay_command
from engine.authoring import testing as test_command
from engine.errors import (
    MAX_MESSAGE_CHARS,
    EngineError,
    InvalidRequest,
    PolicyRejected,
    bounded,
    from_validation,
)
from engine.identity.cli import IDENTITY_COMMANDS, add_identity_commands, run_identity_command
from engine.models import DecideRequest
from engine.policy.opa_process import ToolMissing
from engine.proxy.cli import PROXY_COMMANDS, add_proxy_commands, run_proxy_command
from engine.runtime import Runtime
from engine.settings import Settings
from engine.state import audit
from engine.transports.tls import StartupRefused

EXIT_POLICY_REJECTED = 2
EXIT_TOOL_MISSING = 2  # OPA is not installed (the message says how to get it)
EXIT_INVALID = 3
EXIT_UNAVAILABLE = 4
EXIT_FAILED = 1  # anything else (one line; the traceback too at --log-level DEBUG)
EXIT_INTERRUPTED = 130


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in (
        "host",
        "http_port",
        "grpc_port",
        "state_dir",
        "opa_url",
        "opa_binary",
        "opa_timeout_ms",
        "opa_config",
        "bundle",
        "decision_log",
        "log_level",
        "insecure",
    ):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "policy", None):
        overrides["policy_paths"] = args.policy
    return Settings(**overrides)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help="state directory (MCP_POLICY_STATE_DIR)")
    parser.add_argument(
        "--opa-url", help="use this OPA instead of starting one (MCP_POLICY_OPA_URL)"
    )
    parser.add_argument("--opa-binary", help="OPA binary to start (MCP_POLICY_OPA_BINARY)")
    parser.add_argument("--opa-timeout-ms", type=int, help="policy evaluation deadline")
    parser.add_argument(
        "--policy",
        type=Path,
        action="append",
        help="a directory of Rego and YAML to load; repeat for several "
        "(default: the shipped rego/ and policies/)",
    )
    parser.add_argument(
        "--opa-config",
        type=Path,
        help="OPA's configuration file: bundles, decision_logs, status, services, keys, labels "
        "(MCP_POLICY_OPA_CONFIG)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        help="load the policy from this bundle file instead of --policy (MCP_POLICY_BUNDLE)",
    )
    parser.add_argument("--decision-log", help='decision log file, "-" for stderr, "off"')
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")


def _listener_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (MCP_POLICY_HOST, default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, help="MCP_POLICY_HTTP_PORT, default 8080")
    parser.add_argument("--grpc-port", type=int, help="MCP_POLICY_GRPC_PORT, default 50051")
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve on a non-loopback host without TLS (MCP_POLICY_INSECURE); "
        "otherwise the service refuses to start there",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-policy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the decision service (gRPC and HTTP)")
    _listener_options(serve)
    _common(serve)
    checkup = commands.add_parser(
        "doctor",
        help="what the service would find with these settings: engine, OPA, policy, "
        "store, listeners (exit 1 when something is not usable)",
        description="Report, one line each, what `serve` with the same flags and "
        "MCP_POLICY_* settings would find. Changes nothing.",
    )
    _listener_options(checkup)
    _common(checkup)
    checkup.add_argument("--json", action="store_true", help="print the report as JSON")
    decide = commands.add_parser(
        "decide",
        help="decide one call: a DecideRequest as JSON on stdin (or a file), "
        "the decision as JSON on stdout",
    )
    decide.add_argument("file", nargs="?", type=Path, help="read the request from this file")
    _common(decide)
    status = commands.add_parser(
        "status",
        help="summary of a running service: calls, denials and approvals required by rule, "
        "top tools, pending approvals",
    )
    status.add_argument("--url", default="http://127.0.0.1:8080", help="the service's HTTP URL")
    status.add_argument("--hours", type=float, default=24, help="how far back (default 24)")
    status.add_argument("--json", action="store_true", help="print the summary as JSON")
    migrate = commands.add_parser(
        "migrate",
        help=migrate_command.HELP,
        description=migrate_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 when a file needs migrating",
    )
    migrate.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="policy directories (or files)"
    )
    bundle = commands.add_parser(
        "build",
        help=build_command.HELP,
        description=build_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build_command.add_arguments(bundle)
    explainer = commands.add_parser(
        "explain",
        help=explain_command.HELP,
        description=explain_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain_command.add_arguments(explainer)
    replayer = commands.add_parser(
        "replay",
        help=replay_command.HELP,
        description=replay_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay_command.add_arguments(replayer)
    importer = commands.add_parser(
        "import",
        help=import_command.HELP,
        description=import_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    import_command.add_arguments(importer)
    starter = commands.add_parser(
        "init",
        help=init_command.HELP,
        description=init_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init_command.add_arguments(starter)
    policy_test = commands.add_parser(
        "test",
        help=test_command.HELP,
        description=test_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test_command.add_arguments(policy_test)
    add_proxy_commands(commands)
    add_identity_commands(commands)
    approvals_cli.add_approvals_command(commands)
    decision_log = commands.add_parser("log", help="the decision log: check its hash chains")
    log_commands = decision_log.add_subparsers(dest="log_command", required=True)
    verify = log_commands.add_parser(
        "verify", help=audit.VERIFY_HELP, description=audit.VERIFY_DESCRIPTION
    )
    verify.add_argument(
        "--db", type=Path, help="the SQLite copy (default: decisions.sqlite3 in the state dir)"
    )
    verify.add_argument(
        "--jsonl",
        type=Path,
        help="the JSONL log, its rotated files beside it read too (default: "
        "MCP_POLICY_DECISION_LOG, else decisions.jsonl in the state dir)",
    )
    return parser


async def _serve(settings: Settings) -> int:
    # The listeners (FastAPI, uvicorn, gRPC) are imported by the commands that serve only:
    # every other command starts in a fraction of the time.
    from engine.transports.server import start_servers

    servers = await start_servers(settings)
    runtime = servers.runtime
    # Signals first: whoever waits for the line below may stop us at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(runtime))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    print(
        f"mcp-policy: gRPC on {servers.grpc_target}, HTTP on {servers.http_url} "
        f"(policy {runtime.policy.revision}, {runtime.opa.where})",
        flush=True,
    )
    console = runtime.settings.console_base()
    if runtime.settings.public_url is None:
        console = f"{servers.http_url}/console"  # the port actually bound
    print(f"mcp-policy: approvals console at {console}", flush=True)
    if runtime.generated_token:
        print(
            "mcp-policy: no MCP_POLICY_APPROVER_TOKEN set; approver token for this run "
            f"(shown once): {runtime.approver_token}",
            flush=True,
        )
    await stop.wait()
    print("mcp-policy: stopping", flush=True)
    await servers.stop()
    return 0


async def _reload(runtime: Runtime) -> None:
    """SIGHUP: read the policy again; a policy OPA rejects leaves the running one in place."""
    try:
        revision = await runtime.policy.load()
    except EngineError as exc:
        print(
            f"mcp-policy: reload rejected, still running {runtime.policy.revision}: {exc.message}",
            flush=True,
        )
        for line in getattr(exc, "errors", []):
            print(f"  {line}", flush=True)
        return
    print(f"mcp-policy: policy {revision} loaded", flush=True)


async def _decide(settings: Settings, text: bytes) -> int:
    """One decision for the request in `text`, parsed as strictly as the service does."""
    try:
        raw = jsonstrict.loads(text, max_depth=settings.max_json_depth)
        if not isinstance(raw, dict):
            raise InvalidRequest("the request must be a JSON object")
        try:
            request = DecideRequest.model_validate(raw)
        except ValidationError as exc:
            raise from_validation(exc) from exc
        translate.tool_call(request, max_depth=settings.max_json_depth)
    except InvalidRequest as exc:
        error = {"code": type(exc).__name__, "message": bounded(exc.message, MAX_MESSAGE_CHARS)}
        print(json.dumps({"error": error}), file=sys.stderr)
        return EXIT_INVALID
    runtime = Runtime(settings)
    try:
        await runtime.start()
        decision = await runtime.service.decide(request, transport="cli")
    except EngineError as exc:
        print(
            json.dumps({"error": {"code": type(exc).__name__, "message": exc.message}}),
            file=sys.stderr,
        )
        return EXIT_INVALID if isinstance(exc, InvalidRequest) else EXIT_POLICY_REJECTED
    finally:
        await runtime.stop()
    print(decision.model_dump_json(exclude_none=True, indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    token = os.environ.get("MCP_POLICY_APPROVER_TOKEN")
    if not token:
        print(
            "mcp-policy status: set MCP_POLICY_APPROVER_TOKEN to the service's approver token",
            file=sys.stderr,
        )
        return EXIT_INVALID
    try:
        summary = status_view.fetch(args.url, token, args.hours)
    except EngineError as exc:
        print(f"mcp-policy status: {exc.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps(summary, indent=2) if args.json else status_view.render(summary, args.hours))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `mcp-policy` console script. Every failure ends as one line on stderr and a
    non-zero status; the traceback comes too only at --log-level DEBUG (or
    MCP_POLICY_LOG_LEVEL=DEBUG)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        level = getattr(args, "log_level", None) or os.environ.get("MCP_POLICY_LOG_LEVEL") or ""
        debug = level.strip().upper() == "DEBUG"
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        message, status = _failure(exc, args, debug=debug)
        print(f"mcp-policy {args.command}: {message}", file=sys.stderr, flush=True)
        return status


def _run(args: argparse.Namespace) -> int:
    if args.command in PROXY_COMMANDS:
        return run_proxy_command(args)
    if args.command in IDENTITY_COMMANDS:
        return run_identity_command(args)
    if args.command == "status":
        return _status(args)
    if args.command == "approvals":
        return approvals_cli.run(args)
    if args.command == "log":  # (only `log verify`)
        return audit.run(
            args.db, args.jsonl, lambda: audit.configured(_settings(args).decision_log_settings)
        )
    if args.command == "migrate":
        return migrate_command.run(args.dirs, check=args.check)
    if args.command == "build":
        return build_command.run(args)
    if args.command == "explain":
        return explain_command.run(args)
    if args.command == "replay":
        return replay_command.run(args)
    if args.command == "import":
        return import_command.run(args)
    if args.command == "init":
        return init_command.run(args)
    if args.command == "test":
        return test_command.run(args)
    settings = _settings(args)  # a bad value: one line naming it (main)
    # doctor's report is its output: log lines only when asked for.
    level = settings.log_level if args.command != "doctor" else args.log_level or "WARNING"
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "doctor":
        from engine import doctor

        return doctor.run(settings, json_output=args.json)
    try:
        if args.command == "serve":
            _check_ports(settings)
            return asyncio.run(_serve(settings))
        try:
            text = args.file.read_bytes() if args.file else sys.stdin.buffer.read()
        except OSError as exc:
            print(f"mcp-policy decide: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return EXIT_INVALID
        if args.decision_log is None:
            settings.decision_log = "off"
        return asyncio.run(_decide(settings, text))
    except PolicyRejected as exc:
        print(f"mcp-policy: policy rejected: {exc.message}", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_POLICY_REJECTED
    except StartupRefused as exc:  # a TLS file, or a non-loopback host without TLS
        print(f"mcp-policy: {exc.message}", file=sys.stderr)
        return EXIT_INVALID
    except ToolMissing as exc:
        print(f"mcp-policy: {exc.message}", file=sys.stderr)
        return EXIT_TOOL_MISSING


def _check_ports(settings: Settings) -> None:
    """Refuse, in one line, to start on a port that is taken (before OPA is started, and
    before gRPC, which would log its own bind error, tries)."""
    from engine import doctor

    for name, port in (("gRPC", settings.grpc_port), ("HTTP", settings.http_port)):
        problem = doctor.listen_problem(settings.host, port)
        if problem is not None:
            option = f"--{name.lower()}-port, MCP_POLICY_{name.upper()}_PORT"
            raise StartupRefused(
                f"cannot listen for {name} on {settings.host}:{port} ({option}): {problem}"
            )


def _failure(exc: BaseException, args: argparse.Namespace, *, debug: bool) -> tuple[str, int]:
    """The one line (without the command) and the exit status for a failure of `args`."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    status = EXIT_FAILED
    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        message, status = "invalid settings: " + _settings_problems(exc, args), EXIT_INVALID
    elif isinstance(exc, SettingsError):
        message, status = _unparsable_setting(exc), EXIT_INVALID
    elif isinstance(exc, ToolMissing):
        message, status = exc.message, EXIT_TOOL_MISSING
    elif isinstance(exc, PolicyRejected):
        message, status = f"policy rejected: {exc.message}", EXIT_POLICY_REJECTED
    elif isinstance(exc, StartupRefused | InvalidRequest):
        message, status = exc.message, EXIT_INVALID
    elif isinstance(exc, EngineError):
        message, status = exc.message, EXIT_UNAVAILABLE
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        message = where + (exc.strerror or str(exc) or type(exc).__name__)
    else:
        # ValueError and RuntimeError carry a sentence for people; others need their name.
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, ValueError | RuntimeError):
            message = f"{type(exc).__name__}: {message}"
        if not debug:
            message += " (--log-level DEBUG shows where)"
    return bounded(" ".join(message.split()), MAX_MESSAGE_CHARS), status


def _setting_name(name: str, args: argparse.Namespace) -> str:
    """How the user gave setting `name`: its flag when given as one, else its variable."""
    if getattr(args, name, None) is not None:
        return "--" + name.replace("_", "-")
    return "MCP_POLICY_" + name.upper()


def _settings_problems(exc: ValidationError, args: argparse.Namespace) -> str:
    problems = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:
            problems.append(message)
            continue
        name = str(error["loc"][0])
        field = Settings.model_fields.get(name)
        secret = field is not None and "SecretStr" in str(field.annotation)
        value = error.get("input")
        shown = ""
        if isinstance(value, str | int | float) and not secret:
            shown = f" (got {bounded(str(value), 80)!r})"
        problems.append(f"{_setting_name(name, args)}: {message[:1].lower()}{message[1:]}{shown}")
    return "; ".join(problems)


def _unparsable_setting(exc: SettingsError) -> str:
    found = re.search(r'field "(\w+)"', str(exc))
    if found is None:
        return f"invalid settings: {exc}"
    return (
        f"invalid settings: MCP_POLICY_{found[1].upper()}: not valid JSON (lists and maps "
        'are given as JSON in the environment, e.g. \'["a", "b"]\' or \'{"k": "v"}\')'
    )


if __name__ == "__main__":
    sys.exit(main())
