"""GSPO and CISPO (rlhfkit.losses.policy) against numbers worked by hand, against their naive
sequence-level / REINFORCE forms, and against PPO-clip where they must differ (and where they must not)."""

import math

import pytest
import torch

from rlhfkit.losses.policy import POLICY_LOSSES, cispo_policy_loss, gspo_policy_loss
from rlhfkit.losses.ppo import ppo_policy_loss

TOL = dict(atol=1e-5, rtol=1e-5)
MASK = torch.tensor([[True, True], [True, True]])


def grad_of(loss_fn, ratios, adv, mask, **kw):
    logps = ratios.log().clone().requires_grad_(True)
    loss, m = loss_fn(logps, torch.zeros_like(ratios), adv, mask, **kw)
    loss.backward()
    return loss, m, logps.grad


# --- GSPO ---------------------------------------------------------------------------------------------

GSPO_RATIOS = torch.tensor([[0.5, 2.0], [math.exp(0.1), math.exp(0.3)]])
GSPO_ADV = torch.ones(2, 2)


def test_gspo_by_hand():
    """clip_eps 0.2, old logps 0, A = +1 everywhere, seq_mean.
    Row 0: log ρ = (-0.693147, 0.693147), mean 0 -> s_0 = 1: inside [0.8, 1.2], term -1 on both tokens.
    Row 1: log ρ = (0.1, 0.3), mean 0.2 -> s_1 = e^0.2 = 1.221403 > 1.2: max(-1.221403, -1.2) = -1.2,
           the clipped term, on both tokens (the whole sequence is clipped).
    loss = mean(-1, -1.2) = -1.1; clipfrac = 2 of 4 tokens = 0.5; ratio_mean = (1 + 1.221403) / 2 = 1.110701.
    Gradient wrt logp: row 0: -A s_0 / |y| / B = -1 / 2 / 2 = -0.25 per token; row 1: 0 (clipped).
    approx_kl (k3 over tokens, ρ - 1 - log ρ): (0.193147, 0.306853, 0.005171, 0.049859) -> mean 0.138757."""
    loss, m, grad = grad_of(gspo_policy_loss, GSPO_RATIOS, GSPO_ADV, MASK, clip_eps=0.2, aggregation="seq_mean")
    torch.testing.assert_close(loss, torch.tensor(-1.1), **TOL)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.0, 0.0]]), **TOL)
    assert m["policy/clipfrac"].item() == pytest.approx(0.5, abs=1e-6)
    assert m["policy/ratio_mean"].item() == pytest.approx(1.110701, abs=1e-5)
    assert m["policy/approx_kl"].item() == pytest.approx(0.138757, abs=1e-5)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_gspo_differs_from_ppo_clip_on_the_same_tokens():
    """PPO-clip on the same inputs clips token-by-token: row 0 keeps token 0 (ρ = 0.5, term -0.5) and
    clips token 1 (ρ = 2 -> -1.2); row 1 keeps token 0 (-1.105171) and clips token 1 (-1.2).
    seq_mean = mean(-0.85, -1.152585) = -1.001293, and its gradient is (-0.125, 0) / (-0.276293, 0):
    PPO clips a token inside a sequence GSPO keeps, and keeps a token of the sequence GSPO clips."""
    ppo, _, ppo_grad = grad_of(ppo_policy_loss, GSPO_RATIOS, GSPO_ADV, MASK, clip_eps=0.2, aggregation="seq_mean")
    gspo, _, gspo_grad = grad_of(gspo_policy_loss, GSPO_RATIOS, GSPO_ADV, MASK, clip_eps=0.2, aggregation="seq_mean")
    torch.testing.assert_close(ppo, torch.tensor(-1.001293), **TOL)
    torch.testing.assert_close(ppo_grad, torch.tensor([[-0.125, 0.0], [-0.276293, 0.0]]), **TOL)
    assert abs(gspo.item() - ppo.item()) > 0.09
    assert (gspo_grad - ppo_grad).abs().max() > 0.2


def naive_gspo(logps, old, seq_adv, mask, eps_low, eps_high):
    """eq. 5 as written: one ratio per sequence, 1/G sum_i min(s_i A_i, clip(s_i) A_i), negated."""
    s = torch.stack([torch.exp((logps[i][mask[i]] - old[i][mask[i]]).mean()) for i in range(len(logps))])
    return torch.maximum(-seq_adv * s, -seq_adv * torch.clamp(s, 1 - eps_low, 1 + eps_high)).mean()


def test_gspo_token_form_equals_the_sequence_formula_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    mask = torch.arange(T)[None] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    old = torch.randn(B, T, generator=g) - 2
    base = old + 0.15 * torch.randn(B, T, generator=g)  # some sequences past the clip range, some inside
    seq_adv = torch.randn(B, generator=g)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    loss, m = gspo_policy_loss(a, old, seq_adv[:, None].expand(B, T), mask, 0.05, 0.08, aggregation="seq_mean")
    ref = naive_gspo(b, old, seq_adv, mask, 0.05, 0.08)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(a.grad, b.grad, **TOL)
    assert 0 < m["policy/clipfrac"].item() < 1  # both branches exercised


def test_gspo_padding_never_reaches_the_ratio():
    """inf/nan in padded slots must not change the loss nor give nan gradients."""
    logps = torch.tensor([[-1.0, float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("nan")]])
    mask = torch.tensor([[True, False]])
    loss, _ = gspo_policy_loss(logps, old, torch.ones(1, 2), mask, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)  # s = e^0.2 = 1.2214 clipped to 1.2
    assert torch.isfinite(logps.grad).all()


# --- CISPO --------------------------------------------------------------------------------------------

CISPO_RATIOS = torch.tensor([[0.5, 2.0], [1.1, 1.0]])
CISPO_ADV = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
CISPO_MASK = torch.tensor([[True, True], [True, False]])


def test_cispo_by_hand():
    """clip_eps 0.2 (weights clipped to [0.8, 1.2], stop-gradient), token_mean over the 3 real tokens:
    ρ = 0.5, A = +1: w = 0.8, term -0.8 x 1 x log 0.5 =  0.554518
    ρ = 2.0, A = +1: w = 1.2, term -1.2 x 1 x log 2   = -0.831777
    ρ = 1.1, A = -1: w = 1.1, term  1.1 x log 1.1     =  0.104841
    loss = (0.554518 - 0.831777 + 0.104841) / 3 = -0.057473.
    Gradient wrt logp = -w A / 3: (-0.266667, -0.4), (0.366667, pad 0); clipfrac = 2/3;
    ratio_mean = (0.5 + 2 + 1.1) / 3 = 1.2."""
    loss, m, grad = grad_of(cispo_policy_loss, CISPO_RATIOS, CISPO_ADV, CISPO_MASK, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.057473), **TOL)
    torch.testing.assert_close(grad, torch.tensor([[-0.8 / 3, -0.4], [1.1 / 3, 0.0]]), **TOL)
    assert m["policy/clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert m["policy/ratio_mean"].item() == pytest.approx(1.2, abs=1e-6)


def test_cispo_keeps_the_gradient_ppo_clip_drops():
    """ρ = 2 with A > 0: PPO-clip's gradient is exactly 0 (the token is clipped away); CISPO's is
    -1.2 / 3 = -0.4 (the weight is bounded, the update is not dropped). The unclipped tokens differ
    only through the bounded weight: ρ = 0.5 -> PPO -0.5/3, CISPO -0.8/3 (lower bound 0.8)."""
    _, _, ppo_grad = grad_of(ppo_policy_loss, CISPO_RATIOS, CISPO_ADV, CISPO_MASK, clip_eps=0.2)
    _, _, cispo_grad = grad_of(cispo_policy_loss, CISPO_RATIOS, CISPO_ADV, CISPO_MASK, clip_eps=0.2)
    assert ppo_grad[0, 1].item() == 0.0
    assert cispo_grad[0, 1].item() == pytest.approx(-0.4, abs=1e-6)
    assert ppo_grad[0, 0].item() == pytest.approx(-0.5 / 3, abs=1e-6)
    # clip_eps >= 1: no lower bound (the paper's setting), the weight is the raw ratio 0.5
    _, _, free = grad_of(cispo_policy_loss, CISPO_RATIOS, CISPO_ADV, CISPO_MASK, clip_eps=1.0, clip_eps_high=0.2)
    assert free[0, 0].item() == pytest.approx(-0.5 / 3, abs=1e-6)


def test_cispo_weight_carries_no_gradient_and_equals_weighted_reinforce():
    """Naive equivalent: the REINFORCE gradient -A ∇logp scaled by a constant w = clip(ρ) computed
    outside autograd; any (B, T) and any aggregation."""
    g = torch.Generator().manual_seed(1)
    B, T = 4, 6
    mask = torch.arange(T)[None] < torch.tensor([6, 2, 4, 1])[:, None]
    old = torch.randn(B, T, generator=g) - 2
    base = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    a = base.clone().requires_grad_(True)
    loss, _ = cispo_policy_loss(a, old, adv, mask, 0.2, 0.28, aggregation="seq_mean")
    loss.backward()
    w = torch.clamp(torch.exp(base - old), 0.8, 1.28)
    expected = -(w * adv * mask) / mask.sum(1, keepdim=True) / B
    torch.testing.assert_close(a.grad, expected, **TOL)


# --- the table, and where all three agree -------------------------------------------------------------

def test_the_table_names_exactly_the_documented_losses():
    assert list(POLICY_LOSSES) == ["ppo_clip", "gspo", "cispo"]


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_at_ratio_one_every_variant_has_ppo_clips_gradient(name):
    """On-policy (old logps = current, the one-update-per-batch default) all three reduce to the
    policy gradient -A ∇logp (for GSPO: with one advantage per sequence and seq_mean)."""
    g = torch.Generator().manual_seed(2)
    logps = torch.randn(3, 4, generator=g) - 1
    mask = torch.arange(4)[None] < torch.tensor([4, 2, 3])[:, None]
    adv = torch.randn(3, generator=g)[:, None].expand(3, 4)
    grads = []
    for fn in (POLICY_LOSSES["ppo_clip"], POLICY_LOSSES[name]):
        x = logps.clone().requires_grad_(True)
        fn(x, logps, adv, mask, 0.2, None, "seq_mean", None)[0].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)
