"""Follow-up: online.start attaches the reference policy's replies to a ``judge:MODEL:pairwise`` reward,
so the trainers run it; with LoRA the replies come from the policy with its adapter off."""

from __future__ import annotations

import torch

from rlhfkit.models import load_model
from rlhfkit.models.lora import is_lora
from rlhfkit.rollout.reward_components import PairwiseJudge, ReferenceReplies
from rlhfkit.tracking import read_metrics
from rlhfkit.train import grpo, online

COMMON = dict(model="tiny", task="sentiment", reward="judge:tiny:pairwise", prompts_per_step=2, samples_per_prompt=2,
              max_new_tokens=6, eval_every=0, progress=False, missing_eos_penalty=None)


def test_grpo_runs_a_step_with_the_pairwise_judge(tmp_path):
    grpo.train(grpo.GRPOConfig(**COMMON, total_steps=1, output_dir=str(tmp_path)))
    row = [r for r in read_metrics(tmp_path) if r["step"] == 1][0]
    assert 0.0 <= row["reward/mean"] <= 1.0  # P(the judge prefers the policy's reply), both orders


def test_lora_reference_replies_come_from_the_adapter_disabled_policy(tmp_path):
    s = online.start(grpo.GRPOConfig(**COMMON, lora_r=4, lora_alpha=8.0, output_dir=str(tmp_path)))
    assert is_lora(s.ref)
    with torch.no_grad():  # an adapter far from zero: the adapted policy replies differently
        for name, p in s.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    judge = next(c for _, _, c in s.reward.parts if isinstance(c, PairwiseJudge))
    prompts = [row.messages for row in s.stream.prompts[:3]]
    base, tok = load_model("tiny", seed=COMMON.get("seed", 0))
    expected = ReferenceReplies(base.eval(), tok, COMMON["max_new_tokens"])(prompts)
    adapted = ReferenceReplies(s.policy, s.tok, COMMON["max_new_tokens"])(prompts)
    assert adapted != expected  # the check can fail: the adapter changes the replies
    assert judge.reference(prompts) == expected
