"""Engine and session factory for PostgreSQL (psycopg 3) and SQLite (embedded mode)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.config import get_settings
from core.private_files import private_file


@functools.lru_cache(maxsize=64)
def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> the psycopg 3 driver; anything else unchanged."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


#: seconds a new PostgreSQL connection may take (libpq's ``connect_timeout``)
CONNECT_TIMEOUT_S = 3
#: seconds a request waits for a pooled connection before it is answered 503
POOL_TIMEOUT_S = 10

_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE needs it
            cur.execute("PRAGMA secure_delete=ON")  # a deleted row's bytes are overwritten, not left in free pages
            cur.execute("PRAGMA journal_mode=WAL")  # API and worker processes share the file
            cur.close()
            if database:
                private_file(Path(database))  # personal data: 600 (its -wal and -shm follow its mode)

        return engine
    # A restarted or unreachable server must cost a request seconds, never minutes: pooled connections
    # are pinged before use (the first request after a restart gets a fresh one), a connect gives up
    # after CONNECT_TIMEOUT_S, a dead peer is noticed by TCP keepalives, and a request waits at most
    # POOL_TIMEOUT_S for a free connection. Each failure is a 503 (``database_unavailable``).
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=POOL_TIMEOUT_S,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "keepalives": 1, "keepalives_idle": 10,
                                       "keepalives_interval": 5, "keepalives_count": 3})


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
    :class:`core.db.uow.UnitOfWork`, which owns one of these."""
    return _factory(bind=get_engine(url))


def scrub_deleted(url: str | None = None) -> None:
    """After personal data was deleted from the embedded database: copy the write-ahead log into the
    database file (whose deleted cells ``secure_delete`` zeroes) and truncate the log, so no deleted row
    survives in either file. PostgreSQL: nothing (its autovacuum reclaims dead rows)."""
    engine = get_engine(url)
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def dispose_engines() -> None:
    """Close every pooled connection (tests dropping their database, forked workers)."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


def _missing_schema(error: BaseException | None) -> bool:
    """SQLite reports a missing table or column as an OperationalError (PostgreSQL: a ProgrammingError)."""
    import sqlite3

    return isinstance(error, sqlite3.OperationalError) and str(error).startswith(("no such table", "no such column"))


def database_unavailable(exc: BaseException) -> bool:
    """``exc`` says the database cannot be used right now (refused or lost connection, server shutting
    down, no free pooled connection), not that the statement was wrong: a retry later may succeed."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if _missing_schema(exc.orig):  # an unmigrated database: waiting will not create its tables
            return False
        return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
    if isinstance(exc, sa_exc.TimeoutError):  # the pool's
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
