"""Job state changes -> webhook deliveries (rows written by ``app.webhooks``, sent by a CPU task)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def job_changed(job_id: str) -> None:
    """Record a webhook delivery for the job's current state (if its client has a URL) and send it.

    Never raises: a webhook problem must not change a job's outcome.
    """
    try:
        from app.webhooks import record_job_event
    except ImportError:
        log.debug("app.webhooks.record_job_event not available; no webhook for job %s", job_id)
        return
    try:
        from app.db.session import session_scope
        from worker.celery_app import enqueue_webhook

        with session_scope() as session:
            delivery_ids = record_job_event(session, job_id)
        for delivery_id in _as_list(delivery_ids):
            enqueue_webhook(delivery_id)
    except Exception:
        log.exception("could not queue the webhook of job %s", job_id)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [getattr(v, "id", v) for v in value]
    return [getattr(value, "id", value)]
