"""The verdict of an uploaded template photo, decided when it is uploaded.

The API checks what a file's header can tell (format, size, decompression bombs) and stores it
as ``pending``; it has no detectors (its room imports no ML framework). With the upload it sends
:data:`~likeness.contract.plan.Task.JUDGE_TEMPLATE_PHOTO` to the cpu queue, and this task
decides the rest with the detectors of the ``masking`` stage (:func:`worker.phases.place_template`):
one person, a face big enough. The verdict goes on the ``template_photos`` row, which no template
job writes: a request naming a refused photo is refused at once with ``template_<reason>``.
"""

from __future__ import annotations

import logging

from core.config import Settings
from core.db.models import PhotoStatus, TemplatePhoto
from core.db.uow import UnitOfWork
from core.storage import BlobStore
from pipelines.intake.decode import PhotoRejected
from pipelines.intake.reasons import ReasonCode
from worker.models import get_manager, resolve_device
from worker.phases import box, decode_template, place_template

log = logging.getLogger(__name__)


def judge_template_photo(settings: Settings, store: BlobStore, photo_id: str) -> str:
    """Decide a pending template photo's verdict; returns it (``accepted``, ``rejected``) or ``skip``
    (deleted meanwhile, or already judged: a redelivered message)."""
    from pipelines.templates.masking import TemplateRejected  # OpenCV, mediapipe

    with UnitOfWork(settings) as uow:
        row = uow.session.get(TemplatePhoto, photo_id)
        key = row.key if row is not None and row.status == PhotoStatus.pending else None
    if key is None or not store.exists(key):
        return "skip"
    verdict: dict = {"status": PhotoStatus.accepted, "reason_code": ReasonCode.ACCEPTED.value, "message": None}
    try:
        prepared = place_template(get_manager(), resolve_device(settings.device), decode_template(store.get(key)))
        verdict["face_box"] = box(prepared.face.to_dict())
    except PhotoRejected as exc:
        verdict.update(status=PhotoStatus.rejected, reason_code=exc.reason.value, message=exc.message)
    except TemplateRejected as exc:
        verdict.update(status=PhotoStatus.rejected, reason_code=str(exc.details.get("reason") or exc.error_code),
                       message=exc.message, face_box=box(exc.details.get("face_box")))
    with UnitOfWork(settings) as uow:
        row = uow.session.get(TemplatePhoto, photo_id)
        if row is None or row.status != PhotoStatus.pending:
            return "skip"
        for name, value in verdict.items():
            setattr(row, name, value)
    log.info("template photo %s: %s (%s)", photo_id, verdict["status"].value, verdict["reason_code"])
    return verdict["status"].value
