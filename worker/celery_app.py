"""The Celery application shared by the API (to enqueue) and the workers (to run).

Importing this module is cheap (no torch): the API imports it only to send tasks.
Queues: ``<prefix>gpu`` (train, generate) and ``<prefix>cpu`` (intake, webhooks, cleanup).
"""

from __future__ import annotations

from celery import Celery

from app.config import get_settings

RUN_JOB_TASK = "likeness.run_job"
DELIVER_WEBHOOK_TASK = "likeness.deliver_webhook"


def make_celery() -> Celery:
    settings = get_settings()
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("likeness", broker=settings.resolved_broker_url, backend=settings.resolved_result_backend)
    app.conf.update(
        task_acks_late=True,  # a task killed mid-run is redelivered, not lost
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a GPU worker takes one job at a time
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue("cpu"),
        broker_transport_options={"visibility_timeout": 3600, "global_keyprefix": settings.queue_prefix}
        if settings.resolved_broker_url.startswith("redis")
        else {},
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app


celery_app = make_celery()


def job_queue(kind: str) -> str:
    """Queue a job's first task goes to: training and generation need the GPU; intake runs first on CPU."""
    settings = get_settings()
    return settings.queue("cpu") if kind == "train" else settings.queue("gpu")


def enqueue_job(job_id: str, kind: str) -> None:
    """Send a job to the workers. Call only after the job row is committed."""
    celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=job_queue(kind))
