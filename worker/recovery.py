"""Find jobs nobody is working on and put them back on a queue (or fail them).

Redelivery (``acks_late`` + ``task_reject_on_worker_lost``) covers a pool process that
dies. It does not cover a message that vanished: a whole worker SIGKILLed on the SQLite
broker, a Redis message waiting out its visibility timeout, an enqueue that failed after
the commit. This sweep runs at worker start and then every ``job_stale_after_s / 2``:

* ``running`` with a stale heartbeat and an owner: the owner died. Out of attempts ->
  ``failed``/``worker_lost``; otherwise released (owner cleared) and requeued; the
  next claim counts the attempt.
* ``running`` without owner (handed between queues) or ``queued``, untouched for
  ``job_stale_after_s``: its message may be lost; requeue (a duplicate is ignored by
  the claim).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select

from app.config import Settings, get_settings
from app.db.models import Job, JobState, utcnow
from app.db.session import session_scope
from app.webhooks import send_deliveries
from worker import jobs

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def sweep(settings: Settings | None = None, enqueue=None) -> SweepReport:
    settings = settings or get_settings()
    if enqueue is None:
        from worker.celery_app import enqueue_job as enqueue
    stale_after = settings.job_stale_after_s
    cutoff = utcnow() - timedelta(seconds=stale_after)
    report = SweepReport()
    to_enqueue: list[tuple[str, str, str | None]] = []
    webhooks: list[str | None] = []
    with session_scope() as session:
        candidates = session.execute(
            select(Job)
            .where(
                or_(
                    (Job.state == JobState.running) & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                    (Job.state == JobState.queued) & (Job.updated_at < cutoff),
                )
            )
            .with_for_update(skip_locked=True)
        ).scalars().all()
        now = utcnow()
        for job in candidates:
            if job.state == JobState.running and job.worker:
                if jobs.owner_alive(job.worker, job.heartbeat_at, stale_after):
                    continue
                if job.attempts >= job.max_attempts:
                    jobs.set_terminal(job, JobState.failed, "worker_lost", jobs.WORKER_LOST_MESSAGE.format(n=job.attempts), now)
                    webhooks.append(jobs.queue_webhook(session, job))
                    report.failed.append(job.id)
                    continue
                log.warning("job %s: worker %s is gone; requeueing", job.id, job.worker)
                job.attempts += 1
                job.worker = None
            job.heartbeat_at = now
            job.updated_at = now
            phase = "intake" if "intake" not in (job.completed_stages or []) and job.kind.value == "train" else "gpu"
            to_enqueue.append((job.id, job.kind.value, phase))
            report.requeued.append(job.id)
    for job_id, kind, phase in to_enqueue:  # after the commit
        enqueue(job_id, kind, phase)
    send_deliveries(webhooks)
    if report.requeued or report.failed:
        log.info("recovery sweep: requeued %s, failed %s", report.requeued, report.failed)
    return report


class PeriodicSweep:
    """A daemon thread in the worker's main process: no Celery beat needed."""

    def __init__(self, interval_s: float, settings: Settings | None = None):
        self.interval_s = max(interval_s, 1.0)
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="likeness-recovery", daemon=True)

    def start(self) -> "PeriodicSweep":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                sweep(self.settings)
            except Exception:
                log.warning("recovery sweep failed", exc_info=True)
            if self._stop.wait(self.interval_s):
                return
