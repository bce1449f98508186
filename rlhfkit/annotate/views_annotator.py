"""Annotator routes: the secret-link sign-in, the labelling page and the JSON API it uses.

Page flow: ``GET /label`` renders the annotator's current assignment; the page's script posts the
answer to ``POST /api/labels`` (retrying with the same ``submission_id`` on network errors) and
loads ``/label`` again. Without JavaScript the same form posts to ``POST /label``.
"""

from __future__ import annotations

import re
import secrets
from typing import Literal

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from rlhfkit.annotate.store import ANNOTATOR_SESSION, LabelInput, Principal, Refused, Store
from rlhfkit.annotate.values import MAX_ID, text_problem
from rlhfkit.annotate.web import LOGIN_CSRF_COOKIE, Auth, Problem, check_csrf, render

SUBMISSION_ID = r"^[A-Za-z0-9_-]{8,64}$"
DIRECT_NAVIGATION = ("none", "same-origin")
"""``Sec-Fetch-Site`` values of a link the person opened themselves (pasted, bookmarked, from a mail
program) or followed inside this site. Browsers set the header and pages cannot forge it."""


def _storable(v: str | None) -> str | None:
    problem = None if v is None else text_problem(v)
    if problem:
        raise ValueError(problem)
    return v


class LabelBody(BaseModel):
    """``POST /api/labels``. Sides are the annotator's screen sides; a ranking item is answered with
    ``choice: "rank"`` and ``ranks``, one per reply in the order shown (1 best, equal ranks tie)."""

    model_config = ConfigDict(extra="forbid")
    submission_id: str = Field(pattern=SUBMISSION_ID, description="client-chosen id, 8-64 of [A-Za-z0-9_-]; "
                                                                  "a retry reuses it and stores nothing new")
    assignment_id: int = Field(ge=1, le=MAX_ID)
    choice: Literal["left", "right", "tie", "skip", "rank"]
    ranks: list[int] | None = Field(None, max_length=9)
    ratings: dict[str, list[int | None]] | None = Field(None, max_length=8)
    strength: int | None = Field(None, ge=1, le=3, description="1 slight, 2 clear, 3 strong; left/right only")
    rationale: str | None = Field(None, max_length=5000)
    unsafe: bool = False
    duration_ms: int | None = Field(None, ge=0, le=86_400_000)

    @field_validator("strength")
    @classmethod
    def _strength_needs_side(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("choice") in ("tie", "skip", "rank"):
            raise ValueError("must be empty (null) for a tie, a skip or a ranking")
        return v

    _rationale = field_validator("rationale")(_storable)

    def to_input(self) -> LabelInput:
        return LabelInput(**self.model_dump())


class LabelPatch(BaseModel):
    """``PATCH /api/labels/{id}``: change one's own answer. Absent fields stay as they are."""

    model_config = ConfigDict(extra="forbid")
    choice: Literal["left", "right", "tie"] | None = None
    ranks: list[int] | None = Field(None, max_length=9)
    ratings: dict[str, list[int | None]] | None = Field(None, max_length=8)
    strength: int | None = Field(None, ge=1, le=3)
    rationale: str | None = Field(None, max_length=5000)
    unsafe: bool | None = None

    _rationale = field_validator("rationale")(_storable)


def router(store: Store, auth: Auth) -> APIRouter:
    r = APIRouter()

    # As dependencies, sign-in and CSRF are checked before the body is validated: a request from
    # nobody, or without the token, is answered 401/403, never 422. They are ``async`` so FastAPI
    # runs them on the event loop instead of spending a second worker-thread hop per request; the
    # session lookup is a dict hit, or on a miss one indexed read of well under a millisecond.
    async def annotator(request: Request) -> Principal:
        return auth.annotator(request)

    async def annotator_writing(request: Request) -> Principal:
        who = auth.annotator(request)
        check_csrf(request, who.csrf_token)
        return who

    @r.get("/a/{token}")
    def sign_in(request: Request, token: str):
        """Login CSRF: a link another site sends the browser to (``Sec-Fetch-Site: cross-site``, or no
        such header) would silently replace the session with the link's owner's. Such a visit gets
        a page with one button instead, which posts the link back with a token from a cookie that
        only this site's pages can pair with the form."""
        if request.headers.get("sec-fetch-site") in DIRECT_NAVIGATION:
            return _sign_in(token)
        csrf = secrets.token_urlsafe(24)
        response = render("sign_in.html", csrf=csrf)
        response.set_cookie(LOGIN_CSRF_COOKIE, csrf, max_age=1800, httponly=True, samesite="strict",
                            secure=auth.secure_cookies, path="/a/")
        return response

    @r.post("/a/{token}")
    def sign_in_confirmed(request: Request, token: str, csrf_token: str = Form("")):
        check_csrf(request, request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24), csrf_token)
        response = _sign_in(token)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/a/")
        return response

    def _sign_in(token: str) -> RedirectResponse:
        got = store.login_annotator(token)
        if got is None:
            raise Problem(403, "this link is not valid (mistyped, replaced by a new one, or the annotator was "
                               "deactivated); ask your annotation lead for a new one")
        response = RedirectResponse("/label", status_code=303)
        auth.set_session_cookie(response, got[0], int(ANNOTATOR_SESSION.total_seconds()))
        return response

    @r.get("/label")
    async def label_page(who: Principal = Depends(annotator)):
        # Usually only reads (submit() hands out the next pair), done here on the event loop: a
        # worker-thread round trip costs more than the reads. If a pair must be handed out first,
        # that waits for the writer lock, so it goes to a worker thread.
        view = store.page(who, may_write=False) or await run_in_threadpool(store.page, who)
        if view["item"] is None:
            return render("done.html", who=who, csrf=who.csrf_token, **view)
        return render("label.html", who=who, csrf=who.csrf_token, submission_id=secrets.token_hex(16), **view)

    @r.post("/label/revise")
    def revise_form(request: Request, who: Principal = Depends(annotator), csrf_token: str = Form(""),
                    label_id: str = Form(""), choice: str = Form("")):
        """Change one's last answer from the page (a wrong key). A tie has no strength, so changing
        to a tie clears it, as the page says."""
        check_csrf(request, who.csrf_token, csrf_token)
        if choice not in ("left", "right", "tie"):
            raise Problem(422, f"choice: must be left, right or tie, got {choice!r}", "choice")
        if not label_id.isdigit() or not 1 <= int(label_id) <= MAX_ID:
            raise Problem(422, f"label_id: must be a label id, got {label_id[:20]!r}", "label_id")
        changes = {"choice": choice, **({"strength": None} if choice == "tie" else {})}
        try:
            store.update_label(who, int(label_id), changes)
        except Refused as e:
            raise Problem.of(e) from None
        return RedirectResponse("/label", status_code=303)

    @r.post("/label")
    async def label_form(request: Request, who: Principal = Depends(annotator), csrf_token: str = Form(""),
                   assignment_id: str = Form(""), submission_id: str = Form(""), choice: str = Form(""),
                   strength: str = Form(""), rationale: str = Form(""), unsafe: str = Form(""),
                   duration_ms: str = Form("")):
        """The no-JavaScript path. The strength control is documented on the page as applying to
        left/right only, so here it is dropped for tie and skip rather than refused. A ranking
        comes as ``rank_0`` .. ``rank_{K-1}`` (the selects, in the order shown)."""
        check_csrf(request, who.csrf_token, csrf_token)
        form = await request.form()
        ranks = None
        if choice == "rank":
            raw = [form.get(f"rank_{i}", "") for i in range(9) if f"rank_{i}" in form]
            if not all(isinstance(r, str) and r.isdigit() and len(r) == 1 for r in raw):
                raise Problem(422, "ranks: give every reply a rank (1 is the best)", "ranks")
            ranks = [int(r) for r in raw]
        fields = {"submission_id": submission_id, "assignment_id": assignment_id, "choice": choice,
                  "ranks": ranks, "ratings": _form_ratings(form),
                  "strength": strength if strength and choice in ("left", "right") else None,
                  "rationale": rationale or None, "unsafe": unsafe in ("1", "on", "true"),
                  "duration_ms": duration_ms or None}
        try:
            body = LabelBody.model_validate(fields)
        except ValidationError as e:
            err = e.errors()[0]
            raise Problem(422, f"{'.'.join(map(str, err['loc']))}: {err['msg']}", str(err["loc"][0])) from None
        await run_in_threadpool(_submit, store, who, body)
        return RedirectResponse("/label", status_code=303)

    @r.post("/logout")
    def logout(request: Request, csrf_token: str = Form("")):
        who = auth.principal(request)
        if who is not None:
            check_csrf(request, who.csrf_token, csrf_token)
            store.logout(who)
        response = render("message.html", title="Signed out", message="You are signed out. Use your personal "
                                                                      "link to sign in again.")
        response.delete_cookie("rlhfkit_session", path="/")
        return response

    @r.get("/api/me")
    def me(who: Principal = Depends(annotator)):
        return {"annotator": who.annotator_name, "progress": store.progress(who), "csrf_token": who.csrf_token}

    @r.get("/api/next")
    def next_item(who: Principal = Depends(annotator)):
        """The current assignment (the same one until it is answered), or ``{"item": null}``."""
        item = store.next_item(who)
        if item is None:
            body = None
        elif item.replies is None:
            body = {"kind": "pair", "assignment_id": item.assignment_id, "prompt": item.prompt, "left": item.left,
                    "right": item.right}
        else:
            body = {"kind": "ranking", "assignment_id": item.assignment_id, "prompt": item.prompt,
                    "replies": item.replies}
        return {"item": body, "csrf_token": who.csrf_token}

    @r.post("/api/labels")
    def post_label(body: LabelBody, who: Principal = Depends(annotator_writing)):
        label, created = _submit(store, who, body)
        return JSONResponse({**label, "replayed": not created}, status_code=201 if created else 200)

    @r.get("/api/labels")
    def list_labels(who: Principal = Depends(annotator), limit: int = Query(50, ge=1, le=500),
                    offset: int = Query(0, ge=0, le=MAX_ID)):
        return {"labels": store.labels_of(who, limit, offset)}

    @r.get("/api/labels/{label_id}")
    def get_label(label_id: int = Path(ge=1, le=MAX_ID), who: Principal = Depends(annotator)):
        try:
            return store.label_of(who, label_id)
        except Refused as e:
            raise Problem.of(e) from None

    @r.patch("/api/labels/{label_id}")
    def patch_label(body: LabelPatch, label_id: int = Path(ge=1, le=MAX_ID),
                    who: Principal = Depends(annotator_writing)):
        try:
            return store.update_label(who, label_id, body.model_dump(exclude_unset=True))
        except Refused as e:
            raise Problem.of(e) from None

    return r


def _form_ratings(form) -> dict | None:
    """``rating_<aspect name>_<shown position>`` selects -> {aspect: [rating per position]}; blank ones
    are None, and no ratings at all is None (the store checks names and ranges)."""
    cells = {}
    for key, value in form.items():
        m = re.fullmatch(r"rating_([a-z][a-z0-9_]{0,39})_([0-8])", key)
        if m and isinstance(value, str):
            if value and not value.isdigit():
                raise Problem(422, f"ratings: {m.group(1)} must be a whole number, got {value[:10]!r}", "ratings")
            cells[(m.group(1), int(m.group(2)))] = int(value) if value else None
    if not any(v is not None for v in cells.values()):
        return None
    n = 1 + max(pos for _, pos in cells)
    out = {name: [None] * n for name, _ in cells}
    for (name, pos), v in cells.items():
        out[name][pos] = v
    return out


def _submit(store: Store, who, body: LabelBody):
    try:
        return store.submit(who, body.to_input())
    except Refused as e:
        raise Problem.of(e) from None
