"""How far to trust the quality figures: sample sizes, confidence intervals, trends, thresholds.

- Project agreement (Fleiss' κ, Krippendorff's α): percentile bootstrap over pairs
  (:func:`rlhfkit.evaluate.stats.bootstrap_ci`), resampling whole rows of the ratings matrix, so
  the interval reflects which items happened to be labelled. A ranking's implied pairs are rows of
  their own; resampling them separately makes the interval somewhat too narrow for rankings.
- Per-annotator proportions (gold accuracy, agreement with the others): Wilson score interval
  (E. B. Wilson 1927, JASA 22:209), which stays inside [0, 1] and behaves at 0/n and n/n, where the
  normal approximation gives nonsense for the small counts a new annotator has.
- Gold accuracy over time: consecutive blocks of ``block`` gold answers, oldest first.
- An annotator is marked ``low`` when a figure is below its threshold with at least ``min_n``
  answers behind it; the interval shows how sure that is.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats

from rlhfkit.annotate import agreement as ag
from rlhfkit.evaluate.stats import bootstrap_ci

Z95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""


@dataclass(frozen=True)
class Thresholds:
    """Below these an annotator is highlighted on the dashboard (query parameters ``min_gold``,
    ``min_agree``; ``stats --min-gold --min-agree``)."""

    min_gold: float = 0.8
    """Gold (attention-check) accuracy; checks are meant to be easy, so 0.8 is lenient."""
    min_agree: float = 0.6
    """Agreement with the other annotators' plurality; 0.6 suits subjective preference data."""
    min_n: int = 5
    """Fewer answers than this say too little to mark anyone."""

    def __post_init__(self):
        for name in ("min_gold", "min_agree"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.min_n < 1:
            raise ValueError(f"min_n must be at least 1, got {self.min_n}")


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) for n = 0.

    centre = (k + z²/2) / (n + z²), half-width = z sqrt(k(n-k)/n + z²/4) / (n + z²).
    """
    if n == 0:
        return math.nan, math.nan
    denom = n + z * z
    centre = (k + z * z / 2) / denom
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_of(rate: float, n: int) -> tuple[float, float]:
    """:func:`wilson` from a proportion over n (the counts behind it are whole numbers)."""
    return wilson(round(rate * n), n) if n else (math.nan, math.nan)


def agreement_intervals(ratings: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """95% bootstrap intervals of Fleiss' κ and Krippendorff's α (ordinal) over the items of
    ``ratings`` (I, R), with ``n``: the items that enter the figure (two or more votes).

    Both figures are ratios of sums over items, so a resample only needs the sums of per-item terms
    over its items (``_item_terms``): vectorised over all resamples at once, ~1 s for 10,000 pairs
    instead of ~10 s calling ``agreement.fleiss_kappa`` / ``krippendorff_alpha`` per resample (their
    naive equivalents; ``tests/test_annotate_quality.py`` checks that the two agree)."""
    counts = ag.category_counts(ratings).astype(float)
    rows = np.flatnonzero(counts.sum(axis=1) >= 2)
    if len(rows) == 0:
        empty = {"value": None, "ci_low": None, "ci_high": None, "n": 0}
        return {"fleiss_kappa": dict(empty), "krippendorff_alpha_ordinal": dict(empty)}
    terms = _item_terms(counts[rows])
    out = {}
    for name, from_sums in (("fleiss_kappa", _fleiss_from_sums), ("krippendorff_alpha_ordinal", _alpha_from_sums)):
        def statistic(idx, axis=-1, from_sums=from_sums):
            idx = np.moveaxis(np.asarray(idx), axis, -1).astype(int)  # (..., I) item positions in `terms`
            flat = idx.reshape(-1, idx.shape[-1])
            # how often each item was drawn, per resample: (B, I) @ (I, T) sums every resample's terms
            drawn = np.stack([np.bincount(row, minlength=len(terms)) for row in flat]).astype(float)
            return from_sums(drawn @ terms).reshape(idx.shape[:-1])
        # With few pairs some resamples have one category only, where κ and α are undefined (NaN):
        # scipy then warns and the interval is NaN, which the dashboard shows as "too few pairs".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
            est = bootstrap_ci(np.arange(len(rows), dtype=float), statistic, n_boot=n_boot, seed=seed)
        out[name] = {**est.to_dict(), "n": int(len(rows))}
    return out


K = len(ag.CATEGORIES)
# Columns of _item_terms: 1 | P_i | n_ik (K) | n_i | w_u n_uc n_uk (K*K) | w_u n_uc (K)
_ONE, _P, _N_K, _N = 0, 1, slice(2, 2 + K), 2 + K
_OUTER, _DIAG = slice(3 + K, 3 + K + K * K), slice(3 + K + K * K, 3 + 2 * K + K * K)


def _item_terms(counts: np.ndarray) -> np.ndarray:
    """(I, T) per-item terms whose column sums determine both figures (items with 2+ votes), with
    w_u = 1 / (m_u - 1); see ``agreement.fleiss_kappa`` and ``agreement.krippendorff_alpha``."""
    n_i = counts.sum(axis=1)
    p_i = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    w = 1.0 / (n_i - 1)
    outer = (w[:, None, None] * counts[:, :, None] * counts[:, None, :]).reshape(len(counts), -1)
    return np.column_stack([np.ones(len(counts)), p_i, counts, n_i, outer, w[:, None] * counts])


def _fleiss_from_sums(t: np.ndarray) -> np.ndarray:
    """κ = (P_bar - P_e) / (1 - P_e) from summed terms (..., T)."""
    p_bar = t[..., _P] / t[..., _ONE]
    p_k = t[..., _N_K] / t[..., _N][..., None]
    p_e = (p_k**2).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isclose(p_e, 1.0), np.nan, (p_bar - p_e) / (1.0 - p_e))


def _alpha_from_sums(t: np.ndarray) -> np.ndarray:
    """Ordinal α = 1 - (n - 1) sum(o delta2) / sum(n_c n_k delta2) from summed terms (..., T)."""
    k = K
    o = t[..., _OUTER].reshape(*t.shape[:-1], k, k)
    o = o - np.eye(k) * t[..., _DIAG][..., None, :]
    n_c = o.sum(axis=-1)
    n = n_c.sum(axis=-1)
    cum = np.concatenate([np.zeros((*n_c.shape[:-1], 1)), np.cumsum(n_c, axis=-1)], axis=-1)
    d = np.zeros((*n_c.shape[:-1], k, k))
    for c in range(k):  # ordinal delta2, as agreement._delta2
        for g in range(c + 1, k):
            d[..., c, g] = d[..., g, c] = (cum[..., g + 1] - cum[..., c] - (n_c[..., c] + n_c[..., g]) / 2.0) ** 2
    expected = (n_c[..., :, None] * n_c[..., None, :] * d).sum(axis=(-2, -1))
    observed = (o * d).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected == 0.0, np.nan, 1.0 - (n - 1) * observed / expected)


def gold_trend(times: list, correct: list[bool], block: int = 10) -> list[dict]:
    """Accuracy in consecutive blocks of ``block`` gold answers (time order); the last block may be
    shorter and is kept when it holds at least ``block // 2`` answers."""
    order = np.argsort(np.array([t.timestamp() if hasattr(t, "timestamp") else t for t in times], dtype=float),
                       kind="stable")
    out = []
    for start in range(0, len(order), block):
        idx = order[start:start + block]
        if len(idx) < max(1, block // 2) and out:
            break
        k = int(sum(correct[i] for i in idx))
        out.append({"from": times[idx[0]], "to": times[idx[-1]], "n": len(idx), "accuracy": k / len(idx)})
    return out


def mark_low(annotator: dict, t: Thresholds) -> list[str]:
    """Which of an annotator's figures are below threshold (with enough answers behind them)."""
    low = []
    if annotator["gold_items"] >= t.min_n and annotator["gold_accuracy"] < t.min_gold:
        low.append("gold_accuracy")
    if annotator["consensus_items"] >= t.min_n and annotator["agreement_with_consensus"] < t.min_agree:
        low.append("agreement_with_consensus")
    return low
