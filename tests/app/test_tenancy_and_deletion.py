from __future__ import annotations

from sqlalchemy import func, select

from tests.app.helpers import add_adapter, subject_with_photo


def _seed_results(subject_id: str, client_id: str, store) -> tuple[str, str]:  # noqa: ANN001
    """What a finished generation leaves: a job, an image row and its blobs (as the worker writes them)."""
    from core.db.models import Image, Job, JobKind, JobState
    from core.storage import adapter_prefix, image_key, upscaled_image_key
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        job = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.GENERATE, state=JobState.SUCCEEDED,
                  request={"style": "cinematic"}, completed_stages=[], progress=100.0)
        session.add(job)
        session.flush()
        image = Image(job_id=job.id, subject_id=subject_id, rank=1, key="", width=128, height=160, seed=3,
                      prompt="a photo of sks girl", style="cinematic", scores={"aesthetic": 6.1})
        session.add(image)
        session.flush()
        image.key = image_key(subject_id, image.id)
        image.upscaled_key = upscaled_image_key(subject_id, image.id)
        job_id, image_id = job.id, image.id
    store.put(image_key(subject_id, image_id), b"\x89PNG original", "image/png")
    store.put(upscaled_image_key(subject_id, image_id), b"\x89PNG upscaled", "image/png")
    store.put(adapter_prefix(subject_id, 1) + "adapter.safetensors", b"weights")
    return job_id, image_id


def test_another_client_gets_404_on_everything(client_a, client_b, store):
    subject_id = subject_with_photo(client_a)
    add_adapter(subject_id)
    train_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    job_id, image_id = _seed_results(subject_id, client_a.id, store)

    attempts = [
        ("get", f"/v1/subjects/{subject_id}", {}),
        ("delete", f"/v1/subjects/{subject_id}", {}),
        ("get", f"/v1/subjects/{subject_id}/photos", {}),
        ("post", f"/v1/subjects/{subject_id}/photos", {"files": [("files", ("a.jpg", b"x", "image/jpeg"))]}),
        ("post", f"/v1/subjects/{subject_id}/train", {}),
        ("post", f"/v1/subjects/{subject_id}/generations", {"json": {"style": "cinematic", "n": 2, "k": 1}}),
        ("get", f"/v1/subjects/{subject_id}/images", {}),
        ("get", f"/v1/jobs/{train_id}", {}),
        ("get", f"/v1/jobs/{job_id}", {}),
        ("post", f"/v1/jobs/{train_id}/cancel", {}),
        ("get", f"/v1/images/{image_id}/download", {}),
        ("post", f"/v1/images/{image_id}/url", {}),
    ]
    for method, url, kw in attempts:
        response = getattr(client_b, method)(url, **kw)
        assert response.status_code == 404, (method, url, response.status_code, response.text)
        assert response.json()["code"] == "not_found"
    assert client_b.get("/v1/jobs").json()["count"] == 0
    assert client_b.get("/v1/subjects").json()["count"] == 0
    # and the owner still sees it all, untouched
    assert client_a.get(f"/v1/jobs/{train_id}").json()["state"] == "queued"
    assert client_a.get(f"/v1/subjects/{subject_id}/images").json()["count"] == 1


def test_deleting_a_subject_leaves_no_rows_and_no_blobs(client_a, store, settings, monkeypatch):
    from core.db.models import Adapter, Image, Job, JobState, Photo, Subject
    from tests.app.fixtures import session_scope

    subject_id = subject_with_photo(client_a)
    add_adapter(subject_id)
    _seed_results(subject_id, client_a.id, store)
    running_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    with session_scope() as session:
        session.get(Job, running_id).state = JobState.RUNNING
    monkeypatch.setattr(settings, "webhook_allow_private", True)
    client_a.put("/v1/webhook", json={"url": "http://127.0.0.1:9/hook"})  # nothing is sent from the API itself
    other = subject_with_photo(client_a)  # must survive
    assert len(store.list(f"subjects/{subject_id}/")) == 4

    response = client_a.delete(f"/v1/subjects/{subject_id}")
    assert response.status_code == 204
    assert store.list(f"subjects/{subject_id}/") == []
    with session_scope() as session:
        for model in (Photo, Job, Adapter, Image):
            assert session.scalar(select(func.count()).select_from(model).where(model.subject_id == subject_id)) == 0
        assert session.get(Subject, subject_id) is None
    assert client_a.get(f"/v1/subjects/{subject_id}").status_code == 404
    assert client_a.get(f"/v1/jobs/{running_id}").status_code == 404
    assert client_a.get(f"/v1/subjects/{other}/photos").json()["count"] == 1
    assert len(store.list(f"subjects/{other}/")) == 1
    events = client_a.get("/v1/webhook/deliveries").json()["data"]
    assert [(e["event"], e["payload"]["job_id"], e["payload"]["error"]["code"]) for e in events] == [
        ("job.canceled", running_id, "subject_deleted")]
