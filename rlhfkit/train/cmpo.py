"""CMPO: Muesli's clipped-MPO regularised policy optimisation (Hessel et al. 2021, arXiv 2104.06159)
adapted to RLHF, critic-free, one completion = one action. docs/cmpo.md derives the loss and lists
every departure from the paper.

Per step: K completions per prompt are sampled from the *prior* π_prior (a target network: an EMA of
the policy's parameters, a second model copy that the sampler uses) -> scores -> leave-one-out
advantages A -> running scale σ̂ (bias-corrected RMS of A) -> CMPO target weights
``w_k = softmax_k(clip(A_k/σ̂, -c, c))`` over each prompt's K samples -> loss per token

    PPO-clip(ratio π_θ/π_prior, advantage A/σ̂)  +  λ · (-Σ_k w_k log π_θ(y_k|x))  +  β · KL_k3(π_θ || π_ref)

-> after every optimizer update, π_prior <- (1 - α) π_prior + α π_θ (α = ``prior_ema``).

The loop is grpo.py's, phase for phase, on online.py's shared machinery (start, generate-and-score,
optimize, log/eval/checkpoint); the prior is built on top of ``online.start``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from rlhfkit.losses.advantages import leave_one_out_advantages
from rlhfkit.losses.cmpo import RunningScale, cmpo_regulariser, cmpo_weight_metrics, cmpo_weights, ema_update
from rlhfkit.losses.kl import kl_per_token
from rlhfkit.losses.ppo import ppo_policy_loss
from rlhfkit.models import load_model
from rlhfkit.models.lora import is_adapter_dir, load_adapter_weights
from rlhfkit.ops import AGGREGATIONS, aggregate_loss, masked_mean, masked_sum
from rlhfkit.rollout.engine import HFBackend, Rollout, Sampler
from rlhfkit.train import online, online_rollout, runtime
from rlhfkit.train.online_eval import HeldOutEval


@dataclass
class CMPOConfig(online.OnlineConfig):
    samples_per_prompt: int = 4
    """K completions per prompt, sampled from the prior; the CMPO target is a distribution over them
    and the leave-one-out baseline needs K >= 2. Typical 4-16 (Muesli samples 16 actions for its KL)."""
    lam: float = 1.0
    """λ, weight of the CMPO regulariser KL(π_CMPO || π_θ) (Muesli §4). 0 leaves the PPO-clipped
    policy gradient against the prior alone; typical 0.5-2."""
    c: float = 1.0
    """Clip of the normalised advantage in the target, exp(clip(A/σ̂, -c, c)) (Muesli: c = 1). It bounds
    how far the target sits from the prior, TV <= tanh(c/2) (0.46 at c = 1), and no sample's weight
    can exceed e^{2c}/(e^{2c}+K-1). Typical 0.5-2."""
    prior_ema: float = 0.1
    """α, the prior's EMA rate: after each optimizer update prior <- (1 - α) prior + α policy
    (Muesli's target network rate, 0.1 in the paper as we read it). 1 = the prior is the latest
    policy; smaller = a slower, more conservative behaviour policy. Typical 0.05-0.5."""
    sigma_decay: float = 0.99
    """Decay d of the EMA of mean(A²) behind σ̂, bias-corrected like Adam (Muesli's β_var). 0 = the
    current batch's RMS."""
    sigma_eps: float = 1e-8
    """Offset under the square root of σ̂ (reward units squared), so all-equal rewards divide by ~1e-4, not 0."""
    clip_eps: float = 0.2
    """PPO clip of the per-token ratio π_θ/π_prior in the policy-gradient term."""
    aggregation: str = "seq_mean"
    """Reduction of per-token PG and KL losses: 'seq_mean' (matches the length-normalised CMPO term),
    'token_mean' or 'dr_grpo' (see rlhfkit.ops.aggregate_loss)."""
    length_normalise: bool = True
    """Divide each log π_θ(y_k|x) in the CMPO term by the completion's length: a per-token
    cross-entropy, the same scale as the PG term whatever max_new_tokens is. False = the paper's
    sequence-level KL (the term then grows with completion length)."""
    beta: float = 0.04
    """Per-token KL penalty to the reference (starting) model, a k3 loss term as in GRPO (0 disables
    the penalty; the eval hook still reports KL)."""
    kl_estimator: str = "k3"
    """Per-token estimator of KL(π_θ || π_ref) for the penalty (k3: unbiased and >= 0)."""
    lr: float = 2e-6
    """Policy learning rate (AdamW), as GRPO."""

    def validate(self) -> None:
        super().validate()
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 for CMPO, got {self.samples_per_prompt} (a target "
                             "over one sample is trivial and the leave-one-out baseline needs the other K-1)")
        online.require(self, "lam", self.lam >= 0, ">= 0")
        online.require(self, "c", self.c > 0, "> 0")
        online.require(self, "prior_ema", 0 < self.prior_ema <= 1, "in (0, 1] (0 would freeze the prior)")
        online.require(self, "sigma_decay", 0 <= self.sigma_decay < 1, "in [0, 1)")
        online.require(self, "sigma_eps", self.sigma_eps >= 0, ">= 0")
        online.require(self, "clip_eps", self.clip_eps > 0, "> 0")
        online.variant(dict.fromkeys(AGGREGATIONS), self.aggregation, "aggregation")


def cmpo_targets(scores: torch.Tensor, k: int, scale: RunningScale, c: float,
                 reduce=lambda x: x, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Leave-one-out advantages A (B,) of consecutive groups of K, folded into σ̂ (``reduce`` averages
    mean(A²) over processes so every process divides by the same σ̂), then the normalised advantage
    A/σ̂ (B,) for the PG term and the target weights w (B,), ``softmax_k(clip(A/σ̂, -c, c))`` per group.
    Also returns the ``cmpo/`` metrics (sigma, weight_entropy, weight_max, clip_frac_adv). ``valid`` (B,)
    bool (``r.extras['scored']``): an unscored sample is left out of its group's baseline and gets A = 0."""
    adv = leave_one_out_advantages(scores.float(), k, valid=valid)
    sigma = scale.update(reduce(adv.pow(2).mean()).item())
    weights = cmpo_weights(adv.view(-1, k), sigma, c)  # (B/K, K)
    metrics = {"cmpo/sigma": sigma, **cmpo_weight_metrics(adv.view(-1, k), weights, sigma, c)}
    return adv / sigma, weights.reshape(-1), metrics


def cmpo_loss(policy, mb: Rollout, adv: torch.Tensor, cfg: CMPOConfig) -> tuple[torch.Tensor, dict]:
    """PPO-clip against the prior + λ CMPO cross-entropy + β k3 KL to the reference, on one micro-batch.

    ``mb.logps`` are the prior's per-token log-probs at sampling time (the behaviour policy), ``adv``
    (B, C) the normalised advantage A/σ̂ per token, ``mb.extras['cmpo_weights']`` (B,) each sample's
    target weight w within its prompt.
    """
    mask = mb.completion_mask
    logps, entropy = cfg.logps(policy, mb, with_entropy=True)
    loss, metrics = ppo_policy_loss(logps, mb.logps, adv, mask, cfg.clip_eps, aggregation=cfg.aggregation,
                                    max_tokens=cfg.max_new_tokens, is_weights=online_rollout.is_weights(cfg, mb, mb.logps))
    seq_logps = masked_sum(logps, mask, dim=1)  # (B,)
    lengths = mask.sum(1)[:, None] if cfg.length_normalise else None
    # A micro-batch holds any subset of the groups' samples: pass it as (B, 1) with weights K·w; the
    # term is linear in each log-prob, so the micro-batch means add up to the (N, K) loss.
    k_w = cfg.samples_per_prompt * mb.extras["cmpo_weights"][:, None]
    reg, reg_metrics = cmpo_regulariser(seq_logps[:, None], k_w, lengths)
    loss = loss + cfg.lam * reg
    metrics.update(reg_metrics)
    if cfg.beta > 0:
        kl = kl_per_token(logps, mb.ref_logps, cfg.kl_estimator)
        kl_loss = aggregate_loss(kl, mask, cfg.aggregation, cfg.max_new_tokens)
        loss = loss + cfg.beta * kl_loss
        metrics["loss/kl"] = kl_loss.detach()
    metrics["policy/entropy"] = masked_mean(entropy, mask).detach()
    return loss, metrics


class PriorTrackingOptimizer:
    """The optimizer as ``optimize`` sees it, with the prior's EMA after every ``step()``, so that
    "after each optimizer update" holds for any number of mini-batches and epochs per step."""

    def __init__(self, opt, prior, policy, rate: float):
        targets, onlines = dict(prior.named_parameters()), dict(policy.named_parameters())
        if list(targets) != list(onlines):
            raise ValueError("prior and policy must be copies of one architecture (parameter names differ)")
        self.opt, self.rate = opt, rate
        self.targets, self.onlines = list(targets.values()), list(onlines.values())

    def step(self) -> None:
        self.opt.step()
        ema_update(self.targets, self.onlines, self.rate)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)


def load_prior(policy, ckpt, seed: int):
    """π_prior: a copy of the starting policy, or the checkpoint's ``prior/`` when resuming; frozen
    (it moves only by :class:`PriorTrackingOptimizer`'s EMA)."""
    if ckpt is None:
        prior = copy.deepcopy(policy)
    elif is_adapter_dir(ckpt / "prior"):  # LoRA: the prior is the same base with its own adapter
        prior = copy.deepcopy(policy)
        load_adapter_weights(prior, ckpt / "prior")
    elif (ckpt / "prior").exists():
        prior, _ = load_model(str(ckpt / "prior"), seed=seed)
    else:
        raise FileNotFoundError(f"resume: {ckpt} has no prior/ sub-folder; resume CMPO only from a CMPO checkpoint")
    return prior.eval().requires_grad_(False)


def eval_policy_not_prior(cfg: CMPOConfig, policy, prior, sampler: Sampler, held_out: HeldOutEval) -> dict:
    """The eval hook on π_θ (the checkpoint's policy), not on the prior that samples training data.
    HF: a sampler over the policy. vLLM: the one engine gets the policy's weights, then the prior's back."""
    shared = None if isinstance(sampler.backend, HFBackend) else sampler.backend
    eval_sampler = Sampler(policy, sampler.tok, cfg.sampling(), backend=shared, max_prompt_length=cfg.max_prompt_length,
                           layout=cfg.layout())
    eval_sampler.backend.sync_weights(policy)
    out = held_out(eval_sampler)
    sampler.backend.sync_weights(prior)
    return out


def train(cfg: CMPOConfig, reward_fn=None, task=None, prompts=None) -> dict:
    """Run CMPO. Python API extras as in grpo.train: ``reward_fn(rollout) -> Tensor (B,)`` replaces the
    configured reward, ``task`` replaces the built-in task named by ``cfg.task``."""
    k = cfg.samples_per_prompt
    # 1. runtime, task, policy + frozen reference, reward (online.start); the prior, the optimizer, σ̂
    s = online.start(cfg, reward_fn, task, prompts)
    acc = s.acc
    prior = load_prior(s.policy, s.ckpt, cfg.seed).to(acc.device)
    opt = runtime.adamw(s.policy.parameters(), acc, cfg.lr, cfg.adam_eps)
    sched = runtime.make_scheduler(opt, cfg.lr_schedule, cfg.warmup_steps, s.total)
    policy, opt = acc.prepare(s.policy, opt)
    tracked_opt = PriorTrackingOptimizer(opt, prior, acc.unwrap_model(policy), cfg.prior_ema)
    scale = RunningScale(cfg.sigma_decay, cfg.sigma_eps)
    sampler = online_rollout.make_sampler(cfg, prior, s.tok, str(s.ckpt / "prior" if s.ckpt else cfg.model))
    loop, state = online.begin(cfg, s, "cmpo", opt, sched, eval_hook=lambda: eval_policy_not_prior(
        cfg, acc.unwrap_model(policy), prior, sampler, s.held_out), sampler=sampler)
    if state:
        scale.load_state_dict(state["sigma"])

    while loop.step < loop.total:
        with runtime.Timer() as t:
            # 2. generate from the prior and score; r.logps are the prior's (the behaviour policy's)
            r = online_rollout.generate_and_score(s, sampler, loop.step, cfg)
            # ALGO LOGIC
            # 3-4. leave-one-out advantages / running σ̂, CMPO target weights over each prompt's K samples
            adv, r.extras["cmpo_weights"], cmpo_metrics = cmpo_targets(
                r.scores, k, scale, cfg.c, lambda x: acc.reduce(x, "mean"),
                valid=r.extras["scored"].bool().to(r.scores.device))
            token_adv = adv[:, None].expand_as(r.logps) * r.completion_mask
            # 5. optimize; the prior follows the policy after every update (PriorTrackingOptimizer)
            policy.train()
            metrics = online.optimize([policy], tracked_opt, r, token_adv, lambda mb, a: cmpo_loss(policy, mb, a, cfg),
                                      cfg, acc, loop.step)
            sched.step()
            sampler.backend.sync_weights(prior)
        # 6. log, eval (of the policy), samples, checkpoint: the policy at the top (plain HF), the prior in
        # prior/, σ̂ in the trainer state
        metrics.update(cmpo_metrics)
        if online.end_of_step(loop, r, metrics, t.seconds, models={"policy": policy, "prior": prior},
                              state={"sigma": scale.state_dict()}):
            break
    return online.finish(loop)
