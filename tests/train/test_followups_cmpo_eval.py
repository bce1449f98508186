"""Follow-ups: CMPO's leave-one-out baseline skips unscored samples; online.start hands the accelerator
to the held-out eval hook (FSDP1 needs it to find the root wrapper)."""

from __future__ import annotations

import torch

from rlhfkit.losses.cmpo import RunningScale
from rlhfkit.train import cmpo, online
from rlhfkit.train.cmpo import CMPOConfig, cmpo_targets
from rlhfkit.train.grpo import GRPOConfig


def test_cmpo_targets_leave_unscored_samples_out_of_the_baseline():
    """Group [1, 0, (unscored, placeholder 0.5), 0.5]: the baseline of each scored sample averages the
    other two scored ones, A = 3/2 (r - 0.5) = [0.75, -0.75, 0, 0]; the placeholder would shift it."""
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    valid = torch.tensor([True, True, False, True])
    adv, _, m = cmpo_targets(scores, 4, RunningScale(decay=0.99, eps=0.0), c=1.0, valid=valid)
    sigma = m["cmpo/sigma"]
    torch.testing.assert_close(adv * sigma, torch.tensor([0.75, -0.75, 0.0, 0.0]))


def test_cmpo_train_passes_the_scored_mask(tmp_path, monkeypatch):
    seen = []
    real = cmpo.leave_one_out_advantages

    def spy(scores, k, valid=None):
        seen.append(valid)
        return real(scores, k, valid=valid)
    monkeypatch.setattr(cmpo, "leave_one_out_advantages", spy)
    cmpo.train(CMPOConfig(model="tiny", task="arith", prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                          total_steps=1, eval_every=0, progress=False, output_dir=str(tmp_path)))
    assert seen and seen[0] is not None and seen[0].dtype == torch.bool and seen[0].shape == (4,)


def test_start_gives_the_eval_hook_the_accelerator(tmp_path):
    s = online.start(GRPOConfig(model="tiny", task="arith", prompts_per_step=2, samples_per_prompt=2,
                                max_new_tokens=4, output_dir=str(tmp_path)))
    assert s.held_out.acc is s.acc
