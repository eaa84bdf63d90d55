"""One settings object for API, workers and CLI, read from environment / `.env`.

Every variable is ``LIKENESS_<FIELD>``; the README's configuration table lists them.
Embedded mode (the default) needs no Postgres, Redis or GPU: SQLite, a local blob
folder and a broker kept in the same SQLite-backed data dir.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.models.weights import resolve_preset

#: The public placeholder once shipped as the default: refused anywhere but tests (anyone can sign with it).
DEV_SECRET = "dev-insecure-secret-change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIKENESS_", env_file=".env", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"
    data_dir: Path = Path("./data")

    # Data and queues. Empty means "embedded default under data_dir".
    database_url: str = ""
    broker_url: str = ""  # redis://... in production
    redis_url: str = ""  # rate/idempotency/queue-depth metrics; optional in embedded mode
    queue_prefix: str = ""  # isolates queues (and Redis keys) of several deployments/test runs
    # Redis: an unacked message goes to another worker after this. Not how a lost job comes back (the
    # lease below does that); it must exceed the longest retry countdown a worker holds (webhook backoff).
    broker_visibility_timeout_s: int = 3600

    # Blob storage
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None
    s3_bucket: str = "likeness"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    # Direct uploads (S3 mode): clients PUT photos to presigned URLs at this address (default: s3_endpoint_url),
    # valid this long; the API then checks what arrived (app.services.direct_uploads).
    s3_public_endpoint_url: str | None = None
    direct_upload_expires_s: int = 900

    # Security
    # Signs download URLs and derives the key that encrypts webhook secrets at rest (core.sealed); every API
    # process and worker needs the same one. Unset: a random one generated once per
    # install and kept in ``<data_dir>/secret_key`` (mode 600); see core.signing.signing_secret.
    secret_key: str | None = None
    signed_url_ttl_s: int = 300
    bootstrap_admin_key: str | None = None  # creates an admin client with this key at start if set
    webhook_allow_private: bool = False  # let webhooks reach loopback/private addresses (self-hosted receivers)
    # Bearer token that /metrics asks for (unset: /metrics is open, for a scraper on a private network).
    metrics_token: str | None = None

    # Failed authentications (wrong API keys, bad signed links) per address and sliding minute; 0: unlimited.
    auth_failures_per_minute: int = 30

    # Per-client limits: the defaults for clients whose own value is NULL (``none``: unlimited). A new client is
    # bounded from its first request; an admin raises (or lifts) a client's own limits.
    default_requests_per_minute: int | None = 1200  # 20 a second: polls of several jobs at once
    default_max_concurrent_jobs: int | None = 4
    default_max_trainings_per_day: int | None = 20
    default_max_storage_bytes: int | None = 5 * 1024**3  # 5 GiB

    # Retention (per-client values override; None: keep forever) and the purge's schedule.
    retain_training_data_days: int | None = 30  # uploads, crops, datasets: days after the training that used them
    retain_images_days: int | None = 90  # generated images: days after they were made
    purge_interval_s: int = 3600
    # Blobs no row names (a process killed between storing files and committing) are deleted by the purge
    # once they are this old; a write in progress is always younger.
    orphan_blob_grace_s: int = 6 * 3600

    # Upload limits
    max_file_bytes: int = 25 * 1024 * 1024
    max_request_bytes: int = 200 * 1024 * 1024
    max_pixels: int = 60_000_000
    max_photos_per_request: int = 30
    max_candidates_per_request: int = 64

    # ML
    # auto: sd15 when its weights are on this machine (`likeness models pull --preset sd15`), else tiny
    model_preset: Literal["auto", "tiny", "sd15", "tiny-sdxl", "sdxl"] = "auto"
    model_cache_dir: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    model_memory_budget: str = "auto"  # models a worker keeps loaded: bytes, "12GiB" or auto (90 % GPU / half RAM)
    log_format: Literal["auto", "json", "text"] = "auto"  # worker logs; auto: JSON lines unless on a terminal

    # Jobs
    max_attempts: int = 3
    # A running job's owner renews a lease (``heartbeat_at``) every ``job_heartbeat_s``; a lease older than
    # ``job_stale_after_s`` means its worker is gone and the recovery sweep (every ``job_heartbeat_s``, in every
    # worker) hands the job to another worker, which resumes training from the last mirrored checkpoint.
    job_heartbeat_s: int = 5
    job_stale_after_s: int = 30
    job_requeue_after_s: int = 300  # a queued (or handed-over) job nobody took this long: its message is resent
    webhook_max_attempts: int = 6
    webhook_backoff_first_s: float = 10.0  # a failed delivery is retried after this, then 3x longer each time
    # Fair share (worker.fair_share): a worker claims the waiting job of the least served client (recent
    # seconds on the queue / the client's priority), then end user; off: first in, first out.
    fair_share: bool = True
    fair_share_window_s: float = 1800.0

    # API server
    host: str = "127.0.0.1"
    port: int = 8000
    # Reverse proxies whose X-Forwarded-For / -Proto are believed (comma-separated addresses or networks, "*" for
    # any); empty: none, the peer's address is the client's (per-address limits cannot be dodged with a header).
    forwarded_allow_ips: str = ""

    @field_validator("default_requests_per_minute", "default_max_concurrent_jobs", "default_max_trainings_per_day",
                     "default_max_storage_bytes", "retain_training_data_days", "retain_images_days", mode="before")
    @classmethod
    def _empty_means_none(cls, value: object) -> object:
        """``LIKENESS_RETAIN_IMAGES_DAYS=`` (or ``none``): no limit / keep forever."""
        if isinstance(value, str) and value.strip().lower() in ("", "none", "off"):
            return None
        return value

    @model_validator(mode="after")
    def _lease_outlives_beats(self) -> Settings:
        if self.job_heartbeat_s < 1 or self.job_stale_after_s < 2 * self.job_heartbeat_s:
            raise ValueError(f"LIKENESS_JOB_STALE_AFTER_S ({self.job_stale_after_s}) must be at least twice "
                             f"LIKENESS_JOB_HEARTBEAT_S ({self.job_heartbeat_s}, at least 1): one late heartbeat "
                             "must not hand a live job to another worker")
        return self

    @model_validator(mode="after")
    def _refuse_public_secret(self) -> Settings:
        if self.secret_key == DEV_SECRET and self.environment != "test":
            raise ValueError("LIKENESS_SECRET_KEY is the public placeholder; set a random value "
                             "(e.g. `openssl rand -hex 32`) or unset it to use the per-install secret")
        if self.secret_key and len(self.secret_key) < 16 and self.environment != "test":
            raise ValueError("LIKENESS_SECRET_KEY is too short: use at least 16 random characters")
        if self.environment == "production" and not self.secret_key:
            raise ValueError("LIKENESS_SECRET_KEY must be set in production (every API replica signs with it)")
        return self

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'likeness.sqlite3').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        # Embedded mode: kombu's SQLAlchemy transport on a SQLite file, so no Redis is needed.
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite3').resolve()}"

    @property
    def resolved_redis_url(self) -> str | None:
        """Redis shared by the API processes (rate limits, key invalidation): ``redis_url``, else a
        Redis broker; None in embedded mode (one API process, in-process state)."""
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "blobs").resolve()

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "models").resolve()

    @property
    def preset(self) -> str:
        """The model preset jobs use: ``model_preset`` with ``auto`` resolved (once per process)."""
        return resolve_preset(self.model_preset, self.resolved_model_cache_dir)

    def queue(self, name: str) -> str:
        """The broker's name of a job-plan queue (``cpu``/``gpu``), with this deployment's prefix."""
        return f"{self.queue_prefix}{name}"


@functools.lru_cache
def get_settings() -> Settings:
    return Settings()
