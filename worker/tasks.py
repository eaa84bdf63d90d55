"""Celery tasks: thin shells over :mod:`worker.runner`, :mod:`worker.recovery` and webhooks.

Imported by the worker only (``include=["worker.tasks"]``); the API enqueues by task name.
"""

from __future__ import annotations

import logging

from celery import Task
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from app.config import get_settings
from worker.celery_app import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, SWEEP_TASK, celery_app

log = logging.getLogger(__name__)

JOB_RETRY_BACKOFF_S = (5, 30, 120, 300)
WEBHOOK_BACKOFF_BASE_S = 2.0


def _consumed_queues(task: Task) -> set[str] | None:
    consumer = getattr(task.request, "hostname", None) and task.app.amqp.queues.consume_from
    return set(consumer) if consumer else None


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=len(JOB_RETRY_BACKOFF_S))
def run_job(self: Task, job_id: str) -> str:
    from worker.runner import TransientError, fail_after_retries, run_job as run

    try:
        return run(job_id, consumes=_consumed_queues(self))
    except TransientError as exc:
        if self.request.retries >= self.max_retries:
            fail_after_retries(job_id, str(exc))
            return "failed"
        raise self.retry(countdown=JOB_RETRY_BACKOFF_S[self.request.retries], exc=exc)


@celery_app.task(name=DELIVER_WEBHOOK_TASK, bind=True, acks_late=True, max_retries=None)
def deliver_webhook(self: Task, delivery_id: str) -> str:
    """POST one delivery; on failure retry with exponential backoff up to ``webhook_max_attempts``."""
    from app.webhooks import deliver

    settings = get_settings()
    ok = deliver(delivery_id)
    if ok:
        return "delivered"
    attempt = self.request.retries + 1
    if attempt >= settings.webhook_max_attempts:
        log.warning("webhook delivery %s gave up after %d attempts", delivery_id, attempt)
        return "gave_up"
    raise self.retry(countdown=webhook_backoff_s(attempt))


def webhook_backoff_s(attempt: int, base_s: float = WEBHOOK_BACKOFF_BASE_S) -> float:
    """1st retry after ``base_s``, then doubling (2, 4, 8, ... s), capped at an hour."""
    return min(base_s * 2 ** (attempt - 1), 3600.0)


@celery_app.task(name=SWEEP_TASK)
def sweep_stale_jobs() -> dict:
    from worker.recovery import sweep

    report = sweep()
    return {"requeued": report.requeued, "failed": report.failed}


_periodic = None


@worker_process_init.connect
def _fresh_connections(**_) -> None:
    """A forked pool process must not share the parent's pooled DB connections."""
    from app.db import session as db_session

    for engine in list(db_session._ENGINES.values()):
        engine.dispose(close=False)


@worker_ready.connect
def _start_recovery(sender=None, **_) -> None:
    """At worker start: sweep once, then keep sweeping from a thread of the main process."""
    global _periodic
    from worker.recovery import PeriodicSweep

    settings = get_settings()
    _periodic = PeriodicSweep(max(settings.job_stale_after_s / 2, 1.0), settings).start()


@worker_shutdown.connect
def _stop_recovery(sender=None, **_) -> None:
    if _periodic is not None:
        _periodic.stop()
