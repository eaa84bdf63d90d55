"""Status polls (``GET /v1/jobs/{id}``) served from the per-process cache: same bytes, fresh, tenant-safe."""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.api import job_status
from app.api.schemas import JobPublic
from core.db.models import Job, JobState, utcnow
from tests.app.fixtures import ApiClient, session_scope
from tests.app.helpers import subject_with_photo


@pytest.fixture
def reads(monkeypatch):
    """Counts the polls that read the database (cache misses)."""
    calls: list[str] = []
    original = job_status.read_job

    def counting(settings, job_id):  # noqa: ANN001
        calls.append(job_id)
        return original(settings, job_id)

    monkeypatch.setattr(job_status, "read_job", counting)
    return calls


def _wait_live(app, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not app.state.job_status.live:
        assert time.monotonic() < deadline, "the job status listener did not connect"
        time.sleep(0.02)


def _eventually(check, timeout: float = 5.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def _running_job(client) -> str:  # noqa: ANN001
    subject_id = subject_with_photo(client)
    job_id = client.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.RUNNING, stage="training:stage1", progress=12.5, eta_s=301.0, started_at=utcnow(),
            attempts=1, worker="host:1", result={"intake": {"accepted": 7, "class_scores": {"man": 0.8125}}},
            error_message="Zwischenstand: ½ erledigt ✓ — \"quoted\" \\ \u2028 line"))
    return job_id


def _set(job_id: str, **values) -> None:  # noqa: ANN003
    """A change made by another process (a worker), through its own connection."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


@pytest.fixture(scope="module")
def slow_http(settings):
    """The route as it was before the cache: a sync handler, an ORM row and FastAPI's response_model."""
    from core.db.uow import UnitOfWork

    reference = FastAPI()

    @reference.get("/jobs/{job_id}", response_model=JobPublic)
    def get_job(job_id: str):
        with UnitOfWork(settings) as uow:
            return JobPublic.model_validate(uow.session.get(Job, job_id))

    with TestClient(reference) as http:
        yield http


def test_a_poll_returns_exactly_the_bytes_of_the_response_model_path(app, client_a, slow_http, reads):
    _wait_live(app)
    job_id = _running_job(client_a)
    expected = slow_http.get(f"/jobs/{job_id}")
    miss = client_a.get(f"/v1/jobs/{job_id}")
    polls = [client_a.get(f"/v1/jobs/{job_id}") for _ in range(5)]
    hit = polls[-1]
    assert miss.status_code == hit.status_code == 200
    assert miss.content == expected.content and all(p.content == expected.content for p in polls)
    assert miss.headers["content-type"] == expected.headers["content-type"]
    # Served from memory after the first read (a second one if the notification of the set-up's change came
    # in while the first read was in flight: that read is not kept).
    assert set(reads) == {job_id} and len(reads) <= 2
    assert hit.json()["error_message"].startswith("Zwischenstand")


def test_a_change_by_another_process_is_seen_by_the_next_poll(app, client_a, slow_http, reads):
    _wait_live(app)
    job_id = _running_job(client_a)
    assert client_a.get(f"/v1/jobs/{job_id}").json()["progress"] == 12.5
    for progress in (20.0, 33.33, 47.5):  # what the worker's progress writes do
        _set(job_id, progress=progress, eta_s=100.0 - progress)
        seen = _eventually(lambda p=progress: client_a.get(f"/v1/jobs/{job_id}").json()["progress"] == p)
        assert seen, f"progress {progress} never showed"
        assert client_a.get(f"/v1/jobs/{job_id}").content == slow_http.get(f"/jobs/{job_id}").content
    _set(job_id, state=JobState.SUCCEEDED, progress=100.0, finished_at=utcnow())
    assert _eventually(lambda: client_a.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded")
    # Each change costs one read; the polls in between come from memory.
    assert 4 <= len(reads) <= 10


def test_own_cancel_is_visible_at_once(app, client_a):
    _wait_live(app)
    job_id = _running_job(client_a)
    assert client_a.get(f"/v1/jobs/{job_id}").json()["cancel_requested"] is False  # cached now
    assert client_a.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    assert client_a.get(f"/v1/jobs/{job_id}").json()["cancel_requested"] is True  # no wait for the notification


def test_another_clients_job_is_404_cached_or_not(app, client_a, client_b):
    _wait_live(app)
    job_id = _running_job(client_a)
    unknown = client_b.get("/v1/jobs/" + "0" * 32)
    before = client_b.get(f"/v1/jobs/{job_id}")  # not cached yet
    assert client_a.get(f"/v1/jobs/{job_id}").status_code == 200  # cached now
    after = client_b.get(f"/v1/jobs/{job_id}")
    for response in (before, after):
        assert response.status_code == 404
        assert response.json() == {**unknown.json(), "details": {"job_id": job_id}}
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
    _set(job_id, state=JobState.CANCELED)  # deleted or changed: still nobody else's
    assert client_b.get(f"/v1/jobs/{job_id}").status_code == 404


def test_a_deleted_job_is_404_at_once(app, client_a):
    _wait_live(app)
    subject_id = subject_with_photo(client_a)
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    assert client_a.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client_a.delete(f"/v1/subjects/{subject_id}").status_code == 204
    assert _eventually(lambda: client_a.get(f"/v1/jobs/{job_id}").status_code == 404)


def test_without_its_listener_the_cache_serves_nothing(app, client_a, settings, reads):
    """The listener's connection is killed: polls read the database until it is back, never a stale answer."""
    import psycopg
    from sqlalchemy.engine import make_url

    _wait_live(app)
    job_id = _running_job(client_a)
    client_a.get(f"/v1/jobs/{job_id}")
    url = make_url(settings.resolved_database_url)
    with psycopg.connect(job_status._libpq_dsn(settings.resolved_database_url), autocommit=True) as conn:
        killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND "
                              "application_name = 'likeness-api-status-listener'", (url.database,)).fetchall()
    assert killed
    _set(job_id, progress=64.0)  # made while nobody listens
    assert _eventually(lambda: client_a.get(f"/v1/jobs/{job_id}").json()["progress"] == 64.0, timeout=0.5)
    _wait_live(app)  # reconnected: caching again, from fresh reads
    reads.clear()
    assert client_a.get(f"/v1/jobs/{job_id}").json()["progress"] == 64.0
    client_a.get(f"/v1/jobs/{job_id}")
    assert len(reads) <= 1


def test_a_read_that_raced_with_a_change_is_not_kept():
    cache = job_status.JobStatusCache()
    cache.set_live(True)
    ticket = cache.ticket()
    cache.drop("job")  # the notification of a change arrived while the read was in flight
    cache.put("job", "client", b"old", ticket)
    assert cache.get("job") is None
    cache.put("job", "client", b"new", cache.ticket())
    assert cache.get("job").body == b"new"
    cache.set_live(False)
    assert cache.get("job") is None


def test_embedded_mode_without_notifications_reads_every_poll(sqlite_db):
    """SQLite (embedded mode) has no LISTEN/NOTIFY: polls stay correct by reading the database each time."""
    from app.main import create_app
    from app.services.clients import create_client
    from core.config import get_settings
    from tests.app.helpers import create_subject, jpeg, upload

    with session_scope(sqlite_db) as session:
        row, key = create_client(session, "embedded", "app")
        client_id = row.id
    with TestClient(create_app(get_settings())) as http:
        client = ApiClient(client_id, key, http)
        subject_id = create_subject(client)
        assert upload(client, subject_id, [("a.jpg", jpeg())]).status_code == 201
        job_id = client.post(f"/v1/subjects/{subject_id}/train").json()["id"]
        assert http.app.state.job_status_listener is None and not http.app.state.job_status.live
        assert client.get(f"/v1/jobs/{job_id}").json()["progress"] == 0
        with session_scope(sqlite_db) as session:
            session.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING, progress=30.0))
        body = client.get(f"/v1/jobs/{job_id}").json()
        assert (body["state"], body["progress"]) == ("running", 30.0)


def test_polls_that_miss_together_share_one_read():
    """Right after a change every client of the job misses at once: one database read serves them all."""
    import asyncio

    cache = job_status.JobStatusCache()
    cache.set_live(True)
    reads: list[str] = []

    def reader(body: bytes):  # noqa: ANN202
        async def read():  # noqa: ANN202
            reads.append(body.decode())
            await asyncio.sleep(0.05)
            return "client", body
        return read

    async def scenario():  # noqa: ANN202
        first = [asyncio.ensure_future(cache.load("job", reader(b"before"))) for _ in range(50)]
        await asyncio.sleep(0.01)
        cache.drop("job")  # the job changed while that read was in flight: later polls need a new read
        later = [asyncio.ensure_future(cache.load("job", reader(b"after"))) for _ in range(50)]
        return await asyncio.gather(*first), await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert reads == ["before", "after"]
    assert {e.body for e in first} == {b"before"} and {e.body for e in later} == {b"after"}
    assert cache.get("job").body == b"after"  # the read that raced with the change was not kept


def test_a_listener_whose_notifications_do_not_arrive_does_not_serve(settings):
    """Behind a transaction pooler LISTEN is accepted but nothing is delivered: the probe must notice."""
    import asyncio

    import psycopg

    async def scenario() -> None:
        listener = job_status.JobChangeListener(job_status.JobStatusCache(), settings.resolved_database_url,
                                                check_s=0.5)
        conn = await psycopg.AsyncConnection.connect(listener.dsn, autocommit=True)
        try:
            with pytest.raises(ConnectionError):  # not listening: its own probe never comes back
                await listener._probe(conn, until_arrival=True)
            await conn.execute(f"LISTEN {job_status.CHANNEL}")
            await listener._probe(conn, until_arrival=True)
        finally:
            await conn.close()

    asyncio.run(scenario())
