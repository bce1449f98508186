"""Database connections and schema migrations.

SQLite (the default, ``sqlite:///annotate.db``) runs in WAL mode so page loads read while a label is
written. Two SQLite facts shape this module:

- A deferred transaction that reads and then writes can fail at once with SQLITE_BUSY when another
  connection committed in between (the busy timeout does not apply to that upgrade), so every
  write transaction starts with ``BEGIN IMMEDIATE``.
- SQLite's busy handler waits in sleeps of up to 100 ms, which would dominate label latency under
  load. Writers in one server process therefore queue on a Python lock first; the busy timeout only
  arbitrates between processes (a CLI import while the server runs).

Durability: ``write(durable=True)`` (labels, imports, annotators, tokens) commits with
``synchronous=FULL``, so a label is on disk before the server acknowledges it and not even a power
cut loses it. ``write(durable=False)`` (handing out an assignment, opening a session) commits with
``synchronous=NORMAL``: WAL mode then survives a crash of the process but may drop the last such
commits on power loss, which costs nothing (the pair is handed out again, the user signs in again)
and saves an fsync (~6 ms on the development VM) per page load. A later FULL commit syncs the
earlier NORMAL ones with it, since they are in the same WAL file.

PostgreSQL (``postgresql+psycopg://user:pass@host/db``) needs none of this.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0


class Database:
    """Engines and session factories for one database URL.

    ``write()`` yields a session inside a transaction that commits on exit (``BEGIN IMMEDIATE`` and
    a process-wide writer lock on SQLite); ``write(durable=False)`` the same without waiting for the
    disk on SQLite (see the module docstring); ``read()`` a session for queries only.
    """

    def __init__(self, url: str, *, pool_size: int = 20):
        self.url = check_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            kw = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
            if make_url(self.url).database in (None, "", ":memory:"):
                raise ValueError("--db: an in-memory SQLite database cannot be shared by the server's "
                                 "threads; give a file, e.g. sqlite:///annotate.db")
            def make(begin: str, synchronous: str) -> Engine:
                engine = create_engine(self.url, pool_size=pool_size, max_overflow=pool_size, **kw)
                _sqlite_setup(engine, begin=begin, synchronous=synchronous)
                return engine

            self.engine = make("BEGIN IMMEDIATE", "FULL")
            self.fast_engine = make("BEGIN IMMEDIATE", "NORMAL")
            self.read_engine = make("BEGIN", "NORMAL")
        else:
            self.engine = create_engine(self.url, pool_size=pool_size, max_overflow=pool_size,
                                        pool_pre_ping=True)
            self.fast_engine = self.read_engine = self.engine
        self._write_factory = sessionmaker(self.engine, expire_on_commit=False)
        self._fast_factory = sessionmaker(self.fast_engine, expire_on_commit=False)
        self._read_factory = sessionmaker(self.read_engine, expire_on_commit=False)
        # Reentrant: the label group commit holds it across its transaction (store._submit_grouped).
        self._write_lock = threading.RLock() if self.is_sqlite else contextlib.nullcontext()

    @contextlib.contextmanager
    def write(self, durable: bool = True) -> Iterator[Session]:
        factory = self._write_factory if durable else self._fast_factory
        with self._write_lock, factory() as session, session.begin():
            yield session

    def writer(self):
        """The in-process writer lock (reentrant; a no-op on PostgreSQL)."""
        return self._write_lock

    @contextlib.contextmanager
    def begin(self, *, write: bool = False, durable: bool = True) -> Iterator[Connection]:
        """A Core connection in a transaction, for the per-request paths: the same transactions as
        ``write()``/``read()`` without the ORM session's bookkeeping."""
        if not write:
            with self.read_engine.begin() as conn:
                yield conn
            return
        with self._write_lock, (self.engine if durable else self.fast_engine).begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._read_factory() as session, session.begin():
            yield session

    def dispose(self) -> None:
        for engine in {self.engine, self.fast_engine, self.read_engine}:
            engine.dispose()


def check_url(url: str) -> str:
    """Reject values that are not SQLAlchemy URLs with a message that shows the expected form."""
    if "://" not in url:
        raise ValueError(f"--db expects a database URL such as sqlite:///annotate.db or "
                         f"postgresql+psycopg://user:password@127.0.0.1/dbname, got {url!r}")
    try:
        make_url(url)
    except ArgumentError as e:
        raise ValueError(f"--db: cannot parse {url!r}: {e}") from None
    return url


def check_exists(url: str, hint: str) -> None:
    """Refuse a database that does not exist or holds no annotation schema (``hint`` says what to do).

    Checked before anything connects: opening a missing SQLite file creates it."""
    url = check_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.is_file() or path.stat().st_size == 0:
            raise ValueError(f"no annotation database at {path}: {hint}")
    db = Database(url, pool_size=1)
    try:
        if not has_schema(db):
            where = parsed.database if db.is_sqlite else parsed.render_as_string(hide_password=True)
            raise ValueError(f"no annotation database at {where} (it has no annotation schema): {hint}")
    finally:
        db.dispose()


def _sqlite_setup(engine: Engine, *, begin: str, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" event below issue BEGIN instead of the sqlite3 module.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        conn.exec_driver_sql(begin)


def alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (creating it on an empty database)."""
    from alembic import command

    # One transaction (DDL is transactional on SQLite and PostgreSQL): a failed upgrade changes nothing.
    with db._write_lock, db.engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.read_engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def has_schema(db: Database) -> bool:
    with db.read_engine.connect() as conn:
        return inspect(conn).has_table("alembic_version")
