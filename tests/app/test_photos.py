from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.intake.decode import decode_photo
from tests.app.helpers import create_subject, jpeg, jpeg_with_gps, png_bomb, upload
from tests.conftest import encode, noise_image


def test_one_request_keeps_good_files_and_gives_each_bad_file_its_reason(client_a, settings, store, monkeypatch):
    monkeypatch.setattr(settings, "max_file_bytes", 2_000_000)
    subject_id = create_subject(client_a)
    oversized = jpeg(1800, seed=3)  # noise JPEG of ~2.5 MB
    assert len(oversized) > settings.max_file_bytes
    files = [
        ("good1.jpg", jpeg(320, 1)),
        ("empty.jpg", b""),
        ("notes.jpg", b"these are my notes, not a photo\n" * 20),
        ("huge.jpg", oversized),
        ("bomb.png", png_bomb()),
        ("good2.png", _png(300)),
        ("cut.jpg", jpeg(320, 5)[:4000]),
        ("anim.gif", encode(noise_image(300), "GIF")),
        ("thumb.jpg", jpeg(120, 6)),
    ]
    response = upload(client_a, subject_id, files)
    assert response.status_code == 201, response.text
    body = response.json()
    by_name = {f["filename"]: f for f in body["files"]}
    assert body["stored"] == 2 and body["rejected"] == 7
    assert by_name["good1.jpg"]["status"] == "stored" and by_name["good2.png"]["photo_id"]
    assert by_name["empty.jpg"]["reason_code"] == "empty_file"
    assert by_name["notes.jpg"]["reason_code"] == "not_an_image"
    assert by_name["huge.jpg"]["reason_code"] == "too_large_bytes"
    assert by_name["bomb.png"]["reason_code"] == "decompression_bomb"
    assert by_name["cut.jpg"]["reason_code"] == "corrupt_image"
    assert by_name["anim.gif"]["reason_code"] == "unsupported_format"
    assert by_name["thumb.jpg"]["reason_code"] == "too_small"
    assert all(by_name[n]["photo_id"] is None and by_name[n]["message"] for n in ("empty.jpg", "notes.jpg", "huge.jpg"))

    listed = client_a.get(f"/v1/subjects/{subject_id}/photos").json()
    assert listed["count"] == 2
    assert {p["status"] for p in listed["data"]} == {"pending"}
    assert {p["format"] for p in listed["data"]} == {"jpeg", "png"}
    keys = store.list(f"subjects/{subject_id}/")
    extension = {"jpeg": "jpg", "png": "png"}
    assert sorted(keys) == sorted(f"subjects/{subject_id}/photos/{p['id']}/original.{extension[p['format']]}"
                                  for p in listed["data"])
    # stored as sent: the PNG is the client's own file, byte for byte (it had no metadata to strip)
    png_id = by_name["good2.png"]["photo_id"]
    assert store.get(f"subjects/{subject_id}/photos/{png_id}/original.png") == dict(files)["good2.png"]


def test_stored_original_has_no_metadata_and_the_same_pixels_and_keys_ignore_filenames(client_a, store):
    subject_id = create_subject(client_a)
    sent = jpeg_with_gps()
    response = upload(client_a, subject_id, [("../../etc/passwd.jpg", sent)])
    photo_id = response.json()["files"][0]["photo_id"]
    key = f"subjects/{subject_id}/photos/{photo_id}/original.jpg"
    blob = store.get(key)
    stored = Image.open(io.BytesIO(blob))
    assert stored.format == "JPEG" and not stored.getexif() and b"PhoneMaker" not in blob
    # not re-encoded: every decoded pixel is the original's, and the size is the original's minus its EXIF
    assert np.array_equal(np.asarray(decode_photo(blob)), np.asarray(decode_photo(sent)))
    assert len(sent) - 200 < len(blob) < len(sent)
    assert all("passwd" not in k for k in store.list(f"subjects/{subject_id}/"))


def test_a_sideways_phone_photo_keeps_its_orientation(client_a, store):
    exif = Image.Exif()
    exif[0x0112] = 6  # the sensor's pixels are sideways; turn them when showing
    exif[0x010F] = "PhoneMaker"
    sent = encode(noise_image(400, 3).resize((400, 300)), "JPEG", quality=90, exif=exif.tobytes())
    subject_id = create_subject(client_a)
    photo_id = upload(client_a, subject_id, [("side.jpg", sent)]).json()["files"][0]["photo_id"]
    listed = client_a.get(f"/v1/subjects/{subject_id}/photos").json()["data"][0]
    assert (listed["width"], listed["height"]) == (300, 400)  # upright
    blob = store.get(f"subjects/{subject_id}/photos/{photo_id}/original.jpg")
    assert dict(Image.open(io.BytesIO(blob)).getexif()) == {0x0112: 6} and b"PhoneMaker" not in blob
    assert np.array_equal(np.asarray(decode_photo(blob)), np.asarray(decode_photo(sent)))


def test_file_count_and_request_size_limits(client_a, settings):
    subject_id = create_subject(client_a)
    too_many = [(f"{i}.jpg", b"x") for i in range(settings.max_photos_per_request + 1)]
    response = upload(client_a, subject_id, too_many)
    assert response.status_code == 422 and response.json()["code"] == "invalid_file_count"

    from fastapi.testclient import TestClient

    from app.main import create_app

    small = settings.model_copy(update={"max_request_bytes": 50_000})
    with TestClient(create_app(small), raise_server_exceptions=False) as http:
        response = http.post(f"/v1/subjects/{subject_id}/photos", headers=client_a.headers,
                             files=[("files", ("a.jpg", jpeg(400, 1), "image/jpeg")),
                                    ("files", ("b.jpg", jpeg(400, 2), "image/jpeg"))])
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"
    assert client_a.get(f"/v1/subjects/{subject_id}/photos").json()["count"] == 0


def _png(size: int) -> bytes:
    return encode(noise_image(size, 11), "PNG")


def test_body_without_content_length_is_cut_at_the_limit(client_a, settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    subject_id = create_subject(client_a)
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg(400, 1) + f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # a generator body is sent chunked, without Content-Length
        for i in range(0, len(part), 8192):
            yield part[i:i + 8192]

    small = settings.model_copy(update={"max_request_bytes": 20_000})
    with TestClient(create_app(small), raise_server_exceptions=False) as http:
        response = http.post(f"/v1/subjects/{subject_id}/photos", content=chunks(),
                             headers={**client_a.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"


def test_upload_memory_stays_bounded_by_one_file_whatever_the_request_size(app, client_a, tmp_path):
    """Photos of 3 MB sent by another process to a real server: the API holds one file (and its cleaned copy)
    at a time, the form parser having spooled each to disk, so 8 files take no more memory than 2."""
    import subprocess
    import sys
    import tracemalloc

    from tests.app.helpers import create_subject, served
    from tests.conftest import noise_image

    paths = []
    for seed in range(8):
        path = tmp_path / f"big{seed}.png"
        noise_image(1024, seed=seed).save(path, "PNG", compress_level=0)
        paths.append(path)
    file_bytes = max(p.stat().st_size for p in paths)
    assert file_bytes > 3_000_000
    sender = ("import httpx, sys; files = [('files', (p.rsplit('/', 1)[-1], open(p, 'rb'), 'image/png')) "
              "for p in sys.argv[3:]]; r = httpx.post(sys.argv[1], files=files, "
              "headers={'Authorization': sys.argv[2]}, timeout=120); print(r.status_code, r.json()['stored'])")

    def peak_of_upload(base: str, files: list) -> int:
        subject_id = create_subject(client_a)
        tracemalloc.start()
        try:
            done = subprocess.run([sys.executable, "-c", sender, f"{base}/v1/subjects/{subject_id}/photos",
                                   f"Bearer {client_a.key}", *map(str, files)], capture_output=True, text=True,
                                  timeout=180)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert done.stdout.split() == ["201", str(len(files))], done.stderr
        return peak

    with served(app) as base:
        two, eight = peak_of_upload(base, paths[:2]), peak_of_upload(base, paths)
    megabytes = f"{two / 1e6:.1f} MB for 2 files, {eight / 1e6:.1f} MB for 8 files of {file_bytes / 1e6:.1f} MB"
    assert eight < two + file_bytes, megabytes  # does not grow with the request
    assert eight < 5 * file_bytes, megabytes  # about one file and its cleaned copy
