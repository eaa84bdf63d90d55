"""Data retention: what is deleted, when, and the purge that does it.

Per client (``clients.retain_*_days``; NULL: the settings' defaults ``LIKENESS_RETAIN_*``; no value:
kept until deleted):

* **uploaded template photos** (another person's photo, uploaded to put the subject into): the same
  ``retain_training_data_days`` after upload, unless a queued or running template job uses it.
* **uploads, crops, masks and training datasets**: ``retain_training_data_days`` after the last
  training of the subject that could have used them finished. A subject's photo is deleted when it
  was uploaded before the cutoff and no training of the subject is queued, running or finished
  after the cutoff (so an upload never trained on goes the same number of days after upload). A
  training's dataset goes that many days after the training finished (with any training checkpoints
  left behind; normally they are deleted when the job ends). The trained adapter stays,
  so the subject can still generate (ranked without identity references once its crops are gone).
* **generated images** (original and upscaled): ``retain_images_days`` after they were made.
* **orphan blobs** (stored by a process killed before it committed their rows, partial ``.tmp-`` files
  included): ``orphan_blob_grace_s`` after they were written (:mod:`core.orphans`).
* **jobs** are kept with their request bodies and results (the dashboard's history; they hold no
  photo or image).

Blobs are deleted before their rows: if the database step fails, the files are already gone and
the next pass removes the rows. :func:`purge_expired` runs on a schedule (Celery beat in
distributed mode, the embedded worker's timer otherwise) and adds what it deleted to
``purge_totals`` (metric ``likeness_retention_deleted_total``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, or_, select, update

from core.config import Settings, get_settings
from core.db.models import (
    Client,
    IdempotencyRecord,
    Image,
    Job,
    Photo,
    PurgeTotal,
    Subject,
    TemplatePhoto,
    utcnow,
)
from core.db.session import scrub_deleted
from core.db.uow import UnitOfWork
from core.orphans import sweep_orphan_blobs
from core.storage import BlobStore, checkpoint_prefix, dataset_prefix, get_blob_store, photo_prefix
from likeness.contract.plan import ACTIVE_STATES, TERMINAL_STATES, JobKind

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_DAYS = 7  # an Idempotency-Key is for retries, not for history

BATCH = 200
DATASET_PURGED = "dataset_purged_at"  # marker in a training job's result: its dataset is gone


@dataclass
class PurgeReport:
    photos: int = 0
    datasets: int = 0
    templates: int = 0
    images: int = 0
    blobs: int = 0
    orphans: int = 0  # blobs no row named (also counted in ``blobs``)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def retention_days(value: int | None, default: int | None) -> int | None:
    return value if value is not None else default


def purge_expired(settings: Settings | None = None, store: BlobStore | None = None,
                  now: datetime | None = None) -> PurgeReport:
    """One pass over every client: delete what its retention says is due; returns what was deleted."""
    settings = settings or get_settings()
    store = store or get_blob_store(settings)
    now = now or utcnow()
    report = PurgeReport()
    with UnitOfWork(settings) as uow:
        clients = uow.session.execute(select(Client.id, Client.retain_training_data_days,
                                             Client.retain_images_days)).all()
    for client_id, data_days, image_days in clients:
        data_days = retention_days(data_days, settings.retain_training_data_days)
        image_days = retention_days(image_days, settings.retain_images_days)
        if data_days is not None:
            _purge_training_data(settings, store, client_id, now - timedelta(days=data_days), now, report)
            _purge_template_photos(settings, store, client_id, now - timedelta(days=data_days), report)
        if image_days is not None:
            _purge_images(settings, store, client_id, now - timedelta(days=image_days), report)
    report.orphans = sweep_orphan_blobs(settings, store, now)
    report.blobs += report.orphans
    _record(settings, report, now)
    if report.photos or report.datasets or report.templates or report.images or report.orphans:
        log.info("retention purge: %s", report.as_dict())
        scrub_deleted(settings.resolved_database_url)  # no deleted row left in the SQLite file or its log
    return report


def _purge_training_data(settings: Settings, store: BlobStore, client_id: str, cutoff: datetime, now: datetime,
                         report: PurgeReport) -> None:
    recent_training = exists().where(
        Job.subject_id == Photo.subject_id, Job.kind == JobKind.TRAIN,
        or_(Job.state.in_(ACTIVE_STATES), Job.finished_at >= cutoff))
    while True:
        with UnitOfWork(settings) as uow:
            photos = uow.session.execute(
                select(Photo.id, Photo.subject_id).join(Subject, Subject.id == Photo.subject_id)
                .where(Subject.client_id == client_id, Photo.created_at < cutoff, ~recent_training)
                .limit(BATCH)).all()
            for photo_id, subject_id in photos:
                report.blobs += store.delete_prefix(photo_prefix(subject_id, photo_id))
            uow.session.execute(delete(Photo).where(Photo.id.in_([p.id for p in photos])))
            report.photos += len(photos)
        if len(photos) < BATCH:
            break
    while True:
        with UnitOfWork(settings) as uow:
            trainings = uow.session.execute(
                select(Job.id, Job.subject_id, Job.result).where(
                    Job.client_id == client_id, Job.kind == JobKind.TRAIN, Job.state.in_(TERMINAL_STATES),
                    Job.finished_at < cutoff).order_by(Job.finished_at)).all()
            pending = [t for t in trainings if not (t.result or {}).get(DATASET_PURGED)][:BATCH]
            for job_id, subject_id, result in pending:
                deleted = store.delete_prefix(dataset_prefix(subject_id, job_id))
                # Its checkpoints went when it ended; any a lost worker left behind go with the dataset.
                report.blobs += store.delete_prefix(checkpoint_prefix(subject_id, job_id))
                report.blobs += deleted
                report.datasets += 1 if deleted else 0
                marked: dict[str, Any] = {**(result or {}), DATASET_PURGED: now.isoformat()}
                uow.session.execute(update(Job).where(Job.id == job_id).values(result=marked))
        if len(pending) < BATCH:
            break


def _purge_template_photos(settings: Settings, store: BlobStore, client_id: str, cutoff: datetime,
                           report: PurgeReport) -> None:
    in_use = exists().where(Job.template_photo_id == TemplatePhoto.id, Job.state.in_(ACTIVE_STATES))
    while True:
        with UnitOfWork(settings) as uow:
            photos = uow.session.execute(
                select(TemplatePhoto.id, TemplatePhoto.key).join(Subject, Subject.id == TemplatePhoto.subject_id)
                .where(Subject.client_id == client_id, TemplatePhoto.created_at < cutoff, ~in_use).limit(BATCH)).all()
            for _, key in photos:
                store.delete(key)
                report.blobs += 1
            uow.session.execute(delete(TemplatePhoto).where(TemplatePhoto.id.in_([p.id for p in photos])))
            report.templates += len(photos)
        if len(photos) < BATCH:
            break


def _purge_images(settings: Settings, store: BlobStore, client_id: str, cutoff: datetime,
                  report: PurgeReport) -> None:
    while True:
        with UnitOfWork(settings) as uow:
            images = uow.session.execute(
                select(Image.id, Image.key, Image.upscaled_key).join(Subject, Subject.id == Image.subject_id)
                .where(Subject.client_id == client_id, Image.created_at < cutoff).limit(BATCH)).all()
            for _, key, upscaled_key in images:
                for blob in (key, upscaled_key):
                    if blob:
                        store.delete(blob)
                        report.blobs += 1
            uow.session.execute(delete(Image).where(Image.id.in_([i.id for i in images])))
            report.images += len(images)
        if len(images) < BATCH:
            break


def _record(settings: Settings, report: PurgeReport, now: datetime) -> None:
    """Add the pass to the running totals (one row per kind; ``runs`` counts passes)."""
    with UnitOfWork(settings) as uow:
        for kind, count in {**report.as_dict(), "runs": 1}.items():
            updated = uow.session.execute(update(PurgeTotal).where(PurgeTotal.kind == kind)
                                          .values(deleted=PurgeTotal.deleted + count, updated_at=now))
            if updated.rowcount == 0:
                uow.session.add(PurgeTotal(kind=kind, deleted=count, updated_at=now))
                uow.session.flush()


def totals(session) -> dict[str, tuple[int, datetime]]:  # noqa: ANN001
    """What the purge deleted since the install, per kind, with the time of the last pass."""
    rows = session.scalars(select(PurgeTotal))
    return {row.kind: (row.deleted, row.updated_at if row.updated_at.tzinfo else row.updated_at.replace(tzinfo=UTC))
            for row in rows}  # SQLite returns naive UTC


def purge_idempotency_records(session, days: int = IDEMPOTENCY_TTL_DAYS) -> int:
    """Drop stored idempotent answers older than ``days``; returns how many."""
    result = session.execute(delete(IdempotencyRecord).where(
        IdempotencyRecord.created_at < utcnow() - timedelta(days=days)))
    return result.rowcount or 0
