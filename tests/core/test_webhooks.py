from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core import webhooks
from tests.app.helpers import subject_with_photo


class Receiver:
    """A real HTTP server on 127.0.0.1 that records requests and answers ``status``."""

    def __init__(self, status: int = 200, location: str | None = None):
        self.status = status
        self.location = location
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def allow_private(settings, monkeypatch):
    """What a self-hosted operator sets to receive webhooks on its own network (here: 127.0.0.1).

    Set on the app's settings and on the process's (delivery reads ``get_settings()``; a test that
    cleared its cache leaves another object there)."""
    from core.config import get_settings

    for target in {id(s): s for s in (settings, get_settings())}.values():
        monkeypatch.setattr(target, "webhook_allow_private", True)


def test_sign_and_verify():
    body = b'{"job_id":"x"}'
    now = int(time.time())
    header = webhooks.sign(body, "s3cret", now)
    assert header.startswith(f"t={now},v1=")
    assert webhooks.verify(body, "s3cret", header)
    assert not webhooks.verify(body + b" ", "s3cret", header)
    assert not webhooks.verify(body, "other", header)
    assert not webhooks.verify(body, "s3cret", header, now=now + 3600)  # replayed much later
    assert not webhooks.verify(body, "s3cret", "garbage")


def test_job_event_is_delivered_signed_and_a_500_is_logged_for_retry(client_a, receiver, allow_private):
    from core.db.models import WebhookDelivery
    from tests.app.fixtures import session_scope

    registered = client_a.put("/v1/webhook", json={"url": receiver.url})
    assert registered.status_code == 200
    secret = registered.json()["secret"]
    assert secret.startswith("whsec_")

    subject_id = subject_with_photo(client_a)
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    client_a.post(f"/v1/jobs/{job_id}/cancel")  # a state change -> one delivery row
    log = client_a.get("/v1/webhook/deliveries", params={"job_id": job_id}).json()
    assert log["count"] == 1
    delivery = log["data"][0]
    assert delivery["event"] == "job.canceled" and delivery["payload"]["state"] == "canceled"
    assert delivery["payload"]["subject_id"] == subject_id

    # The receiver fails: the attempt is logged and marked for retry.
    receiver.status = 500
    assert webhooks.record_and_send(delivery["id"]) is True
    with session_scope() as session:
        row = session.get(WebhookDelivery, delivery["id"])
        assert row.attempt == 1 and row.status_code == 500 and "500" in row.error
        assert row.delivered_at is None and row.next_attempt_at is not None

    # It recovers: the retry is delivered, signed with the client's secret.
    receiver.status = 204
    assert webhooks.record_and_send(delivery["id"]) is False
    headers, body = receiver.requests[-1]
    assert webhooks.verify(body, secret, headers["x-likeness-signature"])
    assert json.loads(body)["job_id"] == job_id and headers["x-likeness-event"] == "job.canceled"
    logged = client_a.get("/v1/webhook/deliveries").json()["data"][0]
    assert logged["attempt"] == 2 and logged["status_code"] == 204 and logged["delivered_at"]
    assert len(receiver.requests) == 2


def test_unreachable_receiver_is_retried_and_a_4xx_is_not(client_a, receiver, allow_private):
    from core.db.models import Job
    from tests.app.fixtures import session_scope

    client_a.put("/v1/webhook", json={"url": "http://127.0.0.1:9/nothing"})
    subject_id = subject_with_photo(client_a)
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    with session_scope() as session:
        delivery_id = webhooks.queue_job_event(session, session.get(Job, job_id))
    assert webhooks.record_and_send(delivery_id) is True

    client_a.put("/v1/webhook", json={"url": receiver.url})
    receiver.status = 410
    assert webhooks.record_and_send(delivery_id) is False  # the receiver refuses: give up


def test_webhook_url_must_be_http(client_a):
    response = client_a.put("/v1/webhook", json={"url": "file:///etc/passwd"})
    assert response.status_code == 422 and response.json()["code"] == "invalid_webhook_url"
