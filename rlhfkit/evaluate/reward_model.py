"""Reward-model evaluation on preference records: accuracy (overall, per task, per prompt category),
calibration of the Bradley–Terry probability (ECE), the score's correlation with reply length, and, for
simulated labels, accuracy against the hidden gold order. ``rlhfkit reward eval`` writes it to
``reward_eval.json``; ``rlhfkit reward train`` writes it for the held-out pairs at the end of training.
docs/reward.md, "Evaluation".
"""

from __future__ import annotations

import numpy as np

from rlhfkit.data.records import PreferenceRecord
from rlhfkit.models.heads import RewardModel


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

    prompts = [r.prompt for r in records]
    raw_c = rm.score(prompts, [r.chosen["content"] for r in records], batch_size=batch_size, normalized=False).numpy()
    raw_r = rm.score(prompts, [r.rejected["content"] for r in records], batch_size=batch_size, normalized=False).numpy()
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
    gold = [(r.metadata.get("gold_chosen"), r.metadata.get("gold_rejected")) for r in records]
    has_gold = np.array([a is not None and b is not None and a != b for a, b in gold])
    if has_gold.any():
        gold_c_wins = np.array([(a > b) if h else False for (a, b), h in zip(gold, has_gold)])
        out["gold_accuracy"] = float(((diff > 0) == gold_c_wins)[has_gold].mean())
        out["label_gold_agreement"] = float(gold_c_wins[has_gold & decided].mean()) if (has_gold & decided).any() else None
        out["gold_pairs"] = int(has_gold.sum())
    out["norm"] = rm.norm
    return out
