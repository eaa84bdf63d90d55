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

from app.config import Settings, get_settings
from app.db.models import JobState
from app.storage import get_blob_store
from pipelines.errors import Canceled, PipelineError
from app.webhooks import send_deliveries
from worker import jobs
from worker.progress import JobProgress, JobProgressUpdate, Throttle
from worker.stages import PLANS, StageContext

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "an internal error stopped this job; the operators have the details"


class TransientError(Exception):
    """Infrastructure hiccup (storage, broker, database): release the job and retry later."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry: the same job may well succeed a minute later."""
    import sqlalchemy.exc

    if isinstance(exc, PipelineError):
        return False
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
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

    def __init__(self, job_id: str, interval_s: float):
        self.job_id = job_id
        self.interval_s = interval_s
        self.lost = threading.Event()  # another process took the job over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not jobs.heartbeat(self.job_id):
                    self.lost.set()
                    return
            except Exception:  # a DB hiccup must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_job(
    job_id: str,
    *,
    consumes: Collection[str] | None = None,
    settings: Settings | None = None,
    enqueue=None,
) -> str:
    """Run what is left of ``job_id`` here; returns what happened (for logs and tests).

    ``consumes``: queue names this worker listens to; a phase bound to another queue is
    handed over to it (``enqueue(job_id, kind, phase_queue)``). None runs every phase here.
    Raises :class:`TransientError` after releasing the job when a retry may help.
    """
    settings = settings or get_settings()
    if enqueue is None:
        from worker.celery_app import enqueue_job as enqueue
    claim = jobs.claim(job_id, settings.job_stale_after_s)
    send_deliveries([claim.webhook])
    if claim.outcome is not jobs.ClaimOutcome.run:
        return claim.outcome.value
    job = claim.job

    workdir = settings.data_dir.resolve() / "work" / job.id
    workdir.mkdir(parents=True, exist_ok=True)
    cancel_check = Throttle(1.0)
    cancel_seen = False

    with _Heartbeat(job_id, settings.job_heartbeat_s) as beat:

        def should_stop() -> bool:
            nonlocal cancel_seen
            if beat.lost.is_set():
                return True
            if not cancel_seen and cancel_check.ready():
                cancel_seen = jobs.cancel_requested(job_id)
            return cancel_seen

        def write(update: JobProgressUpdate) -> None:
            if not jobs.write_progress(job_id, update.stage, update.progress, update.eta_s):
                beat.lost.set()

        progress = JobProgress(job.kind, write, start_progress=job.progress)
        ctx = StageContext(job, settings, get_blob_store(settings), progress, should_stop, workdir)
        done = set(job.completed_stages)
        outcome = ""
        try:
            for phase in PLANS[job.kind]:
                if set(phase.stages) <= done:
                    continue
                queue = settings.queue(phase.queue)
                if consumes is not None and queue not in consumes:
                    if jobs.complete_stages(job_id, [], release=True):
                        enqueue(job_id, job.kind, phase.queue)
                    return f"handed over to {queue}"
                log.info("job %s: %s (attempt %d)", job_id, phase.name, job.attempts)
                result = phase.run(ctx)
                if not jobs.complete_stages(job_id, list(phase.stages), result):
                    outcome = "lost"
                    break
                done |= set(phase.stages)
        except Canceled:
            outcome = "lost" if beat.lost.is_set() else _end(job_id, JobState.canceled, "canceled", "canceled by request")
        except PipelineError as exc:
            log.info("job %s failed: %s (%s)", job_id, exc.message, exc.error_code)
            outcome = _end(job_id, JobState.failed, exc.error_code, exc.message)
        except Exception as exc:
            if is_transient(exc):
                log.warning("job %s: transient error, will retry: %r", job_id, exc)
                jobs.release(job_id)
                raise TransientError(repr(exc)) from exc
            log.exception("job %s failed with an internal error", job_id)
            outcome = _end(job_id, JobState.failed, "internal_error", INTERNAL_ERROR_MESSAGE)
        else:
            outcome = outcome or _end(job_id, JobState.succeeded)
    if outcome == "lost":
        _purge_if_subject_deleted(ctx)
    else:  # a terminal job needs no scratch space (a retry would have resumed from it)
        shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _purge_if_subject_deleted(ctx: StageContext) -> None:
    """The subject was deleted while this job wrote blobs: remove what landed after the API's purge."""
    from app.db.models import Subject
    from app.db.session import session_scope
    from app.storage import subject_prefix

    with session_scope() as session:
        if session.get(Subject, ctx.job.subject_id) is not None:
            return
    removed = ctx.store.delete_prefix(subject_prefix(ctx.job.subject_id))
    shutil.rmtree(ctx.workdir, ignore_errors=True)
    log.info("job %s: subject deleted meanwhile; removed %d late blobs", ctx.job.id, removed)


def _end(job_id: str, state: JobState, code: str | None = None, message: str | None = None) -> str:
    finished = jobs.finish(job_id, state, code, message)
    if finished is None:
        log.warning("job %s: no longer owned by this process; outcome %s dropped", job_id, state.value)
        return "lost"
    send_deliveries([finished.webhook])
    return state.value


def fail_after_retries(job_id: str, error: str) -> None:
    """A transient error outlived its retries: the job fails instead of waiting forever."""
    if jobs.claim(job_id, stale_after_s=0).outcome is jobs.ClaimOutcome.run:
        _end(job_id, JobState.failed, "infrastructure_error", "storage or database kept failing; try again later")
    log.error("job %s gave up after transient errors: %s", job_id, error)

