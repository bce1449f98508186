"""Critic-free policy optimisation: GRPO, Dr. GRPO, RLOO and REINFORCE++ in one loop.

The four differ only in the advantage estimate and where the KL penalty goes, so they share this
module and pick the differences by name (``advantage``, ``kl_in_reward``, ``aggregation``):

=============  ==============================================  ======================  ==============
method         advantage of completion i in its group of K      KL to the reference     aggregation
=============  ==============================================  ======================  ==============
GRPO           (r_i - mean_g) / (std_g + eps)                  k3 loss term (beta)     seq_mean
Dr. GRPO       r_i - mean_g                                    k3 loss term            dr_grpo
RLOO           r_i - mean of the other K-1 (r includes -beta   in the reward           token_mean
               x sequence KL)
REINFORCE++    per-token returns, whitened over the batch      in the reward           token_mean
=============  ==============================================  ======================  ==============

Sources: GRPO — Shao et al. 2024 (DeepSeekMath) §4.1; Dr. GRPO — Liu et al. 2025 ("Understanding
R1-Zero-Like Training"); RLOO — Ahmadian et al. 2024 ("Back to Basics"); REINFORCE++ — Hu 2025.
``rlhfkit rloo`` is this loop with RLOO's defaults (:class:`RLOOConfig`, a preset, not a copy).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhfkit.losses.advantages import group_advantages, leave_one_out_advantages, reinforce_pp_advantages
from rlhfkit.losses.kl import kl_per_token, kl_shaped_rewards
from rlhfkit.losses.ppo import ppo_policy_loss
from rlhfkit.ops import AGGREGATIONS, aggregate_loss, exact_div, masked_mean
from rlhfkit.rollout.engine import Rollout
from rlhfkit.train import online, runtime

ADVANTAGES = ("group", "dr_grpo", "loo", "reinforce_pp")
TRAINING_LOGPS = "_training_logps"
"""Key under which a loss returns the micro-batch's detached log-probs for a rollout sampled without them."""


@dataclass
class GRPOConfig(online.OnlineConfig):
    samples_per_prompt: int = 4
    """K completions per prompt forming one group (>= 2)."""
    advantage: str = "group"
    """'group' (GRPO), 'dr_grpo' (group mean baseline, no std scaling), 'loo' (RLOO leave-one-out),
    'reinforce_pp' (REINFORCE++ global batch normalisation of per-token returns)."""
    aggregation: str = "seq_mean"
    """How per-token losses reduce: 'seq_mean' (GRPO paper), 'token_mean' (DAPO), 'dr_grpo' (sum / max_new_tokens)."""
    kl_in_reward: bool = False
    """Put -beta x KL into the reward (RLOO, REINFORCE++) instead of a k3 loss term (GRPO)."""
    clip_eps: float = 0.2
    """PPO ratio clip (lower, and upper unless clip_eps_high is set)."""
    clip_eps_high: float | None = None
    """Upper ratio clip ('clip-higher', DAPO); None = clip_eps."""
    beta: float = 0.04
    """KL coefficient (GRPO paper: 0.04)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator for the loss term (k3: unbiased and >= 0) or the reward."""
    lr: float = 2e-6
    """Policy learning rate."""

    def validate(self) -> None:
        super().validate()
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.advantage != "reinforce_pp" and self.samples_per_prompt < 2:
            raise ValueError(f"advantage='{self.advantage}' needs samples_per_prompt >= 2 (a group baseline)")

    def logps_from_training_pass(self, local_batch: int) -> bool:
        """One optimizer step per rollout batch and no KL in the reward: the policy at sampling time
        is the policy of the one training forward pass, so its detached log-probs serve as the old
        log-probs (ratio exactly 1) and the sampling-time forward pass is skipped."""
        one_step = self.epochs_per_step == 1 and (self.mini_batch_size is None or self.mini_batch_size >= local_batch)
        return one_step and not (self.kl_in_reward and self.beta > 0)


def compute_advantages(r: Rollout, cfg: GRPOConfig) -> torch.Tensor:
    """Per-token advantages (B, C); sequence-level estimates are broadcast over the completion."""
    mask = r.completion_mask
    scores = r.scores.float()
    if cfg.kl_in_reward and cfg.beta > 0:
        kl = kl_per_token(r.logps, r.ref_logps, cfg.kl_estimator)
        if cfg.advantage == "reinforce_pp":
            rewards = kl_shaped_rewards(scores, kl, mask, cfg.beta)
            return reinforce_pp_advantages(rewards, mask)
        scores = scores - cfg.beta * (kl * mask).sum(1)
    k = cfg.samples_per_prompt
    if cfg.advantage == "group":
        adv = group_advantages(scores, k, scale=True)
    elif cfg.advantage == "dr_grpo":
        adv = group_advantages(scores, k, scale=False)
    elif cfg.advantage == "loo":
        adv = leave_one_out_advantages(scores, k)
    else:
        rewards = kl_shaped_rewards(scores, torch.zeros(mask.shape, device=mask.device), mask, 0.0)
        return reinforce_pp_advantages(rewards, mask)
    return adv[:, None].expand(mask.shape) * mask


def policy_loss(policy, mb: Rollout, adv: torch.Tensor, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (+ k3 KL loss term unless the KL is in the reward) on one micro-batch."""
    logps, entropy = cfg.logps(policy, mb, with_entropy=True)
    mask = mb.completion_mask
    old = mb.logps if mb.logps is not None else logps.detach()  # see GRPOConfig.logps_from_training_pass
    loss, metrics = ppo_policy_loss(logps, old, adv, mask, cfg.clip_eps, cfg.clip_eps_high,
                                    aggregation=cfg.aggregation, max_tokens=cfg.max_new_tokens)
    if mb.logps is None:
        metrics[TRAINING_LOGPS] = logps.detach()
    if cfg.beta > 0 and not cfg.kl_in_reward:
        kl = kl_per_token(logps, mb.ref_logps, cfg.kl_estimator)
        kl_loss = aggregate_loss(kl, mask, cfg.aggregation, cfg.max_new_tokens)
        loss = loss + cfg.beta * kl_loss
        metrics["loss/kl"] = kl_loss.detach()
    metrics["policy/entropy"] = masked_mean(entropy, mask).detach()
    return loss, metrics


def optimize(models: list, opt, r: Rollout, adv: torch.Tensor, cfg, acc, loss_fn) -> dict:
    """``epochs_per_step`` passes of mini-batch updates over one rollout batch, micro-batched, with
    gradients synchronised across processes only on a mini-batch's last micro-batch. Each micro-batch's
    loss is weighted by its share of the mini-batch's sequences."""
    n = r.completion_ids.shape[0]
    mini = cfg.mini_batch_size or n
    exact_div(n, mini, "rollout batch per process / mini_batch_size")
    sums: dict[str, float] = {}
    count = 0
    fresh = torch.zeros(r.completion_ids.shape, device=r.completion_ids.device) if r.logps is None else None
    gen = torch.Generator().manual_seed(cfg.seed + int(r.completion_ids.sum().item()) % 10_000)
    for _ in range(cfg.epochs_per_step):
        perm = torch.randperm(n, generator=gen)
        for m0 in range(0, n, mini):
            idx = perm[m0:m0 + mini]
            micros = [idx[i:i + cfg.micro_batch_size] for i in range(0, len(idx), cfg.micro_batch_size)]
            for j, mi in enumerate(micros):
                mi = mi.to(r.completion_ids.device)
                with contextlib.ExitStack() as stack:
                    if j < len(micros) - 1:
                        for m in models:
                            stack.enter_context(acc.no_sync(m))
                    loss, metrics = loss_fn(r.select(mi), adv[mi])
                    acc.backward(loss * len(mi) / len(idx))
                if TRAINING_LOGPS in metrics:
                    fresh[mi] = metrics.pop(TRAINING_LOGPS).float()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            if cfg.grad_clip > 0:
                sums["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) + float(
                    acc.clip_grad_norm_([p for m in models for p in m.parameters()], cfg.grad_clip)) * len(micros)
            opt.step()
            opt.zero_grad(set_to_none=True)
    if fresh is not None:  # the sampling-time log-probs, taken from the training pass (for the KL metrics)
        r.logps = fresh
    return {k: v / max(count, 1) for k, v in sums.items()}


@dataclass
class RLOOConfig(GRPOConfig):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE with a leave-one-out baseline over K
    samples per prompt, the KL penalty folded into the sequence reward."""

    advantage: str = "loo"
    """Leave-one-out baseline: A_i = r_i - mean of the other K-1 rewards of the prompt."""
    kl_in_reward: bool = True
    """RLOO subtracts beta x (sequence KL to the reference) from each reward before the baseline."""
    kl_estimator: str = "k1"
    """k1 summed over the sequence: the standard sequence-level KL estimate for the reward."""
    aggregation: str = "token_mean"
    """Per-token loss reduction."""
    beta: float = 0.05
    """KL coefficient in the reward."""


def train(cfg: GRPOConfig, reward_fn=None, task=None) -> dict:
    """Run the loop (GRPO, or RLOO given an RLOOConfig). Python API extras: ``reward_fn(rollout) -> Tensor (B,)`` replaces the configured
    reward, ``task`` (an object with ``prompts(split)`` and ``gold(prompts, completions)``) replaces
    the built-in task named by ``cfg.task``."""

    method = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    # 1. runtime, task, models, optimizer
    s = online.start(cfg, reward_fn, task)
    acc, ckpt, task, ref, tok, reward, total = s.acc, s.ckpt, s.task, s.ref, s.tok, s.reward, s.total
    opt = runtime.adamw(s.policy.parameters(), acc, cfg.lr, cfg.adam_eps)
    sched = runtime.make_scheduler(opt, cfg.lr_schedule, cfg.warmup_steps, total)
    policy, opt = acc.prepare(s.policy, opt)
    ref.to(acc.device)
    sampler = online.make_sampler(cfg, acc.unwrap_model(policy), tok, str(ckpt or cfg.model))
    held_out = online.HeldOutEval(ref, reward, task, s.eval_prompts, cfg)
    step, _ = runtime.restore(ckpt, opt, sched, acc.process_index)
    run = runtime.open_run(cfg, method, acc, total)
    run.advance(step)
    result: dict = {"run_dir": str(run.path)}
    if step == 0 and cfg.eval_every:
        result["eval_start"] = held_out(sampler)
        run.log(0, result["eval_start"])

    budget = online.Budget(cfg.max_minutes)
    from_training = cfg.logps_from_training_pass(s.local_prompts * cfg.samples_per_prompt)
    while step < total:
        with runtime.Timer() as t:
            # 2. generate and score this process's share of the prompts
            prompts = online.local_batch(s, step, cfg)
            r = online.generate_and_score(sampler, prompts, cfg.samples_per_prompt, ref, reward, task, cfg,
                                          seed=cfg.seed * 100_003 + step * 101 + acc.process_index,
                                          with_logps=not from_training)
            # 3. advantages
            adv = compute_advantages(r, cfg)
            # 4. optimize
            policy.train()
            metrics = optimize([policy], opt, r, adv, cfg, acc, lambda mb, a: policy_loss(policy, mb, a, cfg))
            sched.step()
            sampler.backend.sync_weights(acc.unwrap_model(policy))
        step += 1
        last = step == total or budget.spent(acc)
        # 5. log (means over processes)
        metrics.update(online.rollout_metrics(r))
        metrics = {k: acc.reduce(torch.tensor(float(v), device=acc.device), "mean").item() for k, v in metrics.items()}
        tokens = int(r.completion_mask.sum()) * acc.num_processes
        metrics.update(runtime.perf_metrics(tokens, t.seconds, acc))
        metrics["optim/lr"] = sched.get_last_lr()[0]
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            metrics.update(held_out(sampler))
            result["eval_end"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if step % cfg.log_every == 0 or last:
            run.log(step, metrics)
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            run.log_samples(step, online.sample_rows(r))
        run.advance()
        # 6. checkpoint
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            result["checkpoint"] = str(runtime.save_checkpoint(acc, run, step, {"policy": policy}, tok, opt, sched, {}))
        if last:
            break
    run.close()
    result["steps"] = step
    result["last"] = metrics
    return result

