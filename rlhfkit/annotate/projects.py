"""Projects, pairs, annotators and the admin token: the operations the CLI and the admin pages call
on the store (:class:`ProjectAdmin`, ``store.admin``). The
per-request paths (sessions, serving items, answers) are in ``store.py``."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from rlhfkit.annotate import assignment as assign
from rlhfkit.annotate.db import Database
from rlhfkit.annotate.imports import read_gold, read_pairs, read_uncertainty
from rlhfkit.annotate.models import (
    AdminToken,
    Annotator,
    Assignment,
    Label,
    Pair,
    Project,
    WebSession,
    utcnow,
)
from rlhfkit.annotate.ratings import parse_schema, schema_spec
from rlhfkit.annotate.values import ImportReport, Refused, text_problem

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ANNOTATOR_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,100}$")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def find_project(s, name: str) -> Project:
    proj = s.scalars(select(Project).where(Project.name == name)).first()
    if proj is None:
        raise Refused(404, f"no project {name!r}", "project")
    return proj


def _known(ids: dict, key: str, where, project: str) -> int:
    if key not in ids:
        raise where.error(f"no pair {key!r} in project {project!r} (import the pairs first, or in the same "
                          "command)", "id")
    return ids[key]


class ProjectAdmin:
    """Admin-side operations on one database. ``forget_sessions`` empties the store's session cache
    (called after a change that ends sessions, so no request re-caches the old state)."""

    def __init__(self, db: Database, forget_sessions: Callable[[], None]):
        self.db, self._forget_sessions = db, forget_sessions

    def ensure_admin_token(self, rotate: bool = False) -> str | None:
        """A new admin token if there is none (or ``rotate``: revoke all and make a new one).

        Returns the token, which is stored only as a hash, or None when one exists already.
        """
        with self.db.write() as s:
            live = select(AdminToken).where(AdminToken.revoked_at.is_(None))
            if s.scalars(live).first() is not None and not rotate:
                return None
            now = utcnow()
            s.execute(update(AdminToken).where(AdminToken.revoked_at.is_(None)).values(revoked_at=now))
            s.execute(update(WebSession).where(WebSession.is_admin.is_(True)).values(expires_at=now))
            token = secrets.token_urlsafe(32)
            s.add(AdminToken(token_hash=digest(token), created_at=now))
        self._forget_sessions()  # after the commit, so no request re-caches the old state
        return token

    def import_pairs(self, project: str, pairs_path: str | Path | None = None, *, overlap: int = 3,
                     gold_rate: float | None = None, gold_path: str | Path | None = None,
                     uncertainty_path: str | Path | None = None, skip_existing: bool = False,
                     guidelines: str | None = None, question: str | None = None,
                     ratings: str | None = None, markdown: bool | None = None) -> ImportReport:
        """Import pairs and/or gold answers and/or uncertainty scores in one transaction;
        ``guidelines``, ``question`` (pinned above every item) and ``ratings`` (the aspects rated per
        reply, "helpfulness=1-5,...", see ``ratings.py``) are project settings; "" removes one;
        ``markdown`` shows model text as inert markdown (None leaves the setting as it is).

        All files are parsed and checked first; any error (bad line, unknown id, id already in the
        project) raises :class:`DataError` and stores nothing.
        """
        if not PROJECT_NAME.match(project):
            raise ValueError(f"--project: {project!r} is not a valid name: use letters, digits, '.', '_' and '-' "
                             "(up to 100 characters, starting with a letter or digit)")
        if overlap < 1:
            raise ValueError(f"--overlap must be at least 1, got {overlap}")
        if gold_rate is not None and not 0.0 <= gold_rate <= 1.0:
            raise ValueError(f"--gold-rate must be in [0, 1], got {gold_rate}")
        for name, text in (("guidelines", guidelines), ("question", question)):
            if text is not None and text_problem(text):
                raise ValueError(f"--{name}: {text_problem(text)}")
        if question is not None and len(question) > 500:
            raise ValueError(f"--question: at most 500 characters, got {len(question)}")
        schema = None if ratings is None else parse_schema(ratings)
        pairs = read_pairs(pairs_path) if pairs_path is not None else []
        gold = read_gold(gold_path) if gold_path is not None else []
        scores = read_uncertainty(uncertainty_path) if uncertainty_path is not None else []
        with self.db.write() as s:
            proj = s.scalars(select(Project).where(Project.name == project)).first()
            if proj is None and not pairs:  # settings alone cannot create a project
                raise Refused(404, f"no project {project!r}: import pairs into it first", "project")
            created = proj is None
            previous_rate = None if created else proj.gold_rate
            if created:
                proj = Project(name=project, gold_rate=0.1 if gold_rate is None else gold_rate,
                               lease_minutes=60, created_at=utcnow())
                s.add(proj)
                s.flush()
            elif gold_rate is not None:
                proj.gold_rate = gold_rate
            if guidelines is not None:
                proj.guidelines = guidelines.strip() or None
            if question is not None:
                proj.question = question.strip() or None
            if ratings is not None:
                proj.rating_aspects = schema
            if markdown is not None:
                proj.render_markdown = markdown
            existing = dict(s.execute(select(Pair.key, Pair.id).where(Pair.project_id == proj.id)).all())
            rows, n_skipped, now = [], 0, utcnow()
            for where, pair, replies in pairs:
                if pair.id in existing:
                    if skip_existing:
                        n_skipped += 1
                        continue
                    raise where.error(f"pair {pair.id!r} is already in project {project!r}; pass "
                                      "--skip-existing to import only the new pairs", "id")
                rows.append({"project_id": proj.id, "key": pair.id, "prompt": pair.prompt, "a": pair.a,
                             "b": pair.b, "task": pair.task, "meta": pair.metadata,
                             "gold_winner": pair.metadata.get("gold_winner"), "overlap": overlap,
                             "n_active": 0, "queue_rank": 1.0, "created_at": now, "replies": replies,
                             "n_replies": 2 if replies is None else len(replies)})
            if rows:
                s.execute(insert(Pair), rows)
            ids = dict(s.execute(select(Pair.key, Pair.id).where(Pair.project_id == proj.id)).all())
            rankings = set(s.scalars(select(Pair.key).where(Pair.project_id == proj.id, Pair.n_replies > 2)))
            for where, key, winner in gold:
                if key in rankings:
                    raise where.error(f"{key!r} is a ranking item; gold answers are for pairs", "id")
                s.execute(update(Pair).where(Pair.id == _known(ids, key, where, project))
                          .values(gold_winner=winner))
            for where, key, ps in scores:
                s.execute(update(Pair).where(Pair.id == _known(ids, key, where, project))
                          .values(uncertainty=(u := assign.uncertainty_score(ps)), queue_rank=-u, rm_p=ps))
            n_gold = s.scalar(select(func.count()).select_from(Pair)
                              .where(Pair.project_id == proj.id, Pair.gold_winner.is_not(None)))
            return ImportReport(project, created, len(rows), n_gold, len(scores), n_skipped, proj.gold_rate,
                                previous_rate if previous_rate != proj.gold_rate else None)

    def add_annotator(self, project: str, name: str) -> str:
        """Create an annotator; returns the secret for their link (stored only as a hash)."""
        if name != name.strip() or not ANNOTATOR_NAME.match(name):
            raise Refused(422, f"{name!r} is not a valid annotator name: 1-100 characters, no '/', '\\', "
                               "control characters or surrounding spaces", "name")
        token = secrets.token_urlsafe(32)
        try:
            with self.db.write() as s:
                proj = find_project(s, project)
                s.add(Annotator(project_id=proj.id, name=name, token_hash=digest(token), active=True,
                                created_at=utcnow()))
        except IntegrityError:
            raise Refused(409, f"annotator {name!r} already exists in project {project!r}", "name") from None
        return token

    def set_annotator_active(self, project: str, name: str, active: bool) -> str | None:
        """Deactivating ends the annotator's sessions, voids their link and frees their open items.
        Reactivating issues a new link (returned; stored only as a hash): the old one stays void."""
        with self.db.write() as s:
            ann = self._annotator(s, project, name)
            ann.active = active
            token = None
            if active:
                token = secrets.token_urlsafe(32)
                ann.token_hash = digest(token)
            else:
                s.execute(update(WebSession).where(WebSession.annotator_id == ann.id).values(expires_at=utcnow()))
                for a in s.scalars(select(Assignment).where(Assignment.annotator_id == ann.id,
                                                            Assignment.status == "open")):
                    a.status = "expired"
                    s.execute(update(Pair).where(Pair.id == a.pair_id).values(n_active=Pair.n_active - 1))
        self._forget_sessions()  # after the commit, so no request re-caches the old state
        return token

    def new_link(self, project: str, name: str) -> str:
        """Replace an active annotator's link (a leaked or forwarded one): the old link stops working
        and their sessions end; their open items stay theirs. Returns the new secret."""
        token = secrets.token_urlsafe(32)
        with self.db.write() as s:
            ann = self._annotator(s, project, name)
            if not ann.active:
                raise Refused(409, f"annotator {name!r} is deactivated: reactivate them (which issues a new link)",
                              "name")
            ann.token_hash = digest(token)
            s.execute(update(WebSession).where(WebSession.annotator_id == ann.id).values(expires_at=utcnow()))
        self._forget_sessions()
        return token

    @staticmethod
    def _annotator(s, project: str, name: str) -> Annotator:
        proj = find_project(s, project)
        ann = s.scalars(select(Annotator).where(Annotator.project_id == proj.id, Annotator.name == name)).first()
        if ann is None:
            raise Refused(404, f"no annotator {name!r} in project {project!r}", "name")
        return ann

    def project_names(self) -> list[str]:
        with self.db.read() as s:
            return list(s.scalars(select(Project.name).order_by(Project.name)))

    def project_info(self, name: str) -> dict:
        with self.db.read() as s:
            proj = find_project(s, name)
            q = select(func.count()).select_from(Pair).where(Pair.project_id == proj.id)
            n_pairs = s.scalar(q.where(Pair.gold_winner.is_(None)))
            n_gold = s.scalar(q.where(Pair.gold_winner.is_not(None)))
            labelled = s.execute(
                select(Pair.overlap, func.count(Label.id)).select_from(Pair)
                .outerjoin(Label, (Label.pair_id == Pair.id) & Label.skipped.is_(False))
                .where(Pair.project_id == proj.id, Pair.gold_winner.is_(None)).group_by(Pair.id)).all()
            annotators = s.execute(select(Annotator.name, Annotator.active).where(Annotator.project_id == proj.id)
                                   .order_by(Annotator.name)).all()
            return {"name": proj.name, "gold_rate": proj.gold_rate, "question": proj.question,
                    "rating_aspects": proj.rating_aspects, "markdown": proj.render_markdown, "ratings_spec": schema_spec(proj.rating_aspects), "n_pairs": n_pairs, "n_gold": n_gold,
                    "n_complete": sum(1 for overlap, n in labelled if n >= overlap),
                    "n_started": sum(1 for _, n in labelled if n > 0),
                    "n_labels": sum(n for _, n in labelled), "n_wanted": sum(o for o, _ in labelled),
                    "annotators": [{"name": n, "active": a} for n, a in annotators]}
