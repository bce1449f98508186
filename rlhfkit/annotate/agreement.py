"""Agreement and annotator-quality statistics for pairwise preference labels. Pure numpy.

Everything takes a ratings matrix ``ratings`` of shape (I, R): I items (pairs) by R raters
(annotators), holding a category index or ``-1`` where that rater did not label that item. Labels
are coded on the pair's own sides, not the screen sides (the screen order is randomised per
assignment): ``0`` = a is better, ``1`` = tie, ``2`` = b is better. As an ordinal scale
a < tie < b, i.e. "left < tie < right" with the pair drawn in its canonical orientation.

The server builds the matrix from its database (``rlhfkit.annotate.stats``); these functions do not
need the server and work for any number of ordered categories ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CATEGORIES = ("a", "tie", "b")
CODE = {name: i for i, name in enumerate(CATEGORIES)}
MISSING = -1


def category_counts(ratings: np.ndarray, n_categories: int = 3) -> np.ndarray:
    """(I, R) ratings -> (I, K) number of raters who chose each category for each item."""
    ratings = np.asarray(ratings)
    return np.stack([(ratings == k).sum(axis=1) for k in range(n_categories)], axis=1)


def cohen_kappa(x: np.ndarray, y: np.ndarray, n_categories: int = 3) -> float:
    """Cohen's kappa of two raters over the same items (J. Cohen 1960, Educ. Psychol. Meas. 20:37).

    kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement and p_e = sum_k p_x(k) p_y(k) the
    agreement expected from the two raters' own category frequencies. NaN when p_e == 1 (both
    raters used one and the same category throughout: agreement beyond chance is undefined).
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and the same length, got {x.shape} and {y.shape}")
    if len(x) == 0:
        return float("nan")
    p_o = float(np.mean(x == y))
    px = np.bincount(x, minlength=n_categories) / len(x)
    py = np.bincount(y, minlength=n_categories) / len(y)
    p_e = float(px @ py)
    if np.isclose(p_e, 1.0):
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def pairwise_cohen_kappa(ratings: np.ndarray, n_categories: int = 3, min_shared: int = 2):
    """Cohen's kappa for every pair of raters on the items both labelled.

    Returns ``(kappa, shared)``, both (R, R): ``shared[r, s]`` items in common, ``kappa[r, s]`` NaN
    where fewer than ``min_shared`` items are shared. The diagonal is NaN.
    """
    ratings = np.asarray(ratings)
    n_raters = ratings.shape[1]
    seen = ratings != MISSING
    shared = seen.T.astype(int) @ seen.astype(int)  # (R, R)
    kappa = np.full((n_raters, n_raters), np.nan)
    for r in range(n_raters):
        for s in range(r + 1, n_raters):
            if shared[r, s] >= min_shared:
                both = seen[:, r] & seen[:, s]
                kappa[r, s] = kappa[s, r] = cohen_kappa(ratings[both, r], ratings[both, s], n_categories)
    np.fill_diagonal(shared, 0)
    return kappa, shared


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa (J. L. Fleiss 1971, Psychol. Bull. 76:378) from (I, K) category counts.

    Items with fewer than two ratings carry no agreement information and are dropped. The number
    of raters n_i may vary by item (the common generalisation):

        P_i   = (sum_k n_ik^2 - n_i) / (n_i (n_i - 1))     agreement among item i's rater pairs
        P_bar = mean_i P_i
        p_k   = sum_i n_ik / sum_i n_i                       overall category frequency
        P_e   = sum_k p_k^2
        kappa = (P_bar - P_e) / (1 - P_e)

    With a constant n_i this is exactly Fleiss' formula. NaN if no item has two ratings or P_e == 1.
    """
    counts = np.asarray(counts, dtype=float)
    n_i = counts.sum(axis=1)
    counts, n_i = counts[n_i >= 2], n_i[n_i >= 2]
    if len(n_i) == 0:
        return float("nan")
    p_i = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_k = counts.sum(axis=0) / n_i.sum()
    p_e = float((p_k**2).sum())
    if np.isclose(p_e, 1.0):
        return float("nan")
    return (float(p_i.mean()) - p_e) / (1.0 - p_e)


def krippendorff_alpha(ratings: np.ndarray, level: str = "ordinal", n_categories: int = 3) -> float:
    """Krippendorff's alpha (K. Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011).

    Built from the coincidence matrix o[c, k] = sum over items u with m_u >= 2 ratings of
    (n_uc n_uk - [c == k] n_uc) / (m_u - 1), its marginals n_c = sum_k o[c, k] and n = sum_c n_c:

        alpha = 1 - (n - 1) * sum_ck o[c, k] delta2[c, k] / sum_ck n_c n_k delta2[c, k]

    ``level='nominal'``: delta2 = [c != k]. ``level='ordinal'``: categories are ranks and
        delta2[c, k] = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2,
    so a tie sits between "a better" and "b better": confusing a with b costs more than a with tie.
    Missing ratings are -1. NaN when fewer than two pairable values exist or only one category was
    used (no expected disagreement).
    """
    counts = category_counts(ratings, n_categories).astype(float)
    m_u = counts.sum(axis=1)
    counts, m_u = counts[m_u >= 2], m_u[m_u >= 2]
    if len(m_u) == 0:
        return float("nan")
    # (K, K) coincidences: sum_u (n_u n_u^T - diag(n_u)) / (m_u - 1)
    weights = 1.0 / (m_u - 1)
    o = np.einsum("u,uc,uk->ck", weights, counts, counts) - np.diag(weights @ counts)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    delta2 = _delta2(n_c, level)
    expected = float(np.outer(n_c, n_c).ravel() @ delta2.ravel())
    if expected == 0.0:
        return float("nan")
    return 1.0 - (n - 1) * float(o.ravel() @ delta2.ravel()) / expected


def _delta2(n_c: np.ndarray, level: str) -> np.ndarray:
    k = len(n_c)
    if level == "nominal":
        return 1.0 - np.eye(k)
    if level != "ordinal":
        raise ValueError(f"level must be 'nominal' or 'ordinal', got {level!r}")
    cum = np.concatenate([[0.0], np.cumsum(n_c)])
    d = np.zeros((k, k))
    for c in range(k):
        for g in range(c + 1, k):
            d[c, g] = d[g, c] = (cum[g + 1] - cum[c] - (n_c[c] + n_c[g]) / 2.0) ** 2
    return d


def plurality(counts: np.ndarray) -> np.ndarray:
    """(I, K) counts -> (I,) the category with strictly the most votes, or -1 (none, or a draw).

    A draw between the top categories (1 vote a, 1 vote b) is left unresolved rather than turned
    into a tie: "annotators disagree" and "annotators judged a tie" are different facts.
    """
    counts = np.asarray(counts)
    top = counts.max(axis=1, keepdims=True)
    unique = ((counts == top).sum(axis=1) == 1) & (top[:, 0] > 0)
    return np.where(unique, counts.argmax(axis=1), MISSING)


def agreement_with_consensus(ratings: np.ndarray, n_categories: int = 3):
    """Each rater's agreement with the plurality of the *other* raters (leave-one-out).

    Including the rater's own vote would inflate the figure (with 3 raters a rater agrees with a
    consensus they helped form). Items where the others have no strict plurality are not counted.
    Returns ``(rate, n)``: (R,) fraction agreeing (NaN where n == 0) and (R,) items counted.
    """
    ratings = np.asarray(ratings)
    counts = category_counts(ratings, n_categories)
    rate, n = np.full(ratings.shape[1], np.nan), np.zeros(ratings.shape[1], dtype=int)
    for r in range(ratings.shape[1]):
        mine = ratings[:, r]
        rows = np.flatnonzero(mine != MISSING)
        others = counts[rows].copy()
        others[np.arange(len(rows)), mine[rows]] -= 1
        cons = plurality(others)
        ok = cons != MISSING
        n[r] = int(ok.sum())
        if n[r]:
            rate[r] = float(np.mean(mine[rows][ok] == cons[ok]))
    return rate, n


def gold_accuracy(ratings: np.ndarray, gold: np.ndarray):
    """Each rater's accuracy on gold items. ``gold`` (I,) holds the known category or -1.

    A tie vote on a gold item counts as wrong (gold items have a known winner). Returns
    ``(rate, n)`` like :func:`agreement_with_consensus`.
    """
    ratings, gold = np.asarray(ratings), np.asarray(gold)
    mask = (ratings != MISSING) & (gold[:, None] != MISSING)
    n = mask.sum(axis=0)
    correct = ((ratings == gold[:, None]) & mask).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, correct / np.maximum(n, 1), np.nan)
    return rate, n


@dataclass
class DawidSkene:
    posteriors: np.ndarray
    """(I, K) posterior probability of each item's true category (uniform for unlabelled items)."""
    priors: np.ndarray
    """(K,) estimated frequency of each true category."""
    confusion: np.ndarray
    """(R, K, K) confusion[r, true, given]: probability that rater r answers ``given``."""
    accuracy: np.ndarray
    """(R,) expected fraction of rater r's answers that are correct under the posteriors
    (sum_i sum_k T[i, k] [rater r said k on i] / items rater r labelled); NaN for raters with no labels."""
    n_iter: int
    converged: bool


def dawid_skene(ratings: np.ndarray, n_categories: int = 3, *, max_iter: int = 200, tol: float = 1e-6,
                smoothing: float = 0.01) -> DawidSkene:
    """Annotator-noise model by EM (A. P. Dawid and A. M. Skene 1979, J. R. Stat. Soc. C 28:20).

    Each rater r has a confusion matrix theta_r[k, l] = P(answer l | true k); items have true class
    priors pi. EM alternates
        E: T[i, k] ∝ pi_k prod_{r labelled i} theta_r[k, l_ir]
        M: pi_k ∝ sum_i T[i, k];  theta_r[k, l] ∝ smoothing + sum_i T[i, k] [l_ir == l]
    starting from T = per-item vote shares (majority voting), which fixes the class labelling.
    ``smoothing`` is a Dirichlet pseudo-count that keeps a rater who never saw a class from getting a
    zero row (log 0). Stops when no posterior moves more than ``tol`` or after ``max_iter`` rounds.
    """
    ratings = np.asarray(ratings)
    n_items, n_raters = ratings.shape
    onehot = np.zeros((n_items, n_raters, n_categories))
    seen = ratings != MISSING
    ii, rr = np.nonzero(seen)
    onehot[ii, rr, ratings[ii, rr]] = 1.0
    counts = onehot.sum(axis=1)  # (I, K)
    labelled = counts.sum(axis=1) > 0
    t = np.full((n_items, n_categories), 1.0 / n_categories)
    t[labelled] = counts[labelled] / counts[labelled].sum(axis=1, keepdims=True)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        priors = t[labelled].sum(axis=0) + smoothing
        priors /= priors.sum()
        confusion = np.einsum("ik,irl->rkl", t, onehot) + smoothing  # (R, K, K)
        confusion /= confusion.sum(axis=2, keepdims=True)
        log_t = np.log(priors)[None, :] + np.einsum("irl,rkl->ik", onehot, np.log(confusion))
        log_t -= log_t.max(axis=1, keepdims=True)
        new_t = np.exp(log_t)
        new_t /= new_t.sum(axis=1, keepdims=True)
        new_t[~labelled] = 1.0 / n_categories
        delta = float(np.abs(new_t - t).max()) if n_items else 0.0
        t = new_t
        if delta < tol:
            converged = True
            break
    n_r = seen.sum(axis=0)
    correct = np.einsum("ik,irk->r", t, onehot)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(n_r > 0, correct / np.maximum(n_r, 1), np.nan)
    return DawidSkene(posteriors=t, priors=priors, confusion=confusion, accuracy=accuracy, n_iter=it,
                      converged=converged)


@dataclass
class Throughput:
    n_labels: int
    active_s: float
    """Sum of the gaps between consecutive labels, each capped at ``idle_gap_s``: a longer gap is a
    break, and counts as ``idle_gap_s`` of work at most."""
    labels_per_hour: float
    """(n_labels - 1) / active_s * 3600: the first label has no gap before it. NaN with < 2 labels."""


def throughput(times_s: np.ndarray, idle_gap_s: float = 600.0) -> Throughput:
    """Labelling speed from the submission times (seconds) of one annotator's labels."""
    times = np.sort(np.asarray(times_s, dtype=float))
    if len(times) < 2:
        return Throughput(len(times), 0.0, float("nan"))
    active = float(np.minimum(np.diff(times), idle_gap_s).sum())
    rate = (len(times) - 1) / active * 3600.0 if active > 0 else float("nan")
    return Throughput(len(times), active, rate)


def fractional_ranks(dense: np.ndarray) -> np.ndarray:
    """Dense ranks (1 best, equal = tie, no gaps) -> fractional ranks: tied objects share the mean of
    the positions they occupy, e.g. [1, 2, 2] -> [1, 2.5, 2.5]. Works on the last axis."""
    dense = np.asarray(dense)
    out = np.empty(dense.shape, dtype=float)
    for idx in np.ndindex(dense.shape[:-1]):
        row, start = dense[idx], 0
        for level in np.unique(row):
            tied = row == level
            k = int(tied.sum())
            out[idx][tied] = start + (k + 1) / 2.0
            start += k
    return out


def kendall_w(ranks: np.ndarray) -> float:
    """Kendall's coefficient of concordance W of m rankings of the same n objects, with the
    correction for ties (M. G. Kendall & B. Babington Smith 1939, Ann. Math. Stat. 10:275):

        R_i = sum_j r_ij,  S = sum_i (R_i - m (n + 1) / 2)^2,  T_j = sum over tie groups of (t^3 - t)
        W   = 12 S / (m^2 (n^3 - n) - m sum_j T_j)

    ``ranks`` is (m, n) fractional ranks (``fractional_ranks``). 1: every ranking the same; 0: no
    agreement. NaN with fewer than two rankings or when every ranking ties everything.
    """
    r = np.asarray(ranks, dtype=float)
    m, n = r.shape
    if m < 2 or n < 2:
        return float("nan")
    s = float(((r.sum(axis=0) - m * (n + 1) / 2.0) ** 2).sum())
    ties = sum(float((c**3 - c).sum()) for c in (np.unique(row, return_counts=True)[1] for row in r))
    denom = m * m * (n**3 - n) - m * ties
    return float("nan") if denom <= 0 else 12.0 * s / denom
