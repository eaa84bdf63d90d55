"""``likeness serve`` (embedded mode: SQLite database and broker, local blobs, workers and the bot as
children) as the tests start it, and one of them shared by the embedded-mode tests.

The shared service (fixture ``embedded_service`` in conftest.py) is started the way a new user starts
it: in an empty folder (data dir ``./data``) with ``photos/`` of one person, the tests' prebuilt tiny
models, a Telegram token (so the bot runs too, against the tests' Bot API stand-in) and private webhook
receivers allowed (the tests' receivers listen on 127.0.0.1). The modules that use it run one after
the other on one pytest-xdist worker (``SAME_WORKER`` in tests/conftest.py); each test makes its own
client, subjects and jobs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import MODEL_CACHE, encode
from tests.integration.conftest import ROOT, clean_environ, wait_for


def user_env(**extra: str) -> dict[str, str]:
    """A shell whose ``python`` and ``likeness`` are this checkout's (the venv's, the repo first on the path)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return clean_environ(PATH=path, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)


def serve_env(**extra: str) -> dict[str, str]:
    """The user's shell plus what the tests' serve needs: the CPU and the tests' prebuilt tiny models (a
    fresh install builds the same ones in a few seconds on first use)."""
    return user_env(TRANSFORMERS_OFFLINE="1", LIKENESS_DEVICE="cpu", LIKENESS_MODEL_CACHE_DIR=str(MODEL_CACHE), **extra)


def serve(env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """``likeness serve`` in its own process group (as a terminal's foreground job), output to ``log_path``."""
    return subprocess.Popen([sys.executable, "-m", "likeness", "serve"], cwd=cwd, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_ready(base: str) -> None:
    """Until the served API answers ``/readyz`` with 200 (up to 90 s)."""
    def ready() -> bool:
        try:
            return httpx.get(base + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 90, 0.3, "the API to be ready")


def interrupt(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    proc.wait(timeout=60)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def printed_admin_key(log_path: Path) -> str:
    """The admin key the first start prints (waits for the banner)."""
    wait_for(lambda: "lk_" in log_path.read_text(errors="replace"), 60, 0.2, "the admin key to be printed")
    return re.search(r"^(lk_\S+)$", log_path.read_text(errors="replace"), re.M).group(1)


@dataclass
class EmbeddedService:
    """The shared ``likeness serve``: where it listens, its folder and log, the key its first start printed."""

    base: str
    folder: Path
    log_path: Path
    admin_key: str
    telegram: object  # tests.bot.standin.BotApiStandIn

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=30)


def newcomer_folder(folder: Path, grace_hopper) -> Path:  # noqa: ANN001
    """A user's folder: ``photos/`` of one person (Grace Hopper, public domain); ``data/`` comes from serve."""
    from tests.pipelines.intake.conftest import person_variants

    (folder / "photos").mkdir()
    for i, variant in enumerate(person_variants(grace_hopper, 5)):
        (folder / "photos" / f"grace_{i}.jpg").write_bytes(encode(variant, quality=92))
    return folder


def start_service(folder: Path) -> tuple[subprocess.Popen, EmbeddedService]:
    from tests.bot.standin import TOKEN, BotApiStandIn
    from tests.faults.servers import free_port

    port = free_port()
    telegram = BotApiStandIn().__enter__()
    env = serve_env(LIKENESS_PORT=str(port), LIKENESS_TELEGRAM_TOKEN=TOKEN, LIKENESS_TELEGRAM_API_URL=telegram.url,
                   LIKENESS_WEBHOOK_ALLOW_PRIVATE="true")
    log_path = folder / "serve.log"
    proc = serve(env, log_path, cwd=folder)
    base = f"http://127.0.0.1:{port}"
    try:
        key = printed_admin_key(log_path)
        wait_until_ready(base)
    except BaseException:
        print(log_path.read_text(errors="replace")[-5000:])
        interrupt(proc)
        telegram.__exit__(None, None, None)
        raise
    return proc, EmbeddedService(base, folder, log_path, key, telegram)


def stop_service(proc: subprocess.Popen, service: EmbeddedService) -> None:
    try:
        interrupt(proc)
        if proc.returncode not in (0, 130, -2):
            print(service.log()[-20000:])
    finally:
        service.telegram.__exit__(None, None, None)
