"""Head-to-head metrics (rlhfkit.evaluate.winrate)."""

import json
import math

import numpy as np
import pytest

from rlhfkit.evaluate.winrate import (
    EVAL_SCHEMA_VERSION,
    distinct_n,
    evaluate_pairs,
    format_table,
    length_controlled_win_rate,
    length_stats,
    sequence_kl_estimate,
    win_rate,
)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_win_rate_hand_worked():
    """[1, 1, 0.5, 0]: (1 + 1 + 0.5 + 0) / 4 = 0.625; a tie counts half."""
    est = win_rate([1, 1, 0.5, 0], n_boot=500)
    assert est.value == pytest.approx(0.625, abs=1e-12)
    assert 0.0 <= est.ci_low <= 0.625 <= est.ci_high <= 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate([1, 2])


def test_lc_win_rate_equals_raw_when_lengths_equal():
    """All length differences 0 -> the tanh feature is 0 and the GLM is intercept-only, whose MLE is
    logit(mean preference): LC = raw = 3/4. Tolerance 1e-3 covers the 1e-3 ridge on theta."""
    est = length_controlled_win_rate([1, 1, 1, 0], [10, 10, 10, 10], [10, 10, 10, 10], n_boot=200)
    assert est.value == pytest.approx(0.75, abs=1e-3)


def _judged(q, n=1000, seed=0):
    """Synthetic judge: A's completions are ~100 chars longer; P(A wins) = sigmoid(q + 2.5 tanh(delta / sd))."""
    rng = np.random.default_rng(seed)
    la, lb = rng.normal(300, 60, n), rng.normal(200, 60, n)
    delta = la - lb
    prefs = (rng.random(n) < _sigmoid(q + 2.5 * np.tanh(delta / delta.std()))).astype(float)
    return prefs, la, lb


def test_lc_win_rate_removes_injected_length_bias():
    """True quality equal (q = 0) but the judge prefers the longer answer: the raw win rate is far
    above 0.5 (~0.8), the length-controlled one is near 0.5. Tolerance 0.07 ~ 2 bootstrap sds at
    n = 1000 prompts."""
    prefs, la, lb = _judged(q=0.0)
    raw = win_rate(prefs, n_boot=500)
    lc = length_controlled_win_rate(prefs, la, lb, n_boot=1000)
    assert raw.ci_low > 0.7
    assert abs(lc.value - 0.5) < 0.07
    assert lc.ci_low < 0.5 < lc.ci_high


def test_lc_win_rate_keeps_real_quality_effect():
    """Same length bias plus a real quality edge q = 1: LC should be near sigmoid(1) = 0.731 and
    significantly above 0.5. Tolerance 0.07 as above."""
    prefs, la, lb = _judged(q=1.0, seed=1)
    lc = length_controlled_win_rate(prefs, la, lb, n_boot=1000)
    assert abs(lc.value - _sigmoid(1.0)) < 0.07
    assert lc.ci_low > 0.6


def test_lc_win_rate_warns_on_pure_extrapolation_and_checks_sizes():
    with pytest.warns(UserWarning, match="extrapolation"):
        length_controlled_win_rate([1, 0, 1, 1], [5, 6, 7, 8], [1, 1, 1, 1], n_boot=200)
    with pytest.raises(ValueError, match="align per prompt"):
        length_controlled_win_rate([1, 0], [1, 2, 3], [1, 2])


def test_distinct_n_hand_worked():
    """ "a b a b": unigrams a, b, a, b -> 2 unique / 4 = 0.5; bigrams (a b), (b a), (a b) -> 2/3.
    Across texts n-grams are pooled: ["a b", "a b"] bigrams -> 1 unique / 2."""
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
    assert distinct_n(["a", ""], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_length_stats_hand_worked():
    """["a b c", "", "d"]: words 3, 0, 1 -> mean 4/3, median 1, max 3, one empty of 3; chars 5, 0, 1 -> 2."""
    s = length_stats(["a b c", "", "d"])
    assert s["n"] == 3
    assert s["mean_words"] == pytest.approx(4 / 3)
    assert (s["median_words"], s["max_words"]) == (1.0, 3.0)
    assert s["frac_empty"] == pytest.approx(1 / 3)
    assert s["mean_chars"] == pytest.approx(2.0)


def test_sequence_kl_hand_worked_and_gaussian():
    """Hand: log A = [-1, -2, -3], log B = [-2, -2, -5] -> differences [1, 0, 2] -> mean 1.0.

    Gaussian: y ~ A = N(0, 1), B = N(1, 1); log A(y) - log B(y) = ((y - 1)^2 - y^2) / 2, whose
    expectation is KL(A || B) = (0 - 1)^2 / 2 = 0.5. With 4000 samples the sd of the estimate is
    ~0.016; tolerance 0.05, and the CI must contain 0.5."""
    assert sequence_kl_estimate([-1, -2, -3], [-2, -2, -5], n_boot=200).value == pytest.approx(1.0)
    y = np.random.default_rng(0).normal(size=4000)
    log_a, log_b = -0.5 * y**2, -0.5 * (y - 1) ** 2
    est = sequence_kl_estimate(log_a, log_b, n_boot=1000)
    assert abs(est.value - 0.5) < 0.05 and est.ci_low < 0.5 < est.ci_high


def test_sequence_kl_warns_when_significantly_negative():
    with pytest.warns(UserWarning, match="significantly negative"):
        sequence_kl_estimate(np.full(50, -10.0), np.full(50, -5.0) + np.linspace(0, 0.1, 50), n_boot=200)
    with pytest.raises(ValueError, match="same non-zero number"):
        sequence_kl_estimate([1.0], [1.0, 2.0])


EXPECTED_KEYS = {
    "schema_version", "meta", "n_prompts", "alpha", "n_boot", "seed", "win_rate", "lc_win_rate",
    "gold", "proxy", "kl", "length", "distinct",
}  # fmt: skip


def test_evaluate_pairs_schema_and_gold_win_rate():
    """gold policy [1, 2, 3, 5], reference [0, 2, 4, 1] -> per prompt win, tie, loss, win ->
    win rate (1 + 0.5 + 0 + 1) / 4 = 0.625; W/T/L 2/1/1; gold difference mean (1 + 0 - 1 + 4)/4 = 1."""
    pol = ["a b c", "d e", "f g h i", "j"]
    ref = ["a", "b c", "d", "e f"]
    d = evaluate_pairs(
        pol, ref,
        gold_policy=[1, 2, 3, 5], gold_reference=[0, 2, 4, 1],
        proxy_policy=[0.0, 0.0, 0.0, 0.0], proxy_reference=[1.0, 1.0, 1.0, 1.0],
        logps_policy=[-1.0, -2.0, -3.0, -4.0], logps_reference_on_policy=[-2.0, -2.0, -5.0, -4.0],
        meta={"run": "r1", "step": 100}, n_boot=300,
    )  # fmt: skip
    assert set(d) == EXPECTED_KEYS
    assert d["schema_version"] == EVAL_SCHEMA_VERSION and d["meta"] == {"run": "r1", "step": 100}
    assert d["n_prompts"] == 4
    wr = d["win_rate"]
    assert set(wr) == {"value", "ci_low", "ci_high", "source", "n_wins", "n_ties", "n_losses"}
    assert (wr["value"], wr["source"], wr["n_wins"], wr["n_ties"], wr["n_losses"]) == (0.625, "gold", 2, 1, 1)
    assert set(d["lc_win_rate"]) == {"value", "ci_low", "ci_high", "length_unit"}
    assert set(d["gold"]) == {"policy", "reference", "difference"}
    assert d["gold"]["difference"]["value"] == pytest.approx(1.0)
    assert d["gold"]["policy"]["value"] == pytest.approx(2.75)
    assert d["proxy"]["difference"]["value"] == pytest.approx(-1.0)
    assert d["kl"]["value"] == pytest.approx(0.75)  # differences [1, 0, 2, 0]
    assert set(d["length"]["policy"]) == {
        "n",
        "mean_words",
        "median_words",
        "p90_words",
        "max_words",
        "mean_chars",
        "frac_empty",
    }
    assert set(d["distinct"]["policy"]) == {"distinct_1", "distinct_2"}
    json.dumps(d, allow_nan=False)  # valid JSON: no NaN anywhere
    table = format_table(d)
    assert "win rate (from gold)" in table and "62.5%" in table and "W/T/L 2/1/1" in table


def test_evaluate_pairs_source_precedence_and_errors():
    pol, ref = ["x y", "z"], ["x", "y z"]
    d = evaluate_pairs(pol, ref, prefs=[0, 0], gold_policy=[9, 9], gold_reference=[0, 0], meta={}, n_boot=200)
    assert d["win_rate"]["source"] == "prefs" and d["win_rate"]["value"] == 0.0
    d = evaluate_pairs(pol, ref, proxy_policy=[1, 2], proxy_reference=[1, 3], meta={}, n_boot=200)
    assert d["win_rate"]["source"] == "proxy" and d["win_rate"]["value"] == pytest.approx(0.25)  # tie, loss
    d = evaluate_pairs(pol, ref, meta={})
    assert d["win_rate"] is None and d["lc_win_rate"] is None and d["gold"] is None and d["kl"] is None
    assert "n_prompts" in format_table(d)
    with pytest.raises(ValueError, match="pair per prompt"):
        evaluate_pairs(pol, ["only one"], meta={})
    with pytest.raises(ValueError, match="gold_policy and gold_reference"):
        evaluate_pairs(pol, ref, gold_policy=[1, 2], meta={})
    with pytest.raises(ValueError, match="gold_policy has 3 values but there are 2 prompts"):
        evaluate_pairs(pol, ref, gold_policy=[1, 2, 3], gold_reference=[1, 2], meta={})
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_pairs(pol, ref, gold_policy=[1, math.nan], gold_reference=[1, 2], meta={})
