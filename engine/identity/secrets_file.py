"""Hashed-credential files: API keys (agents), client tokens (proxies), approvers.

One YAML file per kind holds named entries; a secret is stored only as the SHA-256 of
the secret string, never itself, and is shown once, when `add_entry` makes it:

    # mcp-policy api_key file: secrets are stored only as SHA-256 hashes
    kind: api_key
    entries:
    - name: agent-a                # unique
      sha256: <hex of sha256(secret)>
      agent_id: agent-a            # API keys: the principal they prove
      user_id: alice
      roles: [imaging-admin]
      servers: [...]               # optional restrictions (approvers), in Identity.allowed
      tools: [...]
      created: '2026-12-01T10:00:00Z'
      revoked: false

`SecretsFile.lookup` is the per-request check: one SHA-256, one dict lookup and a
constant-time compare, plus at most one `stat` of the file every `check_interval` seconds
so an edited file (a revoked key) takes effect within seconds, with no thread. A file
that no longer parses leaves the last good entries in force and logs one warning.
Secrets are random (`generate_secret`), so a fast hash is the right one: there is no
password to guess.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import yaml

from engine.errors import Conflict, InvalidRequest, NotFound
from engine.identity.base import Identity, IdentityUnavailable
from engine.models import principal_id_problem

log = logging.getLogger(__name__)

Kind = Literal["api_key", "client_token", "approver"]
KINDS: tuple[Kind, ...] = get_args(Kind)
PREFIXES: Mapping[Kind, str] = MappingProxyType(
    {"api_key": "mcpk_", "client_token": "mcpc_", "approver": "mcpa_"}
)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
MAX_VALUE_CHARS = 256  # the bound of an id in models.Principal
MAX_SECRET_CHARS = 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LIST_FIELDS = ("roles", "scopes", "servers", "tools")
_STR_FIELDS = ("agent_id", "user_id")
ENTRY_FIELDS = frozenset({"agent_id", "user_id", *_LIST_FIELDS})  # what add_entry takes
# A digest no secret has, compared against when nothing matched, so a miss costs a hit.
_NO_MATCH = "0" * 64


@dataclass(frozen=True)
class SecretEntry:
    """One named credential as its file holds it (the hash, never the secret)."""

    name: str
    sha256: str
    agent_id: str | None = None
    user_id: str | None = None
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    servers: tuple[str, ...] | None = None  # None: no restriction
    tools: tuple[str, ...] | None = None
    created: str | None = None
    revoked: bool = False
    revoked_at: str | None = None

    def public(self) -> dict[str, Any]:
        """Every field but the hash, leaving out those not set."""
        out: dict[str, Any] = {}
        for f in dataclass_fields(self):
            value = getattr(self, f.name)
            if f.name != "sha256" and value is not None and value != ():
                out[f.name] = value
        return out

    def allowed(self) -> dict[str, tuple[str, ...]]:
        return {
            name: value
            for name in ("servers", "tools")
            if (value := getattr(self, name)) is not None
        }

    def identity(self, kind: Kind) -> Identity:
        return Identity(
            method=kind,
            subject=self.name,
            agent_id=self.agent_id,
            user_id=self.user_id,
            roles=self.roles,
            scopes=self.scopes,
            claims=MappingProxyType(self.public()),
            allowed=MappingProxyType(self.allowed()),
        )

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sha256": self.sha256}
        for key, value in self.public().items():
            if key != "name":
                out[key] = list(value) if isinstance(value, tuple) else value
        out["revoked"] = self.revoked
        return out


def generate_secret(kind: Kind) -> str:
    """A new random secret (256 bits) with a prefix saying what it is: mcpk_, mcpc_, mcpa_."""
    return PREFIXES[kind] + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- reading -----------------------------------------------------------------------------


def _timestamp(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):  # YAML reads an unquoted timestamp as a datetime
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, str):
        return value
    raise ValueError(f"{where} must be a timestamp")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string")
    if len(value) > MAX_VALUE_CHARS or not value.isprintable():
        raise ValueError(f"{where} must be at most {MAX_VALUE_CHARS} printable characters")
    return value


def _entry(raw: Any, index: int) -> SecretEntry:
    where = f"entries[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{where}.name must be 1-128 letters, digits or ._@:- (starting with a letter "
            f"or digit), got {name!r}"
        )
    where = f"entry {name!r}"
    known = {f.name for f in dataclass_fields(SecretEntry)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
        raise ValueError(f"{where}: sha256 must be 64 hex digits")
    values: dict[str, Any] = {"name": name, "sha256": digest.lower()}
    for key in _STR_FIELDS:
        if raw.get(key) is not None:
            values[key] = _text(raw[key], f"{where}: {key}")
            problem = principal_id_problem(values[key])  # it becomes principal.<key>
            if problem is not None:
                raise ValueError(f"{where}: {key} {problem}")
    for key in _LIST_FIELDS:
        items = raw.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ValueError(f"{where}: {key} must be a list of strings")
        values[key] = tuple(_text(item, f"{where}: {key}") for item in items)
    revoked = raw.get("revoked", False)
    if not isinstance(revoked, bool):
        raise ValueError(f"{where}: revoked must be true or false")
    values["revoked"] = revoked
    values["created"] = _timestamp(raw.get("created"), f"{where}: created")
    values["revoked_at"] = _timestamp(raw.get("revoked_at"), f"{where}: revoked_at")
    return SecretEntry(**values)


def parse(text: str, *, kind: Kind | None = None) -> tuple[Kind | None, list[SecretEntry]]:
    """The kind a file declares and its entries; ValueError naming the first problem.

    With `kind`, a file declaring another kind is refused (an API key file must never be
    read as the approvers file)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}".replace("\n", " ")) from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ValueError("must be a mapping with `entries:`")
    unknown = sorted(str(k) for k in document if k not in ("kind", "entries"))
    if unknown:
        raise ValueError(f"unknown top-level field(s) {', '.join(unknown)}")
    declared = document.get("kind")
    if declared is not None and declared not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {declared!r}")
    if kind is not None and declared is not None and declared != kind:
        raise ValueError(f"is a {declared} file, not a {kind} file")
    raw_entries = document.get("entries") or []
    if not isinstance(raw_entries, list):
        raise ValueError("entries must be a list")
    entries = [_entry(raw, i) for i, raw in enumerate(raw_entries)]
    names: set[str] = set()
    hashes: set[str] = set()
    for entry in entries:
        if entry.name in names:
            raise ValueError(f"entry name {entry.name!r} appears twice")
        if entry.sha256 in hashes:
            raise ValueError(f"entry {entry.name!r} has the same sha256 as another entry")
        names.add(entry.name)
        hashes.add(entry.sha256)
    return declared, entries


def _read(path: Path, kind: Kind | None) -> tuple[Kind | None, list[SecretEntry], os.stat_result]:
    try:
        with path.open("r", encoding="utf-8") as f:
            status = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        raise IdentityUnavailable(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityUnavailable(f"{path}: cannot read: {exc}") from None
    try:
        declared, entries = parse(text, kind=kind)
    except ValueError as exc:
        raise IdentityUnavailable(f"{path}: {exc}") from None
    return declared, entries, status


def _signature(status: os.stat_result) -> tuple[int, int, int, int]:
    return (status.st_mtime_ns, status.st_size, status.st_ino, status.st_dev)


class SecretsFile:
    """The live entries of one credentials file, for `lookup` on every request."""

    def __init__(self, path: Path, *, kind: Kind, check_interval: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        self.path = Path(path)
        self.kind: Kind = kind
        self.check_interval = check_interval
        # sha256 hex -> (the hash as the file has it, the identity it proves)
        self._by_hash: dict[str, tuple[str, Identity]] = {}
        self._entries: tuple[SecretEntry, ...] = ()
        self._signature: tuple[int, int, int, int] | None = None
        self._bad_signature: tuple[int, int, int, int] | None = None
        self._missing = False
        _, entries, status = _read(self.path, kind)  # missing or invalid: IdentityUnavailable
        self._install(entries, status)
        self._checked_at = time.monotonic()

    @property
    def entries(self) -> tuple[SecretEntry, ...]:
        """The entries in force (revoked ones included)."""
        return self._entries

    def lookup(self, secret: str) -> Identity | None:
        """The identity whose secret this is, or None (unknown, revoked, or not a secret)."""
        if time.monotonic() - self._checked_at >= self.check_interval:
            self.reload()
        if not isinstance(secret, str) or not secret or len(secret) > MAX_SECRET_CHARS:
            return None
        digest = hash_secret(secret)
        # The dict finds the candidate by the digest (a secret's SHA-256 tells a timing
        # attacker nothing about another secret); the compare is constant-time all the same.
        stored, identity = self._by_hash.get(digest, (_NO_MATCH, None))
        if hmac.compare_digest(stored.encode("ascii"), digest.encode("ascii")):
            return identity
        return None

    def reload(self) -> bool:
        """Read the file again if it changed; True when new entries were installed."""
        self._checked_at = time.monotonic()
        try:
            signature = _signature(os.stat(self.path))
        except OSError as exc:
            if not self._missing:
                self._missing = True
                log.warning(
                    "%s: cannot be read (%s); still using the last good entries",
                    self.path,
                    exc.strerror,
                )
            return False
        self._missing = False
        if signature in (self._signature, self._bad_signature):
            return False
        try:
            _, entries, status = _read(self.path, self.kind)
        except IdentityUnavailable as exc:
            self._bad_signature = signature
            log.warning("%s; still using the last good entries", exc.message)
            return False
        self._install(entries, status)
        log.info("%s: %d entries loaded", self.path, len(entries))
        return True

    def _install(self, entries: list[SecretEntry], status: os.stat_result) -> None:
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning(
                "%s can be written by other users: anyone who can write it can add a "
                "credential (chmod 600 it)",
                self.path,
            )
        self._by_hash = {
            e.sha256: (e.sha256, e.identity(self.kind)) for e in entries if not e.revoked
        }
        self._entries = tuple(entries)
        self._signature = _signature(status)
        self._bad_signature = None


# -- writing -----------------------------------------------------------------------------


def _header(kind: Kind | None) -> str:
    what = f"{kind} " if kind else ""
    return f"# mcp-policy {what}file: secrets are stored only as SHA-256 hashes\n"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time (several `mcp-policy keys add` at once lose nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, kind: Kind | None, entries: list[SecretEntry]) -> None:
    """Replace the file atomically (temp file in the same directory, fsync, rename), 0600."""
    document: dict[str, Any] = {}
    if kind is not None:
        document["kind"] = kind
    document["entries"] = [e.to_yaml() for e in entries]
    text = _header(kind) + yaml.safe_dump(
        document, sort_keys=False, default_flow_style=None, allow_unicode=True
    )
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _existing(path: Path, kind: Kind | None) -> tuple[Kind | None, list[SecretEntry]]:
    if not path.exists():
        return kind, []
    declared, entries, _ = _read(path, kind)
    return declared or kind, entries


def add_entry(path: Path, kind: Kind, name: str, **fields: Any) -> str:
    """Add a named entry with a new secret; the secret, to show once (only its hash is kept).

    `fields`: agent_id, user_id (strings), roles, scopes, servers, tools (lists of strings).
    Creates the file (and its directory) when missing. Conflict if the name is taken."""
    if kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}")
    unknown = sorted(set(fields) - ENTRY_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}")
    secret = generate_secret(kind)
    raw: dict[str, Any] = {"name": name, "sha256": hash_secret(secret), "created": _now()}
    for key, value in fields.items():
        if value is None:
            continue
        raw[key] = list(value) if key in _LIST_FIELDS and not isinstance(value, str) else value
    try:
        entry = _entry(raw, 0)
    except ValueError as exc:
        raise InvalidRequest(str(exc).replace("entries[0].", "")) from None
    path = Path(path)
    with _locked(path):
        declared, entries = _existing(path, kind)
        if any(e.name == name for e in entries):
            raise Conflict(f"{path} already has an entry named {name!r}")
        _write(path, declared, [*entries, entry])
    return secret


def list_entries(path: Path) -> list[SecretEntry]:
    """The file's entries, revoked ones included. IdentityUnavailable if missing or invalid."""
    _, entries, _ = _read(Path(path), None)
    return entries


def revoke_entry(path: Path, name: str) -> SecretEntry:
    """Mark the named entry revoked (it never matches again); the entry as revoked.
    Revoking a revoked entry changes nothing. NotFound if there is no such entry."""
    path = Path(path)
    if not path.exists():
        raise IdentityUnavailable(f"{path}: no such file")
    with _locked(path):
        declared, entries, _ = _read(path, None)
        for i, entry in enumerate(entries):
            if entry.name == name:
                if not entry.revoked:
                    entries[i] = replace(entry, revoked=True, revoked_at=_now())
                    _write(path, declared, entries)
                return entries[i]
    raise NotFound(f"{path} has no entry named {name!r}")
