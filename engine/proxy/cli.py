"""`mcp-policy proxy`, `mcp-policy scan` and `mcp-policy validate`.

`add_proxy_commands(subparsers)` adds the three commands to the `mcp-policy` parser;
`run_proxy_command(args)` runs whichever was chosen. Until they are wired into
`engine/cli.py`, `python -m engine.proxy.cli <command> ...` runs them the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from engine.errors import PolicyRejected
from engine.identity.base import IdentityUnavailable
from engine.policy.opa_process import ToolMissing
from engine.settings import PROJECT_ROOT, Settings

if TYPE_CHECKING:
    from engine.proxy.auth import AuthConfig, ResourceServer
    from engine.proxy.elicitation import ElicitationOptions
    from engine.proxy.serve import SessionLimits, UpstreamSpec

# The commands import the proxy (and the MCP SDK) only when they run, so `mcp-policy
# serve` and `decide` start as fast as before.

PROXY_COMMANDS = ("proxy", "scan", "validate")
EXIT_USAGE = 2
EXIT_TOOL_MISSING = 2  # a program the proxy runs (OPA) is not installed
EXIT_POLICY_REJECTED = 2
EXIT_CANNOT_CONNECT = 1
# --result-policy: its values (engine.proxy.core.RESULT_POLICIES) and its variable.
RESULT_POLICIES = ("enforce", "dry-run")
RESULT_POLICY_ENV = "MCP_PROXY_RESULT_POLICY"

PROXY_EPILOG = """\
examples:
  mcp-policy proxy --embedded -- uvx awslabs.healthimaging-mcp-server@latest
  mcp-policy proxy --decision-url 127.0.0.1:50051 --listen 127.0.0.1:8000 \\
      --upstream https://mcp.example.com/mcp --header 'Authorization: Bearer ...'

Point the MCP client at the proxy: run it as the server command (stdio), or use
http://HOST:PORT/mcp with --listen. A client that can open a URL for its user (URL-mode
elicitation: protocol 2025-11-25, or 2026-07-28) is sent to the approval's page in the
console when a call needs approval, and the call goes through once it is approved. Other
clients read the refusal: call the same tool again, unchanged, once approved (the proxy
uses the granted approval), or pass the approval id in
params._meta["mcp-policy/approval_id"].

The server's answer to an allowed call goes through the result policy before the agent
sees it: passed as it came, redacted (e.g. patient attributes in DICOM metadata), or
withheld with the reason (isError); when the result decision cannot be had, it is withheld.
--result-policy dry-run asks for the result decision as a dry run (the decision log shows
what would have happened) and forwards every answer as it came: for rolling out result rules.
"""


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more seconds")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _principal_id(text: str) -> str:
    from engine.models import principal_id_problem

    problem = principal_id_problem(text) if text else "is empty"
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def _pem_file(text: str) -> bytes:
    """The contents of a PEM file given on the command line."""
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror or exc}") from exc


def _embedded_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("embedded decision service (--embedded)")
    group.add_argument(
        "--policy",
        type=Path,
        action="append",
        help="a directory of Rego and YAML to load; repeat for several "
        "(default: the shipped rego/ and policies/)",
    )
    group.add_argument("--state-dir", type=Path, help="state directory (MCP_POLICY_STATE_DIR)")
    group.add_argument("--decision-log", help='decision log file, "-" for stderr, "off"')
    group.add_argument("--opa-url", help="use this OPA instead of starting one")
    group.add_argument("--opa-binary", help="OPA binary to start (MCP_POLICY_OPA_BINARY)")


def _session_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sessions (--listen): each holds an upstream connection (with a command: a child)"
    )
    group.add_argument(
        "--max-sessions",
        type=_count,
        metavar="N",
        help="sessions open at once in all; more get HTTP 503 (default 1000)",
    )
    group.add_argument(
        "--max-sessions-per-principal",
        type=_count,
        metavar="N",
        help="sessions one principal (the agent and user --auth-* proves, else the client's "
        "address) may have open at once; more get HTTP 429 (default 10)",
    )
    group.add_argument(
        "--session-idle-timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="close a session with no request in flight for this long, freeing its place "
        "(default 1800)",
    )


def _session_limits(args: argparse.Namespace) -> tuple[SessionLimits | None, str | None]:
    """The --max-sessions* and --session-idle-timeout settings, or what is wrong."""
    from engine.proxy.serve import SessionLimits

    limits = SessionLimits(
        max_sessions=args.max_sessions,
        max_sessions_per_principal=args.max_sessions_per_principal,
        idle_timeout=args.session_idle_timeout,
    )
    if limits == SessionLimits():
        return None, None
    if args.listen is None:
        return None, "--max-sessions* and --session-idle-timeout go with --listen"
    return limits, None


def _guard_entry(kind: str) -> Callable[[str], str]:
    """An argparse type: the text, once the guard's parser for `kind` (origin, host) took it."""

    def checked(text: str) -> str:
        from engine.transports.guard import parse_host, parse_origin

        try:
            (parse_origin if kind == "origin" else parse_host)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        return text

    return checked


def _guard_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "browsers and DNS rebinding (--listen): a request with an Origin header must come "
        "from the listener's own origin or an --allowed-origin (else 403); on loopback or "
        "without --auth-*, its Host must be a loopback name, the listener's address or an "
        "--allowed-host (else 421)"
    )
    group.add_argument(
        "--allowed-origin",
        action="append",
        type=_guard_entry("origin"),
        metavar="ORIGIN",
        help="a web origin (scheme://host[:port]) whose pages may call the proxy; repeat "
        "for several",
    )
    group.add_argument(
        "--allowed-host",
        action="append",
        type=_guard_entry("host"),
        metavar="HOST",
        help="a Host the listener answers (name: any port, name:port: that port), e.g. the "
        "name clients reach it by; repeat for several",
    )


def _auth_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "agent authentication (--listen): every request needs Authorization: Bearer <token>"
    )
    group.add_argument(
        "--auth-issuer",
        metavar="URL",
        help="accept JWTs this OAuth 2.1 / OIDC issuer signed (its JWKS from its metadata)",
    )
    group.add_argument(
        "--auth-audience",
        metavar="URL",
        help="this resource's URL (RFC 8707), which JWTs must name in aud; with --auth-issuer",
    )
    group.add_argument("--auth-jwks", metavar="URL", help="the issuer's JWKS URL (default: found)")
    group.add_argument(
        "--auth-required-scope",
        action="append",
        metavar="SCOPE",
        help="a scope every JWT must carry (else 403); repeat for several",
    )
    group.add_argument(
        "--auth-roles-claim",
        metavar="CLAIM",
        help="the JWT claim holding principal.roles (default: roles; dots for nested)",
    )
    group.add_argument(
        "--auth-leeway",
        type=_seconds,
        metavar="SECONDS",
        help="clock skew allowed on exp/nbf/iat (default 30)",
    )
    group.add_argument(
        "--auth-keys",
        type=Path,
        metavar="FILE",
        help="accept the API keys of this file (`mcp-policy keys add`); a revoked key stops "
        "working within seconds",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="serve --listen on a non-loopback address without authentication",
    )


def _auth_config(args: argparse.Namespace) -> tuple[AuthConfig | None, str | None]:
    """The --auth-* settings (None without any), or what is wrong with them."""
    from engine.proxy.auth import AuthConfig

    given = any(
        getattr(args, name) is not None
        for name in (
            "auth_issuer",
            "auth_audience",
            "auth_jwks",
            "auth_required_scope",
            "auth_roles_claim",
            "auth_leeway",
            "auth_keys",
        )
    )
    if not given:
        return None, None
    if args.listen is None:
        return None, "--auth-* go with --listen (stdio has no bearer tokens)"
    if args.auth_issuer is None and (
        args.auth_roles_claim is not None or args.auth_leeway is not None
    ):
        return None, "--auth-roles-claim and --auth-leeway go with --auth-issuer"
    config = AuthConfig(
        issuer=args.auth_issuer,
        audience=args.auth_audience,
        jwks_url=args.auth_jwks,
        required_scopes=tuple(args.auth_required_scope or ()),
        roles_claim=args.auth_roles_claim or "roles",
        leeway_seconds=30.0 if args.auth_leeway is None else args.auth_leeway,
        keys_file=args.auth_keys,
    )
    return config, config.problem()


def _upstream_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", "--url", dest="url", metavar="URL", help="MCP server URL")
    parser.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="HTTP header for the upstream URL (e.g. auth); repeat for several",
    )
    parser.add_argument(
        "server_command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the MCP server to run as a child, after --",
    )


def add_proxy_commands(subparsers: Any) -> None:
    """Add `proxy`, `scan` and `validate` to the `mcp-policy` subcommands."""
    proxy = subparsers.add_parser(
        "proxy",
        help="enforce decisions in front of an MCP server (stdio or streamable HTTP)",
        description="Relay MCP between an agent and a server; every tools/call is decided "
        "first, and the answer to an allowed one before the agent sees it. The agent talks "
        "MCP on stdin/stdout, or over streamable HTTP with --listen. "
        "The server is a command after --, or --upstream URL.",
        epilog=PROXY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy.add_argument(
        "--listen", type=_host_port, metavar="HOST:PORT", help="serve streamable HTTP here"
    )
    proxy.add_argument("--path", default="/mcp", help="MCP endpoint path with --listen")
    _session_options(proxy)
    _upstream_options(proxy)
    where = proxy.add_mutually_exclusive_group()
    where.add_argument(
        "--decision-url", metavar="HOST:PORT", help="the decision service's gRPC address"
    )
    where.add_argument(
        "--embedded", action="store_true", help="run the decision service in this process"
    )
    proxy.add_argument(
        "--decision-timeout", type=_seconds, default=5.0, help="gRPC deadline (default 5 s)"
    )
    tls = proxy.add_argument_group("TLS to the decision service (--decision-url)")
    tls.add_argument(
        "--decision-ca",
        type=_pem_file,
        metavar="FILE",
        help="PEM CA certificate(s) to verify the service by; turns TLS on "
        "(default with a client certificate: the system's roots)",
    )
    tls.add_argument(
        "--decision-cert",
        type=_pem_file,
        metavar="FILE",
        help="PEM client certificate for mTLS (with --decision-key)",
    )
    tls.add_argument(
        "--decision-key", type=_pem_file, metavar="FILE", help="PEM key of --decision-cert"
    )
    tls.add_argument(
        "--decision-token-env",
        metavar="VAR",
        default="MCP_POLICY_CLIENT_TOKEN",
        help="environment variable holding this proxy's client token for the decision "
        "service (mcp-policy clients add), sent as a bearer token; default %(default)s",
    )
    _auth_options(proxy)
    _guard_options(proxy)
    proxy.add_argument(
        "--server-name",
        help="MCP server name in decisions (default: the serverInfo.name the server reports)",
    )
    proxy.add_argument("--agent-id", type=_principal_id, help="principal.agent_id of the decisions")
    proxy.add_argument("--user-id", type=_principal_id, help="principal.user_id of the decisions")
    proxy.add_argument(
        "--approval-wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="on approval_required, wait this long for a human before answering (default 0)",
    )
    # The old wait (decide the call again every SECONDS, each a logged decision), kept as
    # the baseline of bench/approval_wait.py; the default waits on AwaitApproval.
    proxy.add_argument(
        "--approval-poll",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help=argparse.SUPPRESS,
    )
    elicit = proxy.add_argument_group(
        "asking the agent's user (URL-mode elicitation): a client that declared it is sent "
        "to the approval's page in the console"
    )
    elicit.add_argument(
        "--no-elicitation",
        action="store_true",
        help="never ask the client; answer approval_required as to a client without it",
    )
    elicit.add_argument(
        "--elicitation-wait",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="hold a call this long at most for its approval after the client's user was "
        "sent to the page (never past the approval's expiry; default 900); 0 holds none "
        "(2025-11-25 clients then get the URLElicitationRequiredError, -32042)",
    )
    elicit.add_argument(
        "--elicitation-secret-env",
        metavar="VAR",
        default="MCP_POLICY_ELICITATION_SECRET",
        help="environment variable holding the secret (32 bytes or more) the proxy signs "
        "2026-07-28 requestStates with; replicas behind one address share it (default "
        "%(default)s; unset: a random secret per process)",
    )
    proxy.add_argument(
        "--upstream-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long a tools/call may take upstream (default 60)",
    )
    proxy.add_argument(
        "--result-policy",
        choices=RESULT_POLICIES,
        default=None,
        help="enforce: hand the agent each allowed call's answer as the result policy says "
        "(passed, redacted or withheld); dry-run: ask for the result decision as a dry run "
        "(logged: what would have happened) and forward every answer as it came, to try "
        f"result rules before enforcing them (default: ${RESULT_POLICY_ENV}, else enforce)",
    )
    proxy.add_argument(
        "--show-all-tools",
        action="store_true",
        help="do not hide tools the policy always denies from tools/list",
    )
    proxy.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default), ERROR")
    _embedded_options(proxy)
    proxy.set_defaults(proxy_main=_proxy)

    scanner = subparsers.add_parser(
        "scan",
        help="list an MCP server's tools and write a policy scaffold for them",
        description="Connect to an MCP server (a command after --, or --url URL), list its "
        "tools and write the policy catalog for them: category and risk guessed from each "
        "tool's annotations, else its name, each marked as a guess; with --cases, starter "
        "table tests too.",
    )
    _upstream_options(scanner)
    scanner.add_argument("--out", type=Path, help="write the catalog file here (default: stdout)")
    scanner.add_argument("--server-name", help="server name in the catalog (default: reported)")
    scanner.add_argument("--timeout", type=_seconds, default=60.0, help="give up after (s)")
    scanner.add_argument(
        "--policy",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a directory of the policy the tools join (repeat for several; default: the "
        "shipped rego/ and policies/); the framework's Rego is added when none has it",
    )
    scanner.add_argument(
        "--skip-catalogued",
        action="store_true",
        help="leave out the tools the --policy data already catalogues for this server (or "
        'for any server, "*"), so the file merges without a clash',
    )
    scanner.add_argument(
        "--cases",
        type=Path,
        metavar="FILE",
        help="also write a starter table-test file (*.cases.yaml, outside the policy "
        "directories) with a case per catalogued tool, expecting what the policy decides",
    )
    scanner.set_defaults(proxy_main=_scan)

    checker = subparsers.add_parser(
        "validate",
        help="check policy YAML and Rego with OPA; print every error with its place",
        description="Check policy files (directories or files; default: the shipped rego/ "
        "and policies/) as the service would load them. Exit 0 when valid.",
    )
    checker.add_argument("paths", nargs="*", type=Path, help="policy directories or files")
    checker.add_argument("--opa-binary", default="opa", help="OPA binary to start")
    checker.set_defaults(proxy_main=_validate)


def run_proxy_command(args: argparse.Namespace) -> int:
    """Run the command `add_proxy_commands` parsed; the process exit status."""
    result: int = args.proxy_main(args)
    return result


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.server_command or [])
    if command and command[0] == "--":
        command = command[1:]
    return command


def _upstream_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with how the command line names the MCP server, or None."""
    if bool(_command(args)) == bool(args.url):
        return "give the MCP server as a command after --, or --upstream URL (one of the two)"
    if args.header and not args.url:
        return "--header goes with --upstream URL"
    return None


def _upstream(args: argparse.Namespace) -> UpstreamSpec:
    """The MCP server the command line names (checked by `_upstream_problem`)."""
    from engine.proxy.serve import UpstreamSpec

    return UpstreamSpec(command=_command(args), url=args.url, headers=dict(args.header))


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("state_dir", "decision_log", "opa_url", "opa_binary", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.policy:
        overrides["policy_paths"] = args.policy
    return Settings(**overrides)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _proxy(args: argparse.Namespace) -> int:
    problem = _upstream_problem(args)
    if problem is not None:
        print(f"mcp-policy proxy: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not args.embedded and not args.decision_url:
        print("mcp-policy proxy: give --decision-url HOST:PORT or --embedded", file=sys.stderr)
        return EXIT_USAGE
    tls_flags = (args.decision_ca, args.decision_cert, args.decision_key)
    if args.embedded and any(flag is not None for flag in tls_flags):
        print("mcp-policy proxy: --decision-ca/-cert/-key go with --decision-url", file=sys.stderr)
        return EXIT_USAGE
    if (args.decision_cert is None) != (args.decision_key is None):
        print("mcp-policy proxy: --decision-cert and --decision-key go together", file=sys.stderr)
        return EXIT_USAGE
    sessions, problem = _session_limits(args)
    if problem is not None:
        print(f"mcp-policy proxy: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if (args.allowed_origin or args.allowed_host) and args.listen is None:
        print(
            "mcp-policy proxy: --allowed-origin and --allowed-host go with --listen",
            file=sys.stderr,
        )
        return EXIT_USAGE
    resource = _resource_server(args)
    if isinstance(resource, int):
        return resource
    upstream = _upstream(args)
    # The proxy itself (and the MCP SDK) only once the command line is known to be good.
    from engine.proxy.core import ProxyOptions
    from engine.proxy.decider import Decider, DecisionUnavailable, ProxyUnknown
    from engine.proxy.serve import run_http, run_stdio

    try:
        settings = _settings(args) if args.embedded else None
    except ValidationError as exc:
        print(f"mcp-policy proxy: invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    elicitation = _elicitation(args)
    if isinstance(elicitation, int):
        return elicitation
    result_policy = args.result_policy or os.environ.get(RESULT_POLICY_ENV) or "enforce"
    if result_policy not in RESULT_POLICIES:
        print(
            f"mcp-policy proxy: {RESULT_POLICY_ENV} must be {' or '.join(RESULT_POLICIES)}, "
            f"not {result_policy!r}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    _logging(args.log_level or "WARNING")
    options = ProxyOptions(
        server_name=args.server_name,
        agent_id=args.agent_id,
        user_id=args.user_id,
        approval_wait=args.approval_wait,
        approval_poll=args.approval_poll,
        upstream_timeout=args.upstream_timeout,
        filter_tools=not args.show_all_tools,
        result_policy=result_policy,
        elicitation=elicitation,
    )
    if settings is not None:
        options = replace(options, max_json_depth=settings.max_json_depth)

    async def main() -> int:
        decider: Decider
        if settings is not None:
            from engine.proxy.embedded import EmbeddedDecider

            decider = await EmbeddedDecider.start(settings)
        else:
            from engine.proxy.grpc_decider import GrpcDecider

            decider = GrpcDecider(
                args.decision_url,
                timeout=args.decision_timeout,
                tls_ca=args.decision_ca,
                tls_cert=args.decision_cert,
                tls_key=args.decision_key,
                client_token=os.environ.get(args.decision_token_env) or None,
            )
        try:
            if args.listen is not None:
                host, port = args.listen
                return await run_http(
                    decider,
                    options,
                    upstream,
                    host=host,
                    port=port,
                    path=args.path,
                    auth=resource,
                    insecure=args.insecure,
                    sessions=sessions,
                    allowed_origins=args.allowed_origin or (),
                    allowed_hosts=args.allowed_host or (),
                )
            return await run_stdio(decider, options, upstream)
        finally:
            await decider.close()

    try:
        return asyncio.run(main())
    except PolicyRejected as exc:
        print(f"mcp-policy proxy: policy rejected: {exc.message}", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_POLICY_REJECTED
    except IdentityUnavailable as exc:  # the keys file, or the issuer's metadata or JWKS
        print(f"mcp-policy proxy: cannot check credentials: {exc.message}", file=sys.stderr)
        return EXIT_CANNOT_CONNECT
    except ProxyUnknown as exc:
        print(f"mcp-policy proxy: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except DecisionUnavailable as exc:  # asked before serving: the service is unreachable
        print(f"mcp-policy proxy: {exc.message}", file=sys.stderr)
        return EXIT_CANNOT_CONNECT
    except ToolMissing as exc:
        print(f"mcp-policy proxy: {exc.message}", file=sys.stderr)
        return EXIT_TOOL_MISSING


def _elicitation(args: argparse.Namespace) -> ElicitationOptions | int:
    """The elicitation options, or the exit status after printing what is wrong."""
    from engine.proxy.elicitation import DEFAULT_WAIT, ElicitationOptions, RequestStates

    if args.no_elicitation and args.elicitation_wait is not None:
        print("mcp-policy proxy: --elicitation-wait goes without --no-elicitation", file=sys.stderr)
        return EXIT_USAGE
    try:
        states = RequestStates.from_environment(args.elicitation_secret_env)
    except ValueError as exc:
        print(f"mcp-policy proxy: {args.elicitation_secret_env}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    wait = DEFAULT_WAIT if args.elicitation_wait is None else args.elicitation_wait
    return ElicitationOptions(enabled=not args.no_elicitation, wait=wait, states=states)


def _resource_server(args: argparse.Namespace) -> ResourceServer | None | int:
    """The --auth-* resource server (not started), None without any, or the exit status
    after printing why the listener must not start."""
    from engine.proxy.auth import ResourceServer, check_exposure

    config, problem = _auth_config(args)
    if problem is not None:
        print(f"mcp-policy proxy: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.listen is not None:
        refused = check_exposure(
            args.listen[0], authenticated=config is not None, insecure=args.insecure
        )
        if refused is not None:
            print(f"mcp-policy proxy: {refused}", file=sys.stderr)
            return EXIT_USAGE
    if config is None:
        return None
    try:
        return ResourceServer(config, path=args.path)
    except ValueError as exc:
        print(f"mcp-policy proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _scan(args: argparse.Namespace) -> int:
    from engine.authoring.scan import Scanned, scan, write

    problem = _upstream_problem(args)
    if problem is not None:
        print(f"mcp-policy scan: {problem}", file=sys.stderr)
        return EXIT_USAGE
    upstream = _upstream(args)

    async def main() -> Scanned:
        async with asyncio.timeout(args.timeout):
            return await scan(upstream.command, upstream.url, upstream.headers)

    try:
        scanned = asyncio.run(main())
    except Exception as exc:  # the server could not be started, reached or listed
        reason = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else exc
        print(f"mcp-policy scan: could not list the server's tools: {reason!r}", file=sys.stderr)
        return EXIT_CANNOT_CONNECT
    try:
        return asyncio.run(write(scanned, args, sys.stderr))
    except ToolMissing as exc:
        print(f"mcp-policy scan: {exc.message}", file=sys.stderr)
        return EXIT_TOOL_MISSING


def _validate(args: argparse.Namespace) -> int:
    from engine.authoring.validate import validate

    paths = args.paths or [PROJECT_ROOT / "rego", PROJECT_ROOT / "policies"]
    defaults: dict[str, Any] = {}
    schema = Settings(**defaults).policy_schema  # MCP_POLICY_POLICY_SCHEMA, or the shipped one
    try:
        report = asyncio.run(validate(paths, opa_binary=args.opa_binary, schema=schema))
    except ToolMissing as exc:
        print(f"mcp-policy validate: {exc.message}", file=sys.stderr)
        return EXIT_TOOL_MISSING
    where = ", ".join(str(p) for p in paths)
    if report.valid:
        print(
            f"mcp-policy validate: ok ({report.modules} Rego modules, "
            f"{report.data_files} data files in {where})"
        )
        return 0
    print(f"mcp-policy validate: {len(report.errors)} error(s) in {where}")
    for error in report.errors:
        print(f"  {error}")
    return EXIT_POLICY_REJECTED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-policy", description=__doc__)
    add_proxy_commands(parser.add_subparsers(dest="command", required=True))
    return run_proxy_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
