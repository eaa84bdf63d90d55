"""Embedded mode (``likeness serve``) runs the cpu queue apart from the gpu queue: while one client's
training runs, another client's intake completes and a cancel's webhook arrives, instead of
waiting for the training to end (one worker for both queues made them wait for minutes)."""

from __future__ import annotations

import http.server
import json
import threading

import httpx
import pytest

from tests.faults.conftest import photos
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_intake_and_webhooks_do_not_wait_behind_a_training(embedded_service, grace_hopper):
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    _Hooks.received = []
    client, long_job = None, None
    try:
        # a client of its own (the shared service's other tests have theirs)
        with embedded_service.admin() as admin:
            created = admin.post("/v1/admin/clients", json={"name": "queues", "role": "app"})
            assert created.status_code == 201, created.text
        client = httpx.Client(base_url=embedded_service.base, timeout=30,
                              headers={"Authorization": f"Bearer {created.json()['api_key']}"})
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
            print(embedded_service.log()[-5000:])
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
            print(client.get(f"/v1/jobs/{other_job}").json(), _Hooks.received, embedded_service.log()[-4000:])
            raise
        assert training(long_job) and client.get(f"/v1/jobs/{other_job}").json()["state"] == "canceled"

        assert client.post(f"/v1/jobs/{long_job}/cancel").status_code == 200
        wait_for(lambda: client.get(f"/v1/jobs/{long_job}").json()["state"] == "canceled", 60, 0.5,
                 "the long training to stop")
    finally:
        hooks.shutdown()
        if long_job is not None:  # never leave the shared service's gpu worker busy for the next test
            client.post(f"/v1/jobs/{long_job}/cancel")
            wait_for(lambda: client.get(f"/v1/jobs/{long_job}").json()["state"] in ("canceled", "failed", "succeeded"),
                     60, 0.5, "the long training to stop")
