"""Shared route helpers: documented error responses, idempotent JSON responses."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from app.api.routes import API_PREFIX
from app.api.schemas import ErrorBody
from app.errors import InvalidRequest

BINARY = {"schema": {"type": "string", "format": "binary"}}  # a download's content entry (raw bytes)

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


def located(status: int, what: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a 201/202 answer that names its resource in a ``Location`` header."""
    return {status: {"headers": {"Location": {"description": f"The URL of {what}.", "schema": {"type": "string"}}}}}


def job_location(body: dict[str, Any]) -> str:
    return f"{API_PREFIX}/jobs/{body['id']}"


def page(request: Request, data: list[Any], count: int, offset: int = 0) -> dict[str, Any]:
    """A :class:`~app.api.schemas.Page`: ``next`` is this request's URL at the next offset (same filters and
    limit), or None on the last page."""
    following = offset + len(data)
    next_url = None
    if data and following < count:
        url = request.url.include_query_params(offset=following)
        next_url = f"{url.path}?{url.query}"
    return {"data": data, "count": count, "next": next_url}


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters ``route`` declares, its dependencies' included."""
    names: set[str] = set()
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        names.update(param.alias for param in dependant.query_params)
        pending.extend(dependant.dependencies)
    return frozenset(names)


def _invalid(loc: list[str], msg: str, kind: str) -> InvalidRequest:
    return InvalidRequest("The request is invalid.", {"errors": [{"loc": loc, "msg": msg, "type": kind}]})


async def check_request_inputs(request: Request) -> None:
    """Checks every route shares (an app-level dependency, so they cannot be forgotten on one):

    * an unknown query parameter (a misspelt filter, a ``cursor`` this API does not have) is a 422
      like an unknown body field, never silently ignored (the client would get the first page);
    * a NUL character anywhere in the path, query or JSON body is a 422 (no database stores it).
    """
    if "\x00" in request.scope["path"]:
        raise _invalid(["path"], "NUL characters are not allowed", "nul_character")
    is_json = request.headers.get("content-type", "").startswith("application/json")
    if is_json and b"\\u0000" in await request.body():
        raise _invalid(["body"], "NUL characters are not allowed", "nul_character")
    if not request.query_params:
        return
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            raise _invalid(["query", name], "NUL characters are not allowed", "nul_character")
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    allowed = _QUERY_NAMES.get(id(route))
    if allowed is None:
        allowed = _QUERY_NAMES.setdefault(id(route), _query_names(route))
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise InvalidRequest("The request is invalid.", {"errors": [
            {"loc": ["query", name], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
            for name in unknown]})
