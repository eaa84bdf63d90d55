"""Template mode over the API: shipped templates and thumbnails, template photo uploads with per-file
verdicts, template jobs checked once and queued like generations."""

from __future__ import annotations

import io

from PIL import Image

from tests.app.helpers import add_adapter, create_subject, jpeg, jpeg_with_gps, png_bomb, subject_with_photo
from tests.conftest import encode


def _upload(client, subject_id: str, files: list[tuple[str, bytes]], **kw):  # noqa: ANN001, ANN003, ANN202
    return client.post(f"/v1/subjects/{subject_id}/templates/photos",
                       files=[("files", (name, data, "image/jpeg")) for name, data in files], **kw)


def test_shipped_templates_are_listed_with_thumbnails(client_a, http):
    listed = client_a.get("/v1/templates").json()
    assert listed["count"] >= 6
    by_name = {t["name"]: t for t in listed["data"]}
    astronaut = by_name["astronaut"]
    assert astronaut["caption"] and astronaut["licence"] and (astronaut["width"], astronaut["height"]) == (512, 512)
    thumb = client_a.get(astronaut["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert image.size == (256, 256)
    missing = client_a.get("/v1/templates/no_such_template/thumbnail")
    assert missing.status_code == 404 and missing.json()["code"] == "unknown_template"
    assert http.get(astronaut["thumbnail_url"]).status_code == 401  # an API key, as everywhere


def test_template_photos_get_the_photo_uploads_checks_and_verdicts(client_a, client_b, store, astronaut):
    subject_id = create_subject(client_a)
    big = astronaut.resize((3000, 3000))
    response = _upload(client_a, subject_id, [
        ("good.jpg", encode(big, quality=90)), ("gps.jpg", jpeg_with_gps()), ("notes.jpg", b"not an image"),
        ("bomb.png", png_bomb()), ("tiny.jpg", jpeg(size=100)),
    ])
    assert response.status_code == 201, response.text
    files = {f["filename"]: f for f in response.json()["files"]}
    assert files["good.jpg"]["status"] == files["gps.jpg"]["status"] == "stored"
    assert files["notes.jpg"]["reason_code"] == "not_an_image"
    assert files["bomb.png"]["reason_code"] == "decompression_bomb"
    assert files["tiny.jpg"]["reason_code"] == "too_small"
    listed = client_a.get(f"/v1/subjects/{subject_id}/templates/photos").json()
    assert listed["count"] == 2 and {p["status"] for p in listed["data"]} == {"pending"}
    good = next(p for p in listed["data"] if p["filename"] == "good.jpg")
    assert (good["width"], good["height"]) == (3000, 3000)  # stored as sent (the job works on <= 2048 px)
    from core.db.models import TemplatePhoto
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        keys = {p.id: p.key for p in session.query(TemplatePhoto).filter_by(subject_id=subject_id)}
    gps_id = files["gps.jpg"]["photo_id"]
    with Image.open(io.BytesIO(store.get(keys[gps_id]))) as stored:
        assert not stored.getexif()  # metadata (GPS) stripped

    other = client_b.get(f"/v1/subjects/{subject_id}/templates/photos")
    assert other.status_code == 404  # another client's subject
    gone = client_b.delete(f"/v1/subjects/{subject_id}/templates/photos/{gps_id}")
    assert gone.status_code == 404
    assert client_a.delete(f"/v1/subjects/{subject_id}/templates/photos/{gps_id}").status_code == 204
    assert not store.exists(keys[gps_id])
    assert client_a.get(f"/v1/subjects/{subject_id}/templates/photos").json()["count"] == 1


def test_a_template_upload_whose_every_file_is_rejected_answers_422_as_a_photo_upload_does(client_a):
    subject_id = create_subject(client_a)
    bad = [("notes.jpg", b"not an image"), ("bomb.png", png_bomb())]
    response = _upload(client_a, subject_id, bad)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "all_files_rejected" and body["details"]["stored"] == 0
    assert [(f["filename"], f["reason_code"]) for f in body["details"]["files"]] == [
        ("notes.jpg", "not_an_image"), ("bomb.png", "decompression_bomb")]
    assert all(f["photo_id"] is None for f in body["details"]["files"])  # nothing a request could name
    photos = client_a.post(f"/v1/subjects/{subject_id}/photos",
                           files=[("files", (name, data, "image/jpeg")) for name, data in bad])
    assert photos.status_code == 422 and photos.json() == body  # the same answer for the same files
    assert client_a.get(f"/v1/subjects/{subject_id}/templates/photos").json()["count"] == 0


def test_each_stored_template_photo_is_sent_to_a_cpu_worker_to_be_judged(client_a, settings, astronaut):
    import base64
    import json

    import redis

    subject_id = create_subject(client_a)
    cpu = f"{settings.queue_prefix}{settings.queue('cpu')}"
    broker = redis.Redis.from_url(settings.resolved_broker_url)
    before = broker.llen(cpu)
    response = _upload(client_a, subject_id, [("a.jpg", encode(astronaut)), ("notes.jpg", b"not an image")])
    assert response.status_code == 201
    stored = [f["photo_id"] for f in response.json()["files"] if f["status"] == "stored"]
    sent = [json.loads(m) for m in broker.lrange(cpu, 0, broker.llen(cpu) - before - 1)]
    judged = [json.loads(base64.b64decode(m["body"]))[0] for m in sent
              if m["headers"]["task"] == "likeness.judge_template_photo"]
    assert judged == [stored]  # one task per stored file, none for the refused one
    listed = client_a.get(f"/v1/subjects/{subject_id}/templates/photos").json()["data"]
    assert [p["status"] for p in listed] == ["pending"]  # until a worker has judged it


def test_template_jobs_are_checked_before_anything_is_queued(make_client):
    client = make_client(max_candidates=8)
    subject_id = subject_with_photo(client)
    url = f"/v1/subjects/{subject_id}/templates"
    untrained = client.post(url, json={"template": "astronaut"})
    assert untrained.status_code == 409 and untrained.json()["code"] == "subject_not_trained"
    bad_untrained = client.post(url, json={"template": "nope"})
    assert bad_untrained.json()["code"] == "unknown_template"  # a request that can never run is refused first

    add_adapter(subject_id)
    cases = [
        ({}, 422, "template_or_photo_required"),
        ({"template": "no_such_template"}, 422, "unknown_template"),
        ({"template": "astronaut", "n": 9, "k": 2}, 422, "too_many_candidates"),
        ({"template": "astronaut", "n": 2, "k": 3}, 422, "k_greater_than_n"),
        ({"template": "astronaut", "strength": 2}, 422, "invalid_strength"),
        ({"template": "astronaut", "style": "anime"}, 422, "validation_error"),
        ({"template_photo_id": "0" * 32}, 404, "template_photo_not_found"),
        ({"template": "astronaut", "adapter_version": 7}, 404, "adapter_not_found"),
    ]
    for body, status, code in cases:
        response = client.post(url, json=body)
        assert response.status_code == status and response.json()["code"] == code, (body, response.text)
    assert client.get("/v1/jobs", params={"subject_id": subject_id, "kind": "template"}).json()["count"] == 0

    ok = client.post(url, json={"template": "astronaut", "n": 4, "k": 2, "seed": 3},
                     headers={"Idempotency-Key": "tpl-1"})
    assert ok.status_code == 202, ok.text
    job = ok.json()
    assert job["kind"] == "template" and job["state"] == "queued"
    request = job["request"]
    assert request["source"] == {"kind": "shipped", "name": "astronaut", "version": 1, "photo_id": None}
    assert request["adapter_version"] == 1 and request["templating"]["strength"] == 0.45
    assert request["templating"]["prompt"].startswith("{instance} {class}, astronaut")
    replay = client.post(url, json={"template": "astronaut", "n": 4, "k": 2, "seed": 3},
                         headers={"Idempotency-Key": "tpl-1"})
    assert replay.json()["id"] == job["id"] and replay.headers.get("Idempotent-Replayed") == "true"
    canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.json()["state"] == "canceled"


def test_a_refused_template_photo_is_refused_at_request_time(client_a, client_b, astronaut):
    from core.db.models import PhotoStatus, TemplatePhoto
    from tests.app.fixtures import session_scope

    subject_id = subject_with_photo(client_a)
    add_adapter(subject_id)
    photo_id = _upload(client_a, subject_id, [("two.jpg", encode(astronaut))]).json()["files"][0]["photo_id"]
    pending = client_a.post(f"/v1/subjects/{subject_id}/templates", json={"template_photo_id": photo_id})
    assert pending.status_code == 202 and pending.json()["request"]["source"]["photo_id"] == photo_id
    with session_scope() as session:  # what the judge task sent with the upload writes for two people
        row = session.get(TemplatePhoto, photo_id)
        row.status, row.reason_code = PhotoStatus.rejected, "multiple_people"
        row.message = "2 people are in the template; choose a photo of one person alone."
    refused = client_a.post(f"/v1/subjects/{subject_id}/templates", json={"template_photo_id": photo_id})
    assert refused.status_code == 422 and refused.json()["code"] == "template_multiple_people"
    assert refused.json()["details"] == {"template_photo_id": photo_id, "reason": "multiple_people"}
    other = create_subject(client_b)
    add_adapter(other)
    stolen = client_b.post(f"/v1/subjects/{other}/templates", json={"template_photo_id": photo_id})
    assert stolen.status_code == 404 and stolen.json()["code"] == "template_photo_not_found"


def test_deleting_the_subject_deletes_its_template_photos(client_a, store, astronaut):
    subject_id = create_subject(client_a)
    photo_id = _upload(client_a, subject_id, [("t.jpg", encode(astronaut))]).json()["files"][0]["photo_id"]
    from core.storage import template_photo_key

    key = template_photo_key(subject_id, photo_id)
    assert store.exists(key)
    assert client_a.delete(f"/v1/subjects/{subject_id}").status_code == 204
    assert not store.exists(key)
