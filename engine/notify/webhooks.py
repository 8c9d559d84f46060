"""Approval webhooks: every approval event POSTed, signed, to the endpoints configured.

Each event of the hub (`engine.notify.events`: approval.requested, approved, denied, used,
expired) goes to every endpoint that wants it, as JSON (`ApprovalEvent.payload()`, whose
`data.approval.url` is the approval's page in the console), signed per the Standard
Webhooks specification with the `standardwebhooks` package: headers `webhook-id` (the
event's id, the same on every retry: receivers drop duplicates by it),
`webhook-timestamp` (of the attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256>`),
so any Standard Webhooks library verifies them with the endpoint's `whsec_…` secret.
An endpoint may take Slack's incoming-webhook body instead (`format: slack`: `text` and
`blocks`, with the console link as a button), signed the same way (Slack ignores the
headers). Nothing is ever sent unsigned: an endpoint without a secret refuses to start.

Delivery is off the decision path. The service publishes into the hub without waiting;
each endpoint has a queue of its own (a hub subscription, bounded: when it is full the
oldest event is dropped and counted) and one worker that delivers its events in order, so
the events of one approval arrive in the order they happened, and a receiver that hangs
or fails holds up only its own queue. An attempt that fails on the network, times out
(`timeout_seconds`, the whole attempt) or is answered 5xx or 429 is tried again after an
exponential backoff with jitter (a `Retry-After` is honoured, up to RETRY_AFTER_CAP
seconds), at most `attempts` times; any other non-2xx answer is not retried. Every
failed attempt is logged at WARNING, naming the endpoint by host:port only (a webhook
URL's path often is its secret, as Slack's are). Requests go through one pooled aiohttp
session, the client the service already uses for OPA and JWKS: delivery runs on the
decisions' event loop, and it costs a fraction of the CPU per request httpx does
(bench/approvals.py measures what delivery costs decisions). The environment's
http_proxy, https_proxy and no_proxy apply, read at start. `/metrics` has
`mcp_policy_webhook_deliveries_total{endpoint,result}` (delivered, failed, retried,
dropped), `mcp_policy_webhook_queue_depth{endpoint}` and
`mcp_policy_webhook_delivery_seconds{endpoint}` (event published to receiver's 2xx).

Configuration: `MCP_POLICY_APPROVAL_WEBHOOK_URLS` (comma-separated) with
`MCP_POLICY_APPROVAL_WEBHOOK_SECRET` (`whsec_` + base64 of 24 to 64 bytes), every event
in the standard format with the defaults below; and/or `MCP_POLICY_APPROVAL_WEBHOOK_FILE`,
a YAML file of endpoints with options of their own:

    endpoints:
      - url: https://hooks.example/mcp-approvals   # http or https
        secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwcm9vdA==
                                 # default: MCP_POLICY_APPROVAL_WEBHOOK_SECRET
        format: standard         # standard (default) | slack
        events: [approval.requested, approval.expired]    # default: all five
        timeout_seconds: 5       # one attempt, connecting to reading the answer (5)
        attempts: 5              # tries before giving up on an event (5)
        queue: 1000              # events waiting at most; then the oldest is dropped (1000)
      - url: https://hooks.slack.example/services/T000/B000/XXXX
        format: slack
        events: [approval.requested]

A mistake in either (a URL that is not http(s), a secret that is not `whsec_` + base64,
an unknown event, format or key) refuses to start with one line naming it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import json
import logging
import random
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import aiohttp
import yaml
from standardwebhooks import Webhook

from engine.notify.events import ApprovalEvent, ApprovalEvents, EventType, Subscription
from engine.transports.tls import StartupRefused, is_loopback

if TYPE_CHECKING:
    from engine.obs.metrics import Metrics
    from engine.settings import Settings

log = logging.getLogger(__name__)

Format = Literal["standard", "slack"]
FORMATS: tuple[Format, ...] = ("standard", "slack")
RESULTS = ("delivered", "failed", "retried", "dropped")
DEFAULT_TIMEOUT = 5.0
DEFAULT_ATTEMPTS = 5
DEFAULT_QUEUE = 1000
MAX_ATTEMPTS = 20
MAX_QUEUE = 100_000
MAX_TIMEOUT = 300.0
BACKOFF_BASE = 1.0  # seconds before the 2nd attempt; doubled for each further one
BACKOFF_CAP = 60.0
RETRY_AFTER_CAP = 60.0
SHUTDOWN_GRACE = 2.0  # seconds the queues get to drain when the service stops
SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)  # the specification's range for a secret's length
BODY_CACHE = 512  # bodies kept for the endpoints still to send them
ANSWER_BYTES = 64 * 1024  # of a receiver's answer read (then the connection is dropped)
USER_AGENT = "mcp-policy-engine-webhooks"
FILE_KEYS = ("url", "secret", "format", "events", "timeout_seconds", "attempts", "queue")


class WebhookConfigError(StartupRefused):
    """The webhook configuration cannot be used; the message names what is wrong."""


# ---------------------------------------------------------------------------- configuration


def check_url(url: str) -> str:
    """`url` if it is an absolute http(s) URL with a host; ValueError (without the URL's
    path or query, which may be a secret) otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"a webhook URL is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        shown = parts.scheme or "none"
        raise ValueError(f"a webhook URL must be http:// or https:// (scheme {shown!r})")
    if not parts.hostname:
        raise ValueError("a webhook URL needs a host (http(s)://host[:port]/path)")
    if parts.fragment:
        raise ValueError(f"the webhook URL to {parts.hostname} must not have a #fragment")
    if port == 0:
        raise ValueError(f"the webhook URL to {parts.hostname} has port 0")
    return url


def check_secret(secret: str) -> str:
    """`secret` if it is `whsec_` + base64 of 24 to 64 bytes; ValueError (which never
    shows it) otherwise."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(
            "a webhook secret must be in the Standard Webhooks form whsec_<base64>, e.g. "
            "whsec_$(openssl rand -base64 32)"
        )
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret's part after whsec_ is not valid base64") from None
    low, high = SECRET_BYTES
    if not low <= len(raw) <= high:
        raise ValueError(
            f"a webhook secret must hold {low} to {high} bytes (base64 after whsec_); this "
            f"one holds {len(raw)}"
        )
    return secret


def endpoint_label(url: str) -> str:
    """host:port of `url`: how an endpoint is named in logs and metrics (never its path)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    url: str = field(repr=False)  # its path or query may be a secret
    secret: str = field(repr=False)
    format: Format = "standard"
    events: frozenset[EventType] = frozenset(EventType)
    timeout: float = DEFAULT_TIMEOUT
    attempts: int = DEFAULT_ATTEMPTS
    queue: int = DEFAULT_QUEUE

    @property
    def label(self) -> str:
        return endpoint_label(self.url)


def endpoints_from(settings: Settings) -> list[Endpoint]:
    """The endpoints `settings` configure: the URLs with the shared secret, then the file's.
    Raises WebhookConfigError naming the first mistake."""
    default = settings.approval_webhook_secret
    secret = default.get_secret_value() if default is not None else None
    found = []
    for url in settings.webhook_urls:
        if secret is None:  # Settings refuses this too; kept for direct callers
            raise WebhookConfigError(
                "MCP_POLICY_APPROVAL_WEBHOOK_URLS needs MCP_POLICY_APPROVAL_WEBHOOK_SECRET: "
                "webhooks are always signed"
            )
        found.append(Endpoint(url=url, secret=secret))
    if settings.approval_webhook_file is not None:
        found += read_file(settings.approval_webhook_file, secret)
    return found


def read_file(path: Path, default_secret: str | None) -> list[Endpoint]:
    """The endpoints of a webhook file (the format is in this module's docstring)."""
    where = f"MCP_POLICY_APPROVAL_WEBHOOK_FILE {path}"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WebhookConfigError(f"{where}: cannot read it ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise WebhookConfigError(f"{where}: not valid YAML{line}") from None
    if not isinstance(doc, dict) or set(doc) != {"endpoints"}:
        raise WebhookConfigError(f"{where}: must be a mapping with one key, endpoints (a list)")
    entries = doc["endpoints"]
    if not isinstance(entries, list) or not entries:
        raise WebhookConfigError(f"{where}: endpoints must be a non-empty list")
    endpoints = []
    for number, entry in enumerate(entries, 1):
        try:
            endpoints.append(_entry(entry, default_secret))
        except ValueError as exc:
            raise WebhookConfigError(f"{where}: endpoint {number}: {exc}") from None
    return endpoints


def _entry(entry: object, default_secret: str | None) -> Endpoint:
    if not isinstance(entry, dict):
        raise ValueError("must be a mapping with at least url")
    unknown = sorted(str(key) for key in entry if key not in FILE_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(FILE_KEYS)})")
    url = entry.get("url")
    if not isinstance(url, str):
        raise ValueError("url is missing (an http:// or https:// URL)")
    check_url(url)
    secret = entry.get("secret", default_secret)
    if secret is None:
        raise ValueError(
            "no secret: give it a secret (whsec_…) or set MCP_POLICY_APPROVAL_WEBHOOK_SECRET; "
            "webhooks are always signed"
        )
    if not isinstance(secret, str):
        raise ValueError("secret must be a string (whsec_…)")
    check_secret(secret)
    form = entry.get("format", "standard")
    if form not in FORMATS:
        raise ValueError(f"unknown format {str(form)!r} (known: {', '.join(FORMATS)})")
    return Endpoint(
        url=url,
        secret=secret,
        format=form,
        events=_events(entry.get("events")),
        timeout=_number(entry, "timeout_seconds", DEFAULT_TIMEOUT, 0.0, MAX_TIMEOUT),
        attempts=int(_number(entry, "attempts", DEFAULT_ATTEMPTS, 1, MAX_ATTEMPTS, whole=True)),
        queue=int(_number(entry, "queue", DEFAULT_QUEUE, 1, MAX_QUEUE, whole=True)),
    )


def _events(value: object) -> frozenset[EventType]:
    if value is None:
        return frozenset(EventType)
    known = ", ".join(e.value for e in EventType)
    if not isinstance(value, list) or not value:
        raise ValueError(f"events must be a non-empty list of: {known}")
    events = set()
    for name in value:
        try:
            events.add(EventType(name))
        except ValueError:
            raise ValueError(f"unknown event {str(name)!r} (known: {known})") from None
    return frozenset(events)


def _number(
    entry: dict[str, Any], key: str, default: float, low: float, high: float, *, whole: bool = False
) -> float:
    value = entry.get(key, default)
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
        raise ValueError(f"{key} must be {kind}")
    if not (low < value <= high if low == 0 else low <= value <= high):
        bound = f"over 0 and at most {high:g}" if low == 0 else f"{low:g} to {high:g}"
        raise ValueError(f"{key} must be {bound} (got {value})")
    return float(value)


# ---------------------------------------------------------------------------- bodies


def standard_body(event: ApprovalEvent) -> str:
    """The event as Standard Webhooks JSON (compact)."""
    return json.dumps(event.payload(), separators=(",", ":"), ensure_ascii=False)


TITLES = {
    EventType.REQUESTED: "Approval requested",
    EventType.APPROVED: "Approved",
    EventType.DENIED: "Denied",
    EventType.USED: "Approved call went through",
    EventType.EXPIRED: "Approval expired",
}
SLACK_FIELD_CHARS = 1900  # Slack allows 2000 per field
SLACK_TEXT_CHARS = 2900  # and 3000 per section text


def slack_escape(text: str, limit: int = SLACK_FIELD_CHARS) -> str:
    """`text` safe in Slack mrkdwn: &, < and > escaped (so nothing in it becomes a link or
    a mention such as <!channel>), cut to `limit` characters."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(event: ApprovalEvent) -> dict[str, Any]:
    """Slack's incoming-webhook body for `event`: `text` (what notifications show) and
    `blocks`: the reason, the call's tool, server, agent / user and status, and the
    console link as a button."""
    approval = event.approval
    title = TITLES[event.type]
    principal = approval.principal
    proof = {"credential": "proven", "caller": "asserted by its proxy", "none": "unproven"}
    who = f"{principal.agent_id or '(no agent id)'} / {principal.user_id or '(no user id)'}"
    status = approval.status.value
    if approval.approver:
        status += f" by {approval.approver}"
    fields = [
        ("Tool", approval.tool),
        ("Server", approval.server),
        (
            "Agent / user",
            f"{who} ({proof.get(approval.principal_proof, approval.principal_proof)})",
        ),
        ("Status", status),
        ("Rule", approval.rule),
        ("Approval", approval.id),
    ]
    if approval.comment:
        fields.append(("Comment", approval.comment))
    text = f"{title}: {approval.tool} on {approval.server} ({who}): {approval.reason}"
    link = approval.url
    if link:
        text = f"{slack_escape(text, SLACK_TEXT_CHARS)} <{slack_escape(link, 2900)}|Open>"
    else:
        text = slack_escape(text, SLACK_TEXT_CHARS)
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"*{title}*\n{slack_escape(approval.reason, SLACK_TEXT_CHARS)}",
            },
            "fields": [
                {"type": "mrkdwn", "text": f"*{name}*\n{slack_escape(value)}"}
                for name, value in fields
            ],
        }
    ]
    if link:
        button: dict[str, Any] = {
            "type": "button",
            "text": {"type": "plain_text", "text": "Open in console"},
            "url": link,
            "action_id": "open_approval",
        }
        if event.type is EventType.REQUESTED:
            button["style"] = "primary"
        blocks.append({"type": "actions", "elements": [button]})
    return {"text": text, "blocks": blocks}


BODIES: dict[Format, Callable[[ApprovalEvent], str]] = {
    "standard": standard_body,
    "slack": lambda event: json.dumps(slack_body(event), separators=(",", ":")),
}


def sign(signer: Webhook, event_id: str, body: str, now: float) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt to deliver `body`."""
    at = datetime.fromtimestamp(int(now), UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": signer.sign(event_id, at, body),
    }


# ---------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class EndpointStats:
    """One endpoint's counts, read by /metrics at scrape time."""

    label: str
    delivered: int
    failed: int
    retried: int
    dropped: int
    queued: int


def _wanted_by(endpoint: Endpoint) -> Callable[[ApprovalEvent], bool]:
    """The events an endpoint's queue takes: this replica's own (a relayed one is sent by
    the replica where it happened, engine.notify.relay), of the kinds it is sent."""

    def wanted(event: ApprovalEvent) -> bool:
        return event.local and event.type in endpoint.events

    return wanted


@dataclass
class _Worker:
    endpoint: Endpoint
    signer: Webhook
    subscription: Subscription
    proxy: str | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = None
    delivered: int = 0
    failed: int = 0
    retried: int = 0

    def stats(self) -> EndpointStats:
        sub = self.subscription
        return EndpointStats(
            self.endpoint.label,
            self.delivered,
            self.failed,
            self.retried,
            sub.dropped,
            sub.pending(),
        )


@dataclass(frozen=True)
class _Failure:
    why: str
    retry: bool
    retry_after: float | None = None


class WebhookDispatcher:
    """Delivers the hub's events to the endpoints; `start` after the service, `stop`
    before it. Without endpoints it does nothing."""

    def __init__(
        self,
        endpoints: Iterable[Endpoint],
        events: ApprovalEvents,
        metrics: Metrics | None = None,
        *,
        backoff: float = BACKOFF_BASE,
    ) -> None:
        self.endpoints = list(endpoints)
        self._hub = events
        self._metrics = metrics
        self._backoff = backoff
        self._workers: list[_Worker] = []
        self._client: aiohttp.ClientSession | None = None
        self._bodies: OrderedDict[tuple[str, Format], str] = OrderedDict()
        if metrics is not None and self.endpoints:
            metrics.watch_webhooks(self.stats)

    def stats(self) -> list[EndpointStats]:
        return [worker.stats() for worker in self._workers]

    async def start(self) -> None:
        if not self.endpoints or self._workers:
            return
        # One pool for every endpoint; each request carries its endpoint's timeout and
        # proxy. No limit on the pool: a worker has one request in flight at a time, so
        # the endpoints bound it, and a limit would let hanging receivers take every
        # connection. (aiohttp's trust_env would look the proxy and ~/.netrc up in a
        # thread on every request, doubling a delivery's CPU.)
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
        )
        for endpoint in self.endpoints:
            worker = _Worker(
                endpoint,
                Webhook(endpoint.secret),
                self._hub.subscribe(maxsize=endpoint.queue, accept=_wanted_by(endpoint)),
                proxy_for(endpoint.url),
            )
            worker.task = asyncio.create_task(self._run(worker), name=f"webhook {endpoint.label}")
            self._workers.append(worker)
            if self._metrics is not None:  # the series exists from the start
                self._metrics.webhook_seconds.labels(endpoint.label)
            plain = urlsplit(endpoint.url)
            if plain.scheme == "http" and not is_loopback(plain.hostname or ""):
                log.warning(
                    "approval webhook to %s is plain http: approvals (the calls' arguments "
                    "included) cross the network unencrypted",
                    endpoint.label,
                )
        log.info(
            "approval webhooks: %s",
            ", ".join(f"{e.label} ({e.format})" for e in self.endpoints),
        )

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop taking events, give the queues `grace` seconds to drain, then stop."""
        if not self._workers:
            return
        for worker in self._workers:
            worker.subscription.close()  # the worker ends once its queue is empty
        tasks = [w.task for w in self._workers if w.task is not None]
        _, running = await asyncio.wait(tasks, timeout=grace) if tasks else (set(), set())
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lost = sum(w.subscription.pending() for w in self._workers)
        if lost:
            log.warning("approval webhooks: %d event(s) not delivered at shutdown", lost)
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _run(self, worker: _Worker) -> None:
        async for event in worker.subscription:
            try:
                await self._deliver(worker, event)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one endpoint's worker die
                worker.failed += 1
                log.exception(
                    "approval webhook to %s: %s %s could not be delivered",
                    worker.endpoint.label,
                    event.type.value,
                    event.id,
                )

    def _body(self, form: Format, event: ApprovalEvent) -> str:
        """The body of `event` in `form`, made once for all endpoints that take it."""
        key = (event.id, form)
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = BODIES[form](event)
            while len(self._bodies) > BODY_CACHE:
                self._bodies.popitem(last=False)
        return body

    async def _deliver(self, worker: _Worker, event: ApprovalEvent) -> None:
        endpoint = worker.endpoint
        text = self._body(endpoint.format, event)
        body = text.encode()
        for attempt in range(1, endpoint.attempts + 1):
            failure = await self._attempt(worker, event, body, text)
            if failure is None:
                worker.delivered += 1
                if self._metrics is not None:
                    seconds = max(0.0, time.time() - event.at.timestamp())
                    self._metrics.webhook_seconds.labels(endpoint.label).observe(seconds)
                return
            last = attempt == endpoint.attempts or not failure.retry
            if last:
                worker.failed += 1
                outcome = "giving up" if failure.retry else "not retried"
            else:
                delay = self._delay(attempt, failure.retry_after)
                worker.retried += 1
                outcome = f"retrying in {delay:.1f} s"
            log.warning(
                "approval webhook to %s: %s %s, attempt %d of %d: %s; %s",
                endpoint.label,
                event.type.value,
                event.id,
                attempt,
                endpoint.attempts,
                failure.why,
                outcome,
            )
            if last:
                return
            await asyncio.sleep(delay)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (half to all of base * 2^(attempt-1), capped);
        a receiver's Retry-After, when longer, up to RETRY_AFTER_CAP."""
        ceiling = min(BACKOFF_CAP, self._backoff * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
        return delay

    async def _attempt(
        self, worker: _Worker, event: ApprovalEvent, body: bytes, text: str
    ) -> _Failure | None:
        """One POST; None when the receiver answered 2xx."""
        assert self._client is not None
        endpoint = worker.endpoint
        headers = sign(worker.signer, event.id, text, time.time())
        try:
            async with asyncio.timeout(endpoint.timeout):
                async with self._client.post(
                    endpoint.url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    proxy=worker.proxy,
                ) as response:
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
                    await _drain(response)
        except TimeoutError:
            return _Failure(f"no answer within {endpoint.timeout:g} s", retry=True)
        except (aiohttp.ClientError, OSError) as exc:
            return _Failure(_network_problem(exc), retry=True)
        if 200 <= status < 300:
            return None
        if status == 429 or status >= 500:
            return _Failure(
                f"HTTP {status}", retry=True, retry_after=parse_retry_after(retry_after)
            )
        return _Failure(f"HTTP {status}", retry=False)


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read a small answer to its end (so the connection is kept); drop a large one."""
    read = 0
    async for chunk in response.content.iter_chunked(16 * 1024):
        read += len(chunk)
        if read > ANSWER_BYTES:
            response.close()
            return


def _network_problem(exc: BaseException) -> str:
    """What went wrong, without the URL (its path may be a secret)."""
    kind = type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None:
        error = getattr(cause, "os_error", None) if not isinstance(cause, OSError) else cause
        if isinstance(error, OSError) and error.strerror:
            return f"{kind}: {error.strerror}"
        cause = cause.__cause__
    return kind


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (http_proxy / https_proxy, unless
    no_proxy covers its host), read once when delivery starts."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy is None or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
