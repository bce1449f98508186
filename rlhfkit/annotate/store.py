"""Everything the CLI and the server do to the annotation database, as plain methods.

Annotators only ever see sides as ``left``/``right`` (their screen); the store translates to the
pair's ``a``/``b`` with the assignment's recorded order, so the page never reveals which side is
which model. Refusals raise :class:`Refused` with the HTTP status and the field at fault.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from rlhfkit.annotate import assignment as assign
from rlhfkit.annotate import labels as lab
from rlhfkit.annotate import queries as q
from rlhfkit.annotate import ratings as rt
from rlhfkit.annotate.db import Database, upgrade
from rlhfkit.annotate.models import (
    AdminToken,
    WebSession,
    utcnow,
)
from rlhfkit.annotate.projects import ProjectAdmin, digest
from rlhfkit.annotate.values import ImportReport, Item, LabelInput, Principal, Refused
from rlhfkit.data.records import DataError

ANNOTATOR_SESSION = timedelta(days=30)
ADMIN_SESSION = timedelta(hours=12)
MAX_GROUP = 64
"""Most answers stored in one SQLite transaction (group commit)."""
SESSION_CACHE_S = 10.0
"""How long a server process trusts a session it looked up. Signing out and deactivating through
this process take effect at once; through another process (the CLI, a second server) within this."""


@dataclass
class _Pending:
    """One answer waiting for a group commit (see ``Store._submit_grouped``)."""

    who: Principal
    x: LabelInput
    result: tuple[dict, bool] | None = None
    error: Exception | None = None
    done: bool = False


class Store:
    """The annotation database's per-request operations (sessions, serving items, answers).

    The admin-side ones (projects, pairs, annotators, the admin token) are ``store.admin``, a
    :class:`~rlhfkit.annotate.projects.ProjectAdmin` on the same database."""

    def __init__(self, url: str, *, session_cache_s: float = SESSION_CACHE_S):
        self.db = Database(url)
        self.session_cache_s = session_cache_s
        self._sessions: dict[str, tuple[float, Principal]] = {}
        self._sessions_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self.admin = ProjectAdmin(self.db, self._forget_sessions)

    # ---- setup -------------------------------------------------------------------------------

    def migrate(self) -> None:
        upgrade(self.db)

    def warm_up(self) -> None:
        """Compile the per-request statements once (SQLAlchemy caches them per engine) and open a
        connection on each engine, so the first annotators after a start do not all pay for it at
        once. Runs only statements that change nothing, in transactions that are rolled back."""
        probe = {"key": "", "token_hash": "", "sid": "", "p_id": -1, "aid": -1, "pid": -1, "a_id": -1,
                 "delta": 0, "new_status": "open"}
        reads = (q.SESSION, q.ANNOTATOR_BY_TOKEN, q.SETTINGS, q.LAST_LABEL, q.PAIR_TEXT, q.LABEL_COUNTS, q.BY_SUBMISSION,
                 q.ASSIGNMENT, assign.OPEN_ASSIGNMENT, assign.REMAINING, assign.SERVED, assign.REGULAR_SKIP_LOCKED,
                 assign.REGULAR_WAIT, assign.GOLD)
        writes = (q.SET_STATUS, q.MOVE_SLOTS, assign.TAKE_SLOT, assign.TAKE_GOLD)
        for engine in {self.db.engine, self.db.fast_engine, self.db.read_engine}:
            writer = engine is not self.db.read_engine
            with self.db._write_lock if writer else contextlib.nullcontext(), engine.connect() as conn:
                for stmt in reads + (writes if writer else ()):
                    conn.execute(stmt, probe)
                conn.rollback()

    # ---- sessions -----------------------------------------------------------------------------

    def admin_token_ok(self, token: str) -> bool:
        with self.db.read() as s:
            return s.scalars(select(AdminToken.id).where(AdminToken.token_hash == digest(token),
                                                         AdminToken.revoked_at.is_(None))).first() is not None

    def login_admin(self, token: str) -> tuple[str, Principal] | None:
        if not self.admin_token_ok(token):
            return None
        return self._new_session(None, ADMIN_SESSION)

    def login_annotator(self, token: str) -> tuple[str, Principal] | None:
        with self.db.begin() as conn:
            ann_id = conn.execute(q.ANNOTATOR_BY_TOKEN, {"token_hash": digest(token)}).scalar()
        return None if ann_id is None else self._new_session(ann_id, ANNOTATOR_SESSION)

    def _new_session(self, annotator_id: int | None, ttl: timedelta) -> tuple[str, Principal]:
        secret, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), utcnow()
        with self.db.begin(write=True, durable=False) as conn:
            conn.execute(q.NEW_SESSION, {"id_hash": digest(secret), "annotator_id": annotator_id,
                                       "is_admin": annotator_id is None, "csrf_token": csrf, "created_at": now,
                                       "expires_at": now + ttl})
            conn.execute(delete(q.S).where(q.S.c.expires_at < now))  # keep the table small
        return secret, self.principal(secret)

    def principal(self, secret: str) -> Principal | None:
        """The live session for a cookie secret, or None (unknown, expired, annotator deactivated)."""
        key, now = digest(secret), time.monotonic()
        hit = self._sessions.get(key)
        if hit is not None and hit[0] > now and hit[1].expires_at > utcnow():
            return hit[1]
        with self.db.begin() as conn:
            row = conn.execute(q.SESSION, {"key": key}).first()
        if row is None or row.expires_at <= utcnow() or (not row.is_admin and not row.active):
            self._sessions.pop(key, None)
            return None
        queue = None if row.is_admin else assign.Queue(row.annotator_id, row.project_id, row.gold_rate,
                                                       row.lease_minutes)
        who = Principal(row.id_hash, row.csrf_token, row.is_admin, row.annotator_id, row.name, row.project_id,
                        queue, row.expires_at)
        with self._sessions_lock:
            if len(self._sessions) > 10_000:
                self._sessions.clear()
            self._sessions[key] = (now + self.session_cache_s, who)
        return who

    def _forget_sessions(self) -> None:
        with self._sessions_lock:
            self._sessions.clear()

    def logout(self, principal: Principal) -> None:
        with self.db.write(durable=False) as s:
            s.execute(update(WebSession).where(WebSession.id_hash == principal.session_hash)
                      .values(expires_at=utcnow()))
        with self._sessions_lock:
            self._sessions.pop(principal.session_hash, None)

    # ---- labelling ----------------------------------------------------------------------------

    def next_item(self, who: Principal) -> Item | None:
        """The annotator's current pair (a new assignment if they have none open)."""
        return self.page(who, full=False)["item"]

    def progress(self, who: Principal) -> dict:
        with self.db.begin() as conn:
            return self._progress(conn, who)

    def page(self, who: Principal, full: bool = True, may_write: bool = True) -> dict | None:
        """What the labelling page shows: ``item`` (the current pair or None), and with ``full``
        ``progress``, the project's ``guidelines`` and the annotator's ``last`` answer (so a wrong
        key can be put right at once).

        With ``may_write=False`` it only reads, and returns None when the annotator has no open
        assignment (one has to be written first): the server then calls it again from a worker
        thread, where waiting for the writer lock blocks nothing else.
        """
        with self.db.begin() as conn:
            got = assign.open_assignment(conn, who.queue)
        if got is None:  # usually made already by submit(); otherwise take the writer lock now
            if not may_write:
                return None
            with self.db.begin(write=True, durable=False) as conn:
                got = assign.next_assignment(conn, who.queue)
        view = {"item": None}
        with self.db.begin() as conn:
            if got is not None:
                assignment_id, pair_id, left, order = got
                pair = conn.execute(q.PAIR_TEXT, {"p_id": pair_id}).one()
                if order is not None:  # a ranking item: its replies in the order drawn for this assignment
                    view["item"] = Item(assignment_id, pair.prompt, None, None,
                                        [pair.replies[i]["content"] for i in order])
                else:
                    shown_left, shown_right = (pair.a, pair.b) if left == "a" else (pair.b, pair.a)
                    view["item"] = Item(assignment_id, pair.prompt, shown_left["content"], shown_right["content"])
            if full:
                last = conn.execute(q.LAST_LABEL, {"aid": who.annotator_id}).first()
                settings = conn.execute(q.SETTINGS, {"pid": who.project_id}).one()
                view.update(progress=self._progress(conn, who), guidelines=settings.guidelines,
                            question=settings.question, rating_aspects=settings.rating_aspects,
                            markdown=settings.render_markdown,
                            last=None if last is None else lab.label_view(last, last.left, last.shown_order))
        return view

    @staticmethod
    def _progress(conn, who: Principal) -> dict:
        rows = dict(conn.execute(q.LABEL_COUNTS, {"aid": who.annotator_id}).all())
        return {"labelled": rows.get(False, 0), "skipped": rows.get(True, 0),
                "remaining": assign.remaining_for(conn, who.queue)}

    def submit(self, who: Principal, x: LabelInput) -> tuple[dict, bool]:
        """Store one answer. Returns ``(label, created)``; a retry of a stored submission returns the
        stored label with ``created=False``. The unique key on ``submission_id`` decides races.

        Returns only once the label is committed (on SQLite with ``synchronous=FULL``: on disk).
        """
        if x.choice not in lab.CHOICES:
            raise Refused(422, f"must be one of {', '.join(lab.CHOICES)}, got {x.choice!r}", "choice")
        lab.check_rationale(x.rationale)
        if self.db.is_sqlite:
            return self._submit_grouped(who, x)
        try:
            with self.db.begin(write=True) as conn:
                return self._store_answer(conn, who, x)
        except IntegrityError:
            # PostgreSQL: a concurrent request with the same submission_id (or for the same
            # assignment) committed first; the unique constraints decided, now tell which it was.
            with self.db.begin() as conn:
                replay = self._replay(conn, who, x)
            if replay is None:
                raise Refused(409, "this assignment is already answered", "assignment_id") from None
            return replay, False

    def _submit_grouped(self, who: Principal, x: LabelInput) -> tuple[dict, bool]:
        """SQLite group commit: answers that arrive while a commit is waiting for the disk are
        stored together in the next transaction, one fsync for all of them.

        Every request queues its answer, then takes the writer lock. The first to get it commits
        everything queued (each answer inside its own SAVEPOINT, so one refusal does not undo the
        others) and marks them done; the others find theirs done and return. Under load this turns
        N commits into one; alone, a request commits just its own answer, as before.
        """
        mine = _Pending(who, x)
        with self._queue_lock:
            self._queue.append(mine)
        while not mine.done:  # more than MAX_GROUP ahead of us: a few rounds
            with self.db.writer():
                if not mine.done:
                    with self._queue_lock:
                        batch, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                    self._commit_group(batch)
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _commit_group(self, batch: list[_Pending]) -> None:
        try:
            with self.db.begin(write=True) as conn:
                for p in batch:
                    # SAVEPOINT by hand: SQLAlchemy compiles its savepoint construct afresh each time.
                    conn.exec_driver_sql("SAVEPOINT answer")
                    try:
                        p.result = self._store_answer(conn, p.who, p.x)
                        conn.exec_driver_sql("RELEASE SAVEPOINT answer")
                    except Exception as e:  # handed to the request it belongs to, which raises it
                        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT answer")
                        conn.exec_driver_sql("RELEASE SAVEPOINT answer")
                        p.error = e
        except Exception as e:  # the commit failed: none of these answers is stored
            for p in batch:
                p.result, p.error = None, p.error or e
        finally:
            for p in batch:
                p.done = True

    def _store_answer(self, conn, who: Principal, x: LabelInput) -> tuple[dict, bool]:
        """The write itself, inside the caller's transaction."""
        # Checked inside the write transaction: a retry racing its original must see it.
        replay = self._replay(conn, who, x)
        if replay is not None:
            return replay, False
        a = conn.execute(q.ASSIGNMENT, {"a_id": x.assignment_id}).first()
        if a is None or a.annotator_id != who.annotator_id:
            raise Refused(404, "no such assignment for this annotator", "assignment_id")
        if a.status in ("done", "skipped"):
            # PostgreSQL (read committed): the original of this retry may have committed after our
            # first look; this new statement sees it.
            replay = self._replay(conn, who, x)
            if replay is not None:
                return replay, False
            raise Refused(409, "this assignment is already answered; change the answer with "
                               "PATCH /api/labels/{id}", "assignment_id")
        skip, ranking = x.choice == "skip", a.shown_order is not None
        if not skip and ranking != (x.choice == "rank"):
            raise Refused(422, "this item is a ranking: answer with choice 'rank' and ranks" if ranking else
                               f"this item is a pair: 'rank' answers a ranking item, got {x.choice!r}", "choice")
        if ranking and x.strength is not None:
            raise Refused(422, "must be empty for a ranking", "strength")
        ranks = lab.to_pair_terms(lab.dense_ranks(x.ranks, len(a.shown_order)), a.shown_order) \
            if ranking and not skip else None
        if skip and x.ratings:
            raise Refused(422, "a skip has no ratings", "ratings")
        ratings = None if x.ratings is None else rt.to_pair_terms(
            x.ratings, conn.execute(q.RATING_SCHEMA, {"pid": who.project_id}).scalar(),
            rt.shown_replies(a.left, a.shown_order))
        row = {"submission_id": x.submission_id, "assignment_id": a.id, "annotator_id": a.annotator_id,
               "pair_id": a.pair_id, "winner": None if skip or ranking else lab.winner(x.choice, a.left),
               "ranks": ranks, "ratings": ratings, "skipped": skip, "strength": x.strength, "rationale": lab.text(x.rationale),
               "unsafe": x.unsafe, "duration_ms": x.duration_ms, "created_at": utcnow(), "updated_at": None}
        row["id"] = conn.execute(q.NEW_LABEL, row).inserted_primary_key[0]
        conn.execute(q.SET_STATUS, {"a_id": a.id, "new_status": "skipped" if skip else "done"})
        delta = -1 if (skip and a.status == "open") else 1 if (not skip and a.status == "expired") else 0
        if delta:
            conn.execute(q.MOVE_SLOTS, {"p_id": a.pair_id, "delta": delta})
        # Hand out the next pair in the same transaction: it rides on this commit's fsync, and the
        # page load that follows only reads.
        assign.next_assignment(conn, who.queue)
        return lab.label_view(SimpleNamespace(**row), a.left, a.shown_order), True

    @staticmethod
    def _replay(conn, who: Principal, x: LabelInput) -> dict | None:
        label = conn.execute(q.BY_SUBMISSION, {"sid": x.submission_id}).first()
        if label is None:
            return None
        view = lab.label_view(label, label.left, label.shown_order)
        same = (label.annotator_id == who.annotator_id and label.assignment_id == x.assignment_id
                and view["choice"] == x.choice and label.strength == x.strength
                and (view["ranks"] is None or view["ranks"] == lab.dense_ranks(x.ranks, len(view["ranks"])))
                and view["ratings"] == rt.given(x.ratings)
                and label.rationale == lab.text(x.rationale) and label.unsafe == x.unsafe)
        if not same:
            raise Refused(409, "this submission_id was already used for a different answer; "
                               "generate a new one for each answer", "submission_id")
        return view

    # ---- one's own answers (labels.py) ----------------------------------------------------------

    def labels_of(self, who: Principal, limit: int = 50, offset: int = 0) -> list[dict]:
        return lab.labels_of(self.db, who, limit, offset)

    def label_of(self, who: Principal, label_id: int) -> dict:
        return lab.label_of(self.db, who, label_id)

    def update_label(self, who: Principal, label_id: int, changes: dict) -> dict:
        return lab.update_label(self.db, who, label_id, changes)


__all__ = ["DataError", "ImportReport", "Item", "LabelInput", "Principal", "Refused", "Store"]
