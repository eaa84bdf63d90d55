from __future__ import annotations

import re
from datetime import timedelta

from tests.app.helpers import subject_with_photo


def test_healthz_and_readyz(http, settings, monkeypatch):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}

    monkeypatch.setattr(settings, "broker_url", "redis://127.0.0.1:1/0")  # nothing listens there
    down = http.get("/readyz")
    assert down.status_code == 503 and down.json()["code"] == "not_ready"
    checks = down.json()["details"]["checks"]
    # A status word: the public probe never shows the driver's error (host names, ports, paths).
    assert checks == {"database": "ok", "broker": "unavailable", "storage": "ok"}
    assert "127.0.0.1" not in down.text and "Error" not in down.text


def test_metrics_can_ask_for_a_token(http, settings, monkeypatch):
    assert http.get("/metrics").status_code == 200  # unset: open, for a scraper on a private network
    monkeypatch.setattr(settings, "metrics_token", "scrape-token-0123456789")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-token-0123456789"},
                    [(b"authorization", "Bearer \u00e9".encode())]):
        refused = http.get("/metrics", headers=headers)
        assert refused.status_code == 401 and refused.json()["code"] == "metrics_token_required"
        assert "likeness_" not in refused.text
    allowed = http.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"})
    assert allowed.status_code == 200 and "likeness_jobs" in allowed.text


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit("} ", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_report_latency_by_route_jobs_by_state_queue_depth_and_stage_durations(client_a, http):
    from datetime import timedelta

    from core.db.models import Job, JobKind, JobStage, JobState, utcnow
    from tests.app.fixtures import session_scope

    subject_id = subject_with_photo(client_a)
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    client_a.get(f"/v1/jobs/{job_id}")
    done_id = client_a.post(f"/v1/subjects/{subject_with_photo(client_a)}/train").json()["id"]
    now = utcnow()
    with session_scope() as session:  # what a worker leaves behind (tests/worker checks that it does)
        job = session.get(Job, done_id)
        job.state, job.finished_at = JobState.SUCCEEDED, now
        for stage, seconds in (("intake", 4.0), ("training:stage1", 95.0)):
            session.add(JobStage(job_id=done_id, kind=JobKind.TRAIN, stage=stage, attempt=1, worker="w:1",
                                 started_at=now - timedelta(seconds=seconds), finished_at=now, seconds=seconds))

    text = http.get("/metrics").text
    assert _sample(text, "likeness_http_request_duration_seconds_count", route="/v1/jobs/{job_id}", method="GET") >= 1
    assert job_id not in text  # ids never become labels
    assert _sample(text, "likeness_jobs", kind="train", state="queued") >= 1
    assert _sample(text, "likeness_jobs", kind="train", state="succeeded") >= 1
    assert _sample(text, "likeness_queue_depth", queue="cpu") >= 1  # training starts on the CPU queue
    bucket = "likeness_stage_duration_seconds_bucket"
    assert _sample(text, bucket, kind="train", stage="training:stage1", le="120.0") >= 1
    assert _sample(text, bucket, kind="train", stage="training:stage1", le="60.0") == 0


def test_metrics_report_each_live_worker_state_from_the_registry(http):
    from core.db.models import WorkerRecord, utcnow
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        session.add(WorkerRecord(name="gpu-host:41", queues=["gpu"], state="busy", current_job_id="j",
                                 models=[{"name": "base", "bytes": 2000}, {"name": "clip", "bytes": 500}],
                                 heartbeat_at=utcnow()))
        session.add(WorkerRecord(name="gone-host:7", queues=["cpu"], state="idle", models=[],
                                 heartbeat_at=utcnow() - timedelta(hours=1)))
    text = http.get("/metrics").text
    assert _sample(text, "likeness_worker_state", worker="gpu-host:41", state="busy") == 1.0
    assert _sample(text, "likeness_worker_state", worker="gpu-host:41", state="idle") == 0.0
    assert _sample(text, "likeness_worker_loaded_model_bytes", worker="gpu-host:41") == 2500.0
    assert _sample(text, "likeness_worker_state", worker="gone-host:7", state="idle") is None  # stale: not reported
