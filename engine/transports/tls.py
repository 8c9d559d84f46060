"""TLS for the decision service: the service proves itself, and may know its callers by
certificate (mTLS).

Settings (engine/settings.py): `tls_cert`/`tls_key` turn TLS on for both listeners;
`tls_client_ca` makes a client certificate signed by that CA mandatory; `tls_client_names`
further limits callers to certificates carrying one of these names. A certificate's names
are its subjectAltName values (DNS names, URIs such as spiffe://…, IP addresses, e-mail
addresses); its subject common name counts only when it has no subjectAltName.

Where the caller's certificate is read:

* gRPC: `context.auth_context()` (`x509_subject_alternative_name`, `x509_common_name`),
  by `ClientNameInterceptor`, which refuses names not on the list with UNAUTHENTICATED.
  `grpc.health.v1.Health` stays open to any certificate the CA signed (probes).
* HTTP: uvicorn 0.54 puts nothing about TLS in the ASGI scope, so `with_peer_certificate`
  subclasses the h11 protocol to add the ASGI TLS extension (`scope["extensions"]["tls"]`,
  plus our `client_cert_names`) from the connection's verified peer certificate;
  `ClientNameMiddleware` answers 401 for names not on the list. `/healthz` and `/readyz`
  stay open to any certificate the CA signed.

Either way the proven name is then `current_peer()` for the rest of that call (a
contextvar), `peer_identity(context)` in a gRPC handler.

`check_exposure` is the rule that a service bound beyond loopback has TLS or was told
`--insecure`; `load_server_tls` reads and checks the files before anything listens.
"""

from __future__ import annotations

import contextvars
import inspect
import ipaddress
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from engine.errors import MAX_MESSAGE_CHARS, EngineError, bounded

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from engine.settings import Settings

log = logging.getLogger(__name__)

# gRPC services any certificate the client CA signed may call, whatever its name.
OPEN_GRPC_SERVICES = frozenset({"grpc.health.v1.Health"})
# HTTP paths any certificate the client CA signed may fetch, whatever its name.
OPEN_HTTP_PATHS = frozenset({"/healthz", "/readyz"})

TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# Short names of RFC 4514 for the subject attributes Python's ssl reports by long name.
RDN_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}

P = TypeVar("P", bound="H11Protocol")
_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("tls_peer", default=None)


class StartupRefused(EngineError):
    """The service will not start as configured (a TLS file, or exposure without TLS)."""


# --- exposure --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1; every other host or name is exposed."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposed_without_tls(settings: Settings) -> bool:
    return settings.tls_cert is None and not is_loopback(settings.host)


def check_exposure(settings: Settings) -> str | None:
    """Why the service must not start as configured, or None.

    Bound beyond loopback it needs TLS, unless `insecure`. (TLS without a client CA is
    allowed: callers may still prove themselves with client tokens.)
    """
    if not exposed_without_tls(settings) or settings.insecure:
        return None
    return (
        f"refusing to serve on {settings.host} without TLS: set MCP_POLICY_TLS_CERT and "
        "MCP_POLICY_TLS_KEY (and MCP_POLICY_TLS_CLIENT_CA or client tokens, so callers prove "
        "who they are), or pass --insecure"
    )


# --- files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """The service's TLS material, read and checked."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    cert: bytes
    key: bytes
    client_ca: bytes | None
    client_names: frozenset[str]

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def uvicorn_config(self) -> dict[str, Any]:
        """uvicorn.Config keywords for this TLS."""
        config: dict[str, Any] = {
            "ssl_certfile": str(self.cert_file),
            "ssl_keyfile": str(self.key_file),
        }
        if self.client_ca_file is not None:
            config["ssl_ca_certs"] = str(self.client_ca_file)
            config["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return config


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupRefused(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load rather than prompting on the terminal


def _reason(exc: ssl.SSLError) -> str:
    if not exc.reason or exc.reason == "PEM_LIB":
        return "not a PEM key"
    return str(exc.reason).lower().replace("_", " ")


def load_server_tls(settings: Settings) -> ServerTls | None:
    """The TLS files of `settings`, read and loaded as OpenSSL will; None without TLS.

    Raises StartupRefused naming the file that is missing, unreadable or does not load.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read(settings.tls_cert, "TLS certificate")
    key = _read(settings.tls_key, "TLS key")
    client_ca = _read(settings.tls_client_ca, "TLS client CA") if settings.tls_client_ca else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=cert.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise StartupRefused(
            f"TLS certificate {settings.tls_cert} does not load: not a PEM certificate"
        ) from exc
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=_no_password)
    except ssl.SSLError as exc:
        raise StartupRefused(
            f"TLS key {settings.tls_key} does not load, or is not the key of "
            f"{settings.tls_cert} (a PEM key without a passphrase): {_reason(exc)}"
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise StartupRefused(
                f"TLS client CA {settings.tls_client_ca} does not load: not a PEM certificate"
            ) from exc
    return ServerTls(
        cert_file=settings.tls_cert,
        key_file=settings.tls_key,
        client_ca_file=settings.tls_client_ca,
        cert=cert,
        key=key,
        client_ca=client_ca,
        client_names=frozenset(settings.tls_client_names),
    )


# --- names -------------------------------------------------------------------------------


def certificate_names(alt_names: Iterable[str], common_name: str | None) -> list[str]:
    """A certificate's names: its subjectAltName values, else its common name."""
    names = [name for name in alt_names if name]
    if not names and common_name:
        names = [common_name]
    return names


def choose_identity(names: Sequence[str], allowed: frozenset[str]) -> str | None:
    """The name a caller is known by: the first on the list (any, with no list)."""
    for name in names:
        if not allowed or name in allowed:
            return name
    return None


def current_peer() -> str | None:
    """The certificate name proven by the caller of the call being handled (either
    transport), or None: no client certificate, or the check is not installed."""
    return _peer.get()


def _describe(names: Sequence[str]) -> str:
    shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
    return bounded(shown or "no name", MAX_MESSAGE_CHARS // 2)


# --- gRPC --------------------------------------------------------------------------------


def _text(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]


def grpc_peer_names(auth_context: Mapping[str, Iterable[bytes | str]]) -> list[str]:
    """A gRPC peer's certificate names, from `context.auth_context()`."""
    common = _text(auth_context.get("x509_common_name", ()))
    return certificate_names(
        _text(auth_context.get("x509_subject_alternative_name", ())),
        common[0] if common else None,
    )


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's proven certificate name in a gRPC handler (the allowed one, when
    `ClientNameInterceptor` checked it), or None without a client certificate."""
    checked = _peer.get()
    if checked is not None:
        return checked
    return choose_identity(grpc_peer_names(context.auth_context()), frozenset())


class ClientNameInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuse calls whose client certificate carries none of `allowed` (UNAUTHENTICATED);
    with an empty `allowed`, any certificate the CA signed. The name is `current_peer()`
    for the rest of the call. Services in `open_services` take any certificate."""

    def __init__(
        self, allowed: Iterable[str], open_services: Iterable[str] = OPEN_GRPC_SERVICES
    ) -> None:
        self.allowed = frozenset(allowed)
        self.open_services = frozenset(open_services)

    async def _check(self, context: grpc.aio.ServicerContext, open_service: bool) -> None:
        names = grpc_peer_names(context.auth_context())
        identity = choose_identity(names, self.allowed)
        if identity is None and not open_service:
            log.info("refused a gRPC call from client certificate %s", _describe(names))
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"client certificate ({_describe(names)}) is not allowed to call this service",
            )
        _peer.set(identity)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        service = details.method.lstrip("/").rsplit("/", 1)[0]
        open_service = service in self.open_services
        check = self._check

        def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behaviour):

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    await check(context, open_service)
                    async for item in behaviour(request, context):
                        yield item

                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context, open_service)
                return await behaviour(request, context)

            return call

        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for kind, make in kinds:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make(
                    guard(behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


# --- HTTP --------------------------------------------------------------------------------


def _rfc4514(subject: Sequence[Sequence[tuple[str, str]]]) -> str:
    def escape(value: str) -> str:
        value = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
        if value.startswith(("#", " ")):
            value = "\\" + value
        return value[:-1] + "\\ " if value.endswith(" ") else value

    rdns = [
        "+".join(f"{RDN_SHORT_NAMES.get(key, key)}={escape(value)}" for key, value in rdn)
        for rdn in subject
    ]
    return ",".join(reversed(rdns))


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> dict[str, Any]:
    """The ASGI TLS extension for a connection, plus `client_cert_names` (our key: the
    verified client certificate's names, as `certificate_names` makes them)."""
    extension: dict[str, Any] = {
        "server_cert": None,
        "client_cert_chain": [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
        "client_cert_names": [],
    }
    if ssl_object is None:
        return extension
    extension["tls_version"] = TLS_VERSIONS.get(ssl_object.version() or "")
    peer = ssl_object.getpeercert()  # empty unless a client certificate was verified
    der = ssl_object.getpeercert(binary_form=True)
    if not peer or not der:
        return extension
    extension["client_cert_chain"] = [ssl.DER_cert_to_PEM_cert(der)]
    subject: Sequence[Sequence[tuple[str, str]]] = peer.get("subject", ())  # type: ignore[assignment]
    alt_names: Sequence[tuple[str, str]] = peer.get("subjectAltName", ())  # type: ignore[assignment]
    extension["client_cert_name"] = _rfc4514(subject)
    common = [value for rdn in subject for key, value in rdn if key == "commonName"]
    extension["client_cert_names"] = certificate_names(
        (value for _, value in alt_names), common[0] if common else None
    )
    return extension


def with_peer_certificate(protocol: type[P]) -> type[P]:
    """`protocol` (uvicorn's h11 protocol or a subclass), with the ASGI TLS extension in
    the scope of every request on a TLS connection. uvicorn 0.54 does not provide it.

    The protocol is made once per connection, after the TLS handshake, so the extension is
    computed once per connection and each request gets its own copy.
    """

    class WithPeerCertificate(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None:
                return
            extension = tls_extension(ssl_object)
            connection: Any = self
            app = connection.app

            async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
                extensions = dict(scope.get("extensions") or {})
                extensions["tls"] = {
                    **extension,
                    "client_cert_chain": list(extension["client_cert_chain"]),
                    "client_cert_names": list(extension["client_cert_names"]),
                }
                scope["extensions"] = extensions
                await app(scope, receive, send)

            connection.app = with_tls

    WithPeerCertificate.__name__ = WithPeerCertificate.__qualname__ = (
        f"WithPeerCertificate{protocol.__name__}"
    )
    return WithPeerCertificate


class ClientNameMiddleware:
    """ASGI middleware: a request whose client certificate carries none of `allowed` is
    answered 401 `{"error": {"code": "Unauthenticated", ...}}` before the app sees it;
    with an empty `allowed`, any certificate the CA signed passes. The name is
    `current_peer()` (and `request.state.tls_client`) for the rest of the request.
    Paths in `open_paths` take any certificate (or none)."""

    def __init__(
        self, app: ASGIApp, allowed: Iterable[str], open_paths: Iterable[str] = OPEN_HTTP_PATHS
    ) -> None:
        self.app = app
        self.allowed = frozenset(allowed)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        tls = (scope.get("extensions") or {}).get("tls") or {}
        names: list[str] = list(tls.get("client_cert_names") or [])
        identity = choose_identity(names, self.allowed)
        if identity is None and scope.get("path") not in self.open_paths:
            log.info("refused an HTTP request from client certificate %s", _describe(names))
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _unauthenticated(
                send, f"client certificate ({_describe(names)}) is not allowed to call this service"
            )
            return
        scope.setdefault("state", {})["tls_client"] = identity
        token = _peer.set(identity)
        try:
            await self.app(scope, receive, send)
        finally:
            _peer.reset(token)


async def _unauthenticated(send: Send, message: str) -> None:
    body = json.dumps({"error": {"code": "Unauthenticated", "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
