"""Photo upload (per-file validation, metadata-stripped storage) and listing."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Photo, PhotoStatus, Subject, new_id
from app.db.uow import UnitOfWork
from app.errors import NotFound
from app.services.clients import Caller
from app.services.quotas import check_storage
from app.services.subjects import get_subject
from app.storage import BlobStore, photo_original_key
from pipelines.intake.decode import DecodeLimits, PhotoRejected, decode_photo, encode_clean, sniff_format
from pipelines.intake.reasons import ReasonCode


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    data: bytes  # at most max_file_bytes + 1 bytes: a longer file was cut while reading
    truncated: bool = False


@dataclass(frozen=True)
class FileOutcome:
    filename: str
    status: str  # accepted_for_intake (stored, pending intake) | rejected
    photo_id: str | None = None
    reason_code: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class CleanPhoto:
    format: str
    width: int
    height: int
    jpeg: bytes  # re-encoded without metadata


# Decoding and re-encoding release the GIL: one pool per process, as wide as the machine,
# bounds both the CPU and the memory (one decoded frame per thread) that uploads may take.
_DECODE_POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="decode")


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels)


def clean_photo(upload: UploadedFile, limits: DecodeLimits, max_side: int | None = None) -> CleanPhoto | PhotoRejected:
    """Validate one file from its content and make the stored copy (or say why not).

    ``max_side``: store a copy whose long side is at most this (template photos); None: full size.
    """
    try:
        if upload.truncated or len(upload.data) > limits.max_bytes:
            raise PhotoRejected(ReasonCode.TOO_LARGE_BYTES, f"The file is larger than {limits.max_bytes} bytes.",
                                {"max_bytes": limits.max_bytes})
        fmt = sniff_format(upload.data) or "unknown"
        image = decode_photo(upload.data, limits, reduce_to=max_side)
        if max_side is not None and max(image.size) > max_side:
            from PIL import Image

            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return CleanPhoto(fmt, image.width, image.height, encode_clean(image))
    except PhotoRejected as exc:
        return exc


def clean_uploads(files: list[UploadedFile], limits: DecodeLimits,
                  max_side: int | None = None) -> list[CleanPhoto | PhotoRejected]:
    """:func:`clean_photo` for each file, on the shared decode pool."""
    return list(_DECODE_POOL.map(lambda upload: clean_photo(upload, limits, max_side), files))


def upload_photos(uow: UnitOfWork, caller: Caller, subject_id: str, files: list[UploadedFile], store: BlobStore,
                  settings: Settings) -> list[FileOutcome]:
    """Store each decodable file as a clean JPEG; each bad file gets its own reason.

    The blob is written before the row is flushed and removed again if the transaction rolls
    back: a crash in between leaves at most an orphan blob under the subject's prefix
    (removed with the subject), never a row without its blob.
    """
    session = uow.session
    subject = get_subject(session, caller, subject_id)
    limits = decode_limits(settings)
    cleaned = clean_uploads(files, limits)
    check_storage(session, caller, settings, sum(len(r.jpeg) for r in cleaned if isinstance(r, CleanPhoto)))
    outcomes: list[FileOutcome] = []
    for upload, result in zip(files, cleaned):
        name = (upload.filename or "")[:255]
        if isinstance(result, PhotoRejected):
            outcomes.append(FileOutcome(name, "rejected", reason_code=result.reason.value, message=result.message))
            continue
        photo_id = new_id()
        key = photo_original_key(subject.id, photo_id)
        store.put(key, result.jpeg, "image/jpeg")
        uow.on_rollback(lambda key=key: store.delete(key))
        session.add(Photo(id=photo_id, subject_id=subject.id, original_key=key, format=result.format,
                          width=result.width, height=result.height, status=PhotoStatus.pending,
                          size_bytes=len(result.jpeg)))
        outcomes.append(FileOutcome(name, "stored", photo_id=photo_id))
    session.flush()
    return outcomes


def get_photo(session: Session, caller: Caller | None, photo_id: str) -> Photo:
    """``caller``'s photo (``None``: any client's, for admins); 404 for another client's."""
    query = select(Photo).join(Subject, Subject.id == Photo.subject_id).where(Photo.id == photo_id)
    if caller is not None:
        query = query.where(Subject.client_id == caller.id)
    photo = session.scalar(query)
    if photo is None:
        raise NotFound("Photo not found.", {"photo_id": photo_id})
    return photo


def list_photos(session: Session, caller: Caller | None, subject_id: str) -> list[Photo]:
    subject = get_subject(session, caller, subject_id)
    query = select(Photo).where(Photo.subject_id == subject.id).order_by(Photo.created_at, Photo.id)
    return list(session.scalars(query))


def count_photos(session: Session, subject_id: str) -> int:
    from sqlalchemy import func

    return session.scalar(select(func.count()).select_from(Photo).where(Photo.subject_id == subject_id)) or 0
