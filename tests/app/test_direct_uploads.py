"""Direct uploads in S3 mode: presigned PUT URLs, then the API checks and registers what arrived.

moto's S3 server (a real HTTP server on a free loopback port, ``ThreadedMotoServer``): the presigned
URLs are real HTTP PUTs made with ``requests``, as a phone would make them; the API runs on the
suite's PostgreSQL.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.app.helpers import create_subject, jpeg, jpeg_with_gps, png_bomb

MAX_FILE_BYTES = 300_000


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on a free 127.0.0.1 port for this module's tests."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(settings, moto_endpoint):
    """An API whose blob store is S3 (a bucket of its own on moto's server), and that store."""
    import uuid

    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.storage import get_blob_store

    s3_settings = settings.model_copy(update=dict(
        storage_backend="s3", s3_bucket=f"likeness-direct-{uuid.uuid4().hex[:12]}", s3_region="us-east-1",
        s3_endpoint_url=moto_endpoint, s3_access_key_id="testing", s3_secret_access_key="testing",
        max_file_bytes=MAX_FILE_BYTES))
    store = get_blob_store(s3_settings)
    store.ensure_bucket()
    with TestClient(create_app(s3_settings), raise_server_exceptions=False) as http:
        yield http, store


def _as(client, http):  # noqa: ANN001, ANN202
    from tests.app.fixtures import ApiClient

    return ApiClient(client.id, client.key, http)


def _begin(api, subject_id: str, files: list[tuple[str, int]]):  # noqa: ANN001, ANN202
    return api.post(f"/v1/subjects/{subject_id}/photos/direct-uploads",
                    json={"files": [{"filename": name, "size_bytes": size} for name, size in files]})


def _complete(api, subject_id: str, uploads: list[tuple[str, str]]):  # noqa: ANN001, ANN202
    return api.post(f"/v1/subjects/{subject_id}/photos/direct-uploads/complete",
                    json={"uploads": [{"upload_id": u, "filename": name} for u, name in uploads]})


def _put(url: str, data: bytes) -> None:
    import requests

    response = requests.put(url, data=data, timeout=10)
    assert response.status_code == 200, response.text


def test_photos_put_to_presigned_urls_are_checked_and_registered_like_uploads(s3, client_a, moto_endpoint):
    http, store = s3
    api = _as(client_a, http)
    subject_id = create_subject(api)
    photo = jpeg_with_gps()
    slots = _begin(api, subject_id, [("selfie.jpg", len(photo))])
    assert slots.status_code == 201, slots.text
    slot = slots.json()["data"][0]
    assert slot["method"] == "PUT" and slot["filename"] == "selfie.jpg" and slot["url"].startswith(moto_endpoint + "/")
    _put(slot["url"], photo)

    done = _complete(api, subject_id, [(slot["upload_id"], "selfie.jpg")])
    assert done.status_code == 201, done.text
    body = done.json()
    assert body["stored"] == 1 and body["files"][0]["filename"] == "selfie.jpg"
    photos = api.get(f"/v1/subjects/{subject_id}/photos").json()["data"]
    assert [p["id"] for p in photos] == [body["files"][0]["photo_id"]] and photos[0]["status"] == "pending"
    stored = [k for k in store.list(f"subjects/{subject_id}/") if "/photos/" in k]
    exif = Image.open(io.BytesIO(store.get(stored[0]))).getexif()
    assert 0x8825 not in exif and 0x010F not in exif  # metadata stripped, as for a multipart upload
    assert store.list(f"subjects/{subject_id}/incoming/") == []  # the incoming blob is gone


def test_bad_files_are_rejected_each_with_its_reason_and_missing_uploads_too(s3, client_a):
    http, store = s3
    api = _as(client_a, http)
    subject_id = create_subject(api)
    good, bomb, text = jpeg(seed=3), png_bomb(), b"these are my notes, not a photo"
    oversized = jpeg(size=900, seed=4)  # declared small, but the client PUT more (S3 checks the length; moto not)
    assert len(oversized) > MAX_FILE_BYTES
    names = ["good.jpg", "bomb.png", "notes.jpg", "big.jpg", "never.jpg"]
    slots = _begin(api, subject_id, [(n, 1000) for n in names]).json()["data"]
    for slot, data in zip(slots, [good, bomb, text, oversized], strict=False):
        _put(slot["url"], data)

    body = _complete(api, subject_id, [(s["upload_id"], s["filename"]) for s in slots]).json()
    outcomes = {f["filename"]: (f["status"], f["reason_code"]) for f in body["files"]}
    assert outcomes == {"good.jpg": ("stored", None), "bomb.png": ("rejected", "decompression_bomb"),
                        "notes.jpg": ("rejected", "not_an_image"), "big.jpg": ("rejected", "too_large_bytes"),
                        "never.jpg": ("rejected", "upload_not_found")}
    assert [f["filename"] for f in body["files"]] == names  # in the order asked
    assert store.list(f"subjects/{subject_id}/incoming/") == []

    only_missing = _complete(api, subject_id, [(slots[4]["upload_id"], "never.jpg")])
    assert only_missing.status_code == 422 and only_missing.json()["code"] == "all_files_rejected"


def test_sizes_ownership_and_ids_are_checked_before_anything_moves(s3, client_a, client_b):
    http, _ = s3
    api, other = _as(client_a, http), _as(client_b, http)
    subject_id = create_subject(api)
    too_big = _begin(api, subject_id, [("huge.jpg", MAX_FILE_BYTES + 1)])
    assert too_big.status_code == 422 and too_big.json()["code"] == "too_large_bytes"
    assert _begin(other, subject_id, [("a.jpg", 10)]).status_code == 404  # another client's subject
    slot = _begin(api, subject_id, [("a.jpg", 10)]).json()["data"][0]
    assert _complete(other, subject_id, [(slot["upload_id"], "a.jpg")]).status_code == 404
    bad_id = _complete(api, subject_id, [("../../other/key", "a.jpg")])
    assert bad_id.status_code == 422 and bad_id.json()["code"] == "validation_error"
    assert _begin(api, subject_id, []).status_code == 422


def test_local_storage_says_to_upload_through_the_api(client_a):
    subject_id = create_subject(client_a)
    response = _begin(client_a, subject_id, [("a.jpg", 10)])
    assert response.status_code == 409 and response.json()["code"] == "direct_upload_unavailable"
