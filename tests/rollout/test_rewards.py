"""rlhfkit.rollout.rewards: the `reward` spec grammar and its errors (reward-model scoring itself:
tests/test_reward_model.py)."""

from __future__ import annotations

import pytest

from rlhfkit.rollout.rewards import CustomReward, RewardSource, parse_reward_spec


def test_parse_reward_spec():
    assert parse_reward_spec("gold") == [("gold", 1.0, None)]
    assert parse_reward_spec(" rm:runs/rm@1.5 , gold@-0.5 ") == [("rm", 1.5, "runs/rm"), ("gold", -0.5, None)]


@pytest.mark.parametrize("spec,match", [("", "empty spec"), (" , ", "empty spec"), ("bleu", "unknown source 'bleu'"),
                                        ("rm:", "unknown source 'rm:'"), ("gold@x", "bad weight 'x'"),
                                        ("gold@inf", "not finite")])
def test_bad_reward_specs_name_the_field(spec, match):
    with pytest.raises(ValueError, match=f"^reward: .*{match}"):
        parse_reward_spec(spec)


def test_gold_source_scores_with_the_task_and_custom_reward_returns_float_cpu():
    from types import SimpleNamespace

    import torch

    task = SimpleNamespace(gold=lambda prompts, completions: [len(c) for c in completions])
    r = SimpleNamespace(prompts=[[], []], completions=["ab", "abcd"])
    source = RewardSource("gold@0.5", task, torch.device("cpu"))
    assert source.uses_gold_only and source(r).tolist() == [1.0, 2.0]
    out = CustomReward(lambda r: [1, 2])(r)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and not CustomReward.uses_gold_only
