"""The console's routes: sign-in, the pending list, one page per approval, history, the
live event stream, approve / deny and sign-out.

Signed out, every route but the sign-in page and the static files answers 303 to the
sign-in page (401 to a script asking for JSON). Every POST needs the session's CSRF token
(form field `csrf_token` or header `X-CSRF-Token`, compared in constant time) and is
refused 403 without it, before anything is read or changed; the sign-in form, which has no
session yet, carries a token that must match its own cookie (double submit). Bodies are
forms (`application/x-www-form-urlencoded`), read strictly and bounded; the service's
Host/Origin guard (engine/transports/guard.py) runs before any of this.

Who may sign in with a secret: an approvers-file entry, or the operator token where it is
the approver (single-token mode). An operator-only credential, an agent's API key or JWT,
a proxy's client token and bearer JWTs (approvers with an issuer sign in with OpenID
Connect) are refused. Approve and deny are `DecisionService.decide_approval`, listing is
`page_approvals`, and viewing is checked with `approver_auth.refusal`: the rules (four
eyes, allowed servers and tools, caller approvals) live there, never here. An approval the
signed-in person may not view answers 404, exactly as an unknown id.

The event stream (`/console/events`, server-sent events) carries the events of approvals
the person may view, each with the approval's card rendered for their session; it sends a
heartbeat comment every `HEARTBEAT_SECONDS`, ends after `STREAM_SECONDS` (the browser
reconnects by itself) or as soon as the session ends (a `signed-out` event first), and a
session may hold at most `MAX_STREAMS_PER_SESSION` streams at once (429 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from engine import approver_auth
from engine.console import pages
from engine.console import session as sessions
from engine.console.session import ConsoleSession, SessionStore
from engine.errors import (
    MAX_MESSAGE_CHARS,
    EngineError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    StateUnavailable,
    Unauthenticated,
    bounded,
)
from engine.identity.base import Identity
from engine.identity.secrets_file import SecretEntry, SecretsFile, hash_secret
from engine.models import Approval, ApprovalStatus
from engine.notify.events import ApprovalEvent
from engine.state.approvals import ApprovalCursor
from engine.state.decision_log import DecisionQuery
from engine.transports.http_app import read_body, status_for

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from engine.runtime import Runtime

log = logging.getLogger(__name__)

PREFIX = "/console"  # where the service serves the console (behind a gateway: base_path)
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 16
MAX_SECRET_CHARS = 1024
MAX_COMMENT_CHARS = 4096
MAX_FILTER_CHARS = 256
MAX_ID_CHARS = 256
PAGE_SIZE = 25
HISTORY_READS = 20  # page_approvals calls one history page may make at most
SESSION_DECISIONS = 20  # recent decisions of the same session on an approval's page
MAX_STREAMS_PER_SESSION = 4
STREAM_SECONDS = 300.0
HEARTBEAT_SECONDS = 15.0
EVENT_QUEUE = 200
RETRY_MS = 2000
FORM_TYPE = "application/x-www-form-urlencoded"
SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        b"object-src 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
)
# What a page says for an unknown id and for one the person may not view: the same words.
NO_SUCH_APPROVAL = "There is no approval with this id that you may view."
NOT_AN_APPROVER = (
    "that secret is not an approver's: unknown, revoked, or another kind of credential "
    "(an agent's key, a proxy's token)"
)


class SignInRequired(Exception):
    """The request needs a session and has none."""


class Refused(Exception):
    """A request the console refuses: `status` and a message for the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- mounting ---------------------------------------------------------------------------------


class ConsoleMount(Mount):
    """`Mount` that also takes the bare prefix (`/console`, which a plain mount leaves to
    the parent app) as the console's home page."""

    def matches(self, scope: Scope) -> Any:
        path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope["type"] == "http" and path == self.path:
            scope = {**scope, "path": scope["path"] + "/"}
            match, child = super().matches(scope)
            child["path"] = scope["path"]
            return match, child
        return super().matches(scope)


def mount_console(app: FastAPI, runtime: Runtime) -> None:
    """Serve the console under /console of `app`."""
    app.router.routes.append(ConsoleMount(PREFIX, app=create_console(runtime)))


class SecurityHeaders:
    """ASGI middleware: the console's security headers on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {bytes(name).lower() for name, _ in headers}
                headers += [(n, v) for n, v in SECURITY_HEADERS if n not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- helpers ----------------------------------------------------------------------------------


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


# Sent by the console's script with requests the person did not make (a refresh after
# the live stream reconnected): they do not keep an idle session alive.
BACKGROUND_HEADER = "X-Console-Background"


def signed_in(request: Request, *, background: bool = False) -> ConsoleSession:
    background = background or request.headers.get(BACKGROUND_HEADER) is not None
    found = sessions.current(request, touch=not background)
    if found is None:
        raise SignInRequired()
    return found


async def read_form(request: Request) -> dict[str, str]:
    """The request's form fields; Refused for anything but a small, well-formed form."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != FORM_TYPE:
        raise Refused(415, f"send the form as {FORM_TYPE}")
    body = await read_body(request, MAX_FORM_BYTES)
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "the form is not well-formed (UTF-8, at most 16 fields)") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise Refused(400, f"the form has the field {bounded(name, 64)!r} twice")
        form[name] = value
    return form


def check_csrf(request: Request, session: ConsoleSession, form: dict[str, str] | None) -> None:
    given = request.headers.get(sessions.CSRF_HEADER)
    if given is None and form is not None:
        given = form.get(sessions.CSRF_FIELD)
    if not sessions.check_csrf(session, given):
        raise Refused(
            403,
            "this request did not carry this session's form token (CSRF): reload the page "
            "and try again",
        )


async def checked_form(request: Request, session: ConsoleSession) -> dict[str, str]:
    """The form of a POST, after its CSRF token was checked (the header, when sent, is
    checked before the body is read)."""
    if request.headers.get(sessions.CSRF_HEADER) is not None:
        check_csrf(request, session, None)
        return await read_form(request)
    form = await read_form(request)
    check_csrf(request, session, form)
    return form


def sign_in_refusal(identity: Identity) -> str | None:
    """Why `identity` may not use the console, or None.

    Approvers may; so may a person who decides only their own agents' calls where the
    policy lets the caller approve (an approvers-file entry with role "caller", or a
    person signed in through OpenID Connect without the approver role), as long as they
    are named by a user_id. The operator token may only where it is the approver
    (single-token mode); bearer JWTs never (their people sign in with OpenID Connect)."""
    credential = approver_auth.credential_of(identity)
    if credential == "jwt":
        return (
            "tokens from the approvers' issuer cannot be pasted here: sign in with OpenID "
            "Connect instead"
        )
    if approver_auth.APPROVER in identity.roles:
        return None
    if credential == "operator_token":
        return (
            "the operator credential cannot sign in to the console while named approvers "
            "are configured: sign in with your own approver secret"
        )
    caller = credential == "oidc" or approver_auth.CALLER in identity.roles
    if caller and identity.user_id:
        return None
    return f"{identity.subject!r} is not an approver"


def _entry_of(file: SecretsFile, digest: str) -> SecretEntry | None:
    return next((e for e in file.entries if e.sha256 == digest and not e.revoked), None)


def entry_still_valid(file: SecretsFile, name: str, digest: str) -> Callable[[], bool] | None:
    """A check that the approvers-file entry `name`, whose secret hashes to `digest`, is
    still in force as it is now (not revoked, its secret, roles and limits unchanged);
    None when it is not in force even now. The file is read again at most once a
    second, as the API's lookups do."""
    file.reload()
    signed_in = _entry_of(file, digest)
    if signed_in is None or signed_in.name != name:
        return None
    checked = [time.monotonic()]

    def valid() -> bool:
        now = time.monotonic()
        if now - checked[0] >= file.check_interval:
            checked[0] = now
            file.reload()
        return _entry_of(file, digest) == signed_in

    return valid


def _parse_time(text: str, field: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Refused(
            400, f"{field}: {bounded(text, 64)!r} is not a time like 2025-01-31T13:45"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _filter_text(request: Request, name: str) -> str:
    value = request.query_params.get(name, "").strip()
    if len(value) > MAX_FILTER_CHARS:
        raise Refused(400, f"{name}: at most {MAX_FILTER_CHARS} characters")
    return value


def _page_token(request: Request) -> ApprovalCursor | None:
    token = request.query_params.get("page", "")
    if not token:
        return None
    if len(token) > MAX_ID_CHARS:
        raise Refused(400, "page: not a token from a previous page")
    try:
        return ApprovalCursor.from_token(token, field="page")
    except InvalidRequest as exc:
        raise Refused(400, exc.message) from None


# -- the app ----------------------------------------------------------------------------------


def create_console(runtime: Runtime) -> FastAPI:
    """The console as an app of its own (mounted under /console)."""
    settings = runtime.settings
    service = runtime.service
    auth = runtime.approver_auth
    metrics = runtime.metrics
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    store = SessionStore.from_settings(settings)
    app.state.console_sessions = store
    base = store.base  # where people reach the console: links and redirects start here
    sign_in_path = base + "/sign-in"
    app.state.settings = settings
    app.state.runtime = runtime
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")

    def refused(request: Request, status: int, message: str) -> Response:
        message = bounded(message, MAX_MESSAGE_CHARS)
        if wants_json(request):
            return JSONResponse({"error": {"status": status, "message": message}}, status)
        titles = {
            400: "Bad request",
            403: "Refused",
            404: "Not found",
            409: "Already decided",
            413: "Too large",
            415: "Not a form",
            422: "Not accepted",
            429: "Too many",
            503: "Unavailable",
        }
        return pages.error_page(request, status, titles.get(status, "Error"), message)

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, _: SignInRequired) -> Response:
        if wants_json(request):
            return JSONResponse({"error": {"status": 401, "message": "signed out"}}, 401)
        target = sign_in_path
        if request.method == "GET":
            here = base + request.url.path.removeprefix(PREFIX)
            if request.url.query:
                here += "?" + request.url.query
            target += "?" + urlencode({"next": sessions.safe_next(here, base)})
        return RedirectResponse(target, status_code=303)

    @app.exception_handler(Refused)
    async def on_refused(request: Request, exc: Refused) -> Response:
        return refused(request, exc.status, exc.message)

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> Response:
        return refused(request, status_for(exc), exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if sessions.current(request) is None:
            return await sign_in_required(request, SignInRequired())
        return refused(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        log.error(
            "console: internal error answering %s %s",
            request.method,
            request.url.path,
            exc_info=exc,
        )
        return refused(request, 500, "internal error; the service log has the cause")

    # -- signing in and out ---------------------------------------------------------------

    @app.get("/sign-in")
    async def sign_in_form(request: Request) -> Response:
        # Shown signed in too (to sign in as someone else: that ends this session).
        return pages.sign_in_page(request, next_url=request.query_params.get("next"))

    @app.post("/sign-in")
    async def sign_in_submit(request: Request) -> Response:
        try:
            form = await read_form(request)
        except Refused as exc:
            return pages.sign_in_page(request, error=exc.message, status=exc.status)
        next_url = form.get("next")
        if not sessions.check_token(
            request.cookies.get(pages.PRE_COOKIE), form.get(sessions.CSRF_FIELD)
        ):
            return pages.sign_in_page(
                request,
                error="the sign-in form expired or was not this browser's: try again",
                status=403,
                next_url=next_url,
            )
        secret = form.get("secret", "")
        if not secret or len(secret) > MAX_SECRET_CHARS:
            return pages.sign_in_page(
                request, error="enter your approver secret", status=422, next_url=next_url
            )
        try:
            identity = await auth.authenticate(f"Bearer {secret}")
            problem = sign_in_refusal(identity)
        except StateUnavailable as exc:
            metrics.console_sign_ins.labels("secret", "unavailable").inc()
            log.warning("console sign-in could not be checked: %s", exc.message)
            return pages.sign_in_page(request, error=exc.message, status=503, next_url=next_url)
        except (Unauthenticated, PermissionDenied):
            identity, problem = None, NOT_AN_APPROVER
        if identity is None or problem is not None:
            metrics.console_sign_ins.labels("secret", "refused").inc()
            log.info(
                "console sign-in refused%s",
                f" for {identity.subject!r}: {problem}" if identity is not None else "",
            )
            return pages.sign_in_page(request, error=problem, status=403, next_url=next_url)
        still_valid = None
        if approver_auth.credential_of(identity) == "approvers_file" and auth.approvers:
            still_valid = entry_still_valid(auth.approvers, identity.subject, hash_secret(secret))
            if still_valid is None:  # revoked since the lookup's copy of the file was read
                metrics.console_sign_ins.labels("secret", "refused").inc()
                return pages.sign_in_page(
                    request, error=NOT_AN_APPROVER, status=403, next_url=next_url
                )
        metrics.console_sign_ins.labels("secret", "signed_in").inc()
        log.info(
            "console sign-in: %r (%s)", identity.subject, approver_auth.credential_of(identity)
        )
        response = await sessions.sign_in(request, identity, next_url, still_valid=still_valid)
        response.delete_cookie(pages.PRE_COOKIE, path=base)
        return response

    @app.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        session = signed_in(request)
        await checked_form(request, session)
        response = RedirectResponse(sign_in_path, status_code=303)
        sessions.sign_out(request, response)
        log.info("console sign-out: %r", session.identity.subject)
        return response

    # -- pages ----------------------------------------------------------------------------

    def card_context(session: ConsoleSession, approval: Approval) -> dict[str, Any]:
        identity = session.identity
        pending = approval.status is ApprovalStatus.PENDING
        return {
            "a": approval,
            "may_decide": pending and approver_auth.refusal(identity, approval, "approve") is None,
            "now": datetime.now(UTC),
        }

    def card_html(session: ConsoleSession, approval: Approval) -> str:
        context = {
            **card_context(session, approval),
            "session": session,
            "csrf_field": sessions.CSRF_FIELD,
            "csrf": session.csrf,
            "base": base,
        }
        return pages.ENV.get_template("_card.html").render(context)

    @app.get("/")
    async def pending(request: Request) -> Response:
        session = signed_in(request)
        after = _page_token(request)
        page = await service.page_approvals(
            session.identity, ApprovalStatus.PENDING, PAGE_SIZE, after
        )
        cards = [card_context(session, a) for a in page.approvals]
        more = None
        if page.next is not None:
            more = base + "?" + urlencode({"page": page.next.token()})
        return pages.render(
            request, "pending.html", {"session": session, "cards": cards, "more": more}
        )

    async def viewable(session: ConsoleSession, approval_id: str) -> Approval:
        if not approval_id or len(approval_id) > MAX_ID_CHARS:
            raise Refused(404, NO_SUCH_APPROVAL)
        try:
            approval = await service.get_approval(approval_id)
        except (NotFound, InvalidRequest):
            raise Refused(404, NO_SUCH_APPROVAL) from None
        if approver_auth.refusal(session.identity, approval, "view") is not None:
            raise Refused(404, NO_SUCH_APPROVAL)
        return approval

    @app.get("/approvals/{approval_id}")
    async def approval_page(request: Request, approval_id: str) -> Response:
        session = signed_in(request)
        approval = await viewable(session, approval_id)
        decisions: list[dict[str, Any]] = []
        log_note = None
        principal = approval.principal
        try:
            decisions, _ = await service.list_decisions(
                DecisionQuery(
                    session_id=principal.session_id,
                    agent_id=principal.agent_id,
                    limit=SESSION_DECISIONS,
                )
            )
        except StateUnavailable as exc:
            log_note = exc.message
        return pages.render(
            request,
            "approval.html",
            {
                "session": session,
                **card_context(session, approval),
                "decisions": decisions,
                "log_note": log_note,
            },
        )

    @app.get("/history")
    async def history(request: Request) -> Response:
        session = signed_in(request)
        status_text = _filter_text(request, "status")
        try:
            status = ApprovalStatus(status_text) if status_text else None
        except ValueError:
            raise Refused(
                400,
                f"status: {bounded(status_text, 32)!r} is none of "
                + ", ".join(s.value for s in ApprovalStatus),
            ) from None
        server = _filter_text(request, "server")
        tool = _filter_text(request, "tool")
        agent = _filter_text(request, "agent")
        since = _parse_time(_filter_text(request, "since"), "since")
        until = _parse_time(_filter_text(request, "until"), "until")
        after = _page_token(request)

        def wanted(a: Approval) -> bool:
            return (
                (not server or a.server == server)
                and (not tool or a.tool == tool)
                and (not agent or a.principal.agent_id == agent)
                and (until is None or a.created_at <= until)
            )

        found: list[Approval] = []
        next_cursor: ApprovalCursor | None = after
        for _ in range(HISTORY_READS):
            page = await service.page_approvals(
                session.identity, status, PAGE_SIZE - len(found), next_cursor
            )
            next_cursor = page.next
            older = False
            for approval in page.approvals:
                if since is not None and approval.created_at < since:
                    older = True  # newest first: everything after this is older too
                    break
                if wanted(approval):
                    found.append(approval)
            if older:
                next_cursor = None
            if next_cursor is None or len(found) >= PAGE_SIZE:
                break
        filters = {
            "status": status_text,
            "server": server,
            "tool": tool,
            "agent": agent,
            "since": request.query_params.get("since", "")[:MAX_FILTER_CHARS],
            "until": request.query_params.get("until", "")[:MAX_FILTER_CHARS],
        }
        more = None
        if next_cursor is not None:
            query = {k: v for k, v in filters.items() if v}
            query["page"] = next_cursor.token()
            more = base + "/history?" + urlencode(query)
        return pages.render(
            request,
            "history.html",
            {
                "session": session,
                "approvals": found,
                "filters": filters,
                "statuses": [s.value for s in ApprovalStatus],
                "more": more,
                "now": datetime.now(UTC),
            },
        )

    # -- approve / deny ---------------------------------------------------------------------

    async def decide(request: Request, approval_id: str, approve: bool) -> Response:
        session = signed_in(request)
        form = await checked_form(request, session)
        comment = form.get("comment", "").strip()
        if len(comment) > MAX_COMMENT_CHARS:
            raise Refused(422, f"the comment is over {MAX_COMMENT_CHARS} characters")
        if not approval_id or len(approval_id) > MAX_ID_CHARS:
            raise Refused(404, NO_SUCH_APPROVAL)
        try:
            approval = await service.decide_approval(
                approval_id, approve=approve, approver=session.identity, comment=comment
            )
        except NotFound:
            raise Refused(404, NO_SUCH_APPROVAL) from None
        log.info(
            "console: %r %s %s",
            session.identity.subject,
            "approved" if approve else "denied",
            approval.id,
        )
        if wants_json(request):
            return JSONResponse(
                {
                    "approval": approval.model_dump(mode="json"),
                    "html": card_html(session, approval),
                }
            )
        return RedirectResponse(f"{base}/approvals/{approval.id}", status_code=303)

    @app.post("/approvals/{approval_id}/approve")
    async def approve(request: Request, approval_id: str) -> Response:
        return await decide(request, approval_id, True)

    @app.post("/approvals/{approval_id}/deny")
    async def deny(request: Request, approval_id: str) -> Response:
        return await decide(request, approval_id, False)

    # -- live updates ---------------------------------------------------------------------

    def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
        lines = [f"event: {event}"]
        if event_id:
            lines.append(f"id: {event_id}")
        lines.append("data: " + json.dumps(data, separators=(",", ":")))
        return "\n".join(lines) + "\n\n"

    def event_message(session: ConsoleSession, event: ApprovalEvent) -> str | None:
        approval = event.approval
        if approver_auth.refusal(session.identity, approval, "view") is not None:
            return None
        data = {
            "type": event.type.value,
            "id": approval.id,
            "status": approval.status.value,
            "html": card_html(session, approval),
        }
        return sse("approval", data, event.id)

    async def stream(session: ConsoleSession) -> AsyncIterator[str]:
        subscription = service.events.subscribe(maxsize=EVENT_QUEUE)
        ended = asyncio.ensure_future(session.ended.wait())
        deadline = time.monotonic() + STREAM_SECONDS
        dropped = 0
        try:
            yield f"retry: {RETRY_MS}\n\n"
            yield sse("hello", {"subject": session.identity.subject})
            while True:
                if not store.alive(session):
                    yield sse("signed-out", {})
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = min(HEARTBEAT_SECONDS, left)
                wait = min(wait, max(0.0, store.expires_in(session)) + 0.05)
                get = asyncio.ensure_future(subscription.get(timeout=wait))
                await asyncio.wait({get, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    continue
                event = get.result()
                if subscription.dropped > dropped:
                    dropped = subscription.dropped
                    yield sse("resync", {})
                if event is None:
                    if subscription.closed:  # the service is stopping
                        return
                    yield ": heartbeat\n\n"
                    continue
                message = event_message(session, event)
                if message is not None:
                    yield message
        finally:
            ended.cancel()
            subscription.close()

    class EventStream(StreamingResponse):
        """Counts the session's open streams from before it is sent until it ends."""

        def __init__(self, session: ConsoleSession) -> None:
            session.streams += 1
            self._session = session
            super().__init__(
                stream(session),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._session.streams -= 1

    @app.get("/events")
    async def events(request: Request) -> Response:
        session = signed_in(request, background=True)
        if session.streams >= MAX_STREAMS_PER_SESSION:
            raise Refused(
                429,
                f"this session has {session.streams} live streams open already (at most "
                f"{MAX_STREAMS_PER_SESSION}): close a console tab",
            )
        return EventStream(session)

    # OpenID Connect sign-in (engine/console/oidc.py) adds its routes here when present.
    _add_oidc_routes(app, runtime)
    return app


def _add_oidc_routes(app: FastAPI, runtime: Runtime) -> None:
    import importlib
    import importlib.util

    if importlib.util.find_spec("engine.console.oidc") is None:
        return
    module = importlib.import_module("engine.console.oidc")
    add_routes = getattr(module, "add_routes", None)
    if add_routes is not None:
        add_routes(app, runtime)
