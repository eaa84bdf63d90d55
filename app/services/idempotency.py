"""``Idempotency-Key``: the first response to a work-creating POST is stored and replayed.

* same key, same request -> the stored status and body, never a second job;
* same key, different request -> 422 ``idempotency_key_reused``;
* concurrent duplicates collide on the record's primary key: one runs, the others wait
  for its response (up to ``wait_s``) and replay it.

Only successful (2xx) responses are stored: a request refused with a 4xx/5xx error did
nothing, so retrying it with the same key runs it again (e.g. after uploading photos).
A record left in flight by a crashed process is taken over after ``STALE_AFTER_S``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from app.db.models import IdempotencyRecord, utcnow
from app.db.session import session_scope
from app.errors import IdempotencyInProgress, IdempotencyKeyReused, InvalidRequest

STALE_AFTER_S = 120
MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


def fingerprint(scope: str, payload: Any) -> str:
    """sha256 of the operation (method + path) and its canonical JSON payload."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{scope}\n{canonical}".encode()).hexdigest()


def _claim(client_id: str, key: str, fp: str) -> StoredResponse | None:
    """Insert the in-flight record (None: we own the request) or return a finished response."""
    with session_scope() as session:
        record = session.get(IdempotencyRecord, (client_id, key))
        if record is None:
            session.add(IdempotencyRecord(client_id=client_id, key=key, fingerprint=fp))
            return None
        if record.fingerprint != fp:
            raise IdempotencyKeyReused(details={"idempotency_key": key})
        if record.response_status is not None:
            return StoredResponse(record.response_status, record.response_body or {})
        if record.created_at < utcnow() - timedelta(seconds=STALE_AFTER_S):
            record.created_at = utcnow()  # abandoned by a crashed request: take it over
            return None
        raise IdempotencyInProgress(details={"idempotency_key": key})


def run_idempotent(client_id: str, key: str | None, fp: str, action: Callable[[], StoredResponse], *,
                   wait_s: float = 15.0) -> tuple[StoredResponse, bool]:
    """Run ``action`` once per (client, key); returns (response, replayed)."""
    if key is None:
        return action(), False
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters.", code="invalid_idempotency_key")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stored = _claim(client_id, key, fp)
        except IntegrityError:  # a concurrent duplicate inserted first
            continue
        except IdempotencyInProgress:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        if stored is not None:
            return stored, True
        break
    try:
        response = action()
    except BaseException:
        with session_scope() as session:
            session.execute(delete(IdempotencyRecord).where(
                IdempotencyRecord.client_id == client_id, IdempotencyRecord.key == key))
        raise
    with session_scope() as session:
        session.execute(update(IdempotencyRecord)
                        .where(IdempotencyRecord.client_id == client_id, IdempotencyRecord.key == key)
                        .values(response_status=response.status, response_body=response.body))
    return response, False


def purge_older_than(days: int = 7) -> int:
    """Drop records older than ``days`` (keys are meant for retries, not forever)."""
    with session_scope() as session:
        result = session.execute(delete(IdempotencyRecord).where(
            IdempotencyRecord.created_at < utcnow() - timedelta(days=days)))
        return result.rowcount or 0


def get_record(client_id: str, key: str) -> IdempotencyRecord | None:
    with session_scope() as session:
        return session.scalar(select(IdempotencyRecord).where(
            IdempotencyRecord.client_id == client_id, IdempotencyRecord.key == key))
