"""projects.render_markdown: show model text as inert markdown (markdown.py) instead of plain text.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, never a batch "copy and move" of projects: on SQLite (foreign keys on, and
    # the upgrade runs in one transaction, where they cannot be switched off) dropping the old
    # projects table would cascade-delete every pair, annotator and label. The 0001 -> head upgrade
    # test in tests/test_annotate_store.py catches exactly that.
    op.add_column("projects", sa.Column("render_markdown", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("projects", "render_markdown")  # SQLite >= 3.35 drops a column in place
