"""Tests for the PPO clipped policy loss and the clipped value loss."""

import math

import pytest
import torch

from rlhfkit.losses.ppo import ppo_policy_loss, value_loss
from rlhfkit.ops import AGGREGATIONS, aggregate_loss

TOL = dict(atol=1e-5, rtol=1e-5)

# Five valid tokens over two rows (row 1 has one padding slot). old logps 0, so ratio = exp(logp).
RATIOS = torch.tensor([[0.5, 1.1, 1.5], [1.5, 0.5, 1.0]])
ADV = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def policy_inputs():
    logps = RATIOS.log().clone().requires_grad_(True)
    return logps, torch.zeros_like(RATIOS), ADV.clone(), MASK.clone()


def test_policy_loss_by_hand():
    """clip_eps 0.2; per token max(-Aρ, -A clip(ρ, 0.8, 1.2)):
    ρ=0.5, A=+1: max(-0.5, -0.8) = -0.5  (unclipped)
    ρ=1.1, A=+1: max(-1.1, -1.1) = -1.1  (inside)
    ρ=1.5, A=-1: max( 1.5,  1.2) =  1.5  (unclipped: pessimistic side)
    ρ=1.5, A=+1: max(-1.5, -1.2) = -1.2  (clipped)
    ρ=0.5, A=-1: max( 0.5,  0.8) =  0.8  (clipped)
    token_mean = (-0.5 - 1.1 + 1.5 - 1.2 + 0.8) / 5 = -0.1; clipfrac = 2/5; ratio_mean = 5.1/5 = 1.02.
    approx_kl = mean(ρ - 1 - log ρ) = mean(.193147, .004690, .094535, .094535, .193147) = 0.116011."""
    loss, m = ppo_policy_loss(*policy_inputs(), clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.1), **TOL)
    assert m["loss/policy"].item() == pytest.approx(-0.1, abs=1e-6)
    assert m["policy/clipfrac"].item() == pytest.approx(0.4, abs=1e-6)
    assert m["policy/ratio_mean"].item() == pytest.approx(1.02, abs=1e-6)
    assert m["policy/approx_kl"].item() == pytest.approx(0.116011, abs=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_policy_loss_uses_the_requested_aggregation(mode):
    """Per-token losses from the hand example: [[-0.5, -1.1, 1.5], [-1.2, 0.8, pad]].
    seq_mean = mean(-0.1/3, -0.4/2) = -0.116667; dr_grpo (max_tokens 4) = -0.5 / 8 = -0.0625."""
    per_token = torch.tensor([[-0.5, -1.1, 1.5], [-1.2, 0.8, 0.0]])
    expected = {"token_mean": -0.1, "seq_mean": (-0.1 / 3 - 0.2) / 2, "dr_grpo": -0.0625}[mode]
    loss, _ = ppo_policy_loss(*policy_inputs(), clip_eps=0.2, aggregation=mode, max_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(loss, aggregate_loss(per_token, MASK, mode, max_tokens=4), **TOL)


def one_token_grad(ratio, advantage, clip_eps=0.2, clip_eps_high=None):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = ppo_policy_loss(
        logp,
        torch.zeros(1, 1),
        torch.tensor([[advantage]]),
        torch.ones(1, 1, dtype=torch.bool),
        clip_eps,
        clip_eps_high,
    )
    loss.backward()
    return logp.grad.item(), m["policy/clipfrac"].item()


def test_clipping_engages_exactly_past_clip_eps():
    """A > 0: the gradient wrt logp is -Aρ (descent raises logp) until ρ passes 1 + eps, then 0.
    A < 0: the gradient is -Aρ > 0 (descent lowers logp) until ρ drops below 1 - eps, then 0."""
    grad, clipped = one_token_grad(1.199, 2.0)
    assert grad == pytest.approx(-2.0 * 1.199, rel=1e-5) and clipped == 0.0
    grad, clipped = one_token_grad(1.201, 2.0)
    assert grad == 0.0 and clipped == 1.0
    grad, clipped = one_token_grad(0.801, -2.0)
    assert grad == pytest.approx(2.0 * 0.801, rel=1e-5) and clipped == 0.0
    grad, clipped = one_token_grad(0.799, -2.0)
    assert grad == 0.0 and clipped == 1.0
    # The pessimistic side never clips: A > 0 with ρ far below 1, A < 0 with ρ far above 1.
    assert one_token_grad(0.3, 1.0)[0] == pytest.approx(-0.3, rel=1e-5)
    assert one_token_grad(3.0, -1.0)[0] == pytest.approx(3.0, rel=1e-5)


def test_clip_higher_is_asymmetric():
    """DAPO clip-higher (0.2 low, 0.28 high): ρ = 1.25 with A > 0 still learns, ρ = 1.29 does not;
    the lower bound stays 1 - 0.2."""
    assert one_token_grad(1.25, 1.0, 0.2, 0.28)[0] == pytest.approx(-1.25, rel=1e-5)
    assert one_token_grad(1.29, 1.0, 0.2, 0.28)[0] == 0.0
    assert one_token_grad(0.79, -1.0, 0.2, 0.28)[0] == 0.0
    assert one_token_grad(0.81, -1.0, 0.2, 0.28)[0] == pytest.approx(0.81, rel=1e-5)


def test_on_policy_first_step():
    """ρ = 1 everywhere: loss = -token_mean(A), no clipping, approx_kl 0, gradient = -A / n_tokens."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 4, generator=g)
    logps = old.clone().requires_grad_(True)
    adv = torch.randn(3, 4, generator=g)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    loss, m = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, -adv[mask].mean(), **TOL)
    assert m["policy/clipfrac"].item() == 0.0 and m["policy/approx_kl"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.where(mask, -adv / mask.sum(), 0), **TOL)


def test_positive_advantage_step_raises_the_token_logp():
    logp = torch.tensor([[-2.0, -1.0]], requires_grad=True)
    old = logp.detach().clone()
    loss, _ = ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    stepped = logp.detach() - 0.1 * logp.grad
    assert stepped[0, 0] > old[0, 0] and stepped[0, 1] < old[0, 1]


def test_policy_padding_never_contributes():
    base = policy_inputs()
    loss, m = ppo_policy_loss(*base, clip_eps=0.2)
    loss.backward()
    logps, old, adv, mask = policy_inputs()
    with torch.no_grad():
        logps[~mask] += 1e6
    old[~mask] -= 1e6
    adv[~mask] += 1e6
    loss2, m2 = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    loss2.backward()
    assert loss2.item() == loss.item()
    assert {k: v.item() for k, v in m2.items()} == {k: v.item() for k, v in m.items()}
    torch.testing.assert_close(logps.grad, base[0].grad, atol=0, rtol=0)
    assert (logps.grad[~mask] == 0).all()


# --- value loss --------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
OLD_VALUES = torch.tensor([[0.5, 0.5, 2.0, 0.0]])
RETURNS = torch.tensor([[0.0, 2.0, 3.0, 0.0]])
VMASK = torch.tensor([[True, True, True, False]])


def test_value_loss_by_hand():
    """eps 0.2; per token ½ max((v-R)², (clip(v, v_old ± 0.2) - R)²):
    v=1, old=0.5, R=0: clip -> 0.7; max(1, 0.49) = 1    -> 0.5   (unclipped term active)
    v=1, old=0.5, R=2: clip -> 0.7; max(1, 1.69) = 1.69 -> 0.845 (clipped term active)
    v=2, old=2,   R=3: clip -> 2;   max(1, 1)    = 1    -> 0.5
    token_mean = 1.845 / 3 = 0.615; clipfrac = 1/3. Unclipped (None): ½ (1 + 1 + 1) / 3 = 0.5."""
    loss, m = value_loss(VALUES, OLD_VALUES, RETURNS, VMASK, clip_eps_value=0.2)
    assert loss.item() == pytest.approx(0.615, abs=1e-6)
    assert m["loss/value"].item() == pytest.approx(0.615, abs=1e-6)
    assert m["value/clipfrac"].item() == pytest.approx(1 / 3, abs=1e-6)
    loss, m = value_loss(VALUES, OLD_VALUES, RETURNS, VMASK, clip_eps_value=None)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert m["value/clipfrac"].item() == 0.0


def test_value_clip_zeroes_the_gradient_only_where_the_clipped_term_wins():
    values = VALUES.clone().requires_grad_(True)
    loss, _ = value_loss(values, OLD_VALUES, RETURNS, VMASK, clip_eps_value=0.2)
    loss.backward()
    # d/dv of ½ (v - R)² / 3 = (v - R) / 3 where unclipped; 0 where clipped; 0 on padding.
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3, 0.0, -1 / 3, 0.0]]), **TOL)


def test_value_clip_engages_exactly_past_eps():
    """old 0, R 1, eps 0.2: the update toward R is stopped once v leaves the band old ± eps
    (v = 0.201: clipped (0.8)² = 0.64 beats (0.799)² = 0.638, gradient 0; v = 0.199: inside, gradient
    v - R). Moving away from R is never stopped (v = -0.201: (1.201)² beats (1.2)²)."""
    for v, expect_zero in ((0.199, False), (0.201, True), (-0.201, False)):
        values = torch.tensor([[v]], requires_grad=True)
        loss, _ = value_loss(
            values, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), 0.2
        )
        loss.backward()
        assert (values.grad.item() == 0.0) == expect_zero


def test_value_padding_never_contributes():
    values, old, returns = VALUES.clone(), OLD_VALUES.clone(), RETURNS.clone()
    values[~VMASK] += 1e6
    old[~VMASK] -= 1e6
    returns[~VMASK] = float("inf")
    for eps in (0.2, None):
        a, ma = value_loss(VALUES, OLD_VALUES, RETURNS, VMASK, eps)
        b, mb = value_loss(values, old, returns, VMASK, eps)
        assert a.item() == b.item()
        assert {k: v.item() for k, v in ma.items()} == {k: v.item() for k, v in mb.items()}


def test_bad_aggregation_and_mask_dtype():
    with pytest.raises(ValueError, match="token_mean, seq_mean, dr_grpo"):
        ppo_policy_loss(*policy_inputs(), clip_eps=0.2, aggregation="mean")
    with pytest.raises(TypeError, match="bool"):
        value_loss(VALUES, OLD_VALUES, RETURNS, VMASK.float(), 0.2)
