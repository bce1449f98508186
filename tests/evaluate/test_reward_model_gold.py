"""What the RM evaluation reports for RLHF (rlhfkit.evaluate.reward_model): the prompt-clustered
bootstrap CI and best-of-K worked by hand, accuracy vs gold and the label ceiling on records with gold,
gold from a built-in task when the records carry none, 'too uncertain' on few pairs, the summary."""

from __future__ import annotations

import numpy as np
import pytest

from rlhfkit.data.records import PreferenceRecord
from rlhfkit.data.tasks import get_task
from rlhfkit.evaluate.reward_model import (
    best_of_k,
    cluster_bootstrap_ci,
    format_summary,
    record_gold,
    reward_model_report,
    too_uncertain,
)
from rlhfkit.models.heads import RewardModel


def test_cluster_bootstrap_by_hand():
    """Two prompts, 10 pairs each, all right on one and all wrong on the other: the mean is ½ and a
    resample of 2 prompts gives 0, ½ or 1 with probabilities ¼, ½, ¼, so the 95% interval is [0, 1]
    (a pair-level bootstrap of 20 pairs would claim about ±0.22). Equal values: a zero-width CI."""
    values, groups = np.array([1.0] * 10 + [0.0] * 10), ["a"] * 10 + ["b"] * 10
    ci = cluster_bootstrap_ci(values, groups, n_boot=4000)
    assert ci["value"] == 0.5 and ci["ci_low"] == 0.0 and ci["ci_high"] == 1.0 and ci["groups"] == 2
    assert too_uncertain(ci)
    flat = cluster_bootstrap_ci(np.ones(50), list(range(50)))
    assert flat["ci_low"] == flat["ci_high"] == 1.0 and not too_uncertain(flat)


def test_best_of_k_by_hand():
    """Prompt p: gold (0, 1, 2), the RM's top pick is the 2nd → gain 1 - 1 = 0, oracle 2 - 1 = 1.
    Prompt q: gold (0.3, 0.1, 0.2), pick the 1st → gain 0.3 - 0.2 = 0.1, oracle 0.1. Prompt r has 2
    replies (not the common K = 3) and is left out. Means: gain 0.05, oracle 0.55."""
    keys = ["p"] * 3 + ["q"] * 3 + ["r"] * 2
    gold = np.array([0, 1, 2, 0.3, 0.1, 0.2, 5, -5])
    score = np.array([0, 9, 1, 7, 0, 0, 0, 1])
    out = best_of_k(keys, gold, score)
    assert out["k"] == 3 and out["prompts"] == 2
    assert out["gain"]["value"] == pytest.approx(0.05) and out["oracle_gain"]["value"] == pytest.approx(0.55)
    assert best_of_k(["a", "b"], np.array([1.0, 2.0]), np.array([0.0, 0.0])) is None  # no prompt with 2 replies


def records_k3(n_prompts: int = 4, flip_every: int = 3) -> list[PreferenceRecord]:
    """K = 3 replies per prompt, all 3 pairs, gold = reply length / 10; every ``flip_every``-th label
    flipped against gold."""
    out, n = [], 0
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"Say something about topic {i}."}]
        replies = [("Yes." if i % 2 else "No."), f"A longer reply about {i}.", f"The longest reply of all about topic {i}."]
        for a in range(3):
            for b in range(a + 1, 3):
                ga, gb = len(replies[a]) / 10, len(replies[b]) / 10
                win, lose = (b, a) if gb > ga else (a, b)
                if n % flip_every == 0:
                    win, lose = lose, win
                n += 1
                out.append(PreferenceRecord(
                    prompt=prompt, chosen={"role": "assistant", "content": replies[win]},
                    rejected={"role": "assistant", "content": replies[lose]},
                    metadata={"gold_chosen": len(replies[win]) / 10, "gold_rejected": len(replies[lose]) / 10}))
    return out


def test_report_gold_ceiling_best_of_k_and_uncertainty():
    rm = RewardModel.init_from("tiny", seed=1, pooling="mean", layers="1-2")
    recs = records_k3()
    rep = reward_model_report(rm, recs)
    sc = (rm.score([r.prompt for r in recs], [r.chosen["content"] for r in recs], normalized=False)
          - rm.score([r.prompt for r in recs], [r.rejected["content"] for r in recs], normalized=False)).numpy()
    gold_c = np.array([r.metadata["gold_chosen"] > r.metadata["gold_rejected"] for r in recs])
    assert rep["gold_accuracy"] == pytest.approx(np.mean((sc > 0) == gold_c))
    assert rep["gold_accuracy_ci"]["value"] == pytest.approx(rep["gold_accuracy"])
    assert rep["label_gold_agreement"] == pytest.approx(8 / 12)  # pairs 0, 3, 6, 9 flipped
    assert rep["accuracy_ci"]["groups"] == 4 and rep["accuracy_ci"]["n"] == 12
    bok = rep["best_of_k"]
    assert bok["k"] == 3 and bok["prompts"] == 4
    # the oracle picks the longest reply: gold minus the mean of the three, by hand
    want = np.mean([max(g) - np.mean(g) for g in ([len(x) / 10 for x in (("Yes." if i % 2 else "No."),
                   f"A longer reply about {i}.", f"The longest reply of all about topic {i}.")] for i in range(4))])
    assert bok["oracle_gain"]["value"] == pytest.approx(want)
    assert bok["gain"]["value"] <= bok["oracle_gain"]["value"] + 1e-12
    assert rep["too_uncertain"] == ["accuracy", "gold_accuracy"]  # 12 pairs: far wider than ±0.05
    assert any("gold_accuracy is too uncertain" in n for n in rep["notes"])
    text = format_summary(rep)
    assert "accuracy vs gold" in text and "best-of-3 gold gain" in text and "too uncertain" in text


def test_gold_from_the_task_when_records_carry_none():
    task = get_task("concise")
    prompt = [{"role": "user", "content": task.prompt_rows("train")[0]["messages"][-1]["content"]}]
    rec = PreferenceRecord(prompt=prompt, chosen={"role": "assistant", "content": "Short answer."},
                           rejected={"role": "assistant", "content": "A much longer answer " * 20},
                           metadata={"task": "concise"})
    (a, b), = record_gold([rec])
    assert (a, b) == tuple(task.gold([prompt, prompt], [rec.chosen["content"], rec.rejected["content"]]))
    unknown = PreferenceRecord(prompt=prompt, chosen=rec.chosen, rejected=rec.rejected, metadata={"task": "toy"})
    assert record_gold([unknown]) == [(None, None)]
