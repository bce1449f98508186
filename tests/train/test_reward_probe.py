"""The reward head as a probe (rlhfkit.train.reward_probe): the L2 Bradley–Terry fit on synthetic
features (learns the direction; flipped labels flip it), λ chosen by prompt-grouped CV (noise gets a
strong λ), folds that never split a prompt, features extracted from packed rows matching separate
scoring, and `train` with freeze_backbone fitting the probe with no SGD step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_reward import toy_prefs, train_cfg, write_jsonl

from rlhfkit.models.heads import PackedScorer, RewardModel
from rlhfkit.models.readout import candidate_layers
from rlhfkit.train.reward import RewardConfig, start_layers, train
from rlhfkit.train.reward_data import encode, read_preferences
from rlhfkit.train.reward_probe import (
    L2_GRID,
    choose_layers,
    extract_features,
    fit_probe,
    prompt_folds,
    set_head,
)


def synthetic(m: int = 400, d: int = 20, seed: int = 0, noise: bool = False):
    """Replies' features ~ N(3, 2²) per dimension; chosen ≻ rejected by BT on w_true · (f_c - f_r)."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    fa, fb = rng.normal(3, 2, size=(m, d)), rng.normal(3, 2, size=(m, d))
    p = 1 / (1 + np.exp(-(fa - fb) @ w_true))
    a_wins = rng.random(m) < (0.5 if noise else p)
    fc, fr = np.where(a_wins[:, None], fa, fb), np.where(a_wins[:, None], fb, fa)
    groups = [f"prompt{i // 4}" for i in range(m)]  # 4 pairs per prompt
    return fc, fr, groups, w_true


def test_probe_learns_the_direction_and_a_flipped_label_flips_it():
    """On held-out synthetic pairs the probe orders >= 85% correctly (BT labels with |w·Δ| ~ 9 are
    nearly noiseless); trained on the same pairs with chosen/rejected swapped it orders <= 15%: a sign
    error in the loss or the gradient fails one of the two."""
    fc, fr, groups, w_true = synthetic()
    y = np.ones(len(fc))
    fit = fit_probe(fc, fr, y, groups)
    assert fit.l2 in L2_GRID and fit.cv is not None and len(fit.cv) == len(L2_GRID)
    # new pairs from the same w_true: score = w · f + b with the standardisation folded into w, b
    rng = np.random.default_rng(5)
    fa, fb = rng.normal(3, 2, size=(300, 20)), rng.normal(3, 2, size=(300, 20))
    truth = (fa - fb) @ w_true > 0
    acc = np.mean(((fa @ fit.weight + fit.bias) > (fb @ fit.weight + fit.bias)) == truth)
    assert acc >= 0.85, acc
    flipped = fit_probe(fr, fc, y, groups)
    assert np.mean(((fa - fb) @ flipped.weight > 0) == truth) <= 0.15
    # the bias centres the training replies' scores: mean of w·f + b over them is 0
    both = np.concatenate([fc, fr])
    assert (both @ fit.weight + fit.bias).mean() == pytest.approx(0.0, abs=1e-8)


def test_cv_picks_a_strong_l2_for_noise_and_a_weaker_one_for_signal():
    """Random labels: any weight only adds held-out log-loss, so CV takes one of the two strongest λ;
    real signal: a weaker λ than that."""
    fc, fr, groups, _ = synthetic(m=200, noise=True)
    assert fit_probe(fc, fr, np.ones(len(fc)), groups).l2 >= L2_GRID[-2]
    fc, fr, groups, _ = synthetic(m=200)
    assert fit_probe(fc, fr, np.ones(len(fc)), groups).l2 < L2_GRID[-2]


def test_prompt_folds_never_split_a_prompt_and_cover_every_fold():
    groups = [f"p{i % 13}" for i in range(100)]
    fold = prompt_folds(groups, 5, seed=3)
    for g in set(groups):
        assert len({fold[i] for i in range(100) if groups[i] == g}) == 1
    assert set(fold.tolist()) == set(range(5))
    assert (prompt_folds(groups, 5, seed=3) == fold).all()  # seeded


def test_too_few_prompts_for_cv_takes_the_middle_l2():
    fc, fr, _, _ = synthetic(m=8)
    fit = fit_probe(fc, fr, np.ones(8), ["one"] * 8)
    assert fit.cv is None and fit.l2 == L2_GRID[len(L2_GRID) // 2]


@pytest.mark.parametrize("readout", [("mean", "1-2"), ("last", "last")])
def test_packed_features_match_the_scores_of_each_reply(tmp_path, readout):
    """Pairs of 3 prompts sharing replies: the extracted (chosen, rejected) features, put through the
    probe's head, give the score difference ``RewardModel.score`` gives each pair on its own."""
    rm = RewardModel.init_from("tiny", seed=1, pooling=readout[0], layers=readout[1])
    rows = toy_prefs(3, per_prompt=3)
    data, _ = encode(read_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows))), rm.tok, 512, 0.0, "half")
    scorer = PackedScorer(rm.model)
    fc, fr = extract_features(scorer, data, rm.tok.pad_token_id, batch_size=4, device="cpu")
    fit = fit_probe(fc, fr, np.ones(len(fc)), [p.prompt_key for p in data])
    set_head(scorer, fit)
    sc = rm.score([r["prompt"] for r in rows], [r["chosen"]["content"] for r in rows], normalized=False)
    sr = rm.score([r["prompt"] for r in rows], [r["rejected"]["content"] for r in rows], normalized=False)
    assert np.allclose((fc - fr) @ fit.weight, (sc - sr).numpy(), atol=1e-4)
    bias = fit.bias if scorer.head.bias is not None else 0.0  # transformers' decoder heads have none
    assert np.allclose(fc @ fit.weight + bias, sc.numpy(), atol=1e-4)


def test_freeze_backbone_probe_learns_the_toy_set_without_sgd(tmp_path):
    """freeze_backbone + probe: held-out accuracy >= 0.9 on unseen prompts of the separable toy set,
    no optimizer step (steps 0, body unchanged), the read-out and the normalisation saved with the
    checkpoint, one metrics row with the probe's λ and the held-out accuracy."""
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_prefs(80))
    cfg = train_cfg(tmp_path, data, freeze_backbone=True, pooling="mean", layers="0-2", norm_samples=10_000)
    out = train(cfg)
    assert out["steps"] == 0 and out["eval_accuracy"] >= 0.9, out
    assert out["probe"]["l2"] in L2_GRID and out["readout"] == {"pooling": "mean", "layers": "0-2"}
    rm = RewardModel.load(out["checkpoint"])
    start = RewardModel.init_from("tiny", seed=0).model
    for (name, a), b in zip(start.named_parameters(), rm.model.parameters()):
        assert torch.equal(a, b) != name.startswith("score"), name
    cfgjson = json.loads((tmp_path / "run" / "checkpoints" / "step-0" / "config.json").read_text())
    assert cfgjson["rlhfkit_reward_readout"] == {"pooling": "mean", "layers": "0-2"} and "rlhfkit_reward_norm" in cfgjson
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["eval/accuracy"] == out["eval_accuracy"] and "probe/l2" in rows[0]


@pytest.mark.parametrize("field, value, message", [
    ("pooling", "max", "pooling must be one of"),
    ("layers", "3-1", "layers must be 'last', 'middle', 'auto', 'N' or 'A-B' with A <= B"),
    ("probe_folds", 1, "probe_folds must be >= 2, got 1"),
])
def test_probe_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(data="x.jsonl", **{field: value})


def test_probe_with_margins_is_an_error():
    with pytest.raises(ValueError, match="margin_scale > 0 needs gradient training"):
        RewardConfig(data="x.jsonl", freeze_backbone=True, margin_scale=0.5)
    RewardConfig(data="x.jsonl", freeze_backbone=True, margin_scale=0.5, probe=False)  # SGD takes margins


def test_layer_choice_finds_the_layers_that_carry_the_preference():
    """Six layers of synthetic features; the BT preference lives in layers 3-4 only (the others are
    independent noise): CV picks '3-4' over '1-2' and over '1-6' (which dilutes it with noise), and a
    flipped order of the candidates does not change the pick."""
    fc, fr, groups, _ = synthetic(m=300, d=12, seed=2)
    rng = np.random.default_rng(9)
    def stack(f):  # (m, 6, d): layers 1, 2, 5, 6 noise; 3 and 4 the signal plus a little noise
        noise = [rng.normal(3, 2, size=f.shape) for _ in range(4)]
        return np.stack([noise[0], noise[1], f + 0.3 * rng.normal(size=f.shape), f, noise[2], noise[3]], 1)
    sc, sr = stack(fc), stack(fr)
    y = np.ones(len(fc))
    best, fit, losses = choose_layers(sc, sr, y, groups, ["1-2", "3-4", "1-6"], folds=5, seed=0)
    assert best == "3-4" and losses["3-4"] < min(losses["1-2"], losses["1-6"]), losses
    assert choose_layers(sc, sr, y, groups, ["1-6", "3-4", "1-2"], folds=5, seed=0)[0] == "3-4"
    assert fit.weight.shape == (12,)
    # one prompt only: no CV, the first candidate
    assert choose_layers(sc[:8], sr[:8], y[:8], ["one"] * 8, ["1-2", "3-4"], folds=5, seed=0)[0] == "1-2"


def test_per_layer_features_average_to_a_range_read_out(tmp_path):
    """extract_features(layers=[1, 2]) averaged over its layers equals the '1-2' read-out's features."""
    rm = RewardModel.init_from("tiny", seed=1, pooling="mean", layers="1-2")
    data, _ = encode(read_preferences(str(write_jsonl(tmp_path / "p.jsonl", toy_prefs(3, per_prompt=3)))), rm.tok,
                     512, 0.0, "half")
    scorer = PackedScorer(rm.model)
    fc, fr = extract_features(scorer, data, rm.tok.pad_token_id, batch_size=4, device="cpu")
    lc, lr = extract_features(scorer, data, rm.tok.pad_token_id, batch_size=4, device="cpu", layers=[1, 2])
    assert lc.shape == (len(data), 2, fc.shape[1])
    assert np.allclose(lc.mean(1), fc, atol=1e-5) and np.allclose(lr.mean(1), fr, atol=1e-5)


def test_layers_auto_stores_the_range_the_probe_chose(tmp_path):
    """reward train with layers='auto': the probe picks one of candidate_layers, the checkpoint reads
    it (config.json), the probe's metrics say which with each candidate's CV log-loss, and the
    held-out toy pairs are still ordered."""
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_prefs(80))
    cfg = train_cfg(tmp_path, data, freeze_backbone=True, pooling="mean", layers="auto", norm_samples=10_000)
    out = train(cfg)
    rm = RewardModel.load(out["checkpoint"])
    candidates = candidate_layers(rm.model.config.num_hidden_layers)
    assert out["readout"]["layers"] in candidates and out["readout"]["layers"] == out["probe"]["layers"]
    assert set(out["probe"]["layers_cv"]) == set(candidates)
    assert rm.readout.layers == out["readout"]["layers"] and out["eval_accuracy"] >= 0.9, out


def test_layers_auto_is_the_default_and_is_middle_without_the_probe():
    assert RewardConfig(data="x.jsonl").layers == "auto"
    assert start_layers(RewardConfig(data="x.jsonl", probe=False)) == "middle"
    assert start_layers(RewardConfig(data="x.jsonl", layers="4-6")) == "4-6"
    with pytest.raises(ValueError, match="layers 'auto' is chosen by `rlhfkit reward train`"):
        RewardModel.init_from("tiny", seed=0, pooling="mean", layers="auto")
