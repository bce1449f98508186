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
    ``ratings`` (I, R), with ``n``: the items that enter the figure (two or more votes)."""
    counts = ag.category_counts(ratings)
    rows = np.flatnonzero(counts.sum(axis=1) >= 2)
    out = {}
    for name, fn in (("fleiss_kappa", lambda idx: ag.fleiss_kappa(counts[idx])),
                     ("krippendorff_alpha_ordinal", lambda idx: ag.krippendorff_alpha(ratings[idx], "ordinal"))):
        if len(rows) == 0:
            out[name] = {"value": None, "ci_low": None, "ci_high": None, "n": 0}
            continue
        # Indices travel as floats through the bootstrap (it resamples a float array). With few
        # pairs some resamples have one category only, where κ and α are undefined (NaN): scipy
        # then warns and the interval is NaN, which the dashboard shows as "too few pairs".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
            est = bootstrap_ci(rows.astype(float), lambda x, fn=fn: fn(x.astype(int)), n_boot=n_boot, seed=seed)
        out[name] = {**est.to_dict(), "n": int(len(rows))}
    return out


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
