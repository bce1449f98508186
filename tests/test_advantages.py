"""Tests for rlhfkit.advantages: KL estimators, reward shaping, GAE, GRPO/RLOO/REINFORCE++, KL control."""

import math

import pytest
import torch

from rlhfkit.losses.advantages import gae, group_advantages, leave_one_out_advantages, reinforce_pp_advantages
from rlhfkit.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_per_token,
    kl_shaped_rewards,
)

TOL = dict(atol=1e-5, rtol=1e-5)


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


# --- gae ---------------------------------------------------------------------------------------


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-row python loop over the valid tokens only (compacted), then scattered back."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        r = [rewards[b, i].item() for i in idx]
        v = [values[b, i].item() for i in idx]
        a, next_v = 0.0, 0.0
        out = [0.0] * len(idx)
        for k in reversed(range(len(idx))):
            a = r[k] + gamma * next_v - v[k] + gamma * lam * a
            out[k] = a
            next_v = v[k]
        for k, i in enumerate(idx):
            adv[b, i] = out[k]
            ret[b, i] = out[k] + v[k]
    return adv, ret


def test_gae_docstring_example():
    """See the worked example in gae's docstring (gamma 0.9, lam 0.5):
    advantages [0.0445, 0.41, 0.2, 0], returns [0.5445, 0.81, 1.0, 0]."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.8, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0445, 0.41, 0.2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5445, 0.81, 1.0, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_naive_on_right_padded_batches(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = prefix_mask(torch.randint(1, T + 1, (B,), generator=g), T)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    nadv, nret = naive_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, nadv, **TOL)
    torch.testing.assert_close(ret, nret, **TOL)


def test_gae_skips_holes_in_the_mask():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    mask = torch.rand(4, 8, generator=g) > 0.4
    mask[:, 0] = True
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    nadv, nret = naive_gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, nadv, **TOL)
    torch.testing.assert_close(ret, nret, **TOL)


def test_gae_lambda_one_is_monte_carlo():
    """gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t, and the returns are the undiscounted reward-to-go."""
    g = torch.Generator().manual_seed(4)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = prefix_mask([5, 3, 1], 5)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = torch.where(mask, rewards, 0)
    to_go = r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, torch.where(mask, to_go, 0), **TOL)
    torch.testing.assert_close(adv, torch.where(mask, to_go - values, 0), **TOL)


def test_gae_padding_never_contributes():
    g = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = prefix_mask([6, 2, 4, 1], 6)
    r2, v2 = rewards.clone(), values.clone()
    r2[~mask] += 1e6
    v2[~mask] = float("inf")
    a1, ret1 = gae(rewards, values, mask, 1.0, 0.95)
    a2, ret2 = gae(r2, v2, mask, 1.0, 0.95)
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)
    torch.testing.assert_close(ret1, ret2, atol=0, rtol=0)
    assert (a1[~mask] == 0).all() and (ret1[~mask] == 0).all()


# --- group-relative advantages -----------------------------------------------------------------


def test_group_advantages_by_hand():
    """Groups of 3: (1, 2, 3) has mean 2, std (Bessel) 1 -> (-1, 0, 1) / (1 + 1e-4);
    (5, 5, 5) has mean 5, std 0 -> 0. Without scaling (Dr. GRPO): (-1, 0, 1, 0, 0, 0)."""
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(scores, 3), expected / (1 + 1e-4))
    torch.testing.assert_close(group_advantages(scores, 3, scale=False), expected)


def test_group_advantages_bad_sizes():
    with pytest.raises(ValueError, match="number of scores by group_size: 5 is not divisible by 2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)


def test_leave_one_out_by_hand():
    """(1, 2, 3): 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; (0, 4): -4, 4."""
    out = leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0]), 3)
    torch.testing.assert_close(out, torch.tensor([-1.5, 0.0, 1.5]))
    torch.testing.assert_close(
        leave_one_out_advantages(torch.tensor([0.0, 4.0]), 2), torch.tensor([-4.0, 4.0])
    )


def test_leave_one_out_equals_scaled_mean_baseline():
    g = torch.Generator().manual_seed(6)
    scores, K = torch.randn(20, generator=g), 4
    grouped = scores.view(-1, K)
    expected = (K / (K - 1)) * (grouped - grouped.mean(1, keepdim=True))
    torch.testing.assert_close(leave_one_out_advantages(scores, K), expected.flatten(), **TOL)
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(scores, 1)


# --- REINFORCE++ -------------------------------------------------------------------------------


def test_reinforce_pp_by_hand():
    """gamma = 0.5; rewards [[0, 1], [2, pad]] -> returns-to-go [[0 + .5*1, 1], [2]] = 0.5, 1, 2.
    mean 7/6, unbiased var ((−2/3)² + (−1/6)² + (5/6)²)/2 = (16+1+25)/36/2 = 7/12;
    advantages = (G - 7/6) / sqrt(7/12)."""
    rewards = torch.tensor([[0.0, 1.0], [2.0, 123.0]])
    mask = torch.tensor([[True, True], [True, False]])
    out = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    s = math.sqrt(7 / 12)
    torch.testing.assert_close(
        out, torch.tensor([[(0.5 - 7 / 6) / s, (1 - 7 / 6) / s], [(2 - 7 / 6) / s, 0.0]])
    )


def test_reinforce_pp_matches_naive():
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(5, 8, generator=g)
    mask = prefix_mask([8, 3, 5, 1, 6], 8)
    returns = []
    for b in range(5):
        n, running, row = int(mask[b].sum()), 0.0, []
        for t in reversed(range(n)):
            running = rewards[b, t].item() + 0.9 * running
            row.append(running)
        returns.append(row[::-1])
    flat = torch.tensor([x for row in returns for x in row])
    whitened = (flat - flat.mean()) / flat.std()
    out = reinforce_pp_advantages(rewards, mask, gamma=0.9)
    torch.testing.assert_close(out[mask], whitened, **TOL)
    assert (out[~mask] == 0).all()
    perturbed = rewards.clone()
    perturbed[~mask] += 1e6
    torch.testing.assert_close(reinforce_pp_advantages(perturbed, mask, gamma=0.9), out, atol=0, rtol=0)


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
