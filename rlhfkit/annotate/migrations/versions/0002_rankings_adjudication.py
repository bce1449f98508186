"""Rankings of K replies, adjudication decisions, the project's pinned question.

- pairs.n_replies / pairs.replies: a ranking item holds its K replies (a and b are its first two);
- assignments.shown_order: the order a ranking item's replies were shown in;
- labels.ranks: the rank of each reply (1 best, equal ranks a tie), in place of a winner;
- decisions: a lead's adjudicated answer for a pair, or for one implied pair (i, j) of a ranking;
- projects.question: the question pinned above every item.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD_WINNER = "(skipped = true AND winner IS NULL) OR (skipped = false AND winner IN ('a', 'b', 'tie'))"
NEW_WINNER = ("(skipped = true AND winner IS NULL AND ranks IS NULL) OR (skipped = false AND "
              "((winner IN ('a', 'b', 'tie') AND ranks IS NULL) OR (winner IS NULL AND ranks IS NOT NULL)))")


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("question", sa.Text(), nullable=True))
    with op.batch_alter_table("pairs") as batch:
        batch.add_column(sa.Column("n_replies", sa.Integer(), nullable=False, server_default="2"))
        batch.add_column(sa.Column("replies", sa.JSON(), nullable=True))
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("shown_order", sa.JSON(), nullable=True))
    # SQLite cannot alter a CHECK constraint: batch mode copies the table (rows included). Safe for
    # labels only because no table refers to it; copying a parent table (projects, pairs) would
    # cascade-delete its children (foreign keys are on). The other tables here only gain columns,
    # which batch mode does in place.
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("ranks", sa.JSON(), nullable=True))
        batch.drop_constraint(op.f("ck_labels_winner_or_skip"), type_="check")
        batch.create_check_constraint(op.f("ck_labels_winner_or_skip"), NEW_WINNER)
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("i", sa.Integer(), nullable=False),
        sa.Column("j", sa.Integer(), nullable=False),
        sa.Column("winner", sa.String(3), nullable=False),
        sa.Column("decided_by", sa.String(200), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("winner IN ('a', 'b', 'tie')", name=op.f("ck_decisions_winner_value")),
        sa.CheckConstraint("i >= 0 AND j > i", name=op.f("ck_decisions_reply_indices")),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"], name=op.f("fk_decisions_pair_id_pairs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
        sa.UniqueConstraint("pair_id", "i", "j", name=op.f("uq_decisions_pair_id")),
    )


def downgrade() -> None:
    op.drop_table("decisions")
    with op.batch_alter_table("labels") as batch:
        batch.drop_constraint(op.f("ck_labels_winner_or_skip"), type_="check")
        batch.create_check_constraint(op.f("ck_labels_winner_or_skip"), OLD_WINNER)
        batch.drop_column("ranks")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_column("shown_order")
    with op.batch_alter_table("pairs") as batch:
        batch.drop_column("replies")
        batch.drop_column("n_replies")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("question")
