"""Fault: a GPU worker gets SIGTERM mid-training (a spot instance reclaimed, a pod evicted).

Two real Celery workers on the GPU queue, real PostgreSQL and Redis, the tiny preset, LoRA; the job
starts at training (its dataset is stored as intake leaves it). Once a periodic checkpoint is mirrored
and training has gone on past it, the worker running the job gets SIGTERM on its main process only, as
Kubernetes sends it. It must hand the job back at once: checkpoint the step it reached (not the last
periodic one), mirror it, release the lease and queue the job again; then exit. The other worker must
take the job within 5 s of that exit (no lease to wait out), resume from exactly that step, in the
same attempt, and succeed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from sqlalchemy import select

from core.db.models import Client, Job, JobKind, JobStage, JobState, Subject
from tests.app.fixtures import session_scope
from tests.integration.conftest import WorkerProcess, enqueue, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 40
CHECKPOINT_EVERY = 6
RESUME_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def preempt_env(it_env) -> dict[str, str]:
    """Own queues, and the production lease (5 s / 30 s): a takeover must not come from the lease expiring."""
    env = {k: v for k, v in it_env.items() if k not in ("LIKENESS_JOB_HEARTBEAT_S", "LIKENESS_JOB_STALE_AFTER_S")}
    return {**env, "LIKENESS_QUEUE_PREFIX": it_env["LIKENESS_QUEUE_PREFIX"].rstrip(".") + "preempt."}


@pytest.fixture(scope="module")
def preempt_settings(preempt_env):
    from core.config import Settings

    return Settings(**{k.removeprefix("LIKENESS_").lower(): v for k, v in preempt_env.items()
                       if k.startswith("LIKENESS_") and not k.startswith("LIKENESS_TEST_")})


@pytest.fixture(scope="module")
def preempt_sender(preempt_settings):
    import redis

    from core.queue import make_celery
    from tests.integration.conftest import REDIS_URL

    yield make_celery(preempt_settings)
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(preempt_settings.queue_prefix + "*"):
        r.delete(key)


@pytest.fixture(scope="module")
def gpu_workers(preempt_env, preempt_settings, tmp_path_factory):
    logs = tmp_path_factory.mktemp("preempt-logs")
    queue = preempt_settings.queue("gpu")
    workers = [WorkerProcess("worker.celery_app", preempt_env, queue, logs / f"gpu-{name}.log") for name in "ab"]
    for worker in workers:
        worker.start(timeout_s=120)
    yield workers
    for worker in workers:
        worker.stop()


def _training_job(pg_url: str, settings, faces: list[Image.Image]) -> str:
    """A train job whose intake is done: its dataset stored where intake leaves it."""
    from core.storage import dataset_prefix, get_blob_store, upload_folder
    from likeness.contract.requests import TrainRequest, resolve_train
    from pipelines.intake.dataset import Dataset, DatasetItem

    resolved = resolve_train(TrainRequest(mode="lora", steps=STEPS), preset="tiny")
    resolved = resolved.model_copy(update={"training": dataclasses.replace(
        resolved.training, checkpoint_every=CHECKPOINT_EVERY, progress_every=1)})
    with session_scope(pg_url) as session:
        client = Client(name="preempt", api_key_hash=os.urandom(16).hex())
        session.add(client)
        session.flush()
        subject = Subject(client_id=client.id, name="spot")
        session.add(subject)
        session.flush()
        job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.TRAIN,
                  request=resolved.model_dump(mode="json"), completed_stages=["intake"], max_attempts=3)
        session.add(job)
        session.flush()
        job_id, subject_id = job.id, subject.id
    items = [DatasetItem(f"photo{i}", face, Image.new("L", face.size, 255), f"<bg{i}>") for i, face in enumerate(faces)]
    folder = Path(settings.data_dir) / "preempt-dataset" / job_id
    Dataset(items, "<lk>", "woman", {"woman": 0.2}, []).save(folder)
    upload_folder(get_blob_store(settings), folder, dataset_prefix(subject_id, job_id))
    return job_id


def _job(pg_url: str, job_id: str) -> Job:
    with session_scope(pg_url) as session:
        return session.get(Job, job_id)


def _owner(workers: list[WorkerProcess], job: Job) -> WorkerProcess:
    pid = int(job.worker.rsplit(":", 1)[1])
    return next(w for w in workers if os.getpgid(pid) == w.proc.pid)  # pool processes share the worker's group


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def test_sigterm_hands_training_back_at_its_current_step_and_another_worker_resumes_within_seconds(
    gpu_workers, pg_url, preempt_settings, preempt_sender, grace_hopper, astronaut
):
    from core.storage import checkpoint_prefix, get_blob_store
    from worker.checkpoints import mirrored_steps

    faces = [img.resize((128, 128)) for img in (grace_hopper.crop((100, 20, 420, 340)),
                                                 astronaut.crop((140, 0, 380, 240)))]
    faces += [ImageOps.mirror(face) for face in faces]
    job_id = _training_job(pg_url, preempt_settings, faces)
    store = get_blob_store(preempt_settings)
    enqueue(preempt_sender, preempt_settings, job_id, "gpu")

    job = wait_for(lambda: (j := _job(pg_url, job_id)).state == JobState.RUNNING and j.worker and j, 120, 0.2,
                   "a worker to take the job")
    prefix = checkpoint_prefix(job.subject_id, job_id)
    wait_for(lambda: any(mirrored_steps(store, prefix).values()), 240, 0.05, "the first periodic checkpoint")
    at_checkpoint = _job(pg_url, job_id).progress
    wait_for(lambda: _job(pg_url, job_id).progress > at_checkpoint, 60, 0.05, "training to go on past it")
    periodic = max(step for step, done in mirrored_steps(store, prefix).items() if done)
    job = _job(pg_url, job_id)
    assert job.state == JobState.RUNNING and periodic < STEPS, "the training ended before the SIGTERM"
    first_owner, victim = job.worker, _owner(gpu_workers, job)
    survivor = next(w for w in gpu_workers if w is not victim)

    term_sent = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGTERM)  # the main process only, as Kubernetes and spot reclaims do
    exited_at = taken_at = None  # watched together: the other worker may take the job before the first one exits
    deadline = term_sent + 120
    while (exited_at is None or taken_at is None) and time.monotonic() < deadline:
        if exited_at is None and victim.proc.poll() is not None:
            exited_at = time.monotonic()
        if taken_at is None and _job(pg_url, job_id).worker not in (None, first_owner):
            taken_at = time.monotonic()
        time.sleep(0.05)
    assert exited_at is not None, "the worker did not exit within 120 s of SIGTERM"
    assert taken_at is not None, "no other worker took the job within 120 s"
    exit_code, drain_s = victim.proc.returncode, exited_at - term_sent

    job = wait_for(lambda: (j := _job(pg_url, job_id)).state != JobState.RUNNING and j, 240, 0.2,
                   "the job to finish")
    assert job.state == JobState.SUCCEEDED, (job.error_code, job.error_message, survivor.log()[-4000:])
    assert exit_code == 0, victim.log()[-4000:]
    preempted = job.result["preempted"]
    handed_back_at = _aware(datetime.fromisoformat(preempted["at"]))
    checkpoint_step = preempted["checkpoint_step"]
    training = job.result["training"]
    with session_scope(pg_url) as session:
        runs = session.scalars(select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.started_at)).all()
    first_runs = [r for r in runs if r.worker == first_owner]
    resumed_runs = [r for r in runs if r.worker != first_owner]
    print(f"\nSIGTERM -> worker exited {drain_s:.1f} s; checkpoint at step {checkpoint_step} (periodic {periodic}); "
          f"exit -> job taken by the other worker {taken_at - exited_at:+.2f} s; training progressing there "
          f"{(_aware(resumed_runs[0].started_at) - handed_back_at).total_seconds():.1f} s after the hand-back")

    # the step it reached, not the last periodic checkpoint, and the run resumed from exactly that step
    assert periodic < checkpoint_step < STEPS
    assert training["resumed_from_step"] == checkpoint_step and training["steps"] == STEPS
    assert job.result["resumed"]["from_step"] == checkpoint_step
    # handed back, then taken by the other worker within seconds of the first one's exit; same attempt
    assert preempted["worker"] == first_owner and job.worker != first_owner
    assert _owner([survivor], job) is survivor
    # event order: the first worker's stages all closed at the hand-back, before the other worker's began
    assert all(_aware(r.finished_at) <= handed_back_at <= _aware(resumed_runs[0].started_at) for r in first_runs)
    assert taken_at - exited_at <= RESUME_WITHIN_S  # no lease to wait out (30 s here)
    assert job.attempts == 1  # a preemption is not a failure
    assert {r.worker for r in resumed_runs} == {job.worker}
    wait_for(lambda: store.list(prefix) == [], 30, 0.2, "the finished job's checkpoints to go")
