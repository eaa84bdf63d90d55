from __future__ import annotations

import threading

from tests.app.helpers import jpeg, subject_with_photo, upload


def test_same_key_replays_the_first_response_and_creates_one_job(client_a):
    subject_id = subject_with_photo(client_a)
    headers = {"Idempotency-Key": "train-1"}
    first = client_a.post(f"/v1/subjects/{subject_id}/train", json={"steps": 100}, headers=headers)
    second = client_a.post(f"/v1/subjects/{subject_id}/train", json={"steps": 100}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert client_a.get("/v1/jobs", params={"subject_id": subject_id}).json()["count"] == 1

    reused = client_a.post(f"/v1/subjects/{subject_id}/train", json={"steps": 200}, headers=headers)
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"


def test_keys_are_per_client(client_a, client_b):
    a = client_a.post("/v1/subjects", json={"name": "A"}, headers={"Idempotency-Key": "k"})
    b = client_b.post("/v1/subjects", json={"name": "A"}, headers={"Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]


def test_upload_retry_with_same_key_stores_photos_once(client_a):
    subject_id = subject_with_photo(client_a)
    files = [("x.jpg", jpeg(300, 5)), ("y.jpg", jpeg(300, 6))]
    first = upload(client_a, subject_id, files, headers={"Idempotency-Key": "up-1"})
    second = upload(client_a, subject_id, files, headers={"Idempotency-Key": "up-1"})
    assert first.json() == second.json()
    assert client_a.get(f"/v1/subjects/{subject_id}/photos").json()["count"] == 3


def test_failed_request_does_not_burn_the_key(client_a):
    from core.db.models import Job, JobState
    from tests.app.fixtures import session_scope

    subject_id = subject_with_photo(client_a)
    running = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    headers = {"Idempotency-Key": "after-conflict"}
    assert client_a.post(f"/v1/subjects/{subject_id}/train", headers=headers).status_code == 409
    with session_scope() as session:
        session.get(Job, running).state = JobState.FAILED
    assert client_a.post(f"/v1/subjects/{subject_id}/train", headers=headers).status_code == 202


def test_concurrent_duplicates_create_one_job(client_a):
    subject_id = subject_with_photo(client_a)
    barrier = threading.Barrier(8)
    responses = []

    def send():
        barrier.wait()
        responses.append(client_a.post(f"/v1/subjects/{subject_id}/train", json={"mode": "lora"},
                                       headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in responses] == [202] * 8, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert client_a.get("/v1/jobs", params={"subject_id": subject_id}).json()["count"] == 1
