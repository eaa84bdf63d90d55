"""Clients and API keys: keys are random, shown once, stored as sha256."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Client, Role
from app.errors import NotFound

KEY_PREFIX = "lk_"
AUTH_CACHE_TTL_S = 30.0


@dataclass(frozen=True)
class Caller:
    """The authenticated client as routes and services see it (a detached snapshot)."""

    id: str
    name: str
    role: Role
    max_candidates: int

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_client(session: Session, name: str, role: Role | str = Role.app, *, max_candidates: int = 64,
                  api_key: str | None = None) -> tuple[Client, str]:
    """A new client and its API key (the only time the key is available in clear)."""
    api_key = api_key or generate_key()
    client = Client(name=name, role=Role(role), api_key_hash=hash_key(api_key), max_candidates=max_candidates)
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
        raise NotFound("Client not found.")
    return client


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

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


auth_cache = _AuthCache(AUTH_CACHE_TTL_S)


def authenticate(session: Session, api_key: str) -> Caller | None:
    key_hash = hash_key(api_key)
    caller = auth_cache.get(key_hash)
    if caller is not None:
        return caller
    client = session.scalar(select(Client).where(Client.api_key_hash == key_hash))
    if client is None:
        return None
    caller = Caller(id=client.id, name=client.name, role=client.role, max_candidates=client.max_candidates)
    auth_cache.put(key_hash, caller)
    return caller
