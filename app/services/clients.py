"""Clients and API keys: keys are random, shown once, stored as sha256; rotated and revoked by admins."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.auth_sync import auth_cache, invalidate_everywhere
from app.errors import Conflict, NotFound
from core.db.models import Client, Image, Job, Photo, Role, Subject, utcnow
from core.db.session import scrub_deleted
from core.db.uow import UnitOfWork
from core.storage import BlobStore, purge_subject_blobs

KEY_PREFIX = "lk_"
LAST_USED_PRECISION = timedelta(minutes=1)  # last_used_at is written at most this often
LIMIT_FIELDS = ("max_candidates", "requests_per_minute", "max_concurrent_jobs", "max_trainings_per_day",
                "max_storage_bytes")
RETENTION_FIELDS = ("retain_training_data_days", "retain_images_days")
SCHEDULING_FIELDS = ("priority",)  # worker.fair_share


@dataclass(frozen=True)
class Caller:
    """The authenticated client as routes and services see it (a detached snapshot)."""

    id: str
    name: str
    role: Role
    max_candidates: int
    requests_per_minute: int | None = None
    max_concurrent_jobs: int | None = None
    max_trainings_per_day: int | None = None
    max_storage_bytes: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin

    @classmethod
    def of(cls, client: Client) -> Caller:
        return cls(id=client.id, name=client.name, role=Role(client.role),
                   **{name: getattr(client, name) for name in LIMIT_FIELDS})


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _hint(api_key: str) -> str:
    return api_key[:7]


def create_client(session: Session, name: str, role: Role | str = Role.app, *, max_candidates: int = 64,
                  api_key: str | None = None, **limits: int | None) -> tuple[Client, str]:
    """A new client and its API key (the only time the key is available in clear)."""
    api_key = api_key or generate_key()
    client = Client(name=name, role=Role(role), api_key_hash=hash_key(api_key), key_hint=_hint(api_key),
                    max_candidates=max_candidates, **limits)
    session.add(client)
    session.flush()
    return client, api_key


def ensure_client_with_key(session: Session, name: str, role: Role | str, api_key: str) -> Client:
    """Create a client for a key given from configuration (bootstrap admin) unless it exists."""
    existing = session.scalar(select(Client).where(Client.api_key_hash == hash_key(api_key)))
    return existing or create_client(session, name, role, api_key=api_key)[0]


def get_client(session: Session, client_id: str) -> Client:
    client = session.get(Client, client_id)
    if client is None:
        raise NotFound("Client not found.", {"client_id": client_id})
    return client


def list_clients(session: Session, *, limit: int = 100, offset: int = 0) -> tuple[list[Client], int]:
    count = session.scalar(select(func.count()).select_from(Client)) or 0
    rows = session.scalars(select(Client).order_by(Client.created_at.desc(), Client.id).limit(limit).offset(offset))
    return list(rows), count


def _refresh_callers_after_commit(uow: UnitOfWork, client_id: str) -> None:
    """Once the change is committed, every API process drops the client's cached callers
    (:mod:`app.auth_sync`): the old key, the old limits are refused at once everywhere."""
    auth_cache.forget_client(client_id)
    settings = uow.settings
    uow.after_commit(lambda: invalidate_everywhere(settings, client_id))


def rotate_key(uow: UnitOfWork, client_id: str) -> tuple[Client, str]:
    """A new key for the client; the old one is refused from now on, in every API process."""
    client = get_client(uow.session, client_id)
    if client.revoked_at is not None:
        raise Conflict("This client is revoked; create a new one.", {"client_id": client_id}, code="client_revoked")
    api_key = generate_key()
    client.api_key_hash, client.key_hint = hash_key(api_key), _hint(api_key)
    uow.session.flush()
    _refresh_callers_after_commit(uow, client.id)
    return client, api_key


def revoke(uow: UnitOfWork, client_id: str) -> Client:
    """Refuse the client's key from now on, in every API process (its data stays until the client is deleted)."""
    client = get_client(uow.session, client_id)
    client.revoked_at = client.revoked_at or utcnow()
    uow.session.flush()
    _refresh_callers_after_commit(uow, client.id)
    return client


def set_limits(uow: UnitOfWork, client_id: str, **limits: Any) -> Client:
    """Set per-client limits and retention (``None``: back to the settings' default; ``max_candidates``
    is required); in force for the next request, in every API process."""
    client = get_client(uow.session, client_id)
    for name, value in limits.items():
        if name not in LIMIT_FIELDS + RETENTION_FIELDS + SCHEDULING_FIELDS:
            raise ValueError(name)
        setattr(client, name, value)
    uow.session.flush()
    _refresh_callers_after_commit(uow, client.id)
    return client


def delete_client(uow: UnitOfWork, client_id: str, store: BlobStore, *, caller_id: str | None = None) -> None:
    """Delete a client with everything it owns: rows cascade (subjects, photos, jobs, adapters, images,
    webhook deliveries, idempotency records) and, once committed, every blob of its subjects.

    A worker still running one of its jobs finds the row gone and stops (as for a deleted subject).
    """
    session = uow.session
    client = get_client(session, client_id)
    if client.id == caller_id:
        raise Conflict("An admin key cannot delete its own client.", {"client_id": client_id},
                       code="cannot_delete_self")
    subject_ids = list(session.scalars(select(Subject.id).where(Subject.client_id == client.id)))
    session.execute(delete(Client).where(Client.id == client.id))
    session.flush()
    _refresh_callers_after_commit(uow, client_id)
    uow.after_commit(lambda: [purge_subject_blobs(store, subject_id) for subject_id in subject_ids])
    uow.after_commit(lambda: scrub_deleted(uow.settings.resolved_database_url))


def usage(session: Session, client_id: str) -> dict[str, int]:
    """What a client has: subjects, photos, jobs, images."""
    subjects = select(Subject.id).where(Subject.client_id == client_id)
    return {
        "subjects": session.scalar(select(func.count()).select_from(Subject).where(Subject.client_id == client_id))
        or 0,
        "photos": session.scalar(select(func.count()).select_from(Photo).where(Photo.subject_id.in_(subjects))) or 0,
        "jobs": session.scalar(select(func.count()).select_from(Job).where(Job.client_id == client_id)) or 0,
        "images": session.scalar(select(func.count()).select_from(Image).where(Image.subject_id.in_(subjects))) or 0,
    }


def authenticate(session: Session, api_key: str, *, cached: bool = True) -> Caller | None:
    """The caller of ``api_key`` (None: unknown or revoked); notes when the key was last used.

    ``cached=False`` reads the database even if the cache holds the key (the cache is not trusted now).
    """
    key_hash = hash_key(api_key)
    generation = auth_cache.generation
    caller = auth_cache.get(key_hash) if cached else None
    if caller is not None:
        return caller
    client = session.scalar(select(Client).where(Client.api_key_hash == key_hash))
    if client is None or client.revoked_at is not None:
        return None
    now = utcnow()
    last = client.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite returns naive UTC
        last = last.replace(tzinfo=now.tzinfo)
    if last is None or now - last > LAST_USED_PRECISION:
        client.last_used_at = now
    caller = Caller.of(client)
    auth_cache.put(key_hash, caller, generation)
    return caller
