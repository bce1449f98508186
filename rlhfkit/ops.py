"""Masked reductions, log-prob gathering and loss aggregation shared by every trainer.

Conventions (binding across rlhfkit): masks are ``bool`` with ``True`` = the entry counts; B batch,
T time, V vocab. Masked-out entries are *selected away* with ``torch.where`` rather than multiplied by
0, so padding holding ``inf``/``nan``/garbage never reaches a result or a gradient (``inf * 0 = nan``).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")


def exact_div(a: int, b: int, what: str = "") -> int:
    """``a // b``, raising ``ValueError`` naming ``what`` unless ``b`` divides ``a`` exactly.

    Batch sizes must divide (rollout ⊇ mini ⊇ micro batch); rounding would silently drop samples.
    """
    label = f"{what}: " if what else ""
    if b == 0:
        raise ValueError(f"{label}cannot divide {a} by 0")
    if a % b != 0:
        raise ValueError(
            f"{label}{a} is not divisible by {b} (remainder {a % b}); choose sizes that divide exactly"
        )
    return a // b


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = counts), got {mask.dtype}; use mask.bool()")
    return mask.expand_as(x)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over entries where ``mask`` is True; over all dims when ``dim`` is None.

    ``mask`` is bool and broadcastable to ``x``. Naive equivalent: ``(x * mask).sum(dim)`` (which
    turns ``inf`` padding into ``nan``; this does not).
    """
    mask = _check_mask(x, mask)
    zeroed = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over True entries of ``mask`` (all dims when ``dim`` is None); 0 where none counts.

    Naive equivalent: ``x[mask].mean()`` for ``dim=None`` (``nan`` on an empty mask; this gives 0).
    """
    mask = _check_mask(x, mask)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the True entries of ``x`` (a scalar), Bessel-corrected when ``unbiased``.

    Raises ``ValueError`` on an empty mask, or a single entry with ``unbiased`` (the variance is
    undefined; silently returning ``nan``/0 would poison whitening). Checking costs one host sync.
    Naive equivalent: ``x[mask].var(unbiased=unbiased)``.
    """
    mask = _check_mask(x, mask)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("masked_var: the mask has no True entry; there is nothing to take the variance of")
    if unbiased and n == 1:
        raise ValueError(
            "masked_var: a single True entry has no unbiased variance; pass unbiased=False or more data"
        )
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean/var (unbiased) over the True entries of ``mask``.

    With ``shift_mean=False`` the mean is added back (scale only): N implementation details #9 whiten
    rewards without a mean shift so that the sign of the reward survives. Masked-out entries are 0.
    """
    mask = _check_mask(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` without materialising the (B, T, V) log-softmax.

    Args:
        logits: (B, T, V) unnormalised scores (already divided by the sampling temperature).
        index: (B, T) integer token ids.
    Returns:
        (B, T) log-probabilities of ``index``, in ``logits.dtype``.

    Naive equivalent (``tests/test_ops.py`` compares them)::

        torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)

    fp32/fp64: ``logits.gather(index) - logsumexp(logits)``, with ``logsumexp`` taken one batch row at
    a time: ``logsumexp`` allocates a (T, V) temporary internally, so looping caps the extra memory at
    one row instead of a second (B, T, V) tensor.
    fp16/bf16: ``logsumexp`` in low precision loses too much (the subtraction of two numbers of size
    ~log V cancels), so we loop over rows and take ``log_softmax`` of one (T, V) row at a time; the
    values equal the naive ones bit for bit.
    """
    index = index.long()
    if logits.shape[0] == 0:
        return logits.new_zeros(index.shape)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (B, T)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T), row loop caps memory
        return picked - lse
    rows = []
    for row_logits, row_index in zip(logits, index):  # (T, V), (T,)
        row_logps = torch.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of the softmax over the last dim, per position.

    Args:
        logits: (B, T, V) (any leading shape works).
        chunk_size: positions processed at once; bounds the temporary (chunk_size, V) fp32 buffers.
    Returns:
        (B, T) entropies in nats, in ``logits.dtype``.

    Naive equivalent: ``-(softmax(logits) * log_softmax(logits)).sum(-1)``. Each chunk is computed in
    fp32 (bf16 entropies are otherwise off by ~1e-2). Under ``torch.no_grad`` (how entropy is logged)
    the memory saving is real; with autograd the chunks' activations are kept for backward anyway.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    out = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = torch.log_softmax(chunk.float(), dim=-1)
        out.append(-(logps.exp() * logps).sum(-1))
    if not out:
        return logits.new_zeros(logits.shape[:-1])
    return torch.cat(out).reshape(logits.shape[:-1]).to(logits.dtype)


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_tokens: int | None = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar; the reduction is a choice with real consequences.

    Modes (``AGGREGATIONS``):
        ``"token_mean"``: ``sum(loss[mask]) / mask.sum()``. Every token weighs the same; long
            completions dominate. (PPO as in the N implementation details; DAPO §3.3.)
        ``"seq_mean"``: mean over each row's valid tokens, then mean over the B rows (GRPO, Shao et
            al. 2024, eq. 3: ``1/G sum_i 1/|o_i| sum_t``). Tokens of short completions weigh more.
            A row with no valid token contributes 0 and still counts in B.
        ``"dr_grpo"``: ``sum(loss[mask]) / (max_tokens * B)`` (Dr. GRPO, Liu et al. 2025,
            "Understanding R1-Zero-Like Training", §3.1): a constant normaliser removes the length
            bias; ``max_tokens`` (the generation length limit) is required. Ignored by other modes.
    Empty masks give 0 (``token_mean``). Note for gradient accumulation: ``token_mean`` normalises by
    this micro-batch's tokens, so accumulated micro-batches of unequal token counts differ from one
    big batch; ``dr_grpo`` and (for equal row counts) ``seq_mean`` do not.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")
    if per_token.dim() != 2:
        raise ValueError(f"per_token must be (B, T), got shape {tuple(per_token.shape)}")
    mask = _check_mask(per_token, mask)
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    if mode == "seq_mean":
        return masked_mean(per_token, mask, dim=1).mean()
    if max_tokens is None or max_tokens <= 0:
        raise ValueError(
            f"aggregation 'dr_grpo' needs max_tokens > 0 (the max completion length), got {max_tokens}"
        )
    return masked_sum(per_token, mask) / (max_tokens * per_token.shape[0])
