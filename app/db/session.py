"""Engine and session factory for PostgreSQL (psycopg 3) and SQLite (embedded mode)."""

from __future__ import annotations

import functools
import threading

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings


@functools.lru_cache(maxsize=64)
def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> the psycopg 3 driver; anything else unchanged."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE needs it
            cur.execute("PRAGMA journal_mode=WAL")  # API and worker processes share the file
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=False, pool_size=10, max_overflow=20)


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the configured database)."""
    url = normalize_url(url or get_settings().resolved_database_url)
    with _ENGINES_LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = _create_engine(url)
        return _ENGINES[url]


_factory = sessionmaker(expire_on_commit=False)


def SessionLocal(url: str | None = None) -> Session:  # noqa: N802 - conventional factory name
    """A new session on the configured database (or ``url``). Business operations use
    :class:`app.db.uow.UnitOfWork`, which owns one of these."""
    return _factory(bind=get_engine(url))


def dispose_engines() -> None:
    """Close every pooled connection (tests dropping their database, forked workers)."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()
