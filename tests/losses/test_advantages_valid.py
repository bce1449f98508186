"""Group and leave-one-out advantages with a ``valid`` mask: unscored samples (reward None) are left
out of their group's baseline, get advantage 0, and a group with fewer than 2 valid samples gets 0."""

import pytest
import torch

from rlhfkit.losses.advantages import group_advantages, leave_one_out_advantages

NAN = float("nan")


def groups():
    """K = 4, three groups: [1, None, 3, 5], [2, None, None, None], [None, 4, 4, None]."""
    scores = torch.tensor([1.0, NAN, 3.0, 5.0, 2.0, NAN, NAN, NAN, NAN, 4.0, 4.0, NAN])
    return scores, ~scores.isnan()


def test_group_advantages_with_one_unscored_sample_by_hand():
    """Group 1, valid [1, 3, 5]: mean 3, centred [-2, ., 0, 2], std (Bessel, n - 1 = 2) sqrt(8/2) = 2
    -> GRPO [-2/(2 + 1e-4), 0, 0, 2/(2 + 1e-4)], Dr. GRPO [-2, 0, 0, 2]. (Filling the None with the
    group's mean, 3, gives the same Dr. GRPO numbers but std sqrt(8/3) = 1.633 for GRPO.)
    Group 2 has one valid sample: no baseline -> 0. Group 3: [4, 4] equal -> 0."""
    scores, valid = groups()
    d = 2 + 1e-4
    expected = torch.tensor([-2 / d, 0, 0, 2 / d, 0, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(scores, 4, valid=valid), expected)
    dr = torch.tensor([-2.0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(scores, 4, scale=False, valid=valid), dr)


def test_leave_one_out_with_one_unscored_sample_by_hand():
    """Group 1, valid [1, 3, 5]: 1 - (3+5)/2 = -3, 3 - (1+5)/2 = 0, 5 - (1+3)/2 = 3, i.e.
    n/(n-1) = 3/2 times (r - 3); the None gets 0. (K/(K-1) over a filled group would give 4/3 x.)
    Group 2 (one valid) -> 0; group 3: 4 - 4 = 0."""
    scores, valid = groups()
    expected = torch.tensor([-3.0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(leave_one_out_advantages(scores, 4, valid=valid), expected)


def test_unscored_values_are_never_read():
    """Whatever the placeholder at an invalid position (NaN, inf, a large number), the result is the same."""
    scores, valid = groups()
    want_g = group_advantages(scores, 4, valid=valid)
    want_l = leave_one_out_advantages(scores, 4, valid=valid)
    for fill in (float("inf"), -1e9, 0.0):
        s = torch.where(valid, scores, torch.full_like(scores, fill))
        torch.testing.assert_close(group_advantages(s, 4, valid=valid), want_g)
        torch.testing.assert_close(leave_one_out_advantages(s, 4, valid=valid), want_l)
    assert not group_advantages(scores, 4, valid=valid).isnan().any()


def test_all_valid_equals_no_mask():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(24, generator=g)
    ones = torch.ones(24, dtype=torch.bool)
    for scale in (True, False):
        torch.testing.assert_close(group_advantages(scores, 4, scale=scale, valid=ones),
                                   group_advantages(scores, 4, scale=scale))
    torch.testing.assert_close(leave_one_out_advantages(scores, 4, valid=ones), leave_one_out_advantages(scores, 4))
    # and the unmasked GRPO still matches the naive (r - mean) / (torch.std + eps)
    grouped = scores.view(-1, 4)
    naive = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(scores, 4), naive.flatten(), rtol=1e-5, atol=1e-5)


def test_masked_equals_the_valid_samples_alone():
    """A group's masked advantages equal the unmasked ones of its valid samples as a group of their own
    (n valid out of K), for n = 2..K."""
    g = torch.Generator().manual_seed(5)
    K = 5
    for n in range(2, K + 1):
        scores = torch.randn(K, generator=g)
        valid = torch.zeros(K, dtype=torch.bool)
        valid[torch.randperm(K, generator=g)[:n]] = True
        alone_g = group_advantages(scores[valid], n)
        alone_l = leave_one_out_advantages(scores[valid], n)
        torch.testing.assert_close(group_advantages(scores, K, valid=valid)[valid], alone_g, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leave_one_out_advantages(scores, K, valid=valid)[valid], alone_l,
                                   rtol=1e-5, atol=1e-5)
        assert group_advantages(scores, K, valid=valid)[~valid].abs().sum() == 0


def test_bad_valid_mask():
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        group_advantages(torch.zeros(4), 2, valid=torch.ones(4))
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        leave_one_out_advantages(torch.zeros(4), 2, valid=torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("name,expected", [
    # K = 3, scores [1, filled 2, 3] with the middle unscored: the valid pair [1, 3] has mean 2, std sqrt(2)
    ("group", [-1 / (2 ** 0.5 + 1e-4), 0.0, 1 / (2 ** 0.5 + 1e-4)]),
    ("dr_grpo", [-1.0, 0.0, 1.0]),
    ("loo", [-2.0, 0.0, 2.0]),  # 1 - 3 and 3 - 1: the other valid sample is the baseline
])
def test_grpo_compute_advantages_passes_the_scored_mask(name, expected):
    """train/grpo.compute_advantages reads r.extras['scored'] as the valid mask (without it the filled
    group [1, 2, 3] would give GRPO ±1/(1 + 1e-4) and RLOO ±1.5)."""
    from rlhfkit.rollout.engine import Rollout
    from rlhfkit.train import grpo

    mask = torch.ones(3, 2, dtype=torch.bool)
    r = Rollout(prompt_ids=torch.zeros(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1, dtype=torch.bool),
                completion_ids=torch.zeros(3, 2, dtype=torch.long), completion_mask=mask,
                scores=torch.tensor([1.0, 2.0, 3.0]), extras={"scored": torch.tensor([True, False, True])})
    adv = grpo.compute_advantages(r, grpo.GRPOConfig(advantage=name, samples_per_prompt=3, beta=0.0))
    torch.testing.assert_close(adv, torch.tensor(expected)[:, None].expand(3, 2))
