"""Repair pair text holding lone surrogates (issue 17, fault 1).

Before revision 0005's release, a pairs file with a JSON escape such as "\\ud800" imported (SQLite
and PostgreSQL store the escape), and then every page, API answer and export that met the text
failed, since such a string cannot be encoded as UTF-8. Import now refuses it; this replaces each
lone surrogate already stored with U+FFFD (the replacement character) in pairs' prompt, replies,
metadata, task and id, so existing databases work again. Labels cannot hold one (their insert
failed). Not reversible: the surrogates were never text.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SURROGATE = re.compile("[\ud800-\udfff]")
PAIRS = sa.table("pairs", sa.column("id", sa.Integer), sa.column("key", sa.String), sa.column("task", sa.String),
                 sa.column("prompt", sa.JSON), sa.column("a", sa.JSON), sa.column("b", sa.JSON),
                 sa.column("replies", sa.JSON(none_as_null=True)), sa.column("meta", sa.JSON))
COLUMNS = ("key", "task", "prompt", "a", "b", "replies", "meta")


def repair(value):
    """``value`` with every lone surrogate in its strings (dict keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [repair(v) for v in value]
    if isinstance(value, dict):
        return {repair(k): repair(v) for k, v in value.items()}
    return value


def upgrade() -> None:
    conn = op.get_bind()
    last = 0
    while True:  # in batches by id, so a large project does not sit in memory at once
        rows = conn.execute(sa.select(PAIRS).where(PAIRS.c.id > last).order_by(PAIRS.c.id).limit(1000)).all()
        if not rows:
            break
        for row in rows:
            fixed = {c: repair(getattr(row, c)) for c in COLUMNS}
            if any(fixed[c] != getattr(row, c) for c in COLUMNS):
                conn.execute(sa.update(PAIRS).where(PAIRS.c.id == row.id).values(**fixed))
        last = rows[-1].id


def downgrade() -> None:
    pass  # nothing to undo: the replaced characters were not text
