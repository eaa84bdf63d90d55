"""The template phase in the runner, in-process (SQLite, local blobs, the tiny preset, real detectors): an
uploaded template of two people fails at ``masking``, before any diffusion model is borrowed, and the photo
keeps the verdict. (A template job that succeeds runs over HTTP in tests/integration/test_template_http.py.)"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from tests.conftest import MODEL_CACHE, encode
from tests.worker.conftest import read_job, settings_with


@pytest.fixture
def settings(sqlite_db):
    return settings_with(model_cache_dir=MODEL_CACHE, device="cpu")


def _subject_with_adapter(settings, tiny_preset, tmp_path) -> str:
    """A trained subject, as a finished training leaves it: adapter blobs and row."""
    from core.db.models import Adapter, Client, Subject
    from core.storage import adapter_prefix, get_blob_store, upload_folder
    from tests.app.fixtures import session_scope
    from tests.pipelines.generation.conftest import build_lora_adapter

    folder = build_lora_adapter(tmp_path / "adapter", tiny_preset, "<subj>", seed=11)
    with session_scope() as session:
        client = Client(name="c", api_key_hash=os.urandom(16).hex())
        session.add(client)
        session.flush()
        subject = Subject(client_id=client.id, name="s")
        session.add(subject)
        session.flush()
        session.add(Adapter(subject_id=subject.id, version=1, mode="lora", blob_prefix=adapter_prefix(subject.id, 1),
                            manifest={"instance_token": "<subj>"}))
        subject_id = subject.id
    upload_folder(get_blob_store(settings), folder, adapter_prefix(subject_id, 1))
    return subject_id


def _template_job(subject_id: str, body: dict, photo=None) -> str:  # noqa: ANN001
    from core.db.models import Job, JobKind, JobState, Subject
    from likeness.contract.requests import TemplateRequest, resolve_template
    from tests.app.fixtures import session_scope

    resolved = resolve_template(TemplateRequest(**body), preset="tiny", adapter_version=1, photo=photo)
    with session_scope() as session:
        subject = session.get(Subject, subject_id)
        job = Job(client_id=subject.client_id, subject_id=subject_id, kind=JobKind.TEMPLATE, state=JobState.QUEUED,
                  request=resolved.model_dump(mode="json"), completed_stages=[])
        session.add(job)
        session.flush()
        return job.id


def _stages(job_id: str) -> list[str]:
    from core.db.models import JobStage
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return list(session.scalars(select(JobStage.stage).where(JobStage.job_id == job_id)
                                    .order_by(JobStage.started_at)))


FAST = {"n": 2, "k": 1, "steps": 4, "strength": 0.5, "guidance_scale": 1.0, "upscale": "none", "seed": 4}


def test_an_uploaded_template_of_two_people_fails_at_masking_and_is_marked_refused(settings, queue, tiny_preset,
                                                                                 tmp_path, astronaut, grace_hopper):
    from core.db.models import PhotoStatus, TemplatePhoto
    from core.storage import get_blob_store, template_photo_key
    from likeness.contract.requests import TemplatePhotoVerdict
    from tests.app.fixtures import session_scope
    from tests.pipelines.intake.conftest import side_by_side
    from worker import runner
    from worker.models import get_manager, reset_manager

    reset_manager()  # this process's models: only what this job borrows
    subject_id = _subject_with_adapter(settings, tiny_preset, tmp_path)
    with session_scope() as session:
        photo = TemplatePhoto(subject_id=subject_id, key="", format="jpeg", width=1, height=1)
        session.add(photo)
        session.flush()
        photo.key = template_photo_key(subject_id, photo.id)
        photo_id, key = photo.id, photo.key
    get_blob_store(settings).put(key, encode(side_by_side(astronaut, grace_hopper), quality=90))
    job_id = _template_job(subject_id, {"template_photo_id": photo_id, **FAST},
                           TemplatePhotoVerdict(photo_id, "pending"))
    assert runner.run_job(job_id, settings=settings) == "failed"
    job = read_job(job_id)
    assert job.error_code == "template_multiple_people" and "2 people" in job.error_message
    assert job.stage == "masking" and _stages(job_id) == ["masking"]
    loaded = {m["what"] for m in get_manager().loaded()}
    assert "person_detector" in loaded and "base" not in loaded  # no diffusion model was loaded for it
    with session_scope() as session:
        row = session.get(TemplatePhoto, photo_id)
        assert row.status == PhotoStatus.rejected and row.reason_code == "multiple_people"
