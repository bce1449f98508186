"""Alembic environment for the annotation database.

Run programmatically by :func:`rlhfkit.annotate.db.upgrade`, which passes an open connection in
``config.attributes["connection"]``. To write a new migration against a scratch database::

    alembic -x url=sqlite:///scratch.db -c /dev/null ... (or call alembic.command.revision with
    autogenerate=True and a Config from rlhfkit.annotate.db.alembic_config)
"""

from alembic import context
from sqlalchemy import create_engine

from rlhfkit.annotate.models import Base

config = context.config
target_metadata = Base.metadata


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database URL: alembic -x url=sqlite:///annotate.db upgrade head")
    with create_engine(url).begin() as conn:
        run(conn)
