"""Ratings: an optional per-project schema of aspects (e.g. helpfulness 1-5) rated per reply.

- projects.rating_aspects: [{"name", "min", "max"}, ...] or NULL (no ratings asked);
- labels.ratings: {aspect: [rating of reply 0, of reply 1, ...]} in pair terms (a, b or a ranking's
  reply indices), a rating NULL where the annotator left it blank.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("rating_aspects", sa.JSON(), nullable=True))
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("ratings", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("ratings")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("rating_aspects")
