"""KL to the reference policy: per-token estimators, KL-shaped rewards and the KL coefficient controllers.

Shapes: B batch, T completion time steps. Masks are bool, ``True`` = a real completion token.
Masked-out inputs are selected away with ``torch.where``, so padding values (even ``inf``) never leak
into results.
"""

from __future__ import annotations

import math

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π (http://joschu.net/blog/kl-approx.html).

    With ``log r = ref_per_token_logps - per_token_logps`` (= log π_ref(x)/π(x), x ~ π):
        ``"k1"``: ``-log r = logp - ref``. Unbiased, high variance, can be negative per token.
        ``"k2"``: ``½ (log r)²``. Biased (low bias near π = π_ref), low variance, >= 0.
        ``"k3"``: ``(r - 1) - log r``. Unbiased and >= 0 for every sample (``e^u >= 1 + u``).
    Args are (B, T); returns (B, T), not masked (the caller masks; padding may hold anything).
    Sign: positive when π puts more mass than π_ref on what it samples. k3 overflows to ``inf`` once
    ``ref - logp`` exceeds ~88 in fp32; that is the true value of the estimator, not clamped.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = ref_per_token_logps - per_token_logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(log_ratio) - log_ratio  # expm1: exact near r = 1 where k3 ~ ½(log r)²


def _check_rows_nonempty(mask: torch.Tensor, fn: str) -> None:
    empty = ~mask.any(dim=1)
    if bool(empty.any()):  # one host sync, once per rollout
        rows = empty.nonzero().flatten().tolist()[:10]
        raise ValueError(
            f"{fn}: rows {rows} have no True mask entry; every completion needs at least one token"
        )


def kl_shaped_rewards(
    scores: torch.Tensor, per_token_kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token PPO rewards: ``-beta * kl_t`` at every valid token, plus the score at the last one.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2
    (R(x, y) = r(x, y) - β log π(y|x)/ρ(y|x)), spread per token as in N implementation details #8.

    Args:
        scores: (B,) reward-model score per completion (after any EOS-trick penalty / normalisation).
        per_token_kl: (B, T) e.g. ``kl_per_token(logps, ref_logps, "k1")``.
        mask: (B, T) bool, True = completion token. Need not be a prefix; the score goes to the last
            True position of each row.
        beta: KL coefficient (>= 0).
    Returns:
        (B, T) rewards; masked positions are exactly 0. Raises ``ValueError`` for a row with no token.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    _check_rows_nonempty(mask, "kl_shaped_rewards")
    rewards = torch.where(mask, -beta * per_token_kl, per_token_kl.new_zeros(()))
    T = mask.shape[1]
    last = T - 1 - mask.flip(1).int().argmax(dim=1)  # (B,) argmax returns the first max: last True
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))


class FixedKLController:
    """A constant KL coefficient ``beta`` (N details #11: β ≈ 0.05 in the TL;DR reproduction)."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so trainers treat both controllers alike."""

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL to ``target`` (Ziegler et al. 2019, §2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    ``n_steps`` is how many samples (episodes) the KL was measured over since the last update, in the
    same unit as ``horizon`` (Ziegler et al.: horizon 10000 samples). ``state_dict`` holds only
    ``beta``; ``target``/``horizon`` are configuration and come from the (possibly edited) config.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}; the policy has diverged")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
