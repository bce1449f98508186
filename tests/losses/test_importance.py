"""rlhfkit.losses.importance: truncated importance-sampling weights for a sampler that is not the policy."""

import math

import pytest
import torch

from rlhfkit.losses.importance import IS_CAP, masked_truncated_is_weights, truncated_is_weights


def test_masked_weights_and_metrics_by_hand():
    """Sampler log-probs 0 (a ratio is then exp(logp_train)); cap C = 2; the 4th token is padding holding inf.

    tokens 1-3: log-ratio log 1.5, log 3, -log 2 -> raw ratios 1.5, 3, 0.5 -> truncated 1.5, 2, 0.5;
    padding -> weight 1.
    logp_diff_signed_mean = (log 1.5 + log 3 - log 2) / 3 = log(2.25) / 3 = 0.270310
    logp_diff_mean (|.|)  = (log 1.5 + log 3 + log 2) / 3 = log(9) / 3    = 0.732408
    is_weight_mean     = (1.5 + 2 + 0.5) / 3 = 4/3;  clipped_frac = 1/3 (only the ratio 3 exceeds 2).
    """
    train = torch.tensor([[math.log(1.5), math.log(3.0), -math.log(2.0), math.inf]])
    sampler = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    w, m = masked_truncated_is_weights(train, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.5, 2.0, 0.5, 1.0]]))
    torch.testing.assert_close(m["rollout/logp_diff_signed_mean"], torch.tensor(math.log(2.25) / 3))
    torch.testing.assert_close(m["rollout/logp_diff_mean"], torch.tensor(math.log(9.0) / 3))
    torch.testing.assert_close(m["rollout/is_weight_mean"], torch.tensor(4 / 3))
    torch.testing.assert_close(m["rollout/is_clipped_frac"], torch.tensor(1 / 3))


def test_weights_match_naive_ratio_and_are_detached():
    """Against the naive ``clamp(exp(a) / exp(b), max=C)`` where it does not underflow; no gradient flows."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(8, 16, generator=g) - 2).requires_grad_()
    b = torch.randn(8, 16, generator=g) - 2
    w = truncated_is_weights(a, b, cap=IS_CAP)
    torch.testing.assert_close(w, torch.clamp(torch.exp(a.detach()) / torch.exp(b), max=IS_CAP), rtol=1e-5, atol=1e-6)
    assert not w.requires_grad


def test_long_tail_tokens_do_not_underflow():
    """log-probs of -200 underflow exp() to 0 in fp32 (0/0 = nan naively); the log-difference gives e^1 -> C."""
    w = truncated_is_weights(torch.tensor([-199.0, -200.0]), torch.tensor([-200.0, -199.0]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, math.exp(-1.0)]))


def test_identical_sampler_gives_unit_weights():
    """Sampler == policy (the HF backend): every weight is 1, nothing clipped, gap 0."""
    lp = -torch.rand(4, 5) * 5
    w, m = masked_truncated_is_weights(lp, lp.clone(), torch.ones(4, 5, dtype=torch.bool))
    assert torch.equal(w, torch.ones(4, 5))
    assert m["rollout/is_clipped_frac"].item() == 0.0 and m["rollout/logp_diff_mean"].item() == 0.0


def test_bad_cap_raises():
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(torch.zeros(1), torch.zeros(1), cap=0.0)


# --- the weights inside every policy-gradient loss ---------------------------------------------------

LOSS_NAMES = ["ppo_clip", "gspo", "cispo"]


def _inputs():
    """One sequence of 3 real tokens + 1 pad, at ratio 1 (logps == old: the first update of a step)."""
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0]], requires_grad=True)
    old = logps.detach().clone()
    adv = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    return logps, old, adv, mask


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_weights_scale_each_tokens_gradient_by_hand(name):
    """At ratio 1 every policy loss has per-token gradient -A_t w_t / n (token mean over n = 3 real tokens;
    GSPO's sequence mean of one sequence is the same). A = 1, w = (2, 0.5, 1) -> grad = (-2/3, -1/6, -1/3, 0).
    PPO-clip and GSPO at ratio 1: loss value = mean(-A w) = -(2 + 0.5 + 1) / 3 = -7/6."""
    from rlhfkit.losses.policy import POLICY_LOSSES

    logps, old, adv, mask = _inputs()
    w = torch.tensor([[2.0, 0.5, 1.0, 1.0]])
    loss, _ = POLICY_LOSSES[name](logps, old, adv, mask, 0.2, None, "token_mean", None, is_weights=w)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-2 / 3, -1 / 6, -1 / 3, 0.0]]))
    if name != "cispo":  # CISPO's value holds log π (a surrogate): only its gradient means something
        torch.testing.assert_close(loss.detach(), torch.tensor(-7 / 6))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_no_weights_or_unit_weights_leave_the_loss_unchanged(name):
    """The HF backend's exact sampler passes None (or would give weights 1): value and gradient are
    exactly those of the loss without the correction. A flipped weight (w = -1) would change both."""
    from rlhfkit.losses.policy import POLICY_LOSSES

    results = []
    for w in (None, torch.ones(1, 4), -torch.ones(1, 4)):
        logps, old, adv, mask = _inputs()
        old = old + torch.tensor([[0.1, -0.2, 0.05, 0.0]])  # ratio != 1 so clipping paths are exercised
        loss, _ = POLICY_LOSSES[name](logps, old, adv, mask, 0.2, None, "token_mean", None, is_weights=w)
        loss.backward()
        results.append((loss.detach(), logps.grad))
    (l0, g0), (l1, g1), (l2, g2) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert not torch.allclose(g0, g2)


def test_weights_of_the_wrong_shape_are_an_error():
    from rlhfkit.losses.importance import apply_is_weights

    with pytest.raises(ValueError, match="is_weights has shape"):
        apply_is_weights(torch.zeros(2, 3), torch.ones(2, 4))
