"""The runner: phases from the job plan, hand-over between queues, stage timings, failures."""

from __future__ import annotations

import pytest

from pipelines.progress import ProgressEvent
from tests.worker.conftest import make_job, read_job, settings_with


def test_runner_hands_the_gpu_phase_to_the_gpu_queue(sqlite_db, monkeypatch, queue):
    """A CPU-only worker runs intake, then hands the job over instead of training on the CPU."""
    from likeness.contract.plan import JobKind
    from worker import phases, runner

    ran = []
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), lambda ctx: ran.append("intake"))
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), lambda ctx: ran.append("training"))
    settings = settings_with()
    job_id = make_job()
    outcome = runner.run_job(job_id, consumes={settings.queue("cpu")}, settings=settings)
    assert outcome.startswith("handed over") and ran == ["intake"]
    assert queue.sent == [("likeness.run_job", [job_id], "gpu")]
    job = read_job(job_id)
    assert job.state.value == "running" and job.worker is None and job.completed_stages == ["intake"]
    assert runner.run_job(job_id, consumes={settings.queue("gpu")}, settings=settings) == "succeeded"
    assert ran == ["intake", "training"] and read_job(job_id).attempts == 1
    job = read_job(job_id)
    assert job.completed_stages == ["intake", "caching", "training:stage1", "training:stage2", "selecting"]


def test_a_cancel_during_intake_ends_the_job_instead_of_handing_it_over(sqlite_db, monkeypatch, queue):
    """Handed over, a canceled job would wait for a gpu worker (behind any training) to be canceled."""
    from core.db.models import Job
    from likeness.contract.plan import JobKind
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    def intake_canceled_at_its_end(ctx):
        with session_scope() as session:
            session.get(Job, ctx.job.id).cancel_requested = True

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), intake_canceled_at_its_end)
    settings = settings_with()
    job_id = make_job()
    runner.run_job(job_id, consumes={settings.queue("cpu")}, settings=settings)
    job = read_job(job_id)
    assert job.state.value == "canceled" and job.error_code == "canceled"
    assert ("likeness.run_job", [job_id], "gpu") not in queue.sent
    assert [task for task, _, q in queue.sent] == ["likeness.deliver_webhook"] * len(queue.sent)


def test_a_cancel_asked_for_during_a_short_stage_is_seen_as_the_next_stage_begins(sqlite_db, monkeypatch, queue):
    """Cancel checks are throttled (one read a second), but not across a stage boundary: a cancel that came
    during a stage shorter than that is seen before the next stage does its work (a tiny generation's
    candidates and ranking take less than a second; it delivered before)."""
    from core.db.models import Job
    from likeness.contract.plan import JobKind, Stage
    from pipelines.progress import raise_if_canceled
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    stages_run = []

    def training(ctx):
        for stage in (Stage.CACHING, Stage.TRAINING_STAGE1, Stage.TRAINING_STAGE2):
            ctx.on_progress(ProgressEvent(stage, 0.0))
            raise_if_canceled(ctx.should_stop)
            stages_run.append(stage)
            if stage == Stage.CACHING:  # asked for right after the stage's first check, well within a second
                with session_scope() as session:
                    session.get(Job, ctx.job.id).cancel_requested = True

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), lambda ctx: None)
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    job_id = make_job()
    assert runner.run_job(job_id, settings=settings_with()) == "canceled"
    assert stages_run == [Stage.CACHING] and read_job(job_id).state.value == "canceled"


def test_stage_runs_are_recorded_with_their_durations(sqlite_db, monkeypatch, queue):
    from sqlalchemy import select

    from core.db.models import JobStage
    from likeness.contract.plan import JobKind, Stage
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    def training(ctx):
        for stage in (Stage.CACHING, Stage.TRAINING_STAGE1, Stage.TRAINING_STAGE2):
            ctx.on_progress(ProgressEvent(stage, 0.0))
            ctx.on_progress(ProgressEvent(stage, 1.0))

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"),
                        lambda ctx: ctx.on_progress(ProgressEvent(Stage.INTAKE, 1.0)))
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    job_id = make_job()
    assert runner.run_job(job_id, settings=settings_with()) == "succeeded"
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
    job_id = make_job()
    assert runner.run_job(job_id, settings=settings_with()) == "failed"
    job = read_job(job_id)
    assert job.error_code == "internal_error" and "secret" not in job.error_message


def test_blobs_written_after_the_subject_was_deleted_are_removed(sqlite_db, monkeypatch, queue):
    """The API deletes a subject (rows + blobs) while its job is still writing: nothing may remain."""
    from sqlalchemy import delete

    from core.db.models import Subject
    from core.storage import get_blob_store, subject_prefix
    from likeness.contract.plan import JobKind
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    def write_after_delete(ctx):
        with session_scope() as session:  # what DELETE /v1/subjects/{id} does meanwhile
            session.execute(delete(Subject).where(Subject.id == ctx.job.subject_id))
        ctx.edge.store.put(subject_prefix(ctx.job.subject_id) + "late/blob.bin", b"late")

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), write_after_delete)
    job_id = make_job()
    subject_id = read_job(job_id).subject_id
    assert runner.run_job(job_id, settings=settings_with()) == "lost"
    assert get_blob_store().list(subject_prefix(subject_id)) == []


def test_a_database_outage_mid_phase_does_not_lose_the_job(sqlite_db, monkeypatch, queue):
    """While the database is away the phase keeps computing (progress and cancel checks skipped) and its
    record waits for the database, instead of the job failing or being retried from the start."""
    import sqlalchemy.exc

    from likeness.contract.plan import JobKind, Stage
    from likeness.contract.results import TrainingSummary, TrainResult
    from worker import jobs, phases, runner

    outage = {"on": False, "refused": 0}

    def refused(*_args, **_kwargs):
        outage["refused"] += 1
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    def guarded(name: str):
        real = getattr(jobs, name)

        def call(*args, **kwargs):
            if outage["on"]:
                if name == "complete_phase":
                    outage["on"] = False  # the database comes back while the record waits
                return refused()
            return real(*args, **kwargs)
        return call

    for name in ("write_progress", "cancel_requested", "complete_phase"):
        monkeypatch.setattr(jobs, name, guarded(name))
    monkeypatch.setattr(jobs.time, "sleep", lambda _s: None)

    def training(ctx):
        outage["on"] = True
        for stage in (Stage.CACHING, Stage.TRAINING_STAGE1, Stage.TRAINING_STAGE2):
            ctx.on_progress(ProgressEvent(stage, 1.0))
            assert not ctx.should_stop()
        return TrainResult(training=TrainingSummary(steps=10))

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), lambda ctx: None)
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    job_id = make_job()
    assert runner.run_job(job_id, settings=settings_with()) == "succeeded"
    assert outage["refused"] >= 4  # progress writes, a cancel check and the phase record met the outage
    job = read_job(job_id)
    assert job.attempts == 1 and job.result["training"]["steps"] == 10


def _refused():
    import sqlalchemy.exc

    return sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def _stage_rows(job_id: str) -> list[tuple[str, int, float]]:
    from sqlalchemy import select

    from core.db.models import JobStage
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        rows = session.scalars(select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.started_at)).all()
        assert all(r.finished_at is not None for r in rows)
        return [(r.stage, r.attempt, r.seconds) for r in rows]


@pytest.mark.parametrize("then", ["stage2", "failure"])
def test_a_stage_that_starts_while_the_database_is_away_still_gets_its_record(sqlite_db, monkeypatch, queue, then):
    """The database is away as training:stage1 begins, and back before stage2 begins (or before stage1
    fails): stage1 still has its row, opened when it began, so caching does not absorb its time (the
    dashboard's timeline, the stage-duration metric)."""
    import time

    from likeness.contract.plan import JobKind, Stage
    from pipelines.errors import InvalidConfig
    from worker import jobs, phases, runner

    outage = {"on": False}
    real = jobs.write_progress

    def write_progress(*args, **kwargs):
        if outage["on"]:
            raise _refused()
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "write_progress", write_progress)

    def training(ctx):
        ctx.on_progress(ProgressEvent(Stage.CACHING, 0.0))
        ctx.on_progress(ProgressEvent(Stage.CACHING, 1.0))
        outage["on"] = True
        ctx.on_progress(ProgressEvent(Stage.TRAINING_STAGE1, 0.0))
        time.sleep(0.3)  # stage 1 takes its time while the database is away
        if then == "failure":
            outage["on"] = False  # back as the failure is recorded
            raise InvalidConfig("stage 1 failed", code="stage_failed")
        ctx.on_progress(ProgressEvent(Stage.TRAINING_STAGE1, 0.5))
        outage["on"] = False
        ctx.on_progress(ProgressEvent(Stage.TRAINING_STAGE2, 0.0))
        ctx.on_progress(ProgressEvent(Stage.TRAINING_STAGE2, 1.0))

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"),
                        lambda ctx: ctx.on_progress(ProgressEvent(Stage.INTAKE, 1.0)))
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    job_id = make_job()
    assert runner.run_job(job_id, settings=settings_with()) == ("succeeded" if then == "stage2" else "failed")
    rows = _stage_rows(job_id)
    assert [stage for stage, _, _ in rows] == ["intake", "caching", "training:stage1", "training:stage2"][
        : 4 if then == "stage2" else 3]
    seconds = {stage: s for stage, _, s in rows}
    assert seconds["caching"] < 0.25 <= seconds["training:stage1"]  # stage 1's time is its own


def test_a_finished_generation_waits_for_the_database_to_deliver_instead_of_running_again(sqlite_db, monkeypatch,
                                                                                        queue):
    """Generated, ranked and upscaled, then the database is away as the image rows are written: the rows
    wait for it (the images are not thrown away and computed again), and the job succeeds once."""
    import time
    from types import SimpleNamespace

    from PIL import Image as PILImage
    from sqlalchemy import select

    from core.db.models import Image, Job, JobKind
    from likeness.contract.results import GenerateResult
    from tests.app.fixtures import session_scope
    from worker import phases, runner, service_edge

    monkeypatch.setattr(time, "sleep", lambda _s: None)  # the waits for the database
    outage = {"refusals": 3}
    real = service_edge.UnitOfWork

    def unit_of_work(*args, **kwargs):  # the image rows' transaction: refused three times, then the database is back
        if outage["refusals"]:
            outage["refusals"] -= 1
            raise _refused()
        return real(*args, **kwargs)

    runs = []

    def generation(ctx):
        runs.append(ctx.job.attempts)
        monkeypatch.setattr(service_edge, "UnitOfWork", unit_of_work)  # from here on: delivery's writes
        results = [SimpleNamespace(rank=rank, seed=rank, prompt="p", image=PILImage.new("RGB", (8, 8)), upscaled=None,
                                   scores={"combined": 1.0 / rank}) for rank in (1, 2)]
        images = phases.deliver(ctx, results)
        monkeypatch.setattr(service_edge, "UnitOfWork", real)
        return GenerateResult(images=images, adapter_id="a", candidates=[])

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.GENERATE, "generation"), generation)
    job_id = make_job()
    with session_scope() as session:
        session.get(Job, job_id).kind = JobKind.GENERATE
    assert runner.run_job(job_id, settings=settings_with()) == "succeeded"
    assert runs == [1] and outage["refusals"] == 0  # one run: the rows waited for the database
    with session_scope() as session:
        assert session.scalars(select(Image.rank).where(Image.job_id == job_id).order_by(Image.rank)).all() == [1, 2]
    assert read_job(job_id).result["images"] == 2


def test_a_phase_run_again_after_a_transient_error_is_recorded_as_a_new_attempt(sqlite_db, monkeypatch, queue):
    import pytest

    from core.storage import StorageError
    from likeness.contract.plan import JobKind, Stage
    from worker import phases, runner

    failures = [StorageError("the blob store is away")]

    def intake(ctx):
        ctx.on_progress(ProgressEvent(Stage.INTAKE, 0.5))
        if failures:
            raise failures.pop()

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"), intake)
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), lambda ctx: None)
    job_id = make_job()
    with pytest.raises(runner.TransientError):
        runner.run_job(job_id, settings=settings_with())
    assert read_job(job_id).worker is None  # released: the task's retry runs it again
    assert runner.run_job(job_id, settings=settings_with()) == "succeeded"
    assert read_job(job_id).attempts == 2
    assert [(stage, attempt) for stage, attempt, _ in _stage_rows(job_id)] == [("intake", 1), ("intake", 2)]


def test_a_job_whose_preset_lacks_weights_fails_in_its_first_phase_with_the_command(sqlite_db, tmp_path, monkeypatch,
                                                                                     queue):
    from likeness.contract.requests import TrainRequest, resolve_train
    from tests.app.fixtures import session_scope
    from worker import runner

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job_id = make_job()
    with session_scope() as session:
        from core.db.models import Job

        session.get(Job, job_id).request = resolve_train(TrainRequest(), preset="sd15").model_dump(mode="json")
    assert runner.run_job(job_id, settings=settings_with()) == "failed"
    job = read_job(job_id)
    assert job.error_code == "weights_missing" and job.stage is None  # before any stage began
    assert "likeness models pull --preset sd15" in job.error_message


def test_each_stage_is_one_structured_log_line_with_the_job_id(sqlite_db, monkeypatch, queue, caplog):
    import json
    import logging

    from core.db.models import Job
    from core.logs import JsonFormatter
    from likeness.contract.plan import JobKind, Stage
    from tests.app.fixtures import session_scope
    from worker import phases, runner

    def training(ctx):
        for stage in (Stage.CACHING, Stage.TRAINING_STAGE1, Stage.TRAINING_STAGE2):
            for fraction in (0.0, 0.5, 1.0):  # many progress events, one line per stage
                ctx.on_progress(ProgressEvent(stage, fraction))
        return None

    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "intake"),
                        lambda ctx: ctx.on_progress(ProgressEvent(Stage.INTAKE, 1.0)))
    monkeypatch.setitem(phases.PHASE_RUNNERS, (JobKind.TRAIN, "training"), training)
    job_id = make_job()
    with session_scope() as session:
        session.get(Job, job_id).request = {"preset": "tiny"}
    with caplog.at_level(logging.INFO, logger="likeness.jobs"):
        assert runner.run_job(job_id, settings=settings_with()) == "succeeded"
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "likeness.jobs"]
    assert [line["stage"] for line in lines] == ["intake", "caching", "training:stage1", "training:stage2"]
    for line in lines:
        assert line["job_id"] == job_id and line["kind"] == "train" and line["preset"] == "tiny"
        assert line["attempt"] == 1 and job_id in line["msg"] and line["level"] == "info" and line["ts"]
