"""The queue port: how the API (and anything else) hands work to the workers, by task name.

``app/`` never imports ``worker/``: it sends :class:`likeness.contract.plan.Task` names to
the queues the job plan names. The Celery application configured here is the one the
workers run too (``worker.celery_app`` adds the task modules), so both sides agree on
broker, queues and delivery guarantees.

Queues: ``<prefix>gpu`` (training, generation) and ``<prefix>cpu`` (intake, webhooks,
sweeps). Embedded mode (no ``LIKENESS_BROKER_URL``) uses kombu's SQLAlchemy transport on a
SQLite file under ``data_dir``: no extra service, and messages survive restarts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from celery import Celery
from kombu import Exchange
from kombu import Queue as KombuQueue

from core.config import Settings, get_settings
from core.private_files import private_dir
from likeness.contract.plan import Queue, Task

log = logging.getLogger(__name__)

#: Seconds a send may take before the caller gives up (the outbox retries later).
SEND_TIMEOUT_S = 3.0


class TaskQueue(Protocol):
    def send(self, task: str, args: list[Any], queue: Queue, countdown: float | None = None) -> None:
        """Put one task message on ``queue``; raises when the broker cannot take it."""


def celery_config(settings: Settings) -> dict[str, Any]:
    queues = tuple(KombuQueue(settings.queue(q), Exchange(settings.queue(q), type="direct"),
                              routing_key=settings.queue(q)) for q in Queue)
    transport_options: dict[str, Any] = {}
    broker_url = settings.resolved_broker_url
    if broker_url.startswith(("redis://", "rediss://")):
        transport_options = {
            # A message unacked for this long is handed to another worker. Jobs can run longer
            # than that: the job row's claim check makes a duplicate delivery harmless.
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "global_keyprefix": settings.queue_prefix,
            "socket_connect_timeout": SEND_TIMEOUT_S,
            "socket_timeout": SEND_TIMEOUT_S,
            "max_retries": 0,
        }
    return dict(
        broker_url=broker_url,
        task_acks_late=True,  # a task killed mid-run is redelivered, not lost
        task_reject_on_worker_lost=True,  # ... including when its pool process is SIGKILLed
        worker_prefetch_multiplier=1,  # a GPU worker reserves one job at a time
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # job state lives in the jobs table: no Celery result backend
        task_queues=queues,
        task_default_queue=settings.queue(Queue.CPU),
        task_default_exchange=settings.queue(Queue.CPU),
        task_default_routing_key=settings.queue(Queue.CPU),
        broker_transport_options=transport_options,
        # A publish to an unreachable broker fails fast: the outbox row keeps the message.
        task_publish_retry=False,
        broker_connection_timeout=SEND_TIMEOUT_S,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # `likeness beat` (celery beat) sends the retention purge in distributed mode; the embedded
        # worker runs it from a timer instead (worker.tasks).
        beat_schedule={"retention-purge": {
            "task": str(Task.PURGE_EXPIRED), "schedule": float(settings.purge_interval_s),
            "options": {"queue": settings.queue(Queue.CPU), "routing_key": settings.queue(Queue.CPU),
                        "exchange": settings.queue(Queue.CPU), "expires": float(settings.purge_interval_s)}}},
    )


def make_celery(settings: Settings | None = None, include: tuple[str, ...] = ()) -> Celery:
    settings = settings or get_settings()
    if settings.embedded:
        private_dir(settings.data_dir)
    app = Celery("likeness", include=list(include))
    app.conf.update(celery_config(settings))
    return app


class CeleryQueue:
    """:class:`TaskQueue` over a Celery application (sending only)."""

    def __init__(self, settings: Settings, celery: Celery | None = None):
        self.settings = settings
        self.celery = celery or make_celery(settings)

    def send(self, task: str, args: list[Any], queue: Queue, countdown: float | None = None) -> None:
        name = self.settings.queue(Queue(queue))
        self.celery.send_task(str(task), args=args, queue=name, routing_key=name, exchange=name,
                              countdown=countdown, retry=False, ignore_result=True)


_QUEUES: dict[tuple[str, str], CeleryQueue] = {}
_QUEUES_LOCK = threading.Lock()


def task_queue(settings: Settings | None = None) -> TaskQueue:
    """The process's queue for ``settings`` (one Celery app and broker pool per broker and prefix)."""
    settings = settings or get_settings()
    key = (settings.resolved_broker_url, settings.queue_prefix)
    with _QUEUES_LOCK:
        if key not in _QUEUES:
            _QUEUES[key] = CeleryQueue(settings)
        return _QUEUES[key]
