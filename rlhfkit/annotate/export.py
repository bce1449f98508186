"""Export labels as :class:`~rlhfkit.data.records.PreferenceRecord` dicts the trainers read as is.

Consensus mode (default): one record per pair with a consensus winner.

- ``majority``: the strict plurality of the votes over {a, tie, b}; a draw between the top
  categories is *unresolved* and the pair is left out (counted in the report).
- ``dawid-skene``: the category with the highest Dawid–Skene posterior, which weighs each
  annotator by their estimated accuracy and so resolves most draws.

A tie consensus gives ``tie=true`` with ``chosen`` = side a. ``annotator_id`` is ``"consensus"``,
``strength`` the lower median of the agreeing votes' strengths, ``rationale`` the agreeing votes'
rationales joined by blank lines, ``presented_order`` the order every agreeing vote saw (None if
they saw different orders). ``metadata`` carries the pair's own metadata plus ``pair_id``, ``task``,
``votes`` (every vote: annotator, winner, strength, rationale, presented_order "ab"/"ba", unsafe,
duration_ms, time), ``agreement`` (fraction of votes equal to the consensus), ``n_votes`` and
``consensus_method``.

Votes mode (``--votes``): one record per individual vote, ``annotator_id`` the annotator's name, and
in ``metadata`` the single ``vote``, the pair's ``consensus`` (or None) and ``agreement``.

Ranking items: every ranking is exported as its K(K-1)/2 implied pairs (reply i as side a, reply j
as b), each a record of its own as above with ``metadata.implied_pair = [i, j]`` and the item's id
as ``pair_id``; ``build_rankings`` gives the rankings themselves (``export --rankings``).

Adjudication: a lead's decision (``decisions`` table) replaces the votes' consensus for its pair or
implied pair (``consensus_method: "adjudicated"``, ``metadata.adjudication``: by, note, time), and is
exported whatever ``min_votes`` says: a person looked at it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from rlhfkit.annotate import agreement as ag
from rlhfkit.annotate.models import Decision, Pair
from rlhfkit.annotate.projects import find_project
from rlhfkit.annotate.stats import Vote, load_votes
from rlhfkit.annotate.store import Store
from rlhfkit.data.records import ComparisonPair

FORMATS = ("jsonl", "hf-dataset")
CONSENSUS = ("majority", "dawid-skene")


@dataclass
class ExportOptions:
    format: str = "jsonl"
    """'jsonl' (one JSON object per line) or 'hf-dataset' (datasets.Dataset.save_to_disk directory)."""
    votes: bool = False
    """One record per individual vote instead of one per pair."""
    consensus: str = "majority"
    """How the pair's label is decided: 'majority' or 'dawid-skene' (see module docstring)."""
    min_votes: int = 1
    """Leave out pairs with fewer votes (e.g. the project's overlap, to export complete pairs only)."""
    include_gold: bool = False
    """Also export gold pairs (attention checks; usually easy, so left out by default)."""
    drop_unsafe: bool = False
    """Leave out pairs that any annotator flagged as unsafe."""
    exclude_annotators: tuple[str, ...] = ()
    """Annotators whose votes are ignored entirely."""
    min_gold_accuracy: float | None = None
    """Also ignore annotators whose accuracy on gold pairs is below this (annotators without gold
    answers are kept)."""
    force: bool = False
    """Replace ``out`` if it exists."""

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.consensus not in CONSENSUS:
            raise ValueError(f"--consensus must be one of {', '.join(CONSENSUS)}, got {self.consensus!r}")
        if self.min_votes < 1:
            raise ValueError(f"--min-votes must be at least 1, got {self.min_votes}")
        if self.min_gold_accuracy is not None and not 0.0 <= self.min_gold_accuracy <= 1.0:
            raise ValueError(f"--min-gold-accuracy must be in [0, 1], got {self.min_gold_accuracy}")


@dataclass
class ExportReport:
    records: int
    pairs_with_votes: int
    unresolved: int
    below_min_votes: int
    dropped_unsafe: int
    excluded_annotators: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.pairs_with_votes} pairs have votes, {self.unresolved} without a consensus, "
                f"{self.below_min_votes} below --min-votes, {self.dropped_unsafe} dropped as unsafe"
                + (f"; ignored annotators: {', '.join(self.excluded_annotators)}" if self.excluded_annotators else ""))


class NothingToExport(ValueError):
    """The filters left no record: an empty dataset is never what a trainer wants."""

    def __init__(self, report: ExportReport):
        super().__init__(f"no records to export: {report.summary()}. Nothing was written; relax the filters "
                         "(--min-votes, --drop-unsafe, --exclude-annotator, --min-gold-accuracy) or label more")
        self.report = report


def export(store: Store, project: str, out: str | Path, opts: ExportOptions) -> ExportReport:
    """Write the records to ``out``; raises :class:`NothingToExport` (writing nothing) when none are left."""
    opts.check()
    out = Path(out)
    if out.exists() and not opts.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    records, report = build_records(store, project, opts)
    if not records:
        raise NothingToExport(report)
    if opts.format == "jsonl":
        write_jsonl(records, out)
    else:
        write_hf_dataset(records, out)
    return report


def build_records(store: Store, project: str, opts: ExportOptions) -> tuple[list[dict], ExportReport]:
    opts.check()
    exclude = tuple(opts.exclude_annotators)
    if opts.min_gold_accuracy is not None:
        exclude += tuple(_low_gold(store, project, opts.min_gold_accuracy, exclude))
    data = load_votes(store, project, exclude)
    with store.db.read() as s:
        proj = find_project(s, project)
        pairs = {p.id: p for p in s.scalars(select(Pair).where(Pair.project_id == proj.id).order_by(Pair.id))}
        decided = {(d.pair_id, d.i, d.j): d for d in s.scalars(
            select(Decision).join(Pair, Pair.id == Decision.pair_id).where(Pair.project_id == proj.id))}
    by_item: dict[tuple[int, int, int], list[Vote]] = {}
    for v in data.votes:
        if opts.include_gold or v.pair_id not in data.gold:
            by_item.setdefault(v.item, []).append(v)
    winners = _consensus(data, by_item, opts.consensus)

    records, report = [], ExportReport(0, len(by_item), 0, 0, 0, list(exclude))
    for item, votes in by_item.items():
        decision = decided.get(item)
        if len(votes) < opts.min_votes and decision is None:
            report.below_min_votes += 1
            continue
        if opts.drop_unsafe and any(v.unsafe for v in votes):
            report.dropped_unsafe += 1
            continue
        pair = item_pair(pairs[item[0]], item)
        winner = decision.winner if decision is not None else winners.get(item)
        agreeing = [v for v in votes if v.winner == winner]
        agreement = len(agreeing) / len(votes) if winner else None
        method = {"consensus_method": opts.consensus}
        if decision is not None:
            method = {"consensus_method": "adjudicated", "adjudication": {
                "by": decision.decided_by, "note": decision.note, "time": decision.created_at.isoformat() + "Z"}}
        if winner is None:
            report.unresolved += 1
        if opts.votes:
            for v in votes:
                records.append(_record(pair, v.winner, [v], v.annotator, {
                    "vote": v.to_dict(), "consensus": winner, "agreement": agreement,
                    "adjudicated": decision is not None}))
        elif winner is not None:
            records.append(_record(pair, winner, agreeing, "consensus", {
                "votes": [v.to_dict() for v in votes], "agreement": agreement, "n_votes": len(votes), **method}
                | _mean_ratings(votes)))
    report.records = len(records)
    return records, report


def _mean_ratings(votes: list[Vote]) -> dict:
    """``{"ratings": {aspect: {"a": mean, "b": mean, "n": votes with a rating}}}``, or {} without any."""
    sums: dict = {}
    for v in votes:
        for name, sides in (v.side_ratings() or {}).items():
            for side, value in sides.items():
                if value is not None:
                    sums.setdefault(name, {}).setdefault(side, []).append(value)
    if not sums:
        return {}
    return {"ratings": {name: {side: round(float(np.mean(sides[side])), 4) if side in sides else None
                               for side in ("a", "b")} | {"n": max(len(x) for x in sides.values())}
                        for name, sides in sums.items()}}


def item_pair(p: Pair, item: tuple[int, int, int]) -> ComparisonPair:
    """The comparison an item stands for: the pair itself, or reply i vs reply j of a ranking item."""
    meta = dict(p.meta) | ({"gold_winner": p.gold_winner} if p.gold_winner else {})
    if p.replies is None:
        return ComparisonPair(id=p.key, prompt=p.prompt, a=p.a, b=p.b, task=p.task, metadata=meta)
    _, i, j = item
    return ComparisonPair(id=p.key, prompt=p.prompt, a=p.replies[i], b=p.replies[j], task=p.task,
                          metadata=meta | {"implied_pair": [i, j], "n_replies": p.n_replies})


def build_rankings(store: Store, project: str, exclude: tuple[str, ...] = ()) -> list[dict]:
    """One object per ranking item with a ranking: the item (``id``, ``prompt``, ``replies``, ``task``,
    ``metadata``), every ``ranking`` (annotator, ``ranks`` by reply index with 1 the best,
    ``presented_order`` the reply indices as shown, rationale, unsafe, time) and ``mean_rank`` per reply."""
    data = load_votes(store, project, exclude)
    with store.db.read() as s:
        proj = find_project(s, project)
        items = {p.id: p for p in s.scalars(select(Pair).where(Pair.project_id == proj.id, Pair.n_replies > 2))}
    out: dict[int, dict] = {}
    for v in data.votes:
        p = items.get(v.pair_id)
        if p is None or v.item[1:] != (0, 1):  # one entry per ranking: its (0, 1) implied vote
            continue
        entry = out.setdefault(p.id, {"id": p.key, "prompt": p.prompt, "replies": p.replies, "task": p.task,
                                      "metadata": dict(p.meta), "rankings": []})
        entry["rankings"].append({"annotator": v.annotator, "ranks": v.ranks, "presented_order": v.shown_order,
                                  "ratings": v.ratings, "rationale": v.rationale,
                                  "unsafe": v.unsafe, "time": v.to_dict()["time"]})
    for entry in out.values():
        entry["mean_rank"] = np.mean([r["ranks"] for r in entry["rankings"]], axis=0).round(4).tolist()
    return list(out.values())


def _record(pair: ComparisonPair, winner: str, basis: list[Vote], annotator_id: str, meta: dict) -> dict:
    """A PreferenceRecord dict; ``basis`` are the votes strength/rationale/order come from."""
    strengths = [v.strength for v in basis if v.strength is not None]
    rationales = [v.rationale for v in basis if v.rationale]
    chosen_side = "b" if winner == "b" else "a"
    orders = {"chosen" if v.left == chosen_side else "rejected" for v in basis}
    rec = pair.label(
        winner, strength=statistics.median_low(strengths) if strengths and winner != "tie" else None,
        rationale="\n\n".join(rationales) or None, annotator_id=annotator_id,
        presented_order=orders.pop() if len(orders) == 1 else None, source="human", metadata=meta)
    return rec.to_dict()


def _consensus(data, by_item: dict, method: str) -> dict[tuple[int, int, int], str]:
    ids = sorted(by_item)
    ratings, rows = data.matrix([v for p in ids for v in by_item[p]])
    if not len(rows):
        return {}
    if method == "majority":
        winner = ag.plurality(ag.category_counts(ratings))
    else:
        post = ag.dawid_skene(ratings).posteriors
        top = post.max(axis=1, keepdims=True)
        winner = np.where(np.isclose(post, top).sum(axis=1) == 1, post.argmax(axis=1), ag.MISSING)
    return {p: ag.CATEGORIES[w] for p, w in zip(rows, winner) if w != ag.MISSING}


def _low_gold(store: Store, project: str, threshold: float, exclude: tuple[str, ...]) -> list[str]:
    data = load_votes(store, project, exclude)
    ratings, ids = data.matrix([v for v in data.votes if v.pair_id in data.gold])
    acc, n = ag.gold_accuracy(ratings, np.array([ag.CODE[data.gold[p[0]]] for p in ids], dtype=int))
    return [name for name, a, k in zip(data.annotators, acc, n) if k > 0 and a < threshold]


def write_jsonl(records: list[dict], out: Path) -> None:
    """Write to a temporary file beside ``out`` and rename: a failed export leaves ``out`` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_hf_dataset(records: list[dict], out: Path) -> None:
    """``datasets.Dataset.from_list(records).save_to_disk(out)``, built beside ``out`` then moved."""
    import datasets

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            ds = datasets.Dataset.from_list(records)
        except Exception as e:  # pyarrow cannot type mixed metadata values (e.g. int and str)
            raise ValueError(f"cannot build an Arrow table from these records ({e}); pair metadata "
                             "values probably differ in type between pairs. Export --format jsonl instead.") from e
        ds.save_to_disk(str(tmp / "ds"))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp / "ds", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
