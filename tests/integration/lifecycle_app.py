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

from PIL import Image

from core.storage import dataset_prefix
from likeness.contract.plan import JobKind, Stage
from likeness.contract.results import IntakeSummary, TrainingSummary, TrainResult
from pipelines.progress import StageProgress, raise_if_canceled
from worker import phases
from worker.celery_app import celery_app  # noqa: F401  (the -A target)
from worker.phases import PhaseContext

STEP_S = float(os.environ.get("LIFECYCLE_STEP_S", "0.1"))
STEPS = int(os.environ.get("LIFECYCLE_STEPS", "10"))


def _log_run(ctx: PhaseContext, phase: str) -> None:
    with open(Path(ctx.edge.settings.data_dir) / "phase_runs.log", "a") as log:
        log.write(f"{ctx.job.id} {phase} attempt={ctx.job.attempts}\n")


def _steps(ctx: PhaseContext, stage: str) -> None:
    progress = StageProgress(ctx.on_progress, stage, total=STEPS, min_interval_s=0.0)
    progress.start()
    for _ in range(STEPS):
        raise_if_canceled(ctx.should_stop)
        time.sleep(STEP_S)
        progress.advance()


def scripted_intake(ctx: PhaseContext) -> TrainResult:
    _log_run(ctx, "intake")
    _steps(ctx, Stage.INTAKE)
    key = dataset_prefix(ctx.job.subject_id, ctx.job.id) + "dataset.json"
    ctx.edge.store.put(key, b'{"scripted": true}')
    return TrainResult(intake=IntakeSummary(accepted=0, rejected=0, class_token="man", class_scores={}))


def scripted_training(ctx: PhaseContext) -> TrainResult:
    _log_run(ctx, "training")
    ctx.edge.store.get(dataset_prefix(ctx.job.subject_id, ctx.job.id) + "dataset.json")  # intake's output
    for stage in (Stage.CACHING, Stage.TRAINING_STAGE1, Stage.TRAINING_STAGE2):
        _steps(ctx, stage)
    # selecting: a preview per snapshot, as the real stage shows them (each a few steps' time apart)
    progress = StageProgress(ctx.on_progress, Stage.SELECTING, total=2, min_interval_s=0.0)
    progress.start()
    for step in (STEPS, 2 * STEPS):
        raise_if_canceled(ctx.should_stop)
        ctx.edge.training_preview(ctx.job, step, Image.effect_noise((64, 64), 40 + step).convert("RGB"))
        time.sleep(5 * STEP_S)
        progress.advance()
    return TrainResult(training=TrainingSummary(steps=2 * STEPS))


phases.PHASE_RUNNERS[(JobKind.TRAIN, "intake")] = scripted_intake
phases.PHASE_RUNNERS[(JobKind.TRAIN, "training")] = scripted_training
