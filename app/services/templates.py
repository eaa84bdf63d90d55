"""Template mode: template photos uploaded to a subject, and template jobs.

An uploaded template photo gets the photos' upload safety (content sniffing, decompression-bomb
guard from the header, metadata stripped without re-encoding, a verdict per file; every file
refused: 422 ``all_files_rejected``); it is decoded (EXIF rotation applied) at most
``TEMPLATE_MAX_SIDE`` pixels on its long side (``worker.phases``). The API has no detectors (its
room imports no ML framework), so with the upload it sends a cpu-queue task that decides whether a
stored photo shows exactly one person with a face (``worker.template_photos``) and records the
verdict on the row; a request naming a refused photo is refused at once with the same code.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.services.clients import Caller
from app.services.jobs import generation_limits, queue_job, resolve_with_adapter
from app.services.photos import CleanPhoto, FileOutcome, UploadedFile, store_uploads
from app.services.subjects import get_subject
from core.config import Settings
from core.db.models import Job, PhotoStatus, TemplatePhoto
from core.db.uow import UnitOfWork
from core.storage import BlobStore, template_photo_key
from likeness.contract.plan import JobKind, Queue, Task
from likeness.contract.requests import TemplatePhotoVerdict, TemplateRequest, resolve_template


def upload_template_photos(uow: UnitOfWork, caller: Caller, subject_id: str, files: list[UploadedFile],
                           store: BlobStore, settings: Settings) -> list[FileOutcome]:
    """Photos to put the subject into, each judged (one person, a face) by a cpu-queue task sent after the commit."""
    def row(photo_id: str, subject_id: str, key: str, name: str, photo: CleanPhoto) -> TemplatePhoto:
        return TemplatePhoto(id=photo_id, subject_id=subject_id, key=key, filename=name or None, format=photo.format,
                             width=photo.width, height=photo.height, status=PhotoStatus.pending)

    outcomes = store_uploads(uow, caller, subject_id, files, store, settings, template_photo_key, row)
    for outcome in outcomes:
        if outcome.photo_id is not None:
            uow.enqueue(Task.JUDGE_TEMPLATE_PHOTO, [outcome.photo_id], Queue.CPU)
    return outcomes


def list_template_photos(session: Session, caller: Caller, subject_id: str) -> list[TemplatePhoto]:
    subject = get_subject(session, caller, subject_id)
    query = select(TemplatePhoto).where(TemplatePhoto.subject_id == subject.id)
    return list(session.scalars(query.order_by(TemplatePhoto.created_at, TemplatePhoto.id)))


def get_template_photo(session: Session, caller: Caller, subject_id: str, template_photo_id: str) -> TemplatePhoto:
    """The subject's template photo; 404 ``template_photo_not_found`` for anyone else's."""
    subject = get_subject(session, caller, subject_id)
    photo = session.get(TemplatePhoto, template_photo_id)
    if photo is None or photo.subject_id != subject.id:
        raise NotFound("Template photo not found.", {"template_photo_id": template_photo_id},
                       code="template_photo_not_found")
    return photo


def delete_template_photo(uow: UnitOfWork, caller: Caller, subject_id: str, template_photo_id: str,
                          store: BlobStore) -> None:
    """Delete the row; the blob goes after the commit (a job already running keeps its decoded copy)."""
    photo = get_template_photo(uow.session, caller, subject_id, template_photo_id)
    key = photo.key
    uow.session.delete(photo)
    uow.after_commit(lambda: store.delete(key))


def create_template_job(uow: UnitOfWork, caller: Caller, subject_id: str, body: TemplateRequest,
                        settings: Settings) -> Job:
    """A queued template job; the subject needs a trained adapter (409 ``subject_not_trained``)."""
    session = uow.session
    subject = get_subject(session, caller, subject_id)
    verdict = None
    if body.template_photo_id is not None and body.template is None:
        photo = get_template_photo(session, caller, subject.id, body.template_photo_id)
        verdict = TemplatePhotoVerdict(photo.id, photo.status.value, photo.reason_code, photo.message)
    resolved = resolve_with_adapter(session, subject.id, body.adapter_version, lambda version, _token, preset: (
        resolve_template(body, preset=preset or settings.preset, adapter_version=version,
                         limits=generation_limits(caller, settings), photo=verdict)))
    return queue_job(uow, caller, subject.id, JobKind.TEMPLATE, resolved.model_dump(mode="json"), settings)
