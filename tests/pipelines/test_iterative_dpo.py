"""Iterative DPO (rlhfkit.pipelines.iterative_dpo): rounds of sample -> label -> train, and the
dispatch of `rlhfkit dpo` between them and offline DPO."""

from __future__ import annotations

import pytest

from rlhfkit.data.io import load_preferences
from rlhfkit.pipelines.iterative_dpo import IterativeDPOConfig, train
from rlhfkit.tracking import read_metrics
from rlhfkit.train import dpo


@pytest.mark.slow
def test_rounds_sample_label_train_and_log_gold(tmp_path):
    """Two rounds on the 'concise' task: each samples pairs from the current policy, labels them with the
    simulated annotator, trains from that policy (its own reference), and logs eval/gold per round."""
    out = tmp_path / "rounds"
    result = train(IterativeDPOConfig(model="tiny", labeler="simulated", task="concise", rounds=2, round_prompts=4,
                                      round_k=3, round_max_new_tokens=8, gold_prompts=4, batch_size=4,
                                      micro_batch_size=2, lr=1e-3, eval_fraction=0.0, inference_micro_batch_size=12,
                                      output_dir=str(out), progress=False))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and result["gold"] == [r["eval/gold"] for r in rows]
    assert rows[0]["policy"] == "tiny" and "round/pairs" not in rows[0]
    assert rows[2]["policy"] == result["checkpoint"] and str(out / "round-2") in result["checkpoint"]
    for r in (1, 2):
        records = load_preferences(out / f"round-{r}" / "prefs.jsonl")
        assert len(records) == rows[r]["round/pairs"] > 0 and {rec.source for rec in records} == {"simulated"}
    # round 2 started from round 1's policy, which was also its reference
    cfg2 = (out / "round-2" / "train" / "config.yaml").read_text()
    assert f"model: {rows[1]['policy']}" in cfg2 and "reference_model: null" in cfg2


def test_rounds_options_are_checked():
    with pytest.raises(ValueError, match="rounds > 1 needs a labeler"):
        IterativeDPOConfig(data="x", rounds=3).validate()
    with pytest.raises(ValueError, match="labeler=simulated needs task"):
        IterativeDPOConfig(labeler="simulated").validate()
    with pytest.raises(ValueError, match="labeler must be 'simulated', got 'judge'"):
        IterativeDPOConfig(labeler="judge", task="concise").validate()
    with pytest.raises(ValueError, match="leave data unset"):
        IterativeDPOConfig(labeler="simulated", task="concise", data="x").validate()


def test_without_a_labeler_it_is_one_offline_dpo_run(monkeypatch, tmp_path):
    """`rlhfkit dpo --data X` reaches ``train.dpo.train`` with the DPO fields alone."""
    seen = []
    monkeypatch.setattr(dpo, "train", lambda cfg: seen.append(cfg) or {"steps": 0})
    assert train(IterativeDPOConfig(data="x.jsonl", beta=0.2, output_dir=str(tmp_path))) == {"steps": 0}
    (cfg,) = seen
    assert type(cfg) is dpo.DPOConfig and cfg.beta == 0.2 and cfg.data == "x.jsonl"
