"""Admin routes: sign-in, project dashboard (progress, agreement, annotator quality), annotator
management and export. Cookie sessions for the browser; ``Authorization: Bearer <admin token>``
works for the GET routes and the JSON stats, for scripts."""

from __future__ import annotations

import hmac
import json
import math
import secrets
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from rlhfkit.annotate.export import CONSENSUS, ExportOptions, NothingToExport, build_rankings, build_records
from rlhfkit.annotate.quality import Thresholds
from rlhfkit.annotate.stats import json_safe, project_stats
from rlhfkit.annotate.store import ADMIN_SESSION, Principal, Refused, Store
from rlhfkit.annotate.values import MAX_ID
from rlhfkit.annotate.web import COOKIE, LOGIN_CSRF_COOKIE, Auth, Problem, check_csrf, render


def router(store: Store, auth: Auth) -> APIRouter:
    r = APIRouter()

    async def admin(request: Request) -> Principal | None:
        """A dependency, so that sign-in is checked before parameters: 401 first, never 422.
        ``async``: run on the event loop, no worker-thread hop (a dict hit or one indexed read)."""
        return auth.admin(request)

    @r.get("/admin/login")
    def login_page():
        # Login CSRF: a double-submit token (cookie + form field), as there is no session yet.
        token = secrets.token_urlsafe(24)
        response = render("admin_login.html", csrf=token)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=1800, httponly=True, samesite="strict",
                            secure=auth.secure_cookies, path="/admin/login")
        return response

    @r.post("/admin/login")
    def login(request: Request, token: str = Form(""), csrf_token: str = Form("")):
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not csrf_token or not expected or not hmac.compare_digest(csrf_token.encode(), expected.encode()):
            raise Problem(403, "missing or wrong CSRF token: reload the sign-in page and try again", "csrf_token")
        got = store.login_admin(token.strip())
        if got is None:
            return render("admin_login.html", 401, csrf=expected, error="That is not a valid admin token.")
        response = RedirectResponse("/admin", status_code=303)
        auth.set_session_cookie(response, got[0], int(ADMIN_SESSION.total_seconds()))
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/admin/login")
        return response

    @r.post("/admin/logout")
    def logout(request: Request, who: Principal | None = Depends(admin), csrf_token: str = Form("")):
        if who is not None:
            check_csrf(request, who.csrf_token, csrf_token)
            store.logout(who)
        response = RedirectResponse("/admin/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @r.get("/admin")
    def index(who: Principal | None = Depends(admin)):
        projects = [store.admin.project_info(name) for name in store.admin.project_names()]
        return render("admin_index.html", projects=projects, csrf=who.csrf_token if who else "")

    @r.get("/admin/projects/{project}")
    def dashboard(project: str, who: Principal | None = Depends(admin), min_gold: float = Query(0.8, ge=0, le=1),
                  min_agree: float = Query(0.6, ge=0, le=1)):
        """``min_gold`` / ``min_agree``: annotators below these are highlighted (quality.Thresholds)."""
        thresholds = Thresholds(min_gold=min_gold, min_agree=min_agree)
        info, stats = _guard(store.admin.project_info, project), _guard(project_stats, store, project, thresholds)
        active = {a["name"]: a["active"] for a in info["annotators"]}
        return render("admin_project.html", info=info, stats=stats, active=active,
                      csrf=who.csrf_token if who else "", fmt=_fmt, consensus_methods=CONSENSUS)

    @r.get("/api/admin/projects/{project}/stats")
    def stats_json(project: str, _: Principal | None = Depends(admin), min_gold: float = Query(0.8, ge=0, le=1),
                   min_agree: float = Query(0.6, ge=0, le=1)):
        thresholds = Thresholds(min_gold=min_gold, min_agree=min_agree)
        return json_safe(_guard(project_stats, store, project, thresholds))

    @r.post("/admin/projects/{project}/annotators")
    def add_annotator(request: Request, project: str, who: Principal | None = Depends(admin),
                      name: str = Form(""), csrf_token: str = Form("")):
        _check_form(request, who, csrf_token)
        name = name.strip()
        if not name:
            raise Problem(422, "name: an annotator needs a name", "name")
        token = _guard(store.admin.add_annotator, project, name)
        return _link_page(request, project, name, token)

    # The annotator's name travels in the form, not the path: a name such as ".." or "a?b" in a
    # path is rewritten by the browser (dot segments, query) before it reaches the server.
    @r.post("/admin/projects/{project}/annotator-status")
    def set_active(request: Request, project: str, who: Principal | None = Depends(admin), name: str = Form(""),
                   active: str = Form(""), csrf_token: str = Form("")):
        """Deactivate (back to the dashboard) or reactivate, which shows the new link once."""
        _check_form(request, who, csrf_token)
        if active not in ("0", "1"):
            raise Problem(422, f"active: must be 0 or 1, got {active[:10]!r}", "active")
        token = _guard(store.admin.set_annotator_active, project, name, active == "1")
        if token is None:
            return RedirectResponse(f"/admin/projects/{quote(project)}", status_code=303)
        return _link_page(request, project, name, token, reactivated=True)

    @r.post("/admin/projects/{project}/annotator-link")
    def new_link(request: Request, project: str, who: Principal | None = Depends(admin), name: str = Form(""),
                 csrf_token: str = Form("")):
        """Replace an annotator's link (the old one stops working); shows the new one once."""
        _check_form(request, who, csrf_token)
        token = _guard(store.admin.new_link, project, name)
        return _link_page(request, project, name, token, replaced=True)

    @r.get("/admin/projects/{project}/export.jsonl")
    def export_jsonl(project: str, _: Principal | None = Depends(admin), votes: bool = False,
                     consensus: str = Query("majority", pattern="^(majority|dawid-skene)$"),
                     min_votes: int = Query(1, ge=1, le=MAX_ID), include_gold: bool = False,
                     drop_unsafe: bool = False, exclude_annotator: list[str] = Query([]),
                     min_gold_accuracy: str = "", rankings: bool = False):
        """The CLI's export filters; an export that leaves nothing is refused (422), as in the CLI.
        ``min_gold_accuracy`` may be empty (the dashboard form sends its empty field)."""
        try:
            min_gold = float(min_gold_accuracy) if min_gold_accuracy.strip() else None
        except ValueError:
            raise Problem(422, f"min_gold_accuracy: must be a number in [0, 1], got {min_gold_accuracy[:20]!r}",
                          "min_gold_accuracy") from None
        opts = ExportOptions(votes=votes, consensus=consensus, min_votes=min_votes, include_gold=include_gold,
                             drop_unsafe=drop_unsafe, exclude_annotators=tuple(exclude_annotator),
                             min_gold_accuracy=min_gold)
        if rankings:  # the ranking items' rankings themselves (see export.build_rankings)
            records = _guard(build_rankings, store, project, opts.exclude_annotators)
            if not records:
                raise Problem(422, "no rankings to export: no ranking item has a ranking yet", "rankings")
        else:
            records, report = _guard(build_records, store, project, opts)
            if not records:
                raise Problem(422, str(NothingToExport(report)), "filters")
        body = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        name = f"{project}-{'rankings' if rankings else 'votes' if votes else 'consensus'}.jsonl".replace('"', "")
        return Response(body, media_type="application/x-ndjson",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    return r


def _link_page(request: Request, project: str, name: str, token: str, **what):
    link = str(request.base_url).rstrip("/") + f"/a/{token}"
    return render("annotator_created.html", 201, project=project, name=name, link=link, **what)


def _check_form(request: Request, who: Principal | None, csrf_token: str) -> None:
    """CSRF for an admin form post; a bearer-token request (``who`` None) needs none."""
    if who is not None:
        check_csrf(request, who.csrf_token, csrf_token)


def _guard(fn, *args):
    try:
        return fn(*args)
    except Refused as e:
        raise Problem.of(e) from None
    except ValueError as e:  # a setting out of range (export options, import settings)
        raise Problem(422, str(e)) from None


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


