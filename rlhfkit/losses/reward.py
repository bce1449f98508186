"""Reward-model training loss: Bradley–Terry pairwise log-likelihood with margins and ties."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    tie_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Pairwise reward-model loss, averaged over the B pairs.

    Preferred pairs: ``-log σ(r_c - r_r - m)`` (InstructGPT, Ouyang et al. 2022, eq. 1; the margin
    ``m`` from preference strength as in Llama 2, Touvron et al. 2023, §3.2.2, eq. 2).
    Tie pairs (``tie_mask`` True): Bradley–Terry with target probability ½,
    ``-½ [log σ(d) + log σ(-d)]`` with ``d = r_c - r_r``, minimised at ``d = 0``. The margin is *not*
    applied to tie rows: a tie has no preferred side to push a margin towards.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of the two completions.
        margin: optional (B,) margin m >= 0 (0 = plain Bradley–Terry).
        tie_mask: optional (B,) bool, True = the annotator judged the pair a tie.
    Returns:
        ``(loss, metrics)``; metrics (0-dim detached tensors): ``loss/reward``, ``reward/accuracy``
        (fraction of non-tie pairs with r_c > r_r; 0 if all are ties), ``reward/margin`` (mean
        r_c - r_r over all pairs), ``reward/chosen``, ``reward/rejected`` (means).
    Sign: the loss decreases as r_c - r_r grows (on non-tie rows).
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must both be (B,), got {tuple(chosen_rewards.shape)} "
            f"and {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards - rejected_rewards  # (B,)
    shifted = diff if margin is None else diff - margin.to(diff.dtype)
    per_pair = -F.logsigmoid(shifted)
    if tie_mask is not None:
        if tie_mask.dtype != torch.bool:
            raise TypeError(f"tie_mask must be bool (True = tie), got {tie_mask.dtype}")
        tie_loss = -0.5 * (F.logsigmoid(diff) + F.logsigmoid(-diff))
        per_pair = torch.where(tie_mask, tie_loss, per_pair)
        decided = ~tie_mask
    else:
        decided = torch.ones_like(diff, dtype=torch.bool)
    loss = per_pair.mean()
    with torch.no_grad():
        correct = (diff > 0) & decided
        n_decided = decided.sum().clamp(min=1)
        metrics = {
            "loss/reward": loss.detach(),
            "reward/accuracy": correct.sum().to(diff.dtype) / n_decided.to(diff.dtype),
            "reward/margin": diff.mean(),
            "reward/chosen": chosen_rewards.mean(),
            "reward/rejected": rejected_rewards.mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
