"""The DPO family of offline preference losses, plus KTO for unpaired good/bad labels.

Every pairwise loss is ``fn(p: PairLogps, beta, **params) -> (per_pair_loss (B,), metrics)`` and is
*unreduced*: the caller weights pairs (ties, preference strength) and reduces, e.g. ``loss.mean()``.
Log-probs are per-sequence sums over completion tokens (``logps``, (B,)); length-normalised variants
divide by ``chosen_lengths`` / ``rejected_lengths`` (completion token counts).

Notation: ``h = (logπ(y_w) - logπ_ref(y_w)) - (logπ(y_l) - logπ_ref(y_l))``, the difference of the
implicit rewards divided by β (DPO, Rafailov et al. 2023, eq. 7). Sign convention everywhere: the loss
falls as the chosen completion gains probability relative to the rejected one.

Metrics (0-dim detached tensors, batch means): ``rewards/chosen``, ``rewards/rejected`` (implicit
rewards: ``β (logπ - logπ_ref)`` for reference-based losses, ``β · logπ / length`` for the
reference-free ``simpo``/``orpo``, SimPO eq. 4), ``rewards/margin`` (chosen - rejected),
``rewards/accuracy`` (fraction of pairs with chosen reward > rejected), ``logps/chosen``,
``logps/rejected`` (sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rlhfkit.ops import masked_mean


@dataclass
class PairLogps:
    """Per-sequence log-probs of a batch of (chosen, rejected) completion pairs.

    All fields are (B,). ``ref_*`` are from the frozen reference policy (None for reference-free
    losses); ``*_lengths`` are completion token counts (float or long), needed by the length-normalised
    losses ``ipo``, ``simpo`` and ``orpo``.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.chosen_logps.shape
        if len(shape) != 1:
            raise ValueError(f"PairLogps fields must be (B,), chosen_logps has shape {tuple(shape)}")
        for name in (
            "rejected_logps",
            "ref_chosen_logps",
            "ref_rejected_logps",
            "chosen_lengths",
            "rejected_lengths",
        ):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"PairLogps.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if (self.ref_chosen_logps is None) != (self.ref_rejected_logps is None):
            raise ValueError("PairLogps: give both ref_chosen_logps and ref_rejected_logps, or neither")


def _require_reference(p: PairLogps, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    if p.ref_chosen_logps is None or p.ref_rejected_logps is None:
        raise ValueError(
            f"the {loss!r} loss needs reference log-probs: compute ref_chosen_logps/ref_rejected_logps "
            f"with the reference model, or choose a reference-free loss ({', '.join(sorted(REFERENCE_FREE))})"
        )
    return p.ref_chosen_logps, p.ref_rejected_logps


def _lengths(p: PairLogps, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion lengths as floats of the logps dtype, (B,) each."""
    if p.chosen_lengths is None or p.rejected_lengths is None:
        raise ValueError(
            f"the {loss!r} loss is length-normalised: set PairLogps.chosen_lengths and rejected_lengths"
        )
    dtype = p.chosen_logps.dtype
    return p.chosen_lengths.to(dtype), p.rejected_lengths.to(dtype)


def _average_logps(p: PairLogps, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-normalised log-probs ``logπ(y) / |y|`` (per-token mean), (B,) each."""
    chosen_len, rejected_len = _lengths(p, loss)
    return p.chosen_logps / chosen_len, p.rejected_logps / rejected_len


def _metrics(p: PairLogps, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    with torch.no_grad():
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "logps/chosen": p.chosen_logps.detach().mean(),
            "logps/rejected": p.rejected_logps.detach().mean(),
        }


def _reference_terms(p: PairLogps, beta: float, loss: str) -> tuple[torch.Tensor, dict]:
    """``h`` (B,) and the metrics shared by the reference-based losses."""
    ref_chosen, ref_rejected = _require_reference(p, loss)
    chosen_ratio = p.chosen_logps - ref_chosen
    rejected_ratio = p.rejected_logps - ref_rejected
    return chosen_ratio - rejected_ratio, _metrics(p, beta * chosen_ratio, beta * rejected_ratio)


def sigmoid_loss(p: PairLogps, beta: float, margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log σ(β h - m)``.

    ``margin`` m (B,), optional, is subtracted inside the sigmoid (preference strength, as the reward
    margin of Llama 2 §3.2.2; m = 0 is plain DPO). β → 0 gives log 2 for every pair.
    """
    h, metrics = _reference_terms(p, beta, "sigmoid")
    logits = beta * h
    if margin is not None:
        logits = logits - margin.to(logits.dtype)
    return -F.logsigmoid(logits), metrics


def ipo_loss(p: PairLogps, beta: float) -> tuple[torch.Tensor, dict]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17): ``(h̄ - 1/(2β))²``.

    β plays the paper's τ (regularisation). Choice: ``h̄`` uses *length-averaged* log-probs,
    ``h̄ = (logπ(y_w) - logπ_ref(y_w))/|y_w| - (logπ(y_l) - logπ_ref(y_l))/|y_l|``, as the authors'
    reference and TRL do; with summed log-probs the target margin 1/(2β) would have to scale with
    completion length. Requires ``chosen_lengths``/``rejected_lengths``.
    """
    if beta <= 0:
        raise ValueError(f"ipo needs beta > 0 (its target margin is 1/(2*beta)), got {beta}")
    _, metrics = _reference_terms(p, beta, "ipo")
    chosen_len, rejected_len = _lengths(p, "ipo")
    chosen_ratio = (p.chosen_logps - p.ref_chosen_logps) / chosen_len
    rejected_ratio = (p.rejected_logps - p.ref_rejected_logps) / rejected_len
    return (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2, metrics


def robust_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences", cDPO eq. 3).

    ``-(1 - ε) log σ(β h) - ε log σ(-β h)``: DPO against labels that are flipped with probability
    ε = ``label_smoothing`` ∈ [0, 0.5). ε = 0 is exactly ``sigmoid_loss``. This is *not* the unbiased
    "robust DPO" of Chowdhury et al. 2024 (which divides by 1 - 2ε and subtracts the flipped term);
    the name ``robust`` is kept for the trainers' loss registry.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is a flip probability in [0, 0.5), got {label_smoothing}")
    h, metrics = _reference_terms(p, beta, "robust")
    loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, metrics


def hinge_loss(p: PairLogps, beta: float) -> tuple[torch.Tensor, dict]:
    """SLiC-HF rank-calibration loss (Zhao et al. 2023) on the reference ratio: ``relu(1 - β h)``.

    The loss (and its gradient) is exactly 0 once ``β h >= 1``: pairs already separated by the margin
    stop contributing, unlike DPO's never-saturating sigmoid.
    """
    h, metrics = _reference_terms(p, beta, "hinge")
    return torch.relu(1.0 - beta * h), metrics


def simpo_loss(p: PairLogps, beta: float, gamma_beta_ratio: float = 0.5) -> tuple[torch.Tensor, dict]:
    """SimPO (Meng et al. 2024, eq. 6): ``-log σ(β/|y_w| logπ(y_w) - β/|y_l| logπ(y_l) - γ)``.

    Reference-free, length-normalised. The target margin is given as ``gamma_beta_ratio = γ/β`` (the
    paper tunes γ/β; typical β 2-10, γ/β 0.3-0.8), so the logit is ``β (ā_w - ā_l - γ/β)``.
    """
    avg_chosen, avg_rejected = _average_logps(p, "simpo")
    loss = -F.logsigmoid(beta * (avg_chosen - avg_rejected - gamma_beta_ratio))
    return loss, _metrics(p, beta * avg_chosen, beta * avg_rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate at both ends (Mächler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(p: PairLogps, beta: float) -> tuple[torch.Tensor, dict]:
    """ORPO (Hong et al. 2024, eqs. 6-7): ``NLL(y_w) + β · (-log σ(log OR))``, reference-free.

    ``NLL(y_w) = -logπ(y_w)/|y_w|`` (per-token mean over the chosen completion) and, with length-
    averaged log-probs ā (so ``P = exp(ā)`` is a per-token geometric-mean probability),
    ``log OR = log odds(y_w) - log odds(y_l)``, ``log odds = ā - log(1 - exp(ā))``. β is the paper's λ.

    Numerics: ``log(1 - exp(ā))`` uses ``log1mexp``; ā is clamped to at most ``-finfo.eps`` so that a
    completion the model reproduces with probability 1 gives a large finite log-odds rather than
    ``inf`` and a ``nan`` gradient (only this term is affected; the NLL uses the unclamped value).
    Extra metrics: ``loss/nll`` and ``rewards/log_odds_ratio`` (batch means).
    """
    avg_chosen, avg_rejected = _average_logps(p, "orpo")
    cap = -torch.finfo(avg_chosen.dtype).eps
    a_w, a_l = avg_chosen.clamp(max=cap), avg_rejected.clamp(max=cap)
    log_odds_ratio = (a_w - _log1mexp(a_w)) - (a_l - _log1mexp(a_l))
    nll = -avg_chosen
    loss = nll - beta * F.logsigmoid(log_odds_ratio)
    metrics = _metrics(p, beta * avg_chosen, beta * avg_rejected)
    metrics["loss/nll"] = nll.detach().mean()
    metrics["rewards/log_odds_ratio"] = log_odds_ratio.detach().mean()
    return loss, metrics


DPO_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
REFERENCE_FREE = frozenset({"simpo", "orpo"})


def kto_kl_estimate(mismatched_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024): ``max(0, mean(logπ - logπ_ref))``.

    Inputs (B,) are log-probs of *mismatched* pairs (completion y' of another prompt x'), a biased but
    cheap estimate of KL(π || π_ref). Returned detached (no gradient flows through z0). Under data
    parallelism, all-reduce the *mean* across processes before the clamp, as the paper uses the batch.
    """
    return (mismatched_logps - mismatched_ref_logps).detach().mean().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024, eq. 8), per example (unreduced): ``λ_y - v(x, y)``, where
    ``r = logπ(y) - logπ_ref(y)``, ``z0 = kl_ref`` and
    ``v = λ_D σ(β (r - z0))`` if desirable, ``λ_U σ(β (z0 - r))`` if undesirable.

    Args:
        logps, ref_logps: (B,) per-sequence log-probs under the policy and the reference.
        desirable: (B,) bool, True = a desirable (thumbs-up) example.
        kl_ref: scalar reference point z0, e.g. ``kto_kl_estimate``; detached here regardless.
        desirable_weight, undesirable_weight: λ_D, λ_U (paper: keep λ_D n_D / (λ_U n_U) in [1, 4/3]).
    Sign: the loss falls as a desirable example's r rises and as an undesirable example's r falls.
    Metrics: ``rewards/chosen`` / ``rewards/rejected`` (mean ``β r`` over desirable / undesirable
    examples, 0 if none), ``rewards/margin``, ``logps/chosen``, ``logps/rejected``, ``kl/kto_ref`` (z0).
    """
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be bool (True = desirable), got {desirable.dtype}")
    z0 = kl_ref.detach().to(logps.dtype)
    log_ratio = logps - ref_logps
    loss = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - log_ratio))),
    )
    with torch.no_grad():
        rewards = beta * log_ratio.detach()
        chosen, rejected = masked_mean(rewards, desirable), masked_mean(rewards, ~desirable)
        metrics = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,
            "logps/chosen": masked_mean(logps.detach(), desirable),
            "logps/rejected": masked_mean(logps.detach(), ~desirable),
            "kl/kto_ref": z0,
        }
    return loss, metrics
