"""Which pair an annotator sees next.

Rules, in order:

1. An annotator with an open assignment gets it again (reloading the page does not draw a new pair
   or a new left/right order).
2. Gold pairs (known answer) are mixed in at the project's ``gold_rate``: see :func:`gold_due`.
   Every annotator may see every gold pair once; they are not limited by ``overlap``.
3. Otherwise the next regular pair the annotator has not seen whose ``n_active < overlap``,
   ordered by reward-model uncertainty when the project has scores (most uncertain first; pairs
   without a score last), then import order. Serving in a fixed order fills each pair's overlap
   before the next one starts, so complete pairs (and their consensus) exist early.
4. When nothing is left, open assignments older than the project's lease are expired and their
   slots handed out again (someone closed the tab); a late answer to an expired assignment is
   still accepted.

"Nobody sees a pair twice" is the unique key (pair_id, annotator_id) on assignments. A pair's slot
is taken with a conditional UPDATE (``n_active < overlap``), so two servers sharing a PostgreSQL
database cannot hand out more than ``overlap`` slots either.
"""

from __future__ import annotations

import math
import secrets
from datetime import timedelta

import numpy as np
from sqlalchemy import and_, case, exists, func, select, update
from sqlalchemy.orm import Session

from rlhfkit.annotate.models import Annotator, Assignment, Pair, Project, utcnow

GOLDEN = (math.sqrt(5) - 1) / 2


def uncertainty_score(ps: list[float]) -> float:
    """Active-selection priority in [0, 0.5]; higher is labelled first.

    One reward-model probability p = P(a preferred): 0.5 - |p - 0.5| (the model is least sure at
    p = 0.5). An ensemble [p_1 .. p_M] (M >= 2): the population standard deviation of the p_m, i.e.
    how much the members disagree (query by committee, Seung et al. 1992), which is also <= 0.5.
    """
    if len(ps) == 1:
        return 0.5 - abs(ps[0] - 0.5)
    return float(np.std(np.asarray(ps, dtype=float)))


def gold_phase(annotator_id: int) -> float:
    """A fixed offset in [0, 1) per annotator, so gold items do not fall on the same positions for
    everyone (an annotator comparing notes cannot tell "every 10th item is a check")."""
    return (annotator_id * GOLDEN) % 1.0


def gold_due(n_served: int, n_gold: int, rate: float, phase: float) -> bool:
    """Whether item number ``n_served + 1`` should be gold.

    Serves gold whenever the annotator's gold count is behind floor((n_served + 1) * rate + phase):
    after n items they have seen n * rate gold items, give or take one, at evenly spread positions.
    """
    if rate <= 0.0:
        return False
    return n_gold < math.floor((n_served + 1) * rate + phase)


def next_assignment(session: Session, annotator: Annotator, project: Project) -> Assignment | None:
    """The annotator's open assignment, or a new one, or None when nothing is left for them.

    Must run inside a write transaction.
    """
    current = session.scalars(
        select(Assignment).where(Assignment.annotator_id == annotator.id, Assignment.status == "open")
        .order_by(Assignment.id).limit(1)).first()
    if current is not None:
        return current

    if project.gold_rate > 0:
        n_served, n_gold = session.execute(
            select(func.count(), func.coalesce(func.sum(case((Assignment.is_gold, 1), else_=0)), 0))
            .where(Assignment.annotator_id == annotator.id)).one()
    if project.gold_rate > 0 and gold_due(n_served, n_gold, project.gold_rate, gold_phase(annotator.id)):
        pair_id = _take(session, _gold_candidates(session, annotator, project), limit=False)
        if pair_id is not None:
            return _assign(session, pair_id, annotator, gold=True)

    pair_id = _take_regular(session, annotator, project)
    if pair_id is None and _expire_stale(session, annotator, project):
        pair_id = _take_regular(session, annotator, project)
    if pair_id is None:
        return None
    return _assign(session, pair_id, annotator, gold=False)


def remaining_for(session: Session, annotator: Annotator, project: Project, cap: int = 100) -> int:
    """Regular pairs this annotator could still be given right now, counted up to ``cap`` (the count
    runs on every page load; "100+" is as useful to a person as the exact figure)."""
    few = select(Pair.id).where(*_regular_filter(annotator, project)).limit(cap).subquery()
    return session.scalar(select(func.count()).select_from(few))


def _unseen(annotator: Annotator):
    return ~exists().where(and_(Assignment.pair_id == Pair.id, Assignment.annotator_id == annotator.id))


def _regular_filter(annotator: Annotator, project: Project):
    # n_active < overlap and gold_winner IS NULL: the predicate of the partial index ix_pairs_open.
    return (Pair.project_id == project.id, Pair.n_active < Pair.overlap, Pair.gold_winner.is_(None),
            _unseen(annotator))


def _take_regular(session: Session, annotator: Annotator, project: Project, rounds: int = 5) -> int | None:
    """Claim a slot on the best regular candidate.

    On PostgreSQL, ``FOR UPDATE SKIP LOCKED`` makes concurrent requests pick different pairs instead
    of queueing on the same row and then finding it full (SQLite ignores the clause; its writers
    are serialised anyway). A few rounds cover candidates filled by transactions that committed
    after our query.
    """
    for _ in range(rounds):
        query = (select(Pair.id).where(*_regular_filter(annotator, project))
                 .order_by(Pair.queue_rank, Pair.id).limit(8).with_for_update(skip_locked=True))
        candidates = list(session.scalars(query))
        if not candidates:
            return None
        pair_id = _take(session, candidates)
        if pair_id is not None:
            return pair_id
    return None


def _gold_candidates(session: Session, annotator: Annotator, project: Project) -> list[int]:
    query = (select(Pair.id).where(Pair.project_id == project.id, Pair.gold_winner.is_not(None), _unseen(annotator))
             .order_by(Pair.n_active, Pair.id).limit(8))
    return list(session.scalars(query))


def _take(session: Session, candidates: list[int], limit: bool = True) -> int | None:
    """Claim one slot on the first candidate that still has one (another server may have raced us)."""
    for pair_id in candidates:
        cond = [Pair.id == pair_id]
        if limit:
            cond.append(Pair.n_active < Pair.overlap)
        claimed = session.execute(update(Pair).where(*cond).values(n_active=Pair.n_active + 1)
                                  .execution_options(synchronize_session=False))
        if claimed.rowcount == 1:
            return pair_id
    return None


def _assign(session: Session, pair_id: int, annotator: Annotator, gold: bool) -> Assignment:
    assignment = Assignment(pair_id=pair_id, annotator_id=annotator.id, left=secrets.choice("ab"),
                            is_gold=gold, status="open", created_at=utcnow())
    session.add(assignment)
    session.flush()
    return assignment


def _expire_stale(session: Session, annotator: Annotator, project: Project) -> int:
    """Expire other annotators' open assignments older than the lease; returns how many."""
    cutoff = utcnow() - timedelta(minutes=project.lease_minutes)
    stale = session.execute(
        select(Assignment.id, Assignment.pair_id).join(Pair, Pair.id == Assignment.pair_id)
        .where(Pair.project_id == project.id, Assignment.status == "open", Assignment.created_at < cutoff,
               Assignment.annotator_id != annotator.id)).all()
    n = 0
    for assignment_id, pair_id in stale:
        done = session.execute(update(Assignment).where(Assignment.id == assignment_id, Assignment.status == "open")
                               .values(status="expired").execution_options(synchronize_session=False))
        if done.rowcount == 1:
            session.execute(update(Pair).where(Pair.id == pair_id).values(n_active=Pair.n_active - 1)
                            .execution_options(synchronize_session=False))
            n += 1
    return n
