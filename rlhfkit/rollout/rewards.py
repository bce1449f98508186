"""Reward sources for online RL: what scores a :class:`~rlhfkit.rollout.engine.Rollout`.

``RewardSource`` parses the ``reward`` config string ('gold', 'rm:PATH', weighted comma lists, see
:func:`parse_reward_spec`); ``CustomReward`` adapts a Python function; :func:`task_gold` is the task's
programmatic (gold) reward. All return (B,) float32 scores on the CPU.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.models.heads import RewardModel
from rlhfkit.rollout.engine import Rollout


def parse_reward_spec(spec: str) -> list[tuple[str, float, str | None]]:
    """``'rm:runs/rm@1.0,gold@0.5'`` -> ``[("rm", 1.0, "runs/rm"), ("gold", 0.5, None)]``: (kind, weight,
    reward-model path) per comma-separated item, weight 1 when no ``@w`` is given. Raises ValueError
    naming the ``reward`` field for an unknown source, a bad weight or an empty spec. Nothing is loaded."""
    parts = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, weight = item.partition("@")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward: bad weight {weight!r} in {spec!r}; write NAME@NUMBER, e.g. gold@0.5") from None
        if not math.isfinite(w):
            raise ValueError(f"reward: weight {weight!r} in {spec!r} is not finite")
        if name == "gold":
            parts.append(("gold", w, None))
        elif name.startswith("rm:") and name[3:]:
            parts.append(("rm", w, name[3:]))
        else:
            raise ValueError(f"reward: unknown source '{name}' in '{spec}'; use gold, rm:PATH, or a comma list with @weights")
    if not parts:
        raise ValueError("reward: empty spec; use gold, rm:PATH, or a comma list with @weights")
    return parts


def task_gold(task, r: Rollout) -> torch.Tensor:
    """(B,) the task's gold (programmatic) reward of each completion."""
    return torch.tensor(task.gold(r.prompts, r.completions), dtype=torch.float32)


class RewardSource:
    """Scores a Rollout: a weighted sum of the task's gold reward and/or reward models."""

    def __init__(self, spec: str, task, device, tokenizer=None):
        self.parts: list[tuple[str, float, RewardModel | None]] = []
        self.tokenizer = tokenizer
        for kind, w, path in parse_reward_spec(spec):
            rm = None
            if kind == "rm":
                rm = RewardModel.load(path)
                rm.model.to(device)
            self.parts.append((kind, w, rm))
        self.task = task

    @property
    def uses_gold_only(self) -> bool:
        return all(kind == "gold" for kind, _, _ in self.parts)

    @torch.no_grad()
    def __call__(self, r: Rollout) -> torch.Tensor:
        total = torch.zeros(len(r.completions))
        for kind, w, rm in self.parts:
            if kind == "gold":
                s = task_gold(self.task, r)
            elif self.shares_vocab(rm):
                s = self.score_rollout_ids(rm, r)
            else:  # another tokenizer: re-encode the text with the reward model's own template
                s = rm.score(r.prompts, r.completions).float().cpu()
            total += w * s
        return total

    def shares_vocab(self, rm) -> bool:
        tok = self.tokenizer
        return (tok is not None and len(tok) == len(rm.tok) and tok.eos_token_id == rm.tok.eos_token_id
                and tok.get_vocab() == rm.tok.get_vocab())

    @staticmethod
    def score_rollout_ids(rm, r: Rollout) -> torch.Tensor:
        """Score the sampled token ids as they are (no re-tokenisation). A truncated completion gets an
        EOS appended before scoring, as a reward model's training pairs close every reply (sampled
        pairs are truncated too): the head is then always read at an EOS, where it was trained."""
        c_ids, c_mask = r.completion_ids, r.completion_mask.bool()
        if not bool(r.ended.all()):
            n = c_mask.sum(1)
            c_ids = torch.cat([c_ids, torch.full_like(c_ids[:, :1], rm.tok.pad_token_id)], 1)
            c_mask = torch.cat([c_mask, torch.zeros_like(c_mask[:, :1])], 1)
            rows = (~r.ended.bool()).nonzero().flatten().to(c_ids.device)
            c_ids[rows, n[rows]] = rm.tok.eos_token_id
            c_mask[rows, n[rows]] = True
        ids = torch.cat([r.prompt_ids, c_ids], 1)
        mask = torch.cat([r.prompt_mask.bool(), c_mask], 1)
        return rm.score_ids(ids, mask).float().cpu()


class CustomReward:
    """Adapter so a Python ``reward_fn(rollout)`` plugs in where a RewardSource goes."""

    uses_gold_only = False

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, r: Rollout) -> torch.Tensor:
        return torch.as_tensor(self.fn(r), dtype=torch.float32).cpu()

