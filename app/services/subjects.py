"""Subjects: the people a client trains models of."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.services.clients import Caller
from core.db.models import Adapter, Job, Subject, utcnow
from core.db.session import scrub_deleted
from core.db.uow import UnitOfWork
from core.storage import BlobStore, purge_subject_blobs
from core.webhooks import notify_job
from likeness.contract.plan import ACTIVE_STATES, JobState, transition


def create_subject(session: Session, caller: Caller, name: str, class_token_override: str | None = None,
                   external_ref: str | None = None) -> Subject:
    subject = Subject(client_id=caller.id, name=name, class_token_override=class_token_override,
                      external_ref=external_ref)
    session.add(subject)
    session.flush()
    return subject


def get_subject(session: Session, caller: Caller | None, subject_id: str, *, for_update: bool = False) -> Subject:
    """``caller``'s subject (``None``: any client's, for admins); 404 for another client's."""
    query = select(Subject).where(Subject.id == subject_id)
    if caller is not None:
        query = query.where(Subject.client_id == caller.id)
    if for_update:
        query = query.with_for_update()  # serialises job creation per subject (no-op on SQLite)
    subject = session.scalar(query)
    if subject is None:
        raise NotFound("Subject not found.", {"subject_id": subject_id})
    return subject


def list_subjects(session: Session, caller: Caller | None, *, external_ref: str | None = None,
                  client_id: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Subject], int]:
    """The caller's subjects, newest first, optionally of one end user (``external_ref``)."""
    conditions = []
    if caller is not None:
        conditions.append(Subject.client_id == caller.id)
    if client_id is not None:
        conditions.append(Subject.client_id == client_id)
    if external_ref is not None:
        conditions.append(Subject.external_ref == external_ref)
    count = session.scalar(select(func.count()).select_from(Subject).where(*conditions)) or 0
    rows = session.scalars(
        select(Subject).where(*conditions).order_by(Subject.created_at.desc(), Subject.id).limit(limit).offset(offset)
    ).all()
    return list(rows), count


@dataclass(frozen=True)
class TrainedModel:
    """What a subject's newest adapter was trained on (its generations and templates use the same)."""

    family: str  # the model family: sd15 | sdxl
    preset: str | None  # the model preset; None for adapters trained before presets were recorded
    adapter_version: int


def trained_models(session: Session, subject_ids: list[str]) -> dict[str, TrainedModel]:
    """Each trained subject's newest adapter's family and preset (from the adapter manifest);
    subjects not trained yet are absent."""
    if not subject_ids:
        return {}
    rows = session.execute(select(Adapter.subject_id, Adapter.version, Adapter.manifest)
                           .where(Adapter.subject_id.in_(subject_ids))
                           .order_by(Adapter.subject_id, Adapter.version.desc())).all()
    models: dict[str, TrainedModel] = {}
    for subject_id, version, manifest in rows:
        if subject_id not in models:
            manifest = manifest or {}
            models[subject_id] = TrainedModel(family=str(manifest.get("family") or "sd15"),  # older adapters: sd15
                                              preset=manifest.get("preset"), adapter_version=int(version))
    return models


def delete_subject(uow: UnitOfWork, caller: Caller | None, subject_id: str, store: BlobStore) -> None:
    """Cancel the subject's active jobs, delete its rows (photos, jobs, adapters, images cascade)
    and, once that is committed, every blob under its prefix.

    A worker still finishing a step then finds its job gone and stops; blobs it writes after
    the purge are removed by the worker's end-of-job cleanup.
    """
    session = uow.session
    subject = get_subject(session, caller, subject_id, for_update=True)
    now = utcnow()
    for job in session.scalars(select(Job).where(Job.subject_id == subject.id, Job.state.in_(ACTIVE_STATES))):
        # Running jobs too are final now: their row goes with the subject. The client still hears about it.
        job.cancel_requested = True
        transition(job, JobState.CANCELED, now, code="subject_deleted", message="The subject was deleted.")
        session.flush()
        notify_job(uow, job)
    session.execute(delete(Subject).where(Subject.id == subject.id))
    session.flush()
    subject_key = subject.id
    uow.after_commit(lambda: purge_subject_blobs(store, subject_key))
    uow.after_commit(lambda: scrub_deleted(uow.settings.resolved_database_url))
