"""Domain errors. Services raise them; one exception handler maps them to
``{code, message, details}`` JSON with the error's HTTP status."""

from __future__ import annotations

import math
from typing import Any


class AppError(Exception):
    status: int = 400
    code: str = "bad_request"
    default_message: str = "The request cannot be processed."

    headers: dict[str, str] | None = None  # e.g. Retry-After

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None, *,
                 code: str | None = None, status: int | None = None, headers: dict[str, str] | None = None):
        self.message = message or self.default_message
        self.details = details or {}
        if headers is not None:
            self.headers = headers
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": json_safe(self.details)}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±Infinity: not JSON) written as a string, so an error
    body that echoes a bad input always serialises."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class Unauthorized(AppError):
    status, code, default_message = 401, "unauthorized", "A valid API key is required."


class Forbidden(AppError):
    status, code, default_message = 403, "forbidden", "This action is not allowed."


class NotFound(AppError):
    """Also raised for another client's resources, so their existence never leaks."""

    status, code, default_message = 404, "not_found", "Not found."


class Conflict(AppError):
    status, code, default_message = 409, "conflict", "The request conflicts with the current state."


class InvalidRequest(AppError):
    status, code, default_message = 422, "validation_error", "The request is invalid."


class IdempotencyKeyReused(AppError):
    status, code = 422, "idempotency_key_reused"
    default_message = "This Idempotency-Key was already used with a different request."


class IdempotencyInProgress(AppError):
    status, code = 409, "idempotency_request_in_progress"
    default_message = "A request with this Idempotency-Key is still being processed; retry shortly."


class PayloadTooLarge(AppError):
    status, code, default_message = 413, "request_too_large", "The request body is too large."


#: seconds a client is told to wait (``Retry-After``) when a dependency is down
RETRY_AFTER_S = 5


class ServiceUnavailable(AppError):
    status, code, default_message = 503, "service_unavailable", "A dependency is unavailable; retry later."
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"
    default_message = ("The database is unavailable. Retry after the Retry-After seconds (a POST that creates "
                       "work: with the same Idempotency-Key).")


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"
    default_message = ("The file storage cannot be written or read; nothing was stored. "
                       "Retry after the Retry-After seconds.")


class TooManyRequests(AppError):
    """Over a rate or a quota; ``retry_after_s`` (when known) becomes the ``Retry-After`` header."""

    status, code, default_message = 429, "rate_limited", "Too many requests; slow down."

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None, *,
                 code: str | None = None, retry_after_s: float | None = None, headers: dict[str, str] | None = None):
        headers = dict(headers or {})
        if retry_after_s is not None:
            seconds = max(1, int(-(-retry_after_s // 1)))  # whole seconds, rounded up
            headers["Retry-After"] = str(seconds)
            details = {**(details or {}), "retry_after_s": seconds}
        super().__init__(message, details, code=code, headers=headers or None)
