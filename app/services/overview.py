"""What an operator looks at first: aggregates over jobs, stage runs, workers, queues and storage.

Read-only queries for the admin dashboard (every client's data: callers are admins). Time
buckets and percentiles are computed in Python over bounded windows (the last 24 hours by
default), so the same code runs on PostgreSQL and on the embedded SQLite database.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.metrics import QueueDepthCollector
from app.services import clients
from app.services.quotas import stored_bytes
from app.services.scaling import QueueSignal, queue_signals
from core.config import Settings
from core.db.models import Adapter, Image, Job, JobStage, OutboxMessage, Photo, Subject, WorkerRecord
from core.storage import BlobStore, subject_prefix
from likeness.contract.plan import ACTIVE_STATES, PLANS, JobState, Queue
from likeness.contract.results import IntakeSummary, TrainingSummary, TrainResult, read_result

log = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)


def aware(moment: datetime | None) -> datetime | None:
    """SQLite returns naive UTC datetimes; PostgreSQL aware ones. Always aware UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- jobs ---------------------------------------------------------------------------------------------------


def jobs_by_state(session: Session, since: datetime) -> dict[JobState, int]:
    """Jobs created since ``since`` by state (every state present, in lifecycle order)."""
    counts = {state: 0 for state in JobState}
    rows = session.execute(select(Job.state, func.count()).where(Job.created_at >= since).group_by(Job.state))
    for state, count in rows:
        counts[JobState(state)] = count
    return counts


@dataclass(frozen=True)
class HourBucket:
    start: datetime
    counts: dict[JobState, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def jobs_per_hour(session: Session, now: datetime, hours: int = 24) -> list[HourBucket]:
    """Jobs created in each of the last ``hours`` whole hours (the last bucket is the current hour),
    by their state now."""
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - timedelta(hours=hours)
    buckets = [HourBucket(start + timedelta(hours=i), {state: 0 for state in JobState}) for i in range(hours)]
    for created_at, state in session.execute(select(Job.created_at, Job.state).where(Job.created_at >= start)):
        index = int((aware(created_at) - start).total_seconds() // 3600)
        if 0 <= index < hours:
            buckets[index].counts[JobState(state)] += 1
    return buckets


@dataclass(frozen=True)
class StageStats:
    kind: str
    stage: str
    runs: int
    p50: float | None
    p95: float | None


def stage_durations(session: Session, since: datetime) -> list[StageStats]:
    """Per job kind and stage: finished stage runs since ``since`` with their p50 and p95 seconds,
    in the job plan's order (stages without runs are listed with ``runs=0``)."""
    samples: dict[tuple[str, str], list[float]] = {}
    rows = session.execute(select(JobStage.kind, JobStage.stage, JobStage.seconds)
                           .where(JobStage.finished_at >= since, JobStage.seconds.is_not(None)))
    for kind, stage, seconds in rows:
        samples.setdefault((str(getattr(kind, "value", kind)), stage), []).append(float(seconds))
    stats = []
    for kind, plan in PLANS.items():
        for stage in plan.stages:
            values = samples.pop((kind.value, stage.value), [])
            stats.append(StageStats(kind.value, stage.value, len(values), percentile(values, 50),
                                    percentile(values, 95)))
    for (kind, stage), values in sorted(samples.items()):  # stages a plan no longer has
        stats.append(StageStats(kind, stage, len(values), percentile(values, 50), percentile(values, 95)))
    return stats


def failed_by_code(session: Session, since: datetime) -> list[tuple[str, int]]:
    """Error codes of jobs that failed since ``since``, most frequent first."""
    rows = session.execute(select(Job.error_code, func.count()).where(
        Job.state == JobState.FAILED, Job.finished_at >= since).group_by(Job.error_code))
    return sorted(((code or "unknown", count) for code, count in rows), key=lambda r: (-r[1], r[0]))


# ---- workers, queues, outbox ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerView:
    record: WorkerRecord
    heartbeat_age_s: float
    stale: bool  # no heartbeat for longer than a job may stay silent: probably gone


def list_workers(session: Session, settings: Settings, now: datetime) -> list[WorkerView]:
    views = []
    for record in session.scalars(select(WorkerRecord).order_by(WorkerRecord.name)):
        age = (now - aware(record.heartbeat_at)).total_seconds()
        views.append(WorkerView(record, age, age > settings.job_stale_after_s))
    return views


def outbox_waiting(session: Session) -> tuple[int, datetime | None]:
    """Task messages waiting for the broker and the oldest one's time."""
    count, oldest = session.execute(select(func.count(), func.min(OutboxMessage.created_at))).one()
    return count or 0, aware(oldest)


_BROKER_ENGINES: dict[str, object] = {}


def queue_depths(settings: Settings) -> dict[str, int] | None:
    """Messages waiting in each job queue (``cpu``, ``gpu``): Redis ``LLEN`` in distributed mode, the
    SQLite broker's visible messages in embedded mode; None when the broker cannot be read."""
    url = settings.resolved_broker_url
    try:
        if url.startswith(("redis://", "rediss://")):
            return QueueDepthCollector(settings).depths()
        if url.startswith("sqla+"):
            return _kombu_sql_depths(settings, url.removeprefix("sqla+"))
    except Exception:  # noqa: BLE001 - the page shows "unavailable" instead
        log.warning("queue depth unavailable", exc_info=True)
    return None


def _kombu_sql_depths(settings: Settings, url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, inspect, text

    engine = _BROKER_ENGINES.get(url)
    if engine is None:
        engine = _BROKER_ENGINES[url] = create_engine(url)
    names = {settings.queue(queue): queue.value for queue in Queue}
    depths = dict.fromkeys(names.values(), 0)
    if not inspect(engine).has_table("kombu_queue"):  # nothing was ever sent
        return depths
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT q.name, count(m.id) FROM kombu_queue q JOIN kombu_message m "
                                 "ON m.queue_id = q.id WHERE m.visible GROUP BY q.name"))
        for name, count in rows:
            if name in names:
                depths[names[name]] = int(count)
    return depths


# ---- the whole overview ---------------------------------------------------------------------------------------


@dataclass
class Overview:
    now: datetime
    since: datetime
    by_state: dict[JobState, int]
    per_hour: list[HourBucket]
    stages: list[StageStats]
    failed: list[tuple[str, int]]
    workers: list[WorkerView]
    queues: dict[str, int] | None
    outbox: tuple[int, datetime | None]
    totals: dict[str, int] = field(default_factory=dict)
    signals: dict[str, QueueSignal] = field(default_factory=dict)  # waiting, oldest wait, drain time per queue


def overview(session: Session, settings: Settings, now: datetime | None = None, window: timedelta = WINDOW) -> Overview:
    now = now or datetime.now(UTC)
    since = now - window
    totals = {
        "clients": session.scalar(select(func.count()).select_from(clients.Client)) or 0,
        "subjects": session.scalar(select(func.count()).select_from(Subject)) or 0,
        "active_jobs": session.scalar(select(func.count()).select_from(Job).where(
            Job.state.in_(ACTIVE_STATES))) or 0,
    }
    return Overview(now=now, since=since, by_state=jobs_by_state(session, since), per_hour=jobs_per_hour(session, now),
                    stages=stage_durations(session, since), failed=failed_by_code(session, since),
                    workers=list_workers(session, settings, now), queues=queue_depths(settings),
                    outbox=outbox_waiting(session), totals=totals, signals=queue_signals(session, settings, now))


# ---- clients and subjects -----------------------------------------------------------------------------------


def client_usage(session: Session, store: BlobStore, client_id: str) -> dict[str, int]:
    """What a client has: subjects, photos, jobs, images and the bytes they take."""
    return {**clients.usage(session, client_id), "storage_bytes": stored_bytes(session, store, client_id)}


def subject_leftovers(session: Session, store: BlobStore, subject_id: str) -> dict[str, int]:
    """What is left of a subject: its rows in every table and its blobs (all zero once it is deleted)."""
    def count(model, column) -> int:  # noqa: ANN001
        return session.scalar(select(func.count()).select_from(model).where(column == subject_id)) or 0

    return {
        "subject": count(Subject, Subject.id),
        "photos": count(Photo, Photo.subject_id),
        "jobs": count(Job, Job.subject_id),
        "adapters": count(Adapter, Adapter.subject_id),
        "images": count(Image, Image.subject_id),
        "blobs": len(store.list(subject_prefix(subject_id))),
    }


def train_results(trainings: list[Job]) -> list[tuple[Job, TrainResult]]:
    """Each training job with its typed result (newest first, as given); a result that does not read as
    one (written by an older version) is left out and logged, never a broken page."""
    out = []
    for job in trainings:
        try:
            out.append((job, read_result(job.kind, job.result)))
        except ValueError:
            log.warning("job %s: its result does not read as a %s result; not shown", job.id, job.kind)
    return out


def word_scores(intake: IntakeSummary | None) -> tuple[str | None, list[tuple[str, float]]]:
    """The class word an intake chose and every candidate word's CLIP score (the mean cosine distance between
    the crops and the word: lower fits better), best fit first."""
    if intake is None:
        return None, []
    ranked = sorted(((str(k), float(v)) for k, v in intake.class_scores.items()), key=lambda kv: kv[1])
    return intake.class_token, ranked


def loss_curve(training: TrainingSummary | None) -> list[tuple[float, float]]:
    """(step, loss) points of a training's loss curve, in step order."""
    points = training.loss_curve if training is not None else []
    curve = []
    for point in points:
        try:
            step, loss = float(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(loss):
            curve.append((step, loss))
    return sorted(curve)
