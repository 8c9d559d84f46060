"""`mcp-policy approvals list|show|approve|deny`: the approval API from a terminal.

For approvers who live in a terminal. Each command is one request to a running service's
HTTP API (`--url`, default http://127.0.0.1:8080) with the approver's own credential (the
secret `mcp-policy approvers add` printed, an approver JWT, or the operator token in
single-token mode), from `--token-file` or MCP_POLICY_APPROVER_TOKEN. The service applies
every rule (four eyes, allowed servers and tools, caller approvals, the caps): this command
only shows what it answers. An https URL is checked against the system's CAs (or the
bundle SSL_CERT_FILE names).

Exit status: 0 done; 1 the service refused (its reason is printed: 403 not yours to decide,
404 no such approval, 409 already decided); 3 no credential; 4 the service cannot be
reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_REFUSED = 1
EXIT_INVALID = 3
EXIT_UNAVAILABLE = 4
STATUSES = ("pending", "approved", "denied", "used", "expired", "all")
MAX_VALUE_CHARS = 200


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Unreachable(Exception):
    """The service could not be reached (or answered what is not HTTP)."""


def add_approvals_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "approvals",
        help="list, show, approve and deny approvals of a running service",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    actions = parser.add_subparsers(dest="approvals_action", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--url", default="http://127.0.0.1:8080", help="the service's HTTP URL")
        sub.add_argument(
            "--token-file",
            type=Path,
            help="a file holding your approver credential (default: MCP_POLICY_APPROVER_TOKEN)",
        )

    listing = actions.add_parser("list", help="approvals you may see, newest first")
    listing.add_argument(
        "--status", choices=STATUSES, default="pending", help="which (default: pending)"
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    common(listing)

    show = actions.add_parser("show", help="one approval: the call, who asked, what happened")
    show.add_argument("id", metavar="APPROVAL_ID")
    show.add_argument("--json", action="store_true", help="print it as JSON")
    common(show)

    for verb, what in (("approve", "let the call through, once"), ("deny", "refuse the call")):
        act = actions.add_parser(verb, help=f"{verb} a pending approval: {what}")
        act.add_argument("id", metavar="APPROVAL_ID")
        act.add_argument("--comment", default="", help="why (the agent reads it on a denial)")
        common(act)


def run(args: argparse.Namespace) -> int:
    action: str = args.approvals_action
    prefix = f"mcp-policy approvals {action}"
    token = _token(args)
    if token is None:
        print(
            f"{prefix}: no credential: set MCP_POLICY_APPROVER_TOKEN to your approver "
            "credential or pass --token-file",
            file=sys.stderr,
        )
        return EXIT_INVALID
    api = _Api(args.url, token)
    try:
        if action == "list":
            if args.limit < 1:
                print(f"{prefix}: --limit must be at least 1", file=sys.stderr)
                return EXIT_INVALID
            approvals = api.list(None if args.status == "all" else args.status, args.limit)
            print(json.dumps(approvals, indent=2) if args.json else render_list(approvals))
        elif action == "show":
            approval = api.get(args.id)
            print(json.dumps(approval, indent=2) if args.json else render_one(approval))
        else:
            approval = api.act(args.id, action, args.comment)
            print(f"{approval['id']}: {approval['status']} by {approval.get('approver')}")
    except Refused as exc:
        print(f"{prefix}: refused ({exc.status}): {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except Unreachable as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            text: str = args.token_file.read_text().strip()
        except OSError as exc:
            print(f"cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
            return None
        return text or None
    return os.environ.get("MCP_POLICY_APPROVER_TOKEN") or None


class _Api:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def _call(self, method: str, path: str, body: Any = None) -> tuple[Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return json.load(response), dict(response.headers)
        except urllib.error.HTTPError as exc:
            raise Refused(exc.code, _message(exc.read())) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise Unreachable(f"cannot reach {self.url}: {exc}") from None

    def list(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token: str | None = None
        while len(out) < limit:
            query = {"limit": str(min(limit - len(out), 100))}
            if status is not None:
                query["status"] = status
            if token:
                query["page_token"] = token
            page, headers = self._call("GET", "/v1/approvals?" + urllib.parse.urlencode(query))
            out.extend(page)
            token = headers.get("X-Next-Page-Token") or headers.get("x-next-page-token")
            if not token:
                break
        return out[:limit]

    def get(self, approval_id: str) -> dict[str, Any]:
        approval: dict[str, Any] = self._call("GET", f"/v1/approvals/{_quote(approval_id)}")[0]
        return approval

    def act(self, approval_id: str, verb: str, comment: str) -> dict[str, Any]:
        path = f"/v1/approvals/{_quote(approval_id)}/{verb}"
        approval: dict[str, Any] = self._call("POST", path, {"comment": comment})[0]
        return approval


def _quote(approval_id: str) -> str:
    return urllib.parse.quote(approval_id, safe="")


def _message(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
    return text[:500]


def _clip(text: Any, width: int) -> str:
    """One line of at most `width` characters; anything that is not printable (a terminal
    escape sequence in a reason, say) is shown as U+FFFD, never sent to the terminal."""
    line = " ".join(str(text).split())
    line = "".join(ch if ch.isprintable() else "\ufffd" for ch in line)
    return line if len(line) <= width else line[: width - 1] + "…"


def _expires_in(stamp: str) -> str:
    try:
        left = datetime.fromisoformat(stamp.replace("Z", "+00:00")) - datetime.now(UTC)
    except ValueError:
        return stamp
    seconds = int(left.total_seconds())
    if seconds <= 0:
        return "expired"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _who(approval: dict[str, Any]) -> str:
    principal = approval.get("principal") or {}
    proof = approval.get("principal_proof") or "none"
    proven = {"credential": "proven", "caller": f"proven by {approval.get('asserted_by')}"}
    return (
        f"agent {principal.get('agent_id') or '-'}  user {principal.get('user_id') or '-'}  "
        f"session {principal.get('session_id')}  ({proven.get(proof, 'asserted, not proven')})"
    )


def render_list(approvals: list[dict[str, Any]]) -> str:
    if not approvals:
        return "(no approvals)"
    lines = []
    for approval in approvals:
        lines.append(
            f"{approval['id']}  {approval['status']:<8} {_clip(approval['server'], 34)} "
            f"{_clip(approval['tool'], 30)}  expires in {_expires_in(approval['expires_at'])}"
        )
        lines.append(f"    {_clip(_who(approval), 110)}")
        lines.append(f"    {_clip(approval['reason'], 110)}")
    return "\n".join(lines)


def _fold(value: Any) -> Any:
    """Arguments as shown: long strings cut, so one argument cannot flood the terminal."""
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + f"… ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: _fold(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fold(v) for v in value]
    return value


def render_one(approval: dict[str, Any]) -> str:
    lines = [
        f"{approval['id']}  {approval['status']}",
        f"  call       {_clip(approval['server'], 256)} / {_clip(approval['tool'], 128)}",
        f"  who        {_who(approval)}",
        f"  rule       {_clip(approval['rule'], 256)}",
        f"  reason     {_clip(approval['reason'], 2000)}",
        f"  created    {approval['created_at']}   expires {approval['expires_at']} "
        f"(in {_expires_in(approval['expires_at'])})",
        f"  decision   {approval['decision_id']}",
        f"  decided by {approval.get('approvable_by') or 'approvers'}",
    ]
    if approval.get("approver"):
        lines.append(
            f"  {approval['status']:<10} by {approval['approver']} at {approval.get('decided_at')}"
            f": {_clip(approval.get('comment') or 'no comment', 2000)}"
        )
    if approval.get("used_by_decision"):
        lines.append(f"  used       at {approval.get('used_at')} by {approval['used_by_decision']}")
    if approval.get("url"):
        lines.append(f"  console    {approval['url']}")
    arguments = json.dumps(_fold(approval.get("arguments", {})), indent=2, ensure_ascii=False)
    lines.append("  arguments")
    lines += [f"    {line}" for line in arguments.splitlines()]
    return "\n".join(lines)
