"""Advantage estimators: GAE (PPO), group baselines (GRPO, Dr. GRPO), leave-one-out (RLOO, CMPO) and
REINFORCE++'s whitened returns.

Shapes: B batch, T completion time steps, G group size. Masks are bool, ``True`` = a real completion
token. Masked-out inputs are selected away with ``torch.where``, so padding values (even ``inf``) never
leak into results. Everything here is normally called under ``torch.no_grad``, but stays differentiable.
"""

from __future__ import annotations

import torch

from rlhfkit.ops import exact_div, masked_whiten


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), vectorised over B.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    t+1 means the next *valid* token of the row; after the last valid token ``V = 0`` and ``A = 0``
    (the episode ends). Masked positions are skipped (so a mask with holes, e.g. tool output in a
    multi-turn completion, chains across them) and are 0 in both outputs. Returns = A + V.
    Naive equivalent: a python loop per row over that row's valid tokens (``naive_gae`` in
    ``tests/losses/test_advantages.py``, compared on random right-padded and holed masks).

    Args: rewards, values (B, T) float; mask (B, T) bool; gamma discount, lam GAE λ (N details #8:
    gamma = 1, lam = 0.95). Returns ``(advantages, returns)``, both (B, T).

    Worked example (one row, gamma = 0.9, lam = 0.5; the 4th position is padding)::

        rewards = [0, 0, 1, *], values = [0.5, 0.4, 0.8, *], mask = [T, T, T, F]
        delta_2 = 1 + 0.9*0   - 0.8 =  0.2     A_2 =  0.2
        delta_1 = 0 + 0.9*0.8 - 0.4 =  0.32    A_1 =  0.32 + 0.45*0.2  = 0.41
        delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14    A_0 = -0.14 + 0.45*0.41 = 0.0445
        advantages = [0.0445, 0.41, 0.2, 0], returns = [0.5445, 0.81, 1.0, 0]
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    zero = _zero(rewards)
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)
    next_adv = rewards.new_zeros(B)
    advs_reversed = []
    for t in reversed(range(T)):
        m = mask[:, t]
        v = torch.where(m, values[:, t], zero)
        delta = torch.where(m, rewards[:, t], zero) + gamma * next_value - v
        adv_t = torch.where(m, delta + gamma * lam * next_adv, zero)
        next_adv = torch.where(m, adv_t, next_adv)  # a masked step carries the future through unchanged
        next_value = torch.where(m, v, next_value)
        advs_reversed.append(adv_t)
    advantages = torch.stack(advs_reversed[::-1], dim=1)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def _valid_groups(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None, size_rule: str):
    """(G, K) scores with invalid entries set to 0, (G, K) bool valid mask, (G, 1) valid counts."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"{size_rule}, got {group_size}")
    n_groups = exact_div(scores.shape[0], group_size, "number of scores by group_size")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    elif valid.dtype != torch.bool or valid.shape != scores.shape:
        raise TypeError(f"valid must be a bool tensor of the scores' shape {tuple(scores.shape)}, "
                        f"got {valid.dtype} {tuple(valid.shape)}")
    v = valid.view(n_groups, group_size)
    grouped = torch.where(v, scores.view(n_groups, group_size), _zero(scores))  # NaN in an invalid entry stays out
    return grouped, v, v.sum(dim=1, keepdim=True)


def group_advantages(
    scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision).

    ``scores`` (B,) holds consecutive groups of ``group_size`` completions of the same prompt.
    ``scale=True``: ``(r_i - mean(r)) / (std(r) + eps)``, std with Bessel's correction (as TRL's
    ``torch.std``); ``scale=False``: ``r_i - mean(r)`` (Dr. GRPO, Liu et al. 2025, drops the std that
    up-weights too-easy/too-hard prompts). A group with equal scores gets advantage 0.

    ``valid`` (B,) bool, ``True`` = the sample has a score (default: all). The mean and std run over
    the n valid samples of each group only (std with n - 1); an invalid sample gets advantage 0 and its
    score (any value, NaN included) is never read. A group with n < 2 valid samples has no baseline:
    all its advantages are 0. Returns (B,). ``group_size`` must be >= 2 and divide B (``exact_div``).
    """
    grouped, v, n = _valid_groups(scores, group_size, valid,
                                 "group_size must be >= 2 (a group of 1 has no baseline)")
    mean = grouped.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(v, grouped - mean, _zero(scores))
    adv = centred
    if scale:
        std = (centred.square().sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        adv = centred / (std + eps)
    return torch.where(n >= 2, adv, _zero(scores)).reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
    for Learning from Human Feedback in LLMs"; the estimator is Kool et al. 2019's).

    ``A_i = r_i - 1/(K-1) sum_{j != i} r_j`` within each consecutive group of ``K = group_size``
    completions of one prompt (equivalently ``K/(K-1) (r_i - mean(r))``). Returns (B,).

    ``valid`` (B,) bool, ``True`` = the sample has a score (default: all). The baseline averages the
    other *valid* samples of the group, so with n valid ``A_i = n/(n-1) (r_i - mean of the valid)``;
    an invalid sample gets advantage 0 (its score is never read), and a group with n < 2 valid samples
    gets 0 throughout (no other sample to form a baseline).
    """
    grouped, v, n = _valid_groups(scores, group_size, valid,
                                 "leave-one-out needs group_size >= 2 (the baseline averages the other K-1)")
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (n - 1).clamp(min=1)
    adv = torch.where(v & (n >= 2), grouped - others_mean, _zero(scores))
    return adv.reshape(-1)


def whiten(x: torch.Tensor, mask: torch.Tensor, reduce_sum=None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` with the mean and unbiased variance of the True entries over *every process*.

    ``reduce_sum(t)`` sums a tensor over the processes (``lambda t: acc.reduce(t, "sum")``; every
    process must call this together); None = this process's entries only. Two passes (sum and count,
    then the sum of squared deviations from the global mean), so two processes with half the batch each
    whiten exactly as one process with the whole batch. Raises ``ValueError`` with fewer than 2 entries.
    """
    if reduce_sum is None:
        return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    zero = _zero(x)
    total, count = reduce_sum(torch.stack([torch.where(mask, x, zero).sum(), mask.sum().to(x.dtype)]))
    n = int(count.item())
    if n < 2:
        raise ValueError(f"whiten: {n} valid entries over all processes; the unbiased variance needs 2")
    mean = total / count
    var = reduce_sum(torch.where(mask, (x - mean) ** 2, zero).sum()) / (count - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, zero)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            reduce_sum=None) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, arXiv 2501.03262): whitened discounted return-to-go.

    ``G_t = r_t + gamma * G_{t+1}`` over the valid tokens of each row (masked positions skipped, as in
    ``gae``), then whitened with mean shift over *all* valid tokens of the batch (global batch
    normalisation, ``masked_whiten``). Usually ``rewards = kl_shaped_rewards(...)``. Naive equivalent:
    a per-row python loop for G, then ``(G[mask] - G[mask].mean()) / G[mask].std()`` (tested).
    Args (B, T); returns (B, T) with masked positions 0. Needs at least 2 valid tokens in the batch.
    ``reduce_sum``: as :func:`whiten`, so the batch is the global one over all processes.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    zero = _zero(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    returns_reversed = []
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        running = torch.where(m, rewards[:, t] + gamma * running, running)
        returns_reversed.append(torch.where(m, running, zero))
    returns = torch.stack(returns_reversed[::-1], dim=1)
    return whiten(returns, mask, reduce_sum, shift_mean=True)
