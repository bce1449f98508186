"""GRPO's advantage variants (rlhfkit.train.grpo.ADVANTAGES): each name runs its own estimator from
rlhfkit.losses.advantages, the KL goes into the reward only when asked, and an unknown name is an
error (it used to fall through to REINFORCE++). Learning and resume: tests/train/test_online.py."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.losses.advantages import group_advantages, leave_one_out_advantages, reinforce_pp_advantages
from rlhfkit.losses.kl import kl_shaped_rewards
from rlhfkit.rollout.engine import Rollout
from rlhfkit.train import grpo

SCORES = torch.tensor([1.0, 0.0, 2.0, 2.0])  # two groups of K = 2
MASK = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])


def rollout(logps=None, ref_logps=None) -> Rollout:
    return Rollout(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
                   completion_ids=torch.zeros(4, 3, dtype=torch.long), completion_mask=MASK, scores=SCORES,
                   logps=logps, ref_logps=ref_logps)


def test_the_table_names_exactly_the_documented_variants():
    assert list(grpo.ADVANTAGES) == ["group", "dr_grpo", "loo", "reinforce_pp"]


@pytest.mark.parametrize("name,expected", [
    # group 1: scores (1, 0): mean 0.5, std 0.7071 -> ±0.5 / (0.7071 + 1e-4); group 2: equal scores -> 0
    ("group", group_advantages(SCORES, 2, scale=True)),
    ("dr_grpo", torch.tensor([0.5, -0.5, 0.0, 0.0])),
    ("loo", torch.tensor([1.0, -1.0, 0.0, 0.0])),
])
def test_sequence_variants_broadcast_their_estimator_over_the_tokens(name, expected):
    adv = grpo.compute_advantages(rollout(), grpo.GRPOConfig(advantage=name, samples_per_prompt=2, beta=0.0))
    torch.testing.assert_close(adv, expected[:, None].expand(4, 3) * MASK)


def test_reinforce_pp_whitens_the_returns_of_the_scores():
    adv = grpo.compute_advantages(rollout(), grpo.GRPOConfig(advantage="reinforce_pp", beta=0.0))
    rewards = kl_shaped_rewards(SCORES, torch.zeros(4, 3), MASK, 0.0)
    torch.testing.assert_close(adv, reinforce_pp_advantages(rewards, MASK))


def test_kl_in_reward_penalises_each_sequence_by_its_summed_kl():
    """k1 KL per token = logp - ref = 0.5 on every real token: sequences of 3, 2, 1, 3 tokens lose beta x
    (1.5, 1.0, 0.5, 1.5) = (0.15, 0.1, 0.05, 0.15) of their score before the leave-one-out baseline;
    padding (ref -inf there) never counts."""
    logps = torch.zeros(4, 3)
    ref = torch.where(MASK, torch.full((4, 3), -0.5), torch.full((4, 3), float("-inf")))
    cfg = grpo.GRPOConfig(advantage="loo", samples_per_prompt=2, kl_in_reward=True, beta=0.1, kl_estimator="k1")
    adv = grpo.compute_advantages(rollout(logps, ref), cfg)
    penalised = SCORES - torch.tensor([0.15, 0.1, 0.05, 0.15])
    torch.testing.assert_close(adv, leave_one_out_advantages(penalised, 2)[:, None].expand(4, 3) * MASK)


def test_an_unknown_advantage_is_an_error_not_reinforce_pp():
    with pytest.raises(ValueError, match="advantage must be one of group, dr_grpo, loo, reinforce_pp, got 'typo'"):
        grpo.GRPOConfig(advantage="typo")
    cfg = grpo.GRPOConfig(samples_per_prompt=2)
    cfg.advantage = "typo"  # set after construction: the table lookup still refuses it
    with pytest.raises(ValueError, match="advantage must be one of"):
        grpo.compute_advantages(rollout(), cfg)
