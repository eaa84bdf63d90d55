"""Celery tasks: thin shells over :mod:`worker.runner`, webhooks and retention; the signals that start
a pool process (registry heartbeat, model manager) and the main process's timers (recovery sweep,
embedded-mode purge).

Imported by the worker only (``include=["worker.tasks"]``); the API sends them by name
(:class:`likeness.contract.plan.Task`).
"""

from __future__ import annotations

import logging

from celery import Task
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from core.config import get_settings
from core.db import session as db_session
from core.db.models import WebhookDelivery
from core.db.uow import UnitOfWork
from core.retention import purge_expired as purge
from core.storage import get_blob_store
from core.webhooks import backoff_s, record_and_send
from likeness.contract.plan import Queue
from likeness.contract.plan import Task as TaskName
from pipelines.models.presets import get_preset
from worker.celery_app import celery_app
from worker.jobs import worker_id
from worker.models import get_manager, resolve_budget, resolve_device
from worker.preemption import drain_pool, install_drain_handler
from worker.recovery import PeriodicSweep
from worker.registry import RegistryHeartbeat, status
from worker.retention import PeriodicPurge
from worker.runner import TransientError, fail_after_retries, is_transient
from worker.runner import run_job as run
from worker.template_photos import judge_template_photo as judge

log = logging.getLogger(__name__)

JOB_RETRY_BACKOFF_S = (5, 30, 120, 300)


def _consumed_queues(task: Task) -> set[str] | None:
    consumer = getattr(task.request, "hostname", None) and task.app.amqp.queues.consume_from
    return set(consumer) if consumer else None


def _delivered_from(task: Task) -> str | None:
    """The logical queue (``cpu``/``gpu``) the message came from, for the fair-share claim."""
    key = (getattr(task.request, "delivery_info", None) or {}).get("routing_key")
    settings = get_settings()
    return next((queue.value for queue in Queue if key and settings.queue(queue) == key), None)


@celery_app.task(name=TaskName.RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True,
                 max_retries=len(JOB_RETRY_BACKOFF_S))
def run_job(self: Task, job_id: str) -> str:
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
    if not record_and_send(delivery_id):
        return "done"
    with UnitOfWork() as uow:
        attempt = uow.session.get(WebhookDelivery, delivery_id).attempt
    raise self.retry(countdown=backoff_s(attempt, get_settings().webhook_backoff_first_s))


@celery_app.task(name=TaskName.JUDGE_TEMPLATE_PHOTO, bind=True, acks_late=True,
                 max_retries=len(JOB_RETRY_BACKOFF_S))
def judge_template_photo(self: Task, photo_id: str) -> str:
    """An uploaded template photo's verdict (worker.template_photos); storage or database away: later."""
    settings = get_settings()
    try:
        return judge(settings, get_blob_store(settings), photo_id)
    except Exception as exc:
        if not is_transient(exc) or self.request.retries >= self.max_retries:
            raise
        raise self.retry(countdown=JOB_RETRY_BACKOFF_S[self.request.retries], exc=exc) from exc


@celery_app.task(name=TaskName.PURGE_EXPIRED)
def purge_expired() -> dict:
    """Delete what the clients' retention says is due (sent by `likeness beat`; embedded: a timer)."""
    return purge().as_dict()


_periodic = None
_purge_timer = None


_registry = None


@worker_process_init.connect
def _start_pool_process(**_) -> None:
    """A forked pool process: fresh DB connections (never the parent's), and its registry heartbeat."""
    global _registry
    for engine in list(db_session._ENGINES.values()):
        engine.dispose(close=False)
    install_drain_handler()  # SIGTERM to the worker: this process's job is handed back (worker.preemption)
    settings = get_settings()
    queues = sorted(celery_app.amqp.queues.consume_from or ()) or [settings.queue(q) for q in Queue]
    device = resolve_device(settings.device)
    manager = get_manager(resolve_budget(settings.model_memory_budget, device), name=worker_id())
    status.watch(manager)
    _registry = RegistryHeartbeat(settings, queues, interval_s=settings.job_heartbeat_s).start()
    if device.startswith("cuda") and settings.queue(Queue.GPU) in queues:
        _preload_generation(manager, settings, device)  # ready before the first job: starting -> loading -> idle
    else:
        manager.mark_ready()  # load on first use


def _preload_generation(manager, settings, device: str) -> None:  # noqa: ANN001
    from pipelines.generation.engine import generation_models  # torch: only a GPU worker pays for it

    try:
        manager.preload(generation_models(get_preset(settings.preset, settings.resolved_model_cache_dir),
                                          device))
    except Exception:  # noqa: BLE001 - a job will report the missing model with its own clear error
        log.exception("preloading the %s models failed; loading on demand", settings.preset)
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
    settings = get_settings()
    _periodic = PeriodicSweep(settings.job_heartbeat_s, settings).start()
    _start_purge_timer(settings)


def _start_purge_timer(settings) -> None:  # noqa: ANN001
    """Embedded mode has no beat: the worker of the cpu queue purges expired data itself, every
    ``purge_interval_s`` (``likeness serve`` runs one worker per queue; one purges)."""
    global _purge_timer
    consumed = set(celery_app.amqp.queues.consume_from or ())
    if settings.embedded and _purge_timer is None and (not consumed or settings.queue(Queue.CPU) in consumed):
        _purge_timer = PeriodicPurge(settings.purge_interval_s, settings).start()


@worker_shutting_down.connect
def _drain(**_) -> None:
    """Warm shutdown (SIGTERM): running jobs checkpoint and go back to the queue now, not when they end."""
    drain_pool()


@worker_shutdown.connect
def _stop_recovery(sender=None, **_) -> None:
    for timer in (_periodic, _purge_timer):
        if timer is not None:
            timer.stop()
