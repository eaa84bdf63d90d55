"""Embedded mode (``likeness serve``) runs the cpu queue apart from the gpu queue: while one client's
training runs, another client's intake completes and a cancel's webhook arrives, instead of
waiting for the training to end (one worker for both queues made them wait for minutes)."""

from __future__ import annotations

import http.server
import json
import re
import threading

import httpx
import pytest

from tests.conftest import MODEL_CACHE
from tests.faults.conftest import photos
from tests.faults.servers import free_port
from tests.integration.conftest import clean_environ, wait_for
from tests.integration.test_embedded_serve import _interrupt, _serve, wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_intake_and_webhooks_do_not_wait_behind_a_training(tmp_path, grace_hopper):
    port = free_port()
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path / "data"), LIKENESS_PORT=str(port),
                        LIKENESS_MODEL_CACHE_DIR=str(MODEL_CACHE), LIKENESS_DEVICE="cpu", HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", LIKENESS_WEBHOOK_ALLOW_PRIVATE="true")
    log = tmp_path / "serve.log"
    proc = _serve(env, log)
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    _Hooks.received = []
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "lk_" in log.read_text(errors="replace"), 60, 0.2, "the admin key to be printed")
        key = re.search(r"^(lk_\S+)$", log.read_text(errors="replace"), re.M).group(1)

        wait_until_ready(base)
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert client.put("/v1/webhook", json={"url": f"http://127.0.0.1:{hooks.server_port}/hook"}).status_code == 200

        def subject(name: str) -> str:
            sid = client.post("/v1/subjects", json={"name": name}).json()["id"]
            assert client.post(f"/v1/subjects/{sid}/photos", files=photos(grace_hopper)).status_code == 201
            return sid

        # A long training (the most steps a request may ask for) holds the gpu queue's worker.
        long_sid, other_sid = subject("long"), subject("other")
        long_job = client.post(f"/v1/subjects/{long_sid}/train", json={"steps": 5000}).json()["id"]

        def training(job_id: str) -> dict | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] in ("queued", "running"), job
            return job if (job["stage"] or "").startswith("training") else None

        try:
            wait_for(lambda: training(long_job), 120, 0.5, "the long job to reach training")
        except AssertionError:
            print(log.read_text(errors="replace")[-5000:])
            raise

        # Meanwhile another subject's intake runs on the cpu queue's worker and finishes.
        other_job = client.post(f"/v1/subjects/{other_sid}/train", json={"steps": 10}).json()["id"]

        def judged() -> bool:
            listed = client.get(f"/v1/subjects/{other_sid}/photos").json()["data"]
            return all(p["status"] != "pending" for p in listed)

        wait_for(judged, 90, 0.5, "the other subject's intake while the training runs")
        verdicts = [p["status"] for p in client.get(f"/v1/subjects/{other_sid}/photos").json()["data"]]
        assert verdicts.count("accepted") >= 5, verdicts
        assert training(long_job), "the long training ended before the other intake: nothing was shown"

        # Its training waits for the gpu worker (or its intake is finishing): either way the cancel takes
        # effect, and its webhook arrives, while the training runs on.
        canceled = client.post(f"/v1/jobs/{other_job}/cancel")
        assert canceled.status_code == 200 and canceled.json()["cancel_requested"], canceled.text
        try:
            wait_for(lambda: any(e["job_id"] == other_job and e["state"] == "canceled" for e in _Hooks.received),
                     30, 0.2, "the cancel's webhook while the training runs")
        except AssertionError:
            print(client.get(f"/v1/jobs/{other_job}").json(), _Hooks.received, log.read_text(errors="replace")[-4000:])
            raise
        assert training(long_job) and client.get(f"/v1/jobs/{other_job}").json()["state"] == "canceled"

        client.post(f"/v1/jobs/{long_job}/cancel")
        wait_for(lambda: client.get(f"/v1/jobs/{long_job}").json()["state"] == "canceled", 60, 0.5,
                 "the long training to stop")
    finally:
        hooks.shutdown()
        _interrupt(proc)
