"""Alembic environment: runs against ``sqlalchemy.url`` set by ``core.db.migrate`` or the settings."""

from __future__ import annotations

from alembic import context

from core.db.models import Base
from core.db.session import get_engine, normalize_url

config = context.config
target_metadata = Base.metadata


def _url() -> str | None:
    url = config.get_main_option("sqlalchemy.url")
    return normalize_url(url) if url else None


def run_migrations_offline() -> None:
    from core.config import get_settings

    context.configure(url=_url() or normalize_url(get_settings().resolved_database_url),
                      target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    with get_engine(_url()).connect() as connection:
        _run(connection)


def _run(connection) -> None:  # noqa: ANN001
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
