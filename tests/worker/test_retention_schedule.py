"""The retention purge is scheduled: Celery beat sends it in distributed mode, the embedded worker's
timer runs it itself (on a real embedded SQLite database, deleting a photo past its retention)."""

from __future__ import annotations

import time
from datetime import timedelta

from core.config import Settings
from core.queue import celery_config
from likeness.contract.plan import Task


def test_beat_schedules_the_purge_on_the_cpu_queue(tmp_path):
    settings = Settings(broker_url="redis://127.0.0.1:6379/0", queue_prefix="p-", purge_interval_s=900,
                        data_dir=tmp_path)
    entry = celery_config(settings)["beat_schedule"]["retention-purge"]
    assert entry["task"] == Task.PURGE_EXPIRED and entry["schedule"] == 900.0
    assert entry["options"]["queue"] == "p-cpu"
    from worker.celery_app import celery_app
    from worker.tasks import purge_expired  # noqa: F401 - registers the task

    assert Task.PURGE_EXPIRED in celery_app.tasks


def test_the_embedded_worker_purges_on_its_own_timer(sqlite_db, tmp_path):
    from sqlalchemy import select

    from app.services.clients import create_client
    from app.services.subjects import create_subject
    from core.config import get_settings
    from core.db.models import Photo, utcnow
    from core.storage import get_blob_store, photo_original_key
    from tests.app.fixtures import session_scope
    from worker.retention import PeriodicPurge

    settings = get_settings()
    assert settings.embedded
    store = get_blob_store(settings)
    with session_scope() as session:
        client, _ = create_client(session, "app", "app")
        subject = create_subject(session, client, "s")  # Caller-like: only .id is read
        photo = Photo(subject_id=subject.id, original_key="", format="jpeg", width=1, height=1,
                      created_at=utcnow() - timedelta(days=31))
        session.add(photo)
        session.flush()
        photo.original_key = photo_original_key(subject.id, photo.id)
        key = photo.original_key
    store.put(key, b"jpeg")

    def photo_rows() -> list:
        with session_scope() as session:
            return session.scalars(select(Photo)).all()

    timer = PeriodicPurge(3600, settings, first_delay_s=0).start()
    try:  # the purge deletes the blob, then the row: wait for both
        deadline = time.monotonic() + 30
        while (store.exists(key) or photo_rows()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        timer.stop()
    assert not store.exists(key)
    with session_scope() as session:
        assert session.scalars(select(Photo)).all() == []
