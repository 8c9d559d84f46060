"""`mcp-policy keys`, `mcp-policy clients` and `mcp-policy approvers`: add, list, revoke.

`add_identity_commands(subparsers)` adds the three commands to the `mcp-policy` parser;
`run_identity_command(args)` runs whichever was chosen. Each manages one hashed-credential
file (keys.yaml, clients.yaml, approvers.yaml in the state directory, or --file): `add`
prints the new secret once on stdout (nothing else goes there, so a script can capture
it), `list` shows the first 8 hex digits of each hash and never a secret, `revoke` marks
an entry revoked; a running service stops accepting it within seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.identity.secrets_file import Kind, SecretEntry, add_entry, list_entries, revoke_entry
from engine.settings import _default_state_dir

IDENTITY_COMMANDS = ("keys", "clients", "approvers")
EXIT_ERROR = 3


@dataclass(frozen=True)
class _Command:
    kind: Kind
    file_name: str
    what: str  # one credential, in words
    holder: str  # who holds one


_COMMANDS = {
    "keys": _Command("api_key", "keys.yaml", "API key", "an agent"),
    "clients": _Command("client_token", "clients.yaml", "client token", "a proxy or gateway"),
    "approvers": _Command("approver", "approvers.yaml", "approver credential", "a person"),
}


def _file_options(parser: argparse.ArgumentParser, command: _Command) -> None:
    parser.add_argument(
        "--file",
        type=Path,
        help=f"the {command.what}s file (default: {command.file_name} in the state directory)",
    )
    parser.add_argument("--state-dir", type=Path, help="state directory (MCP_POLICY_STATE_DIR)")


def add_identity_commands(subparsers: Any) -> None:
    """Add `keys`, `clients` and `approvers` to the `mcp-policy` subcommands."""
    for name, command in _COMMANDS.items():
        parser = subparsers.add_parser(
            name,
            help=f"manage {command.what}s ({command.holder}): add, list, revoke",
            description=f"Manage the {command.what}s file. Secrets are stored only as "
            "SHA-256 hashes; `add` prints the new secret once.",
        )
        parser.set_defaults(identity_command=name)
        actions = parser.add_subparsers(dest="identity_action", required=True)

        add = actions.add_parser(
            "add",
            help=f"add a named {command.what}; prints its secret once",
            description=f"Add a named {command.what} and print its secret on stdout, once.",
        )
        add.add_argument("name", metavar="NAME", help="a unique name (letters, digits, ._@:-)")
        if command.kind == "api_key":
            add.add_argument("--agent-id", help="principal.agent_id it proves (default: NAME)")
            add.add_argument("--user-id", help="principal.user_id it proves")
            add.add_argument(
                "--role",
                dest="roles",
                action="append",
                metavar="ROLE",
                help="a role it proves; repeat for several",
            )
        if command.kind == "approver":
            add.add_argument(
                "--user-id",
                help="the user the approver is, for the four-eyes rule (default: NAME)",
            )
            add.add_argument(
                "--server",
                dest="servers",
                action="append",
                metavar="SERVER",
                help="may approve calls to this MCP server only; repeat for several",
            )
            add.add_argument(
                "--tool",
                dest="tools",
                action="append",
                metavar="TOOL",
                help="may approve calls of this tool only; repeat for several",
            )
            add.add_argument(
                "--operator",
                action="store_true",
                help="may also read the decision log and status and reload the policy",
            )
            add.add_argument(
                "--caller-only",
                action="store_true",
                help="a user, not an approver: may decide only the calls of their own agents "
                "that the policy lets the caller approve (approval: {by: caller})",
            )
        _file_options(add, command)

        listing = actions.add_parser(
            "list", help=f"list the {command.what}s (names and hash prefixes, never secrets)"
        )
        _file_options(listing, command)

        revoke = actions.add_parser("revoke", help=f"revoke the {command.what} named NAME")
        revoke.add_argument("name", metavar="NAME")
        _file_options(revoke, command)


def _path(args: argparse.Namespace, command: _Command) -> Path:
    if args.file is not None:
        path: Path = args.file
        return path
    state = args.state_dir or os.environ.get("MCP_POLICY_STATE_DIR") or _default_state_dir()
    return Path(state) / command.file_name


def run_identity_command(args: argparse.Namespace) -> int:
    """Run the command `add_identity_commands` parsed; the process exit status."""
    name: str = args.identity_command
    command = _COMMANDS[name]
    action: str = args.identity_action
    path = _path(args, command)
    try:
        if action == "add":
            return _add(args, name, command, path)
        if action == "list":
            return _list(name, command, path)
        entry = revoke_entry(path, args.name)
        print(
            f"mcp-policy {name}: {entry.name} revoked in {path} (running services stop "
            "accepting it within seconds)"
        )
        return 0
    except EngineError as exc:
        print(f"mcp-policy {name} {action}: {exc.message}", file=sys.stderr)
    except OSError as exc:
        where = exc.filename or path
        print(f"mcp-policy {name} {action}: {where}: {exc.strerror}", file=sys.stderr)
    return EXIT_ERROR


def _add(args: argparse.Namespace, name: str, command: _Command, path: Path) -> int:
    fields: dict[str, Any] = {}
    if command.kind == "api_key":
        fields = {"agent_id": args.agent_id or args.name, "user_id": args.user_id}
        fields["roles"] = args.roles
    elif command.kind == "approver":
        fields = {"user_id": args.user_id or args.name}
        fields["servers"] = args.servers
        fields["tools"] = args.tools
        roles = (["operator"] if args.operator else []) + (["caller"] if args.caller_only else [])
        fields["roles"] = roles or None
    secret = add_entry(path, command.kind, args.name, **fields)
    print(secret, flush=True)
    print(
        f"mcp-policy {name}: added {args.name} to {path}; the {command.what} above is shown "
        "only this once (only its SHA-256 is kept)",
        file=sys.stderr,
    )
    return 0


def _list(name: str, command: _Command, path: Path) -> int:
    if not path.exists():
        print(
            f"mcp-policy {name} list: {path}: no such file (create it with "
            f"`mcp-policy {name} add NAME`)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    entries = list_entries(path)
    if not entries:
        print(f"no {command.what}s in {path}")
        return 0
    columns = ["NAME", "SHA256"]
    if command.kind == "api_key":
        columns += ["AGENT", "USER", "ROLES"]
    elif command.kind == "approver":
        columns += ["USER", "SERVERS", "TOOLS"]
    columns += ["CREATED", "STATUS"]
    rows = [columns, *(_row(entry, columns) for entry in entries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _words(values: tuple[str, ...] | None) -> str:
    if values is None:
        return "*"
    return ",".join(values) or "-"


def _row(entry: SecretEntry, columns: list[str]) -> list[str]:
    cells = {
        "NAME": entry.name,
        "SHA256": entry.sha256[:8],
        "AGENT": entry.agent_id or "-",
        "USER": entry.user_id or "-",
        "ROLES": ",".join(entry.roles) or "-",
        "SERVERS": _words(entry.servers),
        "TOOLS": _words(entry.tools),
        "CREATED": entry.created or "-",
        "STATUS": f"revoked {entry.revoked_at or ''}".rstrip() if entry.revoked else "active",
    }
    return [cells[column] for column in columns]
