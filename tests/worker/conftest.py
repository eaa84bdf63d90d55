"""Worker fixtures: a migrated SQLite database as the process default (what embedded mode uses),
jobs in any state, and a recording queue port instead of a broker."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest


@pytest.fixture
def sqlite_db(tmp_path, monkeypatch):
    """A migrated SQLite database as the process-wide default (what embedded mode uses)."""
    from core.config import get_settings
    from core.db.migrate import upgrade_to_head
    from core.db.session import dispose_engines

    for name in [k for k in os.environ if k.startswith("LIKENESS_")]:  # other test packages set some
        monkeypatch.delenv(name)
    monkeypatch.setenv("LIKENESS_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    upgrade_to_head()
    yield get_settings().resolved_database_url
    dispose_engines()
    get_settings.cache_clear()


def make_job(attempts=0, max_attempts=3, state="queued", worker=None, heartbeat_age_s=None) -> str:
    from core.db.models import Job, JobKind, JobState, utcnow
    from tests.app.fixtures import client_and_subject, session_scope

    with session_scope() as session:
        client, subject = client_and_subject(session)
        job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.TRAIN, state=JobState(state),
                  attempts=attempts, max_attempts=max_attempts, worker=worker, completed_stages=[],
                  heartbeat_at=None if heartbeat_age_s is None else utcnow() - timedelta(seconds=heartbeat_age_s))
        session.add(job)
        session.flush()
        return job.id


def subject_with_photos(settings, photos: list[bytes]) -> tuple[str, str]:  # noqa: ANN001
    """A client and a subject whose photos are stored as uploads leave them; returns (client id, subject id)."""
    from core.db.models import Photo
    from core.storage import get_blob_store, photo_original_key
    from tests.app.fixtures import client_and_subject, session_scope

    store = get_blob_store(settings)
    with session_scope() as session:
        client, subject = client_and_subject(session)
        for data in photos:
            photo = Photo(subject_id=subject.id, original_key="", format="jpeg", width=1, height=1)
            session.add(photo)
            session.flush()
            photo.original_key = photo_original_key(subject.id, photo.id, "jpg")
            store.put(photo.original_key, data)
        return client.id, subject.id


def read_job(job_id):
    from core.db.models import Job
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return session.get(Job, job_id)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def settings_with(**changes):
    from core.config import get_settings

    return get_settings().model_copy(update=changes)


class RecordingQueue:
    """The queue port, recording what would have been sent."""

    def __init__(self):
        self.sent = []

    def send(self, task, args, queue, countdown=None):  # noqa: ANN001
        self.sent.append((str(task), list(args), str(queue)))


@pytest.fixture
def queue(monkeypatch) -> RecordingQueue:
    recording = RecordingQueue()
    monkeypatch.setattr("core.db.uow.task_queue", lambda settings=None: recording)  # where the outbox sends
    return recording

