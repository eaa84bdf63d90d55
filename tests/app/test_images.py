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
