"""The running policy: which bundle OPA holds, its revision, and loading a new one."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from engine.errors import PolicyUnavailable
from engine.opa import Opa
from engine.policy_source import PolicyBundle, read_bundle

log = logging.getLogger(__name__)

NO_REVISION = "none"


class Policy:
    """Keeps OPA loaded with the last good bundle.

    A new bundle replaces the running one only when OPA accepted all of it; otherwise
    `PolicyRejected` (with OPA's messages) is raised and the running one stays.
    """

    def __init__(self, opa: Opa, paths: list[Path]) -> None:
        self.opa = opa
        self.paths = paths
        self.bundle: PolicyBundle | None = None
        self.loaded = False
        self._lock = asyncio.Lock()

    @property
    def revision(self) -> str:
        return self.bundle.revision if self.bundle is not None else NO_REVISION

    async def load(self, bundle: PolicyBundle | None = None) -> str:
        """Load `bundle` (default: read from `paths`); return the revision now running."""
        async with self._lock:
            if bundle is None:
                bundle = read_bundle(self.paths)
            await self.opa.load(bundle)
            if self.bundle is None or bundle.revision != self.bundle.revision:
                log.info("policy %s loaded (%d modules)", bundle.revision, len(bundle.modules))
            self.bundle = bundle
            self.loaded = True
            return bundle.revision

    def mark_stale(self) -> None:
        """OPA seems to have lost the policy (a restart): reload at the next chance."""
        self.loaded = False

    async def ensure_loaded(self) -> None:
        """Push the last good bundle again when OPA lost it."""
        if self.loaded or self.bundle is None:
            return
        try:
            await self.load(self.bundle)
        except PolicyUnavailable as exc:
            log.warning("policy reload into OPA failed: %s", exc)
