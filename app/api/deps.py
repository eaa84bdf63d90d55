"""Dependencies as aliases so route signatures stay one line.

Every route reaches the database through one :class:`~core.db.uow.UnitOfWork` (``UoW``): it
commits when the handler returns (before the response is sent) and only then sends the
task messages and webhooks the handler queued; it rolls back if the handler raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.auth_sync import auth_cache
from app.errors import Forbidden, TooManyRequests, Unauthorized
from app.ratelimit import client_address, remember_headers
from app.services import idempotency
from app.services.clients import Caller, authenticate, hash_key
from core.config import Settings, get_settings
from core.db.session import SessionLocal
from core.db.uow import UnitOfWork
from core.storage import BlobStore, get_blob_store


def app_settings(request: Request) -> Settings:
    """The settings the app was created with (``create_app(settings)``)."""
    return getattr(request.app.state, "settings", None) or get_settings()


def get_uow(request: Request) -> Iterator[UnitOfWork]:
    with UnitOfWork(app_settings(request)) as uow:
        yield uow


# The two ways to send the key, declared as OpenAPI security schemes: Swagger UI gets its Authorize
# button and generated clients send the key (auto_error=False: a missing key is our own 401 body).
bearer_key = HTTPBearer(scheme_name="bearer", bearerFormat="API key", auto_error=False,
                        description="`Authorization: Bearer <api key>`")
header_key = APIKeyHeader(name="X-API-Key", scheme_name="api_key", auto_error=False,
                          description="`X-API-Key: <api key>` (the same key)")


def _lookup(api_key: str, settings: Settings) -> Caller | None:
    with SessionLocal(settings.resolved_database_url) as session, session.begin():
        return authenticate(session, api_key, cached=False)


def _failures_key(request: Request) -> str:
    return f"auth-failures:{client_address(request)}"


def refuse_failing_address(request: Request) -> None:
    """429 ``too_many_failed_attempts`` for an address past ``auth_failures_per_minute`` failed
    authentications (wrong API keys, bad signed links) in the last minute: no key from it is looked up
    in the database until the minute has passed (a key this process knows from its cache still works)."""
    limiter = getattr(request.app.state, "rate_limiter", None)
    per_minute = app_settings(request).auth_failures_per_minute
    if limiter is None or not per_minute:
        return
    decision = limiter.peek(_failures_key(request), per_minute)
    if not decision.allowed:
        raise TooManyRequests(f"More than {per_minute} failed attempts from this address in a minute; retry after "
                              "the Retry-After seconds.", {"limit_per_minute": per_minute},
                              code="too_many_failed_attempts", retry_after_s=decision.reset_s,
                              headers=decision.headers())


def limit_address(request: Request, scope: str) -> None:
    """Requests per minute of an unauthenticated route (signed links), per address: the install's default
    client rate (``default_requests_per_minute``); 429 ``rate_limited`` past it."""
    limiter = getattr(request.app.state, "rate_limiter", None)
    per_minute = app_settings(request).default_requests_per_minute
    if limiter is None or not per_minute:
        return
    decision = limiter.hit(f"{scope}:{client_address(request)}", per_minute)
    if not decision.allowed:
        raise TooManyRequests(f"More than {per_minute} requests per minute from this address; retry after the "
                              "Retry-After seconds.", {"limit_per_minute": per_minute},
                              retry_after_s=decision.reset_s, headers=decision.headers())
    remember_headers(request, decision)


def count_failure(request: Request) -> None:
    """Count one failed authentication of the request's address."""
    limiter = getattr(request.app.state, "rate_limiter", None)
    per_minute = app_settings(request).auth_failures_per_minute
    if limiter is not None and per_minute:
        remember_headers(request, limiter.hit(_failures_key(request), per_minute))


async def current_client(request: Request,
                         bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_key)] = None,
                         x_api_key: Annotated[str | None, Security(header_key)] = None) -> Caller:
    """The caller from its API key, within its requests-per-minute limit; an address that keeps sending
    wrong keys is refused for a while (:func:`refuse_failing_address`).

    A cache hit costs no thread hop, no query and no failure check (status polls); the cache is used
    only while this process hears about key changes made by the others (:mod:`app.auth_sync`).
    """
    key = (bearer.credentials.strip() if bearer is not None else None) or x_api_key or None
    if key is None:
        refuse_failing_address(request)
        count_failure(request)
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>' or 'X-API-Key'.")
    state = request.app.state
    subscriber = getattr(state, "auth_subscriber", None)
    caller = auth_cache.get(hash_key(key)) if subscriber is None or subscriber.trusted else None
    if caller is None:
        refuse_failing_address(request)  # before the database is asked about a key from a guessing address
        caller = await run_in_threadpool(_lookup, key, app_settings(request))
        if caller is None:
            count_failure(request)
            raise Unauthorized("Unknown or revoked API key.")
    limit = caller.requests_per_minute or app_settings(request).default_requests_per_minute
    limiter = getattr(state, "rate_limiter", None)
    if limit and limiter is not None:
        decision = limiter.hit(f"client:{caller.id}", limit)
        if not decision.allowed:
            raise TooManyRequests(f"More than {limit} requests per minute; retry after the Retry-After seconds.",
                                  {"limit_per_minute": limit}, retry_after_s=decision.reset_s,
                                  headers=decision.headers())
        remember_headers(request, decision)
    return caller


def admin_client(caller: Annotated[Caller, Depends(current_client)]) -> Caller:
    if not caller.is_admin:
        raise Forbidden("This endpoint needs an admin key.")
    return caller


def get_store(settings: Annotated[Settings, Depends(app_settings)]) -> BlobStore:
    return get_blob_store(settings)


class Idempotency:
    """The request's ``Idempotency-Key`` (if any), for routes that create work.

    ``replay(uow, payload)`` first: it returns the stored response of an earlier request with
    this key, or claims the key in the unit of work; then ``respond(...)`` builds the
    response and stores it in the same transaction as the work.
    """

    def __init__(self, caller: Caller, key: str | None, scope: str):
        self.caller, self.key, self.scope = caller, key, scope
        self._record = None

    def replay(self, uow: UnitOfWork, payload: Any, location: Locator | None = None) -> JSONResponse | None:
        if self.key is None:
            return None
        fp = idempotency.fingerprint(self.scope, payload)
        outcome = idempotency.begin(uow.session, self.caller.id, self.key, fp)
        if isinstance(outcome, idempotency.StoredResponse):
            return _json(outcome.status, outcome.body, location, {"Idempotent-Replayed": "true"})
        self._record = outcome
        return None

    def respond(self, status: int, body: Any, location: Locator | None = None) -> JSONResponse:
        """The answer (stored for replays); ``location`` names the created resource's URL from the body
        (the ``Location`` header of a 201 or 202)."""
        if self._record is not None:
            idempotency.finish(self._record, idempotency.StoredResponse(status, body))
        return _json(status, body, location, {})


Locator = Callable[[Any], str]


def _json(status: int, body: Any, location: Locator | None, headers: dict[str, str]) -> JSONResponse:
    if location is not None and status in (201, 202):
        headers = {**headers, "Location": location(body)}
    return JSONResponse(body, status_code=status, headers=headers)


def get_idempotency(request: Request, caller: Annotated[Caller, Depends(current_client)],
                    key: Annotated[str | None, Header(alias="Idempotency-Key", description=(
                        "Makes the request safe to retry: the same key with the same body replays the first "
                        "response (header Idempotent-Replayed: true) and never creates a second job."))] = None,
                    ) -> Idempotency:
    return Idempotency(caller, key, f"{request.method} {request.url.path}")


UoW = Annotated[UnitOfWork, Depends(get_uow, scope="function")]  # committed before the response is sent
CurrentClient = Annotated[Caller, Depends(current_client)]
AdminClient = Annotated[Caller, Depends(admin_client)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
IdempotencyDep = Annotated[Idempotency, Depends(get_idempotency)]
