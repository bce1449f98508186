"""The prebuilt SQL statements of the per-request paths (sessions, serving items, answers).

Core tables and statements built once at import: the ORM, and even building a Core statement, cost
several times more CPU than executing one on SQLite. Parameters are ``bindparam`` names: ``key``
session hash, ``aid`` annotator, ``pid`` project, ``p_id`` pair, ``a_id`` assignment, ``sid``
submission id. ``assignment.py`` keeps its own (the queue queries) beside the rules they implement.
"""

from __future__ import annotations

from sqlalchemy import bindparam, func, insert, select, update

from rlhfkit.annotate.models import Annotator, Assignment, Label, Pair, Project, WebSession

P, A, L = Pair.__table__, Assignment.__table__, Label.__table__
S, N, J = WebSession.__table__, Annotator.__table__, Project.__table__
SESSION = (select(S.c.id_hash, S.c.csrf_token, S.c.is_admin, S.c.annotator_id, S.c.expires_at, N.c.name,
                  N.c.project_id, N.c.active, J.c.gold_rate, J.c.lease_minutes)
           .select_from(S.outerjoin(N, N.c.id == S.c.annotator_id).outerjoin(J, J.c.id == N.c.project_id))
           .where(S.c.id_hash == bindparam("key")))
ANNOTATOR_BY_TOKEN = select(N.c.id).where(N.c.token_hash == bindparam("token_hash"), N.c.active.is_(True))
NEW_SESSION = insert(S)
PAIR_TEXT = select(P.c.prompt, P.c.a, P.c.b, P.c.replies).where(P.c.id == bindparam("p_id"))
LABEL_COUNTS = select(L.c.skipped, func.count()).where(L.c.annotator_id == bindparam("aid")).group_by(L.c.skipped)
BY_SUBMISSION = select(L, A.c.left, A.c.shown_order).join(A, A.c.id == L.c.assignment_id).where(L.c.submission_id == bindparam("sid"))
ASSIGNMENT = (select(A.c.id, A.c.annotator_id, A.c.pair_id, A.c.left, A.c.status, A.c.shown_order)
              .where(A.c.id == bindparam("a_id")))
NEW_LABEL = insert(L)
SETTINGS = select(J.c.guidelines, J.c.question, J.c.rating_aspects, J.c.render_markdown).where(J.c.id == bindparam("pid"))
RATING_SCHEMA = select(J.c.rating_aspects).where(J.c.id == bindparam("pid"))
LAST_LABEL = (select(L, A.c.left, A.c.shown_order).join(A, A.c.id == L.c.assignment_id).where(L.c.annotator_id == bindparam("aid"))
              .order_by(L.c.id.desc()).limit(1))
SET_STATUS = update(A).where(A.c.id == bindparam("a_id")).values(status=bindparam("new_status"))
MOVE_SLOTS = update(P).where(P.c.id == bindparam("p_id")).values(n_active=P.c.n_active + bindparam("delta"))
