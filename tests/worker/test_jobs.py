"""Job-record rules of the worker: claim, takeover, worker_lost, the recovery sweep and the outbox."""

from __future__ import annotations

import os

from tests.worker.conftest import RecordingQueue, dead_pid, make_job, read_job, settings_with


def test_claim_takes_a_queued_job_once(sqlite_db, queue):
    import socket

    from core.db.models import Job
    from tests.app.fixtures import session_scope
    from worker import jobs

    job_id = make_job()
    first = jobs.claim(settings_with(job_stale_after_s=60), job_id)
    assert first.outcome is jobs.ClaimOutcome.run and first.job.attempts == 1
    job = read_job(job_id)
    assert job.state.value == "running" and job.worker == jobs.worker_id() and job.started_at is not None
    # A duplicate delivery reaching another process while a live process on this host owns it:
    with session_scope() as session:
        session.get(Job, job_id).worker = f"{socket.gethostname()}:{os.getppid()}"
    assert jobs.claim(settings_with(job_stale_after_s=60), job_id).outcome is jobs.ClaimOutcome.skip
    assert read_job(job_id).attempts == 1


def test_claim_takes_over_a_dead_owner_and_counts_the_attempt(sqlite_db, queue):
    import socket

    from worker import jobs

    job_id = make_job(attempts=1, state="running", worker=f"{socket.gethostname()}:{dead_pid()}", heartbeat_age_s=1)
    claim = jobs.claim(settings_with(job_stale_after_s=300), job_id)  # fresh heartbeat, but the pid is gone
    assert claim.outcome is jobs.ClaimOutcome.run and claim.job.attempts == 2


def test_claim_leaves_a_live_remote_owner_alone(sqlite_db, queue):
    from worker import jobs

    job_id = make_job(attempts=1, state="running", worker="other-host:123", heartbeat_age_s=1)
    assert jobs.claim(settings_with(job_stale_after_s=300), job_id).outcome is jobs.ClaimOutcome.skip
    assert read_job(job_id).worker == "other-host:123"


def test_claim_fails_with_worker_lost_when_attempts_are_used_up(sqlite_db, queue):
    from worker import jobs

    job_id = make_job(attempts=3, max_attempts=3, state="running", worker="other-host:123", heartbeat_age_s=600)
    assert jobs.claim(settings_with(job_stale_after_s=300), job_id).outcome is jobs.ClaimOutcome.lost
    job = read_job(job_id)
    assert job.state.value == "failed" and job.error_code == "worker_lost" and job.finished_at is not None


def test_sweep_requeues_stale_jobs_on_their_next_phase_queue_and_fails_exhausted_ones(sqlite_db, queue):
    from worker.recovery import sweep

    stale = make_job(attempts=1, state="running", worker="gone-host:1", heartbeat_age_s=600)
    exhausted = make_job(attempts=3, max_attempts=3, state="running", worker="gone-host:2", heartbeat_age_s=600)
    fresh = make_job(attempts=1, state="running", worker="busy-host:3", heartbeat_age_s=1)
    report = sweep(settings_with(job_stale_after_s=300))
    assert report.requeued == [stale] and report.failed == [exhausted]
    assert queue.sent == [("likeness.run_job", [stale], "cpu")]  # intake is still to run: the CPU queue
    assert read_job(stale).worker is None and read_job(stale).attempts == 2
    assert read_job(exhausted).error_code == "worker_lost"
    assert read_job(fresh).state.value == "running" and read_job(fresh).worker == "busy-host:3"


def test_messages_the_broker_refused_stay_in_the_outbox_until_a_sweep_sends_them(sqlite_db, monkeypatch):
    from sqlalchemy import func, select

    from core.db.models import OutboxMessage
    from core.db.uow import UnitOfWork, flush_outbox
    from tests.app.fixtures import session_scope

    class DownQueue:
        def send(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise ConnectionError("broker down")

    job_id = make_job()
    with UnitOfWork(settings_with(), queue=DownQueue()) as uow:  # the commit stands though the send fails
        uow.enqueue_job(read_job(job_id))
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
    recording = RecordingQueue()
    assert flush_outbox(settings_with(), recording, grace_s=0) == 1
    assert recording.sent == [("likeness.run_job", [job_id], "cpu")]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0




def test_the_sweep_purges_idempotency_records_after_a_week(sqlite_db, queue):
    from datetime import timedelta

    from sqlalchemy import select

    from core.db.models import Client, IdempotencyRecord, utcnow
    from tests.app.fixtures import session_scope
    from worker.recovery import sweep

    with session_scope() as session:
        client = Client(name="c", api_key_hash=os.urandom(16).hex())
        session.add(client)
        session.flush()
        for key, age in (("old", timedelta(days=8)), ("recent", timedelta(days=1))):
            session.add(IdempotencyRecord(client_id=client.id, key=key, fingerprint="f", response_status=202,
                                          response_body={}, created_at=utcnow() - age))
    assert sweep(settings_with()).idempotency_purged == 1
    with session_scope() as session:
        assert session.scalars(select(IdempotencyRecord.key)).all() == ["recent"]
