"""The signals to scale on (app.services.scaling): per queue, waiting jobs, the oldest one's wait, the backlog
from measured stage durations and the drain time, on a fresh database of each engine (embedded SQLite and
distributed PostgreSQL), in /metrics and on the dashboard."""

from __future__ import annotations

import math
import re
import uuid
from datetime import timedelta

import pytest

from app.services.scaling import QueueSignal, queue_signals
from core.config import Settings
from core.db.models import Client, Job, JobKind, JobStage, JobState, Subject, WorkerRecord, utcnow
from core.db.session import SessionLocal

# Mean measured seconds per (kind, stage): two runs each, so that the mean (not the last run) is used.
MEASURED = {("train", "intake"): (15, 25), ("train", "caching"): (5, 15), ("train", "training:stage1"): (90, 110),
            ("train", "training:stage2"): (150, 250), ("generate", "generating"): (20, 40),
            ("generate", "ranking"): (5, 5), ("generate", "upscaling"): (10, 10), ("generate", "delivering"): (4, 6)}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    from core.db.migrate import upgrade_to_head

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'likeness.sqlite3'}"
        upgrade_to_head(url)
        yield url
        return
    from core.db.session import dispose_engines
    from tests.app.fixtures import create_database, drop_database

    name = f"likeness_scaling_{uuid.uuid4().hex[:10]}"
    url = create_database(name)
    upgrade_to_head(url)
    yield url
    dispose_engines()
    drop_database(name)


@pytest.fixture
def signal_settings(tmp_path):
    return Settings(data_dir=tmp_path, queue_prefix="scaling.", job_stale_after_s=30)


@pytest.fixture
def seeded(database, signal_settings):
    """Four jobs wait for the gpu queue, one for the cpu queue; two live gpu workers, none for cpu."""
    settings = signal_settings
    now = utcnow()
    with SessionLocal(database) as session, session.begin():
        client = Client(name="c", api_key_hash=uuid.uuid4().hex)
        session.add(client)
        session.flush()
        subject = Subject(client_id=client.id, name="s")
        session.add(subject)
        session.flush()

        def job(kind: JobKind, state: JobState, created_s_ago: float, completed=(), worker=None, handed_s_ago=None):  # noqa: ANN001
            session.add(Job(client_id=client.id, subject_id=subject.id, kind=kind, state=state, request={},
                            completed_stages=list(completed), worker=worker,
                            created_at=now - timedelta(seconds=created_s_ago),
                            heartbeat_at=None if handed_s_ago is None else now - timedelta(seconds=handed_s_ago)))

        job(JobKind.TRAIN, JobState.QUEUED, 300)  # intake: cpu
        job(JobKind.TRAIN, JobState.RUNNING, 1000, completed=["intake"], handed_s_ago=60)  # handed over to gpu
        job(JobKind.GENERATE, JobState.QUEUED, 120)
        job(JobKind.GENERATE, JobState.QUEUED, 30)
        job(JobKind.TEMPLATE, JobState.QUEUED, 10)  # never measured
        job(JobKind.TRAIN, JobState.RUNNING, 5000, completed=["intake"], worker="w:1", handed_s_ago=1)  # held
        job(JobKind.GENERATE, JobState.SUCCEEDED, 9000)
        session.flush()
        any_job = session.query(Job).first()
        for (kind, stage), runs in MEASURED.items():
            for seconds in runs:
                session.add(JobStage(job_id=any_job.id, kind=JobKind(kind), stage=stage, attempt=1, worker="w",
                                     started_at=now - timedelta(hours=2), finished_at=now - timedelta(hours=1),
                                     seconds=float(seconds)))
        session.add(JobStage(job_id=any_job.id, kind=JobKind.GENERATE, stage="generating", attempt=1, worker="w",
                             started_at=now - timedelta(days=3), finished_at=now - timedelta(days=3),
                             seconds=9999.0))  # outside the 24 h window
        gpu, cpu = settings.queue("gpu"), settings.queue("cpu")
        for name, queues, state, age_s in [("g1:1", [gpu], "busy", 2), ("g2:1", [gpu], "idle", 5),
                                            ("g3:1", [gpu], "idle", 31), ("g4:1", [gpu, cpu], "stopped", 1)]:
            session.add(WorkerRecord(name=name, queues=queues, state=state, models=[],
                                     heartbeat_at=now - timedelta(seconds=age_s)))
    return database, now


def test_waiting_jobs_oldest_wait_backlog_and_drain_per_queue(seeded, signal_settings):
    settings = signal_settings
    url, now = seeded
    with SessionLocal(url) as session:
        signals = queue_signals(session, settings, now)
    gpu, cpu = signals["gpu"], signals["cpu"]
    assert gpu.waiting == 4 and cpu.waiting == 1
    assert gpu.oldest_wait_s == pytest.approx(120)  # the handed-over training waits since its hand-over
    assert cpu.oldest_wait_s == pytest.approx(300)
    train_gpu_phase = 10 + 100 + 200  # caching, stage 1, stage 2 (means)
    assert gpu.backlog_s == pytest.approx(train_gpu_phase + 2 * (30 + 5 + 10 + 5))
    assert gpu.workers == 2  # a stale and a stopped one do not count
    assert gpu.drain_s == pytest.approx(gpu.backlog_s / 2)
    assert "template:generating" in gpu.unmeasured
    assert cpu.backlog_s == pytest.approx(20) and cpu.workers == 0 and math.isinf(cpu.drain_s)


def test_an_empty_queue_drains_in_no_time():
    assert QueueSignal("gpu", 0, 0.0, 0.0, 0).drain_s == 0.0
    assert QueueSignal("gpu", 3, 50.0, 600.0, 3).drain_s == 200.0


def test_metrics_expose_the_signals(seeded, signal_settings):
    settings = signal_settings
    from prometheus_client import CollectorRegistry, generate_latest

    from app.metrics import QueueSignalsCollector

    url, _ = seeded
    registry = CollectorRegistry()
    registry.register(QueueSignalsCollector(settings, lambda: SessionLocal(url)))
    text = generate_latest(registry).decode()

    def value(name: str, queue: str) -> float:
        return float(re.search(rf'^{name}{{queue="{queue}"}} (\S+)$', text, re.M).group(1))

    assert value("likeness_queue_waiting_jobs", "gpu") == 4
    assert value("likeness_queue_oldest_wait_seconds", "cpu") == pytest.approx(300, abs=30)
    assert value("likeness_queue_drain_seconds", "gpu") == pytest.approx((310 + 100) / 2)
    assert value("likeness_queue_workers", "gpu") == 2
    assert value("likeness_queue_drain_seconds", "cpu") == math.inf


def test_the_dashboard_shows_them(http, admin):
    """On the shared test database: a generation waiting for 400 days is the gpu queue's oldest."""
    from tests.app.fixtures import session_scope
    from tests.app.helpers import create_subject

    subject_id = create_subject(admin)
    with session_scope() as session:
        job = Job(client_id=admin.id, subject_id=subject_id, kind=JobKind.GENERATE, state=JobState.QUEUED,
                  request={}, completed_stages=[], created_at=utcnow() - timedelta(days=400))
        session.add(job)
    try:
        from fastapi.testclient import TestClient

        from tests.app.test_admin_dashboard import log_in

        browser = TestClient(http.app, raise_server_exceptions=False, follow_redirects=False)
        assert log_in(browser, admin.key).status_code == 303
        page = browser.get("/admin").text
        table = re.search(r'<table id="queues">.*?</table>', page, re.S).group(0)
        gpu_row = re.search(r"<tr><td>gpu .*?</tr>", table, re.S).group(0)
        cells = re.findall(r'<td class="num"[^>]*>(.*?)</td>', gpu_row, re.S)
        assert "oldest wait" in table and "drain estimate" in table
        assert cells[2] == "9600.0 h"  # messages, waiting jobs, oldest wait, workers, drain
        assert int(cells[1]) >= 1
    finally:
        with session_scope() as session:
            session.delete(session.get(Job, job.id))
