"""Web plumbing shared by the annotator and admin views: sessions, CSRF, headers, templates, errors.

Security model (GitHub issue 7):

- Annotators log in with a secret link ``/a/<token>``; the token is exchanged for a random session
  secret in an HttpOnly, SameSite=Lax cookie and the browser is redirected off the token URL.
  The access log redacts ``/a/<token>``.
- The admin logs in with the token printed by ``init`` (form at ``/admin/login``), or sends it as
  ``Authorization: Bearer <token>`` for scripted exports.
- Every state-changing request authenticated by the cookie must carry the session's CSRF token
  (form field ``csrf_token`` or header ``X-CSRF-Token``), and a cross-origin ``Origin`` header is
  refused. Bearer-token requests need no CSRF token: browsers never attach that header by themselves.
- Every response carries a strict Content-Security-Policy: scripts and styles only from
  ``/static``, no inline script, no framing, forms post only to this origin. A 500 too: the
  middleware answers an unhandled exception itself, inside the headers.
- A request with a body (POST, PATCH, ...) is checked before any of its body is read
  (:class:`BodyGuard`): sign-in (and for ``/api/`` the CSRF header), then the size: an annotator
  may send ``max_body_bytes``, the signed-in admin ``max_upload_bytes`` (a pairs file), sign-in
  forms ``PUBLIC_BODY_BYTES``. Larger bodies get 413 before they are read.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, FileSystemLoader

from rlhfkit.annotate import markdown
from rlhfkit.annotate.store import Principal, Refused, Store

HERE = Path(__file__).parent
COOKIE = "rlhfkit_session"
LOGIN_CSRF_COOKIE = "rlhfkit_login_csrf"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
NO_STORE = (b"cache-control", b"no-store")
PUBLIC_POSTS = ("/admin/login", "/logout")
"""Paths that take a body without a session (and ``/a/<token>``, the link's confirmation form)."""
PUBLIC_BODY_BYTES = 16 * 1024
"""Enough for the sign-in forms, which hold a token or two."""
access_log = logging.getLogger("rlhfkit.annotate.access")

# auto_reload off: templates ship with the package, so no stat() of the file on every render.
templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                        lstrip_blocks=True, auto_reload=False)
templates.filters["md"] = markdown.render  # inert markdown for model text (markdown.py)


class Problem(HTTPException):
    """An error answered as JSON ``{"detail", "field"}`` on /api routes and as a page elsewhere."""

    def __init__(self, status: int, detail: str, field: str | None = None):
        super().__init__(status, detail)
        self.field = field

    @classmethod
    def of(cls, refused: Refused) -> Problem:
        return cls(refused.status, refused.message, refused.field)


def render(template: str, status: int = 200, **ctx) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**ctx), status_code=status)


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, status: int, detail: str, field: str | None = None):
    if wants_json(request):
        return JSONResponse({"detail": detail, "field": field}, status_code=status)
    return render("message.html", status, title=f"Error {status}", message=detail)


class SecurityHeaders:
    """Pure ASGI middleware: security headers on every response, ``no-store`` on everything but
    static files, a ``Server-Timing`` header, and an access log line with secrets in paths redacted."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), scope["path"]
        static = path.startswith("/static/")
        status = {}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                # Time spent in the app (queueing for a worker thread and the writer lock included),
                # so a load test can tell server time from its own scheduling delays.
                dur = (time.perf_counter() - start) * 1000
                headers.append((b"server-timing", f"app;dur={dur:.2f}".encode()))
                if not static:
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette's own 500 comes from a middleware outside this one, without these headers.
            # Answer here when nothing was sent yet, then re-raise so the server logs the traceback.
            if "code" not in status:
                request = Request(scope)
                await error_response(request, 500, "internal error: the server could not complete this request "
                                     "(it is logged); try again later or tell your annotation lead")(
                    scope, receive, send_with_headers)
            raise
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %s %.1fms", scope["method"], redact(path), status.get("code", "-"),
                                (time.perf_counter() - start) * 1000)


class BodyGuard:
    """Pure ASGI middleware for requests with a body: who is asking is checked before the body is
    read, and the body's size is limited by who it is (see the module docstring). Without it, an
    unauthenticated client could make the server buffer bodies of any size (FastAPI reads and parses
    the body before it runs the sign-in dependency)."""

    def __init__(self, app, auth: Auth, max_body_bytes: int, max_upload_bytes: int):
        self.app, self.auth = app, auth
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        request = Request(scope)
        path = scope["path"]
        if path in PUBLIC_POSTS or path.startswith("/a/"):
            limit = PUBLIC_BODY_BYTES
        else:
            try:
                limit = self.max_upload_bytes if self.auth.sender(request) else self.max_body_bytes
            except Problem as e:
                return await error_response(request, e.status_code, e.detail, e.field)(scope, receive, send)
        too_big = error_response(request, 413, f"the request body is larger than this server accepts "
                                               f"({limit} bytes)", "body")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # at most `limit` bytes are held, whatever the client sends
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await too_big(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def redact(path: str) -> str:
    return re.sub(r"^/a/[^/]+", "/a/<token>", path)


class Auth:
    """Resolves the caller of a request from the session cookie or an admin bearer token."""

    def __init__(self, store: Store, secure_cookies: bool):
        self.store, self.secure_cookies = store, secure_cookies

    def principal(self, request: Request) -> Principal | None:
        secret = request.cookies.get(COOKIE)
        return self.store.principal(secret) if secret else None

    def annotator(self, request: Request) -> Principal:
        who = self.principal(request)
        if who is None or who.is_admin:
            raise Problem(401, "not signed in as an annotator: open the personal link your annotation lead "
                               "sent you")
        return who

    def admin(self, request: Request, *, mutating: bool = False) -> Principal | None:
        """The admin session, or None when the request carries a valid admin bearer token."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            if self.store.admin_token_ok(header[7:].strip()):
                return None
            raise Problem(401, "the bearer token is not a valid admin token", "Authorization")
        who = self.principal(request)
        if who is None or not who.is_admin:
            raise Problem(401, "admin sign-in required: /admin/login")
        if mutating:
            check_csrf(request, who.csrf_token)
        return who

    def sender(self, request: Request) -> bool:
        """Whether the sender of a request with a body is the admin; raises 401 when nobody is signed
        in, and 403 for an ``/api/`` call without the session's CSRF header (form posts carry theirs in
        the body: their routes check it). Reads headers and cookies only."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            if self.store.admin_token_ok(header[7:].strip()):
                return True
            raise Problem(401, "the bearer token is not a valid admin token", "Authorization")
        who = self.principal(request)
        if who is None:
            raise Problem(401, "not signed in: annotators open the personal link their annotation lead sent; "
                               "leads sign in at /admin/login")
        if request.url.path.startswith("/api/"):
            check_csrf(request, who.csrf_token)
        return who.is_admin

    def set_session_cookie(self, response, secret: str, max_age: int) -> None:
        response.set_cookie(COOKIE, secret, max_age=max_age, httponly=True, samesite="lax",
                            secure=self.secure_cookies, path="/")


def check_csrf(request: Request, expected: str, form_value: str | None = None) -> None:
    """Refuse a cookie-authenticated state change without the session's CSRF token (403)."""
    origin = request.headers.get("origin")
    # Behind a reverse proxy the Host header may be the upstream's; X-Forwarded-Host then names the
    # public host. Accepting it is safe here: a cross-site page cannot make a browser send it.
    hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")} - {None}
    if origin and origin != "null" and urlsplit(origin).netloc not in hosts:
        raise Problem(403, f"cross-origin request from {origin} refused", "Origin")
    given = request.headers.get("x-csrf-token") or form_value or ""
    if not given:
        raise Problem(403, "missing CSRF token: send the page's token in the X-CSRF-Token header or the "
                           "csrf_token form field", "csrf_token")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Problem(403, "wrong CSRF token for this session: reload the page", "csrf_token")
