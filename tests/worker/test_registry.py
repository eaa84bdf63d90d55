"""Each worker process reports its state, job and models in the ``workers`` table."""

from __future__ import annotations

import time

from tests.worker.conftest import settings_with


def _row(name):
    from app.db.models import WorkerRecord
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return session.get(WorkerRecord, name)


def test_the_registry_reports_state_changes_at_once_and_stops_cleanly(sqlite_db):
    from worker.jobs import worker_id
    from worker.registry import RegistryHeartbeat, WorkerStatus

    status = WorkerStatus(models=lambda: [{"name": "base/tiny/cpu", "bytes": 1234}])
    heartbeat = RegistryHeartbeat(settings_with(), ["gpu", "cpu"], interval_s=60, current=status).start()
    try:
        deadline = time.monotonic() + 10
        while (row := _row(worker_id())) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row.state == "starting" and row.queues == ["gpu", "cpu"]
        assert row.models == [{"name": "base/tiny/cpu", "bytes": 1234}]
        status.set("busy", "job-1")  # long before the 60 s interval
        while _row(worker_id()).state != "busy" and time.monotonic() < deadline:
            time.sleep(0.05)
        row = _row(worker_id())
        assert (row.state, row.current_job_id) == ("busy", "job-1")
    finally:
        heartbeat.stop()
    assert _row(worker_id()).state == "stopped"
