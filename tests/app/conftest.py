"""Fixtures for API and data-layer tests (real PostgreSQL, real Redis broker, temp blobs).

Other test packages reuse them with ``from tests.app.conftest import *`` (fixtures
``pg_url``, ``settings``, ``app``, ``http``, ``make_client``, ``client_a``, ``client_b``,
``admin``, ``store``) — see ``tests/app/fixtures.py`` for the environment they set up.
"""

from __future__ import annotations

import pytest

from tests.app.fixtures import (  # noqa: F401 - re-exported for other test packages
    ApiClient,
    configure_test_environment,
    migrated_database,
    new_api_client,
)

configure_test_environment()

__all__ = ["ApiClient", "admin", "app", "client_a", "client_b", "http", "make_client", "pg_url", "settings", "store",
           "new_api_client"]


_database: dict = {"users": 0}


@pytest.fixture(scope="session")
def pg_url():
    """A fresh migrated PostgreSQL database for this test session (dropped at the end).

    Packages that import these fixtures get their own copy of this fixture from pytest, but one
    database: the first creates it, the last one done drops it.
    """
    if _database["users"] == 0:
        _database["created"] = migrated_database()
        _database["url"] = next(_database["created"])
    _database["users"] += 1
    yield _database["url"]
    _database["users"] -= 1
    if _database["users"] == 0:
        next(_database["created"], None)


@pytest.fixture(scope="session")
def settings(pg_url):
    from core.config import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def store(settings):
    from core.storage import get_blob_store

    return get_blob_store(settings)


@pytest.fixture(scope="session")
def app(settings):
    from app.main import create_app

    return create_app(settings)


@pytest.fixture(scope="session")
def http(app):
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def make_client(http):
    """Factory: ``make_client(role="app", max_candidates=64) -> ApiClient`` (a new client with its key)."""

    def make(role: str = "app", **kw) -> ApiClient:  # noqa: ANN003
        return new_api_client(http, role, **kw)

    return make


@pytest.fixture
def client_a(make_client) -> ApiClient:
    return make_client()


@pytest.fixture
def client_b(make_client) -> ApiClient:
    return make_client()


@pytest.fixture
def admin(make_client) -> ApiClient:
    return make_client("admin")
