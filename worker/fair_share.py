"""Fair share of a queue's workers between clients, and between the end users of one client.

Celery stays the transport, but a task message is only a wake-up: the worker that takes a message
claims the *fairest* job waiting on that queue (:func:`worker.jobs.claim`), which may not be the one
the message names. Every waiting job has a message, so each message consumed starts one waiting job
and none is left without a wake-up.

The rule is :func:`pick_fairest`: the client with the least recent time on the queue's workers,
divided by its ``priority`` (admin-set, default 1; a client with priority 2 gets twice the share of
one with 1), goes first; within that client, its end user with the least recent time (a subject's
``external_ref``, e.g. the bot's ``tg:<user id>``; a subject without one is its own end user); within
that end user, the oldest job. Ties go to the oldest job. "Recent" is the last
``fair_share_window_s`` seconds of ``job_stages`` rows (the dashboard's stage timeline; running
stages count up to now), so a client's heavy use an hour ago does not hold it back today.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from core.db.models import Client, Job, JobStage, Subject, utcnow
from likeness.contract.plan import PLANS, JobState, Queue, plan_for

#: how many of the oldest waiting jobs a claim considers (a bound on the claim's cost, not on fairness
#: in practice: a client with more waiting jobs than this is the one that waits anyway)
MAX_CANDIDATES = 500


@dataclass(frozen=True)
class Waiting:
    """A job waiting for a worker of one queue."""

    job_id: str
    client_id: str
    end_user: str
    created_at: datetime


@dataclass(frozen=True)
class Usage:
    """Recent seconds on the queue's workers, per client and per (client, end user); priorities per client."""

    client_s: Mapping[str, float]
    end_user_s: Mapping[tuple[str, str], float]
    priority: Mapping[str, float]


def pick_fairest(waiting: Sequence[Waiting], usage: Usage) -> Waiting | None:
    """The job to run next: the least served client (recent seconds / priority), then its least served
    end user, then that end user's oldest job; ties go to the oldest job. None when nothing waits."""
    if not waiting:
        return None

    def client_share(job: Waiting) -> float:
        return usage.client_s.get(job.client_id, 0.0) / max(usage.priority.get(job.client_id, 1.0), 1e-9)

    return min(waiting, key=lambda job: (client_share(job), usage.end_user_s.get((job.client_id, job.end_user), 0.0),
                                         job.created_at, job.job_id))


def queue_stages(queue: Queue | str) -> dict[str, set[str]]:
    """Job kind -> the stages that run on ``queue`` (what counts as time on its workers)."""
    stages: dict[str, set[str]] = defaultdict(set)
    for kind, plan in PLANS.items():
        for phase in plan.phases:
            if phase.queue == queue:
                stages[kind.value].update(str(s) for s in phase.stage_names)
    return stages


def _end_user():  # noqa: ANN202
    return func.coalesce(Subject.external_ref, Subject.id)


def waiting_jobs(session: Session, queue: Queue | str) -> list[Waiting]:
    """Jobs waiting for a worker of ``queue`` (queued, or handed over / handed back with no owner; one with a
    cancel requested too: claimed, it ends, and its message stays a wake-up for another), oldest first.

    Locked for this transaction: every claim of the queue waits for the one before it (claims take
    milliseconds), so two workers never pick the same job."""
    rows = session.execute(
        select(Job.id, Job.client_id, _end_user(), Job.created_at, Job.kind, Job.completed_stages)
        .join(Subject, Subject.id == Job.subject_id)
        .where(Job.state.in_((JobState.QUEUED, JobState.RUNNING)), Job.worker.is_(None))
        .order_by(Job.created_at, Job.id).limit(MAX_CANDIDATES)
        .with_for_update(of=Job)
    ).all()
    return [Waiting(job_id, client_id, end_user, created_at)
            for job_id, client_id, end_user, created_at, kind, done in rows
            if plan_for(kind).next_queue(done or ()) == queue]


def recent_usage(session: Session, queue: Queue | str, client_ids: Iterable[str], window_s: float) -> Usage:
    """Seconds of ``queue``'s stages per client and end user over the last ``window_s`` seconds."""
    client_ids = sorted(set(client_ids))
    now = utcnow()
    on_queue = or_(*(and_(JobStage.kind == kind, JobStage.stage.in_(sorted(stages)))
                     for kind, stages in queue_stages(queue).items()))
    rows = session.execute(
        select(Job.client_id, _end_user(), JobStage.seconds, JobStage.started_at)
        .join(Job, Job.id == JobStage.job_id).join(Subject, Subject.id == Job.subject_id)
        .where(Job.client_id.in_(client_ids), JobStage.started_at >= now - timedelta(seconds=window_s), on_queue)
    ).all()
    client_s: dict[str, float] = defaultdict(float)
    end_user_s: dict[tuple[str, str], float] = defaultdict(float)
    for client_id, end_user, seconds, started_at in rows:
        if seconds is None:  # still running: counts up to now
            started = started_at if started_at.tzinfo else started_at.replace(tzinfo=now.tzinfo)
            seconds = max((now - started).total_seconds(), 0.0)
        client_s[client_id] += seconds
        end_user_s[(client_id, end_user)] += seconds
    priority = dict(session.execute(select(Client.id, Client.priority).where(Client.id.in_(client_ids))).all())
    return Usage(client_s, end_user_s, {k: float(v or 1.0) for k, v in priority.items()})


def fairest_waiting(session: Session, queue: Queue | str, window_s: float) -> str | None:
    """The id of the job a worker of ``queue`` should claim now (:func:`pick_fairest`), or None."""
    waiting = waiting_jobs(session, queue)
    if len(waiting) <= 1:
        return waiting[0].job_id if waiting else None
    chosen = pick_fairest(waiting, recent_usage(session, queue, (w.client_id for w in waiting), window_s))
    return chosen.job_id if chosen else None
