"""Run one job: claim it, run its remaining phases, record the outcome, notify.

The Celery task (``worker.tasks.run_job``) is a thin shell around :func:`run_job`;
everything here works on ids and re-reads the database, so a duplicate or redelivered
message is harmless.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Collection
from datetime import datetime
from typing import Any

from core.config import Settings, get_settings
from core.db.models import Subject, utcnow
from core.db.session import database_unavailable
from core.db.uow import UnitOfWork
from core.storage import StorageError, get_blob_store, purge_subject_blobs
from likeness.contract.plan import JobKind, JobState, plan_for
from pipelines.errors import Canceled, PipelineError, Preempted
from worker import jobs, registry
from worker.checkpoints import discard_checkpoints
from worker.jobs import through_db_outage
from worker.models import get_manager, resolve_device
from worker.phases import PHASE_RUNNERS, PhaseContext
from worker.preemption import raise_if_draining
from worker.progress import JobProgress, JobProgressUpdate, Throttle
from worker.service_edge import ServiceEdge
from worker.stage_history import expected_stage_seconds

log = logging.getLogger(__name__)
stage_log = logging.getLogger("likeness.jobs")  # one structured line per stage (job_id, kind, stage, preset)

PREEMPTED = "preempted"  # the outcome of a job handed back at worker shutdown
INTERNAL_ERROR_MESSAGE = "an internal error stopped this job; the operators have the details"

class TransientError(Exception):
    """Infrastructure hiccup (storage, broker, database): release the job and retry later."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry: the same job may well succeed a minute later."""
    if isinstance(exc, PipelineError):
        return False
    if database_unavailable(exc) or isinstance(exc, (StorageError, ConnectionError, TimeoutError)):
        return True
    try:
        import botocore.exceptions as bexc

        if isinstance(exc, (bexc.EndpointConnectionError, bexc.ConnectionClosedError, bexc.ReadTimeoutError)):
            return True
        if isinstance(exc, bexc.ClientError):
            return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    except ImportError:  # pragma: no cover - boto3 is a dependency
        pass
    try:
        import kombu.exceptions
        import redis.exceptions

        return isinstance(exc, (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError))
    except ImportError:  # pragma: no cover
        return False


class _Heartbeat:
    """Background thread keeping ``heartbeat_at`` fresh while a long step runs without progress events."""

    def __init__(self, settings: Settings, job_id: str, interval_s: float):
        self.settings = settings
        self.job_id = job_id
        self.interval_s = interval_s
        self.lost = threading.Event()  # another process took the job over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not jobs.heartbeat(self.settings, self.job_id):
                    self.lost.set()
                    return
            except Exception:  # a DB hiccup must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_job(job_id: str, *, consumes: Collection[str] | None = None, settings: Settings | None = None,
            queue: str | None = None) -> str:
    """Run what is left of ``job_id`` here; returns what happened (for logs and tests).

    ``queue``: the queue the message came from; the worker then claims the fairest job waiting
    there, which may be another one (:mod:`worker.fair_share`).

    ``consumes``: broker queue names this worker listens to; when the job's next phase runs on
    another queue, the job is handed over to it. None runs every phase here.
    Raises :class:`TransientError` after releasing the job when a retry may help.
    """
    settings = settings or get_settings()
    try:
        claim = jobs.claim(settings, job_id, queue)
    except Exception as exc:
        if is_transient(exc):  # the database is away: the task retries later, the job stays queued
            raise TransientError(repr(exc)) from exc
        raise
    if claim.outcome in (jobs.ClaimOutcome.canceled, jobs.ClaimOutcome.lost):
        _ended(settings, claim.job)
    if claim.outcome is not jobs.ClaimOutcome.run:
        return claim.outcome.value
    job_id = claim.job.id
    registry.status.job(job_id)
    try:
        return _run_claimed(settings, claim.job, consumes)
    finally:
        registry.status.job(None)


def _run_claimed(settings: Settings, job: jobs.JobSnapshot, consumes: Collection[str] | None) -> str:
    job_id = job.id
    plan = plan_for(job.kind)

    def runs_here(phase) -> bool:  # noqa: ANN001
        return consumes is None or settings.queue(phase.queue) in consumes

    workdir = settings.data_dir.resolve() / "work" / job.id
    workdir.mkdir(parents=True, exist_ok=True)
    cancel_check = Throttle(1.0)
    cancel_seen = False
    preset = (job.request or {}).get("preset")

    with _Heartbeat(settings, job_id, settings.job_heartbeat_s) as beat:

        # While the database is away the pipeline keeps going: a progress update or a cancel check
        # is skipped (the next one retries); the phase's record waits for the database (through_db_outage).
        def should_stop() -> bool:
            nonlocal cancel_seen
            raise_if_draining()  # the worker is shutting down: Preempted
            if beat.lost.is_set():
                return True
            if not cancel_seen and cancel_check.ready():
                try:
                    cancel_seen = jobs.cancel_requested(settings, job_id)
                except Exception as exc:
                    if not database_unavailable(exc):
                        raise
                    log.warning("job %s: cancel check skipped, database unavailable", job_id)
            return cancel_seen

        # Stages that began since the last recorded write (a stage beginning while the database is away
        # still gets its row, opened at its own start, with the next write that gets through: progress or
        # the phase's record).
        started: list[tuple[str, datetime]] = []

        def write(update: JobProgressUpdate) -> None:
            if update.stage_started:
                # a cancel asked for during a stage shorter than the throttle's second is seen before this one works
                cancel_check.reset()
                # one line per stage: what a log reader follows a job by
                started.append((update.stage, utcnow()))
                stage_log.info("job %s %s: %s (preset %s, attempt %d)", job_id, job.kind, update.stage, preset,
                               job.attempts, extra={"job_id": job_id, "kind": str(job.kind), "stage": update.stage,
                                                    "preset": preset, "attempt": job.attempts})
            try:
                owned = jobs.write_progress(settings, job_id, job.kind, update.stage, update.progress, update.eta_s,
                                            started=list(started), attempt=job.attempts)
                started.clear()
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                log.warning("job %s: progress %s %.0f%% not recorded, database unavailable", job_id, update.stage,
                            update.progress)
                return
            if not owned:
                beat.lost.set()

        progress = JobProgress(job.kind, write, start_progress=job.progress, start_eta=job.eta_s,
                               expected_s=_stage_history(settings, job))
        edge = ServiceEdge(settings, get_blob_store(settings))
        ctx = PhaseContext(job, edge, get_manager(), resolve_device(settings.device),
                           settings.resolved_model_cache_dir, progress, should_stop, workdir)
        outcome = ""
        try:
            remaining = list(plan.remaining_phases(job.completed_stages))
            if remaining and not runs_here(remaining[0]):
                through_db_outage(f"job {job_id}: hand-over", jobs.complete_phase, settings, job_id, [], hand_over=True)
                return f"handed over to {settings.queue(remaining[0].queue)}"
            for index, phase in enumerate(remaining):
                log.info("job %s: %s (attempt %d)", job_id, phase.name, job.attempts)
                result = PHASE_RUNNERS[(JobKind(job.kind), phase.name)](ctx)
                following = remaining[index + 1] if index + 1 < len(remaining) else None
                hand_over = following is not None and not runs_here(following)
                stages = [str(s) for s in phase.stage_names]
                if not through_db_outage(f"job {job_id}: {phase.name} done", jobs.complete_phase, settings, job_id,
                                         stages, result.stored() if result else None, hand_over=hand_over,
                                         started=list(started)):
                    outcome = "lost"
                    break
                started.clear()
                if hand_over:
                    return f"handed over to {settings.queue(following.queue)}"
        except Preempted as exc:
            outcome = _hand_back(settings, job_id, exc)
        except Canceled:
            outcome = "lost" if beat.lost.is_set() else _end(settings, job_id, JobState.CANCELED, "canceled",
                                                             "canceled by request", started=started)
        except PipelineError as exc:
            log.info("job %s failed: %s (%s)", job_id, exc.message, exc.error_code)
            outcome = _end(settings, job_id, JobState.FAILED, exc.error_code, exc.message,
                           {"error_details": exc.details} if exc.details else None, started=started)
        except Exception as exc:
            if is_transient(exc):
                log.warning("job %s: transient error, will retry: %r", job_id, exc)
                try:
                    through_db_outage(f"job {job_id}: release", jobs.release, settings, job_id)
                except Exception:  # still away: the recovery sweep releases it once the heartbeat is stale
                    log.warning("job %s could not be released", job_id, exc_info=True)
                raise TransientError(repr(exc)) from exc
            log.exception("job %s failed with an internal error", job_id)
            outcome = _end(settings, job_id, JobState.FAILED, "internal_error", INTERNAL_ERROR_MESSAGE,
                           started=started)
        else:
            outcome = outcome or _end(settings, job_id, JobState.SUCCEEDED, started=started)
    if outcome == "lost":
        _purge_if_subject_deleted(settings, edge.store, job, workdir)
    elif outcome != PREEMPTED:  # terminal: no scratch space nor checkpoints needed
        shutil.rmtree(workdir, ignore_errors=True)
        _ended(settings, job, edge.store)
    return outcome


def _hand_back(settings: Settings, job_id: str, exc: Preempted) -> str:
    """The worker is shutting down: the job goes back to the queue with its lease released (its local
    scratch space and mirrored checkpoints stay for the next attempt)."""
    step = exc.details.get("checkpoint_step")
    if not through_db_outage(f"job {job_id}: hand back", jobs.hand_back, settings, job_id, step):
        return "lost"
    log.warning("job %s handed back at shutdown (training checkpointed at step %s)", job_id, step)
    return PREEMPTED


def _ended(settings: Settings, job: jobs.JobSnapshot | None, store=None) -> None:  # noqa: ANN001
    """The job reached a final state: nothing will resume its training, so its mirrored checkpoints go."""
    if job is not None and job.kind == JobKind.TRAIN.value:
        discard_checkpoints(settings, job.subject_id, job.id, store)


def _stage_history(settings: Settings, job: jobs.JobSnapshot) -> dict[str, float]:
    """What each stage took in earlier jobs like this one (none while the database is away)."""
    try:
        return expected_stage_seconds(settings, job.kind, job.request)
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        return {}


def _purge_if_subject_deleted(settings: Settings, store, job: jobs.JobSnapshot, workdir) -> None:  # noqa: ANN001
    """The subject was deleted while this job wrote blobs: remove what landed after the API's purge."""
    with UnitOfWork(settings) as uow:
        if uow.session.get(Subject, job.subject_id) is not None:
            return
    removed = purge_subject_blobs(store, job.subject_id)
    shutil.rmtree(workdir, ignore_errors=True)
    log.info("job %s: subject deleted meanwhile; removed %d late blobs", job.id, removed)


def _end(settings: Settings, job_id: str, state: JobState, code: str | None = None, message: str | None = None,
         result: dict[str, Any] | None = None, started: list[tuple[str, datetime]] | None = None) -> str:
    if not through_db_outage(f"job {job_id}: {state.value}", jobs.finish, settings, job_id, state, code, message,
                             result, started=started or ()):
        log.warning("job %s: no longer owned by this process; outcome %s dropped", job_id, state.value)
        return "lost"
    return state.value


def fail_after_retries(job_id: str, error: str, settings: Settings | None = None) -> None:
    """A transient error outlived its retries: the job fails instead of waiting forever."""
    settings = settings or get_settings()
    claim = jobs.claim(settings.model_copy(update={"job_stale_after_s": 0}), job_id)
    if claim.outcome is jobs.ClaimOutcome.run:
        _end(settings, job_id, JobState.FAILED, "infrastructure_error",
             "storage or database kept failing; try again later")
    if claim.outcome is not jobs.ClaimOutcome.skip:
        _ended(settings, claim.job)
    log.error("job %s gave up after transient errors: %s", job_id, error)
