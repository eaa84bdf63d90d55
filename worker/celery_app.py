"""The Celery application shared by the API (to enqueue) and the workers (to run).

Importing this module is cheap (no torch): the API imports it only to send tasks.
Queues: ``<prefix>gpu`` (train, generate) and ``<prefix>cpu`` (intake, webhooks, cleanup).

Embedded mode (no ``LIKENESS_BROKER_URL``) uses kombu's SQLAlchemy transport on a
SQLite file under ``data_dir``: no extra service, survives restarts, and a task whose
pool process dies is put back on the queue (``task_reject_on_worker_lost``). Its one
gap, a message lost when the whole worker is SIGKILLed, is covered by
:mod:`worker.recovery`, which requeues jobs whose heartbeat went stale.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from app.config import Settings, get_settings

RUN_JOB_TASK = "likeness.run_job"
DELIVER_WEBHOOK_TASK = "likeness.deliver_webhook"
SWEEP_TASK = "likeness.sweep_stale_jobs"

#: Job kinds whose first task needs no GPU (``train`` starts with intake on the CPU queue).
_CPU_FIRST_KINDS = {"train"}


def _queues(settings: Settings) -> tuple[Queue, ...]:
    return tuple(
        Queue(settings.queue(name), Exchange(settings.queue(name), type="direct"), routing_key=settings.queue(name))
        for name in ("gpu", "cpu")
    )


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker_url = settings.resolved_broker_url
    app = Celery("likeness", broker=broker_url, backend=settings.resolved_result_backend, include=["worker.tasks"])
    transport_options: dict = {}
    if broker_url.startswith(("redis://", "rediss://")):
        # A message unacked for this long is handed to another worker; jobs can run
        # longer than that, but the task's claim check makes a duplicate delivery harmless.
        transport_options = {"visibility_timeout": 3600, "global_keyprefix": settings.queue_prefix}
    app.conf.update(
        task_acks_late=True,  # a task killed mid-run is redelivered, not lost
        task_reject_on_worker_lost=True,  # ... including when its pool process is SIGKILLed
        worker_prefetch_multiplier=1,  # a GPU worker reserves one job at a time
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # job state lives in the jobs table, not in Celery results
        task_queues=_queues(settings),
        task_default_queue=settings.queue("cpu"),
        task_default_exchange=settings.queue("cpu"),
        task_default_routing_key=settings.queue("cpu"),
        broker_transport_options=transport_options,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


celery_app = make_celery()


def job_queue(kind: str, phase: str | None = None) -> str:
    """Queue for a job's next task: intake (the first phase of ``train``) on CPU, the rest on GPU."""
    settings = get_settings()
    if phase is None:
        phase = "intake" if kind in _CPU_FIRST_KINDS else "gpu"
    return settings.queue("cpu") if phase == "intake" else settings.queue("gpu")


def enqueue_job(job_id: str, kind: str, phase: str | None = None) -> None:
    """Send a job to the workers. Call only after the job row is committed."""
    queue = job_queue(kind, phase)
    celery_app.send_task(RUN_JOB_TASK, args=[str(job_id)], queue=queue, routing_key=queue, exchange=queue)

