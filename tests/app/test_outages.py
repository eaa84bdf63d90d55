"""A dependency down: what a client sees (503 with Retry-After and a code, or 202 for work the outbox
will send), never a 500, never a long hang. The same faults with real processes: ``tests/faults``."""

from __future__ import annotations

import errno
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.app.fixtures import session_scope
from tests.app.helpers import create_subject, jpeg, subject_with_photo, upload
from tests.faults.servers import free_port


@pytest.fixture
def app_with(settings):
    """``app_with(**overrides)``: a second app on the same database, with some settings changed."""
    from app.main import create_app

    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:  # noqa: ANN003
        client = TestClient(create_app(settings.model_copy(update=overrides)), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_database_down_is_503_with_retry_after_on_every_route(app_with, client_a):
    subject_id = create_subject(client_a)
    down = app_with(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere")
    headers = client_a.headers
    calls = [("GET", f"/v1/jobs/{'0' * 32}", None), ("GET", f"/v1/subjects/{subject_id}", None),
             ("GET", "/v1/subjects", None), ("POST", "/v1/subjects", {"name": "x"}),
             ("POST", f"/v1/subjects/{subject_id}/train", {})]
    for method, path, body in calls:
        started = time.monotonic()
        response = down.request(method, path, headers=headers, json=body)
        assert time.monotonic() - started < 10, (method, path)
        assert response.status_code == 503, (method, path, response.status_code, response.text)
        body = response.json()
        assert body["code"] == "database_unavailable" and body["message"], body
        assert int(response.headers["Retry-After"]) > 0
    # an upload too: nothing half-stored
    assert upload(down, subject_id, [("a.jpg", jpeg())], headers=headers).status_code == 503
    # a key not in the auth cache is looked up in the database: unavailable, not unknown (401)
    unknown = down.get("/v1/subjects", headers={"Authorization": "Bearer lk_not_cached_anywhere"})
    assert unknown.status_code == 503 and unknown.json()["code"] == "database_unavailable"


def test_broker_down_train_answers_202_at_once_and_leaves_the_message_in_the_outbox(app_with, client_a, settings):
    from core.db.models import OutboxMessage

    subject_id = subject_with_photo(client_a)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    down = app_with(broker_url=dead)
    started = time.monotonic()
    response = down.post(f"/v1/subjects/{subject_id}/train", json={"steps": 10}, headers=client_a.headers)
    took = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert took < 3, f"the train request took {took:.1f} s with the broker down"
    job_id = response.json()["id"]
    with session_scope() as session:
        waiting = session.scalars(select(OutboxMessage).where(OutboxMessage.args == [job_id])).all()
    assert [m.task for m in waiting] == ["likeness.run_job"]  # the recovery sweep sends it when the broker is back
    assert client_a.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"


def test_blob_store_unwritable_is_503_and_stores_nothing(client_a, store, monkeypatch):
    import os

    from core.db.models import Photo

    subject_id = create_subject(client_a)
    real_replace, writes = os.replace, []

    def disk_full_after_one(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not str(dst).startswith(str(store.root)):
            return real_replace(src, dst, *args, **kwargs)
        if writes:  # the second blob of the request: the disk is full now
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(os.path.relpath(dst, store.root))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full_after_one)
    response = upload(client_a, subject_id, [("a.jpg", jpeg(seed=1)), ("b.jpg", jpeg(seed=2))])
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "storage_unavailable" and int(response.headers["Retry-After"]) > 0
    assert "No space" not in response.text  # nothing of the server's internals
    assert writes and not any(store.exists(key) for key in writes)  # the first file's blob was removed again
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Photo).where(Photo.subject_id == subject_id)) == 0
