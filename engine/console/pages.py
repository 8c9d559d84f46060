"""Rendering the console's pages: one Jinja2 environment, autoescaping every template.

Everything a caller sent (tool arguments, reasons, comments, ids) reaches a page only
through a template expression, which escapes it; nothing here marks text as safe. The
filters turn approvals into what a person reads: times in UTC and relative to now,
arguments as indented JSON with long values folded (`fold_arguments`).

`render(request, name, context, status)` answers a page with the console's security
headers (set by the app's middleware) and `sign_in_page(...)` the sign-in form, with an
error when there is one (also for the OpenID Connect routes).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from engine.console import session as sessions

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PRE_COOKIE = "mcp_policy_console_pre"  # the sign-in form's CSRF token (double submit)
PRE_COOKIE_SECONDS = 3600
SHORT_VALUE_CHARS = 80  # argument values longer than this (as JSON) are folded
FOLDED_PREVIEW_CHARS = 60
MAX_SHOWN_CHARS = 20_000  # a folded value's JSON shown up to this, then cut


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["relative"] = relative
    env.filters["iso"] = iso
    env.filters["pretty"] = pretty
    env.globals["fold_arguments"] = fold_arguments
    return env


def iso(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def when(moment: datetime | None) -> str:
    """`moment` as people read it, in UTC."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds and minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} days"


def relative(moment: datetime | None, now: datetime | None = None) -> str:
    """ "in 4 min" or "2 h 5 min ago"."""
    if moment is None:
        return ""
    delta = (moment - (now or datetime.now(UTC))).total_seconds()
    return f"in {_span(delta)}" if delta >= 0 else f"{_span(delta)} ago"


def pretty(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)
    if len(text) > MAX_SHOWN_CHARS:
        return text[:MAX_SHOWN_CHARS] + f"\n… ({len(text) - MAX_SHOWN_CHARS} more characters)"
    return text


@dataclass(frozen=True)
class Argument:
    """One top-level argument: `short` is set when it fits on a line, else `preview` and
    `full` (its indented JSON) are shown folded."""

    name: str
    short: str | None
    preview: str
    full: str


def fold_arguments(arguments: dict[str, Any]) -> list[Argument]:
    out = []
    for name, value in arguments.items():
        compact = json.dumps(value, ensure_ascii=False, default=str)
        if len(compact) <= SHORT_VALUE_CHARS and "\n" not in compact:
            out.append(Argument(str(name), compact, compact, compact))
            continue
        preview = compact[:FOLDED_PREVIEW_CHARS] + "…"
        out.append(Argument(str(name), None, preview, pretty(value)))
    return out


ENV = _environment()


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """The page `name` with `context` (plus what every page shows: who is signed in and
    their CSRF token)."""
    signed_in = context.get("session")
    if signed_in is None and "session" not in context:
        signed_in = sessions.current(request, touch=False)
    page = ENV.get_template(name).render(
        {
            "session": signed_in,
            "csrf_field": sessions.CSRF_FIELD,
            "csrf": signed_in.csrf if signed_in is not None else "",
            "path": request.url.path,
            "base": sessions.store_of(request).base,
            **context,
        }
    )
    return HTMLResponse(page, status_code=status)


def sign_in_page(
    request: Request,
    *,
    error: str | None = None,
    status: int = 200,
    next_url: str | None = None,
) -> HTMLResponse:
    """The sign-in form (with `error` shown when given), for `next_url` after sign-in.

    Sets a fresh form token (`PRE_COOKIE`, checked by the sign-in POST as a double
    submit) each time it is shown."""
    token = secrets.token_urlsafe(32)
    settings = request.app.state.settings
    oidc_issuer = (
        settings.approver_issuer if getattr(settings, "console_oidc_client_id", None) else None
    )
    response = render(
        request,
        "sign_in.html",
        {
            "session": None,
            "error": error,
            "next": sessions.safe_next(next_url, sessions.store_of(request).base),
            "form_token": token,
            "oidc_issuer": oidc_issuer,
        },
        status,
    )
    sessions.set_cookie(
        sessions.store_of(request),
        response,
        PRE_COOKIE,
        token,
        max_age=PRE_COOKIE_SECONDS,
        lax=False,
    )
    return response


def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    return render(
        request, "error.html", {"status": status, "title": title, "message": message}, status
    )
