"""Orphan blobs: files in the blob store that no database row names.

A process killed between storing files and committing its rows (an API during an upload, a worker
between writing images and recording them) leaves blobs behind, some of them half-written local
``.tmp-`` files. No listing shows them and no quota counts them, so :func:`sweep_orphan_blobs`
(part of every retention purge) deletes each blob that

* is older than the grace period ``LIKENESS_ORPHAN_BLOB_GRACE_S`` (a write in progress, whose rows
  are about to be committed, is always younger), and
* lies in the key layout of :mod:`core.storage` (``subjects/{subject_id}/...``) but is named by no row:
  its subject, photo, training job (datasets, checkpoints), template photo, adapter version or
  image is gone or was never committed; any partial ``.tmp-`` write counts as named by none.

Keys outside the known layout are kept: the sweep deletes only what it can prove is nobody's.
The store is listed before the rows are read, so a blob whose row is committed during the sweep
is never taken for an orphan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from core.config import Settings
from core.db.models import Adapter, Image, Job, Photo, Subject, TemplatePhoto
from core.db.uow import UnitOfWork
from core.storage import TEMP_PREFIX, BlobStore

_EXPORT_RE = re.compile(r"^adapter-(\d+)\.")


@dataclass
class _Named:
    """The ids the database names, read once per sweep."""

    subjects: set[str] = field(default_factory=set)
    photos: set[str] = field(default_factory=set)
    jobs: set[str] = field(default_factory=set)
    template_keys: set[str] = field(default_factory=set)
    adapters: set[tuple[str, str]] = field(default_factory=set)  # (subject id, version)
    images: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, settings: Settings) -> _Named:
        with UnitOfWork(settings) as uow:
            s = uow.session
            return cls(subjects=set(s.scalars(select(Subject.id))), photos=set(s.scalars(select(Photo.id))),
                       jobs=set(s.scalars(select(Job.id))), template_keys=set(s.scalars(select(TemplatePhoto.key))),
                       adapters={(sid, str(v)) for sid, v in s.execute(select(Adapter.subject_id, Adapter.version))},
                       images=set(s.scalars(select(Image.id))))

    def names(self, key: str) -> bool:
        """Whether a row names ``key`` (unknown layouts count as named: they are kept)."""
        parts = key.split("/")
        if parts[-1].startswith(TEMP_PREFIX):
            return False
        if len(parts) < 4 or parts[0] != "subjects":
            return True
        subject_id, area, item = parts[1], parts[2], parts[3]
        if subject_id not in self.subjects:
            return False
        match area:
            case "photos":
                return item in self.photos
            case "datasets" | "checkpoints":
                return item in self.jobs
            case "templates":
                return key in self.template_keys
            case "adapters":
                return (subject_id, item) in self.adapters
            case "exports":
                version = _EXPORT_RE.match(item)
                return version is None or (subject_id, version.group(1)) in self.adapters
            case "images":
                return item.split(".", 1)[0] in self.images
        return True


def sweep_orphan_blobs(settings: Settings, store: BlobStore, now: datetime) -> int:
    """Delete the blobs no row names that are older than the grace period; returns how many."""
    cutoff = now - timedelta(seconds=settings.orphan_blob_grace_s)
    old_enough = [key for key, written in store.list_with_times("subjects/") if written < cutoff]
    if not old_enough:
        return 0
    named = _Named.read(settings)
    orphans = [key for key in old_enough if not named.names(key)]
    for key in orphans:
        store.delete(key)
    return len(orphans)
