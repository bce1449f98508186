"""Agreement statistics against values worked out by hand and against the `krippendorff` package.

Coding throughout: 0 = a better, 1 = tie, 2 = b better; -1 = not labelled.
"""

from __future__ import annotations

import krippendorff
import numpy as np
import pytest

from rlhfkit.annotate import agreement as ag
from rlhfkit.annotate.assignment import gold_due, gold_phase, uncertainty_score

M = ag.MISSING


def test_cohen_kappa_by_hand():
    """x = a a b b tie a, y = a b b b tie a.

    p_o = 5/6 (they differ on item 2 only).
    Marginals: x has a 3, tie 1, b 2; y has a 2, tie 1, b 3 (out of 6), so
    p_e = (3*2 + 1*1 + 2*3) / 36 = 13/36 and kappa = (30/36 - 13/36) / (1 - 13/36) = 17/23.
    """
    x, y = np.array([0, 0, 2, 2, 1, 0]), np.array([0, 2, 2, 2, 1, 0])
    assert ag.cohen_kappa(x, y) == pytest.approx(17 / 23, abs=1e-12)
    assert ag.cohen_kappa(x, x) == pytest.approx(1.0)
    assert np.isnan(ag.cohen_kappa(np.zeros(4, int), np.zeros(4, int)))  # p_e = 1: undefined
    # complete disagreement with balanced marginals: p_o = 0, p_e = 1/2 -> kappa = -1
    assert ag.cohen_kappa(np.array([0, 2]), np.array([2, 0])) == pytest.approx(-1.0)


def test_pairwise_cohen_kappa_uses_shared_items_only():
    """Raters 0 and 1 share items 0-5 (the hand-worked pair above); rater 2 shares one item with each."""
    r = np.array([[0, 0, M], [0, 2, M], [2, 2, M], [2, 2, M], [1, 1, M], [0, 0, 1], [M, M, 0]])
    r[6, 0] = 0
    kappa, shared = ag.pairwise_cohen_kappa(r)
    assert shared[0, 1] == 6 and shared[0, 2] == 2 and shared[1, 2] == 1
    assert kappa[0, 1] == kappa[1, 0] == pytest.approx(17 / 23)
    assert np.isnan(kappa[1, 2]) and np.isnan(kappa[0, 0])  # 1 shared item < min_shared; diagonal


def test_fleiss_kappa_by_hand():
    """3 items x 3 raters; counts per (a, tie, b): [3,0,0], [0,1,2], [1,1,1].

    P_i = (sum n_ik^2 - 3) / (3*2): (9-3)/6 = 1, (1+4-3)/6 = 1/3, (1+1+1-3)/6 = 0; P_bar = 4/9.
    p_k = (4, 2, 3)/9, P_e = (16 + 4 + 9)/81 = 29/81.
    kappa = (36/81 - 29/81) / (52/81) = 7/52.
    """
    counts = np.array([[3, 0, 0], [0, 1, 2], [1, 1, 1]])
    assert ag.fleiss_kappa(counts) == pytest.approx(7 / 52, abs=1e-12)
    assert ag.fleiss_kappa(np.array([[2, 0, 0], [0, 0, 2]])) == pytest.approx(1.0)
    assert np.isnan(ag.fleiss_kappa(np.array([[1, 0, 0]])))  # no item with two ratings


def test_fleiss_equals_cohen_style_agreement_for_two_raters_is_scotts_pi():
    """With two raters Fleiss' kappa is Scott's pi: pooled marginals. x/y from the Cohen test:
    pooled a 5, tie 2, b 5 of 12 -> P_e = (25 + 4 + 25)/144 = 54/144; P_bar = p_o = 5/6;
    pi = (120/144 - 54/144) / (90/144) = 66/90 = 11/15."""
    x, y = np.array([0, 0, 2, 2, 1, 0]), np.array([0, 2, 2, 2, 1, 0])
    counts = ag.category_counts(np.stack([x, y], axis=1))
    assert ag.fleiss_kappa(counts) == pytest.approx(11 / 15, abs=1e-12)


def test_krippendorff_ordinal_by_hand():
    """2 raters, 3 items: (a, a), (a, tie), (b, b).

    Coincidences (each item has m_u = 2, weight 1/(m_u - 1) = 1): o_aa = 2, o_a,tie = o_tie,a = 1,
    o_bb = 2; marginals n = (3, 1, 2), n = 6.
    Ordinal delta^2(c, k) = (sum_{g=c..k} n_g - (n_c + n_k)/2)^2:
      (a, tie) = (3 + 1 - 2)^2 = 4; (a, b) = (6 - 2.5)^2 = 12.25; (tie, b) = (3 - 1.5)^2 = 2.25.
    Observed sum o*delta2 = 2 * 4 = 8. Expected sum n_c n_k delta2 = 2 * (3*1*4 + 3*2*12.25 + 1*2*2.25) = 180.
    alpha = 1 - (n - 1) * 8 / 180 = 1 - 40/180 = 7/9.
    Nominal: observed 2 * 1 = 2, expected 2 * (3 + 6 + 2) = 22, alpha = 1 - 5 * 2/22 = 6/11.
    """
    r = np.array([[0, 0], [0, 1], [2, 2]])
    assert ag.krippendorff_alpha(r, "ordinal") == pytest.approx(7 / 9, abs=1e-12)
    assert ag.krippendorff_alpha(r, "nominal") == pytest.approx(6 / 11, abs=1e-12)
    # Ordinal scale: confusing a with b is worse than confusing a with tie.
    assert ag.krippendorff_alpha(np.array([[0, 0], [0, 2], [2, 2], [1, 1]])) < \
        ag.krippendorff_alpha(np.array([[0, 0], [0, 1], [2, 2], [1, 1]]))
    assert np.isnan(ag.krippendorff_alpha(np.array([[0, 0], [0, M]])))  # one category only
    with pytest.raises(ValueError, match="level"):
        ag.krippendorff_alpha(r, "interval")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("level", ["ordinal", "nominal"])
def test_krippendorff_matches_reference_package(seed, level):
    """Random sparse 3-category data with missing values; the reference takes raters x units and NaN."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, 40)
    r = np.where(rng.random((40, 5)) < 0.7, truth[:, None], rng.integers(0, 3, (40, 5)))
    r[rng.random((40, 5)) < 0.4] = M
    ref = krippendorff.alpha(reliability_data=np.where(r == M, np.nan, r).T.astype(float),
                             level_of_measurement=level, value_domain=[0, 1, 2])
    assert ag.krippendorff_alpha(r, level) == pytest.approx(ref, abs=1e-10)


def test_plurality_leaves_draws_unresolved():
    counts = np.array([[2, 0, 1], [0, 3, 0], [1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 2, 2]])
    assert ag.plurality(counts).tolist() == [0, 1, M, M, M, M]


def test_agreement_with_consensus_is_leave_one_out():
    """Item 0: a a b. Rater 2 (b) vs others' plurality a -> disagrees; raters 0 and 1 vs (a, b) -> draw,
    not counted. Item 1: tie tie tie -> everyone agrees with the other two. Item 2: rater 0 alone."""
    r = np.array([[0, 0, 2], [1, 1, 1], [0, M, M]])
    rate, n = ag.agreement_with_consensus(r)
    assert n.tolist() == [1, 1, 2]
    assert rate[0] == 1.0 and rate[1] == 1.0 and rate[2] == 0.5


def test_gold_accuracy_counts_tie_as_wrong():
    r = np.array([[0, 1], [2, 2], [0, M], [1, 0]])
    gold = np.array([0, 2, M, 0])
    rate, n = ag.gold_accuracy(r, gold)
    assert n.tolist() == [3, 3]
    assert rate.tolist() == pytest.approx([2 / 3, 2 / 3])
    assert np.isnan(ag.gold_accuracy(np.array([[M]]), np.array([0]))[0][0])


def test_dawid_skene_perfect_agreement():
    r = np.array([[0, 0, 0], [2, 2, 2], [1, 1, 1], [0, 0, 0]])
    ds = ag.dawid_skene(r)
    assert ds.converged and ds.accuracy == pytest.approx([1, 1, 1], abs=1e-3)
    assert ds.posteriors.argmax(axis=1).tolist() == [0, 2, 1, 0]
    assert ds.priors == pytest.approx([0.5, 0.25, 0.25], abs=1e-2)


def test_dawid_skene_recovers_annotator_accuracy():
    """Simulated annotators with known accuracies 0.95, 0.9, 0.85, 0.6 and 0.34 (a coin over three
    classes), 300 items each labelled by all: estimated accuracies land within 0.06 of the truth and
    the posterior beats majority voting against the hidden truth."""
    rng = np.random.default_rng(0)
    acc = np.array([0.95, 0.9, 0.85, 0.6, 0.34])
    truth = rng.choice(3, size=300, p=[0.45, 0.1, 0.45])
    correct = rng.random((300, 5)) < acc
    wrong = (truth[:, None] + rng.integers(1, 3, (300, 5))) % 3
    r = np.where(correct, truth[:, None], wrong)
    ds = ag.dawid_skene(r)
    assert ds.accuracy == pytest.approx(acc, abs=0.06)
    majority = ag.plurality(ag.category_counts(r))
    assert (ds.posteriors.argmax(axis=1) == truth).mean() >= (majority == truth).mean()


def test_dawid_skene_handles_unlabelled_items_and_raters():
    r = np.array([[0, 0, M], [M, M, M], [2, 2, M]])
    ds = ag.dawid_skene(r)
    assert ds.posteriors[1] == pytest.approx([1 / 3] * 3) and np.isnan(ds.accuracy[2])


def test_throughput_caps_breaks():
    """Labels at t = 0, 30, 60 s, then a 2-hour break, then 90 s later: gaps 30, 30, 7200 -> 600 (cap),
    90. active = 750 s; 4 labels after the first -> 4 / 750 * 3600 = 19.2 labels/h."""
    t = ag.throughput(np.array([0, 30, 60, 7260, 7350]))
    assert (t.n_labels, t.active_s) == (5, 750.0)
    assert t.labels_per_hour == pytest.approx(19.2)
    assert np.isnan(ag.throughput(np.array([5.0])).labels_per_hour)


def test_uncertainty_score():
    assert uncertainty_score([0.5]) == 0.5 and uncertainty_score([0.9]) == pytest.approx(0.1)
    assert uncertainty_score([0.0]) == 0.0
    assert uncertainty_score([0.1, 0.9]) == pytest.approx(0.4)  # population std of the ensemble
    assert uncertainty_score([0.7, 0.7, 0.7]) == pytest.approx(0.0, abs=1e-12)


def test_gold_due_hits_the_rate_for_every_phase():
    for annotator_id in range(1, 30):
        phase, n_gold = gold_phase(annotator_id), 0
        for n in range(200):
            if gold_due(n, n_gold, 0.1, phase):
                n_gold += 1
            assert abs(n_gold - 0.1 * (n + 1)) <= 1
    assert not gold_due(10, 0, 0.0, 0.9)


def test_kendall_w_by_hand():
    """m = 2 rankings of n = 3: [1, 2, 3] and [1, 2.5, 2.5] (the last two tied). R = [2, 4.5, 5.5],
    mean m (n + 1) / 2 = 4, S = 4 + 0.25 + 2.25 = 6.5; ties: one group of 2, T = 8 - 2 = 6;
    W = 12 * 6.5 / (4 * 24 - 2 * 6) = 78 / 84."""
    assert ag.fractional_ranks(np.array([1, 2, 2])).tolist() == [1.0, 2.5, 2.5]
    assert ag.fractional_ranks(np.array([[2, 1, 2, 3]])).tolist() == [[2.5, 1.0, 2.5, 4.0]]
    assert ag.kendall_w(ag.fractional_ranks(np.array([[1, 2, 3], [1, 2, 2]]))) == pytest.approx(78 / 84)
    assert ag.kendall_w(np.array([[1, 2, 3], [3, 2, 1]])) == 0.0
    assert ag.kendall_w(np.array([[1, 2, 3, 4]] * 3)) == pytest.approx(1.0)
    assert np.isnan(ag.kendall_w(np.array([[1, 2, 3]])))  # one ranking: nothing to agree with
    assert np.isnan(ag.kendall_w(np.full((2, 2), 1.5)))  # every ranking ties everything
