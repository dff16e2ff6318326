"""Alembic's entry point for the job database; app.jobs.migrate runs it from code.

Called with a connection in ``config.attributes["connection"]`` (app.jobs.migrate holds
the transaction and, on PostgreSQL, the migration lock). Run by the ``alembic`` command
line (root alembic.ini), it connects to the URL in the ini, else to the service's own
database (LOWERING_DATABASE_URL, or jobs.db in LOWERING_DATA_DIR).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, MetaData

from app.jobs import models

config = context.config
# Tests pass a changed copy here to show that ``check`` notices drift.
target_metadata: MetaData = config.attributes.get("target_metadata", models.metadata)


def _run(connection: Connection) -> None:
    # SQLite cannot ALTER most things: batch mode copies the table instead.
    context.configure(connection=connection, target_metadata=target_metadata,
                      compare_type=True, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from app.settings import Settings

    return Settings().db_url


if context.is_offline_mode():
    url = _url()
    context.configure(url=url, literal_binds=True, target_metadata=target_metadata,
                      compare_type=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _run(connection)
else:
    from app.jobs.store import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()
