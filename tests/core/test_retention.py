"""Retention: uploads, crops and datasets go N days after the training that used them, generated images
after M days, jobs (with their request bodies) stay; per-client values override the defaults; the
purge reports what it deleted as a metric."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from core.db.models import Image, Job, JobKind, JobState, Photo, TemplatePhoto, utcnow
from core.retention import purge_expired
from core.storage import (
    LocalBlobStore,
    adapter_export_key,
    adapter_prefix,
    checkpoint_prefix,
    dataset_prefix,
    image_key,
    photo_crop_key,
    photo_original_key,
    template_photo_key,
    upscaled_image_key,
)
from tests.app.fixtures import session_scope
from tests.app.helpers import add_adapter, subject_with_photo

DAY = timedelta(days=1)


def _age_photos(subject_id: str, days: float) -> list[str]:
    with session_scope() as session:
        photos = session.scalars(select(Photo).where(Photo.subject_id == subject_id)).all()
        for photo in photos:
            photo.created_at = utcnow() - days * DAY
        return [p.id for p in photos]


def _training(client_id: str, subject_id: str, state: JobState, finished_days_ago: float | None, store) -> str:  # noqa: ANN001
    """A training job as a worker leaves it: its dataset and the crops of the subject's photos."""
    now = utcnow()
    with session_scope() as session:
        job = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.TRAIN, state=state,
                  request={"kind": "train", "steps": 10}, completed_stages=[], created_at=now - 60 * DAY,
                  finished_at=None if finished_days_ago is None else now - finished_days_ago * DAY)
        session.add(job)
        session.flush()
        job_id = job.id
        for photo in session.scalars(select(Photo).where(Photo.subject_id == subject_id)):
            photo.crop_key = photo_crop_key(subject_id, photo.id)
            store.put(photo.crop_key, b"crop")
    store.put(dataset_prefix(subject_id, job_id) + "dataset.json", b"{}")
    store.put(checkpoint_prefix(subject_id, job_id) + "step-000100/state.pt", b"left by a lost worker")
    return job_id


def _image(client_id: str, subject_id: str, days_ago: float, store) -> str:  # noqa: ANN001
    with session_scope() as session:
        job = Job(client_id=client_id, subject_id=subject_id, kind=JobKind.GENERATE, state=JobState.SUCCEEDED,
                  request={"kind": "generate", "style": "cinematic"}, completed_stages=[])
        session.add(job)
        session.flush()
        image = Image(job_id=job.id, subject_id=subject_id, rank=1, key="", width=8, height=8, seed=1, prompt="p",
                      created_at=utcnow() - days_ago * DAY)
        session.add(image)
        session.flush()
        image.key = image_key(subject_id, image.id)
        image_id = image.id
    store.put(image_key(subject_id, image_id), b"png")
    return image_id


def _count(model, **where) -> int:  # noqa: ANN001, ANN003
    with session_scope() as session:
        return len(session.scalars(select(model).filter_by(**where)).all())


def test_the_purge_deletes_what_is_due_and_keeps_the_rest(client_a, client_b, admin, http, store, settings):
    assert (settings.retain_training_data_days, settings.retain_images_days) == (30, 90)  # the documented defaults
    trained_long_ago = subject_with_photo(client_a)  # training finished 35 days ago: photos, crops, dataset go
    trained_recently = subject_with_photo(client_a)  # photos as old, training finished 5 days ago: kept
    never_trained = subject_with_photo(client_a)  # uploaded 40 days ago, never trained: goes
    training_now = subject_with_photo(client_a)  # uploaded 40 days ago, training queued: kept
    for subject_id in (trained_long_ago, trained_recently, never_trained, training_now):
        _age_photos(subject_id, 40)
    old_job = _training(client_a.id, trained_long_ago, JobState.SUCCEEDED, 35, store)
    recent_job = _training(client_a.id, trained_recently, JobState.SUCCEEDED, 5, store)
    _training(client_a.id, training_now, JobState.QUEUED, None, store)
    old_image = _image(client_a.id, trained_long_ago, 100, store)
    new_image = _image(client_a.id, trained_long_ago, 10, store)
    # Another client keeps its photos longer (its own retention), and an ordinary request sets it.
    kept_by_policy = subject_with_photo(client_b)
    _age_photos(kept_by_policy, 40)
    _training(client_b.id, kept_by_policy, JobState.FAILED, 35, store)
    assert admin.put(f"/v1/admin/clients/{client_b.id}/limits",
                     json={"retain_training_data_days": 365}).json()["retain_training_data_days"] == 365

    report = purge_expired(settings, store)

    assert report.photos >= 2 and report.datasets >= 1 and report.images >= 1
    for gone in (trained_long_ago, never_trained):
        assert _count(Photo, subject_id=gone) == 0
        assert store.list(f"subjects/{gone}/photos/") == []  # originals and crops
    for kept in (trained_recently, training_now, kept_by_policy):
        assert _count(Photo, subject_id=kept) == 1 and len(store.list(f"subjects/{kept}/photos/")) == 2
    assert store.list(dataset_prefix(trained_long_ago, old_job)) == []
    assert store.list(checkpoint_prefix(trained_long_ago, old_job)) == []
    assert store.list(dataset_prefix(trained_recently, recent_job))
    assert _count(Image, id=old_image) == 0 and not store.exists(image_key(trained_long_ago, old_image))
    assert _count(Image, id=new_image) == 1 and store.exists(image_key(trained_long_ago, new_image))
    job = client_a.get(f"/v1/jobs/{old_job}").json()  # the job and its request stay for the dashboard
    assert job["request"] == {"kind": "train", "steps": 10} and job["result"]["dataset_purged_at"]

    again = purge_expired(settings, store)  # nothing is deleted twice
    assert (again.photos, again.datasets, again.images) == (0, 0, 0)

    text = http.get("/metrics").text
    deleted = dict(re.findall(r'likeness_retention_deleted_total\{kind="(\w+)"\} ([0-9.e+]+)', text))
    assert float(deleted["photos"]) >= 2 and float(deleted["images"]) >= 1 and float(deleted["runs"]) >= 2
    assert "likeness_retention_last_purge_timestamp_seconds" in text


def _template_photo(subject_id: str, days_ago: float, store) -> str:  # noqa: ANN001
    with session_scope() as session:
        photo = TemplatePhoto(subject_id=subject_id, key="", format="jpeg", width=8, height=8,
                              created_at=utcnow() - days_ago * DAY)
        session.add(photo)
        session.flush()
        photo.key = template_photo_key(subject_id, photo.id)
        photo_id, key = photo.id, photo.key
    store.put(key, b"jpeg")
    return photo_id


def test_uploaded_template_photos_go_with_the_training_data_unless_a_job_uses_them(client_a, store, settings):
    """A template photo shows another person: it is kept no longer than the subject's own uploads."""
    subject_id = subject_with_photo(client_a)
    old, in_use, recent = (_template_photo(subject_id, days, store) for days in (40, 40, 5))
    add_adapter(subject_id)
    queued = client_a.post(f"/v1/subjects/{subject_id}/templates", json={"template_photo_id": in_use})
    assert queued.status_code == 202, queued.text
    with session_scope() as session:
        assert session.get(Job, queued.json()["id"]).template_photo_id == in_use

    report = purge_expired(settings, store)

    assert report.templates == 1
    assert _count(TemplatePhoto, id=old) == 0 and not store.exists(template_photo_key(subject_id, old))
    for kept in (in_use, recent):
        assert _count(TemplatePhoto, id=kept) == 1 and store.exists(template_photo_key(subject_id, kept))


def test_retention_can_be_switched_off_per_install(client_a, store, settings, monkeypatch):
    subject_id = subject_with_photo(client_a)
    _age_photos(subject_id, 4000)
    monkeypatch.setattr(settings, "retain_training_data_days", None)
    monkeypatch.setattr(settings, "retain_images_days", None)
    purge_expired(settings, store)
    assert _count(Photo, subject_id=subject_id) == 1


def test_an_empty_or_none_setting_means_keep_forever(tmp_path):
    from core.config import Settings

    settings = Settings(retain_training_data_days="none", retain_images_days="", data_dir=tmp_path)
    assert (settings.retain_training_data_days, settings.retain_images_days) == (None, None)


@pytest.fixture(params=["local", "s3"])
def own_store(request, tmp_path):  # noqa: ANN001, ANN201
    """A blob store of the test's own (so that the sweep sees only what the test planted)."""
    from core.storage import LocalBlobStore, S3BlobStore

    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    from moto import mock_aws

    with mock_aws():
        s3 = S3BlobStore("likeness-orphans", region="us-east-1", access_key_id="x", secret_access_key="y")
        s3.ensure_bucket()
        yield s3


def test_blobs_no_row_names_are_swept_after_the_grace_period(client_a, own_store, settings, http):
    """What a process killed between storing files and committing leaves (whole files and, locally, a
    half-written ``.tmp-`` file) goes with the next purge once older than the grace period; every blob a
    row names stays, and so does anything outside the key layout or still young."""
    subject_id = subject_with_photo(client_a)
    add_adapter(subject_id, 1)
    image_id = _image(client_a.id, subject_id, 1, own_store)
    with session_scope() as session:
        photo = session.scalars(select(Photo).where(Photo.subject_id == subject_id)).one()
        photo_key = photo.original_key
    named = [photo_key, image_key(subject_id, image_id), adapter_prefix(subject_id, 1) + "lora.safetensors",
             adapter_export_key(subject_id, 1, "kohya"), "elsewhere/kept.bin"]
    orphans = [photo_original_key(subject_id, "killedupload1"), photo_crop_key(subject_id, "killedupload1"),
               image_key(subject_id, "neverrecorded"), upscaled_image_key(subject_id, "neverrecorded"),
               adapter_export_key(subject_id, 9, "kohya"), template_photo_key(subject_id, "neverrecorded"),
               photo_original_key("deletedsubject", "p1")]
    for key in named + orphans:
        own_store.put(key, b"bytes")
    if isinstance(own_store, LocalBlobStore):  # a write the kill cut short
        partial = own_store.root / "subjects" / subject_id / "photos" / "killedupload2" / ".tmp-k9x2"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"half a jpe")
    stored = own_store.list_with_times("subjects/")

    young = purge_expired(settings, own_store)
    assert young.orphans == 0 and own_store.list_with_times("subjects/") == stored  # inside the grace period

    later = utcnow() + timedelta(seconds=settings.orphan_blob_grace_s + 60)
    report = purge_expired(settings, own_store, now=later)
    expected_orphans = len(orphans) + isinstance(own_store, LocalBlobStore)
    assert report.orphans == expected_orphans and report.blobs >= expected_orphans
    assert own_store.list("") == sorted(named)
    if isinstance(own_store, LocalBlobStore):
        assert not partial.exists()
    assert purge_expired(settings, own_store, now=later).orphans == 0
    if isinstance(own_store, LocalBlobStore):
        text = http.get("/metrics").text  # the metric counts them
        deleted = dict(re.findall(r'likeness_retention_deleted_total\{kind="(\w+)"\} ([0-9.e+]+)', text))
        assert float(deleted["orphans"]) >= expected_orphans
