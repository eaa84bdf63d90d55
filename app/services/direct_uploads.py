"""Direct uploads (S3 mode): clients PUT photos straight to the blob store, the API checks what arrived.

1. ``begin``: the client names its files and their sizes; each gets an ``upload_id`` and a presigned PUT
   URL for ``subjects/<subject>/incoming/<upload_id>`` (:func:`core.storage.incoming_upload_key`) that
   accepts exactly that many bytes, for ``direct_upload_expires_s``. Sizes over ``max_file_bytes`` and
   totals over the storage quota are refused here, before a byte moves.
2. The client PUTs each file to its URL (10 x 5 MB bodies never pass through the API).
3. ``complete``: each arrived blob goes through the multipart upload's own path
   (:func:`app.services.photos.store_uploads`: sniffed from its content, decompression-bomb and size
   checks, metadata stripped, stored as a pending photo); at most ``max_file_bytes + 1`` bytes of it are
   ever read. The incoming blob is then deleted. An upload that never arrived is rejected with
   ``upload_not_found``; the other files of the request are unaffected.

Incoming blobs live under the subject's prefix: they count towards the storage quota and go with the
subject.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta

from app.errors import Conflict, InvalidRequest
from app.services.clients import Caller
from app.services.photos import FileOutcome, UploadedFile, store_uploads, upload_row
from app.services.quotas import StorageBudget
from app.services.subjects import get_subject
from core.config import Settings
from core.db.models import utcnow
from core.db.uow import UnitOfWork
from core.storage import BlobNotFound, BlobStore, incoming_upload_key, photo_original_key
from pipelines.intake.reasons import ReasonCode

UPLOAD_NOT_FOUND = "upload_not_found"


@dataclass(frozen=True)
class PlannedFile:
    filename: str
    size_bytes: int


@dataclass(frozen=True)
class UploadSlot:
    upload_id: str
    filename: str
    url: str
    expires_at: datetime


def new_upload_id() -> str:
    return secrets.token_hex(16)


def begin(uow: UnitOfWork, caller: Caller, subject_id: str, files: list[PlannedFile], store: BlobStore,
          settings: Settings) -> list[UploadSlot]:
    """A presigned PUT URL per file (409 ``direct_upload_unavailable`` when the store has none: local storage)."""
    subject = get_subject(uow.session, caller, subject_id)
    too_large = [f.filename for f in files if f.size_bytes > settings.max_file_bytes]
    if too_large:
        raise InvalidRequest(f"Files larger than {settings.max_file_bytes} bytes cannot be uploaded.",
                             {"files": too_large, "max_bytes": settings.max_file_bytes},
                             code=ReasonCode.TOO_LARGE_BYTES.value)
    StorageBudget.of(uow.session, caller, settings, store).take(sum(f.size_bytes for f in files))
    expires_at = utcnow() + timedelta(seconds=settings.direct_upload_expires_s)
    slots = []
    for planned in files:
        upload_id = new_upload_id()
        url = store.presigned_put(incoming_upload_key(subject.id, upload_id), planned.size_bytes,
                                  settings.direct_upload_expires_s)
        if url is None:
            raise Conflict("Direct uploads need S3 storage; upload through POST .../photos instead.",
                           code="direct_upload_unavailable")
        slots.append(UploadSlot(upload_id, planned.filename, url, expires_at))
    return slots


def _first_bytes(store: BlobStore, key: str, max_bytes: int) -> tempfile.SpooledTemporaryFile:
    """At most ``max_bytes + 1`` bytes of the blob (one more says it is too large), spooled to disk past 1 MB."""
    spool = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)
    chunks = store.open_stream(key)
    try:
        for chunk in chunks:
            spool.write(chunk[: max_bytes + 1 - spool.tell()])
            if spool.tell() > max_bytes:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    spool.seek(0)
    return spool


def complete(uow: UnitOfWork, caller: Caller, subject_id: str, uploads: list[tuple[str, str]], store: BlobStore,
             settings: Settings) -> list[FileOutcome]:
    """Check and register the arrived uploads (``(upload_id, filename)`` each), in the order given."""
    subject = get_subject(uow.session, caller, subject_id)
    arrived: list[tuple[str, UploadedFile]] = []
    missing: dict[str, FileOutcome] = {}
    incoming_bytes = 0
    for upload_id, filename in uploads:
        key = incoming_upload_key(subject.id, upload_id)
        try:
            incoming_bytes += store.size_of(key)
            arrived.append((key, UploadedFile(filename, _first_bytes(store, key, settings.max_file_bytes))))
        except BlobNotFound:
            missing[upload_id] = FileOutcome(filename[:255], "rejected", reason_code=UPLOAD_NOT_FOUND,
                                             message="Nothing was uploaded to this upload's URL (or it expired).")
    budget = StorageBudget.of(uow.session, caller, settings, store)
    budget.used = max(budget.used - incoming_bytes, 0)  # the incoming blobs are replaced, not added to
    try:
        stored = store_uploads(uow, caller, subject.id, [f for _, f in arrived], store, settings,
                               photo_original_key, upload_row, budget=budget)
    finally:
        for _, upload in arrived:
            upload.source.close()

    def drop_incoming() -> None:  # checked and stored (or rejected): the incoming copies have served
        for key, _ in arrived:
            store.delete(key)

    uow.after_commit(drop_incoming)
    outcomes = iter(stored)
    return [missing[upload_id] if upload_id in missing else next(outcomes) for upload_id, _ in uploads]
