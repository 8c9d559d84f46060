"""Listing queries as both transports take them: validated once, with opaque page tokens.

A page token names where the previous page ended; it is opaque to clients (base64url of a
versioned position), so the storage behind it can change without breaking them, and a
token that was not made here is refused as invalid rather than read as a row id.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Any

from engine import jsonstrict
from engine.errors import InvalidRequest
from engine.models import Verdict
from engine.state.decision_log import DecisionQuery

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_FILTER_LENGTH = 256
_TOKEN = re.compile(r"d1:([0-9]{1,18})")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_MAX_TOKEN_LENGTH = 64


def encode_token(position: int) -> str:
    return base64.urlsafe_b64encode(f"d1:{position}".encode()).decode().rstrip("=")


def decode_token(token: str, *, field: str) -> int:
    """The position a page token names; InvalidRequest for anything not made here."""
    invalid = InvalidRequest(f"{field}: not a token from a previous page", field=field)
    if len(token) > _MAX_TOKEN_LENGTH or not _BASE64URL.fullmatch(token):
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError) as exc:
        raise invalid from exc
    match = _TOKEN.fullmatch(raw)
    if match is None:
        raise invalid
    return int(match.group(1))


def page_size(value: int | None, *, field: str) -> int:
    """0 or absent: the default; otherwise 1 to MAX_PAGE_SIZE."""
    if not value:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"{field}: must be between 1 and {MAX_PAGE_SIZE}", field=field)
    return value


def _filter(value: str | None, field: str) -> str | None:
    if not value:
        return None
    if len(value) > MAX_FILTER_LENGTH:
        raise InvalidRequest(f"{field}: at most {MAX_FILTER_LENGTH} characters", field=field)
    jsonstrict.check_text(value, what=field)
    return value


def _instant(value: datetime | None, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value.timestamp()
        return value.astimezone(UTC)
    except (OverflowError, ValueError, OSError) as exc:
        raise InvalidRequest(f"{field}: a time out of range", field=field) from exc


def decision_query(
    *,
    session_id: str | None = None,
    agent_id: str | None = None,
    tool: str | None = None,
    verdict: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    token: str | None = None,
    names: dict[str, str] | None = None,
) -> DecisionQuery:
    """Validate a decision-log query; `names` renames fields for messages (per transport)."""
    name: dict[str, Any] = {"limit": "limit", "token": "cursor", **(names or {})}
    if verdict and verdict not in {v.value for v in Verdict}:
        raise InvalidRequest(
            f"verdict: must be one of {', '.join(v.value for v in Verdict)}", field="verdict"
        )
    return DecisionQuery(
        session_id=_filter(session_id, "session_id"),
        agent_id=_filter(agent_id, "agent_id"),
        tool=_filter(tool, "tool"),
        verdict=verdict or None,
        since=_instant(since, "since"),
        until=_instant(until, "until"),
        limit=page_size(limit, field=name["limit"]),
        cursor=decode_token(token, field=name["token"]) if token else None,
    )
