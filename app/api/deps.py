"""Dependencies as aliases so route signatures stay one line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.db.session import SessionLocal
from app.errors import Forbidden, Unauthorized
from app.services.clients import Caller, authenticate
from app.storage import BlobStore, get_blob_store


def get_session() -> Iterator[Session]:
    session = SessionLocal()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def current_client(request: Request, session: Annotated[Session, Depends(get_session, scope="function")]) -> Caller:
    key = _api_key(request)
    if key is None:
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>' or 'X-API-Key'.")
    caller = authenticate(session, key)
    if caller is None:
        raise Unauthorized("Unknown API key.")
    request.state.client_id = caller.id
    return caller


def admin_client(caller: Annotated[Caller, Depends(current_client)]) -> Caller:
    if not caller.is_admin:
        raise Forbidden("This endpoint needs an admin key.")
    return caller


def get_store() -> BlobStore:
    return get_blob_store(get_settings())


SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # commit before the response is sent
CurrentClient = Annotated[Caller, Depends(current_client)]
AdminClient = Annotated[Caller, Depends(admin_client)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", description=(
    "Makes the request safe to retry: the same key with the same body replays the first response."))]
