"""CMPO trainer tests: target wiring, the prior's EMA per optimizer update, eval on the policy,
learning on the toy reward (and unlearning on its negation), checkpoint + resume.

The toy is tests/train/test_online.py's: reward = fraction of completion tokens in a set S of half the
vocabulary (S = {x : e_x . u > 0} for the starting 'tiny:0.5' model's embeddings e and a fixed random
direction u); the starting fraction is ~0.4-0.5.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from toy_rl import ToyTask, frac_in_set, make_token_set

from rlhfkit.losses.cmpo import RunningScale
from rlhfkit.models import load_model
from rlhfkit.train import cmpo, online_rollout
from rlhfkit.train.cmpo import CMPOConfig, PriorTrackingOptimizer, cmpo_targets, train


@pytest.fixture(scope="module")
def token_set():
    return make_token_set()


def rows(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def common(**kw):
    base = dict(model="tiny:0.5", task="toy", prompts_per_step=4, samples_per_prompt=4, max_new_tokens=8,
                temperature=1.0, missing_eos_penalty=None, eval_every=0, progress=False, beta=0.0,
                rollout_backend="hf")  # exact sampling; CMPO through the engine: test_online_is.py
    return {**base, **kw}


def test_targets_follow_the_scores():
    """Two groups of K=4: scores [1, 0, 0, 0] and [0, 0, 0, 2]. Leave-one-out: A = [1, -1/3, -1/3, -1/3]
    and [-2/3, -2/3, -2/3, 2]; mean(A²) = (1 + 3/9 + 3·4/9 + 4) / 8 = 0.833333 -> σ̂ = 0.912871 (one
    update, eps 0). The best sample of each group has the largest weight and a positive A/σ̂."""
    scale = RunningScale(decay=0.99, eps=0.0)
    adv, w, m = cmpo_targets(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 2]), 4, scale, c=1.0)
    sigma = (5 / 6) ** 0.5
    assert m["cmpo/sigma"] == pytest.approx(sigma, abs=1e-6)
    expected = torch.tensor([1, -1 / 3, -1 / 3, -1 / 3, -2 / 3, -2 / 3, -2 / 3, 2]) / sigma
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    assert w.view(2, 4).argmax(1).tolist() == [0, 3]
    torch.testing.assert_close(w.view(2, 4).sum(1), torch.ones(2))
    assert m["cmpo/clip_frac_adv"] == pytest.approx(2 / 8)  # 1/σ̂ = 1.095 and 2/σ̂ = 2.19 exceed c = 1


def test_prior_follows_the_policy_after_every_update():
    """prior <- (1 - α) prior + α policy right after each optimizer step, exactly; never before."""
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    prior = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(1.0)  # make prior and policy differ
    opt = PriorTrackingOptimizer(torch.optim.SGD(policy.parameters(), lr=0.1), prior, policy, rate=0.25)
    for _ in range(2):
        before = [p.clone() for p in prior.parameters()]
        policy(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for t, b, o in zip(prior.parameters(), before, policy.parameters()):
            assert torch.equal(t, (1 - 0.25) * b + 0.25 * o.detach())
    with pytest.raises(ValueError, match="parameter names differ"):
        PriorTrackingOptimizer(opt.opt, torch.nn.Linear(3, 4), policy, 0.5)


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_eval_hook_samples_the_policy_not_the_prior(backend):
    """hf: the eval sampler generates with the policy; fast: the one engine reads the policy's weights for
    the eval, then the prior's again (the engine keeps the tensors it was synced from: ``embed``)."""
    policy, tok = load_model("tiny")
    prior = copy.deepcopy(policy)
    cfg = CMPOConfig(**common(rollout_backend=backend))
    seen = {}

    def hook(s):
        seen["model"] = s.backend.model if backend == "hf" else s.backend.embed
        return {}

    sampler = online_rollout.make_sampler(cfg, prior, tok, "tiny")
    cmpo.eval_policy_not_prior(cfg, policy, prior, sampler, hook)
    if backend == "hf":
        assert seen["model"] is policy
    else:
        assert seen["model"] is policy.model.embed_tokens.weight
        assert sampler.backend.embed is prior.model.embed_tokens.weight


@pytest.mark.parametrize("bad,match", [(dict(samples_per_prompt=1), "samples_per_prompt must be >= 2"),
                                       (dict(prior_ema=0.0), "prior_ema"), (dict(c=0.0), "c must be > 0"),
                                       (dict(lam=-1.0), "lam"), (dict(aggregation="sum"), "aggregation")])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        CMPOConfig(**common(**bad)).validate()


def run(tmp_path, S, sign):
    # λ = 0.3, α = 0.5: a lagging prior plus λ = 1 is deliberately conservative (measured: +0.18 in 12
    # steps at this lr, against +0.30 here); the test is about direction and wiring, not tuning.
    out = tmp_path / f"run{sign:+d}"
    cfg = CMPOConfig(**common(total_steps=12, lr=5e-2, lam=0.3, prior_ema=0.5, output_dir=str(out)))
    train(cfg, reward_fn=lambda r: sign * frac_in_set(S, r), task=ToyTask())
    return [sign * row["reward/mean"] for row in rows(out)], rows(out)


def test_cmpo_learns_the_toy_reward_and_its_negation(tmp_path, token_set):
    """Measured (seed 0): up 0.41 -> 0.71 (mean of the last 3 steps), down 0.41 -> 0.32. A flipped
    sign anywhere in advantages, weights or the PG term moves the wrong way and fails one side."""
    up, up_rows = run(tmp_path, token_set, +1)
    down, _ = run(tmp_path, token_set, -1)
    start = (up[0] + down[0]) / 2
    assert sum(up[-3:]) / 3 > start + 0.2, up
    assert sum(down[-3:]) / 3 < start - 0.05, down
    for key in ("cmpo/sigma", "cmpo/weight_entropy", "cmpo/clip_frac_adv", "loss/cmpo", "loss/policy",
                "policy/clipfrac", "policy/approx_kl", "policy/entropy", "reward/mean", "optim/lr", "perf/step_s"):
        assert key in up_rows[-1], key


def test_checkpoint_and_resume_reproduce_the_run(tmp_path, token_set):
    """3 steps straight (saving at step 2) == resuming that step-2 checkpoint for the last step: same
    step-3 losses and σ̂ (prior, σ̂, optimizer, scheduler and RNG all come back). The checkpoint holds
    the prior in prior/ and σ̂'s state in trainer_state.pt."""
    kw = common(total_steps=3, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, lr=1e-2,
                prior_ema=0.5, beta=0.04, save_every=2)
    reward = lambda r: frac_in_set(token_set, r)  # noqa: E731
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(CMPOConfig(**kw, output_dir=str(straight)), reward_fn=reward, task=ToyTask())
    ckpt = straight / "checkpoints" / "step-2"
    assert (ckpt / "prior" / "config.json").exists() and (ckpt / "config.json").exists()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["sigma"]["t"] == 2
    train(CMPOConfig(**kw, output_dir=str(resumed), resume=str(ckpt)), reward_fn=reward, task=ToyTask())
    a, b = rows(straight)[-1], rows(resumed)[-1]
    assert a["step"] == b["step"] == 3 and len(rows(resumed)) == 1
    for key in ("loss/policy", "loss/cmpo", "loss/kl", "cmpo/sigma", "reward/mean", "kl/seq", "optim/grad_norm"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    # the prior moved: it is neither the starting model nor the policy (α = 0.5 after 2 updates)
    prior, _ = load_model(str(ckpt / "prior"))
    policy, _ = load_model(str(ckpt))
    start, _ = load_model("tiny:0.5")
    name, p = next(iter(prior.named_parameters()))
    assert not torch.equal(p, dict(start.named_parameters())[name])
    assert not torch.equal(p, dict(policy.named_parameters())[name])
    shutil.rmtree(ckpt / "prior")
    with pytest.raises(FileNotFoundError, match="no prior/"):
        train(CMPOConfig(**kw, output_dir=str(tmp_path / "bad"), resume=str(ckpt)), reward_fn=reward, task=ToyTask())


def test_max_minutes_stops_the_run_with_a_checkpoint(tmp_path, token_set):
    out = tmp_path / "budget"
    res = train(CMPOConfig(**common(total_steps=50, max_minutes=0.0, output_dir=str(out))),
                reward_fn=lambda r: frac_in_set(token_set, r), task=ToyTask())
    assert res["steps"] == 1 and res["checkpoint"].endswith("step-1")
