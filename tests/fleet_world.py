"""What a fleet talks to, run by the tests on loopback: a bundle server (ETag / 304), a
decision-log collector and a status service, in one small HTTP server; bundles built with
the pinned `opa build` (signed with keys made here)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.policy.opa_process import free_loopback_port
from engine.policy.source import MODULE_PREFIX, read_bundle
from tests.conftest import copy_policy

BUNDLE_PATH = "/bundles/policy.tar.gz"


@dataclass
class Keys:
    private: Path
    public: Path


def make_keys(where: Path, name: str = "signer") -> Keys:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = where / f"{name}.pem"
    public = where / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Keys(private, public)


def policy_dirs(tmp: Path) -> tuple[Path, Path]:
    """A private copy of the shipped policy to build bundles of."""
    return copy_policy(tmp)


def opa_build(
    dirs: list[Path], out: Path, revision: str, *, signing_key: Path | None = None
) -> Path:
    """`opa build -b` of the policy in `dirs` (tests left out), its YAML data as one
    data.json (bundles carry JSON data files only), signed when a key is given."""
    staging = out.parent / f"{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    bundle = read_bundle(dirs)
    (staging / "data.json").write_text(json.dumps(bundle.data))
    for module_id, text in bundle.modules.items():
        target = staging / module_id.removeprefix(MODULE_PREFIX)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    # Built from inside the staging directory, as operators run it: the files' paths in
    # the bundle are relative (`/mcp/decision.rego`), the same from one build to the next.
    args = [shutil.which("opa") or "opa", "build", "-b", ".", "-o", str(out.resolve())]
    args += ["--revision", revision]
    if signing_key is not None:
        args += ["--signing-key", str(signing_key.resolve()), "--signing-alg", "RS256"]
    subprocess.run(args, check=True, capture_output=True, text=True, cwd=staging)
    shutil.rmtree(staging)
    return out


def tamper(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` whose data.json was changed after signing (one key added)."""
    source = tarfile.open(bundle, "r:gz")
    buffer = io.BytesIO()
    changed = False
    with tarfile.open(fileobj=buffer, mode="w:gz") as target:
        for member in source.getmembers():
            handle = source.extractfile(member)
            content = handle.read() if handle is not None else b""
            if member.name.lstrip("/") == "data.json":
                data = json.loads(content)
                data["tampered"] = {"by": "someone"}
                content = json.dumps(data).encode()
                member.size = len(content)
                changed = True
            target.addfile(member, io.BytesIO(content))
    assert changed, "no data.json in the bundle"
    out.write_bytes(buffer.getvalue())
    return out


def members(bundle: Path) -> dict[str, bytes]:
    """The files of a bundle tarball, by name."""
    out: dict[str, bytes] = {}
    with tarfile.open(bundle, "r:gz") as source:
        for member in source.getmembers():
            handle = source.extractfile(member)
            if handle is not None:
                out[member.name] = handle.read()
    return out


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A gzipped tarball of `files` (name -> content), the names written as given (a
    hostile server's `../x.rego` included)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as target:
        for name, content in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(content)
            target.addfile(member, io.BytesIO(content))
    return buffer.getvalue()


@dataclass
class Received:
    events: list[dict[str, Any]] = field(default_factory=list)
    posts: int = 0
    statuses: list[dict[str, Any]] = field(default_factory=list)
    bundle_requests: int = 0
    not_modified: int = 0
    uploads_started: int = 0  # POSTs of decisions begun (held and refused ones too)
    refused_posts: int = 0  # answered with collector_status, or left unanswered
    unauthorized: int = 0  # requests without the bearer token the server wants

    def ids(self) -> Counter[str]:
        return Counter(str(e.get("decision_id")) for e in self.events)


class FleetServer:
    """Bundle server, collector and status service on one loopback port.

    `publish(path)` serves a new bundle (its ETag the digest of its bytes); `stop()` and
    `start()` take the whole server down and up on the same port (a collector outage).

    A hostile or broken server (tests/test_fleet_hostile.py) is a few attributes away:
    `serve_bytes` serves any bytes (a fixed ETag, If-None-Match ignored), `bundle_status`
    and `collector_status` answer with an error, `hang_bundles` / `hang_collector` (set)
    hold requests unanswered until cleared (a held upload is then dropped unanswered, its
    events not taken), `collector_delay` answers uploads late (their events taken), and
    `bearer` wants that token on every request."""

    def __init__(self, *, bearer: str | None = None) -> None:
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.received = Received()
        self.bundle: bytes | None = None
        self.etag = ""
        self.honour_etag = True
        self.bearer = bearer
        self.bundle_status = 200
        self.collector_status = 200
        self.collector_delay = 0.0
        self.hang_bundles = threading.Event()
        self.hang_collector = threading.Event()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    def publish(self, path: Path | None) -> None:
        with self.lock:
            self.bundle = path.read_bytes() if path is not None else None
            self.etag = hashlib.sha256(self.bundle).hexdigest()[:16] if self.bundle else ""
            self.honour_etag = True

    def serve_bytes(self, body: bytes, etag: str | None = None) -> None:
        """Serve `body` as the bundle; with `etag`, that ETag whatever the body, and
        If-None-Match ignored (a server that always answers 200)."""
        with self.lock:
            self.bundle = body
            self.etag = etag if etag is not None else hashlib.sha256(body).hexdigest()[:16]
            self.honour_etag = etag is None

    def start(self) -> None:
        world = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def authorized(self) -> bool:
                if world.bearer is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {world.bearer}":
                    return True
                with world.lock:
                    world.received.unauthorized += 1
                self.send_error(401)
                return False

            def held(self, hang: threading.Event) -> bool:
                """Wait while `hang` is set; True when it was (the answer is dropped)."""
                if not hang.is_set():
                    return False
                while hang.is_set() and world._server is not None:
                    time.sleep(0.05)
                self.close_connection = True
                return True

            def do_GET(self) -> None:  # noqa: N802 - the API's name
                if self.path != BUNDLE_PATH:
                    self.send_error(404)
                    return
                if not self.authorized() or self.held(world.hang_bundles):
                    return
                with world.lock:
                    world.received.bundle_requests += 1
                    body, etag, honour = world.bundle, world.etag, world.honour_etag
                    status = world.bundle_status
                if status != 200:
                    self.send_error(status)
                    return
                if body is None:
                    self.send_error(404)
                    return
                if honour and self.headers.get("If-None-Match") == etag:
                    with world.lock:
                        world.received.not_modified += 1
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - the API's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not self.authorized():
                    return
                if self.path.startswith("/logs"):
                    with world.lock:
                        world.received.uploads_started += 1
                    held = self.held(world.hang_collector)
                    status = world.collector_status
                    if held or status != 200:
                        with world.lock:
                            world.received.refused_posts += 1
                        if not held:
                            self.send_error(status)
                        return
                    time.sleep(world.collector_delay)
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                body = json.loads(raw)
                with world.lock:
                    if self.path.startswith("/logs"):
                        world.received.posts += 1
                        world.received.events.extend(body)
                    elif self.path.startswith("/status"):
                        world.received.statuses.append(body)
                with contextlib.suppress(OSError):  # a client that gave up on a slow answer
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait(self, check: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if check(self.received):
                    return
            time.sleep(0.1)
        with self.lock:
            raise AssertionError(f"not within {timeout} s: {len(self.received.events)} events")


def opa_config(
    where: Path,
    server: FleetServer,
    *,
    keys: Keys | None = None,
    bundles: bool = True,
    decision_logs: bool = True,
    status: bool = False,
    labels: dict[str, str] | None = None,
    upload_delay: tuple[int, int] = (1, 1),
    extra: dict[str, Any] | None = None,
) -> Path:
    """OPA's configuration file for a replica of the fleet (YAML, as operators write it)."""
    config: dict[str, Any] = {"services": {"fleet": {"url": server.url}}}
    if labels:
        config["labels"] = labels
    if bundles:
        bundle: dict[str, Any] = {
            "service": "fleet",
            "resource": BUNDLE_PATH,
            "polling": {"min_delay_seconds": 1, "max_delay_seconds": 1},
        }
        if keys is not None:
            config["keys"] = {"signer": {"key": keys.public.read_text(), "algorithm": "RS256"}}
            bundle["signing"] = {"keyid": "signer"}
        config["bundles"] = {"authz": bundle}
    if decision_logs:
        config["decision_logs"] = {
            "service": "fleet",
            "reporting": {
                "min_delay_seconds": upload_delay[0],
                "max_delay_seconds": upload_delay[1],
            },
        }
    if status:
        config["status"] = {"service": "fleet"}
    config.update(extra or {})
    path = where / "opa-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
