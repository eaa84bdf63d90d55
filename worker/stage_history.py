"""How long each stage took in earlier jobs like this one: the ETA's estimate for a stage before it reports.

"Like this one" is the same kind, preset and size (:func:`size_of`: the request fields that set how much
work a job does). The median of the most recent finished stage runs (``job_stages``) is the estimate; a
stage with no such run is left out, and the ETA falls back to the job's measured pace for it.
"""

from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import select

from core.config import Settings
from core.db.models import Job, JobStage
from core.db.uow import UnitOfWork

RECENT_RUNS = 400  # stage rows of the kind read per estimate (newest first)
SAMPLES = 15  # the median of at most this many runs per stage (the newest)

_SIZE_FIELDS = {
    "training": ("mode", "strategy", "max_train_steps", "steps_per_photo", "max_steps_cap", "batch_size",
                 "resolution"),
    "generation": ("n", "k", "steps", "aspect", "width", "height", "upscale", "batch_size"),
}


def size_of(request: dict[str, Any]) -> tuple:
    """The preset and the request fields that decide how long a job's stages take."""
    signature: list[Any] = [request.get("preset")]
    for section, fields in _SIZE_FIELDS.items():
        body = request.get(section) or {}
        signature += [str(body.get(name)) for name in fields]
        signature.append(len(body.get("controlnets") or []))
    return tuple(signature)


def expected_stage_seconds(settings: Settings, kind: str, request: dict[str, Any]) -> dict[str, float]:
    """Median seconds of each stage over recent finished runs of jobs of ``kind`` with the same preset and size."""
    wanted = size_of(request)
    with UnitOfWork(settings) as uow:
        rows = uow.session.execute(
            select(JobStage.stage, JobStage.seconds, Job.request).join(Job, Job.id == JobStage.job_id)
            .where(JobStage.kind == kind, JobStage.seconds.is_not(None), JobStage.finished_at.is_not(None))
            .order_by(JobStage.finished_at.desc()).limit(RECENT_RUNS)).all()
    samples: dict[str, list[float]] = {}
    for stage, seconds, job_request in rows:
        runs = samples.setdefault(stage, [])
        if len(runs) < SAMPLES and size_of(job_request or {}) == wanted:
            runs.append(float(seconds))
    return {stage: statistics.median(runs) for stage, runs in samples.items() if runs}
