"""Photo upload (per-file validation from the header, stored as sent minus its metadata) and listing."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.services.clients import Caller
from app.services.quotas import StorageBudget
from app.services.subjects import get_subject
from core.config import Settings
from core.db.models import Photo, PhotoStatus, Subject, new_id
from core.db.uow import UnitOfWork
from core.storage import BlobStore, photo_original_key
from pipelines.intake.decode import DecodeLimits, PhotoRejected, inspect_photo
from pipelines.intake.metadata import strip_metadata
from pipelines.intake.reasons import ReasonCode

#: (file extension, content type) of each stored format
STORED_AS = {"jpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png"), "webp": ("webp", "image/webp"),
             "heif": ("heic", "image/heic"), "avif": ("avif", "image/avif")}


#: bytes read at a time when hashing an upload
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class UploadedFile:
    """One uploaded file, left where the form parser put it (in memory up to 1 MB, on disk past that) and
    read only while it is processed: a request holds one file's bytes at a time, whatever its size."""

    filename: str
    source: BinaryIO

    def read(self, max_bytes: int) -> bytes:
        """The file's first ``max_bytes + 1`` bytes (more than ``max_bytes``: the file is too large)."""
        size = self.source.seek(0, io.SEEK_END)
        self.source.seek(0)
        return self.source.read(min(size, max_bytes + 1))  # read(n) allocates n bytes first: never the limit

    def fingerprint(self) -> list[str]:
        """``[filename, sha256]``, read in chunks (what an Idempotency-Key's request is recognised by)."""
        digest = hashlib.sha256()
        self.source.seek(0)
        while chunk := self.source.read(CHUNK):
            digest.update(chunk)
        return [self.filename, digest.hexdigest()]

    @classmethod
    def of(cls, data: bytes, filename: str = "") -> UploadedFile:
        return cls(filename, io.BytesIO(data))


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
    width: int  # upright
    height: int
    data: bytes  # the file as sent, without its metadata (pixels untouched)


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels)


def clean_photo(upload: UploadedFile, limits: DecodeLimits) -> CleanPhoto | PhotoRejected:
    """Check one file from its header and strip its metadata (or say why it cannot be used).

    No pixel is decoded here: intake decodes (and rotates, converts colour, depth and alpha)
    in the training job. A container that is malformed or cut off is ``corrupt_image`` now;
    damage inside the compressed pixels shows when intake decodes it (same reason code).
    """
    try:
        raw = upload.read(limits.max_bytes)
        if len(raw) > limits.max_bytes:
            raise PhotoRejected(ReasonCode.TOO_LARGE_BYTES, f"The file is larger than {limits.max_bytes} bytes.",
                                {"max_bytes": limits.max_bytes})
        header = inspect_photo(raw, limits)
        data = strip_metadata(raw, header.format, header.orientation)
        return CleanPhoto(header.format, header.width, header.height, data)
    except PhotoRejected as exc:
        return exc


def store_uploads(uow: UnitOfWork, caller: Caller, subject_id: str, files: list[UploadedFile], store: BlobStore,
                  settings: Settings, key_for: Callable[[str, str, str], str],
                  row_for: Callable[[str, str, str, str, CleanPhoto], object],
                  budget: StorageBudget | None = None) -> list[FileOutcome]:
    """Store each usable file as sent minus its metadata; each bad file gets its own reason.

    ``key_for(subject_id, new_id, extension)`` names the blob, ``row_for(new_id, subject_id, key, filename,
    photo)`` builds its row. The blob is written before the row is flushed and removed again if the
    transaction rolls back: a crash in between leaves at most an orphan blob under the subject's prefix
    (removed with the subject), never a row without its blob. Files are read, cleaned and stored one at a
    time; one that would pass the storage quota refuses the whole request (the stored ones are removed).
    """
    session = uow.session
    subject = get_subject(session, caller, subject_id)
    limits = decode_limits(settings)
    budget = budget or StorageBudget.of(session, caller, settings, store)
    outcomes: list[FileOutcome] = []
    for upload in files:
        result = clean_photo(upload, limits)
        name = (upload.filename or "")[:255]
        if isinstance(result, PhotoRejected):
            outcomes.append(FileOutcome(name, "rejected", reason_code=result.reason.value, message=result.message))
            continue
        budget.take(len(result.data))
        photo_id = new_id()
        extension, content_type = STORED_AS[result.format]
        key = key_for(subject.id, photo_id, extension)
        store.put(key, result.data, content_type)
        uow.on_rollback(lambda key=key: store.delete(key))
        session.add(row_for(photo_id, subject.id, key, name, result))
        outcomes.append(FileOutcome(name, "stored", photo_id=photo_id))
    session.flush()
    return outcomes


def upload_row(photo_id: str, subject_id: str, key: str, _name: str, photo: CleanPhoto) -> Photo:
    """The row of a subject's own photo, pending intake."""
    return Photo(id=photo_id, subject_id=subject_id, original_key=key, format=photo.format, width=photo.width,
                 height=photo.height, status=PhotoStatus.pending, size_bytes=len(photo.data))


def upload_photos(uow: UnitOfWork, caller: Caller, subject_id: str, files: list[UploadedFile], store: BlobStore,
                  settings: Settings) -> list[FileOutcome]:
    """A subject's own photos, pending intake."""
    return store_uploads(uow, caller, subject_id, files, store, settings, photo_original_key, upload_row)


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
