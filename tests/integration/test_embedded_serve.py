"""Embedded mode as a user starts it: ``likeness serve`` on an empty data dir (SQLite database,
SQLite broker, local blobs), one process tree, a job carried by the SQLite broker, Ctrl-C."""

from __future__ import annotations

import re
import signal

import httpx
import pytest
from PIL import Image

from tests.conftest import encode
from tests.integration import embedded
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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


def test_serve_embedded_prints_its_key_and_runs_a_job_through_the_sqlite_broker(embedded_service):
    service = embedded_service
    base, data_dir, key = service.base, service.data_dir, service.admin_key
    out = service.log()
    assert f"listening on {base}" in out.replace("\n", " ") and "embedded" in out
    assert f"admin dashboard: {base}/admin" in out.replace("\n", " ")
    assert (data_dir / "admin_api_key").read_text().strip() == key
    secret = data_dir / "secret_key"  # generated per install, private, and the banner says where
    assert str(secret) in out.replace("\n", "") and secret.stat().st_mode & 0o777 == 0o600
    assert len(secret.read_text().strip()) == 64

    with service.admin() as client:
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
    tg = service.telegram
    user = tg.user(5501, "Embedded")
    tg.send_photo(user, blank)
    tg.wait_for(lambda c: c.method == "sendMessage" and "Photo 1 received" in c.text, 60, what="the bot's verdict")
    bot_key = (data_dir / "bot_api_key").read_text().strip()
    mine = httpx.get(base + "/v1/subjects", params={"external_ref": f"tg:{user.id}"},
                     headers={"Authorization": f"Bearer {bot_key}"}).json()
    assert mine["count"] == 1


def test_ctrl_c_stops_the_whole_tree_and_a_restart_keeps_the_first_key(tmp_path):
    """Its own serve (the shared one stays up for the other tests): Ctrl-C, then a restart on the same data
    dir that prints no second key and stops with its parent on SIGTERM (docker stop)."""
    from tests.bot.standin import TOKEN, BotApiStandIn
    from tests.faults.servers import free_port

    with BotApiStandIn() as tg:  # a Telegram token is set: serve also runs the bot
        port = free_port()
        env = embedded.serve_env(LIKENESS_DATA_DIR=str(tmp_path / "data"), LIKENESS_PORT=str(port),
                                 LIKENESS_TELEGRAM_TOKEN=TOKEN, LIKENESS_TELEGRAM_API_URL=tg.url)
        first = embedded.serve(env, tmp_path / "serve.log")
        try:
            embedded.printed_admin_key(tmp_path / "serve.log")
            embedded.wait_until_ready(f"http://127.0.0.1:{port}")
            wait_for(lambda: len(embedded.group_members(first.pid)) >= 4, 60, 0.2, "the API, worker and bot children")
        finally:
            embedded.interrupt(first)
        assert first.returncode is not None and not embedded.group_alive(first.pid)  # API, workers, bot all gone

        log_path = tmp_path / "serve2.log"
        restart = embedded.serve(env, log_path)
        try:
            wait_for(lambda: "admin API key: see" in log_path.read_text(errors="replace").replace("\n", " "),
                     60, 0.2, "the restart banner")
            assert "lk_" not in log_path.read_text(errors="replace")  # no second key
            wait_for(lambda: len(embedded.group_members(restart.pid)) >= 4, 60, 0.2, "the API, worker and bot children")
            restart.send_signal(signal.SIGTERM)  # docker stop / kill: only the parent gets it
            restart.wait(timeout=30)
            wait_for(lambda: not embedded.group_alive(restart.pid), 30, 0.2, "the children to stop with the parent")
        finally:
            if embedded.group_alive(restart.pid):
                embedded.interrupt(restart)
