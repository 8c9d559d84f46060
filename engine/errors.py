"""The engine's one exception tree.

Failures of OPA, the state stores and the caller's input are mapped to these once, where
they happen; the transports map these to gRPC status codes and HTTP statuses in one place
each (`grpc_server.status_for`, `http_app.status_for`). None of them ever becomes an allow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

# What an error may carry back to a caller: enough to fix the request, never megabytes
# of the caller's own input (see `bounded`).
MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 256


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(EngineError):
    """The caller sent something the service cannot decide on.

    `field` names the offending part of the request (dotted path), when there is one.
    `syntax` is true for problems with the JSON text itself (HTTP 400) rather than with
    the value of a field (HTTP 422).
    """

    def __init__(self, message: str, *, field: str | None = None, syntax: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.syntax = syntax


class RequestTooLarge(InvalidRequest):
    """The request body is over the configured limit."""


class PolicyUnavailable(EngineError):
    """The policy could not be evaluated: OPA down, slow, or its result unusable.

    `kind` says which (timeout, unreachable, http, undefined, malformed, load) for metrics.
    """

    def __init__(self, message: str, *, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind


class PolicyRejected(EngineError):
    """OPA's compiler refused a policy; the running policy was left in place."""

    def __init__(self, message: str, errors: list[str]) -> None:
        super().__init__(message)
        self.errors = errors


class StateUnavailable(EngineError):
    """A state store (rate limits, approvals) could not be read or written."""


class NotFound(EngineError):
    """The named object (an approval) does not exist."""


class Conflict(EngineError):
    """The object is not in a state that allows the operation."""


class Unauthenticated(EngineError):
    """No approver credential was presented."""


class PermissionDenied(EngineError):
    """The credential presented is not the approver credential."""


def bounded(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def from_validation(exc: ValidationError, what: str = "") -> InvalidRequest:
    """The first problem pydantic found, as an InvalidRequest naming the field."""
    first = exc.errors(include_url=False, include_input=False)[0]
    parts = [str(part) for part in first["loc"]]
    field = ".".join(p if len(p) <= 64 else p[:64] + "…" for p in parts)
    field = bounded(field, MAX_FIELD_CHARS)
    return InvalidRequest(f"{what}{field}: {first['msg']}", field=field or None)
