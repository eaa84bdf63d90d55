"""The signals to scale workers on, per job queue (``cpu``, ``gpu``), read from the database.

The database, not the broker, knows what waits in embedded and distributed mode alike: a job waits for
the queue of its next phase (``likeness.contract.plan``) while it is ``queued``, or ``running`` with no
worker holding it (handed over between phases, or given back by a worker that stopped). For each queue:

* ``waiting``: jobs waiting for it;
* ``oldest_wait_s``: how long the oldest of them has waited (since it was created, or handed over);
* ``backlog_s``: the work waiting, in one worker's seconds: for each job the mean measured duration of
  the stages its next phase still has to run (``job_stages`` of the last 24 hours, the durations the
  dashboard shows); stages never measured count as nothing and are named in ``unmeasured``;
* ``workers``: live worker processes serving the queue (a heartbeat within the staleness limit);
* ``drain_s``: ``backlog_s`` shared by those workers, the time until what waits now has run; infinite
  when jobs wait and no worker serves the queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db.models import Job, JobStage, WorkerRecord
from likeness.contract.plan import PLANS, JobKind, JobState, Queue


@dataclass(frozen=True)
class QueueSignal:
    queue: str
    waiting: int
    oldest_wait_s: float
    backlog_s: float
    workers: int
    unmeasured: tuple[str, ...] = ()  # kind:stage pairs with no measured run: left out of backlog_s

    @property
    def drain_s(self) -> float:
        if self.waiting == 0 or self.backlog_s == 0:
            return 0.0
        return self.backlog_s / self.workers if self.workers else math.inf


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def mean_stage_seconds(session: Session, since: datetime) -> dict[tuple[str, str], float]:
    """(kind, stage) -> mean seconds of the stage runs finished since ``since``."""
    sums: dict[tuple[str, str], list[float]] = {}
    rows = session.execute(select(JobStage.kind, JobStage.stage, JobStage.seconds)
                           .where(JobStage.finished_at >= since, JobStage.seconds.is_not(None)))
    for kind, stage, seconds in rows:
        total = sums.setdefault((str(getattr(kind, "value", kind)), stage), [0.0, 0])
        total[0] += float(seconds)
        total[1] += 1
    return {key: total / count for key, (total, count) in sums.items()}


def live_workers(session: Session, settings: Settings, now: datetime) -> dict[str, int]:
    """Live worker processes per queue (a process serving both counts for both)."""
    counts = {queue.value: 0 for queue in Queue}
    names = {settings.queue(queue.value): queue.value for queue in Queue}
    cutoff = now - timedelta(seconds=settings.job_stale_after_s)
    for queues, state, heartbeat in session.execute(
            select(WorkerRecord.queues, WorkerRecord.state, WorkerRecord.heartbeat_at)):
        if state == "stopped" or _aware(heartbeat) < cutoff:
            continue
        for broker_name in queues or []:
            if broker_name in names:
                counts[names[broker_name]] += 1
    return counts


def queue_signals(session: Session, settings: Settings, now: datetime,
                  window: timedelta = timedelta(hours=24)) -> dict[str, QueueSignal]:
    """Waiting jobs, oldest wait, backlog and drain time of every queue (see the module's docstring)."""
    means = mean_stage_seconds(session, now - window)
    waiting = {queue.value: 0 for queue in Queue}
    oldest = {queue.value: 0.0 for queue in Queue}
    backlog = {queue.value: 0.0 for queue in Queue}
    unmeasured: dict[str, set[str]] = {queue.value: set() for queue in Queue}
    rows = session.execute(select(Job.kind, Job.state, Job.completed_stages, Job.created_at, Job.heartbeat_at)
                           .where((Job.state == JobState.QUEUED)
                                  | ((Job.state == JobState.RUNNING) & Job.worker.is_(None))))
    for kind, state, completed, created_at, heartbeat_at in rows:
        kind = JobKind(kind)
        remaining = PLANS[kind].remaining_phases(completed or [])
        if not remaining:
            continue
        phase, queue = remaining[0], remaining[0].queue.value
        since = created_at if JobState(state) == JobState.QUEUED else (heartbeat_at or created_at)
        waiting[queue] += 1
        oldest[queue] = max(oldest[queue], (now - _aware(since)).total_seconds())
        for stage in phase.stage_names:
            if stage.value in (completed or []):
                continue
            if (kind.value, stage.value) in means:
                backlog[queue] += means[(kind.value, stage.value)]
            else:
                unmeasured[queue].add(f"{kind.value}:{stage.value}")
    workers = live_workers(session, settings, now)
    return {queue: QueueSignal(queue, waiting[queue], max(oldest[queue], 0.0), backlog[queue], workers[queue],
                               tuple(sorted(unmeasured[queue]))) for queue in waiting}
