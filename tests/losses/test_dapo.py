"""DAPO's dynamic-sampling filter and overlong reward shaping (rlhfkit.losses.dapo), by hand."""

import pytest
import torch

from rlhfkit.losses.dapo import informative_groups, overlong_penalty


def test_informative_groups_by_hand():
    """K = 4: (1, 1, 0, 1) mixed -> kept; (0, 0, 0, 0) all wrong -> dropped; (1, 1, 1, 1) all right ->
    dropped; (2, 2, 2, 2.5) differs in one -> kept."""
    scores = torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2.5])
    assert informative_groups(scores, 4).tolist() == [True, False, False, True]


def test_informative_groups_needs_whole_groups():
    with pytest.raises(ValueError, match="batch / group_size: 5 is not divisible by 2"):
        informative_groups(torch.zeros(5), 2)


def test_overlong_penalty_by_hand():
    """L_max = 10, L_cache = 4 (the ramp starts after 6 tokens), penalty 0.5:
    |y| = 5, 6 -> 0; 7 -> 0.5 x (6 - 7)/4 = -0.125; 8 -> -0.25; 10 -> 0.5 x (6 - 10)/4 = -0.5;
    12 (past L_max, eq. 13's third case) -> -0.5."""
    out = overlong_penalty(torch.tensor([5, 6, 7, 8, 10, 12]), max_length=10, buffer=4, penalty=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))


def test_overlong_penalty_off_and_bad_buffer():
    assert overlong_penalty(torch.tensor([3, 10]), 10, 0).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"overlong buffer must be in \[0, max_length=10\], got 11"):
        overlong_penalty(torch.tensor([3]), 10, 11)
