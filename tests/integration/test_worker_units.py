"""Fast checks of the worker's pieces, no broker: progress aggregation, claim and takeover
rules, the recovery sweep (on a migrated SQLite database), and the CLI's error surface."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest

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
    assert values == sorted(values) and values[-1] == 100.0 and values[2] == 15.0
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
    from app.db.session import session_scope

    with session_scope() as session:
        client = Client(name="c", api_key_hash=os.urandom(16).hex())
        session.add(client)
        session.flush()
        subject = Subject(client_id=client.id, name="s")
        session.add(subject)
        session.flush()
        job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.train, state=JobState(state),
                  attempts=attempts, max_attempts=max_attempts, worker=worker, completed_stages=[],
                  heartbeat_at=None if heartbeat_age_s is None else utcnow() - timedelta(seconds=heartbeat_age_s))
        session.add(job)
        session.flush()
        return job.id


def _read(job_id):
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as session:
        return session.get(Job, job_id)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_takes_a_queued_job_once(sqlite_db):
    import socket

    from app.db.models import Job
    from app.db.session import session_scope
    from worker import jobs

    job_id = _job()
    first = jobs.claim(job_id, stale_after_s=60)
    assert first.outcome is jobs.ClaimOutcome.run and first.job.attempts == 1
    job = _read(job_id)
    assert job.state.value == "running" and job.worker == jobs.worker_id() and job.started_at is not None
    # A duplicate delivery reaching another process while a live process on this host owns it:
    with session_scope() as session:
        session.get(Job, job_id).worker = f"{socket.gethostname()}:{os.getppid()}"
    assert jobs.claim(job_id, stale_after_s=60).outcome is jobs.ClaimOutcome.skip
    assert _read(job_id).attempts == 1


def test_claim_takes_over_a_dead_owner_and_counts_the_attempt(sqlite_db):
    import socket

    from worker import jobs

    job_id = _job(attempts=1, state="running", worker=f"{socket.gethostname()}:{_dead_pid()}", heartbeat_age_s=1)
    claim = jobs.claim(job_id, stale_after_s=300)  # fresh heartbeat, but the pid is gone
    assert claim.outcome is jobs.ClaimOutcome.run and claim.job.attempts == 2


def test_claim_leaves_a_live_remote_owner_alone(sqlite_db):
    from worker import jobs

    job_id = _job(attempts=1, state="running", worker="other-host:123", heartbeat_age_s=1)
    assert jobs.claim(job_id, stale_after_s=300).outcome is jobs.ClaimOutcome.skip
    assert _read(job_id).worker == "other-host:123"


def test_claim_fails_with_worker_lost_when_attempts_are_used_up(sqlite_db):
    from worker import jobs

    job_id = _job(attempts=3, max_attempts=3, state="running", worker="other-host:123", heartbeat_age_s=600)
    assert jobs.claim(job_id, stale_after_s=300).outcome is jobs.ClaimOutcome.lost
    job = _read(job_id)
    assert job.state.value == "failed" and job.error_code == "worker_lost" and job.finished_at is not None


def test_sweep_requeues_stale_jobs_and_fails_exhausted_ones(sqlite_db):
    from worker.recovery import sweep

    stale = _job(attempts=1, state="running", worker="gone-host:1", heartbeat_age_s=600)
    exhausted = _job(attempts=3, max_attempts=3, state="running", worker="gone-host:2", heartbeat_age_s=600)
    fresh = _job(attempts=1, state="running", worker="busy-host:3", heartbeat_age_s=1)
    sent = []
    report = sweep(enqueue=lambda job_id, kind, phase: sent.append((job_id, kind, phase)))
    assert report.requeued == [stale] and report.failed == [exhausted]
    assert sent == [(stale, "train", "intake")]
    assert _read(stale).worker is None and _read(stale).attempts == 2
    assert _read(exhausted).error_code == "worker_lost"
    assert _read(fresh).state.value == "running" and _read(fresh).worker == "busy-host:3"


def test_runner_hands_the_gpu_phase_to_the_gpu_queue(sqlite_db, monkeypatch):
    """A CPU-only worker runs intake, then hands the job over instead of training on the CPU."""
    from app.config import get_settings
    from worker import runner, stages

    ran = []
    monkeypatch.setitem(stages.PLANS, "train", (
        stages.Phase("intake", "cpu", ("intake",), lambda ctx: ran.append("intake") or {}),
        stages.Phase("training", "gpu", ("caching",), lambda ctx: ran.append("training") or {}),
    ))
    monkeypatch.setattr("app.webhooks.send_deliveries", lambda ids: None)
    settings = get_settings()
    job_id = _job()
    handed = []
    outcome = runner.run_job(job_id, consumes={settings.queue("cpu")}, settings=settings,
                             enqueue=lambda *args: handed.append(args))
    assert outcome.startswith("handed over") and ran == ["intake"] and handed == [(job_id, "train", "gpu")]
    job = _read(job_id)
    assert job.state.value == "running" and job.worker is None and job.completed_stages == ["intake"]
    assert runner.run_job(job_id, consumes={settings.queue("gpu")}, settings=settings) == "succeeded"
    assert ran == ["intake", "training"] and _read(job_id).attempts == 1


def test_unknown_exception_fails_with_internal_error_and_no_trace(sqlite_db, monkeypatch):
    from app.config import get_settings
    from worker import runner, stages

    def boom(ctx):
        raise KeyError("secret internals")

    monkeypatch.setitem(stages.PLANS, "train", (stages.Phase("intake", "cpu", ("intake",), boom),))
    job_id = _job()
    assert runner.run_job(job_id, settings=get_settings()) == "failed"
    job = _read(job_id)
    assert job.error_code == "internal_error" and "secret" not in job.error_message


def test_missing_pipeline_fails_the_stage_clearly_instead_of_faking_it(sqlite_db, monkeypatch):
    from worker import stages

    with pytest.raises(stages.StageUnavailable, match="does not provide"):
        stages._require("pipelines.intake", "a_function_that_does_not_exist")


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "app.cli", "run", str(tmp_path / "missing"), "--style", "x",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "is not a folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_models_check_reports_missing_weights(tmp_path):
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path), LIKENESS_MODEL_CACHE_DIR=str(tmp_path / "models"),
                        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "app.cli", "models", "check", "--preset", "tiny"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "missing" in result.stdout and "models pull --preset tiny" in result.stdout


def test_cli_create_client_prints_a_working_key(sqlite_db):
    from app.db.session import session_scope
    from app.services.clients import authenticate

    env = clean_environ(LIKENESS_DATA_DIR=os.environ["LIKENESS_DATA_DIR"])  # the sqlite_db database
    result = subprocess.run([sys.executable, "-m", "app.cli", "create-client", "bot-1", "--role", "bot"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    with session_scope() as session:
        caller = authenticate(session, key)
    assert caller is not None and caller.role.value == "bot"


def test_blobs_written_after_the_subject_was_deleted_are_removed(sqlite_db, monkeypatch):
    """The API deletes a subject (rows + blobs) while its job is still writing: nothing may remain."""
    from sqlalchemy import delete

    from app.config import get_settings
    from app.db.models import Subject
    from app.db.session import session_scope
    from app.storage import get_blob_store, subject_prefix
    from worker import runner, stages

    def write_after_delete(ctx):
        with session_scope() as session:  # what DELETE /v1/subjects/{id} does meanwhile
            session.execute(delete(Subject).where(Subject.id == ctx.job.subject_id))
        ctx.store.put(subject_prefix(ctx.job.subject_id) + "late/blob.bin", b"late")
        return {}

    monkeypatch.setitem(stages.PLANS, "train", (stages.Phase("intake", "cpu", ("intake",), write_after_delete),))
    job_id = _job()
    subject_id = _read(job_id).subject_id
    assert runner.run_job(job_id, settings=get_settings()) == "lost"
    assert get_blob_store().list(subject_prefix(subject_id)) == []
