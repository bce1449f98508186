"""One annotator's own answers: how a label looks on their screen, reading and changing it.

Screen terms vs pair terms: a pair's sides are shown as ``left``/``right`` in the assignment's
recorded order (``left`` is 'a' or 'b'); a ranking item's replies in ``shown_order`` (reply indices
as shown). Answers arrive and are shown in screen terms and are stored in pair terms, so the page
never reveals which reply is which.

Ranks: a ranking answer gives each reply a rank, 1 the best; equal ranks are a tie. They are stored
dense (1, 2, ... with no gaps), so [1, 3, 3] and [1, 2, 2] are the same answer.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update

from rlhfkit.annotate import assignment as assign
from rlhfkit.annotate import ratings as rt
from rlhfkit.annotate.db import Database
from rlhfkit.annotate.models import Assignment, Label, Pair, Project, utcnow
from rlhfkit.annotate.values import Principal, Refused, text_problem

CHOICES = ("left", "right", "tie", "skip", "rank")
"""'rank' answers a ranking item (with ``ranks``); the others a pair, and 'skip' either."""


def check_rationale(value: str | None) -> None:
    problem = None if value is None else text_problem(value)
    if problem:
        raise Refused(422, problem, "rationale")


def text(value: str | None) -> str | None:
    """An empty or whitespace-only rationale is no rationale; any other text is kept exactly."""
    return value if value and value.strip() else None


def winner(choice: str, left: str) -> str:
    if choice == "tie":
        return "tie"
    right = "b" if left == "a" else "a"
    return left if choice == "left" else right


def dense_ranks(ranks, n: int) -> list[int]:
    """Validate ``n`` ranks (positive integers) and renumber them 1, 2, ... keeping ties."""
    if (not isinstance(ranks, list) or len(ranks) != n
            or not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= n for r in ranks)):
        raise Refused(422, f"must be a list of {n} ranks, one per reply as shown, each 1 (best) to {n}; equal "
                           f"ranks are a tie, got {str(ranks)[:80]}", "ranks")
    levels = sorted(set(ranks))
    return [levels.index(r) + 1 for r in ranks]


def to_pair_terms(screen_ranks: list[int], order: list[int]) -> list[int]:
    """Ranks by shown position -> ranks by reply index (``order[s]`` is the reply shown at s)."""
    out = [0] * len(order)
    for s, reply in enumerate(order):
        out[reply] = screen_ranks[s]
    return out


def label_view(label, left: str, order: list[int] | None = None) -> dict:
    """A label in screen terms, as the annotator who gave it sees it."""
    if label.skipped:
        choice = "skip"
    elif label.ranks is not None:
        choice = "rank"
    elif label.winner == "tie":
        choice = "tie"
    else:
        choice = "left" if label.winner == left else "right"
    ranks = None if label.ranks is None or order is None else [label.ranks[reply] for reply in order]
    ratings = rt.to_screen(getattr(label, "ratings", None), rt.shown_replies(left, order))
    return {"id": label.id, "submission_id": label.submission_id, "assignment_id": label.assignment_id,
            "kind": "pair" if order is None else "ranking", "choice": choice, "ranks": ranks, "ratings": ratings, "strength": label.strength, "rationale": label.rationale,
            "unsafe": label.unsafe, "duration_ms": label.duration_ms, "created_at": iso(label.created_at),
            "updated_at": iso(label.updated_at)}


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="milliseconds") + "Z"


_OWN = (select(Label, Assignment.left, Assignment.shown_order, Assignment.is_gold)
        .join(Assignment, Assignment.id == Label.assignment_id))


def labels_of(db: Database, who: Principal, limit: int = 50, offset: int = 0) -> list[dict]:
    with db.read() as s:
        rows = s.execute(_OWN.where(Label.annotator_id == who.annotator_id)
                         .order_by(Label.id.desc()).limit(limit).offset(offset)).all()
    return [label_view(label, left, order) for label, left, order, _ in rows]


def label_of(db: Database, who: Principal, label_id: int) -> dict:
    with db.read() as s:
        row = s.execute(_OWN.where(Label.id == label_id, Label.annotator_id == who.annotator_id)).first()
    if row is None:
        raise Refused(404, "no such label for this annotator", "label_id")
    return label_view(*row[:3])


def update_label(db: Database, who: Principal, label_id: int, changes: dict) -> dict:
    """Change one's own label: ``choice`` (left/right/tie) of a pair or ``ranks`` of a ranking item,
    ``strength``, ``rationale``, ``unsafe``.

    A skip can be undone by giving an answer (a choice, or ranks), as long as the item's slot is
    still free: the skip gave the slot back, so it is taken again here (409 when someone else has
    it now)."""
    if "rationale" in changes:
        check_rationale(changes["rationale"])
    with db.write() as s:
        row = s.execute(_OWN.where(Label.id == label_id, Label.annotator_id == who.annotator_id)).first()
        if row is None:
            raise Refused(404, "no such label for this annotator", "label_id")
        label, left, order, is_gold = row
        answer = "ranks" if order is not None else "choice"
        wrong = "choice" if order is not None else "ranks"
        if changes.get(wrong) is not None:
            raise Refused(422, f"this item is {'a ranking: give ranks' if order else 'a pair: give a choice'}", wrong)
        if changes.get(answer) is not None:
            if order is None and changes["choice"] not in ("left", "right", "tie"):
                raise Refused(422, f"must be left, right or tie, got {changes['choice']!r}", "choice")
            ranks = None if order is None else to_pair_terms(dense_ranks(changes["ranks"], len(order)), order)
            if label.skipped:
                _unskip(s, label, is_gold)
            if order is None:
                label.winner = winner(changes["choice"], left)
            else:
                label.ranks = ranks
        elif label.skipped:
            raise Refused(409, f"this item was skipped: give {'ranks' if order else 'a choice (left, right or tie)'}"
                               " to label it", answer)
        if "strength" in changes:
            if order is not None and changes["strength"] is not None:
                raise Refused(422, "must be empty for a ranking", "strength")
            label.strength = changes["strength"]
        if "rationale" in changes:
            label.rationale = text(changes["rationale"])
        if changes.get("ratings") is not None:
            schema = s.scalar(select(Project.rating_aspects).join(Pair, Pair.project_id == Project.id)
                              .where(Pair.id == label.pair_id))
            label.ratings = rt.to_pair_terms(changes["ratings"], schema, rt.shown_replies(left, order))
        if "unsafe" in changes:
            label.unsafe = bool(changes["unsafe"])
        if label.winner == "tie" and label.strength is not None:
            raise Refused(422, "must be empty for a tie", "strength")
        label.updated_at = utcnow()
        s.flush()
        return label_view(label, left, order)


def _unskip(s, label: Label, is_gold: bool) -> None:
    """Take the item's slot back for a skipped label (gold pairs have no limit), inside the caller's
    transaction: the same conditional UPDATE that hands out slots, so overlap still holds."""
    took = s.execute(assign.TAKE_GOLD if is_gold else assign.TAKE_SLOT, {"p_id": label.pair_id}).rowcount
    if took != 1:
        raise Refused(409, "this item has gone to someone else since it was skipped; it can no longer be "
                           "labelled by you", "label_id")
    s.execute(update(Assignment).where(Assignment.id == label.assignment_id).values(status="done"))
    label.skipped = False

