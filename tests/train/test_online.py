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
    # the algorithms sample exactly here ('hf'); the default backend ('auto': the int8 engine on a CPU) has its
    # own learning and resume tests in test_online_is.py
    base = dict(model="tiny:0.5", task="toy", total_steps=12, prompts_per_step=4, max_new_tokens=8, temperature=1.0,
                missing_eos_penalty=None, eval_every=0, progress=False, rollout_backend="hf")
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

    # 24 steps at 3e-2: 12 steps at 5e-2 passed on an AVX2 CPU but collapsed after its second step on an
    # AVX-512 one (rewards 0.36, 0.59, 0.53, 0.14, ...); these settings clear both thresholds by >= 0.1 at
    # seeds 0, 1 and 2 there
    cfg = lambda: PPOConfig(**common(prompts_per_step=8, lr=3e-2, beta=0.0, epochs_per_step=2, mini_batch_size=4,
                                     total_steps=24))
    up = run_method(train, cfg(), token_set, +1, tmp_path)
    down = run_method(train, cfg(), token_set, -1, tmp_path)
    start = (up[0] + down[0]) / 2
    assert sum(up[-3:]) / 3 > start + 0.25, up
    assert sum(down[-3:]) / 3 < start - 0.05, down
    rows = [json.loads(line) for line in open(tmp_path / "run+1" / "metrics.jsonl")]
    assert all(k in rows[-1] for k in ("value/explained_variance", "loss/value", "policy/clipfrac", "kl/beta"))
    assert (tmp_path / "run+1" / "checkpoints" / "step-24" / "value" / "config.json").exists()


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
    from rlhfkit.train import online, online_rollout
    from rlhfkit.train.grpo import GRPOConfig
    from rlhfkit.train.online_eval import HeldOutEval

    model, tok = load_model("tiny")
    cfg = GRPOConfig(**common(samples_per_prompt=2))
    golds = iter([[0.5, 0.2, 0.9, 0.1], [0.6, 0.2, 0.3, 0.1], [0.0] * 4])
    task = SimpleNamespace(gold=lambda prompts, completions: next(golds))
    rows = online.task_rows(ToyTask(), "heldout")[:4]
    held_out = HeldOutEval(None, SimpleNamespace(uses_gold_only=True), task, rows, cfg)
    sampler = online_rollout.make_sampler(cfg, model, tok, "tiny")
    first = held_out(sampler)
    assert "eval/win_rate_start" not in first and first["eval/gold"] == pytest.approx(0.425)
    assert held_out(sampler)["eval/win_rate_start"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)  # ties count half
    assert held_out(sampler)["eval/win_rate_start"] == 0.0


# --- the shared optimize: micro/mini-batch invariance --------------------------------------------------


def test_optimize_gives_the_same_update_whatever_the_micro_batch_split():
    """One mini-batch of 8 rows as 1 micro-batch of 8, as 8 micro-batches of 1 and as 3 + 3 + 2: the
    same parameters after the update, and the same logged metrics.

    GRPO's loss (seq_mean aggregation, a k3 KL term to a different reference model) is a mean over
    rows, so each micro-batch's loss weighted by its share of the mini-batch's rows accumulates to the
    full batch's gradient. Plain SGD without clipping keeps the update proportional to the gradient:
    Adam's first step (~lr x sign(g)) and norm clipping would hide a wrongly scaled gradient, and a
    wrong weight (none, 1/number of micro-batches with the uneven 3 + 3 + 2 split) changes the update
    by up to 8x. All completions are full length, so token means equal row means and every metric
    (clipfrac, entropy, ...) must agree as well.
    """
    import copy

    import torch

    from rlhfkit.models import load_model
    from rlhfkit.rollout.engine import Sampler
    from rlhfkit.train import grpo, online, runtime

    cfg = grpo.GRPOConfig(**common(model="tiny:0.5", samples_per_prompt=2, max_new_tokens=4, beta=0.1, grad_clip=0.0))
    model, tok = load_model("tiny:0.5", seed=0)
    ref, _ = load_model("tiny:0.5", seed=1)
    ref.eval().requires_grad_(False)
    r = Sampler(model, tok, cfg.sampling(), layout=cfg.layout()).sample(
        [p for p in ToyTask().prompts("train")[:4] for _ in range(2)], seed=0)
    assert r.completion_mask.all(), "precondition: no completion ends early (equal token counts)"
    r.ref_logps = cfg.logps(ref, r)
    r.scores = torch.tensor([1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 0.7])
    adv = grpo.compute_advantages(r, cfg)
    acc = runtime.make_accelerator("no")

    def step(micro_batch_size):
        policy = copy.deepcopy(model).train()
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        cfg.micro_batch_size = micro_batch_size
        metrics = online.optimize([policy], opt, r.select(torch.arange(8)), adv,
                                  lambda mb, a: grpo.policy_loss(policy, mb, a, cfg), cfg, acc, step=0)
        return [p.detach() - p0 for p, p0 in zip(policy.parameters(), model.parameters())], metrics

    (one, m_one), (eight, m_eight), (uneven, m_uneven) = step(8), step(1), step(3)
    assert max(d.abs().max().item() for d in one) > 1e-3  # the update is far above float rounding
    # atol 1e-5: GEMM kernels sum in an order that depends on the row count, and on an AVX-512 CPU one
    # weight of 3.1M differed by 1.4e-6 between the splits (an element near 0, so rtol cannot absorb it);
    # a mis-weighted micro-batch moves every element by 1/3 to 8x, far outside rtol 1e-4
    for a, b, c in zip(one, eight, uneven):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)
    assert set(m_one) == set(m_eight) == set(m_uneven) and "loss/kl" in m_one
    for key in m_one:
        assert m_eight[key] == pytest.approx(m_one[key], abs=1e-5), key
        assert m_uneven[key] == pytest.approx(m_one[key], abs=1e-5), key


def test_named_seeds_are_functions_of_seed_step_and_rank():
    from rlhfkit.train.online import shuffle_seed
    from rlhfkit.train.online_rollout import sampling_seed

    assert sampling_seed(3, 7, 1) == 3 * 100_003 + 7 * 101 + 1  # the formula the resume test depends on
    streams = {sampling_seed(0, step, rank) for step in range(50) for rank in range(8)}
    assert len(streams) == 50 * 8
    assert shuffle_seed(0, 5) == shuffle_seed(0, 5)
    assert len({shuffle_seed(seed, step) for seed in range(3) for step in range(50)}) == 150


# --- config validation ---------------------------------------------------------------------------


def online_configs():
    from rlhfkit.train.cmpo import CMPOConfig
    from rlhfkit.train.grpo import GRPOConfig, RLOOConfig
    from rlhfkit.train.online import OnlineConfig
    from rlhfkit.train.ppo import PPOConfig

    return [OnlineConfig, GRPOConfig, RLOOConfig, PPOConfig, CMPOConfig]


SHARED_BAD = [("kl_estimator", "k4"), ("rollout_backend", "sglang"), ("lr_schedule", "step"), ("temperature", 0.0),
              ("top_p", 0.0), ("top_p", 1.5), ("samples_per_prompt", 0), ("prompts_per_step", 0),
              ("epochs_per_step", 0), ("micro_batch_size", 0), ("mini_batch_size", 0), ("total_steps", 0),
              ("max_new_tokens", 0), ("lr", -1.0), ("adam_eps", 0.0), ("beta", -0.1), ("grad_clip", -1.0),
              ("warmup_steps", -1), ("eval_every", -1), ("eval_prompts", 0), ("max_minutes", -1.0),
              ("vllm_gpu_memory_utilization", 1.5), ("missing_eos_penalty", float("nan")), ("reward", "rm:"),
              ("reward", "gold@x"), ("reward", "bleu"), ("temperature", float("nan"))]


@pytest.mark.parametrize("field,bad", SHARED_BAD)
def test_every_online_config_rejects_a_bad_shared_field_naming_it(field, bad):
    for cls in online_configs():
        with pytest.raises(ValueError, match=rf"\b{field}\b"):
            cls(**{field: bad})


@pytest.mark.parametrize("cls_name,field,bad", [
    ("GRPOConfig", "advantage", "typo"), ("RLOOConfig", "advantage", "reinforce"), ("GRPOConfig", "aggregation", "sum"),
    ("GRPOConfig", "clip_eps", 0.0), ("GRPOConfig", "clip_eps_high", -0.1), ("GRPOConfig", "samples_per_prompt", 1),
    ("PPOConfig", "value_init", "critic"), ("PPOConfig", "gamma", 1.5), ("PPOConfig", "lam", -0.1),
    ("PPOConfig", "clip_eps", -1.0), ("PPOConfig", "clip_eps_value", 0.0), ("PPOConfig", "vf_coef", -1.0),
    ("PPOConfig", "kl_target", 0.0), ("PPOConfig", "kl_horizon", 0),
    ("CMPOConfig", "aggregation", "sum"), ("CMPOConfig", "sigma_decay", 1.0), ("CMPOConfig", "sigma_eps", -1.0),
    ("CMPOConfig", "clip_eps", 0.0), ("CMPOConfig", "samples_per_prompt", 1),
])
def test_each_method_config_rejects_a_bad_value_of_its_own_fields(cls_name, field, bad):
    cls = {c.__name__: c for c in online_configs()}[cls_name]
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        cls(**{field: bad})


def test_value_init_reward_needs_a_reward_model_in_reward():
    from rlhfkit.train.ppo import PPOConfig

    with pytest.raises(ValueError, match="value_init='reward' needs an rm:PATH"):
        PPOConfig(value_init="reward", reward="gold")
    assert PPOConfig(value_init="reward", reward="rm:runs/rm@1.0,gold@0.5").value_init == "reward"


def test_a_field_set_after_construction_is_checked_when_training_starts(tmp_path):
    from rlhfkit.train.grpo import GRPOConfig, train

    cfg = GRPOConfig(**common(samples_per_prompt=2, output_dir=str(tmp_path)))
    cfg.advantage = "typo"
    with pytest.raises(ValueError, match="advantage must be one of group, dr_grpo, loo, reinforce_pp"):
        train(cfg, reward_fn=lambda r: r.scores, task=ToyTask())
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("name,cls_path", [("grpo", "rlhfkit.train.grpo:GRPOConfig"), ("rloo", "rlhfkit.train.grpo:RLOOConfig"),
                                           ("ppo", "rlhfkit.train.ppo:PPOConfig"), ("cmpo", "rlhfkit.train.cmpo:CMPOConfig")])
def test_example_configs_load_and_validate(name, cls_path):
    import importlib
    from pathlib import Path

    from rlhfkit.config import load_config

    module, cls = cls_path.split(":")
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.yaml"
    cfg = load_config(getattr(importlib.import_module(module), cls), str(path))
    assert cfg.task and cfg.total_steps == 40
