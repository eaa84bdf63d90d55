"""Each worker process reports its state, job and models in the ``workers`` table."""

from __future__ import annotations

import time

from tests.worker.conftest import settings_with


def _row(name):
    from core.db.models import WorkerRecord
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return session.get(WorkerRecord, name)


def _wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_the_registry_reports_model_states_and_jobs_at_once_and_stops_cleanly(sqlite_db):
    from pipelines.models.specs import ModelSpec
    from worker.jobs import worker_id
    from worker.models import ModelManager
    from worker.registry import RegistryHeartbeat, WorkerStatus

    manager = ModelManager(name=worker_id())
    status = WorkerStatus()
    status.watch(manager)
    heartbeat = RegistryHeartbeat(settings_with(), ["gpu", "cpu"], interval_s=60, current=status).start()
    try:
        row = _wait_for(lambda: _row(worker_id()))
        assert row.state == "starting" and row.queues == ["gpu", "cpu"] and row.models == []
        manager.mark_ready()  # long before the 60 s interval
        assert _wait_for(lambda: _row(worker_id()).state == "idle")
        spec = ModelSpec.of("head", "test://head", "cpu", None, lambda: bytearray(4096))
        with manager.borrow(spec):
            status.job("job-1")
            assert _wait_for(lambda: _row(worker_id()).state == "busy")
            row = _row(worker_id())
            assert row.current_job_id == "job-1" and [m["borrowed"] for m in row.models] == [True]
            status.job(None)
        assert _wait_for(lambda: _row(worker_id()).state == "idle")
    finally:
        heartbeat.stop()
    assert _row(worker_id()).state == "stopped"
