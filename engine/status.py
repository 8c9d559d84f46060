"""`mcp-policy status`: a terminal summary of a running service, from GET /v1/status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from engine.errors import EngineError


def fetch(url: str, token: str, hours: float) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/status?hours={hours:g}",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - operator's URL
            body: dict[str, Any] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        raise EngineError(f"{url} answered {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise EngineError(f"cannot reach {url}: {exc}") from exc


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())  # one line, whatever the record held
    return text if len(text) <= width else text[: width - 1] + "…"


def render(summary: dict[str, Any], hours: float) -> str:
    verdicts = summary.get("verdicts", {})
    lines = [
        f"mcp-policy status — last {hours:g} h (since {summary['since']})",
        "",
        f"calls {summary['calls']:>8}   "
        + "   ".join(
            f"{verdict} {verdicts.get(verdict, 0)}"
            for verdict in ("allow", "deny", "rate_limited", "approval_required")
        ),
        "",
        "denials by rule",
    ]
    lines += [f"  {_clip(d['rule'], 50):<50} {d['count']:>7}" for d in summary["denials_by_rule"]]
    lines += ["  (none)"] if not summary["denials_by_rule"] else []
    approvals = summary.get("approvals_required_by_rule", [])
    lines += ["", "approvals required by rule"]
    lines += [f"  {_clip(a['rule'], 50):<50} {a['count']:>7}" for a in approvals]
    lines += ["  (none)"] if not approvals else []
    lines += ["", "top tools"]
    lines += [f"  {_clip(t['tool'], 50):<50} {t['count']:>7}" for t in summary["top_tools"]]
    lines += ["  (none)"] if not summary["top_tools"] else []
    pending = summary.get("pending_approvals", [])
    lines += ["", f"pending approvals ({len(pending)})"]
    for approval in pending:
        principal = approval["principal"]
        lines.append(
            f"  {approval['id']}  {_clip(approval['tool'], 30)}  session "
            f"{_clip(principal['session_id'], 20)}  "
            f"agent {_clip(principal.get('agent_id') or '-', 20)}"
            f"  expires {approval['expires_at']}\n      {_clip(approval['reason'], 110)}"
        )
    lines += ["", "recent denials"]
    for record in summary["recent_denials"]:
        lines.append(
            f"  {record['time']}  {record['verdict']:<17} {_clip(record['tool'], 30):<30} "
            f"{_clip(record['rule'], 40)}\n      {_clip(record['reason'], 110)}"
        )
    lines += ["  (none)"] if not summary["recent_denials"] else []
    return "\n".join(lines)
