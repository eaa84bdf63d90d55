"""Clients and API keys: keys are random, shown once, stored as sha256; rotated and revoked by admins."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Client, Image, Job, Photo, Role, Subject, utcnow
from app.errors import Conflict, NotFound

KEY_PREFIX = "lk_"
AUTH_CACHE_TTL_S = 30.0
LAST_USED_PRECISION = timedelta(minutes=1)  # last_used_at is written at most this often
LIMIT_FIELDS = ("max_candidates", "requests_per_minute", "max_concurrent_jobs", "max_trainings_per_day",
                "max_storage_bytes")


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


def rotate_key(session: Session, client_id: str) -> tuple[Client, str]:
    """A new key for the client; the old one is refused from now on."""
    client = get_client(session, client_id)
    if client.revoked_at is not None:
        raise Conflict("This client is revoked; create a new one.", {"client_id": client_id}, code="client_revoked")
    api_key = generate_key()
    auth_cache.forget_client(client.id)
    client.api_key_hash, client.key_hint = hash_key(api_key), _hint(api_key)
    session.flush()
    return client, api_key


def revoke(session: Session, client_id: str) -> Client:
    """Refuse the client's key from now on (its data stays until the client is deleted)."""
    client = get_client(session, client_id)
    client.revoked_at = client.revoked_at or utcnow()
    auth_cache.forget_client(client.id)
    session.flush()
    return client


def set_limits(session: Session, client_id: str, **limits: Any) -> Client:
    """Set per-client limits (``None``: back to the settings' default; ``max_candidates`` is required)."""
    client = get_client(session, client_id)
    for name, value in limits.items():
        if name not in LIMIT_FIELDS:
            raise ValueError(name)
        setattr(client, name, value)
    auth_cache.forget_client(client.id)
    session.flush()
    return client


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


class _AuthCache:
    """Key hash -> Caller for a few seconds, so status polls skip the clients query."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> Caller | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, caller: Caller) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key_hash] = (time.monotonic() + self.ttl_s, caller)

    def forget_client(self, client_id: str) -> None:
        with self._lock:
            for key_hash in [h for h, (_, c) in self._entries.items() if c.id == client_id]:
                del self._entries[key_hash]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


auth_cache = _AuthCache(AUTH_CACHE_TTL_S)


def authenticate(session: Session, api_key: str) -> Caller | None:
    """The caller of ``api_key`` (None: unknown or revoked); notes when the key was last used."""
    key_hash = hash_key(api_key)
    caller = auth_cache.get(key_hash)
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
    auth_cache.put(key_hash, caller)
    return caller
