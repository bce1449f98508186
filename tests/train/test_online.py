"""Online RL learning tests on a tiny model with a toy reward.

The toy: the policy is rewarded for the fraction of its completion tokens in a set S of half the
vocabulary, S = {x : e_x . u > 0} for the starting model's embeddings e and a fixed random direction
u. S is linearly separable in embedding space, so a tiny model can learn it quickly by moving its
hidden state along u; the starting fraction is ~0.4-0.5. A 'tiny:0.5' model (init std 0.5) has a
peaked starting distribution, so sampled tokens carry signal. Every learning test is paired with
the same run on the negated reward, which must move the fraction the other way: a flipped loss sign
fails one of the two.
"""

from __future__ import annotations

import json

import pytest
from toy_rl import ToyTask, frac_in_set, make_token_set


@pytest.fixture(scope="module")
def token_set():
    return make_token_set()


def reward_curve(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["reward/mean"] for r in rows if "reward/mean" in r]


def run_method(train, cfg, S, sign, tmp_path):
    cfg.output_dir = str(tmp_path / f"run{sign:+d}")
    train(cfg, reward_fn=lambda r: sign * frac_in_set(S, r), task=ToyTask())
    return [sign * v for v in reward_curve(tmp_path / f"run{sign:+d}")]


def common(**kw):
    base = dict(model="tiny:0.5", task="toy", total_steps=12, prompts_per_step=4, max_new_tokens=8, temperature=1.0,
                missing_eos_penalty=None, eval_every=0, progress=False)
    return {**base, **kw}


@pytest.mark.parametrize("advantage,kl_in_reward", [("group", False), ("loo", True)])
def test_critic_free_methods_learn_the_toy_reward(tmp_path, token_set, advantage, kl_in_reward):
    from rlhfkit.train.grpo import GRPOConfig, train

    cfg = lambda: GRPOConfig(**common(samples_per_prompt=4, lr=5e-2, beta=0.0, advantage=advantage,
                                      kl_in_reward=kl_in_reward, aggregation="token_mean"))
    up = run_method(train, cfg(), token_set, +1, tmp_path)
    down = run_method(train, cfg(), token_set, -1, tmp_path)
    start = (up[0] + down[0]) / 2
    assert sum(up[-3:]) / 3 > start + 0.25, up
    assert sum(down[-3:]) / 3 < start - 0.05, down


def test_ppo_with_critic_learns_the_toy_reward(tmp_path, token_set):
    from rlhfkit.train.ppo import PPOConfig, train

    cfg = lambda: PPOConfig(**common(prompts_per_step=8, lr=5e-2, beta=0.0, epochs_per_step=2, mini_batch_size=4))
    up = run_method(train, cfg(), token_set, +1, tmp_path)
    down = run_method(train, cfg(), token_set, -1, tmp_path)
    start = (up[0] + down[0]) / 2
    assert sum(up[-3:]) / 3 > start + 0.25, up
    assert sum(down[-3:]) / 3 < start - 0.05, down
    rows = [json.loads(line) for line in open(tmp_path / "run+1" / "metrics.jsonl")]
    assert all(k in rows[-1] for k in ("value/explained_variance", "loss/value", "policy/clipfrac", "kl/beta"))
    assert (tmp_path / "run+1" / "checkpoints" / "step-12" / "value" / "config.json").exists()


def test_grpo_resume_reproduces_the_uninterrupted_run(tmp_path, token_set):
    """Stop after 2 steps, resume to 4: the same rewards and losses as 4 steps straight (sampling is
    seeded by step, so the resumed run draws the same completions from the same weights)."""
    from rlhfkit.train.grpo import GRPOConfig, train

    def cfg(out, steps, resume=None):
        return GRPOConfig(**common(samples_per_prompt=2, prompts_per_step=2, lr=1e-2, beta=0.04, total_steps=4,
                                   max_steps=steps, lr_schedule="constant", output_dir=str(out), resume=resume))

    reward = lambda r: frac_in_set(token_set, r)
    train(cfg(tmp_path / "straight", 4), reward_fn=reward, task=ToyTask())
    train(cfg(tmp_path / "split", 2), reward_fn=reward, task=ToyTask())
    train(cfg(tmp_path / "split", 4, resume="auto"), reward_fn=reward, task=ToyTask())
    rows = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl")]
    straight, split = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(straight, split):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)
        assert a["loss/kl"] == pytest.approx(b["loss/kl"], abs=1e-5)


def test_one_step_per_batch_takes_old_logps_from_the_training_pass(tmp_path, token_set, monkeypatch):
    """With one optimizer step per rollout batch the sampling-time forward pass is skipped: the same
    step with and without it logs the same losses, KL and ratio 1, and leaves the same weights."""
    import torch

    from rlhfkit.models import load_model
    from rlhfkit.train import grpo

    def run(out, skip):
        monkeypatch.setattr(grpo.GRPOConfig, "logps_from_training_pass", lambda self, n: skip)
        cfg = grpo.GRPOConfig(**common(samples_per_prompt=4, prompts_per_step=2, lr=1e-2, beta=0.04, total_steps=1,
                                       lr_schedule="constant", output_dir=str(out)))
        res = grpo.train(cfg, reward_fn=lambda r: frac_in_set(token_set, r), task=ToyTask())
        return json.loads(open(out / "metrics.jsonl").readline()), load_model(res["checkpoint"])[0]

    assert grpo.GRPOConfig(samples_per_prompt=4).logps_from_training_pass(8)
    assert not grpo.GRPOConfig(samples_per_prompt=4, epochs_per_step=2).logps_from_training_pass(8)
    assert not grpo.GRPOConfig(samples_per_prompt=4, mini_batch_size=4).logps_from_training_pass(8)
    assert not grpo.GRPOConfig(samples_per_prompt=4, kl_in_reward=True).logps_from_training_pass(8)
    (m_skip, w_skip), (m_full, w_full) = run(tmp_path / "skip", True), run(tmp_path / "full", False)
    for key in ("loss/policy", "loss/kl", "kl/seq", "kl/k3_token", "policy/ratio_mean", "reward/mean"):
        assert m_skip[key] == pytest.approx(m_full[key], abs=1e-4), key
    assert m_skip["policy/ratio_mean"] == 1.0
    for a, b in zip(w_skip.parameters(), w_full.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_held_out_eval_reports_the_win_rate_against_its_first_eval():
    from types import SimpleNamespace

    from rlhfkit.models import load_model
    from rlhfkit.train import online
    from rlhfkit.train.grpo import GRPOConfig

    model, tok = load_model("tiny")
    cfg = GRPOConfig(**common(samples_per_prompt=2))
    golds = iter([[0.5, 0.2, 0.9, 0.1], [0.6, 0.2, 0.3, 0.1], [0.0] * 4])
    task = SimpleNamespace(gold=lambda prompts, completions: next(golds))
    held_out = online.HeldOutEval(None, SimpleNamespace(uses_gold_only=True), task, ToyTask().prompts("heldout")[:4], cfg)
    sampler = online.make_sampler(cfg, model, tok, "tiny")
    first = held_out(sampler)
    assert "eval/win_rate_start" not in first and first["eval/gold"] == pytest.approx(0.425)
    assert held_out(sampler)["eval/win_rate_start"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)  # ties count half
    assert held_out(sampler)["eval/win_rate_start"] == 0.0
