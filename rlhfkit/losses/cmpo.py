"""CMPO, the regularised policy update of Muesli (Hessel et al. 2021, "Muesli: Combining Improvements
in Policy Optimization", arXiv 2104.06159, §4), for K sampled completions per prompt.

The clipped MPO target (the paper's eq. 10) re-weights a prior policy by the exponentiated, clipped,
normalised advantage::

    π_CMPO(y|x) = π_prior(y|x) · exp(clip(Â(x, y) / σ̂, -c, c)) / z(x)

and the policy is pulled toward it with ``λ · KL(π_CMPO || π_θ)`` beside a policy-gradient term. When
the K completions ``y_1..y_K`` of a prompt are *sampled from the prior*, the prior's density cancels
in the importance ratio π_CMPO / π_prior, so the target restricted to the samples is just the
self-normalised weights ``w_k ∝ exp(clip(Â_k / σ̂, -c, c))``, and

    KL(π_CMPO || π_θ) ≈ -Σ_k w_k log π_θ(y_k|x) + const(θ)

(the constant is the target's negative entropy). This is the sampled-target estimator of the
paper's large-action-space variant (rlax ``sampled_cmpo_policy_targets`` with the self-normalising
``softmax_policy_target_normalizer``). docs/cmpo.md has the derivation and every departure from the paper.

Shapes: N prompts, K samples per prompt; "seq logps" are per-completion sums of token log-probs.
Everything here imports only ``torch``; nothing moves devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def _check_scale(sigma: float, c: float) -> None:
    if not sigma > 0:
        raise ValueError(f"sigma (the advantage scale) must be > 0, got {sigma}")
    if not c > 0:
        raise ValueError(f"c (the advantage clip) must be > 0, got {c}; Muesli uses c = 1")


def cmpo_target(prior_logps: torch.Tensor, advantages: torch.Tensor, sigma: float, c: float = 1.0) -> torch.Tensor:
    """Exact CMPO target over an enumerable action set, in log space (Muesli eq. 10).

    ``log π_CMPO(a) = log π_prior(a) + clip(A(a)/σ, -c, c) - log Σ_b π_prior(b) exp(clip(A(b)/σ, -c, c))``

    Args:
        prior_logps: (..., A) log π_prior over all A actions (normalised over the last dim).
        advantages: (..., A) advantage of every action.
        sigma: advantage scale σ̂ (> 0); c: clip (> 0).
    Returns (..., A) log-probabilities. The RL trainer cannot enumerate completions and uses
    :func:`cmpo_weights` on samples instead; this function is the quantity those weights estimate.

    Worked example (σ = 2, c = 1): prior = [0.5, 0.25, 0.25], A = [2, 0, -6] -> A/σ = [1, 0, -3],
    clipped [1, 0, -1]; unnormalised [0.5e, 0.25, 0.25/e] = [1.359141, 0.25, 0.091970], sum 1.701111
    -> π_CMPO = [0.798973, 0.146963, 0.054065].
    """
    _check_scale(sigma, c)
    if prior_logps.shape != advantages.shape:
        raise ValueError(f"prior_logps {tuple(prior_logps.shape)} and advantages {tuple(advantages.shape)} must match")
    return torch.log_softmax(prior_logps + torch.clamp(advantages / sigma, -c, c), dim=-1)


def cmpo_weights(advantages: torch.Tensor, sigma: float, c: float = 1.0) -> torch.Tensor:
    """Target weights over each prompt's K samples from the prior: ``softmax_k(clip(A_k/σ, -c, c))``.

    With ``y_k ~ π_prior`` the self-normalised importance weights of π_CMPO against its proposal
    π_prior are ``π_CMPO(y_k)/π_prior(y_k) ∝ exp(clip(A_k/σ, -c, c))`` (the prior cancels), so
    ``Σ_k w_k f(y_k)`` estimates ``E_{π_CMPO}[f]``; consistent in K, biased for small K like every
    self-normalised estimator.

    Args:
        advantages: (N, K) advantage of each of the K samples of N prompts. A constant shift per
            prompt changes the weights only through the clip (softmax is shift-invariant), so the
            baseline matters: centred advantages (e.g. leave-one-out) clip symmetrically.
        sigma: advantage scale σ̂ > 0 (a running RMS, :class:`RunningScale`); c > 0 the clip.
    Returns:
        (N, K) weights, each row non-negative and summing to 1. Equal advantages give uniform 1/K.
        Once |A/σ| >= c the weight no longer grows (A = ±5σ weighs the same as ±cσ), so no single
        sample can take more than ``e^{2c} / (e^{2c} + K - 1)`` of a row.
    Sign: a higher advantage always gets at least as much weight.

    Worked example (σ = 2, c = 1, one prompt): A = [2, 0, -2, 0] -> A/σ = [1, 0, -1, 0];
    exp = [e, 1, 1/e, 1] = [2.718282, 1, 0.367879, 1], sum 5.086161 ->
    w = [0.534447, 0.196612, 0.072329, 0.196612]; entropy 1.164406 nats (uniform: log 4 = 1.386294).
    A = [10, 0, -10, 0] clips to the same [1, 0, -1, 0] and gives the same w.
    """
    _check_scale(sigma, c)
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be (N, K), got shape {tuple(advantages.shape)}; use .view(-1, K)")
    return torch.softmax(torch.clamp(advantages.float() / sigma, -c, c), dim=1).to(advantages.dtype)


def cmpo_regulariser(
    seq_logps: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """The CMPO cross-entropy ``-Σ_k w_k log π_θ(y_k|x)``, the sampled ``KL(π_CMPO || π_θ)`` up to a
    constant in θ (Muesli §4, the λ-term of the policy loss), averaged over prompts.

    Args:
        seq_logps: (N, K) log π_θ(y_k|x), per-sequence sums of token log-probs (with grad).
        weights: (N, K) target weights from :func:`cmpo_weights` (gradient is stopped here: the
            target is a constant of the update, as in MPO's E-step / M-step split).
        lengths: optional (N, K) completion token counts (> 0). Given, each log-prob is divided by
            its length: ``-Σ_k w_k log π_θ(y_k|x) / |y_k|``, a per-token cross-entropy whose scale does
            not grow with the completion length (a departure from the paper; docs/cmpo.md).
    Returns:
        ``(loss, metrics)``: loss = ``mean_n(-Σ_k w_nk ℓ_nk)`` with ℓ the (normalised) log-prob;
        metrics ``loss/cmpo`` (detached).
    Sign: minimising raises ``log π_θ(y_k)`` in proportion to ``w_k``: ``∂loss/∂ℓ_nk = -w_nk / N``,
    so within a prompt the highest-advantage sample gains the most probability, and with uniform
    weights the term is maximum likelihood on the prior's samples (it pulls π_θ toward the prior).

    Decomposition: the loss is linear in each ℓ_nk, so a micro-batch holding an arbitrary subset of
    the N·K samples can be passed as (B, 1) tensors with weights ``K·w``: the mean over equal-sized
    micro-batches of those losses equals the (N, K) loss (``tests/losses/test_cmpo_losses.py`` checks it).

    Worked example: seq_logps = [[-1, -2], [-3, -4]], w = [[0.75, 0.25], [0.5, 0.5]]:
    row losses 0.75 + 0.5 = 1.25 and 1.5 + 2 = 3.5 -> loss 2.375. With lengths [[1, 2], [3, 4]]:
    ℓ = [[-1, -1], [-1, -1]] -> loss 1.0.
    """
    if seq_logps.shape != weights.shape or seq_logps.dim() != 2:
        raise ValueError(f"seq_logps {tuple(seq_logps.shape)} and weights {tuple(weights.shape)} must both be (N, K)")
    ell = seq_logps
    if lengths is not None:
        if lengths.shape != seq_logps.shape:
            raise ValueError(f"lengths {tuple(lengths.shape)} must match seq_logps {tuple(seq_logps.shape)}")
        if bool((lengths <= 0).any()):
            raise ValueError("lengths must be > 0: every completion has at least one token (its EOS)")
        ell = seq_logps / lengths.to(seq_logps.dtype)
    loss = -(weights.detach().to(ell.dtype) * ell).sum(dim=1).mean()
    return loss, {"loss/cmpo": loss.detach()}


def cmpo_weight_metrics(advantages: torch.Tensor, weights: torch.Tensor, sigma: float, c: float) -> dict[str, float]:
    """``cmpo/weight_entropy`` (mean over prompts of -Σ_k w log w, nats; log K = uniform, 0 = one
    sample takes all), ``cmpo/weight_max`` (mean of each prompt's largest weight) and
    ``cmpo/clip_frac_adv`` (fraction of samples with |A/σ| > c, whose target weight is clipped).
    Args (N, K) as in :func:`cmpo_weights`."""
    with torch.no_grad():
        w = weights.float()
        entropy = -(torch.where(w > 0, w * w.log(), torch.zeros_like(w))).sum(1).mean()
        return {"cmpo/weight_entropy": entropy.item(), "cmpo/weight_max": w.max(1).values.mean().item(),
                "cmpo/clip_frac_adv": ((advantages.float() / sigma).abs() > c).float().mean().item()}


class RunningScale:
    """σ̂: the root of an exponential moving average of the advantages' second moment, bias-corrected
    as Adam's moments (Kingma & Ba 2015, Alg. 1), which Muesli uses to normalise advantages (§4;
    the paper's decay β_var, offset ε_var)::

        v_t = d · v_{t-1} + (1 - d) · mean(A_t²),   v_0 = 0
        σ̂_t = sqrt(v_t / (1 - d^t) + eps)

    After one update σ̂ = sqrt(mean(A²) + eps) exactly; with d = 0 it is the current batch's RMS.
    ``state_dict`` holds ``v`` and ``t``; ``decay``/``eps`` are configuration.
    """

    def __init__(self, decay: float = 0.99, eps: float = 1e-8):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.decay, self.eps = float(decay), float(eps)
        self.v, self.t = 0.0, 0

    def update(self, mean_square: float) -> float:
        """Fold in one batch's ``mean(A²)`` (already averaged across processes); returns the new σ̂."""
        mean_square = float(mean_square)
        if not (math.isfinite(mean_square) and mean_square >= 0):
            raise ValueError(f"mean_square must be finite and >= 0, got {mean_square}")
        self.v = self.decay * self.v + (1 - self.decay) * mean_square
        self.t += 1
        return self.sigma

    @property
    def sigma(self) -> float:
        if self.t == 0:
            raise RuntimeError("RunningScale.sigma before any update; call update(mean_square) first")
        return math.sqrt(self.v / (1 - self.decay**self.t) + self.eps)

    def state_dict(self) -> dict:
        return {"v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.v, self.t = float(state["v"]), int(state["t"])


@torch.no_grad()
def ema_update(target_params: Iterable[torch.Tensor], online_params: Iterable[torch.Tensor], rate: float) -> None:
    """In place ``target <- (1 - rate) · target + rate · online`` for each pair: Muesli's target
    network (the prior), an exponential moving average of the online parameters (rate α_target).

    ``rate = 1`` copies the online parameters; ``rate = 0`` leaves the target alone. Naive
    equivalent, per pair: ``t.copy_((1 - rate) * t + rate * o)``; this does the same three roundings
    in place (one temporary the size of one tensor), so the two agree bit for bit. ``add_(o,
    alpha=rate)`` would not: it fuses the multiply-add and differs in the last bit.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    targets, onlines = list(target_params), list(online_params)
    if len(targets) != len(onlines):
        raise ValueError(f"{len(targets)} target tensors but {len(onlines)} online tensors; pass matching models")
    for t, o in zip(targets, onlines):
        if t.shape != o.shape:
            raise ValueError(f"shape mismatch {tuple(t.shape)} vs {tuple(o.shape)}; pass parameters in the same order")
        t.mul_(1 - rate).add_(o.detach().to(t.dtype) * rate)
