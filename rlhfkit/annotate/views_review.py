"""The lead's review pages: item browser, one item with every vote, the adjudication queue and
decisions (see ``review.py``). Admin session or ``Authorization: Bearer <admin token>``; the JSON
twins under ``/api/admin/`` serve scripts."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import RedirectResponse

from rlhfkit.annotate import review
from rlhfkit.annotate.store import Principal, Refused, Store
from rlhfkit.annotate.values import MAX_ID
from rlhfkit.annotate.web import Auth, Problem, check_csrf, render

PAGE = 50


def router(store: Store, auth: Auth) -> APIRouter:
    r = APIRouter()

    async def admin(request: Request) -> Principal | None:
        return auth.admin(request)

    def csrf_of(who: Principal | None) -> str:
        return who.csrf_token if who else ""

    @r.get("/admin/projects/{project}/items")
    def items_page(project: str, who: Principal | None = Depends(admin), q: str = Query("", max_length=200),
                   status: str = "all", offset: int = Query(0, ge=0, le=MAX_ID)):
        rows, total = _guard(review.browse, store, project, q, status, PAGE, offset)
        return render("admin_items.html", project=project, rows=rows, total=total, q=q, show=status,
                      statuses=review.STATUSES, offset=offset, page=PAGE, csrf=csrf_of(who))

    @r.get("/api/admin/projects/{project}/items")
    def items_json(project: str, _: Principal | None = Depends(admin), q: str = Query("", max_length=200),
                   status: str = "all", limit: int = Query(PAGE, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_ID)):
        rows, total = _guard(review.browse, store, project, q, status, limit, offset)
        return {"items": rows, "total": total}

    @r.get("/admin/projects/{project}/items/{pair_id}")
    def item_page(project: str, pair_id: int = Path(ge=1, le=MAX_ID), who: Principal | None = Depends(admin)):
        return render("admin_item.html", project=project, it=_guard(review.item, store, project, pair_id),
                      csrf=csrf_of(who))

    @r.get("/api/admin/projects/{project}/items/{pair_id}")
    def item_json(project: str, pair_id: int = Path(ge=1, le=MAX_ID), _: Principal | None = Depends(admin)):
        it = _guard(review.item, store, project, pair_id)
        for c in it["comparisons"]:
            if c["decision"]:
                c["decision"]["time"] = c["decision"]["time"].isoformat() + "Z"
        for v in it["votes_detail"]:
            v["time"] = v["time"].isoformat() + "Z"
        return it

    @r.get("/admin/projects/{project}/adjudication")
    def queue_page(project: str, who: Principal | None = Depends(admin), decided: bool = False):
        return render("admin_adjudication.html", project=project, queue=_guard(review.queue, store, project, decided),
                      decided=decided, csrf=csrf_of(who))

    @r.get("/api/admin/projects/{project}/adjudication")
    def queue_json(project: str, _: Principal | None = Depends(admin), decided: bool = False):
        return {"queue": _guard(review.queue, store, project, decided)}

    @r.post("/admin/projects/{project}/decisions")
    def decide(request: Request, project: str, who: Principal | None = Depends(admin), csrf_token: str = Form(""),
               pair_id: int = Form(ge=1, le=MAX_ID), i: int = Form(0, ge=0, le=8), j: int = Form(1, ge=1, le=8),
               winner: str = Form(""), decided_by: str = Form(""), note: str = Form(""), next: str = Form("")):
        """Record the lead's answer; back to the queue (``next=queue``) or to the item."""
        if who is not None:
            check_csrf(request, who.csrf_token, csrf_token)
        _guard(review.decide, store, project, pair_id, i, j, winner, decided_by, note or None)
        where = "adjudication" if next == "queue" else f"items/{pair_id}"
        return RedirectResponse(f"/admin/projects/{quote(project)}/{where}", status_code=303)

    return r


def _guard(fn, *args):
    try:
        return fn(*args)
    except Refused as e:
        raise Problem.of(e) from None
