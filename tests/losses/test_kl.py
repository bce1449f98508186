"""rlhfkit.losses.kl: the per-token KL estimators, KL-shaped rewards and the KL coefficient controllers."""

import math

import pytest
import torch

from rlhfkit.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_per_token,
    kl_shaped_rewards,
)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]



# --- kl_per_token ------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    """logp = -1, ref = -2: log r = ref - logp = -1.
    k1 = -log r = 1; k2 = ½ (log r)² = 0.5; k3 = (r - 1) - log r = e^-1 - 1 + 1 = e^-1 = 0.367879."""
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), torch.tensor([[1.0]]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), torch.tensor([[0.5]]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), torch.tensor([[math.exp(-1.0)]]))
    for est in KL_ESTIMATORS:
        assert kl_per_token(ref, ref, est).item() == 0.0


def test_k3_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 64, generator=g) * 10
    ref = torch.randn(64, 64, generator=g) * 10
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    tiny = torch.tensor([[1e-7, -1e-7, 1e-4]])  # expm1 keeps precision where k3 ~ ½ u²
    assert (kl_per_token(tiny, torch.zeros_like(tiny), "k3") >= 0).all()


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_k1_and_k3_are_unbiased_on_a_toy_categorical():
    """Sample x ~ q over 6 categories; the means of k1 and k3 converge to the exact KL(q || p).
    Tolerance: 5 standard errors of each estimator's sample mean (seeded, so deterministic; a sign or
    direction error in the estimator shifts the mean by O(KL) = O(0.3), ~100 standard errors)."""
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (q * (q.log() - p.log())).sum()
    n = 1_000_000
    x = torch.multinomial(q, n, replacement=True, generator=g)
    logq, logp = q.log()[x].view(1, n), p.log()[x].view(1, n)
    for est in ("k1", "k3"):
        samples = kl_per_token(logq, logp, est)
        stderr = samples.std() / math.sqrt(n)
        assert abs(samples.mean() - exact) < 5 * stderr, (est, samples.mean().item(), exact.item())
    assert exact > 0.05  # the distributions differ enough for the check to mean something


# --- kl_shaped_rewards -------------------------------------------------------------------------


def test_kl_shaped_rewards_by_hand():
    """beta = 0.5, kl = [[.1, .2, .3], [.4, .5, pad]], scores = [1, 2]:
    row 0: [-.05, -.1, -.15 + 1] ; row 1: [-.2, -.25 + 2, 0] (padding exactly 0)."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, float("inf")]])
    mask = prefix_mask([3, 2], 3)
    out = kl_shaped_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))


def test_kl_shaped_rewards_score_goes_to_last_true_even_with_holes():
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])
    out = kl_shaped_rewards(torch.tensor([3.0, 4.0]), torch.zeros(2, 4), mask, beta=0.1)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))


def test_kl_shaped_rewards_padding_never_contributes():
    g = torch.Generator().manual_seed(2)
    kl = torch.randn(5, 7, generator=g)
    mask = prefix_mask([7, 1, 3, 5, 2], 7)
    scores = torch.randn(5, generator=g)
    perturbed = kl.clone()
    perturbed[~mask] += 1e6
    torch.testing.assert_close(
        kl_shaped_rewards(scores, kl, mask, 0.2),
        kl_shaped_rewards(scores, perturbed, mask, 0.2),
        atol=0,
        rtol=0,
    )


def test_kl_shaped_rewards_empty_row_raises():
    mask = prefix_mask([2, 0], 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        kl_shaped_rewards(torch.ones(2), torch.zeros(2, 3), mask, 0.1)


# --- KL controllers ----------------------------------------------------------------------------


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 512)
    assert c.beta == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.beta == 0.05


def test_adaptive_kl_controller_by_hand():
    """beta 0.1, target 6, horizon 10000, n_steps 100 (so K = 0.01):
    KL 9   -> error 0.5  clipped to 0.2  -> beta 0.1 * (1 + 0.002)  = 0.1002
    KL 6.6 -> error 0.1  (not clipped)   -> beta * (1 + 0.001)
    KL 3   -> error -0.5 clipped to -0.2 -> beta * (1 - 0.002)
    KL 6   -> error 0                    -> unchanged."""
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 100)
    assert c.beta == pytest.approx(0.1002, rel=1e-12)
    c.update(6.6, 100)
    assert c.beta == pytest.approx(0.1002 * 1.001, rel=1e-12)
    c.update(3.0, 100)
    assert c.beta == pytest.approx(0.1002 * 1.001 * 0.998, rel=1e-12)
    before = c.beta
    c.update(6.0, 100)
    assert c.beta == pytest.approx(before, rel=1e-12)


def test_adaptive_kl_controller_resume_reproduces_run():
    kls = [1.0, 8.0, 5.0, 12.0, 0.5, 6.5]
    straight = AdaptiveKLController(0.2, 4.0, 1000)
    for kl in kls:
        straight.update(kl, 64)
    first = AdaptiveKLController(0.2, 4.0, 1000)
    for kl in kls[:3]:
        first.update(kl, 64)
    resumed = AdaptiveKLController(0.2, 4.0, 1000)
    resumed.load_state_dict(first.state_dict())
    for kl in kls[3:]:
        resumed.update(kl, 64)
    assert resumed.beta == straight.beta
    assert straight.beta != 0.2


def test_adaptive_kl_controller_rejects_bad_values():
    with pytest.raises(ValueError, match="target and horizon"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="finite"):
        AdaptiveKLController(0.1, target=1.0, horizon=10).update(float("nan"), 1)
    with pytest.raises(ValueError, match="beta"):
        FixedKLController(-1.0)
