"""Subjects: the people a client trains models of."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db.models import Job, JobState, Subject, utcnow
from app.errors import NotFound
from app.services.clients import Caller
from app.storage import BlobStore, subject_prefix
from app.webhooks import queue_job_event


def create_subject(session: Session, caller: Caller, name: str, class_token_override: str | None = None) -> Subject:
    subject = Subject(client_id=caller.id, name=name, class_token_override=class_token_override)
    session.add(subject)
    session.flush()
    return subject


def get_subject(session: Session, caller: Caller, subject_id: str, *, for_update: bool = False) -> Subject:
    query = select(Subject).where(Subject.id == subject_id, Subject.client_id == caller.id)
    if for_update:
        query = query.with_for_update()  # serialises job creation per subject (no-op on SQLite)
    subject = session.scalar(query)
    if subject is None:
        raise NotFound("Subject not found.", {"subject_id": subject_id})
    return subject


def list_subjects(session: Session, caller: Caller, *, limit: int = 50, offset: int = 0) -> tuple[list[Subject], int]:
    where = Subject.client_id == caller.id
    count = session.scalar(select(func.count()).select_from(Subject).where(where)) or 0
    rows = session.scalars(
        select(Subject).where(where).order_by(Subject.created_at.desc(), Subject.id).limit(limit).offset(offset)
    ).all()
    return list(rows), count


def delete_subject(session: Session, caller: Caller, subject_id: str) -> list[str]:
    """Cancel the subject's active jobs and delete its rows (photos, jobs, adapters, images cascade).

    Returns webhook delivery ids to send after commit. After the commit, call
    :func:`purge_subject_blobs`: a worker still finishing a step then finds its job gone.
    """
    subject = get_subject(session, caller, subject_id, for_update=True)
    active = session.scalars(
        select(Job).where(Job.subject_id == subject.id, Job.state.in_([JobState.queued, JobState.running]))
    ).all()
    deliveries = []
    for job in active:
        # Running jobs too are final now: their row goes with the subject, and the worker
        # stops when it finds its job gone. The client still hears about it.
        job.state, job.cancel_requested, job.finished_at = JobState.canceled, True, utcnow()
        job.error_code, job.error_message = "subject_deleted", "The subject was deleted."
        session.flush()
        deliveries.append(queue_job_event(session, job))
    session.flush()
    session.execute(delete(Subject).where(Subject.id == subject.id))
    session.flush()
    return [d for d in deliveries if d]


def purge_subject_blobs(store: BlobStore, subject_id: str) -> int:
    """Delete every blob the subject owns (one prefix); returns how many."""
    return store.delete_prefix(subject_prefix(subject_id))
