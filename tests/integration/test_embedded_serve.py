"""Embedded mode as a user starts it: ``likeness serve`` on an empty data dir (SQLite database,
SQLite broker, local blobs), one process tree, a job carried by the SQLite broker, Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from tests.conftest import MODEL_CACHE, encode
from tests.integration.conftest import ROOT, clean_environ, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _serve(env: dict[str, str], log_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "likeness", "serve"], cwd=ROOT, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_ready(base: str) -> None:
    """Until the served API answers ``/readyz`` with 200 (up to a minute)."""
    def ready() -> bool:
        try:
            return httpx.get(base + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, 0.3, "the API to be ready")


def _interrupt(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    proc.wait(timeout=30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def _dashboard_shows_the_failed_job(base: str, key: str, job_id: str) -> None:
    """/admin on the embedded default: log in with the printed key, see the job and its error."""
    with httpx.Client(base_url=base, timeout=30) as browser:
        form = browser.get("/admin/login").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
        assert browser.post("/admin/login", data={"api_key": key, "csrf_token": token}).status_code == 303
        overview = browser.get("/admin")
        assert overview.status_code == 200 and "dataset_rejected" in overview.text
        assert 'id="queues"' in overview.text  # the SQLite broker's queue depths
        job = browser.get(f"/admin/jobs/{job_id}").text
        assert "dataset_rejected" in job and 'id="stage-timeline"' in job


def test_serve_embedded_runs_a_job_and_stops_cleanly(tmp_path):
    from tests.bot.standin import TOKEN, BotApiStandIn
    from tests.integration.test_e2e_http import _free_port

    port = _free_port()
    data_dir = tmp_path / "data"
    tg = BotApiStandIn().__enter__()  # a Telegram token is set: serve also runs the bot
    env = clean_environ(LIKENESS_DATA_DIR=str(data_dir), LIKENESS_PORT=str(port),
                        LIKENESS_MODEL_CACHE_DIR=str(MODEL_CACHE), LIKENESS_DEVICE="cpu", HF_HUB_OFFLINE="1",
                        LIKENESS_TELEGRAM_TOKEN=TOKEN, LIKENESS_TELEGRAM_API_URL=tg.url)
    log = tmp_path / "serve.log"
    proc = _serve(env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "lk_" in log.read_text(errors="replace"), 60, 0.2, "the admin key to be printed")
        out = log.read_text(errors="replace")
        assert f"listening on {base}" in out.replace("\n", " ") and "embedded" in out
        assert f"admin dashboard: {base}/admin" in out.replace("\n", " ")
        key = re.search(r"^(lk_\S+)$", out, re.M).group(1)
        assert (data_dir / "admin_api_key").read_text().strip() == key
        secret = data_dir / "secret_key"  # generated per install, private, and the banner says where
        assert str(secret) in out.replace("\n", "") and secret.stat().st_mode & 0o777 == 0o600
        assert len(secret.read_text().strip()) == 64

        wait_until_ready(base)
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        sid = client.post("/v1/subjects", json={"name": "nobody"}).json()["id"]
        blank = encode(Image.new("RGB", (400, 400), "white"), "PNG")
        assert client.post(f"/v1/subjects/{sid}/photos", files=[("files", ("blank.png", blank))]).status_code == 201
        job_id = client.post(f"/v1/subjects/{sid}/train", json={}).json()["id"]

        def finished() -> dict | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["state"] in ("succeeded", "failed", "canceled") else None

        job = wait_for(finished, 120, 0.5, "the job to go through the SQLite broker and the local worker")
        assert job["state"] == "failed" and job["error_code"] == "dataset_rejected" and job["stage"] == "intake"
        photo = client.get(f"/v1/subjects/{sid}/photos").json()["data"][0]
        assert photo["status"] == "rejected" and photo["reason_code"]
        _dashboard_shows_the_failed_job(base, key, job_id)

        # the embedded bot talks to this API with a bot client's key of its own
        user = tg.user(5501, "Embedded")
        tg.send_photo(user, blank)
        tg.wait_for(lambda c: c.method == "sendMessage" and "Photo 1 received" in c.text, 60, what="the bot's verdict")
        bot_key = (data_dir / "bot_api_key").read_text().strip()
        mine = httpx.get(base + "/v1/subjects", params={"external_ref": f"tg:{user.id}"},
                         headers={"Authorization": f"Bearer {bot_key}"}).json()
        assert mine["count"] == 1
    finally:
        _interrupt(proc)
    assert proc.returncode is not None and not _group_alive(proc.pid)  # API and worker both gone

    restart = _serve(env, tmp_path / "serve2.log")
    try:
        log_path = tmp_path / "serve2.log"
        wait_for(lambda: "admin API key: see" in log_path.read_text(errors="replace").replace("\n", " "),
                 60, 0.2, "the restart banner")
        assert "lk_" not in (tmp_path / "serve2.log").read_text(errors="replace")  # no second key
        wait_for(lambda: len(_group_members(restart.pid)) >= 4, 60, 0.2, "the API, worker and bot children")
        restart.send_signal(signal.SIGTERM)  # docker stop / kill: only the parent gets it
        restart.wait(timeout=30)
        wait_for(lambda: not _group_alive(restart.pid), 30, 0.2, "the children to stop with the parent")
    finally:
        if _group_alive(restart.pid):
            _interrupt(restart)
        tg.__exit__(None, None, None)
