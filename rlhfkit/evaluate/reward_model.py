"""Reward-model evaluation on preference records: accuracy (overall, per task, per prompt category),
calibration of the Bradley–Terry probability (ECE), the score's correlation with reply length, and,
where the replies have a gold reward (simulated labels, or a built-in task's gold), what matters for
RLHF: accuracy against the gold order, the label ceiling (the labels' own agreement with gold) and the
best-of-K gain (gold of the RM's pick among a prompt's K replies minus their mean, beside the
oracle's). Every accuracy has a 95% CI by a bootstrap over prompts (pairs of one prompt share replies,
so they are not independent); a CI wider than ±0.05 is reported as too uncertain to rank RMs by.
``rlhfkit reward eval`` writes it to ``reward_eval.json``; ``rlhfkit reward train`` writes it for the
held-out pairs at the end of training. docs/reward.md, "Evaluation".
"""

from __future__ import annotations

import json

import numpy as np

from rlhfkit.data.records import PreferenceRecord
from rlhfkit.data.tasks import TASKS, get_task
from rlhfkit.models.heads import RewardModel

UNCERTAIN_HALF_WIDTH = 0.05
"""A 95% CI half-width above this is 'too uncertain' (issue 18: ~55 held-out pairs give ~±0.13)."""


def cluster_bootstrap_ci(values: np.ndarray, groups: list, n_boot: int = 2000, seed: int = 0,
                         alpha: float = 0.05) -> dict:
    """Mean of ``values`` with a percentile bootstrap CI that resamples whole groups (prompts) with
    replacement: the ratio estimator Σ_g S_g / Σ_g N_g over the drawn groups (S_g the sum, N_g the count
    of group g's values). With one value per group it is the ordinary bootstrap of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0, "groups": 0}
    keys, inv = np.unique(np.array([str(g) for g in groups]), return_inverse=True)
    sums, counts = np.bincount(inv, weights=values), np.bincount(inv).astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))  # (n_boot, G)
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"value": float(values.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(len(values)),
            "groups": int(len(keys))}


def too_uncertain(ci: dict) -> bool:
    """True when the CI's half-width exceeds UNCERTAIN_HALF_WIDTH (or there is no CI)."""
    return ci.get("ci_low") is None or (ci["ci_high"] - ci["ci_low"]) / 2 > UNCERTAIN_HALF_WIDTH


def best_of_k(keys: list[str], gold: np.ndarray, score: np.ndarray, seed: int = 0) -> dict | None:
    """Best-of-K with the RM on each prompt's distinct replies: gain = gold of the top-scored reply minus
    the mean gold of the K, averaged over prompts with the most common K (>= 2); ``oracle_gain`` picks by
    gold itself (the most any RM could gain). Bootstrap CIs over prompts."""
    by_prompt: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        by_prompt.setdefault(k, []).append(i)
    sizes = [len(v) for v in by_prompt.values() if len(v) >= 2]
    if not sizes:
        return None
    K = max(set(sizes), key=lambda n: (sizes.count(n), n))
    gains, oracle = [], []
    for idx in by_prompt.values():
        if len(idx) == K:
            g, s = gold[idx], score[idx]
            gains.append(g[int(np.argmax(s))] - g.mean())
            oracle.append(g.max() - g.mean())
    ids = list(range(len(gains)))
    return {"k": K, "prompts": len(gains), "gain": cluster_bootstrap_ci(np.array(gains), ids, seed=seed),
            "oracle_gain": cluster_bootstrap_ci(np.array(oracle), ids, seed=seed)}


def expected_calibration_error(p_chosen: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of the Bradley–Terry probability that the labelled-chosen reply wins, p = σ(r_c - r_r).

    Each pair's confidence is max(p, 1 - p) and it is correct when p > ½; ECE = Σ_b (n_b / N)
    |accuracy_b - confidence_b| over ``bins`` equal-width confidence bins on [½, 1] (Guo et al. 2017, eq. 3).
    """
    conf = np.maximum(p_chosen, 1 - p_chosen)
    correct = (p_chosen > 0.5).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = idx == b
        if not sel.any():
            continue
        acc_b, conf_b = correct[sel].mean(), conf[sel].mean()
        ece += sel.mean() * abs(acc_b - conf_b)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                      "accuracy": float(acc_b), "confidence": float(conf_b)})
    return float(ece), table


def reward_model_report(rm: RewardModel, records: list[PreferenceRecord], batch_size: int = 16) -> dict:
    """Accuracy (overall, per task, per prompt category), ECE of the BT probability, the correlation
    of the score with reply length, and — for simulated labels — accuracy against the gold order."""
    from scipy import stats  # ~1 s to import: only when a report is made

    # every distinct (prompt, reply) scored once: K replies of a prompt make C(K, 2) pairs
    replies = {(json.dumps(r.prompt, sort_keys=True), side["content"]): r.prompt
               for r in records for side in (r.chosen, r.rejected)}
    raw = rm.score(list(replies.values()), [c for _, c in replies], batch_size=batch_size, normalized=False).numpy()
    at = {key: i for i, key in enumerate(replies)}
    raw_c = np.array([raw[at[(json.dumps(r.prompt, sort_keys=True), r.chosen["content"])]] for r in records])
    raw_r = np.array([raw[at[(json.dumps(r.prompt, sort_keys=True), r.rejected["content"])]] for r in records])
    diff = raw_c - raw_r
    decided = np.array([not r.tie for r in records])
    correct = diff > 0
    out: dict = {"pairs": len(records), "ties": int((~decided).sum()), "decided": int(decided.sum()),
                 "accuracy": float(correct[decided].mean()) if decided.any() else None}
    for key in ("task", "category"):
        groups: dict = {}
        for i, r in enumerate(records):
            if decided[i]:
                groups.setdefault(str(r.metadata.get(key)), []).append(bool(correct[i]))
        if any(g != "None" for g in groups):
            out[f"by_{key}"] = {g: {"n": len(v), "accuracy": float(np.mean(v))} for g, v in sorted(groups.items())}
    if decided.any():
        out["ece"], out["calibration"] = expected_calibration_error(1 / (1 + np.exp(-diff[decided])))
    if (~decided).any():
        out["tie_mean_abs_diff"] = float(np.abs(diff[~decided]).mean())
    # length: every reply once, score (normalised when available) against its token count
    norm = rm.norm or (0.0, 1.0)
    scores = np.concatenate([raw_c, raw_r])
    lengths = np.array([len(rm.tok(r.chosen["content"], add_special_tokens=False)["input_ids"]) for r in records]
                       + [len(rm.tok(r.rejected["content"], add_special_tokens=False)["input_ids"]) for r in records])
    if len(set(lengths.tolist())) > 1 and np.ptp(scores) > 0:
        out["length_pearson"] = float(stats.pearsonr(scores, lengths)[0])
        out["length_spearman"] = float(stats.spearmanr(scores, lengths)[0])
    n = len(records)
    diff_len = lengths[:n] - lengths[n:]
    sel = decided & (diff_len != 0)
    if sel.any():
        out["rm_prefers_longer"] = float(((diff > 0) == (diff_len > 0))[sel].mean())
        out["labels_prefer_longer"] = float((diff_len > 0)[sel].mean())
    out["score_mean"] = float(((scores - norm[0]) / norm[1]).mean())
    out["score_std"] = float(((scores - norm[0]) / norm[1]).std())
    out["norm"] = rm.norm
    out.update(gold_report(records, diff, raw_c, raw_r, decided, correct))
    return out


def record_gold(records: list[PreferenceRecord]) -> list[tuple[float | None, float | None]]:
    """(gold of chosen, gold of rejected) per record: the labeler's ``gold_chosen``/``gold_rejected``
    metadata, else the built-in task's gold reward when the record names one (metadata ``task``)."""
    out = []
    for r in records:
        a, b = r.metadata.get("gold_chosen"), r.metadata.get("gold_rejected")
        task = r.metadata.get("task")
        if (a is None or b is None) and task in TASKS:
            a, b = get_task(task).gold([r.prompt, r.prompt], [r.chosen["content"], r.rejected["content"]])
        out.append((a, b))
    return out


def gold_report(records: list[PreferenceRecord], diff: np.ndarray, raw_c: np.ndarray, raw_r: np.ndarray,
                decided: np.ndarray, correct: np.ndarray) -> dict:
    """Accuracy vs labels with its CI and, with gold: accuracy vs gold, the label ceiling (labels vs
    gold), best-of-K, each with a 95% prompt-clustered CI, and ``notes`` naming what is too uncertain."""
    keys = [json.dumps(r.prompt, sort_keys=True) for r in records]
    out: dict = {"accuracy_ci": cluster_bootstrap_ci(correct[decided].astype(float), [k for k, d in zip(keys, decided) if d])}
    notes = []
    gold = record_gold(records)
    has_gold = np.array([a is not None and b is not None and a != b for a, b in gold])
    if has_gold.any():
        gold_c_wins = np.array([(a > b) if h else False for (a, b), h in zip(gold, has_gold)])
        sel = list(np.flatnonzero(has_gold))
        out["gold_accuracy"] = float(((diff > 0) == gold_c_wins)[has_gold].mean())
        out["gold_accuracy_ci"] = cluster_bootstrap_ci(((diff > 0) == gold_c_wins)[sel].astype(float), [keys[i] for i in sel])
        both = list(np.flatnonzero(has_gold & decided))
        out["label_gold_agreement"] = float(gold_c_wins[both].mean()) if both else None
        out["label_gold_agreement_ci"] = cluster_bootstrap_ci(gold_c_wins[both].astype(float), [keys[i] for i in both])
        out["gold_pairs"] = int(has_gold.sum())
        # every distinct reply once, with its gold and its score
        replies: dict[tuple[str, str], tuple[float, float]] = {}
        for i, (r, (a, b)) in enumerate(zip(records, gold)):
            if a is not None and b is not None:
                replies[(keys[i], r.chosen["content"])] = (float(a), float(raw_c[i]))
                replies[(keys[i], r.rejected["content"])] = (float(b), float(raw_r[i]))
        bok = best_of_k([k for k, _ in replies], np.array([g for g, _ in replies.values()]),
                        np.array([s for _, s in replies.values()]))
        if bok is not None:
            out["best_of_k"] = bok
    for name in ("accuracy_ci", "gold_accuracy_ci"):
        if name in out and too_uncertain(out[name]):
            ci = out[name]
            interval = "no CI" if ci.get("ci_low") is None else f"95% CI [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
            notes.append(f"{name.removesuffix('_ci')} is too uncertain: {interval} on {ci.get('n')} pairs of "
                         f"{ci.get('groups')} prompts (a CI needs >= 2 prompts and must be within ±{UNCERTAIN_HALF_WIDTH}); "
                         "evaluate on more held-out prompts")
    out["too_uncertain"] = [n.removesuffix("_ci") for n in ("accuracy_ci", "gold_accuracy_ci")
                            if n in out and too_uncertain(out[n])]
    out["notes"] = notes
    return out


def format_summary(report: dict) -> str:
    """The report's RLHF-relevant lines: accuracy vs labels and vs gold with CIs, the ceiling, best-of-K
    and what is too uncertain."""
    def ci(c: dict | None, fmt: str = ".3f") -> str:
        if not c or c.get("value") is None:
            return "n/a"
        return f"{c['value']:{fmt}} [{c['ci_low']:{fmt}}, {c['ci_high']:{fmt}}]"

    lines = [f"accuracy vs labels: {ci(report.get('accuracy_ci'))} on {report.get('decided')} pairs"]
    if "gold_accuracy_ci" in report:
        lines.append(f"accuracy vs gold:   {ci(report['gold_accuracy_ci'])} (ceiling, labels vs gold: "
                     f"{ci(report.get('label_gold_agreement_ci'))})")
    bok = report.get("best_of_k")
    if bok:
        lines.append(f"best-of-{bok['k']} gold gain: {ci(bok['gain'], '+.3f')} (oracle {ci(bok['oracle_gain'], '+.3f')}) "
                     f"on {bok['prompts']} prompts")
    return "\n".join(lines + [f"note: {n}" for n in report.get("notes", [])])
