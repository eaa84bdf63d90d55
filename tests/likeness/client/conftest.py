"""The client against the real app in-process (PostgreSQL, Redis broker, temp blobs): tests/app's fixtures."""

from tests.app.conftest import *  # noqa: F403 - pg_url, settings, app, http, make_client, client_a, client_b, store
