"""PPO's pieces around the loop: the critic's source and starting values, explained variance.
Learning, checkpointing the critic: tests/train/test_online.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhfkit.models.heads import completion_values, load_value_model
from rlhfkit.rollout.engine import Sampler, SamplingConfig
from rlhfkit.train import ppo


def test_critic_source_follows_value_init_and_the_checkpoint(tmp_path):
    cfg = ppo.PPOConfig(value_init="reward", reward="gold@0.5,rm:runs/rm@2")
    assert ppo.critic_source(cfg, None) == "runs/rm"
    assert ppo.critic_source(ppo.PPOConfig(), None) is None
    (tmp_path / "value").mkdir()
    assert ppo.critic_source(cfg, Path(tmp_path)) == str(tmp_path / "value")  # resuming: the saved critic


def test_a_new_critic_starts_at_zero_on_every_completion_token(tiny):
    """N details #3: the value head starts at zero, so the first values (and advantages' baseline) are 0."""
    model, tok = tiny
    critic = load_value_model(None, "tiny", seed=0)
    r = Sampler(model, tok, SamplingConfig(temperature=1.0, max_new_tokens=3)).sample(
        [[{"role": "user", "content": "Hi."}], [{"role": "user", "content": "Name a colour, please."}]], seed=0)
    values = completion_values(critic, r)
    assert values.shape == r.completion_ids.shape and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros_like(values))


def test_explained_variance_by_hand():
    """Returns (1, 2, 3, pad): a perfect critic explains 1, a constant one 0, V = R - (1, -1, 1) leaves
    Var[R - V] = 8/9 of Var[R] = 2/3 -> 1 - (8/9)/(2/3) = -1/3 (worse than a constant)."""
    mask = torch.tensor([[True, True, True, False]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 5.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    off = returns - torch.tensor([[1.0, -1.0, 1.0, 0.0]])
    assert ppo.explained_variance(off, returns, mask) == pytest.approx(-1 / 3, abs=1e-6)
