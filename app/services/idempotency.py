"""``Idempotency-Key``: the first response to a work-creating POST is stored and replayed.

* same key, same request -> the stored status and body, never a second job;
* same key, different request -> 422 ``idempotency_key_reused``;
* the record is written in the same transaction as the work it answers for, so a stored
  response always belongs to committed work, and work that rolled back (an error) left no
  record: retrying it with the same key runs it again;
* concurrent duplicates collide on the record's primary key: the second waits for the
  first transaction and replays its response.

Records are purged after ``core.retention.IDEMPOTENCY_TTL_DAYS`` by the recovery sweep (keys are for retries).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import IdempotencyInProgress, IdempotencyKeyReused, InvalidRequest
from core.db.models import IdempotencyRecord

MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any


def fingerprint(scope: str, payload: Any) -> str:
    """sha256 of the operation (method + route) and its canonical JSON payload."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{scope}\n{canonical}".encode()).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters.", code="invalid_idempotency_key")


def _stored(record: IdempotencyRecord, fp: str) -> StoredResponse:
    if record.fingerprint != fp:
        raise IdempotencyKeyReused(details={"idempotency_key": record.key})
    if record.response_status is None:  # only possible inside the transaction that owns it
        raise IdempotencyInProgress(details={"idempotency_key": record.key})
    return StoredResponse(record.response_status, record.response_body)


def begin(session: Session, client_id: str, key: str, fp: str) -> StoredResponse | IdempotencyRecord:
    """The stored response for ``key``, or a new record this transaction now owns.

    Call it before the transaction writes anything else. The record is flushed at once: a
    concurrent duplicate blocks on it until this transaction ends, then replays what it
    stored (or, if this one rolled back, gets 409 and may retry).
    """
    check_key(key)
    existing = session.get(IdempotencyRecord, (client_id, key))
    if existing is not None:
        return _stored(existing, fp)
    record = IdempotencyRecord(client_id=client_id, key=key, fingerprint=fp)
    session.add(record)
    try:
        session.flush()
    except IntegrityError:  # a concurrent duplicate committed first (nothing else is written yet)
        session.rollback()
        existing = session.scalar(select(IdempotencyRecord).where(
            IdempotencyRecord.client_id == client_id, IdempotencyRecord.key == key).execution_options(
            populate_existing=True))
        if existing is None:  # it rolled back meanwhile: nothing to replay, the caller may retry
            raise IdempotencyInProgress(details={"idempotency_key": key}) from None
        return _stored(existing, fp)
    return record


def finish(record: IdempotencyRecord, response: StoredResponse) -> None:
    record.response_status = response.status
    record.response_body = response.body


