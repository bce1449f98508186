"""Tests for the Bradley–Terry reward-model loss."""

import math

import pytest
import torch

from rlhfkit.losses.reward import bradley_terry_loss

LOG_SIG_1 = math.log1p(math.exp(-1.0))  # -log σ(1) = 0.313262
LOG_SIG_M1 = math.log1p(math.exp(1.0))  # -log σ(-1) = 1.313262


def test_bradley_terry_by_hand():
    """chosen (2, 0), rejected (1, 0): d = (1, 0).
    loss = mean(-log σ(1), -log σ(0)) = mean(0.313262, 0.693147) = 0.503204.
    accuracy: only row 0 has r_c > r_r -> 0.5; margin mean(d) = 0.5; chosen mean 1, rejected 0.5."""
    loss, m = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor((LOG_SIG_1 + math.log(2)) / 2))
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)
    assert m["loss/reward"].item() == pytest.approx(loss.item())
    assert m["reward/accuracy"].item() == 0.5
    assert m["reward/margin"].item() == 0.5
    assert m["reward/chosen"].item() == 1.0
    assert m["reward/rejected"].item() == 0.5


def test_margin_is_subtracted_inside_the_sigmoid():
    """d = 1, m = 1 -> -log σ(0) = log 2; d = 1, m = 2 -> -log σ(-1) = 1.313262."""
    loss, _ = bradley_terry_loss(
        torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([1.0, 2.0])
    )
    torch.testing.assert_close(loss, torch.tensor((math.log(2) + LOG_SIG_M1) / 2))


def test_tie_rows_use_target_one_half_and_ignore_margin():
    """Row 0 preferred with d = 1: 0.313262. Row 1 a tie with d = 1 (margin 5 ignored):
    -½(log σ(1) + log σ(-1)) = ½(0.313262 + 1.313262) = 0.813262. Mean = 0.563262.
    Accuracy counts only row 0 (correct) -> 1.0."""
    loss, m = bradley_terry_loss(
        torch.tensor([1.0, 1.0]),
        torch.tensor([0.0, 0.0]),
        margin=torch.tensor([0.0, 5.0]),
        tie_mask=torch.tensor([False, True]),
    )
    torch.testing.assert_close(loss, torch.tensor((LOG_SIG_1 + 0.5 * (LOG_SIG_1 + LOG_SIG_M1)) / 2))
    assert m["reward/accuracy"].item() == 1.0


def test_tie_loss_is_minimised_at_equal_rewards():
    chosen = torch.tensor([0.3], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, torch.tensor([0.3]), tie_mask=torch.tensor([True]))
    loss.backward()
    assert chosen.grad.abs().item() < 1e-7
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    chosen = torch.tensor([1.3], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, torch.tensor([0.3]), tie_mask=torch.tensor([True]))
    loss.backward()
    assert chosen.grad.item() > 0  # a tie pulls the rewards back together


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 2.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/dd of -log σ(d) is -σ(-d); the mean over B=2 halves it.
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-(chosen - rejected).detach()) / 2)


def test_large_reward_gaps_are_stable():
    loss, _ = bradley_terry_loss(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.tensor(50.0))  # (~0 + 100) / 2


def test_all_ties_accuracy_is_zero_not_nan():
    _, m = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), tie_mask=torch.tensor([True]))
    assert m["reward/accuracy"].item() == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(TypeError, match="bool"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), tie_mask=torch.tensor([0, 1]))


def test_metrics_are_detached_scalars():
    chosen = torch.tensor([1.0, 2.0], requires_grad=True)
    _, m = bradley_terry_loss(chosen, torch.zeros(2))
    assert set(m) == {"loss/reward", "reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
