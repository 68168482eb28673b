"""Engines, sessions and schema migration.

`init_db(engine)` runs Alembic's `upgrade head` programmatically (migrations live in
`app/store/migrations/`). Two processes may start at once (the API and the worker): on SQLite the
upgrade holds an exclusive file lock next to the database; on PostgreSQL a transaction-scoped
advisory lock. The loser waits, then finds the schema at head and does nothing.

A change to `app/store/tables.py` needs a new revision in `app/store/migrations/versions/`
(`python -m app.store.db revision "message"` autogenerates one against a scratch database);
`tests/store/test_db.py` fails while the models and the migrations disagree.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from app.store.storage import StorageFullError, full_message, is_storage_full

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x70726566  # "pref"


def normalize_url(url: str) -> str:
    """`postgres://` and `postgresql://` use psycopg 3."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def _raise_storage_full(engine: Engine) -> None:
    """A write the database had no room for (SQLITE_FULL, PostgreSQL's disk_full) surfaces as
    `StorageFullError`, in the API and the workers alike."""

    @event.listens_for(engine, "handle_error")
    def _storage_full(context):  # noqa: ANN001
        if is_storage_full(context.original_exception):
            raise StorageFullError(full_message()) from context.sqlalchemy_exception


def make_engine(url: str, **kwargs) -> Engine:
    engine = _make_engine(url, **kwargs)
    _raise_storage_full(engine)
    return engine


def _make_engine(url: str, **kwargs) -> Engine:
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            if u.database and u.database != ":memory:":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def init_db(engine: Engine) -> None:
    """Bring the schema to head. Safe when several processes start at once."""
    from alembic import command

    backend = engine.url.get_backend_name()
    if backend == "sqlite":
        db = engine.url.database
        lock = _file_lock(Path(db + ".migrate.lock")) if db and db != ":memory:" else contextlib.nullcontext()
        with lock, engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
    elif backend == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            command.upgrade(alembic_config(conn), "head")
    else:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _autogenerate(message: str) -> None:  # pragma: no cover - developer tool
    """Write a new revision: diff the models against a scratch SQLite database at head."""
    import tempfile

    from alembic import command

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/scratch.db")
        init_db(engine)
        with engine.begin() as conn:
            command.revision(alembic_config(conn), message=message, autogenerate=True)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) >= 3 and sys.argv[1] == "revision":
        _autogenerate(" ".join(sys.argv[2:]))
    else:
        print("usage: python -m app.store.db revision MESSAGE", file=os.sys.stderr)
        sys.exit(2)
