"""Initial schema: projects, pairs, annotators, sessions, assignments, labels, admin tokens.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_admin_tokens_token_hash")),
    )
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("gold_rate", sa.Float(), nullable=False),
        sa.Column("lease_minutes", sa.Integer(), nullable=False),
        sa.Column("guidelines", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("gold_rate >= 0 AND gold_rate <= 1", name=op.f("ck_projects_gold_rate_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("name", name=op.f("uq_projects_name")),
    )
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("a", sa.JSON(), nullable=False),
        sa.Column("b", sa.JSON(), nullable=False),
        sa.Column("task", sa.String(200), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("gold_winner", sa.String(1), nullable=True),
        sa.Column("overlap", sa.Integer(), nullable=False),
        sa.Column("n_active", sa.Integer(), nullable=False),
        sa.Column("uncertainty", sa.Float(), nullable=True),
        sa.Column("queue_rank", sa.Float(), nullable=False),
        sa.Column("rm_p", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("gold_winner IS NULL OR gold_winner IN ('a', 'b')", name=op.f("ck_pairs_gold_winner_side")),
        sa.CheckConstraint("overlap >= 1", name=op.f("ck_pairs_overlap_positive")),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_pairs_project_id_projects"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairs")),
        sa.UniqueConstraint("project_id", "key", name=op.f("uq_pairs_project_id")),
    )
    open_pairs = sa.text("n_active < overlap AND gold_winner IS NULL")
    op.create_index(op.f("ix_pairs_open"), "pairs", ["project_id", "queue_rank", "id"],
                    sqlite_where=open_pairs, postgresql_where=open_pairs)
    op.create_index(op.f("ix_pairs_gold"), "pairs", ["project_id", "gold_winner"])
    op.create_table(
        "annotators",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_annotators_project_id_projects"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotators")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_annotators_project_id")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_annotators_token_hash")),
    )
    op.create_table(
        "sessions",
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("(annotator_id IS NULL) = (is_admin = true)", name=op.f("ck_sessions_one_kind")),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotators.id"], name=op.f("fk_sessions_annotator_id_annotators"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_sessions")),
    )
    op.create_index(op.f("ix_sessions_annotator_id"), "sessions", ["annotator_id"])
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("left", sa.String(1), nullable=False),
        sa.Column("is_gold", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("\"left\" IN ('a', 'b')", name=op.f("ck_assignments_left_side")),
        sa.CheckConstraint("status IN ('open', 'done', 'skipped', 'expired')", name=op.f("ck_assignments_status_value")),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotators.id"],
                                name=op.f("fk_assignments_annotator_id_annotators"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"], name=op.f("fk_assignments_pair_id_pairs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
        sa.UniqueConstraint("pair_id", "annotator_id", name=op.f("uq_assignments_pair_id")),
    )
    op.create_index(op.f("ix_assignments_annotator_status"), "assignments", ["annotator_id", "status"])
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.String(64), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("winner", sa.String(3), nullable=True),
        sa.Column("skipped", sa.Boolean(), nullable=False),
        sa.Column("strength", sa.Integer(), nullable=True),
        sa.Column("rationale", sa.Text(), nullable=True),
        sa.Column("unsafe", sa.Boolean(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "(skipped = true AND winner IS NULL) OR (skipped = false AND winner IN ('a', 'b', 'tie'))",
            name=op.f("ck_labels_winner_or_skip")),
        sa.CheckConstraint("strength IS NULL OR (strength >= 1 AND strength <= 3)", name=op.f("ck_labels_strength_range")),
        sa.CheckConstraint("strength IS NULL OR winner IN ('a', 'b')", name=op.f("ck_labels_strength_needs_winner")),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotators.id"], name=op.f("fk_labels_annotator_id_annotators"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["assignment_id"], ["assignments.id"], name=op.f("fk_labels_assignment_id_assignments"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"], name=op.f("fk_labels_pair_id_pairs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
        sa.UniqueConstraint("assignment_id", name=op.f("uq_labels_assignment_id")),
        sa.UniqueConstraint("submission_id", name=op.f("uq_labels_submission_id")),
    )
    op.create_index(op.f("ix_labels_annotator_id"), "labels", ["annotator_id"])
    op.create_index(op.f("ix_labels_pair_id"), "labels", ["pair_id"])


def downgrade() -> None:
    for table in ("labels", "assignments", "sessions", "annotators", "pairs", "projects", "admin_tokens"):
        op.drop_table(table)
