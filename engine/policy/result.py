"""The policy's answer checked as a PolicyResult, the same way for both engines."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from engine.errors import PolicyUnavailable
from engine.models import PolicyResult


def checked_result(value: Any) -> PolicyResult:
    """`data.mcp.decision`'s value as a PolicyResult; a malformed one is PolicyUnavailable
    naming its first three problems."""
    try:
        return PolicyResult.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'decision'}: {e['msg']}"
            for e in exc.errors()[:3]
        )
        raise PolicyUnavailable(
            f"the policy gave a malformed decision ({problems})", kind="malformed"
        ) from exc
