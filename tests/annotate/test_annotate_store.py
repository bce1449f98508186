"""Store, assignment, import and export against SQLite and (with RLHFKIT_TEST_PG) PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from annotate_helpers import (
    DB_KINDS,
    db_url_fixture,
    new_store,
    pair_dict,
    setup_project,
    write_jsonl,
    write_pairs,
)
from sqlalchemy import func, inspect, select, update

from rlhfkit.annotate.export import ExportOptions, build_records, export
from rlhfkit.annotate.models import Assignment, Label, Pair, Project, utcnow
from rlhfkit.annotate.store import LabelInput, Refused
from rlhfkit.data.records import DataError, PreferenceRecord

_db_url = pytest.fixture(name="db_url", params=DB_KINDS)(db_url_fixture)


def who(store, token):
    return store.login_annotator(token)[1]


def answer(store, principal, choice="left", sid=None, **kw):
    item = store.next_item(principal)
    assert item is not None
    sid = sid or f"sub-{principal.annotator_id}-{item.assignment_id}"
    return store.submit(principal, LabelInput(sid, item.assignment_id, choice, **kw))


def count(store, model, *where):
    with store.db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_migrations_match_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from rlhfkit.annotate.db import current_revision
    from rlhfkit.annotate.models import Base

    store = new_store(db_url)
    store.migrate()  # a second upgrade is a no-op
    assert current_revision(store.db) == "0005"
    with store.db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        checks = {c["name"] for c in inspect(conn).get_check_constraints("labels")}
    assert diff == []
    # autogenerate does not compare CHECK constraints: their names come from the migration script
    assert checks == {"ck_labels_winner_or_skip", "ck_labels_strength_range", "ck_labels_strength_needs_winner"}


def test_admin_token_printed_once_and_rotates(db_url):
    store = new_store(db_url)
    token = store.admin.ensure_admin_token()
    assert token and store.admin_token_ok(token)
    assert store.admin.ensure_admin_token() is None
    new = store.admin.ensure_admin_token(rotate=True)
    assert store.admin_token_ok(new) and not store.admin_token_ok(token)


def test_import_bad_line_stores_nothing(db_url, tmp_path):
    store = new_store(db_url)
    rows = [pair_dict(0), pair_dict(1), pair_dict(2, a={"role": "assistant", "content": "   "}), pair_dict(3)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as e:
        store.admin.import_pairs("demo", path)
    assert str(e.value) == f"{path}:3: field 'a.content': empty completion"
    assert count(store, Pair) == 0 and count(store, Project) == 0


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    (json.dumps(pair_dict(1, id=7)), "field 'id': must be a non-empty string, got 7"),
    (json.dumps(pair_dict(0)), "field 'id': duplicate pair id 'p0' (first on line 1)"),
    (json.dumps(pair_dict(1, metadata={"gold_winner": "tie"})), "field 'metadata.gold_winner': must be 'a' or 'b'"),
    (json.dumps({k: v for k, v in pair_dict(1).items() if k != "prompt"}), "field 'prompt': missing field"),
])
def test_import_errors_name_file_line_field(db_url, tmp_path, line, message):
    store = new_store(db_url)
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0), line])
    with pytest.raises(DataError) as e:
        store.admin.import_pairs("demo", path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert count(store, Pair) == 0


def test_reimport_needs_skip_existing_and_gold_file_validates_ids(db_url, tmp_path):
    store = new_store(db_url)
    path = write_pairs(tmp_path / "pairs.jsonl", 4)
    store.admin.import_pairs("demo", path)
    with pytest.raises(DataError, match="pass --skip-existing"):
        store.admin.import_pairs("demo", path)
    write_pairs(tmp_path / "more.jsonl", 6)
    report = store.admin.import_pairs("demo", tmp_path / "more.jsonl", skip_existing=True)
    assert (report.n_pairs, report.n_existing_skipped) == (2, 4)
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": "p1", "winner": "b"}, {"id": "nope", "winner": "a"}])
    with pytest.raises(DataError, match=r"gold.jsonl:2: field 'id': no pair 'nope' in project 'demo'"):
        store.admin.import_pairs("demo", gold_path=gold)
    assert count(store, Pair, Pair.gold_winner.is_not(None)) == 0  # the good first line was rolled back too
    write_jsonl(gold, [{"id": "p1", "winner": "b"}])
    assert store.admin.import_pairs("demo", gold_path=gold, gold_rate=0.25).n_gold == 1
    with store.db.read() as s:
        assert s.scalar(select(Project.gold_rate)) == 0.25


def test_overlap_respected_and_nobody_sees_a_pair_twice(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=4, overlap=2, annotators=[f"a{i}" for i in range(5)])
    seen = {}
    for name, token in tokens.items():
        p = who(store, token)
        while (item := store.next_item(p)) is not None:
            assert store.next_item(p).assignment_id == item.assignment_id  # same item until answered
            store.submit(p, LabelInput(f"s-{name}-{item.assignment_id}", item.assignment_id, "left"))
            seen.setdefault(name, []).append(item.assignment_id)
    with store.db.read() as s:
        per_pair = dict(s.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all())
        pairs_by_annotator = s.execute(select(Assignment.annotator_id, Assignment.pair_id)).all()
    assert sorted(per_pair.values()) == [2, 2, 2, 2]
    assert len(pairs_by_annotator) == len(set(pairs_by_annotator)) == 8
    assert sum(len(v) for v in seen.values()) == 8


def test_left_right_is_randomised_and_translated(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=40, overlap=1, annotators=["alice"])
    p = who(store, tokens["alice"])
    lefts = set()
    for _ in range(40):
        item = store.next_item(p)
        with store.db.read() as s:
            a = s.get(Assignment, item.assignment_id)
            pair = s.get(Pair, a.pair_id)
        assert item.left == (pair.a if a.left == "a" else pair.b)["content"]
        lefts.add(a.left)
        label, created = store.submit(p, LabelInput(f"sid-{item.assignment_id}", item.assignment_id, "left"))
        assert created and label["choice"] == "left"
        with store.db.read() as s:
            assert s.scalar(select(Label.winner).where(Label.id == label["id"])) == a.left
    assert lefts == {"a", "b"}  # P(all 40 the same) = 2 * 2**-40


def test_submit_is_idempotent_and_refuses_conflicts(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=3, overlap=2, annotators=["alice", "bob"])
    alice, bob = who(store, tokens["alice"]), who(store, tokens["bob"])
    item = store.next_item(alice)
    first, created = store.submit(alice, LabelInput("retry-me-1", item.assignment_id, "right", strength=3))
    again, created_again = store.submit(alice, LabelInput("retry-me-1", item.assignment_id, "right", strength=3))
    assert created and not created_again and first == again
    assert count(store, Label) == 1
    with pytest.raises(Refused) as e:  # same id, different answer
        store.submit(alice, LabelInput("retry-me-1", item.assignment_id, "left"))
    assert (e.value.status, e.value.field) == (409, "submission_id")
    with pytest.raises(Refused) as e:  # second answer to an answered assignment
        store.submit(alice, LabelInput("another-id-1", item.assignment_id, "left"))
    assert (e.value.status, e.value.field) == (409, "assignment_id")
    with pytest.raises(Refused) as e:  # bob answering alice's assignment
        store.submit(bob, LabelInput("bob-sub-0001", item.assignment_id, "left"))
    assert (e.value.status, e.value.field) == (404, "assignment_id")
    with pytest.raises(Refused) as e:  # bob replaying alice's submission id
        store.submit(bob, LabelInput("retry-me-1", item.assignment_id, "right", strength=3))
    assert e.value.status == 409
    with pytest.raises(Refused):
        store.label_of(bob, first["id"])
    with pytest.raises(Refused):
        store.update_label(bob, first["id"], {"choice": "left"})
    changed = store.update_label(alice, first["id"], {"choice": "tie", "strength": None, "rationale": "same"})
    assert (changed["choice"], changed["strength"], changed["rationale"]) == ("tie", None, "same")
    assert count(store, Label) == 1


def test_skip_frees_the_slot_for_someone_else(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=1, overlap=1, annotators=["alice", "bob"])
    alice, bob = who(store, tokens["alice"]), who(store, tokens["bob"])
    item = store.next_item(alice)
    assert store.next_item(bob) is None  # the one slot is alice's
    label, _ = store.submit(alice, LabelInput("alice-skip-1", item.assignment_id, "skip", unsafe=True))
    assert label["choice"] == "skip"
    assert store.next_item(alice) is None  # never the same pair again
    assert store.next_item(bob) is not None
    assert store.progress(alice) == {"labelled": 0, "skipped": 1, "remaining": 0}
    with pytest.raises(Refused, match="skipped"):
        store.update_label(alice, label["id"], {"choice": "left"})


def test_stale_lease_is_reassigned_and_late_answer_accepted(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=1, overlap=1, annotators=["alice", "bob"])
    alice, bob = who(store, tokens["alice"]), who(store, tokens["bob"])
    item = store.next_item(alice)
    assert store.next_item(bob) is None
    with store.db.write() as s:
        s.execute(update(Assignment).values(created_at=utcnow() - timedelta(hours=2)))
    bob_item = store.next_item(bob)
    assert bob_item is not None and bob_item.assignment_id != item.assignment_id
    store.submit(bob, LabelInput("bob-late-1", bob_item.assignment_id, "left"))
    store.submit(alice, LabelInput("alice-late-1", item.assignment_id, "right"))  # late, still kept
    assert count(store, Label) == 2


def test_gold_items_mixed_in_at_the_rate(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=60, n_gold=10, overlap=1, gold_rate=0.2, annotators=["alice"])
    alice = who(store, tokens["alice"])
    n = 0
    while (item := store.next_item(alice)) is not None:
        store.submit(alice, LabelInput(f"g-{item.assignment_id}", item.assignment_id, "left"))
        n += 1
        if n == 40:
            break
    with store.db.read() as s:
        gold = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.is_gold.is_(True)))
    assert abs(gold - 0.2 * 40) <= 1
    regular, _ = build_records(store, "demo", ExportOptions())
    with_gold, _ = build_records(store, "demo", ExportOptions(include_gold=True))
    assert len(regular) == 40 - gold and len(with_gold) == 40
    assert {r["metadata"].get("gold_winner") for r in with_gold} == {None, "a"}


def test_uncertainty_orders_the_queue(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=5, overlap=1, annotators=["alice"])
    scores = write_jsonl(tmp_path / "rm.jsonl", [
        {"id": "p0", "p": 0.99}, {"id": "p1", "p": 0.55}, {"id": "p2", "p": [0.1, 0.9]},
        {"id": "p3", "p": [0.5, 0.52]}])
    assert store.admin.import_pairs("demo", uncertainty_path=scores).n_scored == 4
    with pytest.raises(DataError, match=r"rm.jsonl:1: field 'p': must be a probability"):
        store.admin.import_pairs("demo", uncertainty_path=write_jsonl(tmp_path / "rm.jsonl", [{"id": "p0", "p": 1.5}]))
    alice = who(store, tokens["alice"])
    order = []
    while (item := store.next_item(alice)) is not None:
        order.append(item.prompt[0]["content"].split(":")[0])
        store.submit(alice, LabelInput(f"u-{item.assignment_id}", item.assignment_id, "tie"))
    # p2 std 0.4; p1 0.5 - 0.05 = 0.45; p3 std 0.01; p0 0.01; unscored p4 last. Ties keep import order.
    assert order == ["Question 1", "Question 2", "Question 0", "Question 3", "Question 4"]


def test_deactivated_annotator_loses_access_and_frees_items(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=1, overlap=1, annotators=["alice", "bob"])
    secret, alice = store.login_annotator(tokens["alice"])
    store.next_item(alice)
    assert store.principal(secret) == alice
    store.admin.set_annotator_active("demo", "alice", False)
    assert store.principal(secret) is None
    assert store.login_annotator(tokens["alice"]) is None
    assert store.next_item(who(store, tokens["bob"])) is not None


def _label_all(store, tokens, choices: dict[str, list[str]]):
    """choices[name][k] is the answer name gives to their k-th item, in screen terms via the truth."""
    for name, answers in choices.items():
        p = who(store, tokens[name])
        for k, winner in enumerate(answers):
            item = store.next_item(p)
            with store.db.read() as s:
                left = s.get(Assignment, item.assignment_id).left
            choice = "tie" if winner == "tie" else ("left" if winner == left else "right")
            strength = 2 if winner != "tie" else None
            store.submit(p, LabelInput(f"x-{name}-{k}", item.assignment_id, choice, strength=strength,
                                       rationale=f"{name} says {winner}"))


def test_export_consensus_records(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=3, overlap=3)
    # pairs p0 p1 p2 in order for everyone: p0 2 votes a + 1 b, p1 unanimous tie, p2 a/b/tie draw
    _label_all(store, tokens, {"alice": ["a", "tie", "a"], "bob": ["a", "tie", "b"], "carol": ["b", "tie", "tie"]})
    records, report = build_records(store, "demo", ExportOptions())
    assert (report.records, report.unresolved) == (2, 1)
    by_id = {r["metadata"]["pair_id"]: r for r in records}
    p0, p1 = PreferenceRecord.from_dict(by_id["p0"]), PreferenceRecord.from_dict(by_id["p1"])
    assert p0.chosen["content"] == "The answer is 0." and not p0.tie and p0.source == "human"
    assert p0.annotator_id == "consensus" and p0.strength == 2
    assert p0.metadata["agreement"] == pytest.approx(2 / 3) and len(p0.metadata["votes"]) == 3
    assert p0.rationale == "alice says a\n\nbob says a"
    vote = p0.metadata["votes"][0]
    assert set(vote) == {"annotator", "winner", "strength", "rationale", "presented_order", "unsafe",
                         "duration_ms", "time"}
    assert p1.tie and p1.strength is None and p1.metadata["agreement"] == 1.0
    votes, _ = build_records(store, "demo", ExportOptions(votes=True))
    assert len(votes) == 9 and {v["annotator_id"] for v in votes} == {"alice", "bob", "carol"}
    draw = [v for v in votes if v["metadata"]["pair_id"] == "p2"]
    assert all(v["metadata"]["consensus"] is None for v in draw)
    ds, _ = build_records(store, "demo", ExportOptions(consensus="dawid-skene"))
    assert {r["metadata"]["pair_id"] for r in ds} >= {"p0", "p1"}
    excluded, rep = build_records(store, "demo", ExportOptions(exclude_annotators=("carol",), min_votes=2))
    assert rep.excluded_annotators == ["carol"] and len(excluded) == 2  # p2 is now a 1-1 draw


def test_export_files_and_hf_dataset_roundtrip(db_url, tmp_path):
    import datasets

    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=2, overlap=2, annotators=["alice", "bob"])
    _label_all(store, tokens, {"alice": ["a", "tie"], "bob": ["a", "tie"]})
    out = tmp_path / "out.jsonl"
    export(store, "demo", out, ExportOptions())
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [PreferenceRecord.from_dict(x).tie for x in lines] == [False, True]
    with pytest.raises(FileExistsError, match="--force"):
        export(store, "demo", out, ExportOptions())
    hf = tmp_path / "hf"
    export(store, "demo", hf, ExportOptions(format="hf-dataset"))
    ds = datasets.load_from_disk(str(hf))
    assert len(ds) == 2
    recs = [PreferenceRecord.from_dict(row) for row in ds]
    assert recs[0].metadata["votes"][0]["annotator"] in ("alice", "bob") and recs[1].tie


def test_concurrent_answers_commit_together_and_fail_alone(db_url, tmp_path):
    """Answers arriving together share a commit on SQLite (group commit); one refused answer in
    the group must fail alone, and every other answer must be stored."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    store = new_store(db_url)
    names = [f"a{i}" for i in range(8)]
    tokens = setup_project(store, tmp_path, n_pairs=4, overlap=8, annotators=names)
    people = [who(store, tokens[n]) for n in names]
    items = [store.next_item(p) for p in people]
    start = Barrier(len(people))

    def answer_one(k):
        start.wait()
        # a3 answers a4's assignment: refused; everyone else answers their own
        target = items[4].assignment_id if k == 3 else items[k].assignment_id
        return store.submit(people[k], LabelInput(f"group-{k:04d}", target, "tie"))

    with ThreadPoolExecutor(len(people)) as pool:
        futures = [pool.submit(answer_one, k) for k in range(len(people))]
    for k, f in enumerate(futures):
        if k == 3:
            with pytest.raises(Refused) as e:
                f.result()
            assert e.value.status == 404
        else:
            assert f.result()[1] is True
    assert count(store, Label) == len(people) - 1


def test_a_database_from_revision_0001_upgrades_with_its_labels(db_url, tmp_path):
    """A database written by the first release (revision 0001) keeps every row through the upgrade
    (SQLite copies the labels table to change its CHECK constraint) and works afterwards."""
    from sqlalchemy import text

    from rlhfkit.annotate.db import current_revision, upgrade
    from rlhfkit.annotate.store import Store

    store = Store(db_url)
    upgrade(store.db, "0001")
    now = utcnow()
    msg = {"role": "assistant", "content": "x"}
    with store.db.engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (id, name, gold_rate, lease_minutes, created_at) "
                          "VALUES (1, 'old', 0, 60, :t)"), {"t": now})
        for k, (a, b) in enumerate([("A0", "B0"), ("A1", "B1")], 1):
            conn.execute(text("INSERT INTO pairs (id, project_id, key, prompt, a, b, meta, overlap, n_active, "
                              "queue_rank, created_at) VALUES (:id, 1, :key, :prompt, :a, :b, '{}', 2, 0, 1, :t)"),
                         {"id": k, "key": f"p{k}", "prompt": json.dumps([{"role": "user", "content": "q"}]),
                          "a": json.dumps({**msg, "content": a}), "b": json.dumps({**msg, "content": b}), "t": now})
        for k, name in ((1, "ann"), (2, "bea")):
            conn.execute(text("INSERT INTO annotators (id, project_id, name, token_hash, active, created_at) "
                              "VALUES (:id, 1, :name, :h, true, :t)"), {"id": k, "name": name, "h": f"h{k}", "t": now})
            conn.execute(text("INSERT INTO assignments (id, pair_id, annotator_id, \"left\", is_gold, status, created_at) "
                              "VALUES (:id, 1, :id, 'b', false, 'done', :t)"), {"id": k, "t": now})
            conn.execute(text("INSERT INTO labels (submission_id, assignment_id, annotator_id, pair_id, winner, "
                              "skipped, strength, rationale, unsafe, created_at) VALUES (:s, :id, :id, 1, 'a', false, "
                              "2, 'old reason', false, :t)"), {"s": f"sub-old-{k}", "id": k, "t": now})
        if not store.db.is_sqlite:  # ids were given explicitly: move PostgreSQL's sequences past them
            for table in ("projects", "pairs", "annotators", "assignments"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 100)"))
    assert current_revision(store.db) == "0001"
    store.migrate()
    assert current_revision(store.db) == "0005"
    records, _ = build_records(store, "old", ExportOptions())
    assert len(records) == 1 and records[0]["chosen"]["content"] == "A0" and records[0]["strength"] == 2
    with store.db.read() as s:
        assert s.scalars(select(Pair.n_replies)).all() == [2, 2]
    token = store.admin.add_annotator("old", "cy")
    cy = who(store, token)
    item = store.next_item(cy)
    label, created = store.submit(cy, LabelInput("sub-new-0001", item.assignment_id, "tie"))
    assert created and label["choice"] == "tie"


def test_upgrade_repairs_lone_surrogates_stored_before_import_refused_them(db_url, tmp_path):
    """Fault 1 of issue 17 in a database written before the fix: the page, the API and the export
    work again after the upgrade, with U+FFFD where the lone surrogates were."""
    from sqlalchemy import text

    from rlhfkit.annotate.db import upgrade
    from rlhfkit.annotate.store import Store

    store = Store(db_url)
    upgrade(store.db, "0004")
    bad = {"role": "assistant", "content": "broken \ud800 text"}
    with store.db.engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (name, gold_rate, lease_minutes, created_at) VALUES ('old', 0, 60, :t)"),
                     {"t": utcnow()})
        conn.execute(text("INSERT INTO pairs (project_id, key, prompt, a, b, meta, overlap, n_active, queue_rank, "
                          "created_at) SELECT id, 'p\\ud800', :prompt, :a, :b, :meta, 1, 0, 1, :t FROM projects"),
                     {"prompt": json.dumps([{"role": "user", "content": "q"}]), "a": json.dumps(bad),
                      "b": json.dumps({"role": "assistant", "content": "fine"}),
                      "meta": json.dumps({"note\udc00": ["x\udfff"]}), "t": utcnow()})
    store.migrate()
    with store.db.read() as s:
        pair = s.scalars(select(Pair)).one()
    assert pair.a["content"] == "broken \ufffd text" and pair.meta == {"note\ufffd": ["x\ufffd"]}
    assert pair.key == "p\\ud800"  # SQL text, not a JSON escape: an ordinary backslash, left alone
    who_ = who(store, store.admin.add_annotator("old", "ann"))
    item = store.next_item(who_)
    assert "broken \ufffd text" in (item.left, item.right)
    store.submit(who_, LabelInput("sub-after-repair", item.assignment_id, "left"))
    records, _ = build_records(store, "old", ExportOptions())
    json.dumps(records, ensure_ascii=False).encode("utf-8")  # would raise on a lone surrogate
