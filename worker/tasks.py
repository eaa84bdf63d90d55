"""Celery tasks: thin shells over :mod:`worker.runner`, :mod:`worker.recovery` and webhooks.

Imported by the worker only (``include=["worker.tasks"]``); the API sends them by name
(:class:`likeness.contract.plan.Task`).
"""

from __future__ import annotations

import logging
import os

from celery import Task
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from core.config import get_settings
from likeness.contract.plan import Task as TaskName
from worker.celery_app import celery_app

log = logging.getLogger(__name__)

JOB_RETRY_BACKOFF_S = (5, 30, 120, 300)
# Integration tests shrink webhook backoff (10 s, 30 s, ...) to keep the suite short.
WEBHOOK_BACKOFF_SCALE = float(os.environ.get("LIKENESS_TEST_WEBHOOK_BACKOFF_SCALE", "1"))


def _consumed_queues(task: Task) -> set[str] | None:
    consumer = getattr(task.request, "hostname", None) and task.app.amqp.queues.consume_from
    return set(consumer) if consumer else None


def _delivered_from(task: Task) -> str | None:
    """The logical queue (``cpu``/``gpu``) the message came from, for the fair-share claim."""
    from likeness.contract.plan import Queue

    key = (getattr(task.request, "delivery_info", None) or {}).get("routing_key")
    settings = get_settings()
    return next((queue.value for queue in Queue if key and settings.queue(queue) == key), None)


@celery_app.task(name=TaskName.RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True,
                 max_retries=len(JOB_RETRY_BACKOFF_S))
def run_job(self: Task, job_id: str) -> str:
    from worker.runner import TransientError, fail_after_retries
    from worker.runner import run_job as run

    try:
        return run(job_id, consumes=_consumed_queues(self), queue=_delivered_from(self))
    except TransientError as exc:
        if self.request.retries >= self.max_retries:
            fail_after_retries(job_id, str(exc))
            return "failed"
        raise self.retry(countdown=JOB_RETRY_BACKOFF_S[self.request.retries], exc=exc) from exc


@celery_app.task(name=TaskName.DELIVER_WEBHOOK, bind=True, acks_late=True, max_retries=None)
def deliver_webhook(self: Task, delivery_id: str) -> str:
    """POST one delivery; retry with ``core.webhooks.backoff_s`` until ``webhook_max_attempts``.

    The attempt count lives on the delivery row (``core.webhooks.record_and_send`` keeps
    it), so a redelivered message continues the series instead of restarting it.
    """
    from core.db.models import WebhookDelivery
    from core.db.uow import UnitOfWork
    from core.webhooks import backoff_s, record_and_send

    if not record_and_send(delivery_id):
        return "done"
    with UnitOfWork() as uow:
        attempt = uow.session.get(WebhookDelivery, delivery_id).attempt
    raise self.retry(countdown=backoff_s(attempt) * WEBHOOK_BACKOFF_SCALE)


@celery_app.task(name=TaskName.SWEEP)
def sweep() -> dict:
    from worker.recovery import sweep as run_sweep

    report = run_sweep()
    return {"requeued": report.requeued, "failed": report.failed, "outbox_sent": report.outbox_sent}


@celery_app.task(name=TaskName.PURGE_EXPIRED)
def purge_expired() -> dict:
    """Delete what the clients' retention says is due (sent by `likeness beat`; embedded: a timer)."""
    from core.retention import purge_expired as purge

    return purge().as_dict()


_periodic = None
_purge_timer = None


_registry = None


@worker_process_init.connect
def _start_pool_process(**_) -> None:
    """A forked pool process: fresh DB connections (never the parent's), and its registry heartbeat."""
    global _registry
    from core.db import session as db_session
    from worker.registry import RegistryHeartbeat, status

    for engine in list(db_session._ENGINES.values()):
        engine.dispose(close=False)
    from worker.preemption import install_drain_handler

    install_drain_handler()  # SIGTERM to the worker: this process's job is handed back (worker.preemption)
    from worker.jobs import worker_id
    from worker.models import get_manager, resolve_budget, resolve_device

    settings = get_settings()
    queues = sorted(celery_app.amqp.queues.consume_from or ()) or [settings.queue(q) for q in ("cpu", "gpu")]
    device = resolve_device(settings.device)
    manager = get_manager(resolve_budget(settings.model_memory_budget, device), name=worker_id())
    status.watch(manager)
    _registry = RegistryHeartbeat(settings, queues, interval_s=settings.job_heartbeat_s).start()
    if device.startswith("cuda") and settings.queue("gpu") in queues:
        _preload_generation(manager, settings, device)  # ready before the first job: starting -> loading -> idle
    else:
        manager.mark_ready()  # load on first use


def _preload_generation(manager, settings, device: str) -> None:  # noqa: ANN001
    from pipelines.generation.engine import generation_models
    from pipelines.models.presets import get_preset

    try:
        manager.preload(generation_models(get_preset(settings.model_preset, settings.resolved_model_cache_dir),
                                          device))
    except Exception:  # noqa: BLE001 - a job will report the missing model with its own clear error
        log.exception("preloading the %s models failed; loading on demand", settings.model_preset)
    manager.mark_ready()


@worker_process_shutdown.connect
def _stop_pool_process(**_) -> None:
    if _registry is not None:
        _registry.stop()


@worker_ready.connect
def _start_recovery(sender=None, **_) -> None:
    """At worker start: sweep once, then keep sweeping from a thread of the main process, once per
    heartbeat interval, so a job whose owner's lease expired is handed on within one more beat."""
    global _periodic
    from worker.recovery import PeriodicSweep

    settings = get_settings()
    _periodic = PeriodicSweep(settings.job_heartbeat_s, settings).start()
    _start_purge_timer(settings)


def _start_purge_timer(settings) -> None:  # noqa: ANN001
    """Embedded mode has no beat: the worker of the cpu queue purges expired data itself, every
    ``purge_interval_s`` (``likeness serve`` runs one worker per queue; one purges)."""
    global _purge_timer
    from worker.retention import PeriodicPurge

    consumed = set(celery_app.amqp.queues.consume_from or ())
    if settings.embedded and _purge_timer is None and (not consumed or settings.queue("cpu") in consumed):
        _purge_timer = PeriodicPurge(settings.purge_interval_s, settings).start()


@worker_shutting_down.connect
def _drain(**_) -> None:
    """Warm shutdown (SIGTERM): running jobs checkpoint and go back to the queue now, not when they end."""
    from worker.preemption import drain_pool

    drain_pool()


@worker_shutdown.connect
def _stop_recovery(sender=None, **_) -> None:
    for timer in (_periodic, _purge_timer):
        if timer is not None:
            timer.stop()
