"""Follow-up: PPO's and REINFORCE++'s whitening use the global batch's statistics. Two simulated
processes (each half of the batch, ``reduce_sum`` adding the other half's contribution) whiten exactly
as one process with the whole batch; the per-process statistics they replaced do not."""

from __future__ import annotations

import torch

from rlhfkit.losses.advantages import reinforce_pp_advantages, whiten
from rlhfkit.ops import masked_whiten


def other_process(x: torch.Tensor, mask: torch.Tensor):
    """A ``reduce_sum`` for this process that adds what the other process (``x``, ``mask``) contributes to
    each of whiten's two all-reduces: (sum, count), then the squared deviations from the global mean."""
    calls = []

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        if not calls:
            out = t + torch.stack([torch.where(mask, x, 0.0).sum(), mask.sum().float()])
            calls.append(out[0] / out[1])
            return out
        return t + torch.where(mask, (x - calls[0]) ** 2, 0.0).sum()
    return reduce_sum


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = torch.rand(6, 5, generator=g) > 0.3
    x[:3] += 4  # the two halves have different statistics
    return x, mask


def test_whiten_over_two_processes_equals_one_process():
    x, mask = batch()
    for shift_mean in (True, False):
        full = masked_whiten(x, mask, shift_mean=shift_mean)
        a = whiten(x[:3], mask[:3], other_process(x[3:], mask[3:]), shift_mean=shift_mean)
        b = whiten(x[3:], mask[3:], other_process(x[:3], mask[:3]), shift_mean=shift_mean)
        torch.testing.assert_close(torch.cat([a, b]), full)
        assert not torch.allclose(masked_whiten(x[:3], mask[:3], shift_mean=shift_mean), full[:3], atol=1e-2)
    torch.testing.assert_close(whiten(x, mask), masked_whiten(x, mask))  # no reduce_sum: this process only


def test_reinforce_pp_over_two_processes_equals_one_process():
    x, mask = batch()
    full = reinforce_pp_advantages(x, mask, gamma=0.9)
    returns = reinforce_pp_advantages(x, mask, gamma=0.9, reduce_sum=lambda t: t)  # same as full (1 process)
    torch.testing.assert_close(returns, full)
    # the other process's returns-to-go (G_t = r_t + gamma G_{t+1} over its valid tokens): what it whitens
    g = torch.zeros(3)
    rtg = torch.zeros(3, 5)
    for t in reversed(range(5)):
        m = mask[3:, t]
        g = torch.where(m, x[3:, t] + 0.9 * g, g)
        rtg[:, t] = torch.where(m, g, 0.0)
    a = reinforce_pp_advantages(x[:3], mask[:3], gamma=0.9, reduce_sum=other_process(rtg, mask[3:]))
    torch.testing.assert_close(a, full[:3])
