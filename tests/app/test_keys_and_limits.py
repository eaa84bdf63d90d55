"""API keys and per-client limits: a key change takes effect at once in every API process; requests
per minute, jobs at once, trainings per day and stored bytes are enforced; deleting a client
deletes everything of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests.app.helpers import create_subject, jpeg, subject_with_photo, upload

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_api_processes(pg_url, tmp_path_factory):
    """Two uvicorn processes of the app on one database and Redis (as ``--workers 2`` or two hosts)."""
    logs = tmp_path_factory.mktemp("api-logs")
    procs, bases = [], []
    for i in range(2):
        port = _free_port()
        log = open(logs / f"api-{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                                       "--port", str(port), "--log-level", "warning"],
                                      cwd=ROOT, env=dict(os.environ), stdout=log, stderr=log))
        bases.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 90
        for base, proc in zip(bases, procs):
            while True:
                assert proc.poll() is None, (logs / "api-0.log").read_text() + (logs / "api-1.log").read_text()
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the API processes did not start"
                time.sleep(0.2)
        yield bases
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)


def _outside_a_minute_boundary() -> None:
    """Rate windows are calendar minutes: don't straddle one."""
    if time.time() % 60 > 55:
        time.sleep(61 - time.time() % 60)


def test_key_changes_take_effect_at_once_in_another_api_process(two_api_processes, make_client):
    a, b = (httpx.Client(base_url=base, timeout=30) for base in two_api_processes)
    admin, client = make_client("admin"), make_client()
    as_admin = {"Authorization": f"Bearer {admin.key}"}
    old = {"Authorization": f"Bearer {client.key}"}
    for api in (a, b):  # both processes have the key cached now
        assert api.get("/v1/subjects", headers=old).status_code == 200

    rotated = a.post(f"/v1/admin/clients/{client.id}/rotate", headers=as_admin)
    assert rotated.status_code == 200
    new = {"Authorization": f"Bearer {rotated.json()['api_key']}"}
    refused = b.get("/v1/subjects", headers=old)
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert b.get("/v1/subjects", headers=new).status_code == 200

    _outside_a_minute_boundary()
    limits = a.put(f"/v1/admin/clients/{client.id}/limits", headers=as_admin, json={"requests_per_minute": 2})
    assert limits.status_code == 200 and limits.json()["requests_per_minute"] == 2
    answers = [b.get("/v1/subjects", headers=new) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[2].json()["code"] == "rate_limited" and 1 <= int(answers[2].headers["retry-after"]) <= 60

    assert a.post(f"/v1/admin/clients/{client.id}/revoke", headers=as_admin).status_code == 200
    assert b.get("/v1/subjects", headers=new).status_code == 401
    assert a.get("/v1/subjects", headers=new).status_code == 401


def test_the_cache_is_not_trusted_while_key_changes_cannot_be_heard(settings):
    from app.auth_sync import AuthSubscriber

    deaf = AuthSubscriber(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    try:
        deaf.start(wait_s=0.5)
        assert not deaf.trusted  # every request is then checked against the database
    finally:
        deaf.stop()
    assert AuthSubscriber(settings.model_copy(update={"redis_url": "", "broker_url": ""})).trusted  # embedded


@pytest.mark.parametrize("storage", ["memory://", "redis"])
def test_the_window_slides_no_double_burst_where_two_minutes_meet(storage, settings, monkeypatch):
    """A fixed window lets 2x the limit through around a minute boundary; the sliding one does not."""
    import secrets

    from app.ratelimit import RateLimiter

    limiter = RateLimiter(settings.resolved_redis_url if storage == "redis" else storage,
                          f"test-{secrets.token_hex(4)}:")
    minute = (int(time.time()) // 60 + 2) * 60  # a minute boundary ahead (the storage's own clock is moved)
    monkeypatch.setattr(time, "time", lambda: minute - 1.0)
    assert [limiter.hit("c", 3).allowed for _ in range(3)] == [True, True, True]
    assert not limiter.hit("c", 3).allowed and limiter.hit("other", 3).allowed  # per key
    monkeypatch.setattr(time, "time", lambda: minute + 1.0)  # the next minute has begun: 3 were sent 2 s ago
    after = [limiter.hit("c", 3) for _ in range(3)]
    assert sum(d.allowed for d in after) <= 1  # a fixed window would let all 3 through (6 in 2 s)
    refused = after[-1]
    assert not refused.allowed and refused.remaining == 0 and 0 < refused.reset_s <= 60
    assert refused.headers()["RateLimit-Limit"] == "3" and refused.headers()["RateLimit-Remaining"] == "0"


def test_an_unreachable_limiter_lets_requests_through():
    from app.ratelimit import RateLimiter

    decision = RateLimiter("redis://127.0.0.1:1/0").hit("c", 1)
    assert decision.allowed and not decision.counted and decision.headers() == {}


def test_rate_limit_answers_429_with_retry_after_and_the_error_body(client_a, admin, settings):
    _outside_a_minute_boundary()
    assert admin.put(f"/v1/admin/clients/{client_a.id}/limits", json={"requests_per_minute": 3}).status_code == 200
    statuses = [client_a.get("/v1/jobs").status_code for _ in range(3)]
    limited = client_a.get(f"/v1/jobs/{'0' * 32}")
    assert statuses == [200, 200, 200] and limited.status_code == 429
    body = limited.json()
    assert body["code"] == "rate_limited" and body["details"]["limit_per_minute"] == 3
    assert int(limited.headers["retry-after"]) == body["details"]["retry_after_s"] <= 60
    assert limited.headers["ratelimit-limit"] == "3" and limited.headers["ratelimit-remaining"] == "0"
    assert admin.get("/v1/admin/jobs").status_code == 200  # other clients are not limited


def test_answers_within_the_limit_say_what_is_left(client_a, admin):
    assert admin.put(f"/v1/admin/clients/{client_a.id}/limits", json={"requests_per_minute": 50}).status_code == 200
    first, second = client_a.get("/v1/jobs"), client_a.get("/v1/jobs")
    assert first.headers["ratelimit-limit"] == "50" and first.headers["ratelimit-policy"] == "50;w=60"
    assert int(second.headers["ratelimit-remaining"]) == int(first.headers["ratelimit-remaining"]) - 1


@pytest.mark.parametrize("attempt", ["wrong_key", "no_key", "bad_signed_link"])
def test_failed_authentication_is_limited_per_address(app, admin, settings, monkeypatch, attempt):
    """Wrong keys (or forged signed links) from one address: after the limit even a right key waits; another
    address is unaffected."""
    from fastapi.testclient import TestClient

    monkeypatch.setattr(settings, "auth_failures_per_minute", 5)
    address = f"203.0.113.{10 + ['wrong_key', 'no_key', 'bad_signed_link'].index(attempt)}"
    guesser = TestClient(app, raise_server_exceptions=False, client=(address, 50000))
    fail = {"wrong_key": lambda: guesser.get("/v1/jobs", headers={"Authorization": "Bearer lk_guess"}),
            "no_key": lambda: guesser.get("/v1/jobs"),
            "bad_signed_link": lambda: guesser.get("/v1/blobs/signed", params={
                "client": "c", "subject": "s", "image": "i", "variant": "original", "exp": 2**40, "sig": "0" * 64})}
    statuses = [fail[attempt]().status_code for _ in range(5)]
    assert statuses == [403 if attempt == "bad_signed_link" else 401] * 5
    blocked = guesser.get("/v1/jobs", headers=admin.headers)
    assert blocked.status_code == 429 and blocked.json()["code"] == "too_many_failed_attempts"
    assert int(blocked.headers["retry-after"]) >= 1 and blocked.headers["ratelimit-remaining"] == "0"
    elsewhere = TestClient(app, raise_server_exceptions=False, client=("198.51.100.20", 50000))
    assert elsewhere.get("/v1/jobs", headers=admin.headers).status_code == 200


def test_signed_links_are_rate_limited_per_address(app, settings, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setattr(settings, "default_requests_per_minute", 3)
    fetcher = TestClient(app, raise_server_exceptions=False, client=("203.0.113.40", 50000))
    params = {"client": "c", "subject": "s", "image": "i", "variant": "original", "exp": 1, "sig": "0" * 64}
    statuses = [fetcher.get("/v1/blobs/signed", params=params).status_code for _ in range(4)]
    assert statuses == [403, 403, 403, 429]


def test_a_new_client_gets_the_shipped_default_limits(monkeypatch):
    """Without configuration a client is bounded: requests, jobs at once, trainings a day, storage."""
    from core.config import Settings

    for name in [k for k in os.environ if k.startswith(("LIKENESS_DEFAULT_", "LIKENESS_AUTH_FAILURES"))]:
        monkeypatch.delenv(name)
    shipped = Settings(_env_file=None)
    assert shipped.default_requests_per_minute == 1200 and shipped.default_max_concurrent_jobs == 4
    assert shipped.default_max_trainings_per_day == 20 and shipped.default_max_storage_bytes == 5 * 1024**3
    assert shipped.auth_failures_per_minute == 30


def test_the_defaults_apply_to_a_client_without_its_own_limits(client_a, settings, monkeypatch):
    monkeypatch.setattr(settings, "default_max_concurrent_jobs", 1)
    first, second = subject_with_photo(client_a), subject_with_photo(client_a)
    assert client_a.post(f"/v1/subjects/{first}/train").status_code == 202
    busy = client_a.post(f"/v1/subjects/{second}/train")
    assert busy.status_code == 429 and busy.json()["code"] == "too_many_active_jobs"


def test_concurrent_jobs_and_trainings_per_day(client_a, admin):
    first, second = subject_with_photo(client_a), subject_with_photo(client_a)
    limits = {"max_concurrent_jobs": 1, "max_trainings_per_day": 2}
    assert admin.put(f"/v1/admin/clients/{client_a.id}/limits", json=limits).status_code == 200

    job = client_a.post(f"/v1/subjects/{first}/train").json()["id"]
    busy = client_a.post(f"/v1/subjects/{second}/train")
    assert busy.status_code == 429 and busy.json()["code"] == "too_many_active_jobs"
    assert busy.json()["details"] == {"limit": 1, "active": 1}
    assert client_a.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert client_a.post(f"/v1/subjects/{second}/train").status_code == 202  # a slot is free again
    client_a.post(f"/v1/jobs/{client_a.get('/v1/jobs').json()['data'][0]['id']}/cancel")

    over = client_a.post(f"/v1/subjects/{first}/train")
    assert over.status_code == 429 and over.json()["code"] == "training_quota_exceeded"
    assert 86_000 < int(over.headers["retry-after"]) <= 86_400


def test_storage_quota_refuses_uploads_past_it(client_a, admin, store):
    subject_id = create_subject(client_a)
    first = upload(client_a, subject_id, [("a.jpg", jpeg(seed=1))])
    assert first.status_code == 201
    used = client_a.get(f"/v1/subjects/{subject_id}/photos").json()["count"]
    assert used == 1
    from app.services.quotas import stored_bytes
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        stored = stored_bytes(session, store, client_a.id)
    assert stored > 0
    limits = {"max_storage_bytes": stored + 100}
    assert admin.put(f"/v1/admin/clients/{client_a.id}/limits", json=limits).status_code == 200
    refused = upload(client_a, subject_id, [("b.jpg", jpeg(seed=2))])
    assert refused.status_code == 403 and refused.json()["code"] == "storage_quota_exceeded"
    assert refused.json()["details"]["used_bytes"] == stored
    assert client_a.get(f"/v1/subjects/{subject_id}/photos").json()["count"] == 1
    assert len(store.list(f"subjects/{subject_id}/")) == 1  # nothing of the refused upload was kept


def test_template_photos_and_adapters_count_against_the_storage_quota(client_a, admin, store):
    """Every blob a client owns counts: template photos and a trained adapter too, not only photos and images."""
    from core.storage import adapter_prefix
    from tests.app.helpers import add_adapter

    subject_id = create_subject(client_a)
    photo = jpeg(seed=3)
    limit = 3 * len(photo) + len(photo) // 2  # room for three such files, not four
    assert admin.put(f"/v1/admin/clients/{client_a.id}/limits", json={"max_storage_bytes": limit}).status_code == 200
    for seed in (3, 4, 5):
        stored = client_a.post(f"/v1/subjects/{subject_id}/templates/photos",
                               files=[("files", (f"t{seed}.jpg", jpeg(seed=seed), "image/jpeg"))])
        assert stored.status_code == 201, stored.text
    refused = client_a.post(f"/v1/subjects/{subject_id}/templates/photos",
                            files=[("files", ("t6.jpg", jpeg(seed=6), "image/jpeg"))])
    assert refused.status_code == 403 and refused.json()["code"] == "storage_quota_exceeded"
    assert upload(client_a, subject_id, [("p.jpg", jpeg(seed=7))]).status_code == 403  # photos too

    other = create_subject(client_a)  # an adapter's files count as well
    add_adapter(other)
    store.put(adapter_prefix(other, 1) + "pytorch_lora_weights.safetensors", bytes(5000))
    adapter_bytes = store.size_of_prefix(adapter_prefix(other, 1))
    assert adapter_bytes == 5000
    used = refused.json()["details"]["used_bytes"]
    again = upload(client_a, subject_id, [("p.jpg", jpeg(seed=7))])
    assert again.json()["details"]["used_bytes"] == used + adapter_bytes


def test_last_used_at_is_recorded(client_a, admin):
    client_a.get("/v1/subjects")
    listed = {c["id"]: c for c in admin.get("/v1/admin/clients", params={"limit": 1000}).json()["data"]}
    assert listed[client_a.id]["last_used_at"] is not None


def test_deleting_a_client_deletes_everything_of_it(client_a, client_b, admin, store):
    from core.db.models import Client, Image, Job, Photo, Subject, WebhookDelivery
    from tests.app.fixtures import session_scope
    from tests.app.test_tenancy_and_deletion import _seed_results

    subjects = [subject_with_photo(client_a) for _ in range(2)]
    _seed_results(subjects[0], client_a.id, store)
    client_a.post(f"/v1/subjects/{subjects[1]}/train")
    kept = subject_with_photo(client_b)
    assert all(store.list(f"subjects/{s}/") for s in subjects)

    assert admin.delete(f"/v1/admin/clients/{client_a.id}").status_code == 204
    assert client_a.get("/v1/subjects").status_code == 401
    with session_scope() as session:
        assert session.get(Client, client_a.id) is None
        assert session.scalar(select(func.count()).select_from(Subject).where(Subject.client_id == client_a.id)) == 0
        for model in (Photo, Image):
            assert session.scalar(select(func.count()).select_from(model).where(model.subject_id.in_(subjects))) == 0
        assert session.scalar(select(func.count()).select_from(Job).where(Job.client_id == client_a.id)) == 0
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)
                              .where(WebhookDelivery.client_id == client_a.id)) == 0
    assert all(store.list(f"subjects/{s}/") == [] for s in subjects)
    assert client_b.get(f"/v1/subjects/{kept}/photos").json()["count"] == 1 and store.list(f"subjects/{kept}/")

    assert admin.delete(f"/v1/admin/clients/{client_a.id}").status_code == 404
    own = admin.delete(f"/v1/admin/clients/{admin.id}")
    assert own.status_code == 409 and own.json()["code"] == "cannot_delete_self"
