"""Policy-gradient losses of 2025 that replace PPO's token-level clipped surrogate, and the table that
picks one by name (``GRPOConfig.loss``).

All three take the same arguments, so a trainer calls ``POLICY_LOSSES[name](...)`` without branches:

==========  =====================================================  ==================================
name        per-token term (before ``aggregate_loss``)              what is clipped
==========  =====================================================  ==================================
ppo_clip    max(-A ρ_t, -A clip(ρ_t, 1-ε, 1+ε_h))                   the token ratio ρ_t (0 gradient)
gspo        max(-A s_i, -A clip(s_i, 1-ε, 1+ε_h))                   the sequence ratio s_i (0 gradient)
cispo       -sg(clip(ρ_t, 1-ε, 1+ε_h)) A log π_θ(y_t)               the IS weight only (never 0 gradient)
==========  =====================================================  ==================================

with ``ρ_t = π_θ(y_t) / π_old(y_t)`` and ``s_i = exp(mean_t log ρ_t)`` over sequence i's tokens.
Shapes: B sequences, T completion tokens; masks are bool, ``True`` = a real completion token. Sign:
each returns a loss to minimise; A > 0 raises the log-probability of the sequence's tokens.

At ρ = 1 (one optimizer step per rollout batch: the default, where the old log-probs are the
training pass's own) the three have the same gradient, ``-A ∇log π_θ(y_t)`` per token; they differ
once the policy has moved away from the sampler (``epochs_per_step > 1``, mini-batches, or an
inexact sampler such as vLLM).
"""

from __future__ import annotations

import torch

from rlhfkit.losses.importance import apply_is_weights
from rlhfkit.losses.kl import kl_per_token
from rlhfkit.losses.ppo import ppo_policy_loss
from rlhfkit.ops import aggregate_loss, masked_mean


def _check(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")


def _approx_kl(per_token_logps, old_per_token_logps, mask) -> torch.Tensor:
    # k3 estimate of KL(π_old || π_θ) over real tokens (http://joschu.net/blog/kl-approx.html)
    zero = torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device)
    kl = kl_per_token(old_per_token_logps.detach(), per_token_logps.detach(), "k3")
    return masked_mean(torch.where(mask, kl, zero), mask)


def gspo_policy_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    aggregation: str = "seq_mean",
    max_tokens: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071, eq. 5): the
    clipped surrogate on the *sequence* importance ratio, as a loss to minimise.

    ``s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| Σ_t log ρ_{i,t})`` (length-normalised,
    so sequences of any length share one clip range), and
    ``J = 1/G Σ_i min(s_i A_i, clip(s_i, 1 - clip_eps, 1 + clip_eps_high) A_i)``.
    Clipping is decided per sequence: a clipped sequence gives every one of its tokens 0 gradient.

    Computed in the paper's GSPO-token form, which allows per-token advantages: per token
    ``s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]`` (value s_i, gradient ``s_i ∇log π_θ(y_t)``) and
    ``l_{i,t} = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, ...))``, then ``aggregate_loss``. With
    ``aggregation='seq_mean'`` and one advantage per sequence this equals eq. 5 exactly, value and
    gradient (a test compares it with the sequence-level formula); 'token_mean' weights sequences by length.

    Args:
        per_token_logps: (B, T) log π_θ of the taken tokens (with grad).
        old_per_token_logps: (B, T) log π_old at sampling time (no grad).
        advantages: (B, T) per token (sequence advantages broadcast over the tokens).
        mask: (B, T) bool, True = completion token.
        clip_eps, clip_eps_high: the sequence ratio's clip range [1 - clip_eps, 1 + clip_eps_high]
            (default clip_eps_high = clip_eps). The paper uses 3e-4 and 4e-4: s_i is a geometric mean
            of token ratios, so it stays far closer to 1 than any one token's ratio.
        is_weights: (B, T) truncated importance weights of an inexact sampler (rlhfkit.losses.importance),
            multiplying each token's term (the ratio s_i is against π_old, the weight corrects π_old vs μ).
    Metrics (0-dim, detached): ``loss/policy``; ``policy/clipfrac`` (fraction of real tokens in a
    sequence whose clipped term is active: the paper's "fraction of clipped tokens");
    ``policy/approx_kl`` (k3, token mean); ``policy/ratio_mean`` (mean of s_i over sequences).
    """
    _check(mask)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    zero = torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device)
    # padding selected away before exp (exp(inf) * 0 = nan in the backward pass)
    log_ratio = torch.where(mask, per_token_logps - old_per_token_logps, zero)  # (B, T)
    seq_log_ratio = masked_mean(log_ratio, mask, dim=1)  # (B,)  log s_i
    # GSPO-token: value s_i on every token, gradient s_i ∇log π_θ(y_t)
    log_s = seq_log_ratio.detach()[:, None] + per_token_logps - per_token_logps.detach()
    s = torch.exp(torch.where(mask, log_s, zero))  # (B, T)
    adv = torch.where(mask, advantages.to(per_token_logps.dtype), zero)
    unclipped = -adv * s
    clipped = -adv * torch.clamp(s, 1.0 - clip_eps, 1.0 + clip_eps_high)
    loss = aggregate_loss(apply_is_weights(torch.maximum(unclipped, clipped), is_weights), mask, aggregation, max_tokens)
    with torch.no_grad():
        metrics = {
            "loss/policy": loss,
            "policy/clipfrac": masked_mean((clipped > unclipped).to(s.dtype), mask),
            "policy/approx_kl": _approx_kl(per_token_logps, old_per_token_logps, mask),
            "policy/ratio_mean": torch.exp(seq_log_ratio).mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def cispo_policy_loss(
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
    """CISPO (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585, eqs. 4-5): REINFORCE on every token,
    weighted by the clipped importance-sampling weight under a stop-gradient, as a loss to minimise.

    ``J = 1/Σ|o_i| Σ_i Σ_t sg(r̂_{i,t}) A_{i,t} log π_θ(o_{i,t})`` with
    ``r̂_{i,t} = clip(ρ_{i,t}, 1 - clip_eps, 1 + clip_eps_high)``; per token
    ``l_t = -sg(r̂_t) A_t log π_θ(y_t)``, then ``aggregate_loss`` (the paper: 'token_mean').
    Unlike PPO-clip, a token past the clip range keeps its gradient (scaled by the bounded weight):
    the paper's point is that the rare "fork" tokens PPO clips away after the first update keep
    contributing. The paper sets no lower bound (clip_eps >= 1 here: weights are > 0 anyway) and
    tunes only the upper one.

    Args: as :func:`rlhfkit.losses.ppo.ppo_policy_loss`; ``clip_eps``/``clip_eps_high`` bound the IS
    weight to [1 - clip_eps, 1 + clip_eps_high] (default clip_eps_high = clip_eps); ``is_weights`` (B, T)
    the sampler correction (rlhfkit.losses.importance), a second factor next to the clipped π_θ/π_old weight.
    Note: the loss *value* is a surrogate (it contains log π_θ): only its gradient means something;
    do not compare it with ppo_clip's value.
    Metrics (0-dim, detached): ``loss/policy``; ``policy/clipfrac`` (fraction of real tokens whose
    weight was clipped: they still get gradient); ``policy/approx_kl`` (k3); ``policy/ratio_mean``
    (mean unclipped ρ over real tokens).
    """
    _check(mask)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    zero = torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device)
    log_ratio = torch.where(mask, per_token_logps - old_per_token_logps, zero).detach()
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, max(1.0 - clip_eps, 0.0), 1.0 + clip_eps_high)  # sg(r̂): built from detached values
    adv = torch.where(mask, advantages.to(per_token_logps.dtype), zero)
    per_token = apply_is_weights(-weight * adv * torch.where(mask, per_token_logps, zero), is_weights)
    loss = aggregate_loss(per_token, mask, aggregation, max_tokens)
    with torch.no_grad():
        metrics = {
            "loss/policy": loss,
            "policy/clipfrac": masked_mean((weight != ratio).to(ratio.dtype), mask),
            "policy/approx_kl": _approx_kl(per_token_logps, old_per_token_logps, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


POLICY_LOSSES = {"ppo_clip": ppo_policy_loss, "gspo": gspo_policy_loss, "cispo": cispo_policy_loss}
"""``GRPOConfig.loss`` -> its function; every entry takes ``(per_token_logps, old_per_token_logps,
advantages, mask, clip_eps, clip_eps_high, aggregation, max_tokens, is_weights=None)`` and returns
``(loss, metrics)``; ``is_weights`` is the truncated importance correction of an inexact sampler."""
