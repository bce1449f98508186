"""Project setup from the browser: create a project or add to one by uploading a pairs file, and
change its settings (overlap of new pairs, gold rate, the pinned question, guidelines). The same
operation as ``rlhfkit annotate import`` (``ProjectAdmin.import_pairs``), with the same checks:
a bad line refuses the whole upload with file:line:field and stores nothing.

The upload is written to a private temporary directory under the uploaded file's (sanitised) name,
so error messages name the file the lead chose; the directory is removed afterwards. Its size is
limited by ``create_app(max_upload_bytes=...)`` (``BodyGuard``, before the body is read).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from rlhfkit.annotate.imports import read_guidelines
from rlhfkit.annotate.store import Principal, Refused, Store
from rlhfkit.annotate.web import Auth, Problem, check_csrf, render
from rlhfkit.data.records import DataError

UPLOAD_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def router(store: Store, auth: Auth) -> APIRouter:
    r = APIRouter()

    async def admin(request: Request) -> Principal | None:
        return auth.admin(request)

    @r.post("/admin/import")
    def import_form(request: Request, who: Principal | None = Depends(admin), csrf_token: str = Form(""),
                    project: str = Form(""), overlap: int = Form(3, ge=1, le=100), gold_rate: str = Form(""),
                    question: str | None = Form(None), guidelines: UploadFile | None = File(None),
                    pairs: UploadFile | None = File(None), skip_existing: str = Form(""),
                    question_field: str = Form(""), ratings: str | None = Form(None), markdown: str = Form("")):
        """``question_field=1`` (the forms send it): the question field was shown, so an empty one
        removes the question; without it (a script) an absent question leaves it unchanged."""
        if question_field == "1" and question is None:
            question = ""
        if question_field == "1" and ratings is None:
            ratings = ""
        if who is not None:
            check_csrf(request, who.csrf_token, csrf_token)
        try:
            rate = float(gold_rate) if gold_rate.strip() else None
        except ValueError:
            raise Problem(422, f"gold_rate: must be a number in [0, 1], got {gold_rate[:20]!r}", "gold_rate") from None
        workdir = Path(tempfile.mkdtemp(prefix="rlhfkit-upload-"))
        try:
            pairs_path = _save(pairs, workdir, "pairs.jsonl")
            guide_path = _save(guidelines, workdir, "guidelines.txt")
            try:
                guide = None if guide_path is None else read_guidelines(guide_path)
                report = store.admin.import_pairs(project.strip(), pairs_path, overlap=overlap, gold_rate=rate,
                                                  skip_existing=skip_existing in ("1", "on", "true"),
                                                  guidelines=guide, question=question, ratings=ratings,
                                                  markdown={"on": True, "off": False}.get(markdown))
            except DataError as e:
                # the temporary directory means nothing to the lead: name their file only
                raise Problem(422, str(e).replace(f"{workdir}/", ""), "pairs") from None
            except Refused as e:
                raise Problem.of(e) from None
            except ValueError as e:
                raise Problem(422, str(e)) from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        what = "Created project" if report.created_project else "Updated project"
        message = (f"{what} {report.project}: imported {report.n_pairs} pairs"
                   + (f" (overlap {overlap})" if report.n_pairs else "")
                   + (f", skipped {report.n_existing_skipped} already present" if report.n_existing_skipped else "")
                   + f"; {report.n_gold} gold pairs; gold rate {report.gold_rate:g}.")
        return render("imported.html", project=report.project, message=message,
                      url=f"/admin/projects/{quote(report.project)}")

    return r


def _save(upload: UploadFile | None, workdir: Path, default: str) -> Path | None:
    """The upload as a file in ``workdir`` (None when no file was chosen: browsers send an empty part)."""
    if upload is None or not upload.filename:
        return None
    name = UPLOAD_NAME.sub("_", Path(upload.filename).name)[:100].lstrip(".") or default
    path = workdir / name
    with open(path, "wb") as f:
        shutil.copyfileobj(upload.file, f)
    return path
