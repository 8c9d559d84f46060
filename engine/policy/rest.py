"""The engine's one door to OPA, through opa-python-client's async client.

`evaluate` is the hot path: one kept-alive aiohttp session, no retries, a hard deadline;
every way it can fail (refused, slow, HTTP error, undefined or malformed result) becomes
`PolicyUnavailable`, which the service turns into a deny. `load` pushes a policy bundle
through the REST API and either applies all of it or none of it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opa_client import AsyncOpaClient
from opa_client.errors import RegoParseError

from engine.errors import PolicyRejected, PolicyUnavailable
from engine.models import PolicyResult, ResultPolicyResult
from engine.policy.result import NO_RESULT_DECISION, checked_result, checked_result_decision
from engine.policy.source import MODULE_PREFIX, PolicyBundle

log = logging.getLogger(__name__)

DECISION_PACKAGE = "mcp"
DECISION_RULE = "decision"
RESULT_DECISION_RULE = "result_decision"
ADMIN_TIMEOUT_SECONDS = 10.0


def _client(url: str, *, timeout: float, retries: int, token: str | None) -> AsyncOpaClient:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"OPA URL must be http(s)://host:port, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return AsyncOpaClient(
        host=parts.hostname,
        port=port,
        ssl=parts.scheme == "https",
        token=token,
        retries=retries,
        timeout=timeout,
    )


def _opa_errors(exc: RegoParseError) -> list[str]:
    out = []
    for err in exc.errors or []:
        loc = err.get("location") or {}
        where = f"{loc.get('file', '?')}:{loc.get('row', '?')}:{loc.get('col', '?')}: "
        out.append(where + str(err.get("message", err)))
    return out or [str(exc.message)]


class Opa:
    """One OPA server, queried for decisions and loaded with policy bundles."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        token: str | None = None,
        result_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        # A tool's result can be a MiB: its decision gets a deadline of its own.
        self.result_timeout = timeout if result_timeout is None else result_timeout
        self._token = token
        self._decide: AsyncOpaClient | None = None
        self._admin: AsyncOpaClient | None = None

    @property
    def where(self) -> str:
        """Where decisions are evaluated, for people."""
        return f"OPA at {self.url}"

    async def open(self) -> None:
        self._decide = _client(self.url, timeout=self.timeout, retries=0, token=self._token)
        self._admin = _client(self.url, timeout=ADMIN_TIMEOUT_SECONDS, retries=2, token=self._token)
        await self._decide.__aenter__()
        await self._admin.__aenter__()

    async def close(self) -> None:
        for client in (self._decide, self._admin):
            if client is not None:
                await client.close_connection()
        self._decide = self._admin = None

    async def evaluate(self, input_doc: dict[str, Any]) -> PolicyResult:
        """Evaluate `data.mcp.decision` for `input_doc`; PolicyUnavailable on any failure."""
        body = await self._query(input_doc, DECISION_RULE)
        if not isinstance(body, dict) or "result" not in body:
            raise PolicyUnavailable(
                "the policy gave no decision (data.mcp.decision is undefined)", kind="undefined"
            )
        return checked_result(body["result"])

    async def evaluate_result(self, input_doc: dict[str, Any]) -> ResultPolicyResult:
        """Evaluate `data.mcp.result_decision` for `input_doc` (the call's input with the
        tool's result); PolicyUnavailable on any failure, kind undefined when the policy has
        no result_decision."""
        body = await self._query(input_doc, RESULT_DECISION_RULE, self.result_timeout)
        if not isinstance(body, dict) or "result" not in body:
            raise PolicyUnavailable(NO_RESULT_DECISION, kind="undefined")
        return checked_result_decision(body["result"])

    async def _query(
        self, input_doc: dict[str, Any], rule: str, timeout: float | None = None
    ) -> Any:
        """OPA's answer body for `data.mcp.<rule>`, under the evaluation deadline (`timeout`
        when given, else the call decision's)."""
        deadline = self.timeout if timeout is None else timeout
        client = self._decide
        if client is None:
            raise PolicyUnavailable("OPA client is not open")
        try:
            async with asyncio.timeout(deadline):
                return await client.query_rule(input_doc, DECISION_PACKAGE, rule)
        except TimeoutError as exc:
            raise PolicyUnavailable(
                f"OPA did not answer within {deadline * 1000:.0f} ms", kind="timeout"
            ) from exc
        except aiohttp.ClientResponseError as exc:
            raise PolicyUnavailable(f"OPA answered HTTP {exc.status}", kind="http") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise PolicyUnavailable(f"OPA unreachable: {type(exc).__name__}") from exc

    async def load_errors(self) -> list[str]:
        """`data.mcp.load_errors` of the policy OPA holds now (sorted; [] when undefined)."""
        admin = self._admin
        if admin is None:
            raise PolicyUnavailable("OPA client is not open")
        try:
            body = await admin.query_rule({}, DECISION_PACKAGE, "load_errors")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PolicyUnavailable(
                f"could not check the policy in OPA: {exc}", kind="load"
            ) from exc
        value = body.get("result", []) if isinstance(body, dict) else None
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise PolicyRejected("data.mcp.load_errors must be a set of strings", ["load_errors"])
        return sorted(value)

    async def healthy(self) -> bool:
        client = self._admin
        return client is not None and bool(await client.check_health())

    async def load(self, bundle: PolicyBundle) -> None:
        """Make OPA hold exactly `bundle`'s modules and data, or leave it as it was.

        Modules are uploaded one by one (OPA compiles each against the others); one that
        fails because another is not there yet is retried once the others are in. If any
        module is still rejected, every change is undone and PolicyRejected carries OPA's
        messages. Only modules with our id prefix are touched.
        """
        admin = self._admin
        if admin is None:
            raise PolicyUnavailable("OPA client is not open")
        try:
            before = await self._our_modules(admin)
            data_before = {key: await self._get_data(admin, key) for key in bundle.data}
            applied: list[str] = []
            errors: dict[str, list[str]] = {}
            pending = [mid for mid, raw in bundle.modules.items() if before.get(mid) != raw]
            while pending:
                failed = []
                for module_id in pending:
                    try:
                        await admin.update_policy_from_string(
                            bundle.modules[module_id], module_id, rego_compat=False
                        )
                    except RegoParseError as exc:
                        failed.append(module_id)
                        errors[module_id] = _opa_errors(exc)
                    else:
                        applied.append(module_id)
                        errors.pop(module_id, None)
                if len(failed) == len(pending):
                    break
                pending = failed
            stale = [mid for mid in before if mid not in bundle.modules]
            if not errors:
                for module_id in stale:
                    try:
                        await admin.delete_policy(module_id)
                    except Exception as exc:  # noqa: BLE001 - reported as a rejection
                        errors[module_id] = [f"could not remove: {exc}"]
            if errors:
                await self._restore(admin, before, applied, data_before=None)
                messages = [m for msgs in errors.values() for m in msgs]
                raise PolicyRejected(
                    "OPA rejected the policy; the running policy is unchanged: "
                    + "; ".join(messages[:5]),
                    messages,
                )
            for key, value in bundle.data.items():
                if not await admin.update_or_create_data(value, key):
                    await self._restore(admin, before, applied, data_before=data_before)
                    raise PolicyRejected(f"OPA refused data at data.{key}", [key])
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PolicyUnavailable(
                f"could not load the policy into OPA: {exc}", kind="load"
            ) from exc

    @staticmethod
    async def _our_modules(admin: AsyncOpaClient) -> dict[str, str]:
        out: dict[str, str] = {}
        for module_id in await admin.get_policies_list():
            if module_id.startswith(MODULE_PREFIX):
                policy = await admin.get_policy(module_id)
                out[module_id] = policy.get("result", {}).get("raw", "")
        return out

    @staticmethod
    async def _get_data(admin: AsyncOpaClient, key: str) -> Any:
        try:
            return (await admin.get_data(key)).get("result")
        except Exception:  # noqa: BLE001 - undefined data is "nothing there before"
            return None

    @staticmethod
    async def _restore(
        admin: AsyncOpaClient,
        before: dict[str, str],
        applied: list[str],
        *,
        data_before: dict[str, Any] | None,
    ) -> None:
        for module_id in reversed(applied):
            try:
                if module_id in before:
                    await admin.update_policy_from_string(
                        before[module_id], module_id, rego_compat=False
                    )
                else:
                    await admin.delete_policy(module_id)
            except Exception:  # noqa: BLE001 - best effort; logged
                log.exception("could not restore policy module %s", module_id)
        for key, value in (data_before or {}).items():
            try:
                if value is None:
                    await admin.delete_data(key)
                else:
                    await admin.update_or_create_data(value, key)
            except Exception:  # noqa: BLE001 - best effort; logged
                log.exception("could not restore data.%s", key)
