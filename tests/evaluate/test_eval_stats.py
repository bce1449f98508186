"""rliable statistics (rlhfkit.evaluate.stats) and the run-group comparison (rlhfkit.evaluate.compare)."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from rlhfkit.evaluate.compare import compare_runs, final_value, format_compare
from rlhfkit.evaluate.stats import (
    Estimate,
    bootstrap_ci,
    iqm,
    performance_profile,
    probability_of_improvement,
    probability_of_improvement_ci,
    stratified_bootstrap_ci,
)

# ---------------------------------------------------------------- IQM


def test_iqm_hand_worked():
    """n = 8: int(0.25 * 8) = 2 values cut from each end of the sorted scores.

    sorted [0, 1, 2, 3, 4, 5, 6, 100] -> middle [2, 3, 4, 5] -> IQM 3.5 (the mean, 15.125, is
    dominated by the outlier). n = 10: int(2.5) = 2 cut each end of 1..10 -> [3..8] -> 5.5.
    """
    x = [6, 0, 100, 3, 1, 5, 2, 4]
    assert iqm(x) == pytest.approx(3.5, abs=1e-12)
    assert iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25), abs=1e-12)
    assert iqm(np.arange(1, 11)) == pytest.approx(5.5, abs=1e-12)


def test_iqm_matches_scipy_on_random_matrix_pooled():
    """A (runs, tasks) matrix is pooled, as rliable's aggregate_iqm does."""
    m = np.random.default_rng(3).normal(size=(7, 5))
    assert iqm(m) == pytest.approx(scipy.stats.trim_mean(m.ravel(), 0.25), abs=1e-12)
    with pytest.raises(ValueError, match="empty"):
        iqm([])


# ---------------------------------------------------------------- bootstrap CIs


def test_bootstrap_ci_coverage_near_nominal():
    """95% percentile CI of the mean of n = 30 draws from N(1, 2^2): over 200 seeded repetitions
    the interval should contain the true mean 1.0 about 95% of the time.

    Tolerance [0.90, 0.99]: the binomial sd of the coverage over 200 trials is
    sqrt(0.95 * 0.05 / 200) = 0.015, and percentile intervals at n = 30 under-cover by ~1%.
    """
    rng = np.random.default_rng(12345)
    hits = 0
    for rep in range(200):
        x = rng.normal(1.0, 2.0, size=30)
        est = bootstrap_ci(x, np.mean, n_boot=1000, seed=rep)
        assert est.ci_low <= est.value <= est.ci_high
        hits += est.ci_low <= 1.0 <= est.ci_high
    coverage = hits / 200
    assert 0.90 <= coverage <= 0.99, coverage


def test_stratified_bootstrap_coverage_near_nominal():
    """Stratified CI of the pooled mean over 3 tasks x 20 runs with task means 0, 5, 10 (true
    pooled mean 5). Same 200-repetition design and [0.90, 0.99] band as above."""
    rng = np.random.default_rng(777)
    hits = 0
    for rep in range(200):
        scores = {t: rng.normal(mu, 1.0, size=20) for t, mu in [("a", 0.0), ("b", 5.0), ("c", 10.0)]}
        est = stratified_bootstrap_ci(scores, np.mean, n_boot=1000, seed=rep)
        hits += est.ci_low <= 5.0 <= est.ci_high
    assert 0.90 <= hits / 200 <= 0.99, hits / 200


def test_stratified_bootstrap_resamples_within_tasks():
    """Task a's runs all score 0, task b's all score 1 (5 runs each). Resampling within tasks keeps
    5 zeros and 5 ones in every replicate, so the mean is exactly 0.5 every time and the CI is the
    point [0.5, 0.5]. An unstratified bootstrap would mix the tasks and give a wide interval."""
    est = stratified_bootstrap_ci({"a": np.zeros(5), "b": np.ones(5)}, np.mean, n_boot=500, seed=0)
    assert (est.value, est.ci_low, est.ci_high) == (0.5, 0.5, 0.5)
    unstratified = bootstrap_ci(np.r_[np.zeros(5), np.ones(5)], np.mean, n_boot=500, seed=0)
    assert unstratified.ci_high - unstratified.ci_low > 0.3


def test_stratified_bootstrap_value_is_pooled_iqm_and_accepts_plain_array():
    scores = {"a": [0.0, 1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0, 100.0]}
    est = stratified_bootstrap_ci(scores, n_boot=200)
    assert est.value == pytest.approx(3.5)  # the hand-worked IQM above
    assert est.ci_low <= est.value <= est.ci_high
    assert stratified_bootstrap_ci(np.arange(8.0), n_boot=200).value == pytest.approx(iqm(np.arange(8.0)))
    # a statistic without an `axis` argument goes through the row-by-row path and must agree
    slow = stratified_bootstrap_ci(scores, lambda v: float(scipy.stats.trim_mean(v, 0.25)), n_boot=200)
    assert (slow.ci_low, slow.ci_high) == pytest.approx((est.ci_low, est.ci_high), abs=1e-12)


def test_paired_bootstrap_difference():
    """x = y + 1 exactly: the paired difference of means is 1 in every replicate -> CI [1, 1];
    resampling x and y independently would not see the pairing."""
    y = np.random.default_rng(0).normal(size=50)
    est = bootstrap_ci(y + 1.0, np.mean, paired_with=y, n_boot=500)
    assert est.value == pytest.approx(1.0, abs=1e-12)
    assert est.ci_low == pytest.approx(1.0, abs=1e-9) and est.ci_high == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="pairs must align"):
        bootstrap_ci([1.0, 2.0], paired_with=[1.0])


def test_bootstrap_ci_edge_cases():
    one = bootstrap_ci([3.0])
    assert one.value == 3.0 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert one.to_dict() == {"value": 3.0, "ci_low": None, "ci_high": None}
    json.dumps(one.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="no observations"):
        bootstrap_ci([])
    med = bootstrap_ci([1.0, 2.0, 3.0, 10.0, 11.0], lambda v: np.median(v), n_boot=300)
    assert med.value == 3.0 and med.ci_low <= 3.0 <= med.ci_high
    assert str(Estimate(0.5, 0.25, 0.75)) == "0.5 [0.25, 0.75]"


# ---------------------------------------------------------------- probability of improvement


def test_probability_of_improvement_hand_worked():
    """x = [1, 2], y = [0, 3]: pairs (1,0) win, (1,3) loss, (2,0) win, (2,3) loss -> 2/4 = 0.5.

    Ties count half: x = [1, 1], y = [1, 0]: (1,1) 0.5, (1,0) 1, twice -> 3/4 = 0.75.
    Two tasks are averaged: task a 0.5, task b ([5] vs [1]) 1.0 -> 0.75.
    """
    assert probability_of_improvement([1, 2], [0, 3]) == pytest.approx(0.5, abs=1e-12)
    assert probability_of_improvement([1, 1], [1, 0]) == pytest.approx(0.75, abs=1e-12)
    assert probability_of_improvement({"a": [1, 2], "b": [5]}, {"a": [0, 3], "b": [1]}) == pytest.approx(0.75)


def test_probability_of_improvement_matches_naive_pair_count():
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=(3, 7)), 1)  # rounding creates ties
    y = np.round(rng.normal(0.3, 1, size=(3, 5)), 1)
    naive = np.mean(
        [np.mean((xi[:, None] > yi[None]) + 0.5 * (xi[:, None] == yi[None])) for xi, yi in zip(x, y)]
    )
    fast = probability_of_improvement({i: x[i] for i in range(3)}, {i: y[i] for i in range(3)})
    assert fast == pytest.approx(naive, abs=1e-12)


def test_probability_of_improvement_dominance_and_ci():
    x = {"a": [5.0, 6.0, 7.0], "b": [10.0, 11.0]}
    y = {"a": [1.0, 2.0], "b": [0.0, 1.0, 2.0]}
    est = probability_of_improvement_ci(x, y, n_boot=500)
    assert (est.value, est.ci_low, est.ci_high) == (1.0, 1.0, 1.0)
    assert probability_of_improvement(y, x) == 0.0
    rng = np.random.default_rng(2)
    same = probability_of_improvement_ci(rng.normal(size=40), rng.normal(size=40), n_boot=1000)
    assert same.ci_low < 0.5 < same.ci_high
    assert 0.0 <= same.ci_low <= same.value <= same.ci_high <= 1.0
    with pytest.raises(ValueError, match="same tasks"):
        probability_of_improvement({"a": [1.0]}, {"b": [1.0]})


# ---------------------------------------------------------------- performance profile


def test_performance_profile_hand_worked():
    """Pooled scores [1, 2, 3, 4, 5]: above tau = 0 all 5 -> 1; above 2.5 -> 3/5 = 0.6; above 10 -> 0.
    At tau = 0 and 10 every replicate gives the same fraction, so the bands collapse."""
    frac, lo, hi = performance_profile({"a": [1, 2, 3], "b": [4, 5]}, [0.0, 2.5, 10.0], n_boot=500)
    np.testing.assert_allclose(frac, [1.0, 0.6, 0.0], atol=1e-12)
    np.testing.assert_allclose([lo[0], hi[0], lo[2], hi[2]], [1, 1, 0, 0], atol=1e-12)
    assert lo[1] <= 0.6 <= hi[1] and hi[1] - lo[1] > 0
    # strictly above: a score equal to tau does not count
    f, _, _ = performance_profile([1.0, 2.0], [1.0], n_boot=200)
    assert f[0] == 0.5


# ---------------------------------------------------------------- compare_runs


def _run(tmp_path, name, task, final, via_eval_json=False):
    d = tmp_path / name
    d.mkdir()
    cfg = "method: ppo\nseed: 1\nmodel: tiny\n" + (f"task: {task}\n" if task else "")
    (d / "config.yaml").write_text(cfg)
    rows = [{"step": 10, "reward/mean": 1.0}]
    if via_eval_json:  # no eval/gold line at all: the final value must come from eval.json
        (d / "eval.json").write_text(json.dumps({"gold": {"policy": {"value": final}}}))
    else:
        rows = [{"step": 0, "eval/gold": 0.0}, *rows, {"step": 20, "eval/gold": final}]
        rows.append({"step": 30, "loss/policy": 0.1})  # the last line need not have the metric
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_compare_runs_dominating_group(tmp_path):
    """A's final gold per task: t1 [3, 4, 5], t2 [8, 9]; B: t1 [0, 1], t2 [2, 3, 4]. Every A run beats
    every B run of the same task, so P(A > B) = 1 with CI [1, 1]. A's pooled scores [3, 4, 5, 8, 9]:
    int(1.25) = 1 cut each end -> IQM mean(4, 5, 8) = 17/3; mean 29/5 = 5.8."""
    a = [_run(tmp_path, f"a{i}", "t1", v) for i, v in enumerate([3, 4, 5])]
    a += [_run(tmp_path, f"a{i + 3}", "t2", v, via_eval_json=(v == 9)) for i, v in enumerate([8, 9])]
    b = [_run(tmp_path, f"b{i}", "t1", v) for i, v in enumerate([0, 1])]
    b += [_run(tmp_path, f"b{i + 2}", "t2", v) for i, v in enumerate([2, 3, 4])]
    d = compare_runs(a, b, n_boot=500)
    assert d["tasks"] == ["t1", "t2"]
    assert d["a"]["iqm"]["value"] == pytest.approx(17 / 3) and d["a"]["mean"] == pytest.approx(5.8)
    assert d["a"]["scores"] == {"t1": [3.0, 4.0, 5.0], "t2": [8.0, 9.0]}
    assert d["p_a_better"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    text = format_compare(d)
    assert "P(A > B) = 1 [1, 1]" in text and "A is better" in text
    json.dumps(d, allow_nan=False)


def test_compare_runs_errors(tmp_path):
    a = [_run(tmp_path, "a", "t1", 1.0)]
    b = [_run(tmp_path, "b", "t2", 1.0)]
    with pytest.raises(ValueError, match="different tasks"):
        compare_runs(a, b)
    c = _run(tmp_path, "c", None, 2.0)  # no task key -> stratum "default"
    assert compare_runs([c], [c], n_boot=200)["tasks"] == ["default"]
    with pytest.raises(ValueError, match="no finite 'reward/nope'"):
        final_value(c, "reward/nope")
    assert final_value(c, "reward/mean") == 1.0
    with pytest.raises(ValueError, match="no config.yaml"):
        compare_runs([tmp_path / "missing"], [c])
