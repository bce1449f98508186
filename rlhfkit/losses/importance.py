"""Truncated importance sampling (TIS): correct for a sampler that is not exactly the policy.

A quantized CPU engine (rlhfkit.rollout.fast, int8 weights) or vLLM (bf16 kernels, other reductions)
samples tokens from ``μ`` while the trainer's loss assumes ``π_old``, the fp32 policy that
``completion_logps`` scores. The policy gradient with samples from ``μ`` needs the per-token ratio
``π_old(y_t) / μ(y_t)``; truncating it at ``C`` bounds the variance at the cost of a small bias
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training",
https://fengyao.notion.site/off-policy-rl, eq. for ``min(π/μ, C)``; Espeholt et al. 2018, IMPALA's
truncated ratios, eq. 1 with ``ρ̄ = C``)::

    w_t = min(exp(logp_train_t - logp_sampler_t), C)        (B, T), no gradient

The weight multiplies each token's policy-gradient loss term (PPO/GRPO's clipped surrogate) before the
reduction; it is a constant of the sampled batch, so it is detached.

Shapes: B batch, T completion tokens. Masks are bool, ``True`` = a real completion token. Sign:
``logp_diff = logp_train - logp_sampler``; positive where the policy likes the sampled token more than
the sampler did.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.ops import masked_mean

IS_CAP = 2.0
"""Default truncation ``C``; Yao et al. use 2 for their vLLM/FSDP mismatch (typical range 1.5-5)."""


def truncated_is_weights(per_token_logps: torch.Tensor, sampler_per_token_logps: torch.Tensor,
                         cap: float = IS_CAP) -> torch.Tensor:
    """``min(exp(per_token_logps - sampler_per_token_logps), cap)``, detached, same shape as the inputs.

    Naive equivalent (a test compares): ``torch.clamp(torch.exp(a) / torch.exp(b), max=cap)``, which
    underflows to 0/0 for long-tail tokens; the difference of logs does not.
    """
    if cap <= 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    log_ratio = (per_token_logps - sampler_per_token_logps).detach()
    return torch.exp(log_ratio.clamp(max=torch.log(torch.tensor(float(cap))).item()))


def masked_truncated_is_weights(per_token_logps: torch.Tensor, sampler_per_token_logps: torch.Tensor,
                                completion_mask: torch.Tensor, cap: float = IS_CAP
                                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated IS weights for the real tokens, and the metrics that monitor the sampler/trainer gap.

    Args: ``per_token_logps`` (B, T) the trainer's ``log π_old``; ``sampler_per_token_logps`` (B, T) the
    sampler's ``log μ`` of the same tokens; ``completion_mask`` (B, T) bool.
    Returns ``(weights, metrics)``: weights (B, T), detached, 1 where the mask is False (a weight never
    changes what the mask already removes, and padding values, even ``inf``, never leak). Metrics, all
    over real tokens:

    ``rollout/logp_diff_mean``       mean of ``|logp_train - logp_sampler|`` (the gap the engine's tests bound)
    ``rollout/logp_diff_signed_mean`` mean of ``logp_train - logp_sampler`` (bias: ~0 for an unbiased sampler)
    ``rollout/is_weight_mean``       mean of the truncated weights (~1; below 1 when truncation engages)
    ``rollout/is_clipped_frac``      fraction of tokens whose ratio exceeded ``cap``
    """
    mask = completion_mask.bool()
    log_ratio = torch.where(mask, (per_token_logps - sampler_per_token_logps).detach(),
                            torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device))
    weights = truncated_is_weights(log_ratio, torch.zeros_like(log_ratio), cap)
    metrics = {
        "rollout/logp_diff_mean": masked_mean(log_ratio.abs(), mask),
        "rollout/logp_diff_signed_mean": masked_mean(log_ratio, mask),
        "rollout/is_weight_mean": masked_mean(weights, mask),
        "rollout/is_clipped_frac": masked_mean((log_ratio > math.log(cap)).float(), mask),
    }
    return weights, metrics


def apply_is_weights(per_token_loss: torch.Tensor, is_weights: torch.Tensor | None) -> torch.Tensor:
    """``per_token_loss * is_weights`` (both (B, T)), or the loss unchanged when ``is_weights`` is None.

    The one place every policy-gradient loss (rlhfkit.losses.ppo, rlhfkit.losses.policy; PPO, GRPO,
    RLOO, DAPO, GSPO, CISPO, CMPO's PPO term) applies the sampler correction, before its reduction.
    ``None`` (the sampler is the policy: the HF backend) returns the very same tensor, so the loss is
    bit-for-bit what it was without the correction.
    """
    if is_weights is None:
        return per_token_loss
    if is_weights.shape != per_token_loss.shape:
        raise ValueError(f"is_weights has shape {tuple(is_weights.shape)}, the per-token loss {tuple(per_token_loss.shape)}")
    return per_token_loss * is_weights.detach().to(per_token_loss.dtype)
