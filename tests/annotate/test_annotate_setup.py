"""Project setup and import from the admin's browser (issue 17): the same checks as the CLI, every
refusal, and the upload size limit."""

from __future__ import annotations

import json
import re

import pytest
from annotate_helpers import admin_sign_in, new_store, pair_dict, sign_in
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rlhfkit.annotate.models import Pair, Project
from rlhfkit.annotate.server import create_app


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


@pytest.fixture
def env(tmp_path):
    store = new_store(f"sqlite:///{tmp_path / 'setup.db'}")
    admin = store.admin.ensure_admin_token()

    def client(**kw):
        c = TestClient(create_app(store, warm_up=False, **kw))
        c.admin_token = admin
        return c

    return store, admin, client


def n_pairs(store) -> int:
    with store.db.read() as s:
        return s.scalar(select(func.count()).select_from(Pair))


def test_create_a_project_and_change_its_settings_from_the_browser(env):
    store, _, client = env
    c = client()
    csrf = admin_sign_in(c)
    assert 'action="/admin/import"' in c.get("/admin").text
    files = {"pairs": ("my pairs.jsonl", jsonl([pair_dict(i) for i in range(3)]), "application/x-ndjson"),
             "guidelines": ("guide.txt", "Prefer the correct answer.\n".encode(), "text/plain")}
    data = {"csrf_token": csrf, "project": "web-1", "overlap": "2", "gold_rate": "0", "question": "Which is right?"}
    r = c.post("/admin/import", data=data, files=files)
    assert r.status_code == 200, r.text
    assert "Created project web-1: imported 3 pairs (overlap 2)" in r.text and n_pairs(store) == 3
    info = store.admin.project_info("web-1")
    assert info["question"] == "Which is right?" and info["gold_rate"] == 0
    page = c.get("/admin/projects/web-1").text
    assert 'value="Which is right?"' in page  # the settings form shows the current question
    r = c.post("/admin/import", data={"csrf_token": csrf, "project": "web-1", "question_field": "1",
                                      "question": "Which is right?", "ratings": "helpfulness=1-5"})
    assert r.status_code == 200 and store.admin.project_info("web-1")["ratings_spec"] == "helpfulness=1-5"
    assert 'value="helpfulness=1-5"' in c.get("/admin/projects/web-1").text
    r = c.post("/admin/import", data={"csrf_token": csrf, "project": "web-1", "ratings": "helpfulness=5-1"})
    assert r.status_code == 422 and "MIN &lt; MAX" in r.text
    r = c.post("/admin/import", data={"csrf_token": csrf, "project": "web-1", "question_field": "1"})
    assert r.status_code == 200 and store.admin.project_info("web-1")["question"] is None
    assert store.admin.project_info("web-1")["rating_aspects"] is None  # an emptied field removes it
    again = {"pairs": ("more.jsonl", jsonl([pair_dict(i) for i in range(5)]), "application/x-ndjson")}
    r = c.post("/admin/import", data={"csrf_token": csrf, "project": "web-1", "skip_existing": "1"}, files=again)
    assert r.status_code == 200 and "imported 2 pairs" in r.text and "skipped 3 already present" in r.text
    with store.db.read() as s:
        assert s.scalar(select(Project.guidelines)) == "Prefer the correct answer."


def test_web_import_refusals(env):
    store, admin, client = env
    c = client()
    csrf = admin_sign_in(c)
    good = {"pairs": ("pairs.jsonl", jsonl([pair_dict(0)]), "application/x-ndjson")}
    bad = {"pairs": ("bad.jsonl", jsonl([pair_dict(0), pair_dict(1, task=7)]), "application/x-ndjson")}
    r = c.post("/admin/import", data={"csrf_token": csrf, "project": "demo"}, files=bad)
    assert r.status_code == 422 and "bad.jsonl:2: field &#39;task&#39;: must be a string" in r.text
    assert "rlhfkit-upload" not in r.text and n_pairs(store) == 0
    evil = {"pairs": ("../../etc/passwd", jsonl([pair_dict(0), "{oops"]), "text/plain")}
    r = c.post("/admin/import", data={"csrf_token": csrf, "project": "demo"}, files=evil)
    assert r.status_code == 422 and "passwd:2: not valid JSON" in r.text and "/etc/" not in r.text
    for data, status in [({"project": "demo"}, 403),  # no CSRF token
                         ({"csrf_token": csrf, "project": "bad name"}, 422),
                         ({"csrf_token": csrf, "project": "demo", "gold_rate": "2"}, 422),
                         ({"csrf_token": csrf, "project": "demo", "gold_rate": "lots"}, 422),
                         ({"csrf_token": csrf, "project": "demo", "overlap": "0"}, 422)]:
        assert c.post("/admin/import", data=data, files=good).status_code == status, data
    r = c.post("/admin/import", data={"csrf_token": csrf, "project": "nope", "question": "q?"})
    assert r.status_code == 404  # settings alone cannot create a project
    assert client().post("/admin/import", data={"project": "demo"}, files=good).status_code == 401
    annotator = client()
    c.post("/admin/import", data={"csrf_token": csrf, "project": "demo"}, files=good)
    a_csrf = sign_in(annotator, store.admin.add_annotator("demo", "ann"))
    r = annotator.post("/admin/import", data={"csrf_token": a_csrf, "project": "demo"}, files=good)
    assert r.status_code == 401
    r = client().post("/admin/import", data={"project": "demo2"}, files=good,
                      headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and "Created project demo2" in r.text


def test_upload_size_limit(env):
    store, admin, client = env
    small = client(max_upload_bytes=2000)
    csrf = admin_sign_in(small)
    big = {"pairs": ("big.jsonl", jsonl([pair_dict(i) for i in range(40)]), "application/x-ndjson")}
    r = small.post("/admin/import", data={"csrf_token": csrf, "project": "demo"}, files=big)
    assert r.status_code == 413 and n_pairs(store) == 0
    assert re.search(r"larger than this server accepts \(2000 bytes\)", r.text)
