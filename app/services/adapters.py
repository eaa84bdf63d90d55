"""A subject's trained adapters and their downloads (diffusers folder as a zip, the kohya/A1111 zip)."""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Iterator
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.services.clients import Caller
from app.services.subjects import get_subject
from core.db.models import Adapter
from core.storage import CHUNK, BlobNotFound, BlobStore, adapter_export_key, legacy_adapter_export_key

ExportFormat = Literal["diffusers", "kohya"]


def get_adapter(session: Session, caller: Caller, subject_id: str, version: int | None = None) -> Adapter:
    """The subject's adapter ``version`` (default: the newest); 404 when there is none."""
    subject = get_subject(session, caller, subject_id)
    query = select(Adapter).where(Adapter.subject_id == subject.id)
    if version is not None:
        query = query.where(Adapter.version == version)
    adapter = session.scalar(query.order_by(Adapter.version.desc()).limit(1))
    if adapter is None:
        raise NotFound("This subject has no trained adapter" + (f" version {version}." if version else "."),
                       {"subject_id": subject.id, "version": version}, code="adapter_not_found")
    return adapter


def export_key(store: BlobStore, adapter: Adapter, fmt: ExportFormat) -> str:
    """The blob of an export (a zip; the LoRA file alone for adapters trained before the zip existed);
    409 when the adapter's mode has none."""
    if adapter.mode != "lora":
        raise Conflict(f"A {adapter.mode} adapter has no {fmt} export; download format=diffusers.",
                       {"mode": adapter.mode, "format": fmt}, code="export_unavailable")
    key = adapter_export_key(adapter.subject_id, adapter.version, fmt)
    legacy = legacy_adapter_export_key(adapter.subject_id, adapter.version, fmt)
    return legacy if not store.exists(key) and store.exists(legacy) else key


def zip_stream(store: BlobStore, prefix: str) -> Iterator[bytes]:
    """The blobs under ``prefix`` as one zip (built in a spooled temporary file, then streamed)."""
    keys = store.list(prefix)
    if not keys:
        raise NotFound("The adapter's files are gone.", code="blob_not_found")
    spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
    with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in keys:
            with archive.open(key.removeprefix(prefix), "w", force_zip64=True) as member:
                try:
                    for chunk in store.open_stream(key):
                        member.write(chunk)
                except BlobNotFound:
                    raise NotFound("The adapter's files are gone.", code="blob_not_found") from None
    spool.seek(0)

    def chunks() -> Iterator[bytes]:
        with spool:
            while chunk := spool.read(CHUNK):
                yield chunk

    return chunks()
