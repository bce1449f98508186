"""The toy RL problem shared by the online-RL and CMPO learning tests.

Reward = fraction of completion tokens in a set S of half the vocabulary, S = {x : e_x . u > 0} for
the starting 'tiny:0.5' model's embeddings e and a fixed random direction u. S is linearly separable
in embedding space, so a tiny model learns it quickly by moving its hidden state along u; the
starting fraction is ~0.4-0.5.
"""

from __future__ import annotations

import torch

from rlhfkit.data.prompts import load_prompts
from rlhfkit.models import load_model


class ToyTask:
    name = "toy"

    def prompts(self, split="train"):
        return [[{"role": "user", "content": p["prompt"]}] for p in load_prompts(split)]

    def gold(self, prompts, completions):
        return [0.0] * len(completions)


def make_token_set():
    model, _ = load_model("tiny:0.5")
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return (model.get_input_embeddings().weight.detach() @ u) > 0


def frac_in_set(S, r):
    m = r.completion_mask
    return (S[r.completion_ids] & m).sum(1).float() / m.sum(1).clamp(min=1)
