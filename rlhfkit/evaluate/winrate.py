"""Head-to-head evaluation of a policy against a reference on the same prompts.

Everything here is per prompt and paired: completion i of the policy and completion i of the
reference answer prompt i, and bootstrap intervals resample prompts (both sides together).
`evaluate_pairs` assembles the `eval.json` record a run directory carries; its schema is in
docs/evaluation.md and in `EVAL_SCHEMA_VERSION`'s comment below.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from rlhfkit.evaluate.stats import Estimate, bootstrap_ci

__all__ = [
    "EVAL_SCHEMA_VERSION",
    "win_rate",
    "length_controlled_win_rate",
    "distinct_n",
    "length_stats",
    "sequence_kl_estimate",
    "evaluate_pairs",
    "format_table",
]

# Bump when a key of the evaluate_pairs dict changes meaning or moves.
EVAL_SCHEMA_VERSION = 1


def _prefs_array(prefs: npt.ArrayLike) -> np.ndarray:
    p = np.asarray(prefs, dtype=float).ravel()
    if p.size == 0:
        raise ValueError("no preferences given")
    if not np.all((p >= 0) & (p <= 1)):
        bad = p[~((p >= 0) & (p <= 1))][:5].tolist()
        raise ValueError(f"preferences must lie in [0, 1] (1 = A wins, 0.5 = tie, 0 = B wins); got {bad}")
    return p


def win_rate(prefs: npt.ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Mean preference for A over B, a tie counting half, with a percentile bootstrap CI over prompts.

    prefs: (N,) per prompt, 1 = A wins, 0.5 = tie, 0 = B wins (a judge's probability in [0, 1] is
    also accepted). Example: [1, 1, 0.5, 0] -> (1 + 1 + 0.5 + 0) / 4 = 0.625.
    """
    return bootstrap_ci(_prefs_array(prefs), np.mean, n_boot=n_boot, alpha=alpha, seed=seed)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Batched 2-parameter logistic regression y ~ sigmoid(theta0 + theta1 x) by Newton's method.

    x, y: (B, N), one independent fit per row; y may be fractional (soft labels, ties = 0.5), the
    loss is the binary cross-entropy summed over N plus 0.5 * l2 * |theta|^2. The tiny ridge keeps
    the optimum finite when the data are separable (e.g. A wins every prompt) and changes nothing
    measurable otherwise. The objective is strictly convex, so Newton converges from zero.
    Returns theta (B, 2).
    """
    B, _ = x.shape
    X = np.stack([np.ones_like(x), x], axis=-1)  # (B, N, 2)
    theta = np.zeros((B, 2))
    eye = np.eye(2)
    for _ in range(iters):
        p = _sigmoid(np.einsum("bnk,bk->bn", X, theta))  # (B, N)
        grad = np.einsum("bnk,bn->bk", X, y - p) - l2 * theta  # (B, 2), gradient of the log-likelihood
        w = p * (1 - p)
        hess = np.einsum("bnk,bn,bnl->bkl", X, w, X) + l2 * eye  # (B, 2, 2), minus the Hessian
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        theta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta


def _lc_rows(p: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """LC win rate for each row of (B, N) prefs / length differences."""
    std = delta.std(axis=1, keepdims=True)
    # No spread in length difference: nothing to regress on, tanh term is constant 0 -> raw rate.
    std = np.where(std > 0, std, 1.0)
    x = np.tanh(delta / std)  # not centred: x = 0 must mean "equal lengths"
    theta = _fit_logistic(x, p)
    return _sigmoid(theta[:, 0])


def length_controlled_win_rate(
    prefs: npt.ArrayLike,
    len_a: npt.ArrayLike,
    len_b: npt.ArrayLike,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """Win rate of A over B had both answered at equal length (AlpacaEval 2's LC win rate).

    Dubois et al. 2024, "Length-Controlled AlpacaEval", arXiv 2404.04475: fit the judge's preference
    with a GLM  P(A wins) = sigmoid(theta0 + theta1 * tanh(delta / std(delta))),  delta = len_a - len_b
    (standardised by its std but NOT centred, so 0 still means equal length), and report the
    prediction at delta = 0, sigmoid(theta0). The paper's GLM also has instruction-difficulty and
    per-model terms fitted across many models; with one pair of systems those are not identifiable
    and are left out. Lengths are whatever unit you pass (AlpacaEval uses characters).

    CI: percentile bootstrap over prompts, refitting the GLM on each replicate.
    """
    p = _prefs_array(prefs)
    la, lb = np.asarray(len_a, dtype=float).ravel(), np.asarray(len_b, dtype=float).ravel()
    if not (la.size == lb.size == p.size):
        raise ValueError(
            f"prefs, len_a, len_b must align per prompt; got sizes {p.size}, {la.size}, {lb.size}"
        )
    delta = la - lb
    minority = min(int(np.sum(delta <= 0)), int(np.sum(delta >= 0)))
    if minority < max(1, 0.05 * p.size):
        warnings.warn(
            f"only {minority} of {p.size} prompts have a length difference on the minority side of zero, so "
            "the LC win rate (a prediction at equal length) is an extrapolation; read it with care",
            stacklevel=2,
        )
    value = float(_lc_rows(p[None], delta[None])[0])
    if p.size < 2:
        return Estimate(value, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, p.size, size=(n_boot, p.size))  # (n_boot, N)
    boot = _lc_rows(p[idx], delta[idx])
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Estimate(value, float(lo), float(hi))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016, arXiv 1510.03055): unique n-grams / total n-grams over all texts.

    Tokens are whitespace-split words. Example: ["a b a b"], n=2 -> bigrams (a b), (b a), (a b):
    2 unique / 3 total = 0.667. Returns 0.0 when no text has n words.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    total, seen = 0, set()
    for t in texts:
        words = t.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def length_stats(texts: Sequence[str]) -> dict[str, float]:
    """Length summary in whitespace words (and mean characters) of a list of completions."""
    if len(texts) == 0:
        raise ValueError("length_stats got no texts")
    words = np.array([len(t.split()) for t in texts], dtype=float)
    chars = np.array([len(t) for t in texts], dtype=float)
    return {
        "n": int(words.size),
        "mean_words": float(words.mean()),
        "median_words": float(np.median(words)),
        "p90_words": float(np.percentile(words, 90)),
        "max_words": float(words.max()),
        "mean_chars": float(chars.mean()),
        "frac_empty": float(np.mean(words == 0)),
    }


def sequence_kl_estimate(
    logps_a_under_a: npt.ArrayLike,
    logps_a_under_b: npt.ArrayLike,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """Monte-Carlo KL(A || B) per sequence: mean over y ~ A of log A(y) - log B(y), in nats.

    Inputs are per-sequence summed log-probs `logps` (N,) of the same N samples drawn from A, scored
    by A and by B. The mean is the unbiased "k1" estimator (http://joschu.net/blog/kl-approx.html);
    single terms can be negative and so can the mean when A and B are close. It is NOT clamped at 0:
    clamping would bias it upward. A CI lying wholly below 0 is warned about, because it usually
    means the two log-probs were computed differently (sampling temperature, top-p, prompt template).
    """
    a = np.asarray(logps_a_under_a, dtype=float).ravel()
    b = np.asarray(logps_a_under_b, dtype=float).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"need the same non-zero number of log-probs under A and B; got {a.size} and {b.size}"
        )
    est = bootstrap_ci(a, np.mean, paired_with=b, n_boot=n_boot, alpha=alpha, seed=seed)
    if est.ci_high < 0:
        warnings.warn(
            f"sequence KL estimate {est} is significantly negative: the samples' log-probs under A and B "
            "were probably computed under different sampling settings (temperature, top-p) or templates",
            stacklevel=2,
        )
    return est


def _paired_block(policy: np.ndarray, reference: np.ndarray, n_boot: int, alpha: float, seed: int) -> dict:
    return {
        "policy": bootstrap_ci(policy, np.mean, n_boot=n_boot, alpha=alpha, seed=seed).to_dict(),
        "reference": bootstrap_ci(reference, np.mean, n_boot=n_boot, alpha=alpha, seed=seed).to_dict(),
        "difference": bootstrap_ci(
            policy, np.mean, paired_with=reference, n_boot=n_boot, alpha=alpha, seed=seed
        ).to_dict(),
    }


def _scores(name: str, values, n: int) -> np.ndarray | None:
    if values is None:
        return None
    a = np.asarray(values, dtype=float).ravel()
    if a.size != n:
        raise ValueError(f"{name} has {a.size} values but there are {n} prompts; pass one value per prompt")
    if not np.all(np.isfinite(a)):
        raise ValueError(
            f"{name} has non-finite values at prompts {np.flatnonzero(~np.isfinite(a))[:10].tolist()}"
        )
    return a


def _score_prefs(policy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """1 where policy scores higher, 0.5 on exact ties, 0 otherwise."""
    return np.where(policy > reference, 1.0, np.where(policy == reference, 0.5, 0.0))


def evaluate_pairs(
    policy_completions: Sequence[str],
    reference_completions: Sequence[str],
    *,
    gold_policy: npt.ArrayLike | None = None,
    gold_reference: npt.ArrayLike | None = None,
    proxy_policy: npt.ArrayLike | None = None,
    proxy_reference: npt.ArrayLike | None = None,
    prefs: npt.ArrayLike | None = None,
    logps_policy: npt.ArrayLike | None = None,
    logps_reference_on_policy: npt.ArrayLike | None = None,
    meta: dict,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Build the `eval.json` record: policy vs reference on the same N prompts.

    Win-rate source, first available: `prefs` (a judge's per-prompt preference for the policy), else
    the gold scores compared per prompt, else the proxy scores (exact equality is a tie). Gold/proxy
    scores come in pairs (policy and reference) or not at all. `logps_policy` and
    `logps_reference_on_policy` are the policy's samples scored by the policy and by the reference
    (per-sequence sums); they give KL(policy || reference). Non-finite numbers are stored as null.
    """
    n = len(policy_completions)
    if n == 0:
        raise ValueError("evaluate_pairs got no completions")
    if len(reference_completions) != n:
        raise ValueError(
            f"{n} policy completions but {len(reference_completions)} reference completions; they must pair per prompt"
        )
    kw = dict(n_boot=n_boot, alpha=alpha, seed=seed)
    scores = {
        name: _scores(name, v, n)
        for name, v in [
            ("gold_policy", gold_policy),
            ("gold_reference", gold_reference),
            ("proxy_policy", proxy_policy),
            ("proxy_reference", proxy_reference),
            ("prefs", prefs),
            ("logps_policy", logps_policy),
            ("logps_reference_on_policy", logps_reference_on_policy),
        ]
    }
    for kind in ("gold", "proxy"):
        if (scores[f"{kind}_policy"] is None) != (scores[f"{kind}_reference"] is None):
            raise ValueError(f"pass both {kind}_policy and {kind}_reference, or neither")
    if (scores["logps_policy"] is None) != (scores["logps_reference_on_policy"] is None):
        raise ValueError("pass both logps_policy and logps_reference_on_policy, or neither")

    if scores["prefs"] is not None:
        p, source = _prefs_array(scores["prefs"]), "prefs"
    elif scores["gold_policy"] is not None:
        p, source = _score_prefs(scores["gold_policy"], scores["gold_reference"]), "gold"
    elif scores["proxy_policy"] is not None:
        p, source = _score_prefs(scores["proxy_policy"], scores["proxy_reference"]), "proxy"
    else:
        p, source = None, None

    len_pol = np.array([len(t) for t in policy_completions], dtype=float)
    len_ref = np.array([len(t) for t in reference_completions], dtype=float)
    out: dict = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "meta": dict(meta),
        "n_prompts": n,
        "alpha": alpha,
        "n_boot": n_boot,
        "seed": seed,
        "win_rate": None,
        "lc_win_rate": None,
        "gold": None,
        "proxy": None,
        "kl": None,
        "length": {
            "policy": length_stats(policy_completions),
            "reference": length_stats(reference_completions),
        },
        "distinct": {
            side: {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
            for side, texts in (("policy", policy_completions), ("reference", reference_completions))
        },
    }
    if p is not None:
        out["win_rate"] = {
            **win_rate(p, **kw).to_dict(),
            "source": source,
            "n_wins": int(np.sum(p == 1.0)),
            "n_ties": int(np.sum(p == 0.5)),
            "n_losses": int(np.sum(p == 0.0)),
        }
        out["lc_win_rate"] = {
            **length_controlled_win_rate(p, len_pol, len_ref, **kw).to_dict(),
            "length_unit": "chars",
        }
    for kind in ("gold", "proxy"):
        if scores[f"{kind}_policy"] is not None:
            out[kind] = _paired_block(scores[f"{kind}_policy"], scores[f"{kind}_reference"], **kw)
    if scores["logps_policy"] is not None:
        out["kl"] = sequence_kl_estimate(
            scores["logps_policy"], scores["logps_reference_on_policy"], **kw
        ).to_dict()
    return out


def _fmt(est: dict | None, pct: bool = False) -> str:
    if est is None or est.get("value") is None:
        return "-"
    f = (
        (lambda v: "nan" if v is None else f"{100 * v:.1f}%")
        if pct
        else (lambda v: "nan" if v is None else f"{v:.4g}")
    )
    if est.get("ci_low") is None:  # a bound or an exact value: no interval
        return f"{f(est['value'])} ({est.get('kind', 'no CI')})"
    return f"{f(est['value'])} [{f(est['ci_low'])}, {f(est['ci_high'])}]"


def format_table(eval_dict: dict) -> str:
    """Human-readable console table of an `evaluate_pairs` record."""
    level = f"{100 * (1 - eval_dict.get('alpha', 0.05)):.0f}% CI"
    rows = [("n_prompts", str(eval_dict["n_prompts"]))]
    wr = eval_dict.get("win_rate")
    if wr is not None:
        rows.append(
            (
                f"win rate (from {wr['source']})",
                f"{_fmt(wr, pct=True)}  W/T/L {wr['n_wins']}/{wr['n_ties']}/{wr['n_losses']}",
            )
        )
        rows.append(("LC win rate", _fmt(eval_dict.get("lc_win_rate"), pct=True)))
    for kind in ("gold", "proxy"):
        block = eval_dict.get(kind)
        if block is not None:
            rows.append((f"{kind} policy", _fmt(block["policy"])))
            rows.append((f"{kind} reference", _fmt(block["reference"])))
            rows.append((f"{kind} policy - reference", _fmt(block["difference"])))
    if eval_dict.get("kl") is not None:
        rows.append(("KL(policy || reference) nats", _fmt(eval_dict["kl"])))
    for side in ("policy", "reference"):
        ls, dn = eval_dict["length"][side], eval_dict["distinct"][side]
        rows.append(
            (
                f"{side} length (words)",
                f"mean {ls['mean_words']:.1f}  median {ls['median_words']:.0f}  max {ls['max_words']:.0f}",
            )
        )
        rows.append((f"{side} distinct-1 / -2", f"{dn['distinct_1']:.3f} / {dn['distinct_2']:.3f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value [{level}]", "-" * (width + 2 + 30)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)
