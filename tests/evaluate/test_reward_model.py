"""Reward-model evaluation (rlhfkit.evaluate.reward_model): ECE worked by hand, and the report's
accuracy, groups, gold agreement and length correlation."""

from __future__ import annotations

import numpy as np
import pytest

from rlhfkit.data.records import PreferenceRecord
from rlhfkit.evaluate.reward_model import expected_calibration_error, reward_model_report
from rlhfkit.models.heads import RewardModel

# (prompt, chosen, rejected): replies of different lengths, so the length correlation is defined
PAIRS = [("Hello there, how are you?", "I am fine, thanks for asking.", "Bad."),
         ("Name a fruit.", "Apple.", "A banana is a long yellow fruit that monkeys like."),
         ("Capital of Italy?", "Rome.", "It is Rome, the eternal city.")]
PROMPTS = [[{"role": "user", "content": p}] for p, _, _ in PAIRS]
CHOSEN, REJECTED = [c for _, c, _ in PAIRS], [r for _, _, r in PAIRS]


def test_ece_by_hand():
    """p = [0.9, 0.9, 0.6, 0.2]: confidences 0.9, 0.9, 0.6, 0.8; correct = p > ½ → 1, 1, 1, 0.
    Bins of width 0.05 on [0.5, 1]: {0.6}: acc 1, conf 0.6 → |0.4|·¼; {0.8}: acc 0, conf 0.8 → 0.8·¼;
    {0.9, 0.9}: acc 1, conf 0.9 → 0.1·½. ECE = 0.1 + 0.2 + 0.05 = 0.35."""
    ece, table = expected_calibration_error(np.array([0.9, 0.9, 0.6, 0.2]))
    assert ece == pytest.approx(0.35)
    assert sum(b["n"] for b in table) == 4


def test_evaluate_groups_and_gold():
    rm = RewardModel.init_from("tiny", seed=1)
    recs = [PreferenceRecord(prompt=p, chosen={"role": "assistant", "content": c},
                             rejected={"role": "assistant", "content": r},
                             metadata={"task": "t1" if i else "t2", "category": "x", "gold_chosen": 0.9,
                                       "gold_rejected": 0.1})
            for i, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED))]
    rep = reward_model_report(rm, recs)
    sc = rm.score(PROMPTS, CHOSEN, normalized=False) - rm.score(PROMPTS, REJECTED, normalized=False)
    assert rep["accuracy"] == pytest.approx((sc > 0).float().mean().item())
    assert rep["by_task"]["t1"]["n"] == 2 and rep["by_task"]["t2"]["n"] == 1
    assert rep["gold_accuracy"] == rep["accuracy"] and rep["label_gold_agreement"] == 1.0
    assert -1 <= rep["length_spearman"] <= 1 and 0 <= rep["ece"] <= 0.5
