"""Fast checks of the worker's pieces, no broker: progress aggregation, claim and takeover
rules, the recovery sweep (on a migrated SQLite database), and the CLI's error surface."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest

from likeness.contract.plan import plan_for
from pipelines.progress import ProgressEvent
from tests.integration.conftest import clean_environ
from worker.progress import JobProgress


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_is_monotonic_across_stages_and_throttled():
    writes = []
    clock = FakeClock()
    progress = JobProgress("train", writes.append, min_interval_s=0.5, clock=clock)
    progress(ProgressEvent("intake", 0.0))
    for i in range(1, 11):  # ten events within 0.1 s: one write (stage change) + the final one
        clock.t += 0.01
        progress(ProgressEvent("intake", i / 10))
    assert [w.progress for w in writes] == [0.0, 10.0]
    clock.t += 1
    progress(ProgressEvent("caching", 0.5, eta_s=3.0))
    clock.t += 1
    progress(ProgressEvent("caching", 0.2))  # a stage restarting its count never moves the job back
    clock.t += 1
    progress(ProgressEvent("training:stage2", 1.0))
    assert [w.stage for w in writes] == ["intake", "intake", "caching", "caching", "training:stage2"]
    values = [w.progress for w in writes]
    assert values == sorted(values) and values[-1] == 100.0
    assert values[2] == pytest.approx(plan_for("train").progress("caching", 0.5))  # shares come from the plan
    assert writes[2].eta_s is not None and writes[2].eta_s > 3.0  # later stages are included


def test_progress_ignores_stages_the_job_kind_does_not_show():
    writes = []
    progress = JobProgress("generate", writes.append, clock=FakeClock())
    progress(ProgressEvent("caching", 0.5))
    assert writes == []


@pytest.fixture
def sqlite_db(tmp_path, monkeypatch):
    """A migrated SQLite database as the process-wide default (what embedded mode uses)."""
    from app.config import get_settings
    from app.db.migrate import upgrade_to_head
    from app.db.session import dispose_engines

    for name in [k for k in os.environ if k.startswith("LIKENESS_")]:  # other test packages set some
        monkeypatch.delenv(name)
    monkeypatch.setenv("LIKENESS_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    upgrade_to_head()
    yield get_settings().resolved_database_url
    dispose_engines()
    get_settings.cache_clear()


def _job(attempts=0, max_attempts=3, state="queued", worker=None, heartbeat_age_s=None) -> str:
    from app.db.models import Client, Job, JobKind, JobState, Subject, utcnow
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        client = Client(name="c", api_key_hash=os.urandom(16).hex())
        session.add(client)
        session.flush()
        subject = Subject(client_id=client.id, name="s")
        session.add(subject)
        session.flush()
        job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.TRAIN, state=JobState(state),
                  attempts=attempts, max_attempts=max_attempts, worker=worker, completed_stages=[],
                  heartbeat_at=None if heartbeat_age_s is None else utcnow() - timedelta(seconds=heartbeat_age_s))
        session.add(job)
        session.flush()
        return job.id


def _read(job_id):
    from app.db.models import Job
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return session.get(Job, job_id)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _settings(**changes):
    from app.config import get_settings

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
    monkeypatch.setattr("app.queue.task_queue", lambda settings=None: recording)
    return recording


def test_claim_takes_a_queued_job_once(sqlite_db, queue):
    import socket

    from app.db.models import Job
    from tests.app.fixtures import session_scope
    from worker import jobs

    job_id = _job()
    first = jobs.claim(_settings(job_stale_after_s=60), job_id)
    assert first.outcome is jobs.ClaimOutcome.run and first.job.attempts == 1
    job = _read(job_id)
    assert job.state.value == "running" and job.worker == jobs.worker_id() and job.started_at is not None
    # A duplicate delivery reaching another process while a live process on this host owns it:
    with session_scope() as session:
        session.get(Job, job_id).worker = f"{socket.gethostname()}:{os.getppid()}"
    assert jobs.claim(_settings(job_stale_after_s=60), job_id).outcome is jobs.ClaimOutcome.skip
    assert _read(job_id).attempts == 1


def test_claim_takes_over_a_dead_owner_and_counts_the_attempt(sqlite_db, queue):
    import socket

    from worker import jobs

    job_id = _job(attempts=1, state="running", worker=f"{socket.gethostname()}:{_dead_pid()}", heartbeat_age_s=1)
    claim = jobs.claim(_settings(job_stale_after_s=300), job_id)  # fresh heartbeat, but the pid is gone
    assert claim.outcome is jobs.ClaimOutcome.run and claim.job.attempts == 2


def test_claim_leaves_a_live_remote_owner_alone(sqlite_db, queue):
    from worker import jobs

    job_id = _job(attempts=1, state="running", worker="other-host:123", heartbeat_age_s=1)
    assert jobs.claim(_settings(job_stale_after_s=300), job_id).outcome is jobs.ClaimOutcome.skip
    assert _read(job_id).worker == "other-host:123"


def test_claim_fails_with_worker_lost_when_attempts_are_used_up(sqlite_db, queue):
    from worker import jobs

    job_id = _job(attempts=3, max_attempts=3, state="running", worker="other-host:123", heartbeat_age_s=600)
    assert jobs.claim(_settings(job_stale_after_s=300), job_id).outcome is jobs.ClaimOutcome.lost
    job = _read(job_id)
    assert job.state.value == "failed" and job.error_code == "worker_lost" and job.finished_at is not None


def test_sweep_requeues_stale_jobs_on_their_next_phase_queue_and_fails_exhausted_ones(sqlite_db, queue):
    from worker.recovery import sweep

    stale = _job(attempts=1, state="running", worker="gone-host:1", heartbeat_age_s=600)
    exhausted = _job(attempts=3, max_attempts=3, state="running", worker="gone-host:2", heartbeat_age_s=600)
    fresh = _job(attempts=1, state="running", worker="busy-host:3", heartbeat_age_s=1)
    report = sweep(_settings(job_stale_after_s=300))
    assert report.requeued == [stale] and report.failed == [exhausted]
    assert queue.sent == [("likeness.run_job", [stale], "cpu")]  # intake is still to run: the CPU queue
    assert _read(stale).worker is None and _read(stale).attempts == 2
    assert _read(exhausted).error_code == "worker_lost"
    assert _read(fresh).state.value == "running" and _read(fresh).worker == "busy-host:3"


def test_messages_the_broker_refused_stay_in_the_outbox_until_a_sweep_sends_them(sqlite_db, monkeypatch):
    from sqlalchemy import func, select

    from app.db.models import OutboxMessage
    from app.db.uow import UnitOfWork, flush_outbox
    from tests.app.fixtures import session_scope

    class DownQueue:
        def send(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise ConnectionError("broker down")

    job_id = _job()
    with UnitOfWork(_settings(), queue=DownQueue()) as uow:  # the commit stands though the send fails
        uow.enqueue_job(_read(job_id))
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
    recording = RecordingQueue()
    assert flush_outbox(_settings(), recording, grace_s=0) == 1
    assert recording.sent == [("likeness.run_job", [job_id], "cpu")]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0


def test_runner_hands_the_gpu_phase_to_the_gpu_queue(sqlite_db, monkeypatch, queue):
    """A CPU-only worker runs intake, then hands the job over instead of training on the CPU."""
    from likeness.contract.plan import JobKind
    from worker import phases, runner

    ran = []
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), lambda ctx: ran.append("intake") or {})
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), lambda ctx: ran.append("training") or {})
    settings = _settings()
    job_id = _job()
    outcome = runner.run_job(job_id, consumes={settings.queue("cpu")}, settings=settings)
    assert outcome.startswith("handed over") and ran == ["intake"]
    assert queue.sent == [("likeness.run_job", [job_id], "gpu")]
    job = _read(job_id)
    assert job.state.value == "running" and job.worker is None and job.completed_stages == ["intake"]
    assert runner.run_job(job_id, consumes={settings.queue("gpu")}, settings=settings) == "succeeded"
    assert ran == ["intake", "training"] and _read(job_id).attempts == 1
    job = _read(job_id)
    assert job.completed_stages == ["intake", "caching", "training:stage1", "training:stage2"]


def test_stage_runs_are_recorded_with_their_durations(sqlite_db, monkeypatch, queue):
    from sqlalchemy import select

    from app.db.models import JobStage
    from likeness.contract.plan import JobKind, Stage
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    def training(ctx):
        for stage in (Stage.CACHING, Stage.TRAINING_STAGE1, Stage.TRAINING_STAGE2):
            ctx.on_progress(ProgressEvent(stage, 0.0))
            ctx.on_progress(ProgressEvent(stage, 1.0))
        return {}

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"),
                        lambda ctx: ctx.on_progress(ProgressEvent(Stage.INTAKE, 1.0)) or {})
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    job_id = _job()
    assert runner.run_job(job_id, settings=_settings()) == "succeeded"
    with session_scope() as session:
        rows = session.scalars(select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.started_at)).all()
        assert [r.stage for r in rows] == ["intake", "caching", "training:stage1", "training:stage2"]
        assert all(r.finished_at is not None and r.seconds is not None and r.seconds >= 0 for r in rows)
        assert {r.attempt for r in rows} == {1}


def test_unknown_exception_fails_with_internal_error_and_no_trace(sqlite_db, monkeypatch, queue):
    from likeness.contract.plan import JobKind
    from worker import phases, runner

    def boom(ctx):
        raise KeyError("secret internals")

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), boom)
    job_id = _job()
    assert runner.run_job(job_id, settings=_settings()) == "failed"
    job = _read(job_id)
    assert job.error_code == "internal_error" and "secret" not in job.error_message


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "likeness", "run", str(tmp_path / "missing"), "--style", "x",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "is not a folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_models_check_reports_missing_weights(tmp_path):
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path), LIKENESS_MODEL_CACHE_DIR=str(tmp_path / "models"),
                        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "likeness", "models", "check", "--preset", "tiny"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "missing" in result.stdout and "models pull --preset tiny" in result.stdout


def test_cli_create_client_prints_a_working_key(sqlite_db):
    from app.services.clients import authenticate
    from tests.app.fixtures import session_scope

    env = clean_environ(LIKENESS_DATA_DIR=os.environ["LIKENESS_DATA_DIR"])  # the sqlite_db database
    result = subprocess.run([sys.executable, "-m", "likeness", "create-client", "bot-1", "--role", "bot"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    with session_scope() as session:
        caller = authenticate(session, key)
    assert caller is not None and caller.role.value == "bot"


def test_blobs_written_after_the_subject_was_deleted_are_removed(sqlite_db, monkeypatch, queue):
    """The API deletes a subject (rows + blobs) while its job is still writing: nothing may remain."""
    from sqlalchemy import delete

    from app.db.models import Subject
    from app.storage import get_blob_store, subject_prefix
    from likeness.contract.plan import JobKind
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    def write_after_delete(ctx):
        with session_scope() as session:  # what DELETE /v1/subjects/{id} does meanwhile
            session.execute(delete(Subject).where(Subject.id == ctx.job.subject_id))
        ctx.store.put(subject_prefix(ctx.job.subject_id) + "late/blob.bin", b"late")
        return {}

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), write_after_delete)
    job_id = _job()
    subject_id = _read(job_id).subject_id
    assert runner.run_job(job_id, settings=_settings()) == "lost"
    assert get_blob_store().list(subject_prefix(subject_id)) == []
