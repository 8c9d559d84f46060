"""One JSON line per decision, written off the event loop.

Records carry who, what, the verdict and why, the policy revision and the latency; tool
arguments are never written, only their SHA-256 (they may hold patient data). Lines go
through a queue to a writer thread, so a slow disk never stalls a decision.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from pathlib import Path
from typing import Any

from engine import jsonstrict
from engine.models import DecideRequest, Decision, ToolCall

LOGGER_NAME = "mcp_policy.decisions"


class DecisionLog:
    """Where decision records go: a file, standard error ("-"), or nowhere ("off")."""

    def __init__(self, target: str) -> None:
        self._logger = logging.getLogger(LOGGER_NAME)
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._listener: logging.handlers.QueueListener | None = None
        self.enabled = target != "off"
        if not self.enabled:
            return
        if target == "-":
            sink: logging.Handler = logging.StreamHandler(sys.stderr)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            sink = logging.FileHandler(target, encoding="utf-8")
        sink.setFormatter(logging.Formatter("%(message)s"))
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._handler = logging.handlers.QueueHandler(records)
        self._logger.addHandler(self._handler)
        self._sink = sink
        self._listener = logging.handlers.QueueListener(records, sink)
        self._listener.start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._logger.removeHandler(self._handler)
            self._sink.close()
            self._listener = None

    def flush(self) -> None:
        """Wait until every record so far is written."""
        if self._listener is not None:
            self._listener.stop()
            self._listener.start()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._logger.info(json.dumps(record, separators=(",", ":"), ensure_ascii=True))

    def decision(
        self,
        decision: Decision,
        request: DecideRequest,
        call: ToolCall,
        *,
        time: str,
        transport: str,
        latency_ms: float,
        matched: list[str],
    ) -> None:
        principal = request.principal
        self.write(
            {
                "event": "decision",
                "decision_id": decision.decision_id,
                "time": time,
                "transport": transport,
                "principal": {
                    "agent_id": principal.agent_id,
                    "session_id": principal.session_id,
                    "user_id": principal.user_id,
                },
                "server": call.server,
                "tool": call.name,
                "arguments_sha256": jsonstrict.sha256_hex(call.arguments),
                "verdict": decision.verdict.value,
                "rule": decision.rule,
                "reason": decision.reason,
                "matched": matched,
                "policy_revision": decision.policy_revision,
                "approval_id": decision.approval.id if decision.approval else None,
                "latency_ms": round(latency_ms, 3),
            }
        )
