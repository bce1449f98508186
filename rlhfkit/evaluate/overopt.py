"""Reward-model overoptimization: Gao et al. 2022 functional forms and a turnover detector.

Source: Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization",
https://arxiv.org/abs/2210.10760. With d = sqrt(KL(pi || pi_init)) in sqrt-nats and R the gold reward
measured relative to the initial policy (the paper sets R(0) := 0), the paper finds

    best-of-n:  R_bon(d) = d (alpha_bon - beta_bon * d)
    RL:         R_RL(d)  = d (alpha_RL  - beta_RL  * log d)

Both are linear in (alpha, beta), so the least-squares fit is an exact linear solve (no initial
guess, no local minima); `scipy.optimize.curve_fit` would reach the same optimum iteratively.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

__all__ = [
    "gold_rl",
    "gold_bon",
    "fit_rl",
    "fit_bon",
    "rl_peak_d",
    "bon_peak_d",
    "bon_kl",
    "smooth",
    "find_turnover",
    "overopt_summary",
]


def _d_log_d(d: np.ndarray) -> np.ndarray:
    # d log d -> 0 as d -> 0; evaluating log(0) would give 0 * -inf = nan.
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * np.log(safe), 0.0)


def gold_rl(d: npt.ArrayLike, alpha: float, beta: float) -> np.ndarray:
    """Gao et al.'s RL form: R_RL(d) = d (alpha - beta log d), with R_RL(0) = 0."""
    d = np.asarray(d, dtype=float)
    return alpha * d - beta * _d_log_d(d)


def gold_bon(d: npt.ArrayLike, alpha: float, beta: float) -> np.ndarray:
    """Gao et al.'s best-of-n form: R_bon(d) = d (alpha - beta d)."""
    d = np.asarray(d, dtype=float)
    return d * (alpha - beta * d)


def _check_fit_input(d: npt.ArrayLike, gold: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    d, g = np.asarray(d, dtype=float).ravel(), np.asarray(gold, dtype=float).ravel()
    if d.shape != g.shape:
        raise ValueError(f"d has {d.size} points but gold has {g.size}")
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(g))):
        raise ValueError("d and gold must be finite; drop the steps without an eval")
    if np.any(d < 0):
        raise ValueError("d = sqrt(KL) must be >= 0; clamp small negative KL estimates to 0 before the sqrt")
    if np.unique(d[d > 0]).size < 2:
        raise ValueError("need at least two distinct d > 0 to fit two parameters")
    return d, g


def fit_rl(d: npt.ArrayLike, gold: npt.ArrayLike) -> tuple[float, float]:
    """Least-squares (alpha, beta) of R = d (alpha - beta log d) (Gao et al.'s RL form).

    `gold` must be relative to the initial policy (gold(pi) - gold(pi_init)); the form has no intercept.
    """
    d, g = _check_fit_input(d, gold)
    A = np.stack([d, -_d_log_d(d)], axis=1)  # (N, 2): R = A @ [alpha, beta]
    (alpha, beta), *_ = np.linalg.lstsq(A, g, rcond=None)
    return float(alpha), float(beta)


def fit_bon(d: npt.ArrayLike, gold: npt.ArrayLike) -> tuple[float, float]:
    """Least-squares (alpha, beta) of R = d (alpha - beta d) (best-of-n form); gold relative to pi_init."""
    d, g = _check_fit_input(d, gold)
    A = np.stack([d, -(d**2)], axis=1)  # (N, 2)
    (alpha, beta), *_ = np.linalg.lstsq(A, g, rcond=None)
    return float(alpha), float(beta)


def rl_peak_d(alpha: float, beta: float) -> float | None:
    """argmax_d of R_RL: dR/dd = alpha - beta (log d + 1) = 0 -> d* = exp(alpha / beta - 1); None if beta <= 0."""
    return math.exp(alpha / beta - 1) if beta > 0 else None


def bon_peak_d(alpha: float, beta: float) -> float | None:
    """argmax_d of R_bon: d* = alpha / (2 beta); None if beta <= 0 (no peak)."""
    return alpha / (2 * beta) if beta > 0 else None


def bon_kl(n: int | npt.ArrayLike) -> float | np.ndarray:
    """Analytic best-of-n KL, log n - (n - 1) / n nats (as used by Stiennon et al. 2020 and Gao et al. 2022).

    An upper bound on the true KL of best-of-n sampling (Beirami et al. 2024), not the KL itself.
    bon_kl(1) = 0; bon_kl(4) = log 4 - 3/4 = 0.6363.
    """
    n_arr = np.asarray(n, dtype=float)
    if np.any(n_arr < 1):
        raise ValueError(f"n must be >= 1; got {n}")
    out = np.log(n_arr) - (n_arr - 1) / n_arr
    return float(out) if out.ndim == 0 else out


def smooth(x: npt.ArrayLike, window: int) -> np.ndarray:
    """Centred moving average of width `window`; near the ends it averages the points that exist."""
    x = np.asarray(x, dtype=float)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    k = np.ones(window)
    # mode="same" with an even window centres on the right-hand middle element; fine for smoothing.
    return np.convolve(x, k, mode="same") / np.convolve(np.ones_like(x), k, mode="same")


def find_turnover(
    steps: npt.ArrayLike,
    gold: npt.ArrayLike,
    proxy: npt.ArrayLike,
    window: int = 5,
    min_drop: float = 0.0,
) -> int | float | None:
    """First step after which smoothed gold falls for a sustained stretch while proxy keeps rising.

    Both curves are smoothed with a centred moving average of `window` eval points. Point i is the
    turnover if the next `window` smoothed gold values all lie below gold_s[i], the last of them by
    more than `min_drop`, and smoothed proxy ended that stretch higher than it started. Returns the
    step of point i (the smoothed gold peak before the fall), or None if there is no such point,
    including when there are fewer than window + 1 points.
    """
    s = np.asarray(steps)
    g, p = np.asarray(gold, dtype=float).ravel(), np.asarray(proxy, dtype=float).ravel()
    if not (s.size == g.size == p.size):
        raise ValueError(f"steps, gold, proxy must align; got sizes {s.size}, {g.size}, {p.size}")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(p))):
        raise ValueError("gold and proxy must be finite; keep only steps where both were evaluated")
    if np.any(np.diff(s.astype(float)) <= 0):
        raise ValueError("steps must be strictly increasing")
    n = s.size
    if n < window + 1:
        return None
    gs, ps = smooth(g, window), smooth(p, window)
    for i in range(n - window):
        after = gs[i + 1 : i + 1 + window]
        if np.all(after < gs[i]) and gs[i] - after[-1] > min_drop and ps[i + window] > ps[i]:
            return s[i].item()
    return None


def _column(rows: list[Mapping], key: str) -> np.ndarray:
    out = []
    for r in rows:
        v = r.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return np.array(out, dtype=float)


def _nan_to_none(a: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in a]


def overopt_summary(metrics_rows: Iterable[Mapping], window: int = 5) -> dict:
    """Gold vs proxy vs sqrt(KL) over training, read from metrics.jsonl rows.

    Uses rows that logged `eval/gold`; `eval/proxy` and `eval/kl` where present. Returns a JSON-safe
    dict (missing numbers are None):

    - n_points, steps, gold, proxy, kl, sqrt_kl: the eval series, sorted by step;
    - gold_first, gold_final, gold_peak {step, gold}, proxy_first, proxy_final;
    - turnover_step: `find_turnover` on the rows having both gold and proxy (None if not found);
    - proxy_rises_gold_does_not: smoothed gold set no new high in the last `window` evals while
      smoothed proxy rose above its value at the gold peak;
    - fit_rl {alpha, beta, rmse, kl_peak, baseline_step} or None: Gao's RL form fitted to
      gold - gold(first eval) against d = sqrt(max(KL, 0)) (KL estimates can dip below 0 by noise;
      they are clamped only for the square root). Needs >= 3 evals with KL; assumes the first eval
      is the initial policy (log an eval at step 0);
    - message: one plain sentence for the report.
    """
    by_step: dict = {}
    for r in metrics_rows:
        g = r.get("eval/gold")
        if isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g):
            if "step" not in r:
                raise ValueError(f"metrics row without a 'step' key: {dict(r)}")
            by_step[r["step"]] = r  # a resumed run may log a step twice; the later line wins
    rows = [by_step[k] for k in sorted(by_step)]
    out: dict = {
        "n_points": len(rows),
        "steps": [],
        "gold": [],
        "proxy": [],
        "kl": [],
        "sqrt_kl": [],
        "gold_first": None,
        "gold_final": None,
        "gold_peak": None,
        "proxy_first": None,
        "proxy_final": None,
        "turnover_step": None,
        "proxy_rises_gold_does_not": False,
        "fit_rl": None,
    }
    if not rows:
        out["message"] = "No eval/gold values were logged, so overoptimization cannot be assessed."
        return out
    steps = np.array([r["step"] for r in rows])
    gold, proxy, kl = _column(rows, "eval/gold"), _column(rows, "eval/proxy"), _column(rows, "eval/kl")
    sqrt_kl = np.sqrt(np.clip(kl, 0.0, None))
    peak = int(np.argmax(gold))
    out.update(
        steps=steps.tolist(),
        gold=gold.tolist(),
        proxy=_nan_to_none(proxy),
        kl=_nan_to_none(kl),
        sqrt_kl=_nan_to_none(sqrt_kl),
        gold_first=float(gold[0]),
        gold_final=float(gold[-1]),
        gold_peak={"step": steps[peak].item(), "gold": float(gold[peak])},
    )

    has_kl = np.isfinite(kl)
    if has_kl.sum() >= 3 and np.unique(sqrt_kl[has_kl & (sqrt_kl > 0)]).size >= 2:
        d, r = sqrt_kl[has_kl], gold[has_kl] - gold[0]
        alpha, beta = fit_rl(d, r)
        d_star = rl_peak_d(alpha, beta)
        out["fit_rl"] = {
            "alpha": alpha,
            "beta": beta,
            "rmse": float(np.sqrt(np.mean((gold_rl(d, alpha, beta) - r) ** 2))),
            # exp(alpha/beta - 1)^2 overflows for tiny beta; such a peak is "never" anyway
            "kl_peak": d_star**2 if d_star is not None and d_star < 1e150 else None,
            "baseline_step": steps[0].item(),
        }

    both = np.isfinite(proxy)
    if both.sum() == 0:
        out["message"] = "No eval/proxy values were logged, so gold cannot be compared with the proxy reward."
        return out
    s2, g2, p2 = steps[both], gold[both], proxy[both]
    out["proxy_first"], out["proxy_final"] = float(p2[0]), float(p2[-1])
    out["turnover_step"] = find_turnover(s2, g2, p2, window=window)
    msg = "Gold and proxy reward did not diverge: gold kept pace with the proxy."
    if s2.size >= window + 1:
        gs, ps = smooth(g2, window), smooth(p2, window)
        k = int(np.argmax(gs))
        if k <= s2.size - 1 - window and ps[-1] > ps[k]:
            out["proxy_rises_gold_does_not"] = True
            msg = (
                f"Proxy reward kept rising after step {s2[k].item()} (smoothed {ps[k]:.3g} -> {ps[-1]:.3g}) "
                f"while gold reward did not (smoothed peak {gs[k]:.3g}, final {gs[-1]:.3g}): "
                "the policy is likely exploiting the proxy reward model."
            )
    else:
        msg = f"Only {s2.size} evals with both gold and proxy; at least {window + 1} are needed to judge a trend."
    if out["turnover_step"] is not None:
        msg += f" Gold turned over at step {out['turnover_step']} (sustained fall while proxy rose)."
    out["message"] = msg
    return out
