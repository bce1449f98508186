"""The lead's review: the item browser, the adjudication queue and decisions.

An *item* here is what one consensus is about: a pair ``(pair_id, 0, 1)``, or one implied pair
``(pair_id, i, j)`` of a ranking item (see ``stats.py``). Its agreement is the share of its votes
that chose its most-chosen answer (1.0 unanimous; 0.5 a 1-1 split); a ranking item's agreement in
the browser is the mean over its implied pairs.

The adjudication queue holds the items with at least two votes that are not unanimous, and the
gold pairs that some vote got wrong (the gold answer may be the mistake), least agreement first. A
decision records the lead's answer with the name they gave and a note; the export then uses it in
place of the votes' consensus (``export.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from rlhfkit.annotate import agreement as ag
from rlhfkit.annotate.models import Decision, Pair, utcnow
from rlhfkit.annotate.projects import find_project
from rlhfkit.annotate.stats import Vote, load_votes
from rlhfkit.annotate.store import Store
from rlhfkit.annotate.values import Refused, text_problem

STATUSES = ("all", "disagreement", "unlabelled", "complete", "decided", "flagged", "gold", "ranking")


def agreement(votes: list[Vote]) -> float | None:
    """Share of the votes equal to the most chosen answer; None without votes."""
    if not votes:
        return None
    return Counter(v.winner for v in votes).most_common(1)[0][1] / len(votes)


@dataclass
class _Project:
    pairs: dict[int, Pair]
    votes: dict[tuple[int, int, int], list[Vote]]
    decisions: dict[tuple[int, int, int], Decision]


def _load(store: Store, project: str) -> _Project:
    data = load_votes(store, project)
    with store.db.read() as s:
        proj = find_project(s, project)
        pairs = {p.id: p for p in s.scalars(select(Pair).where(Pair.project_id == proj.id).order_by(Pair.id))}
        decisions = {(d.pair_id, d.i, d.j): d for d in s.scalars(
            select(Decision).join(Pair, Pair.id == Decision.pair_id).where(Pair.project_id == proj.id))}
    votes: dict[tuple[int, int, int], list[Vote]] = {}
    for v in data.votes:
        votes.setdefault(v.item, []).append(v)
    return _Project(pairs, votes, decisions)


def _texts(p: Pair) -> list[str]:
    return [m["content"] for m in p.prompt] + [m["content"] for m in (p.replies or [p.a, p.b])]


def browse(store: Store, project: str, q: str = "", status: str = "all", limit: int = 50,
           offset: int = 0) -> tuple[list[dict], int]:
    """One page of the project's items matching ``q`` (a case-insensitive substring of the id, task
    or any text) and ``status`` (see STATUSES), and how many match in all."""
    if status not in STATUSES:
        raise Refused(422, f"must be one of {', '.join(STATUSES)}, got {status[:20]!r}", "status")
    data, needle = _load(store, project), q.casefold().strip()
    rows = []
    for pid, p in data.pairs.items():
        if needle and not any(needle in t.casefold() for t in [p.key, p.task or "", *_texts(p)]):
            continue
        row = _summary(data, p)
        keep = {"all": True, "disagreement": row["agreement"] is not None and row["agreement"] < 1 and row["votes"] >= 2,
                "unlabelled": row["votes"] == 0, "complete": row["votes"] >= p.overlap, "decided": row["decided"] > 0,
                "flagged": row["unsafe_flags"] > 0, "gold": p.gold_winner is not None,
                "ranking": p.replies is not None}[status]
        if keep:
            rows.append(row)
    return rows[offset:offset + limit], len(rows)


def _summary(data: _Project, p: Pair) -> dict:
    items = [k for k in data.votes if k[0] == p.id] if p.replies is not None else [(p.id, 0, 1)]
    first = data.votes.get(items[0], []) if items else []
    scores = [a for a in (agreement(data.votes.get(k, [])) for k in items) if a is not None]
    return {"id": p.id, "key": p.key, "task": p.task, "kind": "ranking" if p.replies is not None else "pair",
            "n_replies": p.n_replies, "gold_winner": p.gold_winner, "overlap": p.overlap,
            "votes": len(first), "unsafe_flags": sum(v.unsafe for v in first),
            "agreement": sum(scores) / len(scores) if scores else None,
            "decided": sum(1 for k in data.decisions if k[0] == p.id)}


def item(store: Store, project: str, pair_id: int) -> dict:
    """Everything about one item: texts, every vote (pair terms) with rationale, per-(implied-)pair
    counts, agreement and decisions."""
    data = _load(store, project)
    p = data.pairs.get(pair_id)
    if p is None:
        raise Refused(404, f"no item {pair_id} in project {project!r}", "pair_id")
    replies = p.replies or [p.a, p.b]
    comparisons = []
    for i in range(len(replies)):
        for j in range(i + 1, len(replies)):
            votes, decision = data.votes.get((p.id, i, j), []), data.decisions.get((p.id, i, j))
            comparisons.append({
                "i": i, "j": j, "counts": dict(Counter(v.winner for v in votes)), "votes": len(votes),
                "agreement": agreement(votes),
                "decision": None if decision is None else {"winner": decision.winner, "by": decision.decided_by,
                                                           "note": decision.note, "time": decision.created_at}})
    base = (p.id, 0, 1)
    rankings = [v.ranks for v in data.votes.get(base, []) if v.ranks is not None]
    w = ag.kendall_w(ag.fractional_ranks(np.array(rankings))) if len(rankings) >= 2 else None
    return {**_summary(data, p), "kendall_w": None if w is None or np.isnan(w) else w, "prompt": p.prompt, "replies": [m["content"] for m in replies],
            "metadata": p.meta, "comparisons": comparisons,
            "votes_detail": [{"annotator": v.annotator, "winner": None if v.ranks else v.winner, "ranks": v.ranks,
                              "strength": v.strength, "rationale": v.rationale, "unsafe": v.unsafe,
                              "presented_order": v.shown_order if v.ranks else ("ab" if v.left == "a" else "ba"),
                              "time": v.time} for v in data.votes.get(base, [])]}


def queue(store: Store, project: str, include_decided: bool = False, limit: int = 200) -> list[dict]:
    """Items to adjudicate (see the module docstring), least agreement first."""
    data = _load(store, project)
    out = []
    for key, votes in data.votes.items():
        p = data.pairs[key[0]]
        wrong_gold = p.gold_winner is not None and any(v.winner != p.gold_winner for v in votes)
        split = len(votes) >= 2 and agreement(votes) < 1
        if not (split or wrong_gold) or (key in data.decisions and not include_decided):
            continue
        out.append({"id": p.id, "key": p.key, "i": key[1], "j": key[2], "kind": "ranking" if p.replies else "pair",
                    "votes": len(votes), "counts": dict(Counter(v.winner for v in votes)),
                    "agreement": agreement(votes), "gold_winner": p.gold_winner, "decided": key in data.decisions})
    out.sort(key=lambda r: (r["agreement"], r["id"], r["i"], r["j"]))
    return out[:limit]


def decide(store: Store, project: str, pair_id: int, i: int, j: int, winner: str, decided_by: str,
           note: str | None = None) -> None:
    """Record (or replace) the lead's answer for one item; ``winner`` "" removes the decision."""
    if winner not in ("a", "b", "tie", ""):
        raise Refused(422, f"must be a, b or tie (or empty to remove the decision), got {winner[:10]!r}", "winner")
    decided_by = decided_by.strip()
    if not winner:
        decided_by = decided_by or "-"
    if not decided_by or len(decided_by) > 200 or text_problem(decided_by):
        raise Refused(422, "give your name (1-200 characters): the export records who decided", "decided_by")
    if note is not None and (len(note) > 5000 or text_problem(note)):
        raise Refused(422, text_problem(note) or "at most 5000 characters", "note")
    with store.db.write() as s:
        proj = find_project(s, project)
        p = s.scalars(select(Pair).where(Pair.id == pair_id, Pair.project_id == proj.id)).first()
        if p is None:
            raise Refused(404, f"no item {pair_id} in project {project!r}", "pair_id")
        if not 0 <= i < j < p.n_replies:
            raise Refused(422, f"must name two of the item's {p.n_replies} replies, i < j, got {i}, {j}", "i")
        s.execute(delete(Decision).where(Decision.pair_id == p.id, Decision.i == i, Decision.j == j))
        if winner:
            s.add(Decision(pair_id=p.id, i=i, j=j, winner=winner, decided_by=decided_by,
                           note=(note or "").strip() or None, created_at=utcnow()))
            try:
                s.flush()
            except IntegrityError:  # a concurrent decision on the same item: the lead retries
                raise Refused(409, "someone decided this item at the same moment; reload", "pair_id") from None
