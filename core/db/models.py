"""ORM models (SQLAlchemy 2, typed ``Mapped[...]``).

Primary keys are uuid4 hex strings so ids never leak counts. Everything a subject owns
(photos, jobs, adapters, images) is deleted with it (``ON DELETE CASCADE``); its blobs
live under ``subjects/{subject_id}/`` and go with one prefix delete.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from likeness.contract.plan import JobKind, JobState

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType, datetime: DateTime(timezone=True)}


class Role(str, enum.Enum):
    app = "app"
    bot = "bot"
    admin = "admin"


class PhotoStatus(str, enum.Enum):
    pending = "pending"
    accepted = "accepted"
    rejected = "rejected"


def _enum(cls: type[enum.Enum], *, checked: bool = True) -> Enum:
    """VARCHAR (+ CHECK) instead of a native PG enum. Job kinds and states are unchecked: the job
    contract (``likeness.contract.plan``) is their one definition, so a new kind needs no migration."""
    return Enum(cls, native_enum=False, create_constraint=checked, length=16, name=cls.__name__.lower(),
                values_callable=lambda e: [m.value for m in e])


def _id() -> Mapped[str]:
    return mapped_column(String(32), primary_key=True, default=new_id)


def _created_at() -> Mapped[datetime]:
    return mapped_column(default=utcnow)


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[str] = _id()
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(_enum(Role), default=Role.app)
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the key is shown once
    key_hint: Mapped[str | None] = mapped_column(String(16))  # first characters of the key, to tell keys apart
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_secret: Mapped[str | None] = mapped_column(String(128))
    max_candidates: Mapped[int] = mapped_column(Integer, default=64)
    # Per-client limits; NULL: the settings' default.
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    max_trainings_per_day: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Retention in days (NULL: the settings' default): uploads, crops and datasets after the training
    # that used them; generated images after they were made (core.retention).
    retain_training_data_days: Mapped[int | None] = mapped_column(Integer)
    retain_images_days: Mapped[int | None] = mapped_column(Integer)
    # Fair-share weight on the workers (worker.fair_share): 2 gets twice the share of 1 (paid tiers above free).
    priority: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    revoked_at: Mapped[datetime | None] = mapped_column()  # a revoked key is refused at once
    last_used_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = _created_at()


class Subject(Base):
    __tablename__ = "subjects"
    __table_args__ = (Index("ix_subjects_client_created", "client_id", "created_at"),
                      Index("ix_subjects_client_external_ref", "client_id", "external_ref"))

    id: Mapped[str] = _id()
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    # The client's own reference of the end user this subject belongs to (e.g. ``tg:<user id>``).
    external_ref: Mapped[str | None] = mapped_column(String(200))
    class_token_override: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created_at()


class Photo(Base):
    __tablename__ = "photos"

    id: Mapped[str] = _id()
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    original_key: Mapped[str] = mapped_column(String(500))
    crop_key: Mapped[str | None] = mapped_column(String(500))
    mask_key: Mapped[str | None] = mapped_column(String(500))
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[PhotoStatus] = mapped_column(_enum(PhotoStatus), default=PhotoStatus.pending)
    reason_code: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    face_box: Mapped[list[Any] | None] = mapped_column()
    blur: Mapped[float | None] = mapped_column(Float)
    identity_distance: Mapped[float | None] = mapped_column(Float)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the stored original (storage quota)
    created_at: Mapped[datetime] = _created_at()


class TemplatePhoto(Base):
    """A photo uploaded to put its subject into (template mode). Stored clean at upload, then judged
    (one person, a face) by a cpu-queue task sent with the upload (``worker.template_photos``)."""

    __tablename__ = "template_photos"
    __table_args__ = (Index("ix_template_photos_subject_created", "subject_id", "created_at"),)

    id: Mapped[str] = _id()
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str | None] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[PhotoStatus] = mapped_column(_enum(PhotoStatus), default=PhotoStatus.pending)
    reason_code: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    face_box: Mapped[list[Any] | None] = mapped_column()
    created_at: Mapped[datetime] = _created_at()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_client_created", "client_id", "created_at"),
        Index("ix_jobs_subject_state", "subject_id", "state"),
        Index("ix_jobs_state", "state"),
    )

    id: Mapped[str] = _id()
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"))
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, checked=False))
    state: Mapped[JobState] = mapped_column(_enum(JobState, checked=False), default=JobState.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0-100
    eta_s: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the resolved request (likeness.contract)
    # The uploaded template photo a template job puts its subject into (its request's ``source``).
    template_photo_id: Mapped[str | None] = mapped_column(
        ForeignKey("template_photos.id", ondelete="SET NULL"), index=True)
    # What it produced so far: likeness.contract.results, read with read_result(kind, result).
    result: Mapped[dict[str, Any] | None] = mapped_column()
    completed_stages: Mapped[list[Any]] = mapped_column(default=list)
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("subject_id", "version", name="uq_adapters_subject_version"),)

    id: Mapped[str] = _id()
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per subject
    mode: Mapped[str] = mapped_column(String(16))  # lora | full
    blob_prefix: Mapped[str] = mapped_column(String(500))
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = _created_at()


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_subject_created", "subject_id", "created_at"),)

    id: Mapped[str] = _id()
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)  # 1 = best within its job
    key: Mapped[str] = mapped_column(String(500))
    upscaled_key: Mapped[str | None] = mapped_column(String(500))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    style: Mapped[str | None] = mapped_column(String(64))
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)  # original + upscaled (storage quota)
    created_at: Mapped[datetime] = _created_at()


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_client_created", "client_id", "created_at"),)

    id: Mapped[str] = _id()
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    event: Mapped[str] = mapped_column(String(64))  # e.g. job.running, job.succeeded
    payload: Mapped[dict[str, Any]] = mapped_column()
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = _created_at()


class IdempotencyRecord(Base):
    """First response to a POST carrying an ``Idempotency-Key``; replayed on retries.

    A row with ``response_status`` NULL is a request still in flight (the primary key
    makes concurrent duplicates collide instead of both running).
    """

    __tablename__ = "idempotency_records"

    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = _created_at()


class JobStage(Base):
    """One run of one stage of a job (a stage retried after a lost worker has two rows)."""

    __tablename__ = "job_stages"
    __table_args__ = (Index("ix_job_stages_job_started", "job_id", "started_at"),
                      Index("ix_job_stages_finished", "finished_at"))

    id: Mapped[str] = _id()
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, checked=False))
    stage: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    seconds: Mapped[float | None] = mapped_column(Float)


class OutboxMessage(Base):
    """A task to send to the broker, written in the transaction that made it necessary.

    Sent right after the commit; if the broker is down it stays here and the recovery
    sweep sends it later, so a client always gets its job id and the job always runs.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_created", "created_at"),)

    id: Mapped[str] = _id()
    task: Mapped[str] = mapped_column(String(64))
    args: Mapped[list[Any]] = mapped_column()
    queue: Mapped[str] = mapped_column(String(16))  # the plan's queue name (cpu/gpu), without prefix
    created_at: Mapped[datetime] = _created_at()


class WorkerRecord(Base):
    """A worker process as it last reported itself (heartbeat)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    queues: Mapped[list[Any]] = mapped_column(default=list)
    state: Mapped[str] = mapped_column(String(16))  # starting | loading | idle | busy | stopped
    current_job_id: Mapped[str | None] = mapped_column(String(32))
    models: Mapped[list[Any]] = mapped_column(default=list)  # what it holds loaded: [{name, bytes}]
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = _created_at()
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class PurgeTotal(Base):
    """What the retention purge deleted since the install, per kind (``likeness_retention_deleted_total``).

    Kinds: ``photos`` (uploads with their crops and masks), ``datasets``, ``images``, ``blobs``
    (files removed from the store) and ``runs`` (purge passes; ``updated_at``: the last one).
    """

    __tablename__ = "purge_totals"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    deleted: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
