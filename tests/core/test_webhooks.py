from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import threading
import time
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from alembic.migration import MigrationContext
from alembic.operations import Operations

from core import webhooks
from likeness import webhooks as signing
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


def _standard_webhooks_signature_ok(body: bytes, secret: str, headers: dict[str, str]) -> bool:
    """The check any Standard Webhooks library makes, written from the specification: the key is the base64
    payload of the ``whsec_`` secret; the signature is base64 HMAC-SHA256 over ``id.timestamp.body``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return abs(time.time() - int(headers["webhook-timestamp"])) < 300 and expected in headers[
        "webhook-signature"].split(" ")


def test_standard_webhooks_signature_is_verified_and_tampering_is_not():
    secret = signing.new_secret()
    assert base64.b64decode(secret.removeprefix("whsec_"), validate=True)  # the standard secret form
    body, now = b'{"job_id":"x"}', int(time.time())
    headers = signing.signature_headers(body, secret, "msg_1", now)
    assert _standard_webhooks_signature_ok(body, secret, headers)
    assert signing.verify(body, secret, headers)
    assert signing.verify(body, secret, {"X-Likeness-Signature": headers["X-Likeness-Signature"]})
    assert not signing.verify(body, secret, {**headers, "webhook-id": "msg_2"})  # the id is signed
    assert not signing.verify(body + b" ", secret, headers)
    assert not signing.verify(body, signing.new_secret(), headers)
    assert not signing.verify(body, secret, headers, now=now + 3600)


def test_a_non_ascii_signature_is_refused_not_an_error():
    body, now = b"{}", int(time.time())
    assert not signing.verify(body, "whsec_x", f"t={now},v1=abc\u00e9")
    assert not signing.verify(body, "whsec_x", {"webhook-id": "m", "webhook-timestamp": str(now),
                                                 "webhook-signature": "v1,\u00e9\u00e9"})


def test_webhook_secrets_are_stored_encrypted_and_old_rows_are_migrated(client_a, receiver, allow_private, settings):
    from sqlalchemy import text

    from core import sealed
    from core.db.models import Client
    from tests.app.fixtures import session_scope

    secret = client_a.put("/v1/webhook", json={"url": receiver.url}).json()["secret"]
    with session_scope() as session:
        stored = session.get(Client, client_a.id).webhook_secret
    assert secret not in stored and stored.startswith("enc1:")
    assert sealed.unseal(settings, stored) == secret

    # A row written before encryption (plaintext) is encrypted by the migration.
    migration = importlib.import_module("migrations.versions.0006_sealed_webhook_secrets")
    with session_scope() as session:
        session.execute(text("UPDATE clients SET webhook_secret = :s WHERE id = :id"),
                        {"s": "whsec_legacy", "id": client_a.id})
        context = MigrationContext.configure(session.connection())
        with Operations.context(context):
            migration.upgrade()
        stored = session.get(Client, client_a.id).webhook_secret
    assert stored.startswith("enc1:") and sealed.unseal(settings, stored) == "whsec_legacy"


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
        from core.config import get_settings
        from core.db.models import utcnow

        wait_s = (row.next_attempt_at.replace(tzinfo=row.next_attempt_at.tzinfo or UTC) - utcnow()).total_seconds()
        assert 0 < wait_s <= get_settings().webhook_backoff_first_s  # the configured first delay

    # It recovers: the retry is delivered, signed with the client's secret.
    receiver.status = 204
    assert webhooks.record_and_send(delivery["id"]) is False
    headers, body = receiver.requests[-1]
    assert webhooks.verify(body, secret, headers["x-likeness-signature"])  # the original header, still sent
    assert signing.verify(body, secret, headers)  # the Standard Webhooks one
    assert _standard_webhooks_signature_ok(body, secret, headers)
    assert headers["webhook-id"] == delivery["id"]
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
