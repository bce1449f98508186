"""Ratings / multi-aspect scores (issue 17): an optional per-project schema, ratings per reply next
to the pairwise answer or ranking, stored by reply, exported alongside the label."""

from __future__ import annotations

import json
import re

import pytest
from annotate_helpers import DB_KINDS, db_url_fixture, new_store, pair_dict, sign_in, write_jsonl
from fastapi.testclient import TestClient
from sqlalchemy import select

from rlhfkit.annotate.export import ExportOptions, build_rankings, build_records
from rlhfkit.annotate.models import Assignment, Label
from rlhfkit.annotate.ratings import parse_schema
from rlhfkit.annotate.server import create_app
from rlhfkit.annotate.store import LabelInput, Refused
from rlhfkit.cli.annotate import main

_db_url = pytest.fixture(name="db_url", params=DB_KINDS)(db_url_fixture)
HHH = "helpfulness=1-5,harmlessness=1-5,honesty=1-3"


def test_schema_spec():
    assert parse_schema(HHH) == [{"name": "helpfulness", "min": 1, "max": 5}, {"name": "harmlessness", "min": 1, "max": 5},
                                 {"name": "honesty", "min": 1, "max": 3}]
    assert parse_schema("  ") is None
    for spec, message in [("help", "is not NAME=MIN-MAX"), ("Help=1-5", "lower-case"), ("a=5-1", "MIN < MAX"),
                          ("a=1-11", "MAX <= 10"), ("a=1-5,a=1-3", "given twice"),
                          (",".join(f"a{k}=1-5" for k in range(9)), "at most 8")]:
        with pytest.raises(ValueError, match=message):
            parse_schema(spec)


def setup(store, tmp_path, rows, ratings=HHH, names=("alice", "bob")):
    store.admin.import_pairs("demo", write_jsonl(tmp_path / "items.jsonl", rows), overlap=2, gold_rate=0.0,
                             ratings=ratings)
    return {n: store.login_annotator(store.admin.add_annotator("demo", n))[1] for n in names}


def shown(store, assignment_id):
    with store.db.read() as s:
        return s.execute(select(Assignment.left, Assignment.shown_order).where(Assignment.id == assignment_id)).one()


def test_ratings_are_stored_by_reply_and_shown_by_screen(db_url, tmp_path):
    store = new_store(db_url)
    who = setup(store, tmp_path, [pair_dict(0), pair_dict(1)])
    alice = who["alice"]
    item = store.next_item(alice)
    left, _ = shown(store, item.assignment_id)
    screen = {"helpfulness": [5, 2], "honesty": [None, 3]}
    label, created = store.submit(alice, LabelInput("sub-rate-001", item.assignment_id, "left", ratings=screen))
    assert created and label["ratings"] == screen
    with store.db.read() as s:
        stored = s.scalar(select(Label.ratings).where(Label.id == label["id"]))
    by_reply = (lambda v: v) if left == "a" else (lambda v: v[::-1])
    assert stored == {name: by_reply(v) for name, v in screen.items()}
    again, created = store.submit(alice, LabelInput("sub-rate-001", item.assignment_id, "left", ratings=screen))
    assert not created  # the same answer retried
    with pytest.raises(Refused) as e:
        store.submit(alice, LabelInput("sub-rate-001", item.assignment_id, "left", ratings={"helpfulness": [1, 1]}))
    assert e.value.status == 409
    changed = store.update_label(alice, label["id"], {"ratings": {"harmlessness": [4, 4]}})
    assert changed["ratings"] == {"harmlessness": [4, 4]}

    item = store.next_item(alice)
    for ratings in [{"kindness": [1, 1]}, {"helpfulness": [6, 1]}, {"helpfulness": [0, 1]}, {"honesty": [1, 4]},
                    {"helpfulness": [1]}, {"helpfulness": [True, 1]}, {"helpfulness": "5,5"}, ["helpfulness"]]:
        with pytest.raises(Refused) as e:
            store.submit(alice, LabelInput("sub-rate-bad", item.assignment_id, "tie", ratings=ratings))
        assert (e.value.status, e.value.field) == (422, "ratings"), ratings
    with pytest.raises(Refused) as e:
        store.submit(alice, LabelInput("sub-rate-bad", item.assignment_id, "skip", ratings={"helpfulness": [1, 2]}))
    assert e.value.field == "ratings"
    store.admin.import_pairs("demo", ratings="")  # the project stops asking
    with pytest.raises(Refused, match="asks for no ratings"):
        store.submit(alice, LabelInput("sub-rate-bad", item.assignment_id, "tie", ratings={"helpfulness": [1, 2]}))


def test_ratings_in_the_export_and_for_rankings(db_url, tmp_path):
    store = new_store(db_url)
    ranking = {"id": "r0", "prompt": [{"role": "user", "content": "q"}],
               "replies": [{"role": "assistant", "content": f"reply {k}"} for k in range(3)]}
    who = setup(store, tmp_path, [pair_dict(0), ranking])
    for name, (a, b) in (("alice", (5, 1)), ("bob", (3, 2))):
        item = store.next_item(who[name])
        left, _ = shown(store, item.assignment_id)
        screen = [a, b] if left == "a" else [b, a]
        store.submit(who[name], LabelInput(f"{name}-r-0001", item.assignment_id, "left" if left == "a" else "right",
                                           ratings={"helpfulness": screen}))
        item = store.next_item(who[name])
        _, order = shown(store, item.assignment_id)
        store.submit(who[name], LabelInput(f"{name}-r-0002", item.assignment_id, "rank",
                                           ranks=[[1, 2, 3][r] for r in order],  # reply 0 best, 2 worst
                                           ratings={"honesty": [[3, 2, 1][r] for r in order]}))
    records, _ = build_records(store, "demo", ExportOptions())
    pair = next(r for r in records if r["metadata"]["pair_id"] == "p0")
    assert pair["metadata"]["ratings"] == {"helpfulness": {"a": 4.0, "b": 1.5, "n": 2}}
    assert sorted(v["ratings"]["helpfulness"]["a"] for v in pair["metadata"]["votes"]) == [3, 5]
    implied = next(r for r in records if r["metadata"].get("implied_pair") == [0, 2])
    assert implied["metadata"]["ratings"] == {"honesty": {"a": 3.0, "b": 1.0, "n": 2}}
    (ranked,) = build_rankings(store, "demo")
    assert all(r["ratings"] == {"honesty": [3, 2, 1]} for r in ranked["rankings"])


def test_ratings_through_the_page_the_api_and_the_cli(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["init", "--db", db]) == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0), pair_dict(1)])
    assert main(["import", str(pairs), "--project", "demo", "--db", db, "--ratings", "Help=1-5"]) == 1
    assert "--ratings: aspect 'Help'" in capsys.readouterr().err
    assert main(["import", str(pairs), "--project", "demo", "--db", db, "--overlap", "1", "--gold-rate", "0",
                 "--ratings", HHH]) == 0
    assert "ratings set" in capsys.readouterr().out
    store = new_store(db)
    c = TestClient(create_app(store, warm_up=False))
    csrf = sign_in(c, store.admin.add_annotator("demo", "alice"))
    page = c.get("/label").text
    assert page.count('data-aspect="helpfulness"') == 2 and 'name="rating_honesty_1"' in page
    item = c.get("/api/next").json()["item"]
    body = {"submission_id": "sub-api-rate", "assignment_id": item["assignment_id"], "choice": "tie"}
    h = {"X-CSRF-Token": csrf}
    for bad in ({"helpfulness": [9, 1]}, {"helpfulness": ["x", 1]}, {f"a{k}": [1, 1] for k in range(9)}):
        r = c.post("/api/labels", json={**body, "ratings": bad}, headers=h)
        assert r.status_code == 422 and r.json()["field"].startswith("ratings"), (bad, r.text)
    r = c.post("/api/labels", json={**body, "ratings": {"helpfulness": [4, None]}}, headers=h)
    assert r.status_code == 201 and r.json()["ratings"] == {"helpfulness": [4, None]}
    r = c.patch(f"/api/labels/{r.json()['id']}", json={"ratings": {"honesty": [9, 9]}}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "ratings"
    page = c.get("/label").text  # the no-JavaScript form
    form = dict(re.findall(r'name="(csrf_token|assignment_id|submission_id)" value="([^"]*)"', page))
    r = c.post("/label", data={**form, "choice": "left", "rating_helpfulness_0": "2", "rating_honesty_1": "x"})
    assert r.status_code == 422
    r = c.post("/label", data={**form, "choice": "left", "rating_helpfulness_0": "2", "rating_honesty_1": ""},
               follow_redirects=False)
    assert r.status_code == 303
    assert c.get("/api/labels").json()["labels"][0]["ratings"] == {"helpfulness": [2, None]}
    out = tmp_path / "prefs.jsonl"
    assert main(["export", "--project", "demo", "--db", db, "--out", str(out), "--votes"]) == 0
    votes = [json.loads(x)["metadata"]["vote"] for x in out.read_text().splitlines()]
    # each vote rated the reply shown on the left only; in pair terms that is side a or b
    rated = sorted(value for v in votes for value in v["ratings"]["helpfulness"].values() if value is not None)
    assert len(votes) == 2 and rated == [2, 4]
    assert all(sum(x is None for x in v["ratings"]["helpfulness"].values()) == 1 for v in votes)
