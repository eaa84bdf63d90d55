"""The FastAPI application: ``create_app()``; run with ``uvicorn app.main:create_app --factory``."""

from __future__ import annotations

import contextlib
import logging
import uuid

import psycopg
import sqlalchemy.exc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import likeness
from app.admin import install as install_admin_dashboard
from app.api import job_status
from app.api.routes import account, admin, images, jobs, operation_id, photos, subjects, templates
from app.api.routes._common import check_request_inputs
from app.api.schemas import ErrorBody
from app.auth_sync import AuthSubscriber
from app.docs import install_offline_docs
from app.errors import AppError, DatabaseUnavailable, PayloadTooLarge, StorageUnavailable, Unauthorized, json_safe
from app.health import check_all
from app.metrics import RequestMetricsMiddleware, render, scrape_registry
from app.ratelimit import RateLimitHeaders, rate_limiter
from app.services.clients import ensure_client_with_key
from core.config import Settings, get_settings
from core.db.session import SessionLocal, database_unavailable
from core.db.uow import UnitOfWork
from core.signing import same_text
from core.storage import StorageError

log = logging.getLogger("likeness.api")

API_DESCRIPTION = """
Likeness learns a person from a few selfies and returns ranked portraits in chosen styles.

Flow: create a subject -> upload photos -> start training -> poll the job (or receive webhooks)
-> start generations -> list and download images.

Authenticate with `Authorization: Bearer <api key>` or `X-API-Key: <api key>`. Every error is
`{code, message, details}` JSON; `code` is stable. POSTs that create work accept an
`Idempotency-Key` header: retrying with the same key and body replays the first response.
"""


class BodyLimitMiddleware:
    """413 for bodies over the limit, whether or not Content-Length is sent (uploads get the big limit)."""

    def __init__(self, app, settings: Settings, default_limit: int = 1024 * 1024):  # noqa: ANN001
        self.app = app
        self.upload_limit = settings.max_request_bytes
        self.default_limit = default_limit

    async def __call__(self, scope, receive, send):  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # The big limit only for multipart uploads (their files are spooled to disk as they arrive); any other
        # body a route reads whole into memory, so it keeps the small one.
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        uploading = scope["path"].endswith("/photos") and content_type.startswith(b"multipart/form-data")
        limit = self.upload_limit if uploading else self.default_limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, PayloadTooLarge(details={"max_bytes": limit}))
            return
        received = 0

        async def limited_receive():  # noqa: ANN202
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(details={"max_bytes": limit})
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, error: AppError) -> None:  # noqa: ANN001
    response = JSONResponse(error.body(), status_code=error.status)
    await response({"type": "http"}, None, send)  # type: ignore[arg-type]


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"loc": json_safe(list(e.get("loc", ()))), "msg": str(e.get("msg", "")),
                     "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"code": "validation_error", "message": "The request is invalid.",
                             "details": {"errors": problems}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, AppError):  # e.g. body limit hit while FastAPI parsed the form
            return await app_error(request, exc.__cause__)
        if exc.status_code == 400:  # the framework could not parse the body (bad JSON, bad multipart): like 422
            return JSONResponse({"code": "validation_error", "message": "The request body cannot be parsed.",
                                 "details": {"errors": [{"loc": ["body"], "msg": str(exc.detail),
                                                         "type": "body_unparsable"}]}}, status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"code": code, "message": str(exc.detail), "details": {}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        """A dependency is down: 503 with ``Retry-After``, whatever the route (a 500 says the request broke
        the server, which it did not)."""
        error = _dependency_error(exc)
        if error is None:
            return await internal_error(request, exc)
        log.warning("%s on %s %s: %s: %s", error.code, request.method, request.url.path, type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "")
        return await app_error(request, error)

    for dependency_error in (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError, psycopg.Error, StorageError):
        app.add_exception_handler(dependency_error, unavailable)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = _request_id(request)
        log.exception("unhandled error (request_id=%s) on %s %s", request_id, request.method, request.url.path)
        return JSONResponse({"code": "internal_error", "message": "Internal server error.",
                             "details": {"request_id": request_id}}, status_code=500)


def _dependency_error(exc: BaseException) -> AppError | None:
    """The 503 for an unreachable database or blob store; None for anything else."""
    if isinstance(exc, StorageError):
        return StorageUnavailable()
    if database_unavailable(exc):
        return DatabaseUnavailable()
    return None


def _bootstrap_admin(settings: Settings) -> None:
    if not settings.bootstrap_admin_key:
        return
    with UnitOfWork(settings) as uow:
        ensure_client_with_key(uow.session, "bootstrap-admin", "admin", settings.bootstrap_admin_key)


def proxy_options(settings: Settings) -> dict[str, object]:
    """uvicorn's proxy settings: forwarded headers are read only from ``LIKENESS_FORWARDED_ALLOW_IPS``
    (none by default; uvicorn alone would believe them from 127.0.0.1)."""
    trusted = settings.forwarded_allow_ips.strip()
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None}


def proxy_args(settings: Settings) -> list[str]:
    """:func:`proxy_options` as uvicorn's command-line flags."""
    options = proxy_options(settings)
    if not options["proxy_headers"]:
        return ["--no-proxy-headers"]
    return ["--proxy-headers", "--forwarded-allow-ips", str(options["forwarded_allow_ips"])]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        _bootstrap_admin(settings)
        listener = job_status.listener_for(app.state.job_status, settings)  # status polls from memory (PostgreSQL)
        if listener is not None:
            listener.start()
        app.state.job_status_listener = listener
        app.state.auth_subscriber.start()
        try:
            yield
        finally:
            app.state.auth_subscriber.stop()
            if listener is not None:
                await listener.stop()

    app = FastAPI(title="Likeness API", version=likeness.__version__, description=API_DESCRIPTION, lifespan=lifespan,
                  generate_unique_id_function=operation_id,
                  responses={500: {"model": ErrorBody, "description": "Internal error (no details leak)."},
                             503: {"model": ErrorBody, "description": (
                                 "A dependency is down (`database_unavailable`, `storage_unavailable`); retry "
                                 "after the `Retry-After` seconds (a POST that creates work: with the same "
                                 "Idempotency-Key).")}},
                  docs_url=None, redoc_url=None)  # served offline: app.docs
    app.state.settings = settings
    app.state.auth_subscriber = AuthSubscriber(settings)  # key changes made by other API processes
    app.state.rate_limiter = rate_limiter(settings)
    app.state.job_status = job_status.JobStatusCache()
    app.state.scrape_registry = scrape_registry(settings, lambda: SessionLocal(settings.resolved_database_url))
    install_error_handlers(app)
    for router in (subjects.router, photos.router, jobs.router, templates.router, images.router, account.router,
                   admin.router):
        # Checks every /v1 route shares (unknown query parameters, NUL characters): one place, never forgotten.
        app.include_router(router, dependencies=[Depends(check_request_inputs)])
    _install_probes(app, settings)
    install_offline_docs(app)
    install_admin_dashboard(app)  # /admin: server-rendered pages over the same services
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(RequestMetricsMiddleware)
    return app


def _install_probes(app: FastAPI, settings: Settings) -> None:
    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers", response_model=dict[str, str])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Readiness: database, broker and blob storage reachable",
             responses={503: {"model": ErrorBody, "description": "A dependency is down (details say which)."}},
             response_model=dict[str, object])
    def readyz():  # noqa: ANN202
        checks = check_all(settings)  # status words only: this route is public
        if all(c == "ok" for c in checks.values()):
            return {"status": "ok", "checks": checks}
        return JSONResponse({"code": "not_ready", "message": "A dependency is unavailable.",
                             "details": {"checks": checks}}, status_code=503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse,
             description="With `LIKENESS_METRICS_TOKEN` set, only for `Authorization: Bearer <that token>`.",
             responses={401: {"model": ErrorBody, "description": "The metrics token is required."}})
    def metrics(request: Request) -> PlainTextResponse:
        if settings.metrics_token and not same_text(f"Bearer {settings.metrics_token}",
                                                    request.headers.get("authorization", "")):
            raise Unauthorized("Send the metrics token as 'Authorization: Bearer <token>'.",
                               code="metrics_token_required", headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(render(app.state.scrape_registry), media_type="text/plain; version=0.0.4")

