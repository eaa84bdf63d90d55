"""Job lifecycle through a real Celery worker, Redis and PostgreSQL (scripted, timed job plan).

What a client would notice: a job moves queued -> running -> succeeded through its named
stages with progress that never goes back; cancel stops it; a worker killed with SIGKILL
never leaves it ``running``; webhooks arrive signed, even after the receiver failed.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db.models import Client, Job, JobKind, JobState, Subject, WebhookDelivery
from tests.app.fixtures import session_scope
from tests.integration.conftest import WorkerProcess, enqueue, own_database, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lifecycle_db() -> Iterator[str]:
    """This module's own database: its tests kill workers, and another module's workers must not sweep the
    lost jobs (nor these workers theirs)."""
    with own_database("lifecycle") as url:
        yield url


@pytest.fixture(scope="module")
def lifecycle_env(it_env, lifecycle_db) -> dict[str, str]:
    return {**it_env, "LIKENESS_DATABASE_URL": lifecycle_db}


@pytest.fixture(scope="module")
def lifecycle_settings(it_settings, lifecycle_db):
    return it_settings.model_copy(update={"database_url": lifecycle_db})


@pytest.fixture(scope="module")
def lifecycle_worker(lifecycle_env, lifecycle_settings, tmp_path_factory) -> Iterator[WorkerProcess]:
    """One worker on both queues running the scripted job plan, shared by the lifecycle tests."""
    queues = f"{lifecycle_settings.queue('gpu')},{lifecycle_settings.queue('cpu')}"
    log_path = tmp_path_factory.mktemp("logs") / "lifecycle-worker.log"
    worker = WorkerProcess("tests.integration.lifecycle_app", lifecycle_env, queues, log_path).start()
    yield worker
    worker.stop()


@pytest.fixture
def make_job(lifecycle_db, lifecycle_settings, sender):
    def make(*, webhook_url: str | None = None, secret: str | None = None, max_attempts: int = 3) -> str:
        from core import sealed

        with session_scope(lifecycle_db) as session:
            client = Client(name="it", api_key_hash=os.urandom(16).hex(), webhook_url=webhook_url,
                            webhook_secret=sealed.seal(lifecycle_settings, secret) if secret else None)
            session.add(client)
            session.flush()
            subject = Subject(client_id=client.id, name="grace")
            session.add(subject)
            session.flush()
            job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.TRAIN, request={},
                      max_attempts=max_attempts, completed_stages=[])
            session.add(job)
            session.flush()
            job_id = job.id
        enqueue(sender, lifecycle_settings, job_id, "cpu")
        return job_id

    return make


def read_job(lifecycle_db: str, job_id: str) -> Job:
    with session_scope(lifecycle_db) as session:
        return session.get(Job, job_id)


def phase_runs(lifecycle_settings, job_id: str) -> list[str]:
    path = Path(lifecycle_settings.data_dir) / "phase_runs.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split()[1] for line in lines if line.startswith(job_id)]


def watch(lifecycle_db: str, job_id: str, until: set[str], timeout_s: float = 60) -> list[tuple[str, str, float]]:
    """(state, stage, progress) samples until the job reaches a state in ``until``."""
    samples: list[tuple[str, str, float]] = []

    def done() -> bool:
        job = read_job(lifecycle_db, job_id)
        samples.append((job.state.value, job.stage, job.progress))
        return job.state.value in until

    wait_for(done, timeout_s, 0.05, f"job {job_id} to reach {until}")
    return samples


def test_job_runs_through_named_stages_with_monotonic_progress(lifecycle_worker, make_job, lifecycle_db,
                                                               lifecycle_settings):
    job_id = make_job()
    samples = watch(lifecycle_db, job_id, {"succeeded", "failed"})
    job = read_job(lifecycle_db, job_id)
    assert job.state == JobState.SUCCEEDED, (job.error_code, job.error_message, lifecycle_worker.log()[-3000:])
    assert job.progress == 100.0 and job.attempts == 1 and job.finished_at is not None
    assert job.completed_stages == ["intake", "caching", "training:stage1", "training:stage2", "selecting"]
    seen = [stage for _, stage, _ in samples if stage]
    order = list(dict.fromkeys(seen))
    assert order == ["intake", "caching", "training:stage1", "training:stage2", "selecting"][-len(order):]
    assert len(order) >= 3  # polled fast enough to see most stages
    progresses = [p for _, _, p in samples]
    assert progresses == sorted(progresses), "progress went backwards"
    assert job.result["training"]["steps"] == 20


def test_cancel_stops_a_running_job_at_the_next_step(lifecycle_worker, make_job, lifecycle_db):
    job_id = make_job()
    wait_for(lambda: read_job(lifecycle_db, job_id).stage == "caching", 30, 0.05, "training to start")
    with session_scope(lifecycle_db) as session:
        asked = session.get(Job, job_id)
        asked.cancel_requested = True
        asked_in = asked.stage
    watch(lifecycle_db, job_id, {"canceled", "succeeded", "failed"}, timeout_s=30)
    job = read_job(lifecycle_db, job_id)
    assert job.state == JobState.CANCELED and job.error_code == "canceled"
    # at a step boundary of the stage it was asked in (the worker checks once a second and at each stage's
    # start; a stage is ten 0.1 s steps) or at the latest of the next one, never at the end of the job
    stages = ["intake", "caching", "training:stage1", "training:stage2"]
    assert stages.index(job.stage) - stages.index(asked_in) <= 1, (asked_in, job.stage)
    assert job.completed_stages == ["intake"]  # a phase counts as done whole: the training phase was cut short
    assert job.progress < 100 and "training:stage2" not in job.completed_stages


def test_pool_process_killed_mid_job_resumes_from_last_completed_stage(lifecycle_worker, make_job, lifecycle_db,
                                                                       lifecycle_settings):
    job_id = make_job()
    wait_for(lambda: read_job(lifecycle_db, job_id).stage == "training:stage1", 30, 0.05, "training:stage1")
    owner = read_job(lifecycle_db, job_id).worker
    os.kill(int(owner.rsplit(":", 1)[1]), signal.SIGKILL)  # the pool process running the job
    watch(lifecycle_db, job_id, {"succeeded", "failed"}, timeout_s=60)
    job = read_job(lifecycle_db, job_id)
    assert job.state == JobState.SUCCEEDED, (job.error_code, job.error_message)
    assert job.attempts == 2 and job.worker != owner
    assert phase_runs(lifecycle_settings, job_id) == ["intake", "training", "training"]  # intake not redone


def test_job_fails_with_worker_lost_after_max_attempts(lifecycle_worker, make_job, lifecycle_db):
    job_id = make_job(max_attempts=1)
    wait_for(lambda: read_job(lifecycle_db, job_id).stage == "caching", 30, 0.05, "training to start")
    os.kill(int(read_job(lifecycle_db, job_id).worker.rsplit(":", 1)[1]), signal.SIGKILL)
    watch(lifecycle_db, job_id, {"succeeded", "failed"}, timeout_s=30)
    job = read_job(lifecycle_db, job_id)
    assert job.state == JobState.FAILED and job.error_code == "worker_lost"
    assert "stopped unexpectedly" in job.error_message


@pytest.mark.slow
def test_whole_worker_killed_is_recovered_by_the_sweep_of_a_new_worker(
    lifecycle_worker: WorkerProcess, make_job, lifecycle_db, lifecycle_settings
):
    """SIGKILL of main and pool process: the Redis message waits out its visibility timeout
    (an hour); the new worker's start-up sweep sees the stale heartbeat and requeues it."""
    job_id = make_job()
    wait_for(lambda: read_job(lifecycle_db, job_id).stage == "training:stage1", 30, 0.05, "training:stage1")
    lifecycle_worker.kill_all()
    assert read_job(lifecycle_db, job_id).state == JobState.RUNNING
    lifecycle_worker.start()
    watch(lifecycle_db, job_id, {"succeeded", "failed"}, timeout_s=60)
    job = read_job(lifecycle_db, job_id)
    assert job.state == JobState.SUCCEEDED, (job.error_code, job.error_message)
    assert job.attempts == 2
    assert phase_runs(lifecycle_settings, job_id).count("intake") == 1


class _Receiver(http.server.BaseHTTPRequestHandler):
    fail_first = 1
    received: list[tuple[int, dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if len(self.received) < self.fail_first else 200
        self.received.append((status, dict(self.headers), body))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_webhook_is_retried_after_500_and_arrives_signed(lifecycle_worker, make_job, lifecycle_db):
    from core.webhooks import SIGNATURE_HEADER, verify

    _Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "whsec-test"
    try:
        job_id = make_job(webhook_url=f"http://127.0.0.1:{server.server_port}/hook", secret=secret)
        watch(lifecycle_db, job_id, {"succeeded", "failed"})

        def delivered() -> list:
            with session_scope(lifecycle_db) as session:
                rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).all()
                return rows if rows and all(r.delivered_at for r in rows) else []

        rows = wait_for(delivered, 30, 0.2, "every webhook delivered")
    finally:
        server.shutdown()
    # the scripted training shows two previews while it selects its checkpoint
    assert sorted(r.event for r in rows) == ["job.preview", "job.preview", "job.running", "job.succeeded"]
    assert max(r.attempt for r in rows) == 2  # the first POST got a 500 and was retried
    ok = [(headers, body) for status, headers, body in _Receiver.received if status == 200]
    assert len(ok) == 4
    previews = [json.loads(body)["preview"] for _, body in ok if json.loads(body)["type"] == "job.preview"]
    assert sorted(p["step"] for p in previews) == [10, 20]
    assert all(p["url"].startswith("/v1/previews/signed?") for p in previews)
    for headers, body in ok:
        assert verify(body, secret, headers[SIGNATURE_HEADER])
        assert not verify(body, "wrong-secret", headers[SIGNATURE_HEADER])
    final = [json.loads(body) for _, body in ok if json.loads(body)["state"] == "succeeded"][0]
    assert final["job_id"] == job_id and final["progress"] == 100.0
