"""Rankings of K replies (issue 17): import, serving in a random order, answers in screen terms,
implied pairs in the agreement figures and the export, the JSON API and the no-JavaScript form."""

from __future__ import annotations

import json
import re

import pytest
from annotate_helpers import DB_KINDS, db_url_fixture, new_store, pair_dict, sign_in, write_jsonl
from fastapi.testclient import TestClient
from sqlalchemy import select

from rlhfkit.annotate.export import ExportOptions, build_rankings, build_records
from rlhfkit.annotate.models import Assignment, Label, Pair
from rlhfkit.annotate.server import create_app
from rlhfkit.annotate.stats import project_stats
from rlhfkit.annotate.store import LabelInput, Refused
from rlhfkit.data.records import DataError, PreferenceRecord

_db_url = pytest.fixture(name="db_url", params=DB_KINDS)(db_url_fixture)


def ranking_dict(i: int, k: int = 3, **overrides) -> dict:
    d = {"id": f"r{i}", "prompt": [{"role": "user", "content": f"Name {k} colours ({i})."}],
         "replies": [{"role": "assistant", "content": f"reply {n} to {i}"} for n in range(k)],
         "task": "colours", "metadata": {"generator": "test"}}
    d.update(overrides)
    return d


def project(store, tmp_path, rows, overlap=2, annotators=("alice", "bob", "carol")):
    store.admin.import_pairs("demo", write_jsonl(tmp_path / "items.jsonl", rows), overlap=overlap, gold_rate=0.0)
    return {name: store.login_annotator(store.admin.add_annotator("demo", name))[1] for name in annotators}


def rank(store, who, pair_ranks: list[int], sid: str, **kw):
    """Answer the current ranking item so that reply i gets ``pair_ranks[i]`` (translated to the screen)."""
    item = store.next_item(who)
    with store.db.read() as s:
        order = s.scalar(select(Assignment.shown_order).where(Assignment.id == item.assignment_id))
    screen = [pair_ranks[reply] for reply in order]
    return store.submit(who, LabelInput(sid, item.assignment_id, "rank", ranks=screen, **kw)), order, item


@pytest.mark.parametrize("overrides, field, message", [
    ({"replies": [{"role": "assistant", "content": "x"}] * 1 + [{"role": "assistant", "content": "y"}]},
     "replies", "must be a list of 3 to 9 assistant messages, got 2"),
    ({"replies": [f"r{n}" for n in range(10)]}, "replies", "got 10"),
    ({"replies": ["same", "other", "same"]}, "replies[2]", "repeats an earlier reply"),
    ({"replies": ["a", {"role": "user", "content": "b"}, "c"]}, "replies[1].role", "must be an assistant message"),
    ({"replies": ["a", "  ", "c"]}, "replies[1].content", "empty completion"),
    ({"a": {"role": "assistant", "content": "x"}}, "replies", "not both"),
    ({"metadata": {"gold_winner": "a"}}, "metadata.gold_winner", "cannot be a gold pair"),
])
def test_ranking_import_errors_name_file_line_field(tmp_path, overrides, field, message):
    store = new_store(f"sqlite:///{tmp_path / 'r.db'}")
    path = write_jsonl(tmp_path / "items.jsonl", [ranking_dict(0), ranking_dict(1, **overrides)])
    with pytest.raises(DataError) as e:
        store.admin.import_pairs("demo", path)
    assert str(e.value).startswith(f"{path}:2: field '{field}': ") and message in str(e.value)
    with store.db.read() as s:
        assert s.scalars(select(Pair)).all() == []


def test_rankings_are_shown_shuffled_and_stored_in_reply_terms(db_url, tmp_path):
    store = new_store(db_url)
    who = project(store, tmp_path, [ranking_dict(i, k=4) for i in range(12)], overlap=1, annotators=("alice",))
    orders = set()
    for n in range(12):
        (label, created), order, item = rank(store, who["alice"], [2, 1, 3, 1], f"sub-rank-{n:03d}")
        assert created and sorted(order) == [0, 1, 2, 3] and len(item.replies) == 4
        assert item.left is None and item.right is None
        with store.db.read() as s:
            pair = s.scalar(select(Pair).join(Label, Label.pair_id == Pair.id).where(Label.id == label["id"]))
            stored = s.scalar(select(Label.ranks).where(Label.id == label["id"]))
        assert item.replies == [pair.replies[i]["content"] for i in order]  # shown in the recorded order
        assert stored == [2, 1, 3, 1]  # pair terms, dense
        assert label["choice"] == "rank" and label["ranks"] == [[2, 1, 3, 1][i] for i in order]
        orders.add(tuple(order))
    assert len(orders) > 3  # drawn at random (12 draws of 24 orders all alike: p < 1e-15)


def test_ranking_answers_are_validated(db_url, tmp_path):
    store = new_store(db_url)
    rows = [ranking_dict(0), pair_dict(1)]
    who = project(store, tmp_path, rows, overlap=2, annotators=("alice", "bob"))
    alice = who["alice"]
    item = store.next_item(alice)
    assert item.replies is not None  # the ranking item comes first (import order)
    for kw, field in [(dict(choice="left"), "choice"), (dict(choice="rank"), "ranks"),
                      (dict(choice="rank", ranks=[1, 2]), "ranks"), (dict(choice="rank", ranks=[1, 2, 4]), "ranks"),
                      (dict(choice="rank", ranks=[0, 1, 2]), "ranks"), (dict(choice="rank", ranks=[1, True, 2]), "ranks"),
                      (dict(choice="rank", ranks=[1, 2, 3], strength=2), "strength")]:
        with pytest.raises(Refused) as e:
            store.submit(alice, LabelInput("sub-bad-0001", item.assignment_id, **kw))
        assert (e.value.status, e.value.field) == (422, field), kw
    label, created = store.submit(alice, LabelInput("sub-good-001", item.assignment_id, "rank", ranks=[3, 3, 1]))
    assert created and label["ranks"] == [2, 2, 1]  # renumbered densely, ties kept
    again, created = store.submit(alice, LabelInput("sub-good-001", item.assignment_id, "rank", ranks=[2, 2, 1]))
    assert not created and again["id"] == label["id"]  # a retry of the same answer
    with pytest.raises(Refused) as e:
        store.submit(alice, LabelInput("sub-good-001", item.assignment_id, "rank", ranks=[1, 2, 3]))
    assert e.value.status == 409
    changed = store.update_label(alice, label["id"], {"ranks": [1, 2, 3]})
    assert changed["ranks"] == [1, 2, 3]
    with pytest.raises(Refused) as e:
        store.update_label(alice, label["id"], {"choice": "left"})
    assert (e.value.status, e.value.field) == (422, "choice")
    pair_item = store.next_item(alice)
    assert pair_item.replies is None
    with pytest.raises(Refused) as e:
        store.submit(alice, LabelInput("sub-bad-0002", pair_item.assignment_id, "rank", ranks=[1, 2]))
    assert (e.value.status, e.value.field) == (422, "choice")

    # a skipped ranking is undone by giving ranks
    bob = who["bob"]
    skipped, _ = store.submit(bob, LabelInput("sub-skip-bob", store.next_item(bob).assignment_id, "skip"))
    assert store.update_label(bob, skipped["id"], {"ranks": [1, 1, 2]})["choice"] == "rank"


def test_implied_pairs_in_agreement_and_export(db_url, tmp_path):
    """Two rankings of replies (0, 1, 2): alice 0 > 1 > 2, bob 0 > 2 > 1. Implied pairs:
    (0,1) a, a; (0,2) a, a; (1,2) a (alice) vs b (bob). So 3 items with two votes each, consensus
    a on two, unresolved on one; per-item agreement 1, 1, 0.5."""
    store = new_store(db_url)
    who = project(store, tmp_path, [ranking_dict(0)], overlap=2, annotators=("alice", "bob"))
    rank(store, who["alice"], [1, 2, 3], "sub-alice-01", rationale="clearest first")
    rank(store, who["bob"], [1, 3, 2], "sub-bob-0001")
    stats = project_stats(store, "demo")
    assert (stats["n_pairs"], stats["n_votes"], stats["n_pairs_multi"]) == (3, 6, 3)
    assert stats["consensus"] == {"a": 2, "tie": 0, "b": 0, "unresolved": 1}
    # Kendall's W of [1, 2, 3] and [1, 3, 2]: R = [2, 5, 5], S = 4 + 1 + 1 = 6, W = 12 * 6 / (4 * 24) = 0.75
    assert stats["kendall_w"] == {"mean": pytest.approx(0.75), "n": 1}

    records, report = build_records(store, "demo", ExportOptions())
    assert report.unresolved == 1 and len(records) == 2
    by_pair = {tuple(r["metadata"]["implied_pair"]): r for r in records}
    assert set(by_pair) == {(0, 1), (0, 2)}
    for (i, j), rec in by_pair.items():
        PreferenceRecord.from_dict(rec)
        assert rec["chosen"]["content"] == f"reply {i} to 0" and rec["rejected"]["content"] == f"reply {j} to 0"
        assert rec["metadata"]["pair_id"] == "r0" and rec["metadata"]["agreement"] == 1.0
    votes, _ = build_records(store, "demo", ExportOptions(votes=True))
    assert len(votes) == 6
    (ranking,) = build_rankings(store, "demo")
    assert ranking["id"] == "r0" and len(ranking["replies"]) == 3
    assert sorted((r["annotator"], tuple(r["ranks"])) for r in ranking["rankings"]) == [
        ("alice", (1, 2, 3)), ("bob", (1, 3, 2))]
    assert ranking["mean_rank"] == [1.0, 2.5, 2.5]
    assert all(sorted(r["presented_order"]) == [0, 1, 2] for r in ranking["rankings"])


def test_ranking_api_and_form(tmp_path):
    xss = "<script>alert('r')</script><img src=x onerror=alert(1)>"
    store = new_store(f"sqlite:///{tmp_path / 'api.db'}")
    row = ranking_dict(0)
    row["replies"][1]["content"] = xss
    store.admin.import_pairs("demo", write_jsonl(tmp_path / "items.jsonl", [row, ranking_dict(1)]), overlap=1,
                             gold_rate=0.0)
    app = create_app(store, warm_up=False)
    c = TestClient(app)
    csrf = sign_in(c, store.admin.add_annotator("demo", "alice"))
    item = c.get("/api/next").json()["item"]
    assert item["kind"] == "ranking" and len(item["replies"]) == 3 and "left" not in item
    page = c.get("/label").text
    assert 'data-kind="ranking"' in page and xss not in page and "&lt;script&gt;alert(&#39;r&#39;)" in page
    h = {"X-CSRF-Token": csrf}
    base = {"submission_id": "sub-api-0001", "assignment_id": item["assignment_id"], "choice": "rank"}
    for body, field in [({**base, "ranks": [1, 2]}, "ranks"), ({**base, "ranks": [1, 2, 3], "strength": 1}, "strength"),
                        ({**base, "ranks": list(range(1, 11))}, "ranks"), ({**base, "ranks": ["1", "x", 2]}, "ranks.1")]:
        r = c.post("/api/labels", json=body, headers=h)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    r = c.post("/api/labels", json={**base, "ranks": [2, 1, 2]}, headers=h)
    assert r.status_code == 201 and r.json()["ranks"] == [2, 1, 2] and r.json()["kind"] == "ranking"
    label_id = r.json()["id"]
    r = c.patch(f"/api/labels/{label_id}", json={"ranks": [1, 2, 3]}, headers=h)
    assert r.status_code == 200 and r.json()["ranks"] == [1, 2, 3]
    r = c.patch(f"/api/labels/{label_id}", json={"choice": "tie"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "choice"
    assert "ranks by reply as shown: 1, 2, 3" in c.get("/label").text  # the last answer, in screen terms

    # the no-JavaScript form: one select per reply
    page = c.get("/label").text
    form = dict(re.findall(r'name="(csrf_token|assignment_id|submission_id)" value="([^"]*)"', page))
    r = c.post("/label", data={**form, "choice": "rank", "rank_0": "1", "rank_1": ""}, follow_redirects=False)
    assert r.status_code == 422 and "ranks" in r.text
    r = c.post("/label", data={**form, "choice": "rank", "rank_0": "2", "rank_1": "1", "rank_2": "2"},
               follow_redirects=False)
    assert r.status_code == 303
    labels = c.get("/api/labels").json()["labels"]
    assert labels[0]["ranks"] == [2, 1, 2] and len(labels) == 2
    assert "Nothing left" in c.get("/label").text

    admin = store.admin.ensure_admin_token()
    bearer = {"Authorization": f"Bearer {admin}"}
    rows = [json.loads(x) for x in c.get("/admin/projects/demo/export.jsonl?rankings=true", headers=bearer).text.splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1"]  # ranks there are by reply index, not screen position
    assert sorted(rows[0]["rankings"][0]["ranks"]) == [1, 2, 3] and sorted(rows[1]["rankings"][0]["ranks"]) == [1, 2, 2]
    pairs = [json.loads(x) for x in c.get("/admin/projects/demo/export.jsonl", headers=bearer).text.splitlines()]
    assert len(pairs) == 2 * 3  # one vote per implied pair (overlap 1): each is its own consensus
    assert sum(p["tie"] for p in pairs) == 1  # r1: the two replies ranked 2 tie
