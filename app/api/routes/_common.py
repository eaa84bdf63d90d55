"""Shared route helpers: documented error responses, idempotent JSON responses."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from app.api.schemas import ErrorBody

_DESCRIPTIONS = {
    401: "Missing or unknown API key.",
    403: "Not allowed for this key.",
    404: "Not found (also for another client's resources).",
    409: "Conflicts with the current state.",
    413: "Request body too large.",
    422: "Invalid request (the code says which field or rule).",
    429: "Too many requests, or over a quota (the code says which; `Retry-After` says when to retry if known).",
    503: "A dependency is unavailable.",
}


def errors(*statuses: int, authenticated: bool = True) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, all with :class:`ErrorBody`
    (plus what every authenticated route can answer: 401, 422 and 429)."""
    common = (401, 422, 429) if authenticated else (422,)
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in (*common, *statuses)}


def replayable(status: int, body: dict[str, Any], replayed: bool) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return JSONResponse(body, status_code=status, headers=headers)
