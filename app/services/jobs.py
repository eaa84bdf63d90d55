"""Jobs: creation (training, generation), status, cancel, listing.

Routes enqueue with ``worker.celery_app.enqueue_job`` only after the transaction that
created the job has committed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Adapter, Job, JobKind, JobState, utcnow
from app.errors import Conflict, InvalidRequest, NotFound
from app.services.clients import Caller
from app.services.photos import count_photos
from app.services.subjects import get_subject
from app.webhooks import queue_job_event
from pipelines.errors import InvalidConfig
from pipelines.generation.request import GenerationLimits, GenerationRequest, check_request


def _existing_for_key(session: Session, caller: Caller, idempotency_key: str | None) -> Job | None:
    if idempotency_key is None:
        return None
    return session.scalar(select(Job).where(Job.client_id == caller.id, Job.idempotency_key == idempotency_key))


def create_train_job(session: Session, caller: Caller, subject_id: str, params: dict[str, Any], settings: Settings,
                     idempotency_key: str | None = None) -> Job:
    """A queued training job. Needs at least one uploaded photo (intake in the job decides
    which are usable) and no other active training of the subject."""
    subject = get_subject(session, caller, subject_id, for_update=True)
    if (existing := _existing_for_key(session, caller, idempotency_key)) is not None:
        return existing
    if count_photos(session, subject.id) == 0:
        raise Conflict("Upload at least one photo before training.", {"subject_id": subject.id}, code="no_photos")
    active = session.scalar(select(Job.id).where(
        Job.subject_id == subject.id, Job.kind == JobKind.train, Job.state.in_([JobState.queued, JobState.running])))
    if active is not None:
        raise Conflict("This subject is already being trained.", {"job_id": active}, code="training_in_progress")
    request = {k: v for k, v in params.items() if v is not None}
    if "class_token" not in request and subject.class_token_override:
        request["class_token"] = subject.class_token_override
    return _queue_job(session, caller, subject.id, JobKind.train, request, settings, idempotency_key)


def latest_adapter(session: Session, subject_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.subject_id == subject_id).order_by(Adapter.version.desc()).limit(1))


def check_generation(request: GenerationRequest, caller: Caller, settings: Settings) -> None:
    """Refuse a request that can never succeed with the pipeline's precise code (422)."""
    limits = GenerationLimits(max_candidates=min(caller.max_candidates, settings.max_candidates_per_request))
    try:
        check_request(request, limits)
    except InvalidConfig as exc:
        raise InvalidRequest(exc.message, exc.details, code=exc.error_code) from None


def create_generation_job(session: Session, caller: Caller, subject_id: str, request: GenerationRequest,
                          settings: Settings, idempotency_key: str | None = None) -> Job:
    """A queued generation job; the subject needs a trained adapter (409 ``subject_not_trained``)."""
    subject = get_subject(session, caller, subject_id)
    check_generation(request, caller, settings)
    if (existing := _existing_for_key(session, caller, idempotency_key)) is not None:
        return existing
    adapter = latest_adapter(session, subject.id)
    if adapter is None:
        raise Conflict("Train this subject before generating portraits.", {"subject_id": subject.id},
                       code="subject_not_trained")
    payload = request.model_dump(mode="json", exclude_none=True)
    payload["adapter_version"] = adapter.version
    return _queue_job(session, caller, subject.id, JobKind.generate, payload, settings, idempotency_key)


def _queue_job(session: Session, caller: Caller, subject_id: str, kind: JobKind, request: dict[str, Any],
               settings: Settings, idempotency_key: str | None) -> Job:
    job = Job(client_id=caller.id, subject_id=subject_id, kind=kind, state=JobState.queued, request=request,
              max_attempts=settings.max_attempts, idempotency_key=idempotency_key, completed_stages=[])
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, caller: Caller, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.client_id == caller.id))
    if job is None:
        raise NotFound("Job not found.", {"job_id": job_id})
    return job


# Built once: constructing a statement costs more CPU than running this one.
_JOB_FIELDS = select(Job.__table__).where(Job.id == bindparam("job_id"), Job.client_id == bindparam("client_id"))


def get_job_fields(conn: Session | Connection, caller: Caller, job_id: str) -> dict[str, Any]:
    """The job's columns as a dict: the status-poll path (one indexed SELECT; given a Core
    connection it skips the ORM entirely, a third of the CPU per poll)."""
    row = conn.execute(_JOB_FIELDS, {"job_id": job_id, "client_id": caller.id}).mappings().first()
    if row is None:
        raise NotFound("Job not found.", {"job_id": job_id})
    return dict(row)


def list_jobs(session: Session, caller: Caller | None, *, state: JobState | None = None, subject_id: str | None = None,
              kind: JobKind | None = None, client_id: str | None = None, limit: int = 50,
              offset: int = 0) -> tuple[list[Job], int]:
    """The caller's jobs, newest first (``caller=None``: every client's, for admins)."""
    conditions = []
    if caller is not None:
        conditions.append(Job.client_id == caller.id)
    if client_id is not None:
        conditions.append(Job.client_id == client_id)
    if state is not None:
        conditions.append(Job.state == state)
    if subject_id is not None:
        conditions.append(Job.subject_id == subject_id)
    if kind is not None:
        conditions.append(Job.kind == kind)
    count = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    rows = session.scalars(select(Job).where(*conditions).order_by(Job.created_at.desc(), Job.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), count


def mark_canceled(session: Session, job: Job, reason: str = "canceled by client") -> str | None:
    """Move a job to ``canceled`` now (queued) or ask its worker to stop (running).

    Returns the webhook delivery id to send after commit, if any.
    """
    if job.state == JobState.queued:
        job.state = JobState.canceled
        job.cancel_requested = True
        job.error_code = "canceled"
        job.error_message = reason
        job.finished_at = utcnow()
        session.flush()
        return queue_job_event(session, job)
    if job.state == JobState.running:
        job.cancel_requested = True  # the worker checks it at every step boundary
        session.flush()
    return None


def cancel_job(session: Session, caller: Caller, job_id: str) -> tuple[Job, str | None]:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.client_id == caller.id).with_for_update())
    if job is None:
        raise NotFound("Job not found.", {"job_id": job_id})
    if job.state in (JobState.succeeded, JobState.failed):
        raise Conflict(f"The job already {job.state.value}.", {"job_id": job.id, "state": job.state.value},
                       code="job_already_finished")
    return job, mark_canceled(session, job)
