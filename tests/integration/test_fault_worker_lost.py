"""Faults: a GPU worker lost mid-training, by SIGTERM (a spot reclaim, a pod eviction) or SIGKILL (its machine gone).

Both tests run two real Celery workers on the GPU queue, the shared PostgreSQL and Redis, the tiny preset
and LoRA. The job's dataset is stored as intake leaves it, so the job starts at training.

* **SIGTERM** on the main process only, as Kubernetes sends it, once a periodic checkpoint is mirrored and
  training has gone on past it: the worker hands the job back at once (checkpoints the step it reached,
  mirrors it, releases the lease, queues the job again) and exits; the other worker takes it within 5 s of
  that exit (no lease to wait out), resumes from exactly that step in the same attempt, and succeeds.
* **SIGKILL** of the whole worker (main and pool process: no clean-up, its Redis message stays unacked for
  the visibility timeout) once its first checkpoint is mirrored: the other worker's recovery sweep sees the
  lease expire, takes the job over, resumes from the mirrored checkpoint and succeeds.

The lease is short (heartbeat 2 s, stale after 8 s) to keep the suite fast; ``LIKENESS_TEST_PRODUCTION_LEASE=1``
runs the production 5 s / 30 s, as for the figures in bench/RESULTS.md ("Faults"). No job may stay ``running``
and the finished job's checkpoints must go.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from sqlalchemy import select

from core.db.models import Job, JobKind, JobStage, JobState
from tests.app.fixtures import client_and_subject, session_scope
from tests.integration.conftest import WorkerProcess, enqueue, own_database, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRODUCTION_LEASE = os.environ.get("LIKENESS_TEST_PRODUCTION_LEASE") == "1"
RESUME_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def lost_db() -> Iterator[str]:
    """A database of this module's own (its workers are killed: see ``own_database``)."""
    with own_database("lost") as url:
        yield url


@pytest.fixture(scope="module")
def lost_env(it_env, lost_db) -> dict[str, str]:
    """The run's environment with its own database and queues and a lease long enough to be measured (not the
    suite's 1 s / 4 s)."""
    env = {k: v for k, v in it_env.items() if k not in ("LIKENESS_JOB_HEARTBEAT_S", "LIKENESS_JOB_STALE_AFTER_S")}
    if not PRODUCTION_LEASE:
        env.update(LIKENESS_JOB_HEARTBEAT_S="2", LIKENESS_JOB_STALE_AFTER_S="8")
    return {**env, "LIKENESS_DATABASE_URL": lost_db,
            "LIKENESS_QUEUE_PREFIX": it_env["LIKENESS_QUEUE_PREFIX"].rstrip(".") + "lost."}


@pytest.fixture(scope="module")
def lost_settings(lost_env):
    from core.config import Settings

    return Settings(**{k.removeprefix("LIKENESS_").lower(): v for k, v in lost_env.items()
                       if k.startswith("LIKENESS_") and not k.startswith("LIKENESS_TEST_")})


@pytest.fixture(scope="module")
def lost_sender(lost_settings):
    """Sends to this module's queues (the broker's key prefix is the queue prefix)."""
    import redis

    from core.queue import make_celery
    from tests.integration.conftest import REDIS_URL

    yield make_celery(lost_settings)
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(lost_settings.queue_prefix + "*"):
        r.delete(key)


@pytest.fixture(scope="module")
def worker_pool(lost_env, lost_settings, tmp_path_factory) -> Iterator[list[WorkerProcess]]:
    logs = tmp_path_factory.mktemp("lost-logs")
    workers = [WorkerProcess("worker.celery_app", lost_env, lost_settings.queue("gpu"), logs / f"gpu-{name}.log")
               for name in "ab"]
    yield workers
    for worker in workers:
        worker.stop()


@pytest.fixture
def gpu_workers(worker_pool) -> list[WorkerProcess]:
    """Two running GPU workers: the one an earlier test lost is started again."""
    for worker in worker_pool:
        if worker.proc is None or worker.proc.poll() is not None:
            worker.start(timeout_s=120)
    return worker_pool


@pytest.fixture
def faces(grace_hopper, astronaut) -> list[Image.Image]:
    faces = [img.resize((128, 128)) for img in (grace_hopper.crop((100, 20, 420, 340)),
                                                 astronaut.crop((140, 0, 380, 240)))]
    return faces + [ImageOps.mirror(face) for face in faces]


def _training_job(lost_db: str, settings, faces: list[Image.Image], steps: int, checkpoint_every: int) -> str:
    """A train job whose intake is done: its dataset stored where intake leaves it."""
    from core.storage import dataset_prefix, get_blob_store, upload_folder
    from likeness.contract.requests import TrainRequest, resolve_train
    from pipelines.intake.dataset import Dataset, DatasetItem

    # no checkpoint selection after training: what is tested ends with the training
    resolved = resolve_train(TrainRequest(mode="lora", steps=steps, select_checkpoint=False), preset="tiny")
    resolved = resolved.model_copy(update={"training": dataclasses.replace(
        resolved.training, checkpoint_every=checkpoint_every, progress_every=1)})
    with session_scope(lost_db) as session:
        client, subject = client_and_subject(session, "fault", "grace")
        job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.TRAIN,
                  request=resolved.model_dump(mode="json"), completed_stages=["intake"], max_attempts=3)
        session.add(job)
        session.flush()
        job_id, subject_id = job.id, subject.id
    items = [DatasetItem(f"photo{i}", face, Image.new("L", face.size, 255), f"<bg{i}>") for i, face in enumerate(faces)]
    folder = Path(settings.data_dir) / "fault-dataset" / job_id
    Dataset(items, "<lk>", "woman", {"woman": 0.2}, []).save(folder)
    upload_folder(get_blob_store(settings), folder, dataset_prefix(subject_id, job_id))
    return job_id


def _job(lost_db: str, job_id: str) -> Job:
    with session_scope(lost_db) as session:
        return session.get(Job, job_id)


def _owner(workers: list[WorkerProcess], job: Job) -> WorkerProcess:
    """The worker whose pool process holds ``job`` now (pool processes share their worker's group)."""
    pid = int(job.worker.rsplit(":", 1)[1])
    group = os.getpgid(pid)
    owner = next((w for w in workers if group == w.proc.pid), None)
    assert owner is not None, f"job held by {job.worker} (group {group}), none of {[w.proc.pid for w in workers]}"
    return owner


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _running(lost_db: str, settings, sender, faces: list[Image.Image], steps: int, checkpoint_every: int):  # noqa: ANN001, ANN202
    """A training job queued and taken by a worker: (its row, its checkpoints' blob prefix, the blob store)."""
    from core.storage import checkpoint_prefix, get_blob_store

    job_id = _training_job(lost_db, settings, faces, steps, checkpoint_every)
    enqueue(sender, settings, job_id, "gpu")
    job = wait_for(lambda: (j := _job(lost_db, job_id)).state == JobState.RUNNING and j.worker and j, 120, 0.2,
                   "a worker to take the job")
    return job, checkpoint_prefix(job.subject_id, job_id), get_blob_store(settings)


def test_sigterm_hands_training_back_at_its_current_step_and_another_worker_resumes_within_seconds(
    gpu_workers, lost_db, lost_settings, lost_sender, faces
):
    from worker.checkpoints import mirrored_steps

    steps = 40
    job, prefix, store = _running(lost_db, lost_settings, lost_sender, faces, steps, checkpoint_every=6)
    job_id = job.id
    wait_for(lambda: any(mirrored_steps(store, prefix).values()), 240, 0.05, "the first periodic checkpoint")
    at_checkpoint = _job(lost_db, job_id).progress
    wait_for(lambda: _job(lost_db, job_id).progress > at_checkpoint, 60, 0.05, "training to go on past it")
    periodic = max(step for step, done in mirrored_steps(store, prefix).items() if done)
    job = _job(lost_db, job_id)
    assert job.state == JobState.RUNNING and periodic < steps, "the training ended before the SIGTERM"
    first_owner, victim = job.worker, _owner(gpu_workers, job)
    survivor = next(w for w in gpu_workers if w is not victim)

    term_sent = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGTERM)  # the main process only, as Kubernetes and spot reclaims do
    exited_at = taken_at = None  # watched together: the other worker may take the job before the first one exits
    deadline = term_sent + 120
    while (exited_at is None or taken_at is None) and time.monotonic() < deadline:
        if exited_at is None and victim.proc.poll() is not None:
            exited_at = time.monotonic()
        if taken_at is None and _job(lost_db, job_id).worker not in (None, first_owner):
            taken_at = time.monotonic()
        time.sleep(0.05)
    assert exited_at is not None, "the worker did not exit within 120 s of SIGTERM"
    assert taken_at is not None, "no other worker took the job within 120 s"
    exit_code, drain_s = victim.proc.returncode, exited_at - term_sent

    job = wait_for(lambda: (j := _job(lost_db, job_id)).state != JobState.RUNNING and j, 240, 0.2,
                   "the job to finish")
    assert job.state == JobState.SUCCEEDED, (job.error_code, job.error_message, survivor.log()[-4000:])
    assert exit_code == 0, victim.log()[-4000:]
    preempted = job.result["preempted"]
    handed_back_at = _aware(datetime.fromisoformat(preempted["at"]))
    checkpoint_step = preempted["checkpoint_step"]
    training = job.result["training"]
    with session_scope(lost_db) as session:
        runs = session.scalars(select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.started_at)).all()
    first_runs = [r for r in runs if r.worker == first_owner]
    resumed_runs = [r for r in runs if r.worker != first_owner]
    print(f"\nSIGTERM -> worker exited {drain_s:.1f} s; checkpoint at step {checkpoint_step} (periodic {periodic}); "
          f"exit -> job taken by the other worker {taken_at - exited_at:+.2f} s; training progressing there "
          f"{(_aware(resumed_runs[0].started_at) - handed_back_at).total_seconds():.1f} s after the hand-back")

    # the step it reached (at least the last periodic one, which it equals only when SIGTERM came while that one was
    # being written: tests/pipelines/training/test_trainer.py stops at an exact step), and the run resumed from it
    assert periodic <= checkpoint_step < steps
    assert training["resumed_from_step"] == checkpoint_step and training["steps"] == steps
    assert job.result["resumed"]["from_step"] == checkpoint_step
    # handed back, then taken by the other worker within seconds of the first one's exit; same attempt
    assert preempted["worker"] == first_owner and job.worker != first_owner
    assert _owner([survivor], job) is survivor
    # event order: the first worker's stages all closed at the hand-back, before the other worker's began
    assert all(_aware(r.finished_at) <= handed_back_at <= _aware(resumed_runs[0].started_at) for r in first_runs)
    assert taken_at - exited_at <= RESUME_WITHIN_S
    assert job.attempts == 1  # a preemption is not a failure, and no lease expired (that would count an attempt)
    assert {r.worker for r in resumed_runs} == {job.worker}
    wait_for(lambda: store.list(prefix) == [], 30, 0.2, "the finished job's checkpoints to go")


def test_sigkilled_gpu_worker_training_resumes_on_another_worker_from_its_checkpoint(
    gpu_workers, lost_db, lost_settings, lost_sender, faces
):
    steps, checkpoint_every = 15, 3
    job, prefix, store = _running(lost_db, lost_settings, lost_sender, faces, steps, checkpoint_every)
    job_id = job.id
    wait_for(lambda: any(k.endswith("/meta.json") for k in store.list(prefix)), 180, 0.05,
             "the first checkpoint to be mirrored")
    job = _job(lost_db, job_id)
    first_owner, victim = job.worker, _owner(gpu_workers, job)
    survivor = next(w for w in gpu_workers if w is not victim)
    victim.kill_all()
    killed_at = time.monotonic()
    job = _job(lost_db, job_id)  # read again: the victim went on writing progress until the kill
    progress_at_kill = job.progress
    assert job.state == JobState.RUNNING and job.progress < 100, "the training ended before the kill"

    taken = wait_for(lambda: (j := _job(lost_db, job_id)).worker not in (None, first_owner) and j, 90, 0.1,
                     "another worker to take the job over")
    takeover_s = time.monotonic() - killed_at
    assert _owner(gpu_workers, taken) is survivor  # asked while its process holds the job
    seen_resumed = {}

    def progressing_again() -> bool:
        j = _job(lost_db, job_id)
        if j.state == JobState.RUNNING:
            seen_resumed.update((j.result or {}).get("resumed") or {})
        return j.state != JobState.RUNNING or (j.worker == taken.worker and j.progress > progress_at_kill)

    wait_for(progressing_again, 120, 0.1, "training to progress again on the other worker")
    recovery_s = time.monotonic() - killed_at
    job = wait_for(lambda: (j := _job(lost_db, job_id)).state != JobState.RUNNING and j, 180, 0.2,
                   "the job to finish")
    print(f"\nworker SIGKILL -> takeover {takeover_s:.1f} s, -> training progressing again {recovery_s:.1f} s "
          f"(lease {lost_settings.job_stale_after_s} s, heartbeat {lost_settings.job_heartbeat_s} s)")

    assert job.state == JobState.SUCCEEDED, (job.error_code, job.error_message, survivor.log()[-4000:])
    print("survivor's training:", {k: job.result["training"].get(k) for k in ("resumed_from_step", "steps_per_s",
                                                                               "train_s", "caching_s", "load_s")})
    assert job.attempts == 2
    training = job.result["training"]
    resumed_from = training["resumed_from_step"]
    assert checkpoint_every <= resumed_from < steps and resumed_from % checkpoint_every == 0
    assert training["steps"] == steps  # the run is whole; the survivor trained only steps - resumed_from
    assert job.result["resumed"]["from_step"] == resumed_from and job.result["resumed"]["attempt"] == 2
    assert seen_resumed.get("from_step") == resumed_from  # shown while the job was still running
    # the lease, not the broker's hour-long visibility timeout, brought it back
    assert takeover_s < lost_settings.job_stale_after_s + 2 * lost_settings.job_heartbeat_s + 5
    with session_scope(lost_db) as session:
        assert session.scalars(select(Job.id).where(Job.state == JobState.RUNNING)).all() == []
        runs = session.scalars(select(JobStage).where(JobStage.job_id == job_id)).all()
    assert {r.worker for r in runs if r.attempt == 2} == {taken.worker}  # attempt 2 ran on the survivor only
    # the worker deletes them just after it records the job's end
    wait_for(lambda: store.list(prefix) == [], 30, 0.2, "the finished job's checkpoints to go")
    assert store.list(f"subjects/{job.subject_id}/adapters/")  # the adapter was stored
