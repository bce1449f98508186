"""Tests for rlhfkit.ops: masked reductions, log-prob gathering, entropy, loss aggregation."""

import math

import pytest
import torch

from rlhfkit.ops import (
    AGGREGATIONS,
    aggregate_loss,
    entropy_from_logits,
    exact_div,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    selective_log_softmax,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def naive_selective_log_softmax(logits, index):
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits):
    logits = logits.float()
    return -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)


# --- exact_div ---------------------------------------------------------------------------------


def test_exact_div_divides():
    assert exact_div(12, 4, "rollout batch by mini-batch") == 3


def test_exact_div_raises_naming_what():
    with pytest.raises(ValueError, match=r"rollout batch by mini-batch: 10 is not divisible by 4"):
        exact_div(10, 4, "rollout batch by mini-batch")
    with pytest.raises(ValueError, match="by 0"):
        exact_div(10, 0, "x")


# --- masked reductions -------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean_by_hand():
    """True entries are 1, 2 (row 0) and 4 (row 1): sum 7, mean 7/3; per row sums 3, 4, means 1.5, 4."""
    torch.testing.assert_close(masked_sum(X, M), torch.tensor(7.0))
    torch.testing.assert_close(masked_mean(X, M), torch.tensor(7.0 / 3.0))
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=0), torch.tensor([2.5, 2.0, 0.0]))  # column 2 empty -> 0


def test_masked_mean_matches_boolean_indexing_and_empty_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    m = torch.rand(5, 7, generator=g) > 0.4
    torch.testing.assert_close(masked_mean(x, m), x[m].mean(), **TOL)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_reductions_ignore_inf_padding():
    x = X.clone()
    x[~M] = float("inf")
    assert masked_sum(x, M).item() == 7.0
    x.requires_grad_(True)
    masked_mean(x, M).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, M.float() / 3.0)


def test_masks_must_be_bool():
    with pytest.raises(TypeError, match="bool"):
        masked_mean(X, M.float())


def test_masked_var_matches_torch_var():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=g) * 3 + 1
    m = torch.rand(4, 9, generator=g) > 0.3
    torch.testing.assert_close(masked_var(x, m), x[m].var(unbiased=True), **TOL)
    torch.testing.assert_close(masked_var(x, m, unbiased=False), x[m].var(unbiased=False), **TOL)


def test_masked_var_by_hand_and_degenerate_masks():
    """Entries 1, 2, 4: mean 7/3; squared deviations 16/9, 1/9, 25/9 sum 42/9; /2 = 7/3, /3 = 14/9."""
    torch.testing.assert_close(masked_var(X, M), torch.tensor(7.0 / 3.0))
    torch.testing.assert_close(masked_var(X, M, unbiased=False), torch.tensor(14.0 / 9.0))
    with pytest.raises(ValueError, match="no True entry"):
        masked_var(X, torch.zeros_like(M))
    one = torch.zeros_like(M)
    one[0, 0] = True
    with pytest.raises(ValueError, match="single True entry"):
        masked_var(X, one)
    assert masked_var(X, one, unbiased=False).item() == 0.0


def test_masked_whiten_statistics_and_padding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 10, generator=g) * 5 + 3
    m = torch.rand(6, 10, generator=g) > 0.3
    w = masked_whiten(x, m)
    torch.testing.assert_close(w[m].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(w[m].var(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (w[~m] == 0).all()
    x2 = x.clone()
    x2[~m] += 1e6
    torch.testing.assert_close(masked_whiten(x2, m), w, atol=0, rtol=0)


def test_masked_whiten_without_mean_shift_keeps_mean():
    """Scale-only whitening (N details #9): the result has the original mean and unit variance."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, generator=g) * 2 + 5
    m = torch.rand(3, 8, generator=g) > 0.2
    w = masked_whiten(x, m, shift_mean=False)
    torch.testing.assert_close(w[m].mean(), x[m].mean(), **TOL)
    torch.testing.assert_close(w[m].var(), torch.tensor(1.0), atol=1e-5, rtol=0)


# --- selective_log_softmax ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_naive(dtype):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 5, 50, generator=g) * 4).to(dtype)
    index = torch.randint(0, 50, (3, 5), generator=g)
    torch.testing.assert_close(
        selective_log_softmax(logits, index), naive_selective_log_softmax(logits, index), **TOL
    )


def test_selective_log_softmax_gradient_matches_naive():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 4, 30, generator=g) * 3
    index = torch.randint(0, 30, (2, 4), generator=g)
    weights = torch.randn(2, 4, generator=g)
    grads = []
    for fn in (selective_log_softmax, naive_selective_log_softmax):
        logits = base.clone().requires_grad_(True)
        (fn(logits, index) * weights).sum().backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_low_precision(dtype):
    """Low precision takes the row-loop path: equal to the naive op in the same dtype, and close to the
    fp32 result on the same (already rounded) logits. Tolerance 0.05: outputs are ~-log V ~ -4..-12
    and bf16 keeps 8 mantissa bits, so rounding the output alone costs up to 12 * 2**-9 ~ 0.023."""
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 6, 1000, generator=g) * 3).to(dtype)
    index = torch.randint(0, 1000, (3, 6), generator=g)
    fast = selective_log_softmax(logits, index)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, naive_selective_log_softmax(logits, index), atol=0, rtol=0)
    reference = naive_selective_log_softmax(logits.float(), index)
    torch.testing.assert_close(fast.float(), reference, atol=0.05, rtol=0)


def test_selective_log_softmax_known_values():
    """logits (0, log 3) -> p = (1/4, 3/4): log-probs log 0.25 and log 0.75."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    out = selective_log_softmax(logits, torch.tensor([[0, 1]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.25), math.log(0.75)]]))


# --- entropy_from_logits -----------------------------------------------------------------------


def test_entropy_known_values():
    """Uniform over V = 8 has entropy log 8; a (near-)one-hot distribution has entropy ~0;
    logits (0, log 3) give p = (1/4, 3/4): H = -(1/4 log 1/4 + 3/4 log 3/4) = 0.562335."""
    uniform = torch.zeros(1, 1, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([[math.log(8.0)]]))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).abs().item() < 1e-6
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(entropy_from_logits(two), torch.tensor([[0.562335]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 7, 128, 10_000])
def test_entropy_matches_naive_for_any_chunking(chunk_size):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 11, 40, generator=g) * 3
    torch.testing.assert_close(
        entropy_from_logits(logits, chunk_size=chunk_size), naive_entropy(logits), **TOL
    )


def test_entropy_bf16_and_bad_chunk():
    """bf16 input: computed in fp32 per chunk, returned in bf16 (output rounding <= 4.2 * 2**-9)."""
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(2, 5, 64, generator=g) * 2).bfloat16()
    out = entropy_from_logits(logits, chunk_size=3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_entropy(logits), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)


# --- aggregate_loss ----------------------------------------------------------------------------

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
AGG_MASK = torch.tensor([[True, True, True], [True, False, False]])


def test_aggregate_loss_by_hand():
    """Valid tokens: row 0 = 1, 2, 3; row 1 = 4 (the 99s are padding).
    token_mean = (1+2+3+4)/4 = 2.5; seq_mean = mean(6/3, 4/1) = 3; dr_grpo(max_tokens=5) = 10/(5*2) = 1."""
    assert AGGREGATIONS == ("token_mean", "seq_mean", "dr_grpo")
    torch.testing.assert_close(aggregate_loss(PER_TOKEN, AGG_MASK, "token_mean"), torch.tensor(2.5))
    torch.testing.assert_close(aggregate_loss(PER_TOKEN, AGG_MASK, "seq_mean"), torch.tensor(3.0))
    torch.testing.assert_close(
        aggregate_loss(PER_TOKEN, AGG_MASK, "dr_grpo", max_tokens=5), torch.tensor(1.0)
    )


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_loss_padding_never_contributes(mode):
    perturbed = PER_TOKEN.clone()
    perturbed[~AGG_MASK] += 1e6
    a = aggregate_loss(PER_TOKEN, AGG_MASK, mode, max_tokens=5)
    b = aggregate_loss(perturbed, AGG_MASK, mode, max_tokens=5)
    assert a.item() == b.item()


def test_aggregate_loss_bad_mode_and_missing_max_tokens():
    with pytest.raises(ValueError, match="token_mean, seq_mean, dr_grpo"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "sum")
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "dr_grpo")


def test_aggregate_loss_accumulation_invariance():
    """Two equal-row halves averaged == whole batch for seq_mean and dr_grpo (constant normalisers),
    but not for token_mean when the halves hold different token counts (documented caveat)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, generator=g)
    lengths = torch.tensor([6, 1, 2, 2])  # halves hold 7 and 4 tokens
    m = torch.arange(6)[None, :] < lengths[:, None]
    for mode in ("seq_mean", "dr_grpo"):
        whole = aggregate_loss(x, m, mode, max_tokens=6)
        halves = (
            aggregate_loss(x[:2], m[:2], mode, max_tokens=6)
            + aggregate_loss(x[2:], m[2:], mode, max_tokens=6)
        ) / 2
        torch.testing.assert_close(whole, halves, **TOL)
    whole = aggregate_loss(x, m, "token_mean")
    halves = (aggregate_loss(x[:2], m[:2], "token_mean") + aggregate_loss(x[2:], m[2:], "token_mean")) / 2
    assert (whole - halves).abs().item() > 1e-3
