"""Tests for the CMPO target, weights, regulariser, running advantage scale and EMA (rlhfkit.losses.cmpo)."""

import math

import pytest
import torch

from rlhfkit.losses.cmpo import (
    RunningScale,
    cmpo_regulariser,
    cmpo_target,
    cmpo_weight_metrics,
    cmpo_weights,
    ema_update,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def test_cmpo_target_by_hand():
    """σ = 2, c = 1: prior [0.5, 0.25, 0.25], A = [2, 0, -6] -> A/σ = [1, 0, -3] -> clipped [1, 0, -1];
    unnormalised [0.5e, 0.25, 0.25/e] = [1.359141, 0.25, 0.091970], sum 1.701111
    -> π_CMPO = [0.798973, 0.146963, 0.054065]."""
    prior = torch.tensor([0.5, 0.25, 0.25]).log()
    out = cmpo_target(prior, torch.tensor([2.0, 0.0, -6.0]), sigma=2.0, c=1.0)
    torch.testing.assert_close(out.exp(), torch.tensor([0.798973, 0.146963, 0.054065]), **TOL)


def test_weights_by_hand():
    """σ = 2, c = 1: A = [2, 0, -2, 0] -> A/σ = [1, 0, -1, 0]; exp = [e, 1, 1/e, 1], sum 5.086161
    -> w = [0.534447, 0.196612, 0.072329, 0.196612]; entropy -Σ w log w = 1.164406 nats; no |A/σ| > 1.
    Row 2, A = [4, 0, 0, 0]: A/σ = [2, 0, 0, 0] clips to [1, 0, 0, 0] -> w = [e, 1, 1, 1] / (e + 3)
    = [0.475367, 0.174878, 0.174878, 0.174878]; 1 of 8 samples clipped -> clip_frac_adv 0.125."""
    adv = torch.tensor([[2.0, 0.0, -2.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    w = cmpo_weights(adv, sigma=2.0, c=1.0)
    expected = torch.tensor([[0.534447, 0.196612, 0.072329, 0.196612], [0.475367, 0.174878, 0.174878, 0.174878]])
    torch.testing.assert_close(w, expected, **TOL)
    m = cmpo_weight_metrics(adv[:1], w[:1], sigma=2.0, c=1.0)
    assert m["cmpo/weight_entropy"] == pytest.approx(1.164406, abs=1e-5)
    assert m["cmpo/weight_max"] == pytest.approx(0.534447, abs=1e-5)
    assert m["cmpo/clip_frac_adv"] == 0.0
    assert cmpo_weight_metrics(adv, w, sigma=2.0, c=1.0)["cmpo/clip_frac_adv"] == pytest.approx(0.125)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_clipping_engages_beyond_c(c):
    """±5σ gives exactly the weights of ±cσ; inside the clip range the weights still move with A."""
    sigma = 0.3
    far = cmpo_weights(torch.tensor([[5 * sigma, -5 * sigma, 0.0]]), sigma, c)
    edge = cmpo_weights(torch.tensor([[c * sigma, -c * sigma, 0.0]]), sigma, c)
    torch.testing.assert_close(far, edge, atol=0, rtol=0)
    # the largest weight any sample can get: e^{2c} / (e^{2c} + K - 1) (one at +c, the rest at -c)
    top = cmpo_weights(torch.tensor([[50.0, -50.0, -50.0, -50.0]]), sigma, c)[0, 0].item()
    assert top == pytest.approx(math.exp(2 * c) / (math.exp(2 * c) + 3), abs=1e-6)
    inside_a = cmpo_weights(torch.tensor([[0.4 * c * sigma, 0.0]]), sigma, c)
    inside_b = cmpo_weights(torch.tensor([[0.8 * c * sigma, 0.0]]), sigma, c)
    assert inside_b[0, 0] > inside_a[0, 0] + 1e-3


def test_weights_sum_to_one_uniform_when_equal_and_monotone():
    adv = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    w = cmpo_weights(adv, sigma=0.7, c=1.0)
    torch.testing.assert_close(w.sum(1), torch.ones(16), **TOL)
    assert (w >= 0).all()
    # a higher advantage never gets a smaller weight (ranks agree where advantages differ)
    order = adv.argsort(1)
    assert (w.gather(1, order).diff(dim=1) >= -1e-7).all()
    # a constant shift per prompt changes nothing while no sample is clipped (σ = 100: |A/σ| < 0.1)...
    shift = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cmpo_weights(adv + shift, 100.0, 1.0), cmpo_weights(adv, 100.0, 1.0), **TOL)
    # ...but through the clip the baseline matters
    assert not torch.allclose(cmpo_weights(adv + shift, 0.7, 1.0), w, atol=1e-3)
    # equal advantages, zero or not: uniform 1/K
    for value in (0.0, 3.0):
        torch.testing.assert_close(cmpo_weights(torch.full((3, 4), value), sigma=1.0, c=1.0), torch.full((3, 4), 0.25))


def test_sampled_weights_estimate_the_exact_target():
    """Samples from the prior, weighted by cmpo_weights, recover π_CMPO: the prior's density cancels.
    200k samples in one group; the per-action weight mass has Monte Carlo error ~1e-3, so atol 1e-2."""
    prior = torch.tensor([0.6, 0.3, 0.1])
    action_adv = torch.tensor([1.5, -0.2, 0.4])
    sigma, c = 0.5, 1.0
    actions = torch.multinomial(prior, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    w = cmpo_weights(action_adv[actions][None], sigma, c)[0]
    mass = torch.zeros(3).index_add_(0, actions, w)
    torch.testing.assert_close(mass, cmpo_target(prior.log(), action_adv, sigma, c).exp(), atol=1e-2, rtol=0)


def test_regulariser_by_hand():
    """seq_logps [[-1, -2], [-3, -4]], w [[0.75, 0.25], [0.5, 0.5]]: rows 0.75 + 0.5 = 1.25 and
    1.5 + 2 = 3.5 -> mean 2.375. Lengths [[1, 2], [3, 4]] make every ℓ = -1 -> 1.0."""
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    loss, m = cmpo_regulariser(logps, w)
    assert loss.item() == pytest.approx(2.375, abs=1e-6)
    assert m["loss/cmpo"].item() == pytest.approx(2.375, abs=1e-6) and not m["loss/cmpo"].requires_grad
    loss, _ = cmpo_regulariser(logps, w, lengths=torch.tensor([[1, 2], [3, 4]]))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("length_normalised", [False, True])
def test_regulariser_gradient_pushes_probability_toward_higher_advantage(length_normalised):
    """∂loss/∂ log π(y_k) = -w_k / (N · |y_k|): descending the loss raises every sample's log-prob,
    the higher-advantage ones the most; no gradient reaches the weights."""
    adv = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 2.0]])
    w = cmpo_weights(adv, sigma=1.0, c=1.0).requires_grad_(True)
    logps = torch.tensor([[-5.0, -6.0, -7.0, -8.0], [-2.0, -3.0, -4.0, -5.0]], requires_grad=True)
    lengths = torch.tensor([[2, 3, 4, 5], [1, 1, 1, 1]]) if length_normalised else None
    loss, _ = cmpo_regulariser(logps, w, lengths)
    loss.backward()
    denom = (lengths.float() if length_normalised else torch.ones(2, 4)) * 2
    torch.testing.assert_close(logps.grad, -w.detach() / denom, **TOL)
    assert (logps.grad < 0).all()
    assert w.grad is None
    per_token_push = -logps.grad * denom  # = w: ordered as the advantages
    assert per_token_push[0].argmax() == 0 and per_token_push[0].argmin() == 1 and per_token_push[1].argmax() == 3


def test_regulariser_decomposes_over_micro_batches():
    """The trainer passes micro-batches of arbitrary samples as (B, 1) with weights K·w; the mean of
    equal-sized micro-batch losses equals the (N, K) loss, and so do the gradients."""
    g = torch.Generator().manual_seed(1)
    n, k = 3, 4
    logps = -torch.rand(n, k, generator=g) * 10
    lengths = torch.randint(1, 9, (n, k), generator=g)
    w = cmpo_weights(torch.randn(n, k, generator=g), 0.5, 1.0)
    full = logps.clone().requires_grad_(True)
    cmpo_regulariser(full, w, lengths)[0].backward()
    flat = logps.reshape(-1).clone().requires_grad_(True)
    perm = torch.randperm(n * k, generator=g)
    total = 0.0
    for idx in perm.split(4):
        part, _ = cmpo_regulariser(flat[idx][:, None], k * w.reshape(-1)[idx][:, None], lengths.reshape(-1)[idx][:, None])
        (part * len(idx) / (n * k)).backward()
        total += part.item() * len(idx) / (n * k)
    assert total == pytest.approx(cmpo_regulariser(logps, w, lengths)[0].item(), abs=1e-5)
    torch.testing.assert_close(flat.grad.view(n, k), full.grad, **TOL)


def test_running_scale_bias_correction_and_state():
    """d = 0.9, eps 0: one update with mean(A²) = 4 -> v = 0.4, v / (1 - 0.9) = 4 -> σ̂ = 2 exactly.
    Second update 1: v = 0.36 + 0.1 = 0.46, / (1 - 0.81) = 2.421053 -> σ̂ = 1.555973
    (= sqrt((0.9·4 + 1) / 1.9))."""
    s = RunningScale(decay=0.9, eps=0.0)
    with pytest.raises(RuntimeError, match="before any update"):
        _ = s.sigma
    assert s.update(4.0) == pytest.approx(2.0, abs=1e-12)
    assert s.update(1.0) == pytest.approx(math.sqrt(4.6 / 1.9), abs=1e-9)
    assert s.sigma == pytest.approx(1.555973, abs=1e-6)
    restored = RunningScale(decay=0.9, eps=0.0)
    restored.load_state_dict(s.state_dict())
    assert restored.update(9.0) == s.update(9.0)
    assert RunningScale(decay=0.0, eps=0.0).update(0.25) == 0.5  # d = 0: the batch RMS
    assert RunningScale(decay=0.99, eps=1e-8).update(0.0) == pytest.approx(1e-4)  # all-equal rewards: no 0/0


def test_ema_update_moves_at_the_configured_rate():
    """After one update with rate α: target = (1 - α) target + α online, bit for bit."""
    g = torch.Generator().manual_seed(0)
    online = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    target = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    before = [t.clone() for t in target]
    ema_update(target, online, 0.1)
    for t, b, o in zip(target, before, online):
        assert torch.equal(t, (1 - 0.1) * b + 0.1 * o)
    ema_update(target, online, 1.0)
    assert all(torch.equal(t, o) for t, o in zip(target, online))
    frozen = [t.clone() for t in target]
    ema_update(target, [o + 1 for o in online], 0.0)
    assert all(torch.equal(t, f) for t, f in zip(target, frozen))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="sigma"):
        cmpo_weights(torch.zeros(2, 2), 0.0, 1.0)
    with pytest.raises(ValueError, match="c .*must be > 0"):
        cmpo_weights(torch.zeros(2, 2), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        cmpo_weights(torch.zeros(4), 1.0, 1.0)
    with pytest.raises(ValueError, match="must both be"):
        cmpo_regulariser(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="lengths must be > 0"):
        cmpo_regulariser(torch.zeros(1, 2), torch.ones(1, 2) / 2, torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="rate"):
        ema_update([torch.zeros(1)], [torch.zeros(1)], 1.5)
    with pytest.raises(ValueError, match="1 target tensors but 2"):
        ema_update([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.5)
    with pytest.raises(ValueError, match="decay"):
        RunningScale(decay=1.0)
    with pytest.raises(ValueError, match="finite"):
        RunningScale().update(float("nan"))


@pytest.mark.parametrize("c", [0.5, 1.0, 3.0])
def test_target_stays_within_tanh_half_c_of_the_prior(c):
    """Muesli §4: TV(π_CMPO, π_prior) <= tanh(c/2) whatever the advantages; the bound is attained by
    a two-point prior with mass 1/(1 + e^c) on an action at +c and the rest on one at -c."""
    g = torch.Generator().manual_seed(0)
    prior = torch.distributions.Dirichlet(torch.full((6,), 0.5)).sample((500,))
    adv = torch.randn(500, 6, generator=g) * 5
    tv = 0.5 * (cmpo_target(prior.log(), adv, 1.0, c).exp() - prior).abs().sum(1)
    assert tv.max().item() <= math.tanh(c / 2) + 1e-6
    p = 1 / (1 + math.exp(c))
    two_point = torch.tensor([p, 1 - p])
    worst = 0.5 * (cmpo_target(two_point.log(), torch.tensor([c, -c]), 1.0, c).exp() - two_point).abs().sum()
    assert worst.item() == pytest.approx(math.tanh(c / 2), abs=1e-6)
