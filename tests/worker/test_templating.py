"""Uploaded template photos in the worker, in-process (SQLite, local blobs, the tiny preset, real detectors):
the judge task sent with an upload decides each photo's verdict with the detectors only; a template job
naming a photo still pending fails at ``masking`` before any diffusion model is borrowed, and never writes
the photo's row. (A template job that succeeds runs over HTTP in tests/integration/test_template_http.py.)"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.conftest import MODEL_CACHE, encode
from tests.worker.conftest import read_job, settings_with


@pytest.fixture
def settings(sqlite_db):
    return settings_with(model_cache_dir=MODEL_CACHE, device="cpu")


def _subject_with_adapter(settings, tiny_preset, tmp_path) -> str:
    """A trained subject, as a finished training leaves it: adapter blobs and row."""
    from core.db.models import Adapter
    from core.storage import adapter_prefix, get_blob_store, upload_folder
    from tests.app.fixtures import client_and_subject, session_scope
    from tests.pipelines.generation.conftest import build_lora_adapter

    folder = build_lora_adapter(tmp_path / "adapter", tiny_preset, "<subj>", seed=11)
    with session_scope() as session:
        client, subject = client_and_subject(session)
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


def _template_photo(settings, subject_id: str, data: bytes) -> str:
    """A template photo as the API stores an upload: the row (pending) and the blob."""
    from core.db.models import TemplatePhoto
    from core.storage import get_blob_store, template_photo_key
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        photo = TemplatePhoto(subject_id=subject_id, key="", format="jpeg", width=1, height=1)
        session.add(photo)
        session.flush()
        photo.key = template_photo_key(subject_id, photo.id)
        photo_id, key = photo.id, photo.key
    get_blob_store(settings).put(key, data)
    return photo_id


def _row(photo_id: str):  # noqa: ANN202
    from core.db.models import TemplatePhoto
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return session.get(TemplatePhoto, photo_id)


def test_the_judge_task_gives_each_uploaded_template_photo_its_verdict(settings, tiny_preset, tmp_path, astronaut,
                                                                      grace_hopper):
    from core.storage import get_blob_store
    from likeness.contract.requests import RequestRejected, TemplatePhotoVerdict, TemplateRequest, resolve_template
    from tests.conftest import noise_image
    from tests.pipelines.intake.conftest import side_by_side
    from worker.models import get_manager, reset_manager
    from worker.template_photos import judge_template_photo

    reset_manager()
    subject_id = _subject_with_adapter(settings, tiny_preset, tmp_path)
    store = get_blob_store(settings)
    one = _template_photo(settings, subject_id, encode(astronaut, quality=90))
    two = _template_photo(settings, subject_id, encode(side_by_side(astronaut, grace_hopper), quality=90))
    nobody = _template_photo(settings, subject_id, encode(noise_image(300), "PNG"))

    assert judge_template_photo(settings, store, one) == "accepted"
    assert judge_template_photo(settings, store, two) == "rejected"
    assert judge_template_photo(settings, store, nobody) == "rejected"
    assert judge_template_photo(settings, store, two) == "skip"  # a redelivered message changes nothing
    assert {m["what"] for m in get_manager().loaded()} & {"base", "unet"} == set()  # detectors only

    accepted = _row(one)
    assert accepted.status.value == "accepted" and accepted.reason_code == "accepted" and len(accepted.face_box) == 4
    refused = _row(two)
    assert refused.status.value == "rejected" and refused.reason_code == "multiple_people"
    assert "2 people" in refused.message
    assert _row(nobody).reason_code == "no_person"
    # what the API does with the verdict: a request naming the refused photo is refused at once
    verdict = TemplatePhotoVerdict(two, refused.status.value, refused.reason_code, refused.message)
    with pytest.raises(RequestRejected) as rejected:
        resolve_template(TemplateRequest(template_photo_id=two), preset="tiny", adapter_version=1, photo=verdict)
    assert rejected.value.code == "template_multiple_people"


def test_a_template_job_on_a_pending_photo_of_two_people_fails_at_masking_and_leaves_the_row_alone(
        settings, queue, tiny_preset, tmp_path, astronaut, grace_hopper):
    from likeness.contract.requests import TemplatePhotoVerdict
    from tests.pipelines.intake.conftest import side_by_side
    from worker import runner
    from worker.models import get_manager, reset_manager

    reset_manager()  # this process's models: only what this job borrows
    subject_id = _subject_with_adapter(settings, tiny_preset, tmp_path)
    photo_id = _template_photo(settings, subject_id, encode(side_by_side(astronaut, grace_hopper), quality=90))
    job_id = _template_job(subject_id, {"template_photo_id": photo_id, **FAST},
                           TemplatePhotoVerdict(photo_id, "pending"))
    assert runner.run_job(job_id, settings=settings) == "failed"
    job = read_job(job_id)
    assert job.error_code == "template_multiple_people" and "2 people" in job.error_message
    assert job.stage == "masking" and _stages(job_id) == ["masking"]
    loaded = {m["what"] for m in get_manager().loaded()}
    assert "person_detector" in loaded and "base" not in loaded  # no diffusion model was loaded for it
    assert _row(photo_id).status.value == "pending"  # the verdict is the judge task's to write, never a job's
