"""A whole distributed deployment of its own for the fault tests: PostgreSQL, Redis, the API
(uvicorn) and a worker on both queues, each a real process the tests can stop, kill and restart.

The servers are this folder's own (:mod:`tests.faults.servers`), never the shared ones. Jobs run the
real pipeline on the ``tiny`` preset with the smallest request (10 training steps, 2 candidates).
Each test records how long the service took to recover; the terminal summary prints them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_CACHE
from tests.faults.servers import PostgresServer, RedisServer, free_port
from tests.integration.conftest import ROOT, WorkerProcess, clean_environ, wait_for

TERMINAL = ("succeeded", "failed", "canceled")

#: fault -> measured figures of the running test; printed at the end of the run (bench/RESULTS.md quotes
#: them) by tests/conftest.py, which reads them from the test reports (so also from pytest-xdist workers)
RECOVERY: dict[str, dict[str, float | str]] = {}


@pytest.fixture(autouse=True)
def _report_recovery(request) -> Iterator[None]:  # noqa: ANN001
    yield
    for fault, figures in RECOVERY.items():
        request.node.user_properties.append(("fault recovery", (fault, figures)))
    RECOVERY.clear()


class ApiProcess:
    """uvicorn serving ``app.main:create_app`` on a fixed port (a restart comes back on the same URL)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ApiProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                                      "--port", str(self.port), "--log-level", "warning"],
                                     cwd=ROOT, env=clean_environ(**self.env), stdout=log, stderr=log,
                                     start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(self.base + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, 0.1, "the API to start")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Stack:
    pg: PostgresServer
    redis: RedisServer
    env: dict[str, str]
    api: ApiProcess
    worker: WorkerProcess
    admin_key: str
    database_url: str
    storage_dir: Path
    logs: Path
    clients: dict[str, str] = field(default_factory=dict)

    def client(self, name: str = "app") -> httpx.Client:
        """An API client of the app client ``name`` (created on first use)."""
        if name not in self.clients:
            with httpx.Client(base_url=self.api.base, timeout=30,
                              headers={"Authorization": f"Bearer {self.admin_key}"}) as admin:
                created = admin.post("/v1/admin/clients", json={"name": name, "role": "app"})
                assert created.status_code == 201, created.text
                self.clients[name] = created.json()["api_key"]
        return httpx.Client(base_url=self.api.base, headers={"Authorization": f"Bearer {self.clients[name]}"},
                            timeout=30)

    def show_logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in sorted(self.logs.iterdir())
                         if p.suffix == ".log")


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("fault-logs")
    data_dir = tmp_path_factory.mktemp("fault-data")
    pg = PostgresServer().init()
    redis = RedisServer(logs).start()
    worker = api = None
    try:
        database_url = pg.create_database(f"likeness_faults_{uuid.uuid4().hex[:8]}")
        from core.db.migrate import upgrade_to_head

        upgrade_to_head(database_url)
        admin_key = "lk_faults_admin_" + os.urandom(8).hex()
        env = {
            "LIKENESS_ENVIRONMENT": "test",
            "LIKENESS_DATA_DIR": str(data_dir),
            "LIKENESS_DATABASE_URL": database_url,
            "LIKENESS_BROKER_URL": redis.url,
            "LIKENESS_REDIS_URL": redis.url,
            "LIKENESS_QUEUE_PREFIX": f"faults{uuid.uuid4().hex[:6]}.",
            "LIKENESS_STORAGE_BACKEND": "local",
            "LIKENESS_STORAGE_DIR": str(data_dir / "blobs"),
            "LIKENESS_SECRET_KEY": "faults-" + uuid.uuid4().hex,
            "LIKENESS_BOOTSTRAP_ADMIN_KEY": admin_key,
            "LIKENESS_MODEL_PRESET": "tiny",
            "LIKENESS_MODEL_CACHE_DIR": str(MODEL_CACHE),
            "LIKENESS_DEVICE": "cpu",
            "LIKENESS_JOB_HEARTBEAT_S": "1",
            # a worker starved of CPU (a loaded machine; a model load can hold it for 20 s) is not taken for
            # dead: lease takeover has tests of its own (tests/integration/test_fault_worker_lost.py)
            "LIKENESS_JOB_STALE_AFTER_S": "30",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        api = ApiProcess(env, logs / "api.log").start()
        queues = f"{env['LIKENESS_QUEUE_PREFIX']}gpu,{env['LIKENESS_QUEUE_PREFIX']}cpu"
        worker = WorkerProcess("worker.celery_app", env, queues, logs / "worker.log").start()
        yield Stack(pg, redis, env, api, worker, admin_key, database_url, data_dir / "blobs", logs)
    finally:
        for process in (worker, api):
            if process is not None:
                process.stop()
        redis.stop()
        from core.db.session import dispose_engines

        dispose_engines()
        pg.destroy()


# ---- helpers the tests share ---------------------------------------------------------------------------------


def photos(grace_hopper, n: int = 5) -> list[tuple[str, tuple[str, bytes]]]:  # noqa: ANN001
    from tests.conftest import encode
    from tests.pipelines.intake.conftest import person_variants

    variants = person_variants(grace_hopper, n)
    return [("files", (f"grace_{i}.jpg", encode(v, quality=90))) for i, v in enumerate(variants)]


def subject_with_photos(client: httpx.Client, grace_hopper, name: str) -> str:  # noqa: ANN001
    sid = client.post("/v1/subjects", json={"name": name}).json()["id"]
    upload = client.post(f"/v1/subjects/{sid}/photos", files=photos(grace_hopper))
    assert upload.status_code == 201, upload.text
    return sid


def job_state(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def wait_job(stack: Stack, client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    def done() -> dict | None:
        try:
            response = client.get(f"/v1/jobs/{job_id}")
        except httpx.HTTPError:
            return None
        job = response.json() if response.status_code == 200 else {}
        return job if job.get("state") in TERMINAL else None

    try:
        return wait_for(done, timeout_s, 0.3, f"job {job_id} to finish")
    except AssertionError:
        print(stack.show_logs())
        raise


def db_rows(stack: Stack, sql: str, **params) -> list[tuple]:
    """Rows straight from the fault database (what a client cannot see: outbox, photo rows)."""
    import psycopg

    with psycopg.connect(stack.database_url.replace("+psycopg", ""), connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


class Calls:
    """Every answer the API gave during a fault, by status (a 500 must never be among them)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bodies: list[dict] = []

    def record(self, response: httpx.Response) -> httpx.Response:
        self.statuses.append(response.status_code)
        if response.status_code >= 500:
            self.bodies.append({"status": response.status_code, "body": response.text[:300],
                                "retry_after": response.headers.get("retry-after")})
        return response

    def server_errors(self) -> list[dict]:
        return [b for b in self.bodies if b["status"] != 503 or not b["retry_after"]]


def timed(fn, *args, **kwargs) -> tuple[float, object]:  # noqa: ANN001
    start = time.monotonic()
    value = fn(*args, **kwargs)
    return time.monotonic() - start, value
