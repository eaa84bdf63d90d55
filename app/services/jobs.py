"""Jobs: creation from a checked request, status, cancel, retry, listing.

A request is checked and resolved once, here, through :mod:`likeness.contract.requests`;
the resolved request is what the job stores and what the worker runs. The job's first
task is queued in the same transaction (an outbox row) and sent after the commit.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidRequest, NotFound
from app.services.clients import Caller
from app.services.photos import count_photos
from app.services.quotas import check_job_quotas
from app.services.subjects import get_subject
from core.config import Settings
from core.db.models import Adapter, Job, JobStage, utcnow
from core.db.uow import UnitOfWork
from core.webhooks import notify_job
from likeness.contract.plan import ACTIVE_STATES, UNSUCCESSFUL_STATES, JobKind, JobState, transition
from likeness.contract.requests import (
    GenerateRequest,
    GenerationLimits,
    RequestRejected,
    ResolvedTemplate,
    TrainRequest,
    read_resolved,
    resolve_generate,
    resolve_train,
)

T = TypeVar("T")


def create_train_job(uow: UnitOfWork, caller: Caller, subject_id: str, body: TrainRequest,
                     settings: Settings) -> Job:
    """A queued training job. Needs at least one uploaded photo (intake in the job decides
    which are usable) and no other active training of the subject."""
    session = uow.session
    subject = get_subject(session, caller, subject_id, for_update=True)
    if count_photos(session, subject.id) == 0:
        raise Conflict("Upload at least one photo before training.", {"subject_id": subject.id}, code="no_photos")
    active = session.scalar(select(Job.id).where(
        Job.subject_id == subject.id, Job.kind == JobKind.TRAIN, Job.state.in_(ACTIVE_STATES)))
    if active is not None:
        raise Conflict("This subject is already being trained.", {"job_id": active}, code="training_in_progress")
    resolved = resolve_train(body, preset=settings.preset, class_token_override=subject.class_token_override)
    return queue_job(uow, caller, subject.id, JobKind.TRAIN, resolved.model_dump(mode="json"), settings)


def latest_adapter(session: Session, subject_id: str, version: int | None = None) -> Adapter | None:
    query = select(Adapter).where(Adapter.subject_id == subject_id)
    if version is not None:
        query = query.where(Adapter.version == version)
    return session.scalar(query.order_by(Adapter.version.desc()).limit(1))


def generation_limits(caller: Caller, settings: Settings) -> GenerationLimits:
    return GenerationLimits(max_candidates=min(caller.max_candidates, settings.max_candidates_per_request))


def trained_preset(adapter: Adapter) -> str | None:
    """The model preset the adapter was trained on (its manifest records it; None for adapters from before)."""
    return (adapter.manifest or {}).get("preset")


def resolve_with_adapter(session: Session, subject_id: str, adapter_version: int | None,
                         resolve: Callable[[int, str | None, str | None], T]) -> T:
    """``resolve(adapter version, instance token, trained preset)`` with the subject's adapter (the newest,
    or ``adapter_version``): its generations run on the preset, so the family, it was trained on (None:
    the deployment's). Request errors become 422 with their code. Without such an adapter the request is
    still checked first, then refused: 404 ``adapter_not_found``, 409 ``subject_not_trained``."""
    adapter = latest_adapter(session, subject_id, adapter_version)
    try:
        if adapter is None:  # still refuse a request that could never run, first
            resolve(1, None, None)
            if adapter_version is not None:
                raise NotFound("This subject has no adapter of that version.",
                               {"subject_id": subject_id, "adapter_version": adapter_version},
                               code="adapter_not_found")
            raise Conflict("Train this subject before generating portraits.", {"subject_id": subject_id},
                           code="subject_not_trained")
        return resolve(adapter.version, (adapter.manifest or {}).get("instance_token"), trained_preset(adapter))
    except RequestRejected as exc:
        raise InvalidRequest(exc.message, exc.details, code=exc.code) from None


def create_generation_job(uow: UnitOfWork, caller: Caller, subject_id: str, body: GenerateRequest,
                          settings: Settings) -> Job:
    """A queued generation job; the subject needs a trained adapter (409 ``subject_not_trained``)."""
    subject = get_subject(uow.session, caller, subject_id)
    resolved = resolve_with_adapter(uow.session, subject.id, body.adapter_version, lambda version, token, preset: (
        resolve_generate(body, preset=preset or settings.preset, adapter_version=version,
                         limits=generation_limits(caller, settings), instance_token=token)))
    return queue_job(uow, caller, subject.id, JobKind.GENERATE, resolved.model_dump(mode="json"), settings)


def queue_job(uow: UnitOfWork, owner: Caller | str, subject_id: str, kind: JobKind, resolved: dict[str, Any],
              settings: Settings) -> Job:
    """A new queued job running ``resolved`` (a resolved request of ``kind``), sent after the commit.

    ``owner``: the client asking (its job quotas apply), or a client id (an admin's retry).
    """
    request = read_resolved(kind, resolved)  # a stored request always parses back
    if isinstance(owner, Caller):
        check_job_quotas(uow.session, owner, settings, kind)
    client_id = owner.id if isinstance(owner, Caller) else owner
    template_photo_id = request.source.photo_id if isinstance(request, ResolvedTemplate) else None
    job = Job(client_id=client_id, subject_id=subject_id, kind=kind, state=JobState.QUEUED, request=resolved,
              template_photo_id=template_photo_id, max_attempts=settings.max_attempts, completed_stages=[])
    uow.session.add(job)
    uow.session.flush()
    uow.enqueue_job(job)
    return job


def get_job(session: Session, caller: Caller | None, job_id: str, *, for_update: bool = False) -> Job:
    """``caller``'s job (``None``: any client's, for admins); 404 for another client's."""
    query = select(Job).where(Job.id == job_id)
    if caller is not None:
        query = query.where(Job.client_id == caller.id)
    job = session.scalar(query.with_for_update() if for_update else query)
    if job is None:
        raise NotFound("Job not found.", {"job_id": job_id})
    return job


def list_jobs(session: Session, caller: Caller | None, *, state: JobState | None = None, subject_id: str | None = None,
              kind: JobKind | None = None, client_id: str | None = None, since: datetime | None = None,
              until: datetime | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
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
    if since is not None:
        conditions.append(Job.created_at >= since)
    if until is not None:
        conditions.append(Job.created_at < until)
    count = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    rows = session.scalars(select(Job).where(*conditions).order_by(Job.created_at.desc(), Job.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), count


def list_stage_runs(session: Session, job_id: str) -> list[JobStage]:
    """The job's stage runs in the order they started (a stage rerun after a lost worker appears twice)."""
    return list(session.scalars(select(JobStage).where(JobStage.job_id == job_id)
                                .order_by(JobStage.started_at, JobStage.attempt, JobStage.id)))


def request_cancel(uow: UnitOfWork, job: Job, code: str = "canceled", message: str = "canceled by client") -> None:
    """Cancel a queued job now, and a running one that no worker holds (waiting between phases for the
    next queue's worker, e.g. behind another training); ask a working worker to stop at its next step.

    The row is locked (``get_job(for_update=True)``) like a worker's claim, so the two never cross."""
    if job.state == JobState.QUEUED or (job.state == JobState.RUNNING and job.worker is None):
        job.cancel_requested = True
        transition(job, JobState.CANCELED, utcnow(), code=code, message=message)
        uow.session.flush()
        notify_job(uow, job)
    elif job.state == JobState.RUNNING:
        job.cancel_requested = True
        uow.session.flush()


def cancel_job(uow: UnitOfWork, caller: Caller | None, job_id: str) -> Job:
    job = get_job(uow.session, caller, job_id, for_update=True)
    if job.state in (JobState.SUCCEEDED, JobState.FAILED):
        raise Conflict(f"The job already {job.state.value}.", {"job_id": job.id, "state": job.state.value},
                       code="job_already_finished")
    request_cancel(uow, job)
    return job


def retry_job(uow: UnitOfWork, job_id: str, settings: Settings) -> Job:
    """A new job running the same resolved request as a failed or canceled one (admins)."""
    job = get_job(uow.session, None, job_id)
    if job.state not in UNSUCCESSFUL_STATES:
        raise Conflict("Only a failed or canceled job can be retried.", {"job_id": job.id, "state": job.state.value},
                       code="job_not_retryable")
    return queue_job(uow, job.client_id, job.subject_id, job.kind, dict(job.request), settings)
