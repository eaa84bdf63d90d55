"""Per-client quotas checked when work is created: jobs at once, trainings per day, stored bytes.

A client's own value wins; ``NULL`` falls back to the settings' default (``None``: unlimited).
Requests per minute are enforced on every request (``app.api.deps.current_client``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import AppError, TooManyRequests
from app.services.clients import Caller
from core.config import Settings
from core.db.models import Client, Job, Subject, utcnow
from core.storage import BlobStore, subject_prefix
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


def stored_bytes(session: Session, store: BlobStore, client_id: str) -> int:
    """Every byte the client's subjects hold in the blob store: photos with their crops and masks, template
    photos, datasets, checkpoints, adapters and their exports, result images (original and upscaled).

    Every blob of a subject lives under its prefix (:func:`core.storage.subject_prefix`), so nothing a client
    owns escapes the count, whatever kind of file is added later.
    """
    subject_ids = session.scalars(select(Subject.id).where(Subject.client_id == client_id))
    return sum(store.size_of_prefix(subject_prefix(subject_id)) for subject_id in subject_ids)


@dataclass
class StorageBudget:
    """What one request may still store under the client's storage quota (``limit`` None: unlimited)."""

    limit: int | None
    used: int = 0
    incoming: int = 0

    @classmethod
    def of(cls, session: Session, caller: Caller, settings: Settings, store: BlobStore) -> StorageBudget:
        limit = _effective(caller.max_storage_bytes, settings.default_max_storage_bytes)
        return cls(limit, stored_bytes(session, store, caller.id) if limit is not None else 0)

    def take(self, size: int) -> None:
        """Count ``size`` more bytes of this request; 403 ``storage_quota_exceeded`` past the quota."""
        self.incoming += size
        if self.limit is not None and self.used + self.incoming > self.limit:
            raise StorageQuotaExceeded(
                f"Storing these files would exceed the storage quota ({self.used + self.incoming} of {self.limit} "
                "bytes); delete subjects or images first.",
                {"limit_bytes": self.limit, "used_bytes": self.used, "incoming_bytes": self.incoming})
