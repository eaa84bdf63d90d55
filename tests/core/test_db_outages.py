"""Which database errors a caller waits out (a server away) and which it reports at once (a wrong schema)."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from core.db.session import database_unavailable


def _error_of(url: str, statement: str) -> BaseException:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    except Exception as exc:  # noqa: BLE001 - the error under test
        return exc
    finally:
        engine.dispose()
    raise AssertionError("the statement succeeded")


def test_an_unmigrated_sqlite_database_is_an_error_not_an_outage(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    assert not database_unavailable(_error_of(url, "SELECT name FROM workers"))
    assert not database_unavailable(_error_of(url, "SELECT nope FROM sqlite_master"))


def test_a_locked_sqlite_database_and_an_unreachable_server_are_outages(tmp_path):
    import sqlite3

    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = _error_of(f"sqlite:///{path}?timeout=0.1", "SELECT x FROM t")
    finally:
        holder.close()
    assert database_unavailable(locked) and "locked" in str(locked)
    from tests.faults.servers import free_port

    refused = _error_of(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=2", "SELECT 1")
    assert database_unavailable(refused)


def test_a_missing_postgres_table_is_an_error_not_an_outage(pg_url):
    assert not database_unavailable(_error_of(pg_url, "SELECT * FROM no_such_table_here"))
