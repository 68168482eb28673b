"""Migrations: head matches app/store/tables.py, and two processes may migrate at once."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import inspect, text

from app.store.db import init_db, make_engine
from app.store.tables import Base

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _diff(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_sqlite_head_matches_models(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/a.db")
    init_db(engine)
    init_db(engine)  # idempotent
    assert _diff(engine) == [], "models.py changed: add a revision (python -m app.store.db revision MSG)"
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)


def concurrent_init(url: str, n: int = 3) -> None:
    """n engines (as n processes would have) migrate at once; the locks make all but one wait."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run():
        engine = make_engine(url)
        try:
            barrier.wait()
            init_db(engine)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_sqlite_concurrent_init(tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    concurrent_init(url)
    assert _diff(make_engine(url)) == []


@pytest.fixture
def pg_url():
    try:
        import psycopg

        conn = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=3)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable: {e}")
    name = f"prefixd_test_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def test_postgres_concurrent_init_and_head_matches(pg_url):
    concurrent_init(pg_url)
    engine = make_engine(pg_url)
    try:
        assert _diff(engine) == []
    finally:
        engine.dispose()
