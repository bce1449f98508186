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
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from sqlalchemy import Connection, and_, bindparam, case, exists, func, insert, select, update

from rlhfkit.annotate.models import Assignment, Pair, utcnow

# Core tables: this module runs on every page load, and Core statements cost a fraction of the
# ORM's per-statement overhead.
P, A = Pair.__table__, Assignment.__table__

GOLDEN = (math.sqrt(5) - 1) / 2
_RANDOM = secrets.SystemRandom()


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


@dataclass(frozen=True)
class Queue:
    """Whose queue: one annotator in one project, with the project's settings."""

    annotator_id: int
    project_id: int
    gold_rate: float
    lease_minutes: int


# The statements this module runs on every request, built once: building a statement costs several
# times more CPU than executing it on SQLite. Parameters: aid annotator, pid project, p_id pair.
_UNSEEN = ~exists().where(and_(A.c.pair_id == P.c.id, A.c.annotator_id == bindparam("aid")))
# n_active < overlap and gold_winner IS NULL: the predicate of the partial index ix_pairs_open.
_OPEN_PAIRS = (P.c.project_id == bindparam("pid"), P.c.n_active < P.c.overlap, P.c.gold_winner.is_(None), _UNSEEN)
OPEN_ASSIGNMENT = (select(A.c.id, A.c.pair_id, A.c.left, A.c.shown_order)
                   .where(A.c.annotator_id == bindparam("aid"), A.c.status == "open").order_by(A.c.id).limit(1))
SERVED = (select(func.count(), func.coalesce(func.sum(case((A.c.is_gold, 1), else_=0)), 0))
          .where(A.c.annotator_id == bindparam("aid")))
# FOR UPDATE [SKIP LOCKED]: see _take_regular. SQLite ignores both.
REGULAR = select(P.c.id).where(*_OPEN_PAIRS).order_by(P.c.queue_rank, P.c.id).limit(1)
REGULAR_SKIP_LOCKED = REGULAR.with_for_update(skip_locked=True)
REGULAR_WAIT = REGULAR.with_for_update()
GOLD = (select(P.c.id).where(P.c.project_id == bindparam("pid"), P.c.gold_winner.is_not(None), _UNSEEN)
        .order_by(P.c.n_active, P.c.id).limit(8))
REMAINING = select(func.count()).select_from(select(P.c.id).where(*_OPEN_PAIRS).limit(100).subquery())
TAKE_SLOT = (update(P).where(P.c.id == bindparam("p_id"), P.c.n_active < P.c.overlap)
             .values(n_active=P.c.n_active + 1))
TAKE_GOLD = update(P).where(P.c.id == bindparam("p_id")).values(n_active=P.c.n_active + 1)
NEW_ASSIGNMENT = insert(A)
N_REPLIES = select(P.c.n_replies).where(P.c.id == bindparam("p_id"))


def next_assignment(conn: Connection, q: Queue) -> tuple[int, int, str, list[int] | None] | None:
    """``(assignment_id, pair_id, left, shown_order)``: the open assignment, or a new one; None when
    nothing is left for this annotator. Must run inside a write transaction."""
    current = open_assignment(conn, q)
    if current is not None:
        return current

    if q.gold_rate > 0:
        n_served, n_gold = conn.execute(SERVED, {"aid": q.annotator_id}).one()
        if gold_due(n_served, n_gold, q.gold_rate, gold_phase(q.annotator_id)):
            gold = list(conn.execute(GOLD, {"pid": q.project_id, "aid": q.annotator_id}).scalars())
            pair_id = _take(conn, gold, TAKE_GOLD)
            if pair_id is not None:
                return _assign(conn, pair_id, q, gold=True)

    pair_id = _take_regular(conn, q)
    if pair_id is None and _expire_stale(conn, q):
        pair_id = _take_regular(conn, q)
    if pair_id is None:
        return None
    return _assign(conn, pair_id, q, gold=False)


def open_assignment(conn: Connection, q: Queue) -> tuple[int, int, str, list[int] | None] | None:
    """``(assignment_id, pair_id, left, shown_order)`` of the annotator's oldest open assignment, if any."""
    row = conn.execute(OPEN_ASSIGNMENT, {"aid": q.annotator_id}).first()
    return None if row is None else tuple(row)


def remaining_for(conn: Connection, q: Queue) -> int:
    """Regular pairs this annotator could still be given right now, counted up to 100 (the count
    runs on every page load; "100+" is as useful to a person as the exact figure)."""
    return conn.execute(REMAINING, {"pid": q.project_id, "aid": q.annotator_id}).scalar_one()


def _take_regular(conn: Connection, q: Queue, rounds: int = 5) -> int | None:
    """Claim a slot on the best regular candidate.

    PostgreSQL: the candidate row is locked (``FOR UPDATE``) and re-checked against the WHERE clause
    once locked, so the conditional UPDATE that follows succeeds. ``SKIP LOCKED`` first lets
    concurrent requests take different pairs instead of queueing on one row; an empty answer from
    it may only mean "all candidates are locked right now", so the query is repeated waiting for
    the locks before concluding that nothing is left. SQLite ignores both clauses: its writers are
    serialised, so the first candidate is always free.
    """
    params = {"pid": q.project_id, "aid": q.annotator_id}
    for _ in range(rounds):
        pair_id = (conn.execute(REGULAR_SKIP_LOCKED, params).scalar()
                   or conn.execute(REGULAR_WAIT, params).scalar())
        if pair_id is None:
            return None
        if _take(conn, [pair_id], TAKE_SLOT) is not None:
            return pair_id
    return None


def _take(conn: Connection, candidates: list[int], statement) -> int | None:
    """Claim one slot on the first candidate that still has one (another server may have raced us)."""
    for pair_id in candidates:
        if conn.execute(statement, {"p_id": pair_id}).rowcount == 1:
            return pair_id
    return None


def _assign(conn: Connection, pair_id: int, q: Queue, gold: bool) -> tuple[int, int, str, list[int] | None]:
    """A new assignment with its presentation drawn at random: which side is on the left, or for a
    ranking item the order of its K replies (``left`` then records whether reply 0 came first)."""
    n = conn.execute(N_REPLIES, {"p_id": pair_id}).scalar_one()
    order = None
    if n > 2:
        order = _RANDOM.sample(range(n), n)
        left = "a" if order.index(0) < order.index(1) else "b"
    else:
        left = secrets.choice("ab")
    result = conn.execute(NEW_ASSIGNMENT, {"pair_id": pair_id, "annotator_id": q.annotator_id, "left": left,
                                           "is_gold": gold, "status": "open", "shown_order": order,
                                           "created_at": utcnow()})
    return result.inserted_primary_key[0], pair_id, left, order


def _expire_stale(conn: Connection, q: Queue) -> int:
    """Expire other annotators' open assignments older than the lease; returns how many."""
    cutoff = utcnow() - timedelta(minutes=q.lease_minutes)
    stale = conn.execute(
        select(A.c.id, A.c.pair_id).join(P, P.c.id == A.c.pair_id)
        .where(P.c.project_id == q.project_id, A.c.status == "open", A.c.created_at < cutoff,
               A.c.annotator_id != q.annotator_id)).all()
    n = 0
    for assignment_id, pair_id in stale:
        done = conn.execute(update(A).where(A.c.id == assignment_id, A.c.status == "open").values(status="expired"))
        if done.rowcount == 1:
            conn.execute(update(P).where(P.c.id == pair_id).values(n_active=P.c.n_active - 1))
            n += 1
    return n
