"""The ETA's history: median seconds per stage over recent jobs of the same kind, preset and size."""

from __future__ import annotations

from datetime import timedelta

import pytest


def _finished_training(steps: int, preset: str, seconds: dict[str, float]) -> None:
    from core.db.models import Job, JobKind, JobStage, JobState, utcnow
    from tests.app.fixtures import session_scope
    from tests.worker.conftest import make_job

    job_id = make_job(state="queued")
    now = utcnow()
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.state, job.request = JobState.SUCCEEDED, {"kind": "train", "preset": preset,
                                                      "training": {"max_train_steps": steps, "mode": "lora"}}
        for stage, took in seconds.items():
            session.add(JobStage(job_id=job_id, kind=JobKind.TRAIN, stage=stage, attempt=1, worker="w:1",
                                 started_at=now - timedelta(seconds=took), finished_at=now, seconds=took))


def test_a_stage_is_expected_to_take_the_median_of_jobs_of_the_same_preset_and_size(sqlite_db):
    from core.config import get_settings
    from worker.stage_history import expected_stage_seconds

    for intake, stage2 in ((3.0, 10.0), (4.0, 12.0), (9.0, 11.0)):
        _finished_training(40, "tiny", {"intake": intake, "training:stage2": stage2})
    _finished_training(400, "tiny", {"intake": 30.0, "training:stage2": 300.0})  # ten times the work
    _finished_training(40, "sd15", {"intake": 60.0, "training:stage2": 900.0})  # another model

    request = {"kind": "train", "preset": "tiny", "training": {"max_train_steps": 40, "mode": "lora"}}
    assert expected_stage_seconds(get_settings(), "train", request) == pytest.approx(
        {"intake": 4.0, "training:stage2": 11.0})
    bigger = {**request, "training": {"max_train_steps": 400, "mode": "lora"}}
    assert expected_stage_seconds(get_settings(), "train", bigger) == pytest.approx(
        {"intake": 30.0, "training:stage2": 300.0})
    unseen = {**request, "preset": "sdxl"}
    assert expected_stage_seconds(get_settings(), "train", unseen) == {}  # no history: the measured pace
