"""Reusable test infrastructure for anything that talks to the API or the database.

Importing this module configures the process for tests (``LIKENESS_*`` variables, each
only if not already set): a fresh PostgreSQL database name ``likeness_test_<random>``,
the local Redis as broker with a random ``queue_prefix``, blobs in a temp folder. Import
it before ``worker.celery_app`` (``tests/app/conftest.py`` does), then use the fixtures.

The database itself is created (and migrated, and dropped at the end) by the
``pg_url`` session fixture.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.orm import Session

PG_HOST = os.environ.get("LIKENESS_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LIKENESS_TEST_PG_PORT", "5432"))
REDIS_URL = os.environ.get("LIKENESS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _pg_user() -> str:
    for user in (os.environ.get("LIKENESS_TEST_PG_USER"), "postgres", "root"):
        if not user:
            continue
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", connect_timeout=3):
                return user
        except psycopg.OperationalError:
            continue
    raise RuntimeError(f"no PostgreSQL at {PG_HOST}:{PG_PORT} accepting user postgres or root")


def pg_admin_connection() -> psycopg.Connection:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=_pg_user(), dbname="postgres", autocommit=True)


def pg_url_for(dbname: str) -> str:
    return f"postgresql+psycopg://{_pg_user()}@{PG_HOST}:{PG_PORT}/{dbname}"


def create_database(dbname: str) -> str:
    with pg_admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    return pg_url_for(dbname)


def drop_database(dbname: str) -> None:
    with pg_admin_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


#: "<pid> <names>": the variables :func:`configure_test_environment` chose, and in which process
_CHOSEN = "LIKENESS_TEST_ENV_CHOSEN_BY"


def configure_test_environment() -> None:
    """Point settings at a fresh test DB name, the local Redis, a random queue prefix and temp blobs.

    Each process gets its own: what another test process chose and this one inherited (a pytest-xdist
    worker started by a controller that imported this) is chosen anew; what the user set is kept.
    """
    pid, _, names = os.environ.pop(_CHOSEN, "").partition(" ")
    ours = pid == str(os.getpid())
    if pid and not ours:
        for name in names.split():
            os.environ.pop(name, None)
    run_id = secrets.token_hex(4)
    tmp = Path(tempfile.mkdtemp(prefix=f"likeness-test-{run_id}-"))
    defaults = {
        "LIKENESS_ENVIRONMENT": "test",
        "LIKENESS_DATABASE_URL": pg_url_for(f"likeness_test_{run_id}"),
        "LIKENESS_BROKER_URL": REDIS_URL,
        "LIKENESS_REDIS_URL": REDIS_URL,
        "LIKENESS_QUEUE_PREFIX": f"test-{run_id}-",
        "LIKENESS_DATA_DIR": str(tmp),
        "LIKENESS_STORAGE_DIR": str(tmp / "blobs"),
        "LIKENESS_SECRET_KEY": "test-secret-" + run_id,
        "LIKENESS_MODEL_PRESET": "tiny",  # never `auto`: weights a developer pulled stay unused
        # Every test client shares one address and many tests one client: the shipped defaults (checked in
        # tests/app/test_keys_and_limits.py) are lifted; each limit's own test sets it.
        "LIKENESS_AUTH_FAILURES_PER_MINUTE": "0",
        **{f"LIKENESS_DEFAULT_{limit}": "none"
           for limit in ("REQUESTS_PER_MINUTE", "MAX_CONCURRENT_JOBS", "MAX_TRAININGS_PER_DAY", "MAX_STORAGE_BYTES")},
    }
    chosen = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in chosen})
    os.environ[_CHOSEN] = " ".join([str(os.getpid()), *(names.split() if ours else []), *chosen])
    from core.config import get_settings

    get_settings.cache_clear()


@dataclass
class ApiClient:
    """A client row plus an HTTP client that sends its key."""

    id: str
    key: str
    http: object  # fastapi.testclient.TestClient

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, url: str, **kw):  # noqa: ANN003, ANN201
        return self.http.get(url, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, url: str, **kw):  # noqa: ANN003, ANN201
        return self.http.post(url, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def put(self, url: str, **kw):  # noqa: ANN003, ANN201
        return self.http.put(url, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def delete(self, url: str, **kw):  # noqa: ANN003, ANN201
        return self.http.delete(url, headers={**self.headers, **kw.pop("headers", {})}, **kw)


@contextlib.contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A committed transaction for test set-up and checks: the app's unit of work on ``url``."""
    from core.config import get_settings
    from core.db.uow import UnitOfWork

    settings = get_settings() if url is None else get_settings().model_copy(update={"database_url": url})
    with UnitOfWork(settings) as uow:
        yield uow.session


def client_and_subject(session: Session, client_name: str = "c", subject_name: str = "s"):  # noqa: ANN201
    """A client row (a random key hash) and a subject of it, flushed: ``(client, subject)``."""
    from core.db.models import Client, Subject

    client = Client(name=client_name, api_key_hash=os.urandom(16).hex())
    session.add(client)
    session.flush()
    subject = Subject(client_id=client.id, name=subject_name)
    session.add(subject)
    session.flush()
    return client, subject


def new_api_client(http, role: str = "app", name: str | None = None, max_candidates: int = 64) -> ApiClient:  # noqa: ANN001
    from app.services.clients import create_client

    with session_scope() as session:
        client, key = create_client(session, name or f"test-{secrets.token_hex(3)}", role,
                                    max_candidates=max_candidates)
        client_id = client.id
    return ApiClient(client_id, key, http)


def migrated_database() -> Iterator[str]:
    """Create the configured test database, migrate it to head, drop it afterwards."""
    from sqlalchemy.engine import make_url

    from core.config import get_settings
    from core.db.migrate import upgrade_to_head
    from core.db.session import dispose_engines

    url = get_settings().resolved_database_url
    dbname = make_url(url).database
    assert dbname and dbname.startswith("likeness_test_"), f"refusing to use {dbname!r} as a throwaway test DB"
    create_database(dbname)
    try:
        upgrade_to_head(url)
        yield url
    finally:
        dispose_engines()
        drop_database(dbname)
