"""rlhfkit.losses.advantages: GAE, GRPO group baselines, RLOO leave-one-out, REINFORCE++ (KL: test_kl.py)."""

import math

import pytest
import torch

from rlhfkit.losses.advantages import gae, group_advantages, leave_one_out_advantages, reinforce_pp_advantages

TOL = dict(atol=1e-5, rtol=1e-5)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]



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
