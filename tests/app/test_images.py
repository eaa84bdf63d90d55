from __future__ import annotations

import time
from urllib.parse import parse_qs, urlencode, urlparse

from tests.app.helpers import subject_with_photo
from tests.app.test_tenancy_and_deletion import _seed_results


def test_images_are_listed_with_scores_and_downloaded_streamed(client_a, store):
    subject_id = subject_with_photo(client_a)
    job_id, image_id = _seed_results(subject_id, client_a.id, store)
    listed = client_a.get(f"/v1/subjects/{subject_id}/images").json()
    assert listed["count"] == 1
    image = listed["data"][0]
    assert image["rank"] == 1 and image["scores"] == {"aesthetic": 6.1} and image["has_upscaled"] is True
    assert "key" not in image  # blob keys are internal

    original = client_a.get(f"/v1/images/{image_id}/download")
    assert original.status_code == 200 and original.content == b"\x89PNG original"
    assert original.headers["content-type"] == "image/png"
    upscaled = client_a.get(f"/v1/images/{image_id}/download", params={"variant": "upscaled"})
    assert upscaled.content == b"\x89PNG upscaled"


def test_signed_url_works_without_key_then_expires_and_rejects_tampering(client_a, http, store, settings, monkeypatch):
    subject_id = subject_with_photo(client_a)
    _, image_id = _seed_results(subject_id, client_a.id, store)
    signed = client_a.post(f"/v1/images/{image_id}/url", json={"variant": "upscaled"}).json()
    assert signed["expires_at"] > time.time()
    response = http.get(signed["url"])  # no API key
    assert response.status_code == 200 and response.content == b"\x89PNG upscaled"

    query = {k: v[0] for k, v in parse_qs(urlparse(signed["url"]).query).items()}
    assert set(query) == {"client", "subject", "image", "variant", "exp", "sig"}
    tampered = [{**query, "variant": "original"}, {**query, "exp": str(int(query["exp"]) + 3600)},
                {**query, "sig": "0" * 64}, {**query, "client": "0" * 32}, {**query, "subject": "0" * 32},
                {**query, "image": "0" * 32}, {**query, "sig": "é" * 64}]
    for forged in tampered:
        response = http.get(f"/v1/blobs/signed?{urlencode(forged)}")
        assert response.status_code == 403 and response.json()["code"] == "invalid_signature"

    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + settings.signed_url_ttl_s + 5)
    expired = http.get(signed["url"])
    assert expired.status_code == 403 and expired.json()["code"] == "url_expired"


def _seed_job_images(subject_id: str, client_id: str, ranks: list[int], created_at) -> tuple[str, dict[int, str]]:  # noqa: ANN001
    """A finished generation whose images were stored in the order ``ranks`` (as a worker may store them)."""
    from core.db.models import Image, Job, JobKind, JobState
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        job = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.GENERATE, state=JobState.SUCCEEDED,
                  request={"style": "cinematic"}, completed_stages=[], progress=100.0, created_at=created_at)
        session.add(job)
        session.flush()
        ids = {}
        for rank in ranks:
            image = Image(job_id=job.id, subject_id=subject_id, rank=rank, key=f"k{rank}", width=128, height=128,
                          seed=rank, prompt="p", style="cinematic", scores={"aesthetic": 7.0 - rank})
            session.add(image)
            session.flush()
            ids[rank] = image.id
        return job.id, ids


def test_images_are_listed_best_first_then_newest_job_and_pages_are_stable(client_a):
    from datetime import UTC, datetime, timedelta

    subject_id = subject_with_photo(client_a)
    now = datetime.now(UTC)
    old_job, _ = _seed_job_images(subject_id, client_a.id, [3, 1, 2], now - timedelta(hours=1))
    new_job, new_ids = _seed_job_images(subject_id, client_a.id, [4, 2, 3, 1], now)  # stored out of rank order

    listed = client_a.get(f"/v1/subjects/{subject_id}/images").json()["data"]
    assert [(i["rank"], i["job_id"]) for i in listed] == [
        (1, new_job), (1, old_job), (2, new_job), (2, old_job), (3, new_job), (3, old_job), (4, new_job)]
    assert listed[0]["id"] == new_ids[1]  # the README's "best": data[0] is rank 1 of the newest generation

    one_job = client_a.get(f"/v1/subjects/{subject_id}/images", params={"job_id": new_job}).json()["data"]
    assert [i["rank"] for i in one_job] == [1, 2, 3, 4]

    pages = [client_a.get(f"/v1/subjects/{subject_id}/images", params={"limit": 2, "offset": o}).json()
             for o in range(0, 8, 2)]
    assert [i["id"] for page in pages for i in page["data"]] == [i["id"] for i in listed]
    assert all(page["count"] == 7 for page in pages)
