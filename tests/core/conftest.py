"""Tests of the shared core (settings, database and migrations, blob storage, signing, webhooks,
retention), on the same real PostgreSQL, Redis and temp blobs as the API tests (tests/app's fixtures)."""

from tests.app.conftest import *  # noqa: F403 - pg_url, settings, app, http, make_client, client_a, admin, store
