"""Template mode over HTTP with a real worker: uvicorn + one Celery worker on both queues, real PostgreSQL,
Redis and local blobs, the tiny preset (noise faces) and the real detectors.

Kept short: the subject's adapter is seeded as a finished training leaves it (blobs + row) instead of
training one here (tests/integration/test_e2e_http.py trains over HTTP). Then: a template photo of two
people is uploaded, its job fails at ``masking`` and the photo is refused at request time afterwards;
a shipped template's job runs masking -> generating -> ranking -> upscaling -> delivering with monotonic
progress; its image keeps every template pixel outside the mask; deleting the subject removes it all.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode
from tests.integration.conftest import WorkerProcess, uvicorn_app
from tests.integration.test_e2e_http import _poll, _show_logs_unless, _stage_order

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ["masking", "generating", "refining", "ranking", "upscaling", "delivering"]
FAST = {"n": 2, "k": 1, "seed": 5, "steps": 4, "strength": 0.5, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def template_env(it_env) -> dict[str, str]:
    """Queues of this module's own: no other test's worker takes these jobs."""
    return {**it_env, "LIKENESS_QUEUE_PREFIX": it_env["LIKENESS_QUEUE_PREFIX"].rstrip(".") + "tpl."}


@pytest.fixture(scope="module")
def service(template_env, pg_url, tmp_path_factory):
    """uvicorn and one worker on both queues (embedded-like topology); yields (base_url, admin key, worker)."""
    admin_key = "lk_it_admin_" + os.urandom(8).hex()
    logs = tmp_path_factory.mktemp("template-logs")
    prefix = template_env["LIKENESS_QUEUE_PREFIX"]
    worker = WorkerProcess("worker.celery_app", template_env, f"{prefix}gpu,{prefix}cpu", logs / "worker.log")
    with uvicorn_app({**template_env, "LIKENESS_BOOTSTRAP_ADMIN_KEY": admin_key}, logs / "api.log") as base:
        try:
            worker.start()
            yield base, admin_key, worker
        finally:
            worker.stop()


def _seed_adapter(pg_url: str, storage_dir: Path, subject_id: str, tiny_preset, tmp_path: Path) -> None:
    """What a finished training leaves: the adapter's blobs and its row."""
    from core.db.models import Adapter
    from core.storage import LocalBlobStore, adapter_prefix, upload_folder
    from tests.app.fixtures import session_scope
    from tests.pipelines.generation.conftest import build_lora_adapter

    folder = build_lora_adapter(tmp_path / "adapter", tiny_preset, "<subj>", seed=21)
    upload_folder(LocalBlobStore(storage_dir), folder, adapter_prefix(subject_id, 1))
    with session_scope(pg_url) as session:
        session.add(Adapter(subject_id=subject_id, version=1, mode="lora", blob_prefix=adapter_prefix(subject_id, 1),
                            manifest={"instance_token": "<subj>"}))


def _stage_rows(pg_url: str, job_id: str) -> list[str]:
    from sqlalchemy import select

    from core.db.models import JobStage
    from tests.app.fixtures import session_scope

    with session_scope(pg_url) as session:
        return list(session.scalars(select(JobStage.stage).where(JobStage.job_id == job_id)
                                    .order_by(JobStage.started_at)))


def test_template_jobs_over_http(service, pg_url, template_env, tiny_preset, tmp_path, astronaut, grace_hopper):
    from pipelines.templates.catalog import open_template
    from tests.pipelines.intake.conftest import side_by_side

    base, admin_key, worker = service
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    key = admin.post("/v1/admin/clients", json={"name": "template-app", "role": "app"}).json()["api_key"]
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    sid = client.post("/v1/subjects", json={"name": "Grace"}).json()["id"]
    storage = Path(template_env["LIKENESS_STORAGE_DIR"])
    _seed_adapter(pg_url, storage, sid, tiny_preset, tmp_path)

    # 1. An uploaded template of two people: stored (it decodes), judged by the worker seconds after the
    #    upload (no job involved), then refused at once by the API. An upload of nothing usable: 422.
    two = encode(side_by_side(astronaut, grace_hopper), quality=90)
    upload = client.post(f"/v1/subjects/{sid}/templates/photos", files=[("files", ("two.jpg", two, "image/jpeg"))])
    assert upload.status_code == 201 and upload.json()["stored"] == 1, upload.text
    photo_id = upload.json()["files"][0]["photo_id"]
    deadline = time.monotonic() + 120
    while (photo := client.get(f"/v1/subjects/{sid}/templates/photos").json()["data"][0])["status"] == "pending":
        assert time.monotonic() < deadline, "the template photo was never judged"
        time.sleep(0.5)
    _show_logs_unless(photo["status"] == "rejected", worker)
    assert photo["reason_code"] == "multiple_people" and "2 people" in photo["message"]
    again = client.post(f"/v1/subjects/{sid}/templates", json={"template_photo_id": photo_id})
    assert again.status_code == 422 and again.json()["code"] == "template_multiple_people"
    nothing = client.post(f"/v1/subjects/{sid}/templates/photos",
                          files=[("files", ("notes.jpg", b"not an image", "image/jpeg"))])
    assert nothing.status_code == 422 and nothing.json()["code"] == "all_files_rejected"

    # 2. A shipped template: the plan's stages in order, progress monotonic, the image delivered.
    started = time.monotonic()
    ok = client.post(f"/v1/subjects/{sid}/templates", json={"template": "id_photo", **FAST})
    assert ok.status_code == 202, ok.text
    job, samples = _poll(client, ok.json()["id"], timeout_s=300)
    _show_logs_unless(job["state"] == "succeeded", worker)
    assert job["state"] == "succeeded", job
    order = _stage_order(samples)
    assert order == [s for s in STAGES if s in order]
    progress = [p for _, p, _ in samples]
    assert progress == sorted(progress) and job["progress"] == 100.0
    assert _stage_rows(pg_url, job["id"]) == STAGES  # every stage ran, in order, and was timed
    print(f"template job over HTTP: {time.monotonic() - started:.1f} s")

    (image,) = client.get(f"/v1/subjects/{sid}/images").json()["data"]
    assert image["style"] == "template:id_photo" and image["rank"] == 1 and image["scores"]
    original = client.get(f"/v1/images/{image['id']}/download", params={"variant": "original"})
    upscaled = client.get(f"/v1/images/{image['id']}/download", params={"variant": "upscaled"})
    result = Image.open(io.BytesIO(original.content)).convert("RGB")
    assert result.size == (272, 340) and Image.open(io.BytesIO(upscaled.content)).size == (544, 680)
    template = np.asarray(open_template("id_photo"))
    x0, y0, x1, y1 = (round(v) for v in job["result"]["template"]["mask_box"])
    outside = np.ones(template.shape[:2], bool)
    outside[max(y0, 0) : y1, max(x0, 0) : x1] = False
    assert np.array_equal(np.asarray(result)[outside], template[outside])  # the template's own pixels
    assert not np.array_equal(np.asarray(result)[~outside], template[~outside])

    # 3. Deleting the subject removes the images, template photos and every blob.
    subject_blobs = storage / "subjects" / sid
    assert (subject_blobs / "templates").is_dir() and (subject_blobs / "images").is_dir()
    assert client.delete(f"/v1/subjects/{sid}").status_code == 204
    assert not any(p.is_file() for p in subject_blobs.rglob("*"))
    assert client.get(f"/v1/images/{image['id']}/download").status_code == 404
