"""PPO losses: the clipped policy surrogate and the clipped value loss, per token then aggregated."""

from __future__ import annotations

import torch

from rlhfkit.losses.importance import apply_is_weights
from rlhfkit.losses.kl import kl_per_token
from rlhfkit.ops import aggregate_loss, masked_mean


def ppo_policy_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    Per token, with ``ρ = exp(logp - old_logp)``:
    ``l_t = max(-A_t ρ, -A_t clip(ρ, 1 - clip_eps, 1 + clip_eps_high))``, i.e. ``-L^CLIP``; then
    reduced by ``aggregate_loss(l, mask, aggregation, max_tokens)``. ``clip_eps_high`` (default
    ``clip_eps``) makes the clip range asymmetric: DAPO's "clip-higher" (Yu et al. 2025, §3.1, e.g.
    0.2 / 0.28) lets low-probability tokens with A > 0 grow further.

    Args:
        per_token_logps: (B, T) log π_θ of the taken tokens (with grad).
        old_per_token_logps: (B, T) log π_θold at sampling time (no grad).
        advantages: (B, T) per token; broadcast sequence-level advantages ``A[:, None].expand(B, T)``.
        mask: (B, T) bool, True = completion token.
        is_weights: (B, T) truncated importance weights ``min(π_old / μ, C)`` of a sampler μ that is not
            exactly the policy (rlhfkit.losses.importance), multiplying each token's term; None = 1.
    Sign: A > 0 raises the taken token's logp until ρ passes 1 + clip_eps_high, after which that
    token's gradient is exactly 0 (A < 0: lowers it until ρ < 1 - clip_eps).
    Metrics (0-dim detached): ``loss/policy``; ``policy/clipfrac`` (fraction of valid tokens whose
    clipped term is the active one, so their gradient is 0); ``policy/approx_kl`` (k3 estimate of
    KL(π_old || π_θ), masked mean; http://joschu.net/blog/kl-approx.html); ``policy/ratio_mean``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    zero = torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device)
    # Select padding away before exp: exp(huge) = inf, and inf * 0 = nan in the backward pass.
    log_ratio = torch.where(mask, per_token_logps - old_per_token_logps, zero)
    adv = torch.where(mask, advantages.to(per_token_logps.dtype), zero)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = apply_is_weights(torch.maximum(unclipped, clipped), is_weights)
    loss = aggregate_loss(per_token, mask, aggregation, max_tokens)
    with torch.no_grad():
        approx_kl = kl_per_token(old_per_token_logps.detach(), per_token_logps.detach(), "k3")
        metrics = {
            "loss/policy": loss.detach(),
            "policy/clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "policy/approx_kl": masked_mean(torch.where(mask, approx_kl, zero), mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_value: float | None,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (N implementation details #10; PPO2 baselines ``cliprange_value``).

    Per token ``½ max((v - R)², (clip(v, v_old - eps, v_old + eps) - R)²)``; with
    ``clip_eps_value=None`` just ``½ (v - R)²``. Reduced by ``aggregate_loss``.

    Args: values (B, T) current critic outputs (with grad); old_values (B, T) critic outputs at
    rollout time; returns (B, T) targets (e.g. from ``gae``); mask (B, T) bool, True = counts.
    Metrics: ``loss/value``, ``value/clipfrac`` (fraction of valid tokens where the clipped term is
    larger, i.e. the gradient is 0; always 0 when unclipped).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(mask, values, zero)
    target = torch.where(mask, returns.to(values.dtype), zero)
    unclipped = (v - target) ** 2
    if clip_eps_value is None:
        per_token = 0.5 * unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_old = torch.where(mask, old_values.to(values.dtype), zero)
        v_clipped = v_old + torch.clamp(v - v_old, -clip_eps_value, clip_eps_value)
        clipped = (v_clipped - target) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype).detach(), mask)
    loss = aggregate_loss(per_token, mask, aggregation, max_tokens)
    return loss, {"loss/value": loss.detach(), "value/clipfrac": clipfrac.detach()}
