"""A subject's trained adapter can be downloaded by its owner: the diffusers folder as a zip, or
the kohya/A1111 zip (LoRA, one embedding per token, how to prompt) the training job stored beside it."""

from __future__ import annotations

import io
import zipfile

from tests.app.fixtures import session_scope
from tests.app.helpers import subject_with_photo

#: what a training job stores as the kohya export (pipelines.adapters.kohya_zip)
KOHYA_FILES = {"likeness-1a2b3c4d-v1.safetensors": b"kohya-lora",
               "embeddings/likeness-1a2b3c4d-v1-subj.safetensors": b"clip_l+clip_g",
               "HOW-TO-PROMPT.txt": b"<lora:likeness-1a2b3c4d-v1:1> a portrait photo of likeness-1a2b3c4d-v1-subj girl"}


def kohya_zip_bytes(files: dict[str, bytes] = KOHYA_FILES) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)  # the same bytes each call
    return buffer.getvalue()


def _stored_adapter(subject_id: str, store, mode: str = "lora", version: int = 1) -> dict[str, bytes]:
    """What a finished training leaves: adapter rows and blobs (and the kohya export for LoRA)."""
    from core.db.models import Adapter
    from core.storage import adapter_export_key, adapter_prefix

    files = {"manifest.json": b'{"mode": "%s"}' % mode.encode(), "unet/adapter_model.safetensors": b"unet-lora",
             "tokens/000.safetensors": b"rows"}
    prefix = adapter_prefix(subject_id, version)
    for name, data in files.items():
        store.put(prefix + name, data)
    if mode == "lora":
        store.put(adapter_export_key(subject_id, version, "kohya"), kohya_zip_bytes())
    with session_scope() as session:
        session.add(Adapter(subject_id=subject_id, version=version, mode=mode, blob_prefix=prefix,
                            manifest={"mode": mode, "instance_token": "<subj>"}))
    return files


def test_owner_downloads_the_adapter_as_a_zip_and_as_a_kohya_zip(client_a, store):
    subject_id = subject_with_photo(client_a)
    files = _stored_adapter(subject_id, store)
    response = client_a.get(f"/v1/subjects/{subject_id}/adapter")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert ".zip" in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == files

    kohya = client_a.get(f"/v1/subjects/{subject_id}/adapter", params={"format": "kohya"})
    assert kohya.status_code == 200 and kohya.headers["content-type"] == "application/zip"
    assert "-kohya.zip" in kohya.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(kohya.content)) as archive:  # the LoRA, the token's embedding, how to prompt
        assert {name: archive.read(name) for name in archive.namelist()} == KOHYA_FILES


def test_adapters_trained_before_the_zip_still_download_their_lora_file(client_a, store):
    from core.storage import adapter_export_key, legacy_adapter_export_key

    subject_id = subject_with_photo(client_a)
    _stored_adapter(subject_id, store)
    store.delete(adapter_export_key(subject_id, 1, "kohya"))
    store.put(legacy_adapter_export_key(subject_id, 1, "kohya"), b"old-lora")
    kohya = client_a.get(f"/v1/subjects/{subject_id}/adapter", params={"format": "kohya"})
    assert kohya.status_code == 200 and kohya.content == b"old-lora"
    assert "-kohya.safetensors" in kohya.headers["content-disposition"]


def test_adapter_download_errors_are_clear(client_a, client_b, store):
    untrained = subject_with_photo(client_a)
    response = client_a.get(f"/v1/subjects/{untrained}/adapter")
    assert response.status_code == 404 and response.json()["code"] == "adapter_not_found"

    full = subject_with_photo(client_a)
    _stored_adapter(full, store, mode="full")
    response = client_a.get(f"/v1/subjects/{full}/adapter", params={"format": "kohya"})
    assert response.status_code == 409 and response.json()["code"] == "export_unavailable"
    assert client_a.get(f"/v1/subjects/{full}/adapter", params={"version": 2}).json()["code"] == "adapter_not_found"
    # Another client's subject does not exist for you.
    assert client_b.get(f"/v1/subjects/{full}/adapter").status_code == 404
    assert client_a.get(f"/v1/subjects/{full}/adapter", params={"format": "onnx"}).status_code == 422
