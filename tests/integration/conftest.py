"""Real PostgreSQL, Redis and Celery worker processes for the integration tests.

* a fresh database per run, created from the ``postgres`` database and dropped after;
* a random queue prefix (Celery queues and Redis keys) so runs never see each other;
* worker subprocesses (``celery -A ... worker``) started with the test environment.

Settings are passed explicitly (``Settings(...)``, ``make_celery(settings)``) instead of
through this process's environment, so other test folders' cached settings are untouched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_CACHE

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("LIKENESS_TEST_PG_URL", "postgresql+psycopg://postgres@localhost:5432/postgres")
REDIS_URL = os.environ.get("LIKENESS_TEST_REDIS_URL", "redis://localhost:6379/0")

pytestmark = pytest.mark.integration


def _reachable() -> str | None:
    import psycopg
    import redis

    try:
        with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), connect_timeout=3):
            pass
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        return f"Redis not reachable at {REDIS_URL}: {exc}"
    return None


@contextmanager
def own_database(label: str) -> Iterator[str]:
    """A fresh, migrated database, dropped after. Give one to each set of workers a test may leave with a stale
    job: workers sharing a database see each other's jobs, and the recovery sweep of one set (the suite's 4 s
    lease, queues of its own) would take another set's lost job and run it with its own job plan."""
    import psycopg

    if problem := _reachable():
        pytest.fail(problem)
    name = f"likeness_{label}_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from core.db.migrate import upgrade_to_head

    upgrade_to_head(url)
    yield url
    from core.db.session import dispose_engines

    dispose_engines()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated database for this run."""
    with own_database("it") as url:
        yield url


@pytest.fixture(scope="session")
def it_env(pg_url: str, tmp_path_factory) -> dict[str, str]:
    """LIKENESS_* variables of every process of this run (API, workers)."""
    prefix = f"it{uuid.uuid4().hex[:8]}."
    data_dir = tmp_path_factory.mktemp("likeness-data")
    return {
        "LIKENESS_ENVIRONMENT": "test",
        "LIKENESS_DATA_DIR": str(data_dir),
        "LIKENESS_DATABASE_URL": pg_url,
        "LIKENESS_BROKER_URL": REDIS_URL,
        "LIKENESS_REDIS_URL": REDIS_URL,
        "LIKENESS_QUEUE_PREFIX": prefix,
        "LIKENESS_STORAGE_BACKEND": "local",
        "LIKENESS_STORAGE_DIR": str(data_dir / "blobs"),
        "LIKENESS_SECRET_KEY": "integration-" + uuid.uuid4().hex,
        "LIKENESS_MODEL_PRESET": "tiny",
        "LIKENESS_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "LIKENESS_DEVICE": "cpu",
        "LIKENESS_JOB_HEARTBEAT_S": "1",
        "LIKENESS_JOB_STALE_AFTER_S": "4",
        "LIKENESS_MAX_ATTEMPTS": "3",
        "LIKENESS_WEBHOOK_MAX_ATTEMPTS": "4",
        "LIKENESS_WEBHOOK_ALLOW_PRIVATE": "true",  # the tests' webhook receivers listen on 127.0.0.1
        "LIKENESS_WEBHOOK_BACKOFF_FIRST_S": "1",  # 1 s, 3 s, ... instead of 10 s, 30 s
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def it_settings(it_env):
    from core.config import Settings

    return Settings(**{k.removeprefix("LIKENESS_").lower(): v for k, v in it_env.items()
                       if k.startswith("LIKENESS_") and not k.startswith("LIKENESS_TEST_")})


@pytest.fixture(scope="session")
def sender(it_settings):
    """A Celery app bound to this run's broker and queues (for enqueueing from the test)."""
    from worker.celery_app import make_celery

    app = make_celery(it_settings)
    yield app
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(it_settings.queue_prefix.rstrip(".") + "*"):  # also the e2e module's queues
        r.delete(key)


def clean_environ(**overrides: str) -> dict[str, str]:
    """This process's environment without any LIKENESS_* (other test packages set some), plus ``overrides``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LIKENESS_")}, **overrides}


def enqueue(sender, settings, job_id: str, queue: str) -> None:
    q = settings.queue(queue)
    sender.send_task("likeness.run_job", args=[job_id], queue=q, routing_key=q, exchange=q)


class WorkerProcess:
    """``celery -A <app> worker`` in its own process group, logging to a file."""

    def __init__(self, app: str, env: dict[str, str], queues: str, log_path: Path):
        self.app, self.env, self.queues, self.log_path = app, env, queues, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> WorkerProcess:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "celery", "-A", self.app, "worker", "-Q", self.queues, "--concurrency", "1",
               "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-n", f"it-{uuid.uuid4().hex[:6]}@%h"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_environ(**self.env), stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited at start:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[self._offset:].decode(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL the whole worker (main process and pool): nothing gets to clean up."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the production topology over HTTP: uvicorn, a CPU-queue and a GPU-queue worker -----------------------------


@pytest.fixture(scope="session")
def e2e_env(it_env) -> dict[str, str]:
    """The run's environment with queues of its own: the scripted lifecycle worker never takes these jobs.
    Shared, with ``api`` and ``split_workers``, by the modules of the ``split-service`` unit (tests/conftest.py)."""
    return {**it_env, "LIKENESS_QUEUE_PREFIX": it_env["LIKENESS_QUEUE_PREFIX"].rstrip(".") + "e2e."}


@contextmanager
def uvicorn_app(env: dict[str, str], log_path: Path, log_level: str = "warning") -> Iterator[str]:
    """uvicorn serving the real app with ``env`` (nothing else of this process's LIKENESS_*) on a free port;
    yields its base URL once ``/healthz`` answers, and stops it after."""
    base = f"http://127.0.0.1:{free_port()}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                                 "--port", base.rsplit(":", 1)[1], "--log-level", log_level],
                                cwd=ROOT, env=clean_environ(**env), stdout=log, stderr=log)

        def up() -> bool:
            try:
                return httpx.get(base + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(up, 60, 0.2, "the API to start")
            yield base
        finally:
            proc.terminate()
            proc.wait(timeout=20)


@pytest.fixture(scope="session")
def api(e2e_env, pg_url, tmp_path_factory):
    """uvicorn serving the real app with the run's environment; yields (base_url, admin key)."""
    admin_key = "lk_it_admin_" + os.urandom(8).hex()
    with uvicorn_app({**e2e_env, "LIKENESS_BOOTSTRAP_ADMIN_KEY": admin_key},
                     tmp_path_factory.mktemp("logs") / "api.log") as base:
        yield base, admin_key


@pytest.fixture(scope="session")
def split_workers(e2e_env, tmp_path_factory):
    """A CPU-queue worker (intake) and a GPU-queue worker (training, generation): the production app."""
    logs = tmp_path_factory.mktemp("worker-logs")
    prefix = e2e_env["LIKENESS_QUEUE_PREFIX"]
    cpu = WorkerProcess("worker.celery_app", e2e_env, f"{prefix}cpu", logs / "cpu.log").start()
    gpu = WorkerProcess("worker.celery_app", e2e_env, f"{prefix}gpu", logs / "gpu.log").start()
    yield cpu, gpu
    cpu.stop()
    gpu.stop()



def wait_for(predicate: Callable[[], object], timeout_s: float = 30, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory, grace_hopper):  # noqa: ANN001, ANN201
    """One ``likeness serve`` in a new user's folder, shared by the embedded-mode tests (see
    tests/integration/embedded.py; their modules are in its xdist group)."""
    from tests.integration.embedded import newcomer_folder, start_service, stop_service

    proc, service = start_service(newcomer_folder(tmp_path_factory.mktemp("newcomer"), grace_hopper))
    yield service
    stop_service(proc, service)
