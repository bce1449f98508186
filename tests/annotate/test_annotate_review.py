"""The lead's review (issue 17): item browser, adjudication queue and decisions, in the store and
through every new route with its refusals."""

from __future__ import annotations

import json
import re

import pytest
from annotate_helpers import (
    DB_KINDS,
    admin_sign_in,
    db_url_fixture,
    new_store,
    pair_dict,
    sign_in,
    write_jsonl,
)
from fastapi.testclient import TestClient

from rlhfkit.annotate import review
from rlhfkit.annotate.export import ExportOptions, build_records
from rlhfkit.annotate.server import create_app
from rlhfkit.annotate.store import LabelInput, Refused

_db_url = pytest.fixture(name="db_url", params=DB_KINDS)(db_url_fixture)
XSS = "<script>alert('rationale')</script>"


def labelled_project(store, tmp_path):
    """p0: alice a, bob b, carol a (split 2-1); p1: all three a (unanimous); p2 gold 'a' (served
    first to everyone, gold rate 1): alice says b; p3: one vote. Screen choices are translated so
    the *pair* answers are as listed."""
    rows = [pair_dict(0), pair_dict(1), pair_dict(2, metadata={"gold_winner": "a"}), pair_dict(3, task="other")]
    store.admin.import_pairs("demo", write_jsonl(tmp_path / "pairs.jsonl", rows), overlap=3, gold_rate=1.0)
    wanted = {"alice": {"p2": "b", "p0": "a", "p1": "a", "p3": "a"}, "bob": {"p2": "a", "p0": "b", "p1": "a"},
              "carol": {"p2": "a", "p0": "a", "p1": "a"}}
    from sqlalchemy import select

    from rlhfkit.annotate.models import Assignment, Pair

    for name, answers in wanted.items():
        who = store.login_annotator(store.admin.add_annotator("demo", name))[1]
        for n in range(len(answers)):
            item = store.next_item(who)
            with store.db.read() as s:
                key, left = s.execute(select(Pair.key, Assignment.left).join(Assignment, Assignment.pair_id == Pair.id)
                                      .where(Assignment.id == item.assignment_id)).one()
            assert key == list(answers)[n]  # gold first, then import order
            side = "left" if answers[key] == left else "right"
            store.submit(who, LabelInput(f"{name}-{n:04d}x", item.assignment_id, side,
                                         rationale=XSS if name == "bob" else None, unsafe=name == "bob" and key == "p0"))


def test_queue_decisions_and_export(db_url, tmp_path):
    store = new_store(db_url)
    labelled_project(store, tmp_path)
    q = review.queue(store, "demo")
    assert [(r["key"], r["counts"]) for r in q] == [("p0", {"a": 2, "b": 1}), ("p2", {"a": 2, "b": 1})]
    assert q[0]["agreement"] == pytest.approx(2 / 3)
    pid = q[0]["id"]
    with pytest.raises(Refused) as e:
        review.decide(store, "demo", pid, 0, 1, "b", "  ")
    assert e.value.field == "decided_by"
    for args, field in [((pid, 0, 1, "left", "Dana"), "winner"), ((pid, 0, 2, "a", "Dana"), "i"),
                        ((pid, 1, 1, "a", "Dana"), "i"), ((10**6, 0, 1, "a", "Dana"), "pair_id")]:
        with pytest.raises(Refused) as e:
            review.decide(store, "demo", *args)
        assert e.value.field == field
    review.decide(store, "demo", pid, 0, 1, "b", "Dana", "b follows the guidelines")
    assert [r["key"] for r in review.queue(store, "demo")] == ["p2"]
    assert [r["decided"] for r in review.queue(store, "demo", include_decided=True)] == [True, False]
    records, _ = build_records(store, "demo", ExportOptions())
    p0 = next(r for r in records if r["metadata"]["pair_id"] == "p0")
    assert p0["chosen"]["content"] == pair_dict(0)["b"]["content"]  # the decision, not the 2-1 majority
    assert p0["metadata"]["consensus_method"] == "adjudicated"
    assert p0["metadata"]["adjudication"]["by"] == "Dana" and p0["metadata"]["agreement"] == pytest.approx(1 / 3)
    review.decide(store, "demo", pid, 0, 1, "", "Dana")  # removed: the majority is back
    records, _ = build_records(store, "demo", ExportOptions())
    p0 = next(r for r in records if r["metadata"]["pair_id"] == "p0")
    assert p0["chosen"]["content"] == pair_dict(0)["a"]["content"] and p0["metadata"]["consensus_method"] == "majority"


def test_browse_filters(db_url, tmp_path):
    store = new_store(db_url)
    labelled_project(store, tmp_path)
    keys = lambda **kw: [r["key"] for r in review.browse(store, "demo", **kw)[0]]  # noqa: E731
    assert keys() == ["p0", "p1", "p2", "p3"]
    assert keys(status="disagreement") == ["p0", "p2"] and keys(status="gold") == ["p2"]
    assert keys(status="flagged") == ["p0"] and keys(status="complete") == ["p0", "p1", "p2"]
    assert keys(q="OTHER") == ["p3"] and keys(q="question 1:") == ["p1"] and keys(q="nothing like it") == []
    rows, total = review.browse(store, "demo", limit=2, offset=2)
    assert [r["key"] for r in rows] == ["p2", "p3"] and total == 4
    with pytest.raises(Refused):
        review.browse(store, "demo", status="bogus")
    it = review.item(store, "demo", rows[0]["id"])
    assert it["gold_winner"] == "a" and [c["counts"] for c in it["comparisons"]] == [{"b": 1, "a": 2}]
    assert sorted((v["annotator"], v["winner"]) for v in it["votes_detail"]) == [("alice", "b"), ("bob", "a"),
                                                                                 ("carol", "a")]


@pytest.fixture
def app_env(tmp_path):
    store = new_store(f"sqlite:///{tmp_path / 'review.db'}")
    admin = store.admin.ensure_admin_token()
    labelled_project(store, tmp_path)
    app = create_app(store, warm_up=False)

    def client():
        c = TestClient(app)
        c.admin_token = admin
        return c

    return store, admin, client


def test_review_routes_and_refusals(app_env):
    store, admin, client = app_env
    p0 = review.browse(store, "demo", q="p0")[0][0]["id"]
    anon = client()
    routes = ["/admin/projects/demo/items", f"/admin/projects/demo/items/{p0}", "/admin/projects/demo/adjudication",
              "/api/admin/projects/demo/items", f"/api/admin/projects/demo/items/{p0}",
              "/api/admin/projects/demo/adjudication"]
    for path in routes:
        assert anon.get(path).status_code == 401, path
    annotator = client()
    sign_in(annotator, store.admin.add_annotator("demo", "eve"))
    for path in routes:
        assert annotator.get(path).status_code == 401, path
    bearer = {"Authorization": f"Bearer {admin}"}
    for path in routes:
        assert anon.get(path, headers=bearer).status_code == 200, path
    assert anon.get("/api/admin/projects/nope/items", headers=bearer).status_code == 404
    assert anon.get("/admin/projects/demo/items/999999", headers=bearer).status_code == 404
    assert anon.get(f"/admin/projects/demo/items/{10**30}", headers=bearer).status_code == 422
    assert anon.get("/api/admin/projects/demo/items?status=bogus", headers=bearer).status_code == 422
    assert anon.get("/api/admin/projects/demo/items?limit=0", headers=bearer).status_code == 422

    c = client()
    csrf = admin_sign_in(c)
    page = c.get(f"/admin/projects/demo/items/{p0}").text
    assert XSS not in page and "&lt;script&gt;alert(&#39;rationale&#39;)&lt;/script&gt;" in page
    assert 'id="c-0-1"' in page
    queue = c.get("/admin/projects/demo/adjudication").text
    assert f'/admin/projects/demo/items/{p0}#c-0-1' in queue
    form = {"pair_id": str(p0), "i": "0", "j": "1", "winner": "b", "decided_by": "Dana", "note": "n"}
    assert anon.post("/admin/projects/demo/decisions", data=form).status_code == 401
    assert annotator.post("/admin/projects/demo/decisions", data=form).status_code == 401
    assert c.post("/admin/projects/demo/decisions", data=form).status_code == 403  # no CSRF token
    for bad, field in [({"winner": "x"}, "winner"), ({"decided_by": ""}, "decided_by"), ({"j": "9"}, "j"),
                       ({"pair_id": "0"}, "pair_id"), ({"pair_id": str(10**30)}, "pair_id")]:
        r = c.post("/admin/projects/demo/decisions", data={**form, **bad, "csrf_token": csrf})
        assert r.status_code == 422, (bad, r.status_code)
    assert c.post("/admin/projects/nope/decisions", data={**form, "csrf_token": csrf}).status_code == 404
    r = c.post("/admin/projects/demo/decisions", data={**form, "csrf_token": csrf, "next": "queue"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin/projects/demo/adjudication"
    assert "b by Dana" in c.get(f"/admin/projects/demo/items/{p0}").text
    queue = c.get("/api/admin/projects/demo/adjudication").json()["queue"]
    assert [q["key"] for q in queue] == ["p2"]  # p0 is decided
    it = c.get(f"/api/admin/projects/demo/items/{p0}").json()
    assert it["comparisons"][0]["decision"]["by"] == "Dana" and len(it["votes_detail"]) == 3
    r = anon.post("/admin/projects/demo/decisions", data={**form, "winner": "a"}, headers=bearer,
                  follow_redirects=False)  # scripts: the bearer token needs no CSRF token
    assert r.status_code == 303
    exported = [json.loads(x) for x in c.get("/admin/projects/demo/export.jsonl").text.splitlines()]
    assert next(r for r in exported if r["metadata"]["pair_id"] == "p0")["metadata"]["consensus_method"] == "adjudicated"
    items = c.get("/api/admin/projects/demo/items?status=flagged").json()
    assert [i["key"] for i in items["items"]] == ["p0"] and items["total"] == 1
    dash = c.get("/admin/projects/demo").text
    assert re.search(rf'<a href="/admin/projects/demo/items/{p0}"[^>]*>p0</a>', dash)  # unsafe flags clickable
