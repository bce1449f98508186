"""Gao et al. 2022 overoptimization fits and the turnover detector (rlhfkit.evaluate.overopt)."""

import json
import math

import numpy as np
import pytest

from rlhfkit.evaluate.overopt import (
    bon_kl,
    bon_peak_d,
    find_turnover,
    fit_bon,
    fit_rl,
    gold_bon,
    gold_rl,
    overopt_summary,
    rl_peak_d,
    smooth,
)


def test_functional_forms_hand_worked():
    """R_RL(e) with alpha 1, beta 0.5: e (1 - 0.5 log e) = e / 2; R_RL(0) = 0 (d log d -> 0).
    R_bon(2) with alpha 1, beta 0.25: 2 (1 - 0.5) = 1."""
    assert gold_rl(math.e, 1.0, 0.5) == pytest.approx(math.e / 2, abs=1e-12)
    assert gold_rl(0.0, 1.0, 0.5) == 0.0
    assert gold_bon(2.0, 1.0, 0.25) == pytest.approx(1.0, abs=1e-12)


def test_bon_kl_hand_worked():
    """log n - (n - 1)/n: n=1 -> 0; n=2 -> log 2 - 1/2 = 0.193147; n=4 -> log 4 - 3/4 = 0.636294."""
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(0.193147, abs=1e-6)
    assert bon_kl(4) == pytest.approx(0.636294, abs=1e-6)
    np.testing.assert_allclose(bon_kl([1, 4]), [0.0, 0.636294], atol=1e-6)
    with pytest.raises(ValueError):
        bon_kl(0)


def test_peaks_match_grid_argmax():
    """R_RL peaks at d* = exp(alpha/beta - 1): alpha 1, beta 0.5 -> e. R_bon at alpha/(2 beta): 1/(2*0.25) = 2."""
    d = np.linspace(0.001, 6, 60001)
    assert rl_peak_d(1.0, 0.5) == pytest.approx(math.e)
    assert d[np.argmax(gold_rl(d, 1.0, 0.5))] == pytest.approx(math.e, abs=1e-3)
    assert bon_peak_d(1.0, 0.25) == pytest.approx(2.0)
    assert d[np.argmax(gold_bon(d, 1.0, 0.25))] == pytest.approx(2.0, abs=1e-3)
    assert rl_peak_d(1.0, -0.1) is None and bon_peak_d(1.0, 0.0) is None


@pytest.mark.parametrize("alpha,beta", [(1.2, 0.4), (0.5, 0.05), (2.0, 1.5)])
def test_fits_recover_noiseless(alpha, beta):
    """Noiseless curves (including d = 0) give back alpha, beta to 1e-8 (an exact linear solve)."""
    d = np.linspace(0.0, 5.0, 40)
    assert fit_rl(d, gold_rl(d, alpha, beta)) == pytest.approx((alpha, beta), abs=1e-8)
    assert fit_bon(d, gold_bon(d, alpha, beta)) == pytest.approx((alpha, beta), abs=1e-8)


def test_fits_recover_lightly_noisy():
    """Gaussian noise sd 0.02 on 60 points with d in (0, 5]: alpha and beta within 0.03 (the
    least-squares standard errors here are ~0.005-0.01)."""
    rng = np.random.default_rng(0)
    d = np.linspace(0.05, 5.0, 60)
    a, b = fit_rl(d, gold_rl(d, 1.2, 0.4) + rng.normal(0, 0.02, d.size))
    assert abs(a - 1.2) < 0.03 and abs(b - 0.4) < 0.03
    a, b = fit_bon(d, gold_bon(d, 0.8, 0.1) + rng.normal(0, 0.02, d.size))
    assert abs(a - 0.8) < 0.03 and abs(b - 0.1) < 0.03


def test_fit_input_errors():
    with pytest.raises(ValueError, match="two distinct"):
        fit_rl([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        fit_bon([-1.0, 1.0, 2.0], [0.0, 1.0, 2.0])


def test_smooth_hand_worked():
    """Width 3, ends average what exists: [0, 3, 6] -> [(0+3)/2, (0+3+6)/3, (3+6)/2] = [1.5, 3, 4.5]."""
    np.testing.assert_allclose(smooth([0.0, 3.0, 6.0], 3), [1.5, 3.0, 4.5])


def _rise_fall(noise=0.0, seed=0):
    """40 evals every 10 steps, d from 0 to 4; gold = R_RL(d; 1, 0.5) peaks at d = e, i.e. eval
    index 27 (d = 4 * 27/39 = 2.77), step 270; proxy = d rises throughout."""
    steps = np.arange(0, 400, 10)
    d = np.linspace(0, 4, 40)
    gold = gold_rl(d, 1.0, 0.5) + np.random.default_rng(seed).normal(0, noise, d.size)
    return steps, d, gold, d.copy()


def test_turnover_on_rise_then_fall():
    """Noiseless: the smoothed peak is the true peak, step 270. With noise sd 0.01 (the curve falls
    ~0.01 per eval after the peak) the detected step stays within 3 evals (30 steps) of it."""
    steps, _, gold, proxy = _rise_fall()
    assert find_turnover(steps, gold, proxy) == 270
    steps, _, gold, proxy = _rise_fall(noise=0.01, seed=3)
    t = find_turnover(steps, gold, proxy)
    assert t is not None and abs(t - 270) <= 30


def test_no_turnover_when_gold_monotone_or_proxy_falls():
    steps, d, gold, proxy = _rise_fall()
    assert find_turnover(steps, 2 * d - 0.1 * d**2, proxy) is None  # gold rises monotonically on [0, 4]
    assert find_turnover(steps, gold, -proxy) is None  # gold falls but so does proxy: not overoptimization
    assert find_turnover(steps[:5], gold[:5], proxy[:5]) is None  # fewer than window + 1 points
    with pytest.raises(ValueError, match="increasing"):
        find_turnover(steps[::-1], gold, proxy)


def test_overopt_summary_from_metrics_rows():
    """Rows out of order, interleaved with training lines lacking eval keys, and a duplicated step
    (the later value wins). The fit recovers alpha 1, beta 0.5 (KL peak e^2 = 7.389) because the
    first eval, at d = 0, has gold 0."""
    steps, d, gold, proxy = _rise_fall()
    rows = [{"step": int(s), "eval/gold": float(g), "eval/proxy": float(p), "eval/kl": float(x * x)}
            for s, g, p, x in zip(steps, gold, proxy, d)]  # fmt: skip
    rows = rows[::-1] + [{"step": int(s) + 5, "loss/policy": 0.1, "reward/mean": 1.0} for s in steps]
    rows.append({"step": 390, "eval/gold": 99.0})  # a line for step 390 that a later line replaces
    rows.append({"step": 390, "eval/gold": float(gold[-1]), "eval/proxy": 4.0, "eval/kl": 16.0})
    s = overopt_summary(rows)
    assert s["n_points"] == 40 and s["steps"] == steps.tolist()
    assert s["turnover_step"] == 270
    assert s["gold_peak"]["step"] == 270
    assert s["proxy_rises_gold_does_not"] is True
    assert s["fit_rl"]["alpha"] == pytest.approx(1.0, abs=1e-8) and s["fit_rl"]["beta"] == pytest.approx(
        0.5, abs=1e-8
    )
    assert s["fit_rl"]["kl_peak"] == pytest.approx(math.e**2, rel=1e-6)
    assert "exploiting the proxy" in s["message"] and "turned over at step 270" in s["message"]
    json.dumps(s, allow_nan=False)


def test_overopt_summary_healthy_and_empty():
    steps, d, _, proxy = _rise_fall()
    rows = [
        {"step": int(s), "eval/gold": float(g), "eval/proxy": float(p)}
        for s, g, p in zip(steps, 2 * d, proxy)
    ]
    s = overopt_summary(rows)
    assert s["turnover_step"] is None and s["proxy_rises_gold_does_not"] is False and s["fit_rl"] is None
    assert s["kl"] == [None] * 40
    assert "did not diverge" in s["message"]
    empty = overopt_summary([{"step": 1, "loss/policy": 0.3}])
    assert empty["n_points"] == 0 and "No eval/gold" in empty["message"]
    no_proxy = overopt_summary([{"step": 1, "eval/gold": 0.3}])
    assert no_proxy["turnover_step"] is None and "No eval/proxy" in no_proxy["message"]
