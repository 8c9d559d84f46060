"""One Host/Origin/content-type guard for every HTTP listener (the decision service's API
with its gateway endpoints, the proxy's MCP listener, and the approvals console to come).

A web page the operator opens can make the browser send requests to anything it can
reach, the service on loopback included: a "simple" cross-site POST (`text/plain` or a
form, no preflight), or, after DNS rebinding (a name of the attacker's that now resolves
to 127.0.0.1), any request at all, as if the page were the service's own. Either would
spend quotas, open approvals and fill the decision log. Three rules, checked in this
order before the application sees anything, stop that:

- **Host** (against DNS rebinding), where the listener is bound to loopback or runs
  without authentication: `Host` must be a loopback name (`localhost`, 127.0.0.0/8,
  `[::1]`, any port), an IP literal naming the very address the connection came to (a
  rebinding page always sends its own DNS name), or a configured host (`name` or
  `name:port`). Anything else is 421 Misdirected Request: the request was sent to a name
  this server does not serve (RFC 9110 section 15.5.20; the MCP SDK's servers answer the
  same), not a caller that lacks a permission. A missing Host (where it is checked, or on
  HTTP/1.1), several Host headers, or one that is not `host[:port]` is 400 (RFC 9112
  section 3.2).
- **Origin** (against cross-site requests): a present `Origin` must be this listener's
  own origin (the request's scheme and its Host, when Host passed) or a configured one;
  anything else, `Origin: null` (an opaque origin: sandboxed pages, files, redirects)
  included, is 403. On forward-auth paths, a request that carries `X-Forwarded-Host` is a
  gateway's check and its `Origin` is the original request's (Traefik copies every
  header): not judged here. No browser can send X-Forwarded-Host cross-site without a
  CORS preflight, which no listener here ever grants.
- **Content type**: POST, PUT and PATCH must say `Content-Type: application/json`
  (parameters allowed; a charset, if given, must be UTF-8), or get 415 unparsed, except
  on the paths whose body is not JSON by protocol (forward-auth: the original request's).
  Browsers send `application/json` cross-site only after a preflight.

Every refusal is `{"error": {"code", "message", "field"}}` naming the header and the rule,
and nothing is decided, counted, logged as a decision or relayed. The parsers here
(`parse_origin`, `parse_host`) also check the settings and flags that configure it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from engine.jsonstrict import quote
from engine.transports.tls import is_loopback

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

ORIGINS_SETTING = "MCP_POLICY_ALLOWED_ORIGINS"
HOSTS_SETTING = "MCP_POLICY_ALLOWED_HOSTS"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
QUOTED = 120  # characters of a caller's header value quoted in a refusal

_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,252})")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_PORT = re.compile(r"[0-9]{1,5}")


class Authority(NamedTuple):
    """`host[:port]`: the name in lower case (an IPv6 address without brackets)."""

    name: str
    port: int | None


class Origin(NamedTuple):
    """A serialised origin, its port filled in when the scheme has a default one."""

    scheme: str
    name: str
    port: int | None


def parse_authority(text: str) -> Authority | None:
    """`host[:port]` as an Authority; None when it is not one."""
    text = text.lower()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else ""
        try:
            name = str(ipaddress.IPv6Address(text[1:end])) if end > 0 else ""
        except ValueError:
            return None
        if not name or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
        if not _NAME.fullmatch(name):
            return None
    if port_text is None:
        return Authority(name, None)
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) <= 65535:
        return None
    return Authority(name, int(port_text))


def parse_origin(text: str) -> Origin:
    """A configured origin (`scheme://host[:port]`, a trailing "/" tolerated); ValueError
    saying what is wrong."""
    origin = _origin(text.removesuffix("/"))
    if origin is None:
        raise ValueError(
            f"{quote(text, QUOTED)} is not an origin: expected scheme://host[:port], "
            "e.g. https://console.example.com or http://localhost:6274 (no path; "
            '"null" is never allowed)'
        )
    return origin


def parse_host(text: str) -> Authority:
    """A configured host (`name`: any port; `name:port`: that port); ValueError saying
    what is wrong."""
    authority = parse_authority(text.strip())
    if authority is None:
        raise ValueError(
            f"{quote(text, QUOTED)} is not a host: expected a name or an address, with an "
            "optional :port, e.g. policy.internal, policy.internal:8080 or [2001:db8::1]:8080"
        )
    return authority


def _origin(text: str) -> Origin | None:
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme.lower()) or "/" in rest or "@" in rest:
        return None
    authority = parse_authority(rest)
    if authority is None:
        return None
    scheme = scheme.lower()
    port = authority.port if authority.port is not None else DEFAULT_PORTS.get(scheme)
    return Origin(scheme, authority.name, port)


def _same_address(name: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(address)
    except ValueError:
        return False


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    field: str
    message: str

    def body(self) -> bytes:
        error = {"code": self.code, "message": self.message, "field": self.field}
        return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class GuardConfig:
    """What one listener accepts.

    `check_host`: whether the Host rule applies (bound to loopback, or no
    authentication). `raw_body_paths`: paths (and everything below them) whose body is
    not JSON by protocol. `forwarded_paths`: forward-auth paths, where a request with
    X-Forwarded-Host carries the original request's Origin. `origins_setting` and
    `hosts_setting` name where an operator adds origins and hosts, for the refusals.
    """

    check_host: bool
    allowed_origins: frozenset[Origin] = frozenset()
    allowed_hosts: tuple[Authority, ...] = ()
    raw_body_paths: tuple[str, ...] = ()
    forwarded_paths: tuple[str, ...] = ()
    origins_setting: str = ORIGINS_SETTING
    hosts_setting: str = HOSTS_SETTING

    def host_allowed(self, host: Authority, scheme: str, local_address: str | None) -> bool:
        if is_loopback(host.name):
            return True
        if local_address is not None and _same_address(host.name, local_address):
            return True
        port = host.port if host.port is not None else DEFAULT_PORTS.get(scheme)
        return any(
            rule.name == host.name and rule.port in (None, port) for rule in self.allowed_hosts
        )


def listener_guard(
    listen_host: str,
    *,
    authenticated: bool,
    allowed_origins: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
    raw_body_paths: tuple[str, ...] = (),
    forwarded_paths: tuple[str, ...] = (),
    origins_setting: str = ORIGINS_SETTING,
    hosts_setting: str = HOSTS_SETTING,
) -> GuardConfig:
    """The guard of a listener bound to `listen_host`: the Host rule applies on loopback
    and wherever callers are not authenticated. Raises ValueError for a bad origin or
    host (the settings and flags check them earlier)."""
    config = GuardConfig(
        check_host=is_loopback(listen_host) or not authenticated,
        allowed_origins=frozenset(parse_origin(o) for o in allowed_origins),
        allowed_hosts=tuple(parse_host(h) for h in allowed_hosts),
        raw_body_paths=raw_body_paths,
        forwarded_paths=forwarded_paths,
        origins_setting=origins_setting,
        hosts_setting=hosts_setting,
    )
    if config.check_host and not is_loopback(listen_host) and not config.allowed_hosts:
        log.warning(
            "listening on %s without authentication: only requests whose Host is a loopback "
            "name or this listener's address are answered (421 otherwise); add the names "
            "clients use with %s",
            listen_host,
            hosts_setting,
        )
    return config


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _headers(scope: Scope) -> dict[str, list[str]]:
    wanted = (b"host", b"origin", b"content-type", b"x-forwarded-host")
    found: dict[str, list[str]] = {}
    for name, value in scope.get("headers") or ():
        key = bytes(name).lower()
        if key in wanted:
            found.setdefault(key.decode(), []).append(bytes(value).decode("latin-1"))
    return found


def _check_host(
    config: GuardConfig, scope: Scope, values: list[str]
) -> tuple[Authority | None, Refusal | None]:
    """The request's Host, when it may stand for the listener's own origin; or why not."""
    if len(values) > 1:
        return None, Refusal(400, "BadRequest", "Host", "a request has one Host header")
    if not values:
        if config.check_host or scope.get("http_version", "1.1") != "1.0":
            return None, Refusal(400, "BadRequest", "Host", "a Host header is required")
        return None, None
    host = parse_authority(values[0].strip())
    if host is None:
        return None, Refusal(
            400, "BadRequest", "Host", f"Host {quote(values[0], QUOTED)} is not host[:port]"
        )
    scheme = str(scope.get("scheme") or "http")
    local = (scope.get("server") or (None, None))[0]
    if config.check_host and not config.host_allowed(host, scheme, local):
        return None, Refusal(
            421,
            "HostNotAllowed",
            "Host",
            f"Host {quote(values[0], QUOTED)} is not served here (the Host rule, against DNS "
            "rebinding): this listener answers loopback names (localhost, 127.0.0.0/8, "
            f"[::1]), its own address and the hosts in {config.hosts_setting}",
        )
    return host, None


def _check_origin(
    config: GuardConfig, scope: Scope, headers: dict[str, list[str]], host: Authority | None
) -> Refusal | None:
    values = headers.get("origin")
    if not values:
        return None
    path = str(scope.get("path") or "")
    if any(v.strip() for v in headers.get("x-forwarded-host", ())) and _under(
        path, config.forwarded_paths
    ):
        return None  # a gateway's check: the Origin is the original request's
    rule = (
        "(the Origin rule, against cross-site requests): a browser request must come from "
        f"this listener's own origin or one in {config.origins_setting}"
    )
    if len(values) > 1:
        return Refusal(403, "OriginNotAllowed", "Origin", f"several Origin headers {rule}")
    value = values[0].strip()
    if value.lower() == "null":
        return Refusal(
            403,
            "OriginNotAllowed",
            "Origin",
            f"Origin null (a sandboxed page, a file, a redirect) is foreign {rule}",
        )
    origin = _origin(value)
    if origin is not None and origin in config.allowed_origins:
        return None
    if origin is not None and host is not None:
        scheme = str(scope.get("scheme") or "http")
        port = host.port if host.port is not None else DEFAULT_PORTS.get(scheme)
        if origin == Origin(scheme, host.name, port):
            return None
    return Refusal(
        403, "OriginNotAllowed", "Origin", f"Origin {quote(value, QUOTED)} is not allowed {rule}"
    )


def is_json_media_type(value: str) -> bool:
    """`application/json`, any case, with parameters; a charset, if any, UTF-8."""
    media_type, *parameters = value.split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for parameter in parameters:
        name, _, given = parameter.partition("=")
        charset = given.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return False
    return True


def _check_content_type(
    config: GuardConfig, scope: Scope, values: list[str] | None
) -> Refusal | None:
    if scope.get("method") not in BODY_METHODS or _under(
        str(scope.get("path") or ""), config.raw_body_paths
    ):
        return None
    if values is not None and len(values) == 1 and is_json_media_type(values[0]):
        return None
    got = "none" if not values else ", ".join(quote(v, QUOTED) for v in values[:2])
    return Refusal(
        415,
        "UnsupportedMediaType",
        "Content-Type",
        f"this endpoint takes a JSON body: send Content-Type: application/json (got {got})",
    )


def check_request(config: GuardConfig, scope: Scope) -> Refusal | None:
    """Why this request (an ASGI http or websocket scope) must not reach the
    application, or None: Host, then Origin, then the content type."""
    headers = _headers(scope)
    host, refusal = _check_host(config, scope, headers.get("host", []))
    if refusal is None:
        refusal = _check_origin(config, scope, headers, host)
    if refusal is None and scope.get("type") == "http":
        refusal = _check_content_type(config, scope, headers.get("content-type"))
    return refusal


class HttpGuard:
    """ASGI middleware: `check_request` on every request, refused ones answered here."""

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = check_request(self.config, scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        log.debug("refused %s %s: %s", scope.get("method"), scope.get("path"), refusal.message)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = refusal.body()
        await send(
            {
                "type": "http.response.start",
                "status": refusal.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
