"""Fair share on real PostgreSQL with concurrent workers: every job runs exactly once, and a light client's
jobs do not wait behind a heavy client's backlog (``bench/fairness.py``'s harness, small and fast)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

pytestmark = pytest.mark.integration


def test_two_workers_claim_every_job_once_and_the_light_client_goes_first(pg_url):
    from bench.fairness import Service
    from core.db.models import Job, JobStage

    service = Service(pg_url, fair=True, workers=2, job_s=0.2)
    try:
        heavy, light = service.client("heavy"), service.client("light")
        backlog = service.submit(heavy, 16)
        time.sleep(0.5)  # the heavy client's jobs are running: it has recent time on the workers
        light_jobs = service.submit(light, 2)
        service.wait_all(timeout_s=120)
        with service.session_scope(pg_url) as session:
            runs = dict(session.execute(select(JobStage.job_id, func.count()).where(
                JobStage.job_id.in_(backlog + light_jobs)).group_by(JobStage.job_id)).all())
            started = dict(session.execute(select(Job.id, Job.started_at).where(
                Job.id.in_(backlog + light_jobs))).all())
    finally:
        service.close()
    assert runs == {job_id: 1 for job_id in backlog + light_jobs}  # each ran once: no double claim, none lost
    light_started = max(started[j] for j in light_jobs)
    heavy_after = [j for j in backlog if started[j] > light_started]
    # first in, first out: none of the backlog would start after them; fair share: most of it does
    assert len(heavy_after) >= len(backlog) // 2, "the light client's jobs waited behind the backlog"
