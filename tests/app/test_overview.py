"""The dashboard's aggregates (``app.services.overview``) on the real PostgreSQL schema."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from app.services import overview
from core.db.models import Job, JobKind, JobStage, JobState, OutboxMessage, Subject, WorkerRecord
from tests.app.fixtures import session_scope
from tests.app.helpers import create_subject, jpeg, upload

# Moments far from now, one per test, so rows of other tests fall outside every window here.
_DAYS = itertools.count()


def far_moment() -> datetime:
    return datetime(2031, 5, 4, 12, 30, tzinfo=UTC) + timedelta(days=7 * next(_DAYS))


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert overview.percentile(values, 50) == 3.0
    assert overview.percentile(values, 95) == pytest.approx(8.8)
    assert overview.percentile([7.0], 95) == 7.0
    assert overview.percentile([], 50) is None


@pytest.fixture
def seeded(client_a):
    """Jobs around a moment NOW (returned): 3 in the 24 h before it, one 30 hours before."""
    NOW = far_moment()  # noqa: N806
    subject_id = create_subject(client_a)

    def job(state: JobState, created: datetime, code: str | None = None, kind: JobKind = JobKind.TRAIN) -> Job:
        return Job(client_id=client_a.id, subject_id=subject_id, kind=kind, state=state, request={},
                   completed_stages=[], created_at=created, error_code=code,
                   finished_at=created + timedelta(minutes=5) if state.terminal else None)

    with session_scope() as session:
        rows = [job(JobState.SUCCEEDED, NOW - timedelta(hours=1, minutes=10)),
                job(JobState.FAILED, NOW - timedelta(hours=1), "worker_lost"),
                job(JobState.FAILED, NOW - timedelta(minutes=20), "no_deliverable_image", JobKind.GENERATE),
                job(JobState.FAILED, NOW - timedelta(hours=30), "worker_lost")]
        session.add_all(rows)
        session.flush()
        for seconds in (10.0, 20.0, 30.0, 40.0):
            session.add(JobStage(job_id=rows[0].id, kind=JobKind.TRAIN, stage="caching", attempt=1, worker="w",
                                 started_at=NOW - timedelta(hours=1), finished_at=NOW - timedelta(minutes=50),
                                 seconds=seconds))
        session.add(JobStage(job_id=rows[3].id, kind=JobKind.TRAIN, stage="caching", attempt=1, worker="w",
                             started_at=NOW - timedelta(hours=30), finished_at=NOW - timedelta(hours=29),
                             seconds=9999.0))  # outside the window
    return NOW


def test_jobs_by_state_failures_and_stage_percentiles_cover_the_window_only(seeded):
    NOW = seeded  # noqa: N806
    with session_scope() as session:
        since = NOW - timedelta(hours=24)
        by_state = overview.jobs_by_state(session, since)
        assert list(by_state) == list(JobState)
        assert (by_state[JobState.SUCCEEDED], by_state[JobState.FAILED], by_state[JobState.QUEUED]) == (1, 2, 0)
        assert overview.failed_by_code(session, since) == [("no_deliverable_image", 1), ("worker_lost", 1)]
        stats = {(s.kind, s.stage): s for s in overview.stage_durations(session, since)}
        caching = stats[("train", "caching")]
        assert (caching.runs, caching.p50, caching.p95) == (4, 25.0, pytest.approx(38.5))
        assert stats[("generate", "upscaling")].runs == 0  # every stage of the plan is listed
        order = [(s.kind, s.stage) for s in overview.stage_durations(session, since)]
        assert order[:4] == [("train", "intake"), ("train", "caching"), ("train", "training:stage1"),
                             ("train", "training:stage2")]


def test_jobs_per_hour_buckets_end_with_the_current_hour(seeded):
    NOW = seeded  # noqa: N806
    with session_scope() as session:
        buckets = overview.jobs_per_hour(session, NOW)
    assert len(buckets) == 24
    assert buckets[-1].start == NOW.replace(minute=0)
    assert buckets[-1].counts[JobState.FAILED] == 1  # 12:10
    assert buckets[-2].counts[JobState.SUCCEEDED] == 1 and buckets[-2].counts[JobState.FAILED] == 1  # 11:20, 11:30
    assert sum(b.total for b in buckets) == 3


def test_workers_are_listed_with_stale_ones_flagged(settings):
    NOW = datetime.now(UTC)  # noqa: N806
    name = f"gpu-{uuid.uuid4().hex[:6]}:1"
    with session_scope() as session:
        session.add(WorkerRecord(name=name, queues=["gpu"], state="busy", current_job_id=None, models=[],
                                 gpu_memory_bytes=8 << 30, heartbeat_at=NOW - timedelta(seconds=5)))
        session.add(WorkerRecord(name=name + "0", queues=["cpu"], state="idle", models=[],
                                 heartbeat_at=NOW - timedelta(seconds=settings.job_stale_after_s + 1)))
    with session_scope() as session:
        views = {v.record.name: v for v in overview.list_workers(session, settings, NOW)}
    assert not views[name].stale and views[name].heartbeat_age_s == pytest.approx(5)
    assert views[name + "0"].stale


def test_queue_depths_and_outbox(settings):
    from core.queue import task_queue
    from likeness.contract.plan import Queue, Task

    before = overview.queue_depths(settings)
    assert set(before) == {"cpu", "gpu"}
    task_queue(settings).send(Task.PURGE_EXPIRED, [], Queue.GPU)
    assert overview.queue_depths(settings)["gpu"] == before["gpu"] + 1
    with session_scope() as session:
        count, _ = overview.outbox_waiting(session)
        session.add(OutboxMessage(task=Task.PURGE_EXPIRED, args=[], queue=Queue.CPU))
        session.flush()
        assert overview.outbox_waiting(session)[0] == count + 1
        session.rollback()


def test_embedded_broker_queue_depth(tmp_path):
    from core.config import Settings

    # Every broker-related field explicit: this process's LIKENESS_* point at the shared Redis.
    settings = Settings(data_dir=tmp_path, broker_url="", queue_prefix=f"emb{uuid.uuid4().hex[:6]}.")
    assert settings.embedded and settings.resolved_broker_url.startswith("sqla+sqlite:")
    assert overview.queue_depths(settings) == {"cpu": 0, "gpu": 0}  # nothing was ever sent
    from core.queue import task_queue
    from likeness.contract.plan import Queue, Task

    task_queue(settings).send(Task.PURGE_EXPIRED, [], Queue.CPU)
    assert overview.queue_depths(settings) == {"cpu": 1, "gpu": 0}


def test_client_usage_counts_storage_bytes_and_leftovers_of_a_deleted_subject(client_a, store):
    subject_id = create_subject(client_a)
    photos = [jpeg(seed=1), jpeg(seed=2)]
    upload(client_a, subject_id, [("a.jpg", photos[0]), ("b.jpg", photos[1])])
    with session_scope() as session:
        usage = overview.client_usage(session, store, client_a.id)
        stored = store.size_of_prefix(f"subjects/{subject_id}/")
        assert usage["photos"] == 2 and usage["subjects"] == 1 and usage["storage_bytes"] == stored > 0
        assert overview.subject_leftovers(session, store, subject_id)["photos"] == 2
    assert client_a.delete(f"/v1/subjects/{subject_id}").status_code == 204
    with session_scope() as session:
        assert set(overview.subject_leftovers(session, store, subject_id).values()) == {0}
        assert session.get(Subject, subject_id) is None
        assert overview.client_usage(session, store, client_a.id)["storage_bytes"] == 0
