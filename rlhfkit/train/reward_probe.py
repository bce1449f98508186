"""The reward head as a probe: features of a frozen body extracted once, then an L2-regularised
Bradley–Terry (logistic) fit on their differences, its strength chosen by prompt-grouped K-fold
cross-validation. Minutes instead of epochs of forward passes; ``rlhfkit.train.reward`` uses it for
``freeze_backbone`` (the whole fit) and as the starting head of a fine-tuned RM (LP-FT: Kumar et al.
2022, "Fine-Tuning can Distort Pretrained Features", linear probe then fine-tune). docs/reward.md.

Model: P(chosen ≻ rejected) = σ(w · (z_c - z_r)), z = (f - μ) / s the read-out features standardised
per dimension on the training replies (μ cancels in the difference; s puts every dimension on one
scale, so one L2 strength λ suits all). Loss: mean binary cross-entropy (target 1, or ½ for a tie) +
λ/2 ‖w‖². The head then holds w / s and the bias -(w / s) · μ, so ``score`` needs no extra constants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from rlhfkit.models.heads import PackedScorer
from rlhfkit.models.readout import layer_span, read_layer_features, readout_of, set_readout
from rlhfkit.train.reward_data import EncodedPair, collate, make_units, micro_batches

L2_GRID = tuple(float(10.0 ** k) for k in np.arange(-3.0, 2.01, 0.5))
"""Candidate λ (per-pair mean loss + λ/2 ‖w‖² on standardised features): 1e-3 .. 1e2, half decades.
The issue-18 measurements picked ~1-10 at a few hundred pairs of 576-d features."""


@dataclass
class ProbeFit:
    weight: np.ndarray
    """(d,) head weight on the raw read-out (standardisation folded in)."""
    bias: float
    l2: float
    """The chosen λ."""
    cv: dict | None
    """λ -> mean held-out log-loss and accuracy over the folds; None when there were too few prompts."""
    seconds: float


@torch.no_grad()
def extract_features(scorer: PackedScorer, pairs: list[EncodedPair], pad_id: int, batch_size: int,
                     device, layers: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(m, d) read-out features of each pair's chosen and of its rejected reply: one no-grad forward
    pass over packed rows [prompt ; its distinct replies] (each reply computed once), float64.
    ``layers``: (m, len(layers), d) instead, the read-out's pooling of each of those hidden states."""
    was_training = scorer.training
    scorer.eval()
    units = make_units(pairs, share=True)  # one per prompt key, in first-appearance order
    feats: dict[int, np.ndarray] = {}
    for micro in micro_batches(units, batch_size):
        b = collate(micro, pad_id, device)
        if layers is None:
            f = scorer.features(b["input_ids"], b["attention_mask"], b["position_ids"], b["read_at"], b["reply_start"])
        else:
            f = read_layer_features(scorer.model, b["input_ids"], b["attention_mask"], b["position_ids"],
                                    b["reply_start"], b["read_at"], layers)
        for r, u in enumerate(micro):
            feats[id(u)] = f[r, :len(u.replies)].double().cpu().numpy()  # (n_replies, d)
    scorer.train(was_training)
    by_key = dict(zip(dict.fromkeys(p.prompt_key for p in pairs), units))
    seen: dict[str, int] = {}
    chosen, rejected = [], []
    for p in pairs:  # the k-th pair of a prompt is that unit's k-th (make_units keeps the order)
        u = by_key[p.prompt_key]
        k = seen.get(p.prompt_key, 0)
        seen[p.prompt_key] = k + 1
        c, r = u.pairs[k]
        chosen.append(feats[id(u)][c])
        rejected.append(feats[id(u)][r])
    return np.stack(chosen), np.stack(rejected)


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, w0: np.ndarray | None = None) -> np.ndarray:
    """argmin_w mean(softplus(x w) - y · x w) + l2/2 ‖w‖² (no bias: σ(-t) = 1 - σ(t) makes the BT
    difference model symmetric in the pair's order) by L-BFGS with the exact gradient."""
    from scipy.optimize import minimize  # ~0.3 s to import: only when a probe is fitted

    m = len(y)

    def loss_grad(w):
        t = x @ w
        loss = np.logaddexp(0.0, t).sum() / m - (y * t).sum() / m + 0.5 * l2 * w @ w
        grad = x.T @ (1 / (1 + np.exp(-t)) - y) / m + l2 * w
        return loss, grad

    res = minimize(loss_grad, np.zeros(x.shape[1]) if w0 is None else w0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000})
    return res.x


def prompt_folds(groups: list[str], folds: int, seed: int) -> np.ndarray:
    """(m,) fold index per pair: distinct prompts shuffled (seeded) and dealt round-robin, so the pairs
    of one prompt are never on both sides of a split (they share replies: a pair-level split leaks)."""
    keys = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(keys))
    fold_of = {keys[i]: n % folds for n, i in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def fit_probe(f_chosen: np.ndarray, f_rejected: np.ndarray, target: np.ndarray, groups: list[str], folds: int = 5,
              l2_grid: tuple[float, ...] = L2_GRID, seed: int = 0) -> ProbeFit:
    """Fit the BT probe; λ from ``l2_grid`` by the lowest mean held-out log-loss over ``folds``
    prompt-grouped folds (fewer folds when there are fewer prompts; none below 2: the middle λ)."""
    t0 = time.perf_counter()
    if len(target) == 0:
        raise ValueError("the probe needs at least one training pair")
    both = np.concatenate([f_chosen, f_rejected])
    mu, s = both.mean(0), both.std(0) + 1e-6
    x = (f_chosen - f_rejected) / s  # (m, d); μ cancels
    y = np.asarray(target, dtype=np.float64)
    k = min(folds, len(set(groups)))
    cv = None
    if k >= 2:
        fold = prompt_folds(groups, k, seed)
        cv = {}
        for lam in l2_grid:
            losses, accs = [], []
            for f in range(k):
                tr, te = fold != f, fold == f
                w = _fit_logistic(x[tr], y[tr], lam)
                t = x[te] @ w
                losses.append(float(np.mean(np.logaddexp(0.0, t) - y[te] * t)))
                decided = y[te] != 0.5
                if decided.any():
                    accs.append(float(np.mean((t[decided] > 0) == (y[te][decided] > 0.5))))
            cv[lam] = {"log_loss": float(np.mean(losses)), "accuracy": float(np.mean(accs)) if accs else None}
        best = min(l2_grid, key=lambda lam: (cv[lam]["log_loss"], -lam))  # a tie goes to the stronger λ
    else:
        best = l2_grid[len(l2_grid) // 2]
    w = _fit_logistic(x, y, best)
    weight = w / s
    return ProbeFit(weight=weight, bias=float(-weight @ mu), l2=best, cv=cv, seconds=time.perf_counter() - t0)


def set_head(scorer: PackedScorer, fit: ProbeFit) -> None:
    """Copy the probe into the reward head (a bias-free head keeps only the weight: BT ignores it)."""
    head = scorer.head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(fit.weight, dtype=head.weight.dtype).view_as(head.weight))
        if head.bias is not None:
            head.bias.fill_(fit.bias)


def range_mean(per_layer: np.ndarray, layers: str, first: int) -> np.ndarray:
    """(m, d) features of the range ``layers`` ("A-B") from (m, K, d) per-layer ones whose column j is
    hidden state ``first + j``: their mean (pooling is linear, so this is the range's read-out)."""
    lo, hi = layer_span(layers)
    return per_layer[:, lo - first:hi - first + 1].mean(1)


def choose_layers(fc: np.ndarray, fr: np.ndarray, target: np.ndarray, groups: list[str], candidates: list[str],
                  folds: int, seed: int) -> tuple[str, ProbeFit, dict]:
    """The candidate range ("A-B") whose probe has the lowest cross-validated log-loss (at its own best λ;
    a tie goes to the earlier candidate), its fit, and every candidate's CV log-loss. ``fc``/``fr``:
    (m, K, d) per-layer features, column j holding hidden state ``first + j`` where ``first`` is the lowest
    layer of any candidate (as :func:`fit_head` extracts them)."""
    first = min(layer_span(c)[0] for c in candidates)
    fits, losses = {}, {}
    for c in candidates:
        fits[c] = fit_probe(range_mean(fc, c, first), range_mean(fr, c, first), target, groups, folds=folds, seed=seed)
        cv = fits[c].cv
        losses[c] = cv[fits[c].l2]["log_loss"] if cv else float("inf")
    best = min(candidates, key=lambda c: losses[c])  # min keeps the first of equals
    if not np.isfinite(losses[best]):  # too few prompts to cross-validate: the first candidate ("middle")
        best = candidates[0]
    return best, fits[best], losses


def fit_head(scorer: PackedScorer, pairs: list[EncodedPair], pad_id: int, batch_size: int, device, folds: int,
             seed: int, candidates: list[str] | None = None) -> dict:
    """Extract the training pairs' features, fit the probe, put it in the head; returns its metrics
    (training BT loss and accuracy, ``probe/l2``, the CV table, extraction and fit seconds).

    ``candidates`` (layer ranges "A-B", ``readout.candidate_layers``): extract every hidden state they span
    in the same single pass, fit a probe per range, keep the range with the lowest cross-validated
    log-loss and store it as the model's read-out (``probe/layers``, ``probe/layers_cv``)."""
    t0 = time.perf_counter()
    groups = [p.prompt_key for p in pairs]
    target = np.array([0.5 if p.tie else 1.0 for p in pairs])
    chosen = {}
    if candidates:
        spans = [layer_span(c) for c in candidates]
        first, last = min(lo for lo, _ in spans), max(hi for _, hi in spans)
        fc_all, fr_all = extract_features(scorer, pairs, pad_id, batch_size, device, list(range(first, last + 1)))
        extract_s = time.perf_counter() - t0
        layers, fit, losses = choose_layers(fc_all, fr_all, target, groups, candidates, folds, seed)
        fc, fr = range_mean(fc_all, layers, first), range_mean(fr_all, layers, first)
        set_readout(scorer.model, readout_of(scorer.model).pooling, layers)
        chosen = {"probe/layers": layers, "probe/layers_cv": losses}
    else:
        fc, fr = extract_features(scorer, pairs, pad_id, batch_size, device)
        extract_s = time.perf_counter() - t0
        fit = fit_probe(fc, fr, target, groups, folds=folds, seed=seed)
    set_head(scorer, fit)
    fit_s = time.perf_counter() - t0 - extract_s
    decided = target != 0.5
    diff = (fc - fr) @ fit.weight
    best_cv = fit.cv[fit.l2] if fit.cv else {}
    return {"loss/reward": float(np.mean(np.logaddexp(0.0, diff) - target * diff)),
            "reward/accuracy": float(np.mean(diff[decided] > 0)) if decided.any() else None, "probe/l2": fit.l2, "probe/cv_log_loss": best_cv.get("log_loss"), "probe/cv_accuracy": best_cv.get("accuracy"),
            "probe/extract_seconds": extract_s, "probe/fit_seconds": fit_s, "probe/pairs": len(pairs),
            "probe/cv": {str(k): v for k, v in (fit.cv or {}).items()}, **chosen}
