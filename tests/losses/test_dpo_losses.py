"""Tests for the DPO-family losses (sigmoid, ipo, robust, hinge, simpo, orpo) and KTO."""

import math

import pytest
import torch

from rlhfkit.losses.dpo import (
    DPO_LOSSES,
    REFERENCE_FREE,
    PairLogps,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)

TOL = dict(atol=1e-5, rtol=1e-5)
METRIC_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
}
LOG2 = math.log(2.0)
NEG_LOG_SIG_HALF = math.log1p(math.exp(-0.5))  # -log σ(0.5) = 0.474077
NEG_LOG_SIG_MHALF = math.log1p(math.exp(0.5))  # -log σ(-0.5) = 0.974077


def pair(
    chosen=-1.0,
    rejected=-2.0,
    ref_chosen=-1.5,
    ref_rejected=-1.5,
    chosen_len=2.0,
    rejected_len=4.0,
    grad=False,
):
    """One pair; by default h = (-1 + 1.5) - (-2 + 1.5) = 1."""
    c = torch.tensor([chosen], requires_grad=grad)
    r = torch.tensor([rejected], requires_grad=grad)
    ref = (None, None) if ref_chosen is None else (torch.tensor([ref_chosen]), torch.tensor([ref_rejected]))
    return PairLogps(c, r, *ref, torch.tensor([chosen_len]), torch.tensor([rejected_len]))


def random_pairs(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = lambda: torch.randint(1, 30, (B,), generator=g)
    cl, rl = lengths(), lengths()
    return PairLogps(
        -torch.rand(B, generator=g) * cl,
        -torch.rand(B, generator=g) * rl,
        -torch.rand(B, generator=g) * cl,
        -torch.rand(B, generator=g) * rl,
        cl,
        rl,
    )


# --- sigmoid (DPO) -----------------------------------------------------------------------------


def test_sigmoid_by_hand():
    """h = 1, β = 0.5: loss = -log σ(0.5) = 0.474077. Implicit rewards β(logπ - logπ_ref):
    chosen 0.5 * 0.5 = 0.25, rejected 0.5 * -0.5 = -0.25, margin 0.5, accuracy 1."""
    loss, m = sigmoid_loss(pair(), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([NEG_LOG_SIG_HALF]))
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.25)
    assert m["rewards/rejected"].item() == pytest.approx(-0.25)
    assert m["rewards/margin"].item() == pytest.approx(0.5)
    assert m["rewards/accuracy"].item() == 1.0
    assert m["logps/chosen"].item() == -1.0 and m["logps/rejected"].item() == -2.0


def test_sigmoid_margin_is_subtracted_inside():
    """β h = 0.5, margin 0.5 -> -log σ(0) = log 2; margin 1 -> -log σ(-0.5) = 0.974077."""
    p = PairLogps(
        torch.tensor([-1.0, -1.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-1.5, -1.5]),
        torch.tensor([-1.5, -1.5]),
    )
    loss, _ = sigmoid_loss(p, beta=0.5, margin=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(loss, torch.tensor([LOG2, NEG_LOG_SIG_MHALF]))


def test_beta_to_zero_limits():
    """β -> 0: every logit -> 0, so sigmoid/robust/simpo -> log 2 and hinge -> relu(1) = 1."""
    p = random_pairs()
    for fn, limit in ((sigmoid_loss, LOG2), (robust_loss, LOG2), (simpo_loss, LOG2), (hinge_loss, 1.0)):
        loss, _ = fn(p, beta=1e-8)
        torch.testing.assert_close(loss, torch.full_like(loss, limit), **TOL)


# --- robust / conservative DPO -----------------------------------------------------------------


def test_robust_with_zero_smoothing_equals_sigmoid_exactly():
    p = random_pairs(seed=1)
    a, ma = robust_loss(p, beta=0.3, label_smoothing=0.0)
    b, mb = sigmoid_loss(p, beta=0.3)
    assert torch.equal(a, b)
    assert all(torch.equal(ma[k], mb[k]) for k in METRIC_KEYS)


def test_robust_by_hand():
    """β h = 0.5, ε = 0.1: 0.9 * -log σ(0.5) + 0.1 * -log σ(-0.5) = 0.9*0.474077 + 0.1*0.974077 = 0.524077."""
    loss, _ = robust_loss(pair(), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * NEG_LOG_SIG_HALF + 0.1 * NEG_LOG_SIG_MHALF, abs=1e-6)
    assert loss.item() == pytest.approx(0.524077, abs=1e-6)


def test_robust_rejects_bad_smoothing():
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            robust_loss(pair(), beta=0.1, label_smoothing=eps)


def test_robust_smoothing_has_a_finite_optimum():
    """With ε > 0 the loss stops rewarding separation: its minimum over βh is log((1-ε)/ε)."""
    eps, beta = 0.1, 1.0
    best = math.log((1 - eps) / eps)
    for offset, sign in ((-0.1, -1), (0.1, 1)):
        c = torch.tensor([best + offset], requires_grad=True)
        loss, _ = robust_loss(PairLogps(c, torch.zeros(1), torch.zeros(1), torch.zeros(1)), beta, eps)
        loss.backward()
        assert math.copysign(1, c.grad.item()) == sign


# --- hinge (SLiC) ------------------------------------------------------------------------------


def test_hinge_by_hand_and_saturation():
    """β h = 0.5 -> relu(1 - 0.5) = 0.5; β = 2 gives β h = 2 -> 0 with zero gradient."""
    loss, _ = hinge_loss(pair(), beta=0.5)
    assert loss.item() == pytest.approx(0.5)
    p = pair(grad=True)
    loss, _ = hinge_loss(p, beta=2.0)
    loss.sum().backward()
    assert loss.item() == 0.0 and p.chosen_logps.grad.item() == 0.0


# --- ipo ---------------------------------------------------------------------------------------


def test_ipo_by_hand():
    """Length-averaged: h̄ = (-1 + 1.5)/2 - (-2 + 1.5)/4 = 0.25 + 0.125 = 0.375.
    β = 0.5 -> target 1/(2β) = 1; loss = (0.375 - 1)² = 0.390625."""
    loss, m = ipo_loss(pair(), beta=0.5)
    assert loss.item() == pytest.approx(0.390625, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.25)  # sum-based implicit reward


def test_ipo_is_minimised_at_the_target_margin():
    """Chosen logp such that h̄ = 1/(2β) exactly: loss 0, gradient 0; the gradient points to it."""
    beta = 0.5  # target h̄ = 1; with ref 0, rejected 0, length 2: chosen = 2
    for chosen, expected_grad_sign in ((2.0, 0), (1.0, -1), (3.0, 1)):
        p = PairLogps(
            torch.tensor([chosen], requires_grad=True),
            torch.zeros(1),
            torch.zeros(1),
            torch.zeros(1),
            torch.tensor([2.0]),
            torch.tensor([3.0]),
        )
        loss, _ = ipo_loss(p, beta)
        loss.sum().backward()
        g = p.chosen_logps.grad.item()
        assert (g > 0) - (g < 0) == expected_grad_sign
    with pytest.raises(ValueError, match="beta > 0"):
        ipo_loss(pair(), beta=0.0)


# --- simpo -------------------------------------------------------------------------------------


def test_simpo_by_hand():
    """Reference-free. ā_w = -1/2 = -0.5, ā_l = -4/4 = -1; β = 2, γ/β = 0.25:
    logit = 2 * (-0.5 + 1 - 0.25) = 0.5 -> loss = -log σ(0.5) = 0.474077.
    Rewards β ā: chosen -1, rejected -2, margin 1, accuracy 1."""
    p = pair(rejected=-4.0, ref_chosen=None)
    loss, m = simpo_loss(p, beta=2.0, gamma_beta_ratio=0.25)
    assert loss.item() == pytest.approx(NEG_LOG_SIG_HALF, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-1.0)
    assert m["rewards/rejected"].item() == pytest.approx(-2.0)
    assert m["rewards/margin"].item() == pytest.approx(1.0)
    assert m["rewards/accuracy"].item() == 1.0


def test_simpo_ignores_the_reference():
    a, _ = simpo_loss(pair(), beta=2.0)
    b, _ = simpo_loss(pair(ref_chosen=None), beta=2.0)
    assert torch.equal(a, b)


# --- orpo --------------------------------------------------------------------------------------


def test_orpo_by_hand():
    """ā_w = -1/2 = -0.5, ā_l = -4/4 = -1, β = 0.1.
    log odds(ā) = ā - log(1 - e^ā):
      ā = -0.5: 1 - 0.606531 = 0.393469, log = -0.932752 -> log odds =  0.432752
      ā = -1  : 1 - 0.367879 = 0.632121, log = -0.458675 -> log odds = -0.541325
    log OR = 0.974077; -log σ(0.974077) = 0.320300; NLL = 0.5.
    loss = 0.5 + 0.1 * 0.320300 = 0.532030."""
    loss, m = orpo_loss(pair(rejected=-4.0, ref_chosen=None), beta=0.1)
    assert loss.item() == pytest.approx(0.532030, abs=1e-5)
    assert m["rewards/log_odds_ratio"].item() == pytest.approx(0.974077, abs=1e-5)
    assert m["loss/nll"].item() == pytest.approx(0.5)
    assert m["rewards/chosen"].item() == pytest.approx(-0.05)


def test_orpo_beta_zero_is_sft_on_chosen():
    p = random_pairs(seed=2)
    loss, _ = orpo_loss(p, beta=0.0)
    torch.testing.assert_close(loss, -p.chosen_logps / p.chosen_lengths.float(), **TOL)


def test_orpo_log1mexp_is_accurate_and_certain_completions_stay_finite():
    """Compare log odds against float64 over ā from -50 to -1e-6; ā = 0 (probability 1) gives finite
    loss and gradients thanks to the -eps clamp."""
    a = torch.tensor([-50.0, -5.0, -0.7, -0.69, -0.1, -1e-3, -1e-6])
    p = PairLogps(
        a.clone(),
        torch.full_like(a, -1.0),
        chosen_lengths=torch.ones_like(a),
        rejected_lengths=torch.ones_like(a),
    )
    _, m = orpo_loss(p, beta=1.0)
    a64 = a.double()
    lo = lambda x: x - torch.log(-torch.expm1(x))
    expected = (lo(a64) - lo(torch.tensor(-1.0, dtype=torch.float64))).mean().float()
    torch.testing.assert_close(m["rewards/log_odds_ratio"], expected, atol=1e-4, rtol=1e-5)
    c = torch.tensor([0.0, -1e-12], requires_grad=True)
    p = PairLogps(c, torch.tensor([-1.0, -1.0]), chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))
    loss, _ = orpo_loss(p, beta=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(c.grad).all()


# --- the family as a whole ---------------------------------------------------------------------


def test_registry():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "robust", "hinge", "simpo", "orpo"}
    assert REFERENCE_FREE == frozenset({"simpo", "orpo"})
    assert DPO_LOSSES["sigmoid"] is sigmoid_loss and DPO_LOSSES["orpo"] is orpo_loss


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_every_loss_is_per_pair_and_reports_its_metrics(name):
    """Unreduced: the batch result equals the losses of each pair computed alone."""
    p = random_pairs(B=5, seed=3)
    loss, m = DPO_LOSSES[name](p, beta=0.2)
    assert loss.shape == (5,)
    assert METRIC_KEYS <= set(m)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    for i in range(5):
        single = PairLogps(*(getattr(p, f)[i : i + 1] for f in p.__dataclass_fields__))
        torch.testing.assert_close(DPO_LOSSES[name](single, beta=0.2)[0], loss[i : i + 1], **TOL)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """At a point where no loss is saturated (β h = 0.1 < 1 for hinge; h̄ below the IPO target), a
    gradient step increases the chosen logp and decreases the rejected one."""
    p = pair(
        chosen=-3.0,
        rejected=-3.2,
        ref_chosen=-3.0,
        ref_rejected=-3.0,
        chosen_len=3.0,
        rejected_len=3.0,
        grad=True,
    )
    loss, _ = DPO_LOSSES[name](p, beta=0.5)
    loss.sum().backward()
    assert p.chosen_logps.grad.item() < 0, name
    assert p.rejected_logps.grad.item() > 0, name


@pytest.mark.parametrize("name", sorted(set(DPO_LOSSES) - REFERENCE_FREE))
def test_reference_based_losses_demand_reference_logps(name):
    with pytest.raises(ValueError, match="compute ref_chosen_logps.*orpo, simpo"):
        DPO_LOSSES[name](pair(ref_chosen=None), beta=0.1)


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo"])
def test_length_normalised_losses_demand_lengths(name):
    p = PairLogps(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="chosen_lengths"):
        DPO_LOSSES[name](p, beta=0.1)


def test_pair_logps_validates_shapes():
    with pytest.raises(ValueError, match="rejected_logps"):
        PairLogps(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="both"):
        PairLogps(torch.zeros(2), torch.zeros(2), ref_chosen_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        PairLogps(torch.zeros(2, 3), torch.zeros(2, 3))


# --- KTO ---------------------------------------------------------------------------------------


def test_kto_by_hand():
    """logps (-1, -1), ref (-1.5, -0.5) -> r = (0.5, -0.5); desirable (T, F); z0 = 0.2; β = 1; λ_U = 2.
    desirable:   1 * (1 - σ(0.5 - 0.2))        = 1 - σ(0.3) = 1 - 0.574443 = 0.425557
    undesirable: 2 * (1 - σ(0.2 - (-0.5)))     = 2 * (1 - σ(0.7)) = 2 * 0.331812 = 0.663624
    Rewards β r: chosen 0.5, rejected -0.5, margin 1."""
    loss, m = kto_loss(
        torch.tensor([-1.0, -1.0]),
        torch.tensor([-1.5, -0.5]),
        torch.tensor([True, False]),
        torch.tensor(0.2),
        beta=1.0,
        undesirable_weight=2.0,
    )
    torch.testing.assert_close(loss, torch.tensor([0.425557, 0.663624]), atol=1e-6, rtol=0)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margin"].item() == pytest.approx(1.0)
    assert m["kl/kto_ref"].item() == pytest.approx(0.2)
    assert m["logps/chosen"].item() == -1.0 and m["logps/rejected"].item() == -1.0


def test_kto_gradients_and_detached_reference_point():
    logps = torch.tensor([-1.0, -1.0], requires_grad=True)
    kl_ref = torch.tensor(0.1, requires_grad=True)
    loss, _ = kto_loss(logps, torch.tensor([-1.2, -0.8]), torch.tensor([True, False]), kl_ref, beta=0.5)
    loss.sum().backward()
    assert logps.grad[0] < 0 and logps.grad[1] > 0
    assert kl_ref.grad is None


def test_kto_all_desirable_has_zero_rejected_metrics():
    _, m = kto_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([True]), torch.tensor(0.0), beta=0.1
    )
    assert m["rewards/rejected"].item() == 0.0 and m["logps/rejected"].item() == 0.0
    with pytest.raises(TypeError, match="bool"):
        kto_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.tensor(0.0), beta=0.1)


def test_kto_kl_estimate():
    """mean((-1 - -1.5), (-2 - -1.2)) = mean(0.5, -0.8) = -0.15 -> clamped to 0;
    mean(0.5, 0.3) = 0.4 -> 0.4. Always detached."""
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    z = kto_kl_estimate(logps, torch.tensor([-1.5, -1.2]))
    assert z.item() == 0.0 and not z.requires_grad and z.dim() == 0
    z = kto_kl_estimate(torch.tensor([-1.0, -1.0], requires_grad=True), torch.tensor([-1.5, -1.3]))
    assert z.item() == pytest.approx(0.4) and not z.requires_grad


def test_trl_simpo_gamma_is_the_margin_and_converts_to_gamma_over_beta():
    """TRL's CPOConfig.simpo_gamma is γ itself; rlhfkit's gamma_beta_ratio is γ/β. With β = 2,
    simpo_gamma 0.5 -> γ/β = 0.25, the hand example above: loss -log σ(0.5) = 0.474077, the same as
    gamma_beta_ratio=0.25. Setting both, or simpo_gamma for another loss, is an error."""
    from rlhfkit.train.dpo import DPOConfig

    trl = DPOConfig(data="x.jsonl", loss="simpo", beta=2.0, simpo_gamma=0.5)
    ours = DPOConfig(data="x.jsonl", loss="simpo", beta=2.0, gamma_beta_ratio=0.25)
    assert trl.simpo_gamma_beta_ratio() == ours.simpo_gamma_beta_ratio() == 0.25
    loss, _ = simpo_loss(pair(rejected=-4.0, ref_chosen=None), beta=2.0, gamma_beta_ratio=trl.simpo_gamma_beta_ratio())
    assert loss.item() == pytest.approx(NEG_LOG_SIG_HALF, abs=1e-6)
    with pytest.raises(ValueError, match="set simpo_gamma .* or gamma_beta_ratio .*, not both"):
        DPOConfig(data="x.jsonl", loss="simpo", beta=2.0, simpo_gamma=0.5, gamma_beta_ratio=0.25)
    with pytest.raises(ValueError, match="simpo_gamma applies to loss=simpo only"):
        DPOConfig(data="x.jsonl", loss="sigmoid", simpo_gamma=0.5)
    with pytest.raises(ValueError, match="simpo_gamma must be >= 0"):
        DPOConfig(data="x.jsonl", loss="simpo", simpo_gamma=-1.0)
