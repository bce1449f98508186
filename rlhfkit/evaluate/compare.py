"""Compare two groups of runs (e.g. method A vs method B over seeds) the rliable way.

Each run contributes one score, its final value of a metric; runs are stratified by the `task` key
of their config.yaml (runs without one share the stratum "default"). Reported per group: IQM with a
stratified bootstrap CI and the plain mean; between groups: P(A > B) with its CI. Runs are read by
``rlhfkit.tracking`` strictly: a malformed file is an error that names it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rlhfkit.evaluate.stats import iqm, probability_of_improvement_ci, stratified_bootstrap_ci
from rlhfkit.tracking import read_config, read_eval, read_metrics

__all__ = ["final_value", "compare_runs", "format_compare"]

DEFAULT_TASK = "default"
# eval.json fallbacks: metric -> path into the evaluate_pairs dict
_EVAL_JSON_KEYS = {"eval/gold": ("gold", "policy", "value"), "eval/proxy": ("proxy", "policy", "value")}


def final_value(run_dir: Path, metric: str) -> float:
    """Last finite value of `metric` in metrics.jsonl, else the policy mean in eval.json (gold/proxy only)."""
    last = None
    for row in read_metrics(run_dir):
        v = row.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            last = float(v)
    if last is not None:
        return last
    node = read_eval(run_dir) if metric in _EVAL_JSON_KEYS else None
    if node is not None:
        for k in _EVAL_JSON_KEYS[metric]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            return float(node)
    raise ValueError(
        f"run {run_dir} has no finite {metric!r} in metrics.jsonl"
        + (" nor a policy mean in eval.json" if metric in _EVAL_JSON_KEYS else "")
        + "; evaluate it or drop it from the comparison"
    )


def _task(run_dir: Path) -> str:
    try:
        cfg = read_config(run_dir)
    except ValueError as e:
        raise ValueError(f"{e}, so its task (stratum) is unknown") from None
    return str(cfg.get("task", DEFAULT_TASK))


def _group(runs: list[Path], metric: str) -> dict[str, np.ndarray]:
    if not runs:
        raise ValueError("each group needs at least one run directory")
    by_task: dict[str, list[float]] = {}
    for r in runs:
        by_task.setdefault(_task(r), []).append(final_value(r, metric))
    return {t: np.array(v) for t, v in sorted(by_task.items())}


def compare_runs(
    runs_a: list[Path],
    runs_b: list[Path],
    metric: str = "eval/gold",
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Compare groups A and B on the final value of `metric`. Both groups must cover the same tasks.

    Returns {"metric", "alpha", "tasks", "a": group, "b": group, "p_a_better": Estimate dict}, where a
    group is {"n_runs", "scores": {task: [final values]}, "iqm": Estimate dict, "mean": float}.
    """
    a, b = _group(runs_a, metric), _group(runs_b, metric)
    if set(a) != set(b):
        raise ValueError(
            f"groups cover different tasks (A: {sorted(a)}, B: {sorted(b)}); "
            "aggregates over different task sets are not comparable"
        )

    def group(s: dict[str, np.ndarray]) -> dict:
        pooled = np.concatenate(list(s.values()))
        return {
            "n_runs": int(pooled.size),
            "scores": {t: v.tolist() for t, v in s.items()},
            "iqm": stratified_bootstrap_ci(s, iqm, n_boot=n_boot, alpha=alpha, seed=seed).to_dict(),
            "mean": float(pooled.mean()),
        }

    return {
        "metric": metric,
        "alpha": alpha,
        "tasks": sorted(a),
        "a": group(a),
        "b": group(b),
        "p_a_better": probability_of_improvement_ci(a, b, n_boot=n_boot, alpha=alpha, seed=seed).to_dict(),
    }


def format_compare(d: dict) -> str:
    """Console summary of a `compare_runs` result."""

    def f(v):
        return "nan" if v is None else f"{v:.4g}"

    level = f"{100 * (1 - d['alpha']):.0f}%"
    lines = [f"metric {d['metric']}  tasks: {', '.join(d['tasks'])}  ({level} stratified bootstrap CIs)"]
    for name in ("a", "b"):
        g = d[name]
        e = g["iqm"]
        lines.append(
            f"  {name.upper()}: n={g['n_runs']:<3d} IQM {f(e['value'])} [{f(e['ci_low'])}, {f(e['ci_high'])}]"
            f"  mean {f(g['mean'])}"
        )
    p = d["p_a_better"]
    lines.append(f"  P(A > B) = {f(p['value'])} [{f(p['ci_low'])}, {f(p['ci_high'])}]")
    if p["ci_low"] is not None and p["ci_low"] > 0.5:
        lines.append("  A is better: the whole interval lies above 0.5.")
    elif p["ci_high"] is not None and p["ci_high"] < 0.5:
        lines.append("  B is better: the whole interval lies below 0.5.")
    else:
        lines.append("  No clear difference: the interval contains 0.5.")
    return "\n".join(lines)
