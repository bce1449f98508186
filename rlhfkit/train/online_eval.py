"""The held-out eval hook every online method runs at step 0, every ``eval_every`` steps and at the end."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from rlhfkit.rollout import rewards
from rlhfkit.rollout.engine import Sampler

if TYPE_CHECKING:  # annotations only: online.py imports this module
    from rlhfkit.train.online import OnlineConfig

EVAL_SEED = 12345
"""Seed of every eval's sampling. Fixed, and the same in every run whatever ``cfg.seed``: successive
evals (and runs with different training seeds) then draw with the same random numbers, so their
differences come from the policy, not from sampling noise (common random numbers). The value itself
is arbitrary."""


class HeldOutEval:
    """The eval hook: gold reward, proxy reward and KL(policy || reference) on a fixed held-out prompt set.

    Sampled at the training temperature with :data:`EVAL_SEED`, so successive evals differ only by the
    policy. KL is the sequence-level estimate mean_y[log pi(y) - log pi_ref(y)], y ~ pi. The first
    call's per-prompt gold rewards (the starting policy's, in a run that does not resume) are the
    baseline of every later call's ``eval/win_rate_start``: the fraction of prompts whose reply scores
    a higher gold reward than the first eval's reply to the same prompt, ties counted half.
    """

    def __init__(self, ref_model, reward: rewards.RewardSource, task, prompts: list, cfg: OnlineConfig):
        self.ref_model, self.reward, self.task, self.prompts, self.cfg = ref_model, reward, task, prompts, cfg
        self.start_gold: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, sampler: Sampler) -> dict:
        r = sampler.sample(self.prompts, seed=EVAL_SEED)
        gold = rewards.task_gold(self.task, r).float()
        proxy = gold if self.reward.uses_gold_only else self.reward(r)
        out = {"eval/gold": gold.mean().item(), "eval/proxy": proxy.mean().item(),
               "eval/length": r.completion_mask.sum(1).float().mean().item()}
        if self.start_gold is None:
            self.start_gold = gold
        else:
            wins = (gold > self.start_gold).float() + 0.5 * (gold == self.start_gold).float()
            out["eval/win_rate_start"] = wins.mean().item()
        if self.ref_model is not None:
            ref = self.cfg.logps(self.ref_model, r)
            kl = ((r.logps - ref) * r.completion_mask).sum(1).mean().item()
            out["eval/kl"] = kl
            out["eval/sqrt_kl"] = math.sqrt(max(kl, 0.0))
        return out
