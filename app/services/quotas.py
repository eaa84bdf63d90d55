"""Per-client quotas checked when work is created: jobs at once, trainings per day, stored bytes.

A client's own value wins; ``NULL`` falls back to the settings' default (``None``: unlimited).
Requests per minute are enforced on every request (``app.api.deps.current_client``).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import AppError, TooManyRequests
from app.services.clients import Caller
from core.config import Settings
from core.db.models import Client, Image, Job, Photo, Subject, utcnow
from likeness.contract.plan import ACTIVE_STATES, JobKind

DAY = timedelta(days=1)


class StorageQuotaExceeded(AppError):
    status, code, default_message = 403, "storage_quota_exceeded", "The client's storage quota is used up."


def _effective(value: int | None, default: int | None) -> int | None:
    return value if value is not None else default


def check_job_quotas(session: Session, caller: Caller, settings: Settings, kind: JobKind) -> None:
    """Refuse a new job that would exceed the client's concurrent jobs or trainings per day (429)."""
    concurrent = _effective(caller.max_concurrent_jobs, settings.default_max_concurrent_jobs)
    per_day = _effective(caller.max_trainings_per_day, settings.default_max_trainings_per_day)
    if kind != JobKind.TRAIN:
        per_day = None
    if concurrent is None and per_day is None:
        return
    # One job creation at a time per client, so two concurrent requests cannot both take the last slot.
    session.execute(select(Client.id).where(Client.id == caller.id).with_for_update())
    if concurrent is not None:
        active = session.scalar(select(func.count()).select_from(Job).where(
            Job.client_id == caller.id, Job.state.in_(ACTIVE_STATES))) or 0
        if active >= concurrent:
            raise TooManyRequests(f"At most {concurrent} jobs may be queued or running at once; wait for one to "
                                  "finish or cancel one.", {"limit": concurrent, "active": active},
                                  code="too_many_active_jobs")
    if per_day is not None:
        now = utcnow()
        recent = list(session.scalars(select(Job.created_at).where(
            Job.client_id == caller.id, Job.kind == JobKind.TRAIN, Job.created_at >= now - DAY)
            .order_by(Job.created_at)))
        if len(recent) >= per_day:
            oldest = recent[-per_day]
            if oldest.tzinfo is None:  # SQLite returns naive UTC
                oldest = oldest.replace(tzinfo=now.tzinfo)
            raise TooManyRequests(f"At most {per_day} trainings per 24 hours.", {"limit": per_day},
                                  code="training_quota_exceeded",
                                  retry_after_s=max(1.0, (oldest + DAY - now).total_seconds()))


def stored_bytes(session: Session, client_id: str) -> int:
    """What the client stores: uploaded photos (as stored) and result images (original + upscaled)."""
    subjects = select(Subject.id).where(Subject.client_id == client_id)
    photos = session.scalar(select(func.coalesce(func.sum(Photo.size_bytes), 0))
                            .where(Photo.subject_id.in_(subjects))) or 0
    images = session.scalar(select(func.coalesce(func.sum(Image.size_bytes), 0))
                            .where(Image.subject_id.in_(subjects))) or 0
    return int(photos) + int(images)


def check_storage(session: Session, caller: Caller, settings: Settings, incoming: int) -> None:
    """Refuse storing ``incoming`` more bytes past the client's storage quota (403 ``storage_quota_exceeded``)."""
    limit = _effective(caller.max_storage_bytes, settings.default_max_storage_bytes)
    if limit is None or incoming <= 0:
        return
    used = stored_bytes(session, caller.id)
    if used + incoming > limit:
        raise StorageQuotaExceeded(
            f"Storing these photos would exceed the storage quota ({used + incoming} of {limit} bytes); delete "
            "subjects or images first.", {"limit_bytes": limit, "used_bytes": used, "incoming_bytes": incoming})
