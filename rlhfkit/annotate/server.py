"""The annotation web app: ``create_app(store)`` returns the FastAPI application.

Routes (all HTML is server-rendered with Jinja2 autoescaping; the only scripts are in ``static/``):

    GET  /                          redirect to /label or /admin, or a sign-in hint
    GET  /healthz                   {"ok": true}
    GET  /a/{token}                 annotator sign-in by secret link -> cookie, 303 /label
    GET  /label                     labelling page (current assignment) or "all done"
    POST /label                     answer without JavaScript (form; csrf_token field)
    POST /logout                    end the annotator session (form; csrf_token field)
    GET  /api/me                    annotator name, progress, CSRF token
    GET  /api/next                  current assignment as JSON
    POST /api/labels                store an answer (JSON; X-CSRF-Token header; idempotent)
    GET  /api/labels                the caller's own answers, newest first
    GET  /api/labels/{id}           one of the caller's answers
    PATCH /api/labels/{id}          change one of the caller's answers
    GET  /admin/login, POST /admin/login, POST /admin/logout
    GET  /admin                     projects and progress
    GET  /admin/projects/{p}        dashboard: agreement, annotator quality, annotators, export
    POST /admin/projects/{p}/annotators               create an annotator, show their link once
    POST /admin/projects/{p}/annotator-status         deactivate / reactivate (new link); name in the form
    POST /admin/projects/{p}/annotator-link           replace an annotator's link
    GET  /admin/projects/{p}/export.jsonl             download PreferenceRecords (the CLI's filters; ?rankings=true)
    GET  /api/admin/projects/{p}/stats                dashboard figures as JSON
    GET  /admin/projects/{p}/items[/{id}]             item browser, one item with every vote (+ /api/admin/... JSON)
    GET  /admin/projects/{p}/adjudication             items where votes disagree (+ /api/admin/... JSON)
    POST /admin/projects/{p}/decisions                the lead's answer for an item (form)
    POST /admin/import                                create a project / import pairs / settings (multipart form)
    GET  /a/{token}, POST /a/{token}                  sign-in link; a cross-site visit confirms with a button first
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.annotate import views_admin, views_annotator, views_review, views_setup
from rlhfkit.annotate.store import Store
from rlhfkit.annotate.web import (
    HERE,
    Auth,
    BodyGuard,
    Problem,
    SecurityHeaders,
    error_response,
    render,
    templates,
)


def create_app(store: Store, *, secure_cookies: bool = False, warm_up: bool = True,
               max_body_bytes: int = 1 << 20, max_upload_bytes: int = 64 << 20) -> FastAPI:
    """``secure_cookies``: mark cookies Secure; set it when the app is served over HTTPS (behind a
    reverse proxy), never for plain-HTTP loopback use, or browsers drop the cookie. ``warm_up``:
    compile templates and SQL before the first request (``serve`` does; unit tests skip it).
    ``max_body_bytes``: the largest request body from an annotator (an answer is well under 20 KB);
    ``max_upload_bytes``: from the signed-in admin (pairs files uploaded in the web UI)."""
    for name, value in (("max_body_bytes", max_body_bytes), ("max_upload_bytes", max_upload_bytes)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    app = FastAPI(title="rlhfkit annotate", docs_url=None, redoc_url=None, openapi_url=None)
    auth = Auth(store, secure_cookies)
    app.state.store = store

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail), getattr(exc, "field", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(x) for x in first["loc"] if x not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        message = f"{field}: {first['msg']}"
        if request.url.path.startswith("/api/"):
            detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
            return JSONResponse({"detail": detail, "field": field, "message": message}, status_code=422)
        return render("message.html", 422, title="Invalid request", message=message)

    @app.get("/")
    def home(request: Request):
        who = auth.principal(request)
        if who is not None:
            return RedirectResponse("/admin" if who.is_admin else "/label", status_code=303)
        return render("message.html", title="rlhfkit annotate",
                      message="Open the personal link your annotation lead sent you. Leads: /admin/login")

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    if warm_up:
        for template in templates.list_templates():
            templates.get_template(template)  # compile now, not during the first requests
        store.warm_up()

    app.include_router(views_annotator.router(store, auth))
    app.include_router(views_admin.router(store, auth))
    app.include_router(views_review.router(store, auth))
    app.include_router(views_setup.router(store, auth))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(BodyGuard, auth=auth, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes)
    app.add_middleware(SecurityHeaders)  # added last: the outermost, so every answer gets the headers
    return app


__all__ = ["Problem", "create_app"]
