"""Quality figures you can trust (issue 17): sample sizes, bootstrap and Wilson intervals, gold
accuracy over time, annotators below a threshold highlighted (store, dashboard, JSON, CLI)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

import numpy as np
import pytest
from annotate_helpers import admin_sign_in, new_store, pair_dict, write_jsonl
from fastapi.testclient import TestClient
from sqlalchemy import select

from rlhfkit.annotate.models import Assignment, Pair
from rlhfkit.annotate.quality import Thresholds, agreement_intervals, gold_trend, mark_low, wilson
from rlhfkit.annotate.server import create_app
from rlhfkit.annotate.stats import project_stats
from rlhfkit.annotate.store import LabelInput
from rlhfkit.cli.annotate import main


def test_wilson_interval_by_hand():
    """8 of 10: centre (8 + 1.92) / 13.84 = 0.7168, half-width 1.96 sqrt(1.6 + 0.96) / 13.84 = 0.2266,
    so [0.4902, 0.9433] (the textbook value); 0 of 5 starts at 0 and n = 0 says nothing."""
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = wilson(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)
    assert wilson(5, 5)[1] == 1.0 and all(math.isnan(x) for x in wilson(0, 0))


def test_agreement_intervals_shrink_with_more_pairs_and_cover_the_estimate():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=400)
    # three raters who give the true label 70% of the time, else a random one
    ratings = np.where(rng.random((400, 3)) < 0.7, truth[:, None], rng.integers(0, 3, size=(400, 3)))
    big, small = agreement_intervals(ratings), agreement_intervals(ratings[:40])
    for name in ("fleiss_kappa", "krippendorff_alpha_ordinal"):
        b, s = big[name], small[name]
        assert b["n"] == 400 and s["n"] == 40
        assert b["ci_low"] <= b["value"] <= b["ci_high"] and s["ci_low"] <= s["value"] <= s["ci_high"]
        assert (b["ci_high"] - b["ci_low"]) < 0.6 * (s["ci_high"] - s["ci_low"])  # ~ 1/sqrt(10) narrower
    perfect = agreement_intervals(np.repeat(truth[:20, None], 3, axis=1))  # everyone gives the true label
    assert perfect["fleiss_kappa"]["value"] == pytest.approx(1.0) and perfect["fleiss_kappa"]["ci_low"] == pytest.approx(1.0)
    empty = agreement_intervals(np.full((3, 2), -1))
    assert empty["fleiss_kappa"] == {"value": None, "ci_low": None, "ci_high": None, "n": 0}


def test_fast_intervals_equal_the_naive_bootstrap():
    """The vectorised resampling (summed per-item terms) against calling agreement.fleiss_kappa /
    krippendorff_alpha on every resample: the same resamples (same seed) give the same interval."""
    from rlhfkit.annotate import agreement as ag
    from rlhfkit.evaluate.stats import bootstrap_ci

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, size=120)
    ratings = np.where(rng.random((120, 4)) < 0.6, truth[:, None], rng.integers(0, 3, size=(120, 4)))
    ratings[rng.random((120, 4)) < 0.35] = -1  # missing votes, and some items below two votes
    counts = ag.category_counts(ratings)
    rows = np.flatnonzero(counts.sum(axis=1) >= 2)
    fast = agreement_intervals(ratings, n_boot=300, seed=3)
    naive = {
        "fleiss_kappa": bootstrap_ci(np.arange(len(rows), dtype=float),
                                     lambda x: ag.fleiss_kappa(counts[rows][x.astype(int)]), n_boot=300, seed=3),
        "krippendorff_alpha_ordinal": bootstrap_ci(np.arange(len(rows), dtype=float),
                                                   lambda x: ag.krippendorff_alpha(ratings[rows][x.astype(int)]),
                                                   n_boot=300, seed=3)}
    for name, est in naive.items():
        assert fast[name]["n"] == len(rows) < 120
        assert [fast[name][k] for k in ("value", "ci_low", "ci_high")] == pytest.approx(
            [est.value, est.ci_low, est.ci_high], abs=1e-9)


def test_gold_trend_and_thresholds():
    t0 = datetime(2026, 1, 1)
    times = [t0 + timedelta(minutes=k) for k in range(25)]
    correct = [True] * 10 + [False] * 5 + [True] * 5 + [False, True, False, True, False]
    blocks = gold_trend(times[::-1], correct[::-1])  # given newest first: sorted by time
    assert [(b["n"], b["accuracy"]) for b in blocks] == [(10, 1.0), (10, 0.5), (5, 0.4)]
    assert blocks[0]["from"] == t0
    assert gold_trend(times[:12], correct[:12]) == gold_trend(times[:10], correct[:10])  # 2 left over: dropped
    row = {"gold_items": 10, "gold_accuracy": 0.7, "consensus_items": 4, "agreement_with_consensus": 0.1}
    assert mark_low(row, Thresholds()) == ["gold_accuracy"]  # agreement: too few items to say
    assert mark_low(row, Thresholds(min_gold=0.6, min_n=3)) == ["agreement_with_consensus"]
    with pytest.raises(ValueError, match="min_gold must be in"):
        Thresholds(min_gold=1.5)


def careless_project(tmp_path):
    """Gold pair g0..g5 (winner a) served first to everyone (gold rate 1): alice right on all six,
    bob wrong on all six; then both label the same 4 regular pairs (alice a a b b, bob a b a b)."""
    store = new_store(f"sqlite:///{tmp_path / 'q.db'}")
    rows = [pair_dict(i, id=f"g{i}", metadata={"gold_winner": "a"}) for i in range(6)] + [pair_dict(i) for i in range(6, 10)]
    store.admin.import_pairs("demo", write_jsonl(tmp_path / "pairs.jsonl", rows), overlap=2, gold_rate=1.0)
    for name in ("alice", "bob"):
        who = store.login_annotator(store.admin.add_annotator("demo", name))[1]
        for k in range(10):
            item = store.next_item(who)
            with store.db.read() as s:
                gold, left = s.execute(select(Pair.gold_winner, Assignment.left).join(Assignment, Assignment.pair_id == Pair.id)
                                       .where(Assignment.id == item.assignment_id)).one()
            if gold is not None:
                want = "a" if name == "alice" else "b"
            else:
                want = "ab"[(k - 6) // 2] if name == "alice" else "ab"[(k - 6) % 2]
            store.submit(who, LabelInput(f"{name}-q-{k:03d}", item.assignment_id, "left" if left == want else "right"))
    return store


def test_careless_annotator_is_highlighted_everywhere(tmp_path, capsys):
    store = careless_project(tmp_path)
    stats = project_stats(store, "demo")
    by = {a["annotator"]: a for a in stats["annotators"]}
    assert by["bob"]["low"] == ["gold_accuracy"] and by["alice"]["low"] == []
    assert by["bob"]["gold_accuracy_ci"] == pytest.approx(wilson(0, 6)) and by["alice"]["gold_items"] == 6
    assert stats["intervals"]["fleiss_kappa"]["n"] == 4
    admin = store.admin.ensure_admin_token()
    c = TestClient(create_app(store, warm_up=False))
    c.admin_token = admin
    admin_sign_in(c)
    page = c.get("/admin/projects/demo").text
    bob_row = re.search(r"<tr class=\"low\"[^>]*>\s*<td>bob.*?</tr>", page, re.S)
    assert bob_row and "below threshold" in bob_row.group(0) and "[0.00, 0.39]" in bob_row.group(0)
    assert 'id="fleiss-ci"' in page and "n=4" in page
    assert "below threshold" not in c.get("/admin/projects/demo?min_gold=0").text
    assert c.get("/admin/projects/demo?min_gold=1.5").status_code == 422
    js = c.get("/api/admin/projects/demo/stats?min_agree=0.9").json()
    assert js["thresholds"]["min_agree"] == 0.9 and js["intervals"]["krippendorff_alpha_ordinal"]["n"] == 4
    assert c.get("/api/admin/projects/demo/stats?min_agree=-1").status_code == 422

    db = str(store.db.url)
    assert main(["stats", "--project", "demo", "--db", db]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^bob !\s", out, re.M) and re.search(r"Fleiss kappa\s+\S+ \[.+\] n=4", out)
    assert re.search(r"^bob !.* 0\.00 \(6\) \[0\.00, 0\.39\]", out, re.M)  # gold accuracy, n, Wilson interval
    assert main(["stats", "--project", "demo", "--db", db, "--min-gold", "2"]) == 1
    assert "min_gold must be in [0, 1]" in capsys.readouterr().err
