"""The annotation database: SQLAlchemy 2 models.

The schema is created and upgraded only by the Alembic scripts in ``migrations/`` (run from
:func:`rlhfkit.annotate.db.upgrade`); ``tests/test_annotate_store.py`` checks that the migrations and
these models describe the same schema. Change both together and add a new migration script.

Vocabulary:

- a *pair* is one imported :class:`~rlhfkit.data.records.ComparisonPair` (sides ``a`` and ``b``);
- an *assignment* is one pair shown to one annotator, with the side shown on the left drawn at
  random and recorded (``left`` is ``'a'`` or ``'b'``); ``(pair_id, annotator_id)`` is unique, so
  nobody sees a pair twice;
- a *label* is the answer to one assignment: a winner in pair terms (``'a'``, ``'b'``, ``'tie'``) or a
  skip. ``submission_id`` (chosen by the client) is unique, which makes a retried POST store one row.
- a *ranking item* is a pair row with ``n_replies`` K >= 3 replies in ``replies`` (``a`` and ``b``
  are its first two); its labels hold ``ranks`` (one per reply) instead of a winner, and each of its
  K(K-1)/2 *implied pairs* (i, j), i < j, counts as a comparison of reply i (side a) with reply j (b);
- a *decision* is a lead's adjudicated answer for a pair (i, j = 0, 1) or one implied pair.

All timestamps are naive UTC (SQLite has no time zones; PostgreSQL stores the same values).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSON(none_as_null=True): Python None is SQL NULL, not the JSON text 'null' (CHECKs test IS NULL).
# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class AdminToken(Base):
    """Admin credentials: only the SHA-256 of the token is stored; the token is printed once."""

    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    gold_rate: Mapped[float] = mapped_column(Float, default=0.0)
    """Target fraction of each annotator's items that are gold (attention-check) pairs."""
    lease_minutes: Mapped[int] = mapped_column(Integer, default=60)
    """An open assignment older than this may be handed to someone else when the pool runs dry."""
    guidelines: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Instructions shown above every pair (plain text; markdown is shown as written)."""
    question: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The question pinned above every item, e.g. "Which reply is more helpful?"."""
    render_markdown: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Show prompts and replies as inert markdown (``markdown.py``) instead of plain text."""
    rating_aspects: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """Optional ratings asked for every reply: [{"name", "min", "max"}, ...] (see ``ratings.py``)."""
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (
        CheckConstraint("gold_rate >= 0 AND gold_rate <= 1", name="gold_rate_range"),
    )


class Pair(Base):
    __tablename__ = "pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(300))
    """The ComparisonPair ``id`` from the imported file."""
    prompt: Mapped[list] = mapped_column(JSON)
    a: Mapped[dict] = mapped_column(JSON)
    b: Mapped[dict] = mapped_column(JSON)
    task: Mapped[str | None] = mapped_column(String(200), nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    gold_winner: Mapped[str | None] = mapped_column(String(1), nullable=True)
    """'a' or 'b' for a gold pair (known answer), else NULL. Gold pairs are served at the project's
    gold rate to every annotator and are not limited by ``overlap``."""
    overlap: Mapped[int] = mapped_column(Integer)
    """How many annotators should label this pair."""
    n_active: Mapped[int] = mapped_column(Integer, default=0)
    """Assignments that are open or answered with a label (not skipped, not expired). Changed only
    by conditional UPDATEs (``n_active < overlap``), which keeps concurrent servers from
    over-assigning a pair."""
    uncertainty: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Reward-model uncertainty in [0, 0.5] (see ``assignment.uncertainty_score``); NULL if unscored."""
    queue_rank: Mapped[float] = mapped_column(Float, default=1.0)
    """Serving order, lowest first: ``-uncertainty`` for scored pairs, 1 for unscored ones (so they
    come last). Ascending, so that the partial index ``ix_pairs_open`` serves the queue query."""
    rm_p: Mapped[list | None] = mapped_column(JSON, nullable=True)
    """The reward-model probabilities the priority came from, as given in the uncertainty file."""
    n_replies: Mapped[int] = mapped_column(Integer, default=2, server_default="2")
    """2 for a pair; K (3-9) for a ranking item."""
    replies: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """A ranking item's K assistant messages (NULL for a pair)."""
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (
        UniqueConstraint("project_id", "key"),
        CheckConstraint("gold_winner IS NULL OR gold_winner IN ('a', 'b')", name="gold_winner_side"),
        CheckConstraint("overlap >= 1", name="overlap_positive"),
        # The regular pairs that still need labels, in serving order: the next-pair query walks this
        # index and stops after a few rows, however many pairs are done or the project holds.
        Index("ix_pairs_open", "project_id", "queue_rank", "id",
              sqlite_where=text("n_active < overlap AND gold_winner IS NULL"),
              postgresql_where=text("n_active < overlap AND gold_winner IS NULL")),
        Index("ix_pairs_gold", "project_id", "gold_winner"),
    )


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 of the secret in the annotator's link."""
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (UniqueConstraint("project_id", "name"),)


class WebSession(Base):
    """A browser session. The cookie holds a random secret; the table holds its SHA-256."""

    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    annotator_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotators.id", ondelete="CASCADE"), nullable=True, index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    __table_args__ = (
        CheckConstraint("(annotator_id IS NULL) = (is_admin = true)", name="one_kind"),
    )


class Assignment(Base):
    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    left: Mapped[str] = mapped_column(String(1))
    """Which side of the pair was shown on the left: 'a' or 'b'."""
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(10), default="open")
    """open -> done | skipped; open -> expired (lease ran out; a late answer is still accepted)."""
    shown_order: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """A ranking item's reply indices in the order shown (drawn at random); NULL for a pair."""
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (
        UniqueConstraint("pair_id", "annotator_id"),
        CheckConstraint("\"left\" IN ('a', 'b')", name="left_side"),
        CheckConstraint("status IN ('open', 'done', 'skipped', 'expired')", name="status_value"),
        Index("ix_assignments_annotator_status", "annotator_id", "status"),
    )


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(String(64), unique=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    winner: Mapped[str | None] = mapped_column(String(3), nullable=True)
    """'a', 'b' or 'tie' in pair terms; NULL for a skip or a ranking."""
    ranks: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """A ranking: the rank of each reply, by reply index (1 best; equal ranks tie; dense 1..m)."""
    ratings: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """{aspect: [rating of each reply by reply index, None where left blank]}; NULL when none given."""
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    strength: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    unsafe: Mapped[bool] = mapped_column(Boolean, default=False)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Time the item was on screen before the answer, measured by the page."""
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    __table_args__ = (
        CheckConstraint("(skipped = true AND winner IS NULL AND ranks IS NULL) OR (skipped = false AND "
                        "((winner IN ('a', 'b', 'tie') AND ranks IS NULL) OR (winner IS NULL AND ranks IS NOT NULL)))",
                        name="winner_or_skip"),
        CheckConstraint("strength IS NULL OR (strength >= 1 AND strength <= 3)", name="strength_range"),
        CheckConstraint("strength IS NULL OR winner IN ('a', 'b')", name="strength_needs_winner"),
    )


class Decision(Base):
    """A lead's adjudicated answer: it replaces the votes' consensus in the export."""

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    i: Mapped[int] = mapped_column(Integer)
    j: Mapped[int] = mapped_column(Integer)
    """The implied pair (reply i as side a, reply j as side b); 0, 1 for a pair."""
    winner: Mapped[str] = mapped_column(String(3))
    decided_by: Mapped[str] = mapped_column(String(200))
    """The name the lead gave when deciding (there is one admin token; this says which person)."""
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (
        UniqueConstraint("pair_id", "i", "j"),
        CheckConstraint("winner IN ('a', 'b', 'tie')", name="winner_value"),
        CheckConstraint("i >= 0 AND j > i", name="reply_indices"),
    )
