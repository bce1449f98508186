"""The held-out eval hook every online method runs at step 0, every ``eval_every`` steps and at the end."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from rlhfkit.models.lora import reference_model
from rlhfkit.rollout import rewards
from rlhfkit.rollout.engine import Sampler
from rlhfkit.rollout.reward_components import task_gold
from rlhfkit.train.online_rollout import component_metrics
from rlhfkit.train.sharding import full_parameters

if TYPE_CHECKING:  # annotations only: online.py imports this module
    from rlhfkit.train.online_config import OnlineConfig

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

    Without a task (your own prompts), there is no gold: ``eval/reward`` (the configured reward, mean
    over the scored replies), ``eval/reward/<name>/mean`` and ``/none_frac`` per component, and the
    win rate is on the configured reward (an unscored reply counts as a tie).
    With no held-out prompts (``eval_fraction`` 0) the hook reports nothing.
    """

    acc = None
    """The accelerator that prepared the policy, or None: only FSDP1 needs it (to find the root wrapper
    of the sampler's unwrapped model); plain, DDP, FSDP2 and ZeRO-3 are read from the model itself."""

    def __init__(self, ref_model, reward: rewards.RewardSource, task, prompts: list, cfg: OnlineConfig):
        self.ref_model, self.reward, self.task, self.prompts, self.cfg = ref_model, reward, task, prompts, cfg
        self.start_gold: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, sampler: Sampler) -> dict:
        if not self.prompts:
            return {}
        with full_parameters(self.acc, sampler.model):  # FSDP / ZeRO-3: gathered weights (train/sharding.py)
            r = sampler.sample([row.messages for row in self.prompts], seed=EVAL_SEED)
        r.extras["rows"] = list(self.prompts)
        out = {"eval/length": r.completion_mask.sum(1).float().mean().item()}
        if self.task is not None:
            gold = task_gold(self.task, r).float()
            proxy = gold if self.reward.uses_gold_only else self.reward(r)
            out["eval/gold"] = gold.mean().item()
            out["eval/proxy"] = nanmean(proxy)
            if not self.reward.uses_gold_only:
                out.update(component_metrics(self.reward.last_parts, "eval/reward"))
        else:
            proxy = self.reward(r)
            gold = proxy  # the configured reward is the yardstick of the win rate
            out["eval/reward"] = nanmean(proxy)
            out.update(component_metrics(self.reward.last_parts, "eval/reward"))
        if self.start_gold is None:
            self.start_gold = gold
        else:
            now, then = gold.nan_to_num(0.0), self.start_gold.nan_to_num(0.0)
            wins = (now > then).float() + 0.5 * (now == then).float()
            out["eval/win_rate_start"] = wins.mean().item()
        if self.ref_model is not None:
            with reference_model(self.ref_model) as ref_model:  # LoRA: the policy with its adapter off
                ref = self.cfg.logps(ref_model, r)
            kl = ((r.logps - ref) * r.completion_mask).sum(1).mean().item()
            out["eval/kl"] = kl
            out["eval/sqrt_kl"] = math.sqrt(max(kl, 0.0))
        return out


def nanmean(x: torch.Tensor) -> float:
    """Mean over the non-NaN entries (the scored replies); 0 when there are none."""
    ok = ~x.isnan()
    return x[ok].mean().item() if bool(ok.any()) else 0.0
