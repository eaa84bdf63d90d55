"""The job plan: kinds, states, phases, stages, queues, progress weights and allowed state
changes, defined once and imported by the API, the workers, the recovery sweep and clients.

Like Celery's ``celery/states.py``, it also holds the sets of states callers test against
(:data:`ACTIVE_STATES`, :data:`TERMINAL_STATES`, :data:`UNSUCCESSFUL_STATES`): nobody spells a
state or a stage as a string. :class:`Stage` is defined in :mod:`pipelines.progress` because the
pipelines, the one room below this one, emit it; everyone else imports it from here.

A job of a kind runs its phases in order. Each phase runs on one queue (``cpu`` or ``gpu``)
and covers client-visible stages; each stage owns a share of the job's 0-100 progress.
Everything else is derived from :data:`PLANS`: where a job is routed next, how far along it
is, which stages a recovered job still has to run.

Adding a job kind (or a stage) means adding it here, plus a request model in
:mod:`likeness.contract.requests` and the phase runner in ``worker/phases.py``. Template mode
was added that way: ``JobKind.TEMPLATE``, its plan below (one ``templating`` phase on the GPU
queue with a ``masking`` stage before the shared ones), ``TemplateRequest`` ->
``ResolvedTemplate``, and ``PHASE_RUNNERS[(JobKind.TEMPLATE, "templating")]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from pipelines.progress import Stage

__all__ = [
    "ACTIVE_STATES",
    "PLANS",
    "TERMINAL_STATES",
    "UNSUCCESSFUL_STATES",
    "IllegalTransition",
    "JobKind",
    "JobPlan",
    "JobState",
    "Phase",
    "Queue",
    "Stage",
    "StageShare",
    "Task",
    "can_transition",
    "plan_for",
    "transition",
]


class JobKind(StrEnum):
    TRAIN = "train"  # photos -> intake -> staged fine-tuning -> adapter
    GENERATE = "generate"  # adapter + style -> n candidates -> best k, upscaled
    TEMPLATE = "template"  # adapter + template photo -> the subject inpainted into it, n candidates -> best k


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


#: Not finished: the job holds its subject's place in the queues, counts against concurrency limits,
#: and is canceled with its subject.
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})
#: Finished, for good: a job never leaves one (a retry is a new job).
TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})
#: Finished without a result: the job has an error code, and an admin may retry it.
UNSUCCESSFUL_STATES = frozenset({JobState.FAILED, JobState.CANCELED})

#: Every state change a job may make. A job never leaves a terminal state: a retry is a new job.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELED: frozenset(),
}


class Queue(StrEnum):
    CPU = "cpu"  # intake, webhooks, sweeps: any machine
    GPU = "gpu"  # training and generation: one job at a time per GPU worker


class Task(StrEnum):
    """Celery task names: the API sends them by name and never imports the worker."""

    RUN_JOB = "likeness.run_job"
    DELIVER_WEBHOOK = "likeness.deliver_webhook"
    PURGE_EXPIRED = "likeness.purge_expired"  # retention (core.retention), on a schedule
    JUDGE_TEMPLATE_PHOTO = "likeness.judge_template_photo"  # an uploaded template photo's verdict (cpu queue)


@dataclass(frozen=True)
class StageShare:
    stage: Stage
    weight: float  # relative share of the job's progress (rough wall-time share on a GPU)


@dataclass(frozen=True)
class Phase:
    """A unit of work that runs on one queue and whose outputs are persisted when it ends,
    so a job interrupted later resumes at the next phase."""

    name: str
    queue: Queue
    stages: tuple[StageShare, ...]

    @property
    def stage_names(self) -> tuple[Stage, ...]:
        return tuple(share.stage for share in self.stages)


@dataclass(frozen=True)
class JobPlan:
    kind: JobKind
    phases: tuple[Phase, ...]

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(stage for phase in self.phases for stage in phase.stage_names)

    @property
    def _weights(self) -> dict[Stage, float]:
        return {share.stage: share.weight for phase in self.phases for share in phase.stages}

    def share(self, stage: str) -> float:
        """The stage's share of the job's 0-100 progress."""
        weights = self._weights
        return 100.0 * weights[Stage(stage)] / sum(weights.values())

    def start_of(self, stage: str) -> float:
        """Job progress (0-100) at which ``stage`` begins."""
        stages = self.stages
        return sum(self.share(s) for s in stages[: stages.index(Stage(stage))])

    def progress(self, stage: str, fraction: float) -> float:
        """Job progress (0-100) when ``stage`` is ``fraction`` (0..1) done."""
        return min(100.0, self.start_of(stage) + self.share(stage) * min(max(float(fraction), 0.0), 1.0))

    def shows(self, stage: str) -> bool:
        return stage in self.stages

    def remaining_phases(self, completed_stages: Iterable[str]) -> tuple[Phase, ...]:
        done = set(completed_stages)
        return tuple(phase for phase in self.phases if not set(phase.stage_names) <= done)

    def next_queue(self, completed_stages: Iterable[str]) -> Queue:
        """The queue of the first phase still to run (the last one's when all are done)."""
        remaining = self.remaining_phases(completed_stages)
        return (remaining[0] if remaining else self.phases[-1]).queue


PLANS: dict[JobKind, JobPlan] = {
    JobKind.TRAIN: JobPlan(JobKind.TRAIN, (
        Phase("intake", Queue.CPU, (StageShare(Stage.INTAKE, 10),)),
        Phase("training", Queue.GPU, (
            StageShare(Stage.CACHING, 5),
            StageShare(Stage.TRAINING_STAGE1, 30),
            StageShare(Stage.TRAINING_STAGE2, 47),
            StageShare(Stage.SELECTING, 8),  # checkpoint selection (skipped when turned off)
        )),
    )),
    JobKind.GENERATE: JobPlan(JobKind.GENERATE, (
        Phase("generation", Queue.GPU, (
            StageShare(Stage.GENERATING, 50),
            StageShare(Stage.REFINING, 10),  # img2img at strength 0.35 on each face crop: about a fifth of generating
            StageShare(Stage.RANKING, 10),
            StageShare(Stage.UPSCALING, 20),
            StageShare(Stage.DELIVERING, 10),
        )),
    )),
    JobKind.TEMPLATE: JobPlan(JobKind.TEMPLATE, (
        Phase("templating", Queue.GPU, (
            StageShare(Stage.MASKING, 5),
            StageShare(Stage.GENERATING, 50),
            StageShare(Stage.REFINING, 10),
            StageShare(Stage.RANKING, 10),
            StageShare(Stage.UPSCALING, 15),
            StageShare(Stage.DELIVERING, 10),
        )),
    )),
}


def plan_for(kind: str) -> JobPlan:
    return PLANS[JobKind(kind)]


# ---- state changes ------------------------------------------------------------------------------------------


class IllegalTransition(Exception):
    """A state change the lifecycle does not allow (e.g. out of a terminal state)."""

    def __init__(self, current: str, target: str):
        super().__init__(f"a {current} job cannot become {target}")
        self.current, self.target = current, target


class JobRecord(Protocol):
    """What :func:`transition` reads and writes: the job row (or any object with these fields)."""

    state: JobState
    error_code: str | None
    error_message: str | None
    progress: float
    eta_s: float | None
    started_at: datetime | None
    finished_at: datetime | None


def can_transition(current: str, target: str) -> bool:
    return JobState(target) in ALLOWED_TRANSITIONS[JobState(current)]


def transition(job: JobRecord, target: JobState, now: datetime, *, code: str | None = None,
               message: str | None = None) -> None:
    """Move ``job`` to ``target`` and fill the fields that go with it.

    The one way a job's state changes, used by the API (cancel), the worker (claim, finish)
    and the recovery sweep (worker lost). Failing and canceling need an error code.
    """
    current = JobState(job.state)
    target = JobState(target)
    if not can_transition(current, target):
        raise IllegalTransition(current, target)
    if target in (JobState.FAILED, JobState.CANCELED) and not code:
        raise ValueError(f"a {target} job needs an error code")
    job.state = target
    if target == JobState.RUNNING:
        job.started_at = job.started_at or now
        return
    job.finished_at = now
    job.error_code = None if target == JobState.SUCCEEDED else code
    job.error_message = None if target == JobState.SUCCEEDED else message
    job.eta_s = 0.0 if target == JobState.SUCCEEDED else None
    if target == JobState.SUCCEEDED:
        job.progress = 100.0
