"""The policy in directories, evaluated without a service: what table tests, `explain` and
`replay` evaluate calls with.

The directories are read, checked and compiled exactly as `serve` loads them (placement,
the schema, OPA's compiler, `data.mcp.load_errors`), into OPA's evaluator in this process;
a call becomes the input document the service would build (`translate`), so an answer here
is the policy's answer there — without counters or approvals, which are the service's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine import translate
from engine.errors import InvalidRequest, from_validation
from engine.models import DecideRequest, PolicyResult
from engine.policy.inprocess import DECISION_QUERY, LOAD_ERRORS_QUERY, InProcessOpa
from engine.policy.loader import Policy
from engine.policy.source import PolicyBundle, read_bundle
from engine.settings import DEFAULT_POLICY_SCHEMA

# Deadline of one offline evaluation: generous (no agent waits), still bounded.
TIMEOUT_SECONDS = 5.0
MAX_JSON_DEPTH = 24


class OfflinePolicy:
    """One policy revision loaded into the in-process OPA, with extra queries prepared."""

    def __init__(self, opa: InProcessOpa, bundle: PolicyBundle) -> None:
        self.opa = opa
        self.bundle = bundle

    @property
    def revision(self) -> str:
        return self.bundle.revision

    @classmethod
    async def load(
        cls,
        paths: Sequence[Path],
        *,
        schema: Path | None = DEFAULT_POLICY_SCHEMA,
        queries: Sequence[str] = (),
        bundle: PolicyBundle | None = None,
    ) -> OfflinePolicy:
        """Read `paths` (or take `bundle`), check and compile it as `serve` does, with
        `queries` prepared beside data.mcp.decision; PolicyRejected with every problem
        (file:line where there is one), ToolMissing when the library is not built."""
        checker = Policy(InProcessOpa(timeout=TIMEOUT_SECONDS), list(paths), schema)
        if bundle is None:
            bundle = read_bundle(list(paths))
        checker.validate(bundle)
        opa = InProcessOpa(timeout=TIMEOUT_SECONDS)
        await opa.open()
        try:
            await opa.load(bundle, (DECISION_QUERY, *queries), check=LOAD_ERRORS_QUERY)
        except BaseException:
            await opa.close()
            raise
        return cls(opa, bundle)

    async def close(self) -> None:
        await self.opa.close()

    async def __aenter__(self) -> OfflinePolicy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def input_for(call: dict[str, Any], *, time: datetime | None = None) -> dict[str, Any]:
        """The input document the service builds for `call` (a DecideRequest as JSON:
        server, tool, arguments, principal, context…), at `time` (default: now), as an
        unauthenticated caller over "offline"; InvalidRequest names what is wrong."""
        try:
            request = DecideRequest.model_validate(call)
        except ValidationError as exc:
            raise from_validation(exc) from exc
        tool_call = translate.tool_call(request, max_depth=MAX_JSON_DEPTH)
        when = time if time is not None else datetime.now(UTC)
        if when.tzinfo is None:
            raise InvalidRequest("the time must say its timezone (e.g. 2026-12-07T09:00:00Z)")
        return translate.input_document(
            tool_call,
            request,
            decision_id="offline-" + uuid.uuid4().hex,
            now=when.astimezone(UTC),
            transport="offline",
        )

    def evaluate(self, input_doc: dict[str, Any]) -> PolicyResult:
        """data.mcp.decision for `input_doc` (PolicyUnavailable when it cannot be had)."""
        result, _ = self.opa.evaluate_sync(input_doc)
        return result

    def evaluate_json(self, input_json: bytes) -> PolicyResult:
        """`evaluate` for an input already in JSON text (replay's fast path)."""
        result, _ = self.opa.evaluate_json(input_json)
        return result

    async def query(self, name: str, input_doc: Any = None) -> Any:
        """Another prepared query's value for `input_doc` (None: undefined)."""
        return await self.opa.query(name, input_doc)
