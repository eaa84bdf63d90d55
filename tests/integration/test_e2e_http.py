"""The client's whole path over HTTP, tiny random-weight models, distributed topology:
uvicorn + a CPU worker (intake) + a GPU-queue worker (training, generation), real
PostgreSQL, Redis and local blob storage.

upload -> per-photo report -> train (intake hands over to the GPU queue) -> poll through
named stages -> generate -> poll -> list results -> download original and upscaled ->
delete subject -> no rows, no blobs.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from PIL import Image

from tests.conftest import encode
from tests.integration.conftest import WorkerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN_STAGES = ["intake", "caching", "training:stage1", "training:stage2", "selecting"]
GENERATE_STAGES = ["generating", "refining", "ranking", "upscaling", "delivering"]


def _photos(grace_hopper: Image.Image) -> list[tuple[str, bytes]]:
    from tests.pipelines.intake.conftest import person_variants

    good = [(f"grace_{i}.jpg", encode(v, quality=92)) for i, v in enumerate(person_variants(grace_hopper, 6))]
    return good + [("blank.png", encode(Image.new("RGB", (400, 400), "white"), "PNG")), ("notes.jpg", b"not an image")]


def _poll(client: httpx.Client, job_id: str, timeout_s: float) -> tuple[dict, list[tuple[str, float, float | None]]]:
    samples: list[tuple[str, float, float | None]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["stage"]:
            samples.append((job["stage"], job["progress"], job["eta_s"]))
        if job["state"] in ("succeeded", "failed", "canceled"):
            return job, samples
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']} at {job['stage']} after {timeout_s}s")


def _show_logs_unless(ok: bool, *workers: WorkerProcess) -> None:
    """Print the workers' logs (pytest shows them with the failure): the job's traceback is there."""
    if not ok:
        for worker in workers:
            print(f"==== {worker.log_path.name}\n" + "\n".join(
                line for line in worker.log().splitlines() if "W0000" not in line)[-20000:])


@pytest.fixture
def webhook_receiver():
    """A local HTTP receiver (the lifecycle tests' handler) answering 200 to every POST; yields its URL."""
    from tests.integration.test_job_lifecycle import _Receiver

    class AlwaysOk(_Receiver):
        fail_first = 0
        received: ClassVar[list[tuple[int, dict, bytes]]] = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AlwaysOk)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/likeness-hook", AlwaysOk.received
    finally:
        server.shutdown()


def _dashboard_shows_the_subject(base: str, admin_key: str, sid: str, train_job: dict, images: list[dict]) -> None:
    """/admin renders what the real pipeline left: verdicts, crops, class word, loss curve, gallery."""
    import re

    curve = train_job["result"]["training"]["loss_curve"]
    assert curve and all(len(point) == 2 and point[1] > 0 for point in curve)
    with httpx.Client(base_url=base, timeout=30) as browser:
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/admin/login").text).group(1)
        assert browser.post("/admin/login", data={"api_key": admin_key, "csrf_token": token}).status_code == 303
        page = browser.get(f"/admin/subjects/{sid}").text
        assert f"<b>{train_job['result']['intake']['class_token']}</b>" in page
        assert page.count('class="badge accepted"') >= 5 and 'class="badge rejected"' in page
        assert all(f'data-image="{image["id"]}"' in page for image in images)
        thumb = re.search(r'src="(/admin/media/photos/[0-9a-f]+/crop/thumb)"', page).group(1)
        assert browser.get(thumb).headers["content-type"] == "image/webp"  # a real thumbnail of the crop
        assert browser.get(thumb.removesuffix("/thumb")).headers["content-type"] == "image/png"


def _assert_webhooks(received: list, secret: str, jobs: list[dict]) -> None:
    """Each job's succeeded event arrived as the API shows the job, signed with the secret
    ``PUT /v1/webhook`` returned."""
    from core.webhooks import SIGNATURE_HEADER, verify

    def finals() -> dict:
        events = [json.loads(body) for _, _, body in list(received)]
        return {e["job_id"]: e for e in events if e["state"] == "succeeded" and e["job_id"] in by_id}

    by_id = {job["id"]: job for job in jobs}
    wait_for(lambda: len(finals()) == len(by_id), 30, 0.2, "the jobs' succeeded webhooks")
    for _, headers, body in received:
        assert verify(body, secret, headers[SIGNATURE_HEADER]), headers
        assert not verify(body, secret + "x", headers[SIGNATURE_HEADER])
    for job_id, event in finals().items():
        assert event["type"] == "job.succeeded" and event["progress"] == 100.0
        assert event["stage"] == by_id[job_id]["stage"] and event["stage"], event
        assert event["subject_id"] == by_id[job_id]["subject_id"]


def _stage_order(samples) -> list[str]:
    return list(dict.fromkeys(stage for stage, _, _ in samples))


def test_upload_train_generate_download_delete(api, split_workers, grace_hopper, e2e_env, webhook_receiver):
    base, admin_key = api
    cpu, gpu = split_workers
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    created = admin.post("/v1/admin/clients", json={"name": "mobile-app", "role": "app"})
    assert created.status_code == 201, created.text
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {created.json()['api_key']}"}, timeout=30)
    hook_url, hooks_received = webhook_receiver
    hook = client.put("/v1/webhook", json={"url": hook_url})
    assert hook.status_code == 200 and hook.json()["url"] == hook_url, hook.text
    secret = hook.json()["secret"]

    subject = client.post("/v1/subjects", json={"name": "Grace"}).json()
    sid = subject["id"]
    upload = client.post(f"/v1/subjects/{sid}/photos",
                         files=[("files", (name, data)) for name, data in _photos(grace_hopper)])
    assert upload.status_code == 201, upload.text
    assert upload.json()["stored"] == 7 and upload.json()["rejected"] == 1  # the text file

    train = client.post(f"/v1/subjects/{sid}/train", json={"steps": 10}, headers={"Idempotency-Key": "train-1"})
    assert train.status_code == 202, train.text
    job, samples = _poll(client, train.json()["id"], timeout_s=300)
    _show_logs_unless(job["state"] == "succeeded", cpu, gpu)
    assert job["state"] == "succeeded", job
    train_job = job
    order = _stage_order(samples)
    assert order == [s for s in TRAIN_STAGES if s in order] and "intake" in order
    progress = [p for _, p, _ in samples]
    assert progress == sorted(progress) and job["progress"] == 100.0
    assert any(eta is not None and eta > 0 for _, _, eta in samples)

    photos = {p["id"]: p for p in client.get(f"/v1/subjects/{sid}/photos").json()["data"]}
    accepted = [p for p in photos.values() if p["status"] == "accepted"]
    assert len(accepted) >= 5 and all(p["has_crop"] and len(p["face_box"]) == 4 for p in accepted)
    blank = [p for p in photos.values() if p["status"] == "rejected"]
    assert blank and all(p["reason_code"] for p in blank)

    # No ControlNet and few steps: the tiny models on a 2-core CPU; images are noise.
    gen = client.post(f"/v1/subjects/{sid}/generations",
                      json={"style": "studio_headshot", "n": 3, "k": 2, "seed": 7, "steps": 4, "no_controlnet": True})
    assert gen.status_code == 202, gen.text
    job, samples = _poll(client, gen.json()["id"], timeout_s=300)
    _show_logs_unless(job["state"] == "succeeded", cpu, gpu)
    assert job["state"] == "succeeded", job
    order = _stage_order(samples)
    assert order == [s for s in GENERATE_STAGES if s in order]
    progress = [p for _, p, _ in samples]
    assert progress == sorted(progress)

    images = client.get(f"/v1/subjects/{sid}/images").json()["data"]
    # The tiny preset lifts the one-face delivery rule (its images are noise): k images.
    assert len(images) == job["result"]["images"] == 2
    scored = job["result"]["candidates"]  # every candidate's scores, delivered or not
    assert len(scored) == 3 and sorted(c["rank"] for c in scored) == [0, 1, 2]
    assert sorted(i["rank"] for i in images) == [1, 2]
    for image in images:
        assert image["scores"] and image["style"] == "studio_headshot"
        original = client.get(f"/v1/images/{image['id']}/download", params={"variant": "original"})
        upscaled = client.get(f"/v1/images/{image['id']}/download", params={"variant": "upscaled"})
        assert original.status_code == 200 and upscaled.status_code == 200
        small, big = Image.open(io.BytesIO(original.content)), Image.open(io.BytesIO(upscaled.content))
        assert small.size == (128, 128) and big.size == (256, 256)

    _assert_webhooks(hooks_received, secret, [train_job, job])
    _dashboard_shows_the_subject(base, admin_key, sid, train_job, images)

    subject_blobs = Path(e2e_env["LIKENESS_STORAGE_DIR"]) / "subjects" / sid
    stored = [p.relative_to(subject_blobs).parts[0] for p in subject_blobs.rglob("*") if p.is_file()]
    assert {"photos", "datasets", "adapters"} <= set(stored)  # originals, crops, dataset, adapter (+ images)
    assert client.delete(f"/v1/subjects/{sid}").status_code == 204
    assert client.get(f"/v1/subjects/{sid}").status_code == 404
    assert not any(p.is_file() for p in subject_blobs.rglob("*"))


def test_an_sdxl_subject_trains_and_generates_over_rest(api, split_workers, grace_hopper):
    """The same REST flow on the second model family: the train request names ``tiny-sdxl`` (SDXL's layout),
    the subject says which family it learned, its generations run on that family, and the A1111 download
    carries the token for both text encoders."""
    import zipfile

    from safetensors.numpy import load as load_safetensors

    base, admin_key = api
    cpu, gpu = split_workers
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    key = admin.post("/v1/admin/clients", json={"name": "sdxl-app", "role": "app"}).json()["api_key"]
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    sid = client.post("/v1/subjects", json={"name": "Grace XL"}).json()["id"]
    upload = client.post(f"/v1/subjects/{sid}/photos", files=[("files", p) for p in _photos(grace_hopper)])
    assert upload.status_code == 201, upload.text

    train = client.post(f"/v1/subjects/{sid}/train", json={"preset": "tiny-sdxl", "steps": 10})
    assert train.status_code == 202, train.text
    job, _ = _poll(client, train.json()["id"], timeout_s=420)
    _show_logs_unless(job["state"] == "succeeded", cpu, gpu)
    assert job["state"] == "succeeded" and job["request"]["preset"] == "tiny-sdxl", job
    model = client.get(f"/v1/subjects/{sid}").json()["model"]
    assert model["family"] == "sdxl" and model["preset"] == "tiny-sdxl"

    gen = client.post(f"/v1/subjects/{sid}/generations",
                      json={"style": "studio_headshot", "n": 2, "k": 1, "seed": 3, "steps": 3, "no_controlnet": True})
    assert gen.status_code == 202, gen.text
    job, _ = _poll(client, gen.json()["id"], timeout_s=420)
    _show_logs_unless(job["state"] == "succeeded", cpu, gpu)
    assert job["state"] == "succeeded" and job["request"]["preset"] == "tiny-sdxl", job
    (image,) = client.get(f"/v1/subjects/{sid}/images").json()["data"]
    small = Image.open(io.BytesIO(client.get(f"/v1/images/{image['id']}/download",
                                             params={"variant": "original"}).content))
    big = Image.open(io.BytesIO(client.get(f"/v1/images/{image['id']}/download",
                                           params={"variant": "upscaled"}).content))
    assert small.size[0] == small.size[1] and big.size == (2 * small.size[0], 2 * small.size[1])

    a1111 = client.get(f"/v1/subjects/{sid}/adapter", params={"format": "kohya"})
    assert a1111.status_code == 200, a1111.text
    with zipfile.ZipFile(io.BytesIO(a1111.content)) as archive:
        names = archive.namelist()
        (lora,) = [n for n in names if n.endswith(".safetensors") and "/" not in n]
        keys = load_safetensors(archive.read(lora)).keys()
        assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
        assert any(k.startswith("lora_unet_") for k in keys)
        embeddings = [load_safetensors(archive.read(n)) for n in names if n.startswith("embeddings/")]
        assert embeddings and all(set(e) == {"clip_l", "clip_g"} for e in embeddings)
    assert client.delete(f"/v1/subjects/{sid}").status_code == 204
