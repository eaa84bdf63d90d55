from __future__ import annotations

import json
import secrets

from sqlalchemy import inspect

from tests.app.fixtures import create_database, drop_database

TABLES = {"clients", "subjects", "photos", "jobs", "adapters", "images", "webhook_deliveries", "idempotency_records"}


def test_migrations_run_up_and_down_on_postgres(pg_url):
    from core.db.migrate import current_revision, downgrade_to_base, upgrade_to_head
    from core.db.session import get_engine

    dbname = f"likeness_test_mig_{secrets.token_hex(4)}"
    url = create_database(dbname)
    try:
        upgrade_to_head(url)
        assert TABLES <= set(inspect(get_engine(url)).get_table_names())
        assert current_revision(url) is not None
        downgrade_to_base(url)
        assert set(inspect(get_engine(url)).get_table_names()) <= {"alembic_version"}
        assert current_revision(url) is None
        upgrade_to_head(url)  # and back up again
        assert TABLES <= set(inspect(get_engine(url)).get_table_names())
        get_engine(url).dispose()
    finally:
        drop_database(dbname)


def test_migrations_match_the_models(pg_url):
    """No model change without a migration: autogenerate against head finds nothing to do."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from core.db.models import Base
    from core.db.session import get_engine

    with get_engine(pg_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_embedded_sqlite_database_migrates_and_cascades(tmp_path):
    from core.db.migrate import upgrade_to_head
    from core.db.models import Client, Photo, Subject
    from tests.app.fixtures import session_scope

    url = f"sqlite:///{tmp_path / 'db' / 'likeness.sqlite3'}"
    upgrade_to_head(url)
    with session_scope(url) as session:
        client = Client(name="c", api_key_hash="h" * 64)
        session.add(client)
        session.flush()
        subject = Subject(client_id=client.id, name="s")
        session.add(subject)
        session.flush()
        session.add(Photo(subject_id=subject.id, original_key="k", format="jpeg", width=1, height=1))
    with session_scope(url) as session:
        session.delete(session.get(Subject, subject.id))
    with session_scope(url) as session:
        assert session.query(Photo).count() == 0
    from core.db import session as db_session

    db_session._ENGINES.pop(db_session.normalize_url(url)).dispose()


def test_template_jobs_get_their_template_photo_column_from_their_request(tmp_path):
    """0007 fills ``jobs.template_photo_id`` of existing template jobs from ``request["source"]``."""
    import sqlalchemy as sa
    from alembic import command

    from core.db.migrate import alembic_config, upgrade_to_head
    from core.db.session import get_engine, normalize_url

    url = f"sqlite:///{tmp_path / 'likeness.sqlite3'}"
    command.upgrade(alembic_config(url), "0006_sealed_webhook_secrets")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO clients (id, name, role, api_key_hash, max_candidates, created_at) "
                             "VALUES ('c', 'c', 'app', 'h', 8, '2026-01-01')"))
        conn.execute(sa.text("INSERT INTO subjects (id, client_id, name, created_at) "
                             "VALUES ('s', 'c', 's', '2026-01-01')"))
        conn.execute(sa.text("INSERT INTO template_photos (id, subject_id, key, format, width, height, status, "
                             "created_at) VALUES ('p', 's', 'k', 'jpeg', 1, 1, 'pending', '2026-01-01')"))
        for job_id, kind, source in (("upload", "template", {"kind": "upload", "photo_id": "p"}),
                                     ("gone", "template", {"kind": "upload", "photo_id": "deleted"}),
                                     ("shipped", "template", {"kind": "shipped", "name": "astronaut", "version": 1}),
                                     ("train", "train", None)):
            request = json.dumps({"kind": kind, **({"source": source} if source else {})})
            conn.execute(sa.text("INSERT INTO jobs (id, client_id, subject_id, kind, state, progress, attempts, "
                                 "max_attempts, cancel_requested, request, completed_stages, created_at, updated_at) "
                                 "VALUES (:id, 'c', 's', :kind, 'succeeded', 100, 1, 3, 0, :request, '[]', "
                                 "'2026-01-01', '2026-01-01')"), {"id": job_id, "kind": kind, "request": request})
    upgrade_to_head(url)
    with engine.connect() as conn:
        filled = dict(conn.execute(sa.text("SELECT id, template_photo_id FROM jobs")).all())
    assert filled == {"upload": "p", "gone": None, "shipped": None, "train": None}
    from core.db import session as db_session

    db_session._ENGINES.pop(normalize_url(url)).dispose()
