"""Critic-free policy optimisation: GRPO, Dr. GRPO, RLOO and REINFORCE++ in one loop (docs/grpo.md).

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

Independently of the advantage, ``loss`` picks the policy loss from ``rlhfkit.losses.policy.POLICY_LOSSES``
(PPO-clip, GSPO's sequence-level ratio, CISPO's clipped IS weight), and DAPO's dynamic sampling
(``dynamic_sampling``: train.dynamic_sampling) and overlong reward shaping (``overlong_buffer``) act
on the generate-and-score phase.
``rlhfkit rloo`` is this loop with RLOO's defaults (:class:`RLOOConfig`, a preset, not a copy).
The machinery (start, generate-and-score, optimize, log/eval/checkpoint) is shared: online.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlhfkit.losses.advantages import group_advantages, leave_one_out_advantages, reinforce_pp_advantages
from rlhfkit.losses.dapo import overlong_penalty
from rlhfkit.losses.kl import kl_per_token, kl_shaped_rewards
from rlhfkit.losses.policy import POLICY_LOSSES
from rlhfkit.ops import AGGREGATIONS, aggregate_loss, masked_mean, masked_sum
from rlhfkit.rollout.engine import Rollout
from rlhfkit.train import dynamic_sampling, online, online_rollout, runtime


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
    loss: str = "ppo_clip"
    """Policy loss (rlhfkit.losses.policy.POLICY_LOSSES): 'ppo_clip' (PPO's token-level clipped
    surrogate), 'gspo' (GSPO, Zheng et al. 2025: the length-normalised sequence ratio, clipped per
    sequence; the paper's clip range is clip_eps 3e-4 / clip_eps_high 4e-4), 'cispo' (CISPO,
    MiniMax-M1 2025: REINFORCE on every token weighted by the clipped, detached IS ratio; the paper
    has no lower bound, clip_eps 1.0). All three agree while the ratio is 1 (epochs_per_step 1)."""
    clip_eps: float = 0.2
    """Lower ratio clip 1 - clip_eps (and upper unless clip_eps_high is set), > 0. For 'gspo' it
    bounds the sequence ratio, for 'cispo' the IS weight (>= 1: no lower bound)."""
    clip_eps_high: float | None = None
    """Upper ratio clip 1 + clip_eps_high ('clip-higher', DAPO), > 0; None = clip_eps."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025, §3.2): drop groups whose K scores are all equal (no
    group advantage) and refill the batch from further prompts (train/dynamic_sampling.py). Needs K >= 2."""
    dynamic_sampling_rounds: int = 3
    """Most refill rounds per step (each generates prompts_per_step more groups), >= 0; when they run
    out the batch is topped up with dropped groups (logged as sampling/filler_frac)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (§3.4, eq. 13): the score ramps down linearly over the last
    this-many tokens before max_new_tokens (DAPO: 4096 of 20480, i.e. ~20%); 0 = off."""
    overlong_penalty: float = 1.0
    """The penalty at max_new_tokens (the ramp's depth; DAPO: 1.0), >= 0. Added to the score the
    advantage sees, after the EOS trick (a truncated completion gets both)."""
    beta: float = 0.04
    """KL coefficient (GRPO paper: 0.04)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator for the loss term (k3: unbiased and >= 0) or the reward."""
    lr: float = 2e-6
    """Policy learning rate."""

    def validate(self) -> None:
        super().validate()
        online.variant(ADVANTAGES, self.advantage, "advantage")
        online.variant(dict.fromkeys(AGGREGATIONS), self.aggregation, "aggregation")
        online.variant(POLICY_LOSSES, self.loss, "loss")
        online.require(self, "dynamic_sampling_rounds", self.dynamic_sampling_rounds >= 0, ">= 0")
        online.require(self, "overlong_buffer", 0 <= self.overlong_buffer <= self.max_new_tokens,
                       f"in [0, max_new_tokens={self.max_new_tokens}]")
        online.require(self, "overlong_penalty", self.overlong_penalty >= 0, ">= 0")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError(f"dynamic_sampling needs samples_per_prompt >= 2 (it drops groups whose scores are "
                             f"all equal), got {self.samples_per_prompt}")
        online.require(self, "clip_eps", self.clip_eps > 0, "> 0")
        online.require(self, "clip_eps_high", self.clip_eps_high is None or self.clip_eps_high > 0, "> 0 or None")
        if self.advantage != "reinforce_pp" and self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 for advantage='{self.advantage}' (a group baseline), "
                             f"got {self.samples_per_prompt}")

    def logps_from_training_pass(self, local_batch: int) -> bool:
        """One optimizer step per rollout batch and no KL in the reward: the policy at sampling time
        is the policy of the one training forward pass, so its detached log-probs serve as the old
        log-probs (ratio exactly 1) and the sampling-time forward pass is skipped."""
        one_step = self.epochs_per_step == 1 and (self.mini_batch_size is None or self.mini_batch_size >= local_batch)
        return one_step and not (self.kl_in_reward and self.beta > 0)


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


# ALGO LOGIC: the advantage variants. Each takes the (B,) scores, the (B, C) per-token KL when it goes
# into the reward (else None), the (B, C) completion mask, the config and the (B,) bool ``valid`` mask
# (False = unscored: left out of its group's baseline, advantage 0; None = all); returns (B, C) advantages.


def penalised(scores: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Sequence reward r - beta x sum_t KL_t (RLOO's KL in the reward); the scores when ``kl`` is None."""
    return scores if kl is None else scores - beta * masked_sum(kl, mask, dim=1)


def per_token(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage (B,) broadcast over each completion's tokens (B, C), 0 on padding."""
    return adv[:, None].expand(mask.shape) * mask


def grpo_advantages(scores, kl, mask, cfg: GRPOConfig, valid=None) -> torch.Tensor:
    # A_i = (r_i - mean_g) / (std_g + eps)   (DeepSeekMath §4.1.2, outcome supervision)
    return per_token(group_advantages(penalised(scores, kl, mask, cfg.beta), cfg.samples_per_prompt, scale=True,
                                      valid=valid), mask)


def dr_grpo_advantages(scores, kl, mask, cfg: GRPOConfig, valid=None) -> torch.Tensor:
    # A_i = r_i - mean_g: no std division, which up-weights too-easy and too-hard prompts (Dr. GRPO §3.1)
    return per_token(group_advantages(penalised(scores, kl, mask, cfg.beta), cfg.samples_per_prompt, scale=False,
                                      valid=valid), mask)


def rloo_advantages(scores, kl, mask, cfg: GRPOConfig, valid=None) -> torch.Tensor:
    # A_i = r_i - 1/(n-1) sum_{j != i, valid} r_j   (Ahmadian et al. 2024; Kool et al. 2019)
    return per_token(leave_one_out_advantages(penalised(scores, kl, mask, cfg.beta), cfg.samples_per_prompt,
                                              valid=valid), mask)


def reinforce_pp_token_advantages(scores, kl, mask, cfg: GRPOConfig, valid=None, reduce_sum=None) -> torch.Tensor:
    # per-token rewards (-beta KL_t, the score at the last token), returns-to-go, whitened over the batch
    # (no group baseline: an unscored row keeps its placeholder score and is left out of the loss by optimize)
    beta, kl = (cfg.beta, kl) if kl is not None else (0.0, torch.zeros(mask.shape, device=mask.device))
    return reinforce_pp_advantages(kl_shaped_rewards(scores, kl, mask, beta), mask, reduce_sum=reduce_sum)


ADVANTAGES = {"group": grpo_advantages, "dr_grpo": dr_grpo_advantages, "loo": rloo_advantages,
              "reinforce_pp": reinforce_pp_token_advantages}
"""``GRPOConfig.advantage`` -> its estimator."""


def compute_advantages(r: Rollout, cfg: GRPOConfig, reduce_sum=None) -> torch.Tensor:
    """Per-token advantages (B, C) of the variant named by ``cfg.advantage``; unscored samples
    (``r.extras['scored']`` False) are left out of their group's baseline and get advantage 0. ``reduce_sum``
    (sums over processes) makes REINFORCE++'s whitening global; the group estimators never need it."""
    estimator = online.variant(ADVANTAGES, cfg.advantage, "advantage")
    kl = kl_per_token(r.logps, r.ref_logps, cfg.kl_estimator) if cfg.kl_in_reward and cfg.beta > 0 else None
    valid = r.extras.get("scored")
    valid = None if valid is None else valid.bool().to(r.scores.device)
    if cfg.advantage == "reinforce_pp":  # whitened over the global batch, not a group within one process
        return estimator(r.scores.float(), kl, r.completion_mask, cfg, valid, reduce_sum=reduce_sum)
    return estimator(r.scores.float(), kl, r.completion_mask, cfg, valid)


def generate(s: online.Start, sampler, step: int, cfg: GRPOConfig, with_logps: bool, refill) -> tuple[Rollout, dict]:
    """Phase 2: K completions per prompt, scored (online_rollout.generate_and_score), then DAPO's
    overlong shaping; with dynamic sampling, refill rounds from the ``refill`` prompt stream until
    every group's scores differ (dynamic_sampling.fill). Returns the batch and the phase's metrics."""
    def scored(round_: int) -> Rollout:
        if round_ == 0:
            r = online_rollout.generate_and_score(s, sampler, step, cfg, with_logps=with_logps)
        else:  # a refill round: the refill stream's prompts, with a seed no real step uses
            at = dynamic_sampling.refill_index(step, round_, cfg.dynamic_sampling_rounds)
            r = online_rollout.generate_and_score(dataclasses.replace(s, stream=refill), sampler,
                                                  dynamic_sampling.REFILL_OFFSET + at, cfg, with_logps=with_logps)
        if cfg.overlong_buffer:  # DAPO eq. 13: ramp to -overlong_penalty at max_new_tokens
            penalty = overlong_penalty(r.completion_mask.sum(1), cfg.max_new_tokens, cfg.overlong_buffer,
                                       cfg.overlong_penalty)
            r.scores = r.scores + penalty.to(r.scores.device, r.scores.dtype)
            r.extras["overlong_penalty"] = penalty.cpu()
        return r

    if cfg.dynamic_sampling:
        r, metrics = dynamic_sampling.fill(scored, s.local_prompts, cfg.samples_per_prompt,
                                           cfg.dynamic_sampling_rounds, s.tok.pad_token_id)
    else:
        r, metrics = scored(0), {}
    if cfg.overlong_buffer:
        metrics["reward/overlong_penalty"] = r.extras["overlong_penalty"].mean().item()
    return r, metrics


def policy_loss(policy, mb: Rollout, adv: torch.Tensor, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """The policy loss named by ``cfg.loss`` (+ beta x KL loss term unless the KL is in the reward) on
    one micro-batch."""
    loss_fn = online.variant(POLICY_LOSSES, cfg.loss, "loss")
    logps, entropy = cfg.logps(policy, mb, with_entropy=True)
    mask = mb.completion_mask
    old = mb.logps if mb.logps is not None else logps.detach()  # see GRPOConfig.logps_from_training_pass
    loss, metrics = loss_fn(logps, old, adv, mask, cfg.clip_eps, cfg.clip_eps_high, cfg.aggregation, cfg.max_new_tokens,
                            is_weights=online_rollout.is_weights(cfg, mb, old))  # sampler correction (fast, vllm)
    if mb.logps is None:
        metrics[online.TRAINING_LOGPS] = logps.detach()
    if cfg.beta > 0 and not cfg.kl_in_reward:
        kl = kl_per_token(logps, mb.ref_logps, cfg.kl_estimator)
        kl_loss = aggregate_loss(kl, mask, cfg.aggregation, cfg.max_new_tokens)
        loss = loss + cfg.beta * kl_loss
        metrics["loss/kl"] = kl_loss.detach()
    metrics["policy/entropy"] = masked_mean(entropy, mask).detach()
    return loss, metrics


def train(cfg: GRPOConfig, reward_fn=None, task=None, prompts=None) -> dict:
    """Run the loop (GRPO, or RLOO given an RLOOConfig). Python API extras: ``reward_fn(rollout) ->
    Tensor (B,)`` replaces the configured reward, ``task`` (an object with ``prompts(split)`` and
    ``gold(prompts, completions)``) replaces the built-in task named by ``cfg.task``."""
    method = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    # 1. runtime, task, policy + frozen reference, reward; optimizer and LR schedule over the policy
    s = online.start(cfg, reward_fn, task, prompts)
    acc = s.acc
    opt = runtime.adamw(s.policy.parameters(), acc, cfg.lr, cfg.adam_eps)
    sched = runtime.make_scheduler(opt, cfg.lr_schedule, cfg.warmup_steps, s.total)
    policy, opt = acc.prepare(s.policy, opt)
    sampler = online_rollout.make_sampler(cfg, acc.unwrap_model(policy), s.tok, str(s.ckpt or cfg.model))
    loop, _ = online.begin(cfg, s, method, opt, sched, eval_hook=lambda: s.held_out(sampler),
                           sampler=sampler)
    from_training = cfg.logps_from_training_pass(s.local_prompts * cfg.samples_per_prompt)
    refill = online_rollout.PromptStream(s.stream.prompts, dynamic_sampling.refill_seed(cfg.seed))

    while loop.step < loop.total:
        with runtime.Timer() as t:
            # 2. generate K completions for each of this process's prompts; score them (DAPO: shape, filter, refill)
            r, sampling_metrics = generate(s, sampler, loop.step, cfg, not from_training, refill)
            # 3. advantages, per group of K (a group never spans processes: no gather needed; REINFORCE++
            # whitens over the global batch through acc.reduce)
            adv = compute_advantages(r, cfg, lambda t: acc.reduce(t, "sum"))
            # 4. optimize the policy loss named by cfg.loss; the sampler gets the new weights
            policy.train()
            metrics = online.optimize([policy], opt, r, adv, lambda mb, a: policy_loss(policy, mb, a, cfg),
                                      cfg, acc, loop.step)
            metrics.update(sampling_metrics)
            sched.step()
            online_rollout.sync_sampler(sampler, acc, policy)
        # 5. log, eval, samples, checkpoint (the policy alone)
        if online.end_of_step(loop, r, metrics, t.seconds, models={"policy": policy}, state={}):
            break
    return online.finish(loop)
