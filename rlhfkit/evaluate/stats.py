"""Aggregate statistics with honest uncertainty, after rliable.

Source: Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the Statistical Precipice"
(NeurIPS), https://arxiv.org/abs/2108.13264. The paper's recommendations, as implemented here:

- report the interquartile mean (IQM) of all run x task scores, not the mean or the median;
- give every aggregate a stratified bootstrap confidence interval (resample runs within each task);
- compare two methods by the probability of improvement P(X > Y);
- show the whole score distribution as a performance profile with bootstrap bands.

Conventions: `scores` is a mapping task -> 1-D array of per-run scores (tasks may have different run
counts); a bare 1-D array is read as a single task. Intervals are percentile intervals at level
1 - alpha, as in rliable's default. All resampling takes an explicit `seed`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import scipy.stats

__all__ = [
    "Estimate",
    "iqm",
    "bootstrap_ci",
    "stratified_bootstrap_ci",
    "probability_of_improvement",
    "probability_of_improvement_ci",
    "performance_profile",
]

Scores = Mapping[str, npt.ArrayLike]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval [ci_low, ci_high] (NaN where undefined)."""

    value: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float | None]:
        """Plain dict for JSON; non-finite numbers become None so that `json.dumps` output is valid JSON."""
        return {k: (float(v) if math.isfinite(v) else None) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.value:.3g} [{self.ci_low:.3g}, {self.ci_high:.3g}]"


def iqm(x: npt.ArrayLike, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% of the scores.

    Same as rliable's `aggregate_iqm`, i.e. `scipy.stats.trim_mean(x, 0.25)`: int(0.25 n) values are
    cut from each end (so for n not divisible by 4 slightly more than half is kept). With `axis=None`
    all entries (all runs of all tasks) are pooled.
    """
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        raise ValueError("iqm of an empty array is undefined; pass at least one score")
    return scipy.stats.trim_mean(x, 0.25, axis=axis)


def _as_strata(scores: Scores | npt.ArrayLike) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping):
        scores = {"all": scores}
    strata = {}
    for task, s in scores.items():
        a = np.asarray(s, dtype=float).ravel()
        if a.size == 0:
            raise ValueError(f"task {task!r} has no scores; drop it or add runs")
        if not np.all(np.isfinite(a)):
            raise ValueError(
                f"task {task!r} has non-finite scores {a.tolist()}; remove the failed runs explicitly"
            )
        strata[str(task)] = a
    if not strata:
        raise ValueError("no tasks given")
    return strata


def _stratified_resample(strata: dict[str, np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, total_runs) matrix; in each row every task's runs are redrawn with replacement from that task."""
    blocks = []
    for a in strata.values():
        idx = rng.integers(0, a.size, size=(n_boot, a.size))  # (n_boot, n_runs_task)
        blocks.append(a[idx])
    return np.concatenate(blocks, axis=1)


def _apply_rows(statistic: Callable, m: np.ndarray) -> np.ndarray:
    """statistic applied to each row of m; uses the statistic's `axis` argument when it has one."""
    try:
        has_axis = "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # builtins/ufuncs without a signature
        has_axis = False
    if has_axis:
        return np.asarray(statistic(m, axis=-1), dtype=float)
    return np.array([statistic(row) for row in m], dtype=float)


def _percentile_interval(boot: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo, hi


def _check_level(n_boot: int, alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1); 0.05 gives a 95% interval")
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot} is too few for a percentile interval; use >= 1000 (default 2000)")


def stratified_bootstrap_ci(
    scores: Scores | npt.ArrayLike,
    statistic: Callable = iqm,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """`statistic` of all run x task scores pooled, with a stratified percentile bootstrap CI.

    Stratified (as in rliable): each bootstrap replicate redraws, with replacement,
    n_t runs from task t's own n_t runs, so every task keeps its weight; the statistic is applied to
    the pooled replicate. `statistic(x)` takes a 1-D array; if it accepts `axis`, it is called once on
    the (n_boot, total) matrix.
    """
    _check_level(n_boot, alpha)
    strata = _as_strata(scores)
    value = float(statistic(np.concatenate(list(strata.values()))))
    boot = _apply_rows(statistic, _stratified_resample(strata, n_boot, np.random.default_rng(seed)))
    lo, hi = _percentile_interval(boot, alpha)
    return Estimate(value, float(lo), float(hi))


def _rng_kwarg(seed: int) -> dict:
    # scipy >= 1.15 takes `rng`; older versions (pyproject allows 1.11) only `random_state`.
    if "rng" in inspect.signature(scipy.stats.bootstrap).parameters:
        return {"rng": np.random.default_rng(seed)}
    return {"random_state": np.random.default_rng(seed)}


def bootstrap_ci(
    x: npt.ArrayLike,
    statistic: Callable = np.mean,
    paired_with: npt.ArrayLike | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    method: str = "percentile",
) -> Estimate:
    """Bootstrap CI of `statistic(x)`, or of `statistic(x) - statistic(paired_with)` for paired data.

    With `paired_with`, x[i] and paired_with[i] belong to the same unit (e.g. the same prompt) and are
    resampled together, so the interval of the difference accounts for their correlation. This is
    `scipy.stats.bootstrap(..., paired=True)`; `method` is passed through ("percentile" as in
    rliable, or "BCa", "basic"). With fewer than two observations the interval is (NaN, NaN).
    """
    _check_level(n_boot, alpha)
    x = np.asarray(x, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci got no observations")
    if paired_with is None:
        data: tuple = (x,)
        value = float(statistic(x))

        def stat(a, axis=-1):
            return _apply_axis(statistic, a, axis)
    else:
        y = np.asarray(paired_with, dtype=float).ravel()
        if y.shape != x.shape:
            raise ValueError(
                f"paired_with has {y.size} values but x has {x.size}; pairs must align one to one"
            )
        data = (x, y)
        value = float(statistic(x) - statistic(y))

        def stat(a, b, axis=-1):
            return _apply_axis(statistic, a, axis) - _apply_axis(statistic, b, axis)

    if x.size < 2:
        return Estimate(value, math.nan, math.nan)
    res = scipy.stats.bootstrap(
        data,
        stat,
        n_resamples=n_boot,
        confidence_level=1 - alpha,
        method=method,
        paired=paired_with is not None,
        vectorized=True,
        **_rng_kwarg(seed),
    )
    return Estimate(value, float(res.confidence_interval.low), float(res.confidence_interval.high))


def _apply_axis(statistic: Callable, a: np.ndarray, axis: int) -> np.ndarray:
    a = np.moveaxis(a, axis, -1)
    if a.ndim == 1:
        return np.asarray(statistic(a), dtype=float)
    flat = a.reshape(-1, a.shape[-1])
    return _apply_rows(statistic, flat).reshape(a.shape[:-1])


def _poi_task(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + 0.5 P(X = Y) along the last axis: Mann-Whitney U of x over n_x n_y.

    scipy's statistic is U1 = #{(i, j): x_i > y_j} + 0.5 #{x_i = y_j}, i.e. exactly the count rliable
    divides by n_x n_y. "asymptotic" only affects the p-value, which is unused; it avoids the exact
    distribution's cost inside the bootstrap.
    """
    u = scipy.stats.mannwhitneyu(x, y, axis=-1, method="asymptotic").statistic
    return np.asarray(u, dtype=float) / (x.shape[-1] * y.shape[-1])


def _common_tasks(x: dict, y: dict) -> list[str]:
    if set(x) != set(y):
        raise ValueError(
            f"x and y must cover the same tasks; only in x: {sorted(set(x) - set(y))}, "
            f"only in y: {sorted(set(y) - set(x))}"
        )
    return sorted(x)


def probability_of_improvement(x: Scores | npt.ArrayLike, y: Scores | npt.ArrayLike) -> float:
    """P(X > Y): mean over tasks of U / (n_x n_y), ties counting half (as in rliable).

    For one task, the chance that a random run of X beats a random run of Y. 0.5 means no
    difference; rliable calls an improvement meaningful when the CI's lower end is above 0.5.
    """
    xs, ys = _as_strata(x), _as_strata(y)
    return float(np.mean([_poi_task(xs[t], ys[t]) for t in _common_tasks(xs, ys)]))


def probability_of_improvement_ci(
    x: Scores | npt.ArrayLike,
    y: Scores | npt.ArrayLike,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """`probability_of_improvement` with a stratified bootstrap CI.

    Each replicate redraws X's runs within each task and, independently, Y's runs within each task
    (the two methods' runs are independent samples), then averages the per-task U / (n_x n_y).
    """
    _check_level(n_boot, alpha)
    xs, ys = _as_strata(x), _as_strata(y)
    tasks = _common_tasks(xs, ys)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for t in tasks:
        bx = xs[t][rng.integers(0, xs[t].size, size=(n_boot, xs[t].size))]  # (n_boot, n_x)
        by = ys[t][rng.integers(0, ys[t].size, size=(n_boot, ys[t].size))]  # (n_boot, n_y)
        boot += _poi_task(bx, by)
    boot /= len(tasks)
    lo, hi = _percentile_interval(boot, alpha)
    return Estimate(probability_of_improvement(xs, ys), float(lo), float(hi))


def performance_profile(
    scores: Scores | npt.ArrayLike,
    taus: npt.ArrayLike,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score distribution: fraction of all run x task scores strictly above each tau, with bands.

    rliable's "run-score distribution": F(tau) = #{scores > tau} / #scores over the
    pooled runs of all tasks; the bands are pointwise stratified percentile bootstrap intervals.
    Returns (fractions, lo, hi), each shaped like `taus`.
    """
    _check_level(n_boot, alpha)
    strata = _as_strata(scores)
    taus = np.asarray(taus, dtype=float)
    flat_taus = taus.ravel()
    pooled = np.concatenate(list(strata.values()))
    frac = (pooled[:, None] > flat_taus[None, :]).mean(axis=0)  # (n_tau,)
    boot = _stratified_resample(strata, n_boot, np.random.default_rng(seed))  # (n_boot, total)
    # one tau at a time: a (n_boot, total, n_tau) comparison tensor can run to gigabytes
    boot_frac = np.stack([(boot > tau).mean(axis=1) for tau in flat_taus], axis=1)  # (n_boot, n_tau)
    lo, hi = _percentile_interval(boot_frac, alpha)
    return frac.reshape(taus.shape), lo.reshape(taus.shape), hi.reshape(taus.shape)
