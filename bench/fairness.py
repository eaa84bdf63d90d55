"""Fair share under load: how long a light client waits behind a heavy one, and how evenly busy clients share.

    python bench/fairness.py [--job-s 2.0] [--workers 2] [--b-every-s 4] [--b-jobs 12] [--busy-jobs 10]
                             [--before-only | --after-only]

Real PostgreSQL (a fresh database ``likeness_bench_<random>``, migrated), the workers' real claim
(:func:`worker.jobs.claim`, which applies :func:`worker.fair_share.pick_fairest`), and ``--workers``
worker processes whose job is a simulated generation of ``--job-s`` seconds (a ``generating`` stage
row, like a real one). The broker is a first-in first-out queue of task messages, as Celery's Redis
queue is; with fair share on, a message is only a wake-up and the worker claims the fairest waiting job.

Scenarios, each run with fair share off ("before", first in first out) and on ("after"):

* **burst**: client A submits 60 generations at once; client B submits one every ``--b-every-s``
  seconds. Reported: B's p50/p95 wait (submitted -> started). Goal: p95 <= one job's duration + 10 %.
* **three busy clients**: A, B and C each submit ``--busy-jobs`` generations at once (A's first, then B's, then C's).
  Reported: Jain's index of the GPU seconds each got over the first third of the run (while all three
  had work waiting). Goal: >= 0.9 (1.0 = perfectly even, 1/3 = one client had everything).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PG_ADMIN_URL = os.environ.get("LIKENESS_BENCH_PG_URL", "postgresql+psycopg://postgres@localhost:5432/postgres")
STOP = "stop"


def jain(values: list[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 when all equal, 1/n when one has everything."""
    squares = sum(v * v for v in values)
    return (sum(values) ** 2) / (len(values) * squares) if squares else 1.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _settings(db_url: str, data_dir: str, fair: bool):
    from core.config import Settings

    return Settings(database_url=db_url, data_dir=data_dir, fair_share=fair)


def _worker(db_url: str, data_dir: str, fair: bool, job_s: float, messages, ready) -> None:  # noqa: ANN001
    """One GPU worker: take a message, claim (the fairest job, or the named one), 'generate', finish."""
    from core.db.models import utcnow
    from likeness.contract.plan import JobState
    from worker import jobs

    settings = _settings(db_url, data_dir, fair)
    jobs.heartbeat(settings, "none")  # connected: the scenario may start
    ready.put(os.getpid())
    while (job_id := messages.get()) != STOP:
        claim = jobs.claim(settings, job_id, "gpu")
        if claim.outcome is not jobs.ClaimOutcome.run:
            continue
        jobs.write_progress(settings, claim.job.id, "generate", "generating", 10.0, None,
                            started=[("generating", utcnow())])
        time.sleep(job_s)
        jobs.finish(settings, claim.job.id, JobState.SUCCEEDED)


class Service:
    """Clients, a FIFO broker and worker processes on one scratch database."""

    def __init__(self, db_url: str, fair: bool, workers: int, job_s: float):
        from tests.app.fixtures import session_scope

        self.db_url, self.session_scope = db_url, session_scope
        self.data_dir = tempfile.mkdtemp(prefix="likeness-fairness-")
        ctx = mp.get_context("spawn")
        self.messages, ready = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(db_url, self.data_dir, fair, job_s, self.messages, ready))
                      for _ in range(workers)]
        for proc in self.procs:
            proc.start()
        for _ in self.procs:
            ready.get(timeout=120)

    def client(self, name: str) -> tuple[str, str]:
        from core.db.models import Client, Subject

        with self.session_scope(self.db_url) as session:
            client = Client(name=name, api_key_hash=os.urandom(16).hex())
            session.add(client)
            session.flush()
            subject = Subject(client_id=client.id, name=name)
            session.add(subject)
            session.flush()
            return client.id, subject.id

    def submit(self, client: tuple[str, str], n: int = 1) -> list[str]:
        from core.db.models import Job, JobKind

        with self.session_scope(self.db_url) as session:
            rows = [Job(client_id=client[0], subject_id=client[1], kind=JobKind.GENERATE, completed_stages=[])
                    for _ in range(n)]
            session.add_all(rows)
            session.flush()
            ids = [row.id for row in rows]
        for job_id in ids:  # after the commit, as the API does
            self.messages.put(job_id)
        return ids

    def wait_all(self, timeout_s: float = 600) -> None:
        from sqlalchemy import select

        from core.db.models import Job
        from likeness.contract.plan import TERMINAL_STATES

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.session_scope(self.db_url) as session:
                if all(state in TERMINAL_STATES for state in session.scalars(select(Job.state))):
                    return
            time.sleep(0.2)
        raise TimeoutError("jobs still unfinished")

    def jobs(self):  # noqa: ANN201
        from sqlalchemy import select

        from core.db.models import Job

        with self.session_scope(self.db_url) as session:
            return [(j.client_id, j.created_at, j.started_at, j.finished_at) for j in session.scalars(select(Job))]

    def close(self) -> None:
        for _ in self.procs:
            self.messages.put(STOP)
        for proc in self.procs:
            proc.join(timeout=30)


def _database() -> tuple[str, str]:
    import psycopg

    from core.db.migrate import upgrade_to_head

    name = f"likeness_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade_to_head(url)
    return name, url


def _drop(name: str) -> None:
    import psycopg

    from core.db.session import dispose_engines

    dispose_engines()
    with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def burst(fair: bool, args) -> dict:  # noqa: ANN001
    name, url = _database()
    service = Service(url, fair, args.workers, args.job_s)
    try:
        a, b = service.client("A"), service.client("B")
        service.submit(a, 60)
        b_jobs = []
        for _ in range(args.b_jobs):
            time.sleep(args.b_every_s)
            b_jobs += service.submit(b)
        service.wait_all()
        waits = [(started - created).total_seconds() for client, created, started, _ in service.jobs()
                 if client == b[0]]
    finally:
        service.close()
        _drop(name)
    return {"b_p50_s": statistics.median(waits), "b_p95_s": percentile(waits, 95), "b_max_s": max(waits),
            "b_jobs": len(waits)}


def three_busy(fair: bool, args) -> dict:  # noqa: ANN001
    name, url = _database()
    service = Service(url, fair, args.workers, args.job_s)
    try:
        clients = [service.client(n) for n in "ABC"]
        for client in clients:
            service.submit(client, args.busy_jobs)
        service.wait_all()
        rows = service.jobs()
    finally:
        service.close()
        _drop(name)
    start = min(started for _, _, started, _ in rows)
    end = max(finished for _, _, _, finished in rows)
    horizon = start + (end - start) / 3  # all three still have work waiting
    seconds = {client[0]: 0.0 for client in clients}
    for client, _, started, finished in rows:
        overlap = (min(finished, horizon) - started).total_seconds()
        seconds[client] += max(overlap, 0.0)
    return {"jain": jain(list(seconds.values())), "gpu_s_first_third": [round(s, 1) for s in seconds.values()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-s", type=float, default=2.0, help="simulated duration of one generation")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--b-every-s", type=float, default=4.0)
    parser.add_argument("--b-jobs", type=int, default=12)
    parser.add_argument("--busy-jobs", type=int, default=10, help="jobs each of the three busy clients submits")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--before-only", action="store_true")
    group.add_argument("--after-only", action="store_true")
    args = parser.parse_args()
    modes = [False] if args.before_only else [True] if args.after_only else [False, True]
    goal = args.job_s * 1.1
    for fair in modes:
        label = "after (fair share)" if fair else "before (first in, first out)"
        b = burst(fair, args)
        print(f"{label}: burst: B's wait p50 {b['b_p50_s']:.2f} s, p95 {b['b_p95_s']:.2f} s, max {b['b_max_s']:.2f} s "
              f"over {b['b_jobs']} jobs (goal p95 <= {goal:.2f} s: {'met' if b['b_p95_s'] <= goal else 'missed'})",
              flush=True)
        three = three_busy(fair, args)
        print(f"{label}: three busy clients: Jain's index {three['jain']:.3f} (GPU s over the first third: "
              f"{three['gpu_s_first_third']}; goal >= 0.9: {'met' if three['jain'] >= 0.9 else 'missed'})",
              flush=True)


if __name__ == "__main__":
    main()
