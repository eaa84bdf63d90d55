"""Dependencies as aliases so route signatures stay one line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.db.session import ReadSessionLocal, SessionLocal
from app.errors import Forbidden, Unauthorized
from app.services.clients import Caller, auth_cache, authenticate, hash_key
from app.storage import BlobStore, get_blob_store

T = TypeVar("T")


async def get_session() -> AsyncIterator[Session]:
    """A session for the request; closed (uncommitted work rolled back) when the handler ends.

    Routes that write commit explicitly before they enqueue or respond. The dependency is
    async on purpose: its exit runs on the event loop, so returning the connection never
    waits for a free threadpool thread (with a sync generator, handlers blocked on an
    exhausted pool would hold every thread and the exits that free connections could never run).
    """
    session = SessionLocal()
    try:
        yield session
    finally:
        session.close()


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def released(session: Session, value: T) -> T:
    """Close ``session`` and return ``value`` (an API model, already built from the rows).

    Sync handlers end with it: FastAPI serialises their response in another threadpool
    task, and holding a pooled connection across that hop can deadlock a saturated pool
    (every thread waiting for a connection, every connection waiting for a thread).
    """
    session.close()
    return value


async def get_read_session() -> AsyncIterator[Session]:
    """A read-only session (autocommit: one round trip per SELECT); for GET routes."""
    session = ReadSessionLocal()
    try:
        yield session
    finally:
        session.close()


def _lookup(api_key: str) -> Caller | None:
    with ReadSessionLocal() as session:
        return authenticate(session, api_key)


async def current_client(request: Request) -> Caller:
    """The caller from its API key; a cache hit costs no thread hop and no query (status polls)."""
    key = _api_key(request)
    if key is None:
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>' or 'X-API-Key'.")
    caller = auth_cache.get(hash_key(key)) or await run_in_threadpool(_lookup, key)
    if caller is None:
        raise Unauthorized("Unknown API key.")
    return caller


def admin_client(caller: Annotated[Caller, Depends(current_client)]) -> Caller:
    if not caller.is_admin:
        raise Forbidden("This endpoint needs an admin key.")
    return caller


def app_settings(request: Request) -> Settings:
    """The settings the app was created with (``create_app(settings)``)."""
    return getattr(request.app.state, "settings", None) or get_settings()


def get_store(settings: Annotated[Settings, Depends(app_settings)]) -> BlobStore:
    return get_blob_store(settings)


SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # closed before the response is sent
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
CurrentClient = Annotated[Caller, Depends(current_client)]
AdminClient = Annotated[Caller, Depends(admin_client)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", description=(
    "Makes the request safe to retry: the same key with the same body replays the first response."))]
