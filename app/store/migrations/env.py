"""Alembic environment. Called through `app.store.db.init_db` with a live connection in
`config.attributes["connection"]`; falls back to `Settings().resolved_database_url` otherwise."""

from __future__ import annotations

from alembic import context

import app.store.eval_tables  # noqa: F401  (its tables join Base.metadata)
from app.config import get_settings
from app.store.db import make_engine
from app.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # pragma: no cover - `alembic` CLI use

    engine = make_engine(get_settings().resolved_database_url)
    with engine.begin() as conn:
        _run(conn)
