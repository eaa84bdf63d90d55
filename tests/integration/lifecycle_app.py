"""Celery app for the job-lifecycle tests: the real worker with a scripted, slow job plan.

Everything is the production worker (claim, heartbeat, progress, cancel, redelivery,
recovery sweep, webhooks); only the ML inside the phases is replaced by timed steps,
so a test can kill or cancel a job at a known stage in seconds. Each phase run is
appended to ``<data_dir>/phase_runs.log`` so tests can see what was rerun.

    celery -A tests.integration.lifecycle_app worker ...
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipelines.progress import StageProgress, raise_if_canceled
from worker import stages
from worker.celery_app import celery_app  # noqa: F401  (the -A target)
from worker.stages import Phase, StageContext

STEP_S = float(os.environ.get("LIFECYCLE_STEP_S", "0.2"))
STEPS = int(os.environ.get("LIFECYCLE_STEPS", "10"))


def _log_run(ctx: StageContext, phase: str) -> None:
    with open(Path(ctx.settings.data_dir) / "phase_runs.log", "a") as log:
        log.write(f"{ctx.job.id} {phase} attempt={ctx.job.attempts}\n")


def _steps(ctx: StageContext, stage: str) -> None:
    progress = StageProgress(ctx.on_progress, stage, total=STEPS, min_interval_s=0.0)
    progress.start()
    for _ in range(STEPS):
        raise_if_canceled(ctx.should_stop)
        time.sleep(STEP_S)
        progress.advance()


def scripted_intake(ctx: StageContext) -> dict:
    _log_run(ctx, "intake")
    _steps(ctx, "intake")
    key = stages.dataset_prefix(ctx.job.subject_id, ctx.job.id) + "dataset.json"
    ctx.store.put(key, b'{"scripted": true}')
    return {"intake": {"accepted": 0, "scripted": True}}


def scripted_training(ctx: StageContext) -> dict:
    _log_run(ctx, "training")
    ctx.store.get(stages.dataset_prefix(ctx.job.subject_id, ctx.job.id) + "dataset.json")  # intake's output
    for stage in ("caching", "training:stage1", "training:stage2"):
        _steps(ctx, stage)
    return {"training": {"steps": 2 * STEPS}}


stages.PLANS["train"] = (
    Phase("intake", "cpu", ("intake",), scripted_intake),
    Phase("training", "gpu", ("caching", "training:stage1", "training:stage2"), scripted_training),
)
