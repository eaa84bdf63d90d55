"""Find jobs nobody is working on and put them back on a queue (or fail them).

A running job's owner holds a lease: ``heartbeat_at``, renewed every ``job_heartbeat_s``
(:class:`worker.runner._Heartbeat`). Redelivery (``acks_late`` + ``task_reject_on_worker_lost``)
covers a pool process that dies while its worker lives. It does not cover a whole worker (or
machine) lost: its Redis message waits out the broker's visibility timeout, the SQLite broker's
is gone. Nor an enqueue that failed after the commit. This sweep runs in every worker's main
process at start and then every ``job_heartbeat_s``:

* ``running`` with an owner whose lease expired (``heartbeat_at`` older than
  ``job_stale_after_s``): the owner died. Out of attempts -> ``failed``/``worker_lost``
  (its mirrored training checkpoints deleted); otherwise released (owner cleared) and
  requeued; the worker that claims it resumes training from the last mirrored checkpoint.
* ``running`` without owner (handed between queues) or ``queued``, untouched for
  ``job_requeue_after_s``: its message may be lost; requeue. A queue that is merely busy
  keeps such jobs waiting for minutes, hence the longer threshold.

A duplicate message (the sweep's and the broker's redelivery) never runs a job twice:
:func:`worker.jobs.claim` locks the row and skips a job whose owner is alive.

It also sends what the outbox still holds (task messages written while the broker was
down), purges expired idempotency records and deletes this machine's copies of deleted
adapters (:mod:`worker.adapter_cache`). Between sweeps the worker sends the outbox
every ``OUTBOX_FLUSH_S``, so work accepted during a broker outage starts seconds after the
broker is back, not a sweep interval later.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select

from core.config import Settings, get_settings
from core.db.models import Job, utcnow
from core.db.uow import UnitOfWork, flush_outbox
from core.retention import purge_idempotency_records
from likeness.contract.plan import JobState
from worker import jobs
from worker.adapter_cache import prune_local_adapters
from worker.checkpoints import discard_checkpoints

log = logging.getLogger(__name__)

#: how often a worker sends what the outbox holds (between full sweeps)
OUTBOX_FLUSH_S = 5.0


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    outbox_sent: int = 0
    idempotency_purged: int = 0
    adapter_copies_removed: list[str] = field(default_factory=list)


def sweep(settings: Settings | None = None, queue=None) -> SweepReport:  # noqa: ANN001 - core.queue.TaskQueue
    """One pass: requeue or fail lost jobs, send what the outbox still holds, purge old records."""
    settings = settings or get_settings()
    report = SweepReport()
    _recover_jobs(settings, report, queue)
    report.outbox_sent = flush_outbox(settings, queue)
    with UnitOfWork(settings) as uow:
        report.idempotency_purged = purge_idempotency_records(uow.session)
    report.adapter_copies_removed = prune_local_adapters(settings)
    if report.requeued or report.failed or report.outbox_sent:
        log.info("recovery sweep: requeued %s, failed %s, %d outbox messages sent", report.requeued, report.failed,
                 report.outbox_sent)
    return report


def _recover_jobs(settings: Settings, report: SweepReport, queue) -> None:  # noqa: ANN001
    stale_after = settings.job_stale_after_s
    now = utcnow()
    lease_cutoff = now - timedelta(seconds=stale_after)
    requeue_cutoff = now - timedelta(seconds=settings.job_requeue_after_s)
    failed_jobs: list[tuple[str, str]] = []
    with UnitOfWork(settings, queue=queue) as uow:
        unowned_since = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < requeue_cutoff)
        candidates = uow.session.execute(
            select(Job)
            .where(
                or_(
                    (Job.state == JobState.RUNNING) & Job.worker.is_not(None)
                    & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < lease_cutoff),
                    (Job.state == JobState.RUNNING) & Job.worker.is_(None) & unowned_since,
                    (Job.state == JobState.QUEUED) & (Job.updated_at < requeue_cutoff),
                )
            )
            .with_for_update(skip_locked=True)
        ).scalars().all()
        for job in candidates:
            if job.state == JobState.RUNNING and job.worker:
                if jobs.owner_alive(job.worker, job.heartbeat_at, stale_after):
                    continue
                if job.attempts >= job.max_attempts:
                    jobs.fail_lost(uow, job, now)
                    report.failed.append(job.id)
                    failed_jobs.append((job.subject_id, job.id))
                    continue
                log.warning("job %s: worker %s is gone; requeueing", job.id, job.worker)
                job.attempts += 1
                job.worker = None
            job.heartbeat_at = now
            job.updated_at = now
            uow.enqueue_job(job)  # the plan picks the queue of its next phase
            report.requeued.append(job.id)
    for subject_id, job_id in failed_jobs:  # after the commit: nobody will resume these
        discard_checkpoints(settings, subject_id, job_id)


class PeriodicSweep:
    """A daemon thread in the worker's main process: no Celery beat needed."""

    def __init__(self, interval_s: float, settings: Settings | None = None, outbox_every_s: float = OUTBOX_FLUSH_S):
        self.interval_s = max(interval_s, 1.0)
        self.outbox_every_s = max(min(outbox_every_s, self.interval_s), 0.5)
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="likeness-recovery", daemon=True)

    def start(self) -> PeriodicSweep:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        next_sweep = 0.0
        while True:
            try:
                if time.monotonic() >= next_sweep:
                    sweep(self.settings)
                    next_sweep = time.monotonic() + self.interval_s
                else:
                    flush_outbox(self.settings)
            except Exception:  # the database is away: try again at the next tick
                log.warning("recovery sweep failed", exc_info=True)
            if self._stop.wait(self.outbox_every_s):
                return
