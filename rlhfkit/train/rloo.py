"""RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs"): REINFORCE with a leave-one-out baseline over K samples per prompt,
the KL penalty folded into the sequence reward.

It is the critic-free loop of grpo.py with RLOO's defaults, not a copy of it: the two methods differ
only in the advantage and where the KL goes (see the table in grpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.train import grpo


@dataclass
class RLOOConfig(grpo.GRPOConfig):
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


def train(cfg: RLOOConfig, reward_fn=None, task=None) -> dict:
    return grpo.train(cfg, reward_fn=reward_fn, task=task, method="rloo")
