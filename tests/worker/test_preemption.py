"""Preemptible workers: at shutdown a job is handed back at once (not failed, not finished first)."""

from __future__ import annotations

import pytest

from tests.worker.conftest import make_job, read_job, settings_with


@pytest.fixture
def draining():
    from worker import preemption

    preemption.draining.clear()
    yield preemption.draining
    preemption.draining.clear()


def test_a_training_stopped_by_shutdown_goes_back_to_the_queue_with_its_checkpoint_step(
        sqlite_db, monkeypatch, queue, draining):
    from likeness.contract.plan import JobKind
    from pipelines.errors import Preempted
    from worker import phases, runner

    def training(ctx):
        draining.set()  # SIGTERM arrives mid-training
        try:
            ctx.should_stop()
        except Preempted as exc:  # what the trainer does: checkpoint the step reached, re-raise
            exc.details["checkpoint_step"] = 7
            (ctx.workdir / "checkpoints").mkdir()
            raise
        raise AssertionError("should_stop did not raise while draining")

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    settings = settings_with()
    job_id = make_job()
    from core.db.models import Job
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        session.get(Job, job_id).completed_stages = ["intake"]
    assert runner.run_job(job_id, consumes={settings.queue("gpu")}, settings=settings) == "preempted"
    job = read_job(job_id)
    assert job.state.value == "running" and job.worker is None and job.error_code is None
    assert job.result["preempted"]["checkpoint_step"] == 7 and job.attempts == 1
    from likeness.contract.results import read_result

    assert read_result("train", job.result).preempted.checkpoint_step == 7  # the API and dashboard can read it
    assert queue.sent[-1] == ("likeness.run_job", [job_id], "gpu")  # queued again at once, no lease to wait out
    assert (settings.data_dir.resolve() / "work" / job_id / "checkpoints").is_dir()  # kept for the next attempt

    draining.clear()  # the next worker
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), lambda ctx: {})
    assert runner.run_job(job_id, consumes={settings.queue("gpu")}, settings=settings) == "succeeded"
    assert read_job(job_id).attempts == 1  # a preemption is not a failed attempt


def test_a_generation_is_handed_back_whole(sqlite_db, monkeypatch, queue, draining):
    from core.db.models import Job, JobKind
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    ran = []

    def generation(ctx):
        ran.append("started")
        ctx.should_stop()
        ran.append("finished")
        return {}

    for phase in ("generation", "delivery"):
        monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.GENERATE, phase), generation)
    job_id = make_job()
    with session_scope() as session:
        session.get(Job, job_id).kind = JobKind.GENERATE
    draining.set()
    settings = settings_with()
    assert runner.run_job(job_id, consumes={settings.queue("gpu")}, settings=settings) == "preempted"
    job = read_job(job_id)
    assert ran == ["started"] and job.completed_stages == [] and job.worker is None
    assert job.state.value == "running" and job.error_code is None
    assert queue.sent[-1] == ("likeness.run_job", [job_id], "gpu")


def _pool_process(conn) -> None:  # noqa: ANN001
    from worker import preemption

    preemption.install_drain_handler()
    conn.send("ready")
    conn.send(preemption.draining.wait(30))


def test_shutdown_of_the_main_process_reaches_its_pool_processes(draining):
    from billiard import Pipe, Process

    from worker import preemption

    ours, theirs = Pipe()
    child = Process(target=_pool_process, args=(theirs,))
    child.start()
    assert ours.recv() == "ready"
    assert preemption.drain_pool() >= 1
    assert draining.is_set()  # the solo and threads pools run jobs in this very process
    assert ours.recv() is True  # the pool process saw the drain signal
    child.join(10)
    assert child.exitcode == 0
