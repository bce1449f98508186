"""Project statistics from the database: the glue between the store and ``agreement.py``.

Agreement figures (Fleiss, Krippendorff, Cohen, Dawid–Skene, consensus) use regular pairs only:
gold pairs are chosen to be easy and would inflate them; they give ``gold_accuracy`` instead.

A ranking of K replies counts as its K(K-1)/2 implied pairwise votes (reply i vs reply j, i < j:
'a' when i is ranked above j, 'b' below, 'tie' level), each implied pair an item of its own
(InstructGPT's reading of a ranking, Ouyang et al. 2022, sec. 3.5). The implied pairs of one
ranking are not independent, so on ranking items the figures describe pairwise agreement, and the
bootstrap intervals resample whole items (all implied pairs of a ranking together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import case, func, select

from rlhfkit.annotate import agreement as ag
from rlhfkit.annotate import quality
from rlhfkit.annotate.models import Annotator, Assignment, Label, Pair
from rlhfkit.annotate.projects import find_project
from rlhfkit.annotate.quality import Thresholds
from rlhfkit.annotate.store import Store


@dataclass
class Vote:
    item: tuple[int, int, int]
    """(pair id, i, j): the pair (0, 1), or the implied pair (reply i as a, reply j as b) of a ranking."""
    annotator: str
    winner: str
    """'a', 'b' or 'tie'."""
    strength: int | None
    rationale: str | None
    unsafe: bool
    left: str
    """The side shown on the left: 'a' or 'b'."""
    duration_ms: int | None
    time: datetime
    ranks: list[int] | None = None
    """The whole ranking this implied vote comes from (by reply index), None for a pair vote."""
    shown_order: list[int] | None = None
    """The ranking's reply indices in the order they were shown."""
    ratings: dict | None = None
    """{aspect: [rating by reply index]} of the whole answer (ratings.py), None without ratings."""

    @property
    def pair_id(self) -> int:
        return self.item[0]

    def side_ratings(self) -> dict | None:
        """This vote's ratings of its two sides: {aspect: {"a": rating of reply i, "b": of reply j}}."""
        if not self.ratings:
            return None
        _, i, j = self.item
        return {name: {"a": r[i], "b": r[j]} for name, r in self.ratings.items()}

    def to_dict(self) -> dict:
        d = {"annotator": self.annotator, "winner": self.winner, "strength": self.strength,
             "rationale": self.rationale, "presented_order": "ab" if self.left == "a" else "ba",
             "unsafe": self.unsafe, "duration_ms": self.duration_ms,
             "time": self.time.isoformat(timespec="milliseconds") + "Z"}
        return d | ({"ratings": self.side_ratings()} if self.ratings else {})


@dataclass
class Votes:
    """All answers in a project, skips counted separately."""

    annotators: list[str]
    votes: list[Vote]
    gold: dict[int, str]
    """pair id -> known winner, for gold pairs."""
    skips: dict[str, int] = field(default_factory=dict)

    def regular(self) -> list[Vote]:
        return [v for v in self.votes if v.pair_id not in self.gold]

    def matrix(self, votes: list[Vote]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """(I, R) ratings over the items in ``votes`` (see agreement.py) and the item of each row."""
        items = sorted({v.item for v in votes})
        row = {p: i for i, p in enumerate(items)}
        col = {a: j for j, a in enumerate(self.annotators)}
        m = np.full((len(items), len(self.annotators)), ag.MISSING, dtype=int)
        for v in votes:
            m[row[v.item], col[v.annotator]] = ag.CODE[v.winner]
        return m, items


def load_votes(store: Store, project: str, exclude: tuple[str, ...] = ()) -> Votes:
    with store.db.read() as s:
        proj = find_project(s, project)
        annotators = [n for n in s.scalars(select(Annotator.name).where(Annotator.project_id == proj.id)
                                           .order_by(Annotator.id)) if n not in exclude]
        rows = s.execute(
            select(Label.pair_id, Annotator.name, Label.winner, Label.strength, Label.rationale, Label.unsafe,
                   Assignment.left, Label.duration_ms, Label.created_at, Label.ranks, Assignment.shown_order,
                   Label.ratings)
            .join(Assignment, Assignment.id == Label.assignment_id)
            .join(Annotator, Annotator.id == Label.annotator_id)
            .where(Annotator.project_id == proj.id, Label.skipped.is_(False))
            .order_by(Label.pair_id, Label.id)).all()
        skips = dict(s.execute(select(Annotator.name, func.count()).join(Label, Label.annotator_id == Annotator.id)
                               .where(Annotator.project_id == proj.id, Label.skipped.is_(True))
                               .group_by(Annotator.name)).all())
        gold = dict(s.execute(select(Pair.id, Pair.gold_winner)
                              .where(Pair.project_id == proj.id, Pair.gold_winner.is_not(None))).all())
    votes = [v for r in rows if r[1] not in exclude for v in _votes_of(*r)]
    return Votes(annotators, votes, gold, skips)


def _votes_of(pair_id, name, winner, strength, rationale, unsafe, left, duration_ms, time, ranks, order,
              ratings) -> list[Vote]:
    """One vote for a pair label; the K(K-1)/2 implied votes of a ranking (see the module docstring)."""
    if ranks is None:
        return [Vote((pair_id, 0, 1), name, winner, strength, rationale, unsafe, left, duration_ms, time,
                     ratings=ratings)]
    out = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            w = "a" if ranks[i] < ranks[j] else "b" if ranks[i] > ranks[j] else "tie"
            shown_left = "a" if order.index(i) < order.index(j) else "b"
            out.append(Vote((pair_id, i, j), name, w, None, rationale, unsafe, shown_left, duration_ms, time, ranks,
                            order, ratings))
    return out


def project_stats(store: Store, project: str, thresholds: Thresholds = Thresholds(), ci: bool = True) -> dict:
    """Everything the dashboard and ``rlhfkit annotate stats`` show. NaN means "not enough data".
    ``ci``: bootstrap intervals of the project's κ and α (see ``quality.py``; 1000 resamples)."""
    data = load_votes(store, project)
    regular = data.regular()
    ratings, _ = data.matrix(regular)
    counts = ag.category_counts(ratings)
    multi = counts.sum(axis=1) >= 2
    consensus = ag.plurality(counts)
    kappa, shared = ag.pairwise_cohen_kappa(ratings)
    loo, loo_n = ag.agreement_with_consensus(ratings)
    gold_ratings, gold_ids = data.matrix([v for v in data.votes if v.pair_id in data.gold])
    gold_acc, gold_n = ag.gold_accuracy(gold_ratings, np.array([ag.CODE[data.gold[p[0]]] for p in gold_ids], dtype=int))
    ds = ag.dawid_skene(ratings) if len(ratings) else None

    per = []
    for j, name in enumerate(data.annotators):
        mine = [v for v in data.votes if v.annotator == name]
        gold_mine = [v for v in mine if v.pair_id in data.gold]
        tp = ag.throughput(np.array([v.time.replace(tzinfo=timezone.utc).timestamp() for v in mine]))
        durations = [v.duration_ms for v in mine if v.duration_ms is not None]
        weights = shared[j].astype(float)
        valid = ~np.isnan(kappa[j])
        mean_kappa = (float(np.average(kappa[j][valid], weights=weights[valid]))
                      if valid.any() and weights[valid].sum() > 0 else float("nan"))
        per.append({
            "annotator": name, "labels": len({v.pair_id for v in mine}), "skips": data.skips.get(name, 0),
            "unsafe_flags": sum(v.unsafe for v in mine),
            "agreement_with_consensus": float(loo[j]), "consensus_items": int(loo_n[j]),
            "gold_accuracy": float(gold_acc[j]), "gold_items": int(gold_n[j]),
            "ds_accuracy": float(ds.accuracy[j]) if ds is not None else float("nan"),
            "mean_cohen_kappa": mean_kappa,
            "labels_per_hour": tp.labels_per_hour,
            "median_s_per_label": float(np.median(durations)) / 1000.0 if durations else float("nan"),
            "agreement_ci": quality.wilson_of(float(loo[j]), int(loo_n[j])),
            "gold_accuracy_ci": quality.wilson_of(float(gold_acc[j]), int(gold_n[j])),
            "gold_trend": quality.gold_trend([v.time for v in gold_mine],
                                             [v.winner == data.gold[v.pair_id] for v in gold_mine]),
        })
        per[-1]["low"] = quality.mark_low(per[-1], thresholds)
    return {
        "project": project,
        "unsafe_pairs": unsafe_pairs(store, project),
        "n_pairs": int(len(ratings)), "n_pairs_multi": int(multi.sum()), "n_votes": len(regular),
        "fleiss_kappa": ag.fleiss_kappa(counts),
        "krippendorff_alpha_ordinal": ag.krippendorff_alpha(ratings, "ordinal"),
        "krippendorff_alpha_nominal": ag.krippendorff_alpha(ratings, "nominal"),
        "consensus": {name: int(((consensus == k) & multi).sum()) for k, name in enumerate(ag.CATEGORIES)}
        | {"unresolved": int(((consensus == ag.MISSING) & multi).sum())},
        "ds_priors": {n: float(p) for n, p in zip(ag.CATEGORIES, ds.priors)} if ds is not None else {},
        "annotators": per,
        "cohen_kappa": {"annotators": data.annotators, "kappa": kappa.tolist(), "shared": shared.tolist()},
        "intervals": quality.agreement_intervals(ratings) if ci else {},
        "kendall_w": ranking_concordance(regular),
        "thresholds": {"min_gold": thresholds.min_gold, "min_agree": thresholds.min_agree, "min_n": thresholds.min_n},
    }


def ranking_concordance(votes: list[Vote]) -> dict:
    """Kendall's W per ranking item with two or more rankings, averaged: ``{"mean", "n"}`` (n items;
    mean NaN without any). Complements the implied-pair figures with a whole-ranking one."""
    by_item: dict[int, list[list[int]]] = {}
    for v in votes:
        if v.ranks is not None and v.item[1:] == (0, 1):  # one implied vote per ranking carries it
            by_item.setdefault(v.pair_id, []).append(v.ranks)
    ws = [ag.kendall_w(ag.fractional_ranks(np.array(r))) for r in by_item.values() if len(r) >= 2]
    ws = [w for w in ws if not np.isnan(w)]
    return {"mean": float(np.mean(ws)) if ws else float("nan"), "n": len(ws)}


def unsafe_pairs(store: Store, project: str, limit: int = 200) -> list[dict]:
    """Pairs flagged as unsafe (by a label or a skip), most flags first."""
    with store.db.read() as s:
        proj = find_project(s, project)
        rows = s.execute(
            select(Pair.key, func.count(), func.sum(case((Label.skipped.is_(True), 1), else_=0)), Pair.id)
            .join(Label, Label.pair_id == Pair.id)
            .where(Pair.project_id == proj.id, Label.unsafe.is_(True))
            .group_by(Pair.key, Pair.id).order_by(func.count().desc(), Pair.key).limit(limit)).all()
    return [{"pair_id": key, "flags": int(n), "skipped": int(sk or 0), "id": pid} for key, n, sk, pid in rows]


def format_table(stats: dict) -> str:
    """The plain-text report ``rlhfkit annotate stats`` prints."""
    def f(x, digits=3):
        return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"

    c = stats["consensus"]
    lines = [
        f"project {stats['project']}: {stats['n_votes']} votes on {stats['n_pairs']} pairs "
        f"({stats['n_pairs_multi']} with 2+ votes)",
        f"  Fleiss kappa                  {f(stats['fleiss_kappa'])}{_ci(stats, 'fleiss_kappa')}",
        f"  Krippendorff alpha (ordinal)  {f(stats['krippendorff_alpha_ordinal'])}{_ci(stats, 'krippendorff_alpha_ordinal')}"
        "   a < tie < b",
        f"  Krippendorff alpha (nominal)  {f(stats['krippendorff_alpha_nominal'])}",
        f"  consensus on 2+ vote pairs    a {c['a']}  b {c['b']}  tie {c['tie']}  unresolved {c['unresolved']}",
        "",
    ]
    header = ("annotator", "labels", "skips", "unsafe", "agree", "gold", "DS acc", "mean k", "labels/h", "s/label")
    rows = [header]
    def interval(ci, n):
        return f" [{f(ci[0], 2)}, {f(ci[1], 2)}]" if n else ""

    for a in stats["annotators"]:
        rows.append((a["annotator"] + (" !" if a["low"] else ""), str(a["labels"]), str(a["skips"]), str(a["unsafe_flags"]),
                     f"{f(a['agreement_with_consensus'], 2)} ({a['consensus_items']})"
                     + interval(a["agreement_ci"], a["consensus_items"]),
                     f"{f(a['gold_accuracy'], 2)} ({a['gold_items']})" + interval(a["gold_accuracy_ci"], a["gold_items"]),
                     f(a["ds_accuracy"], 2),
                     f(a["mean_cohen_kappa"], 2), f(a["labels_per_hour"], 0), f(a["median_s_per_label"], 1)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))))
    if stats["unsafe_pairs"]:
        flagged = ", ".join(f"{u['pair_id']} ({u['flags']})" for u in stats["unsafe_pairs"][:20])
        lines += ["", f"flagged unsafe: {flagged}" + (" ..." if len(stats["unsafe_pairs"]) > 20 else "")]
    t = stats["thresholds"]
    lines += ["", "agree: agreement with the other annotators' plurality (items counted); gold: accuracy on gold "
              "pairs; DS acc: Dawid-Skene estimated accuracy; mean k: mean pairwise Cohen's kappa; "
              f"! marks gold accuracy below {t['min_gold']:g} or agreement below {t['min_agree']:g} "
              f"(with {t['min_n']}+ answers); [95% bootstrap interval, n items]; see docs/annotate.md"]
    return "\n".join(lines)


def _ci(stats: dict, name: str) -> str:
    est = stats.get("intervals", {}).get(name)
    if not est:
        return ""
    if est["ci_low"] is None:
        return f" [too few pairs for an interval] n={est['n']}"
    return f" [{est['ci_low']:.3f}, {est['ci_high']:.3f}] n={est['n']}"


def json_safe(x):
    """NaN ("not enough data") becomes None: JSON has no NaN."""
    if isinstance(x, float) and np.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, datetime):
        return x.isoformat(timespec="seconds") + "Z"
    return x
