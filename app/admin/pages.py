"""Rendering for the dashboard: the template environment, security headers and error pages.

Templates autoescape everything (a subject named ``<img src=x onerror=alert(1)>`` is text), and
every page is sent with a Content-Security-Policy that allows only this server's own scripts
and styles, so nothing inline could run even if it slipped through.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.admin import charts
from app.admin.auth import CsrfRefused, LoginRequired
from app.errors import AppError
from app.services.overview import aware
from likeness.contract.plan import ACTIVE_STATES, UNSUCCESSFUL_STATES, JobKind, JobState

log = logging.getLogger("likeness.admin")

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _dt(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    value = aware(value)
    return "–" if value is None else value.astimezone(UTC).strftime(fmt)


def _ago(value: datetime | None) -> str:
    value = aware(value)
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    if seconds < 0:
        return "just now"
    return charts.seconds_label(seconds) + " ago"


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _value(value: Any) -> str:
    return getattr(value, "value", value)


def _score(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)


env = Environment(loader=PackageLoader("app.admin", "templates"), autoescape=True, undefined=StrictUndefined,
                  trim_blocks=True, lstrip_blocks=True)
env.filters.update(dt=_dt, ago=_ago, human_bytes=_bytes, pretty=_pretty, value=_value, seconds=charts.seconds_label,
                   score=_score)
env.globals.update(charts=charts, JobState=JobState, JobKind=JobKind, ACTIVE_STATES=ACTIVE_STATES,
                   UNSUCCESSFUL_STATES=UNSUCCESSFUL_STATES, STATE_COLOURS=charts.STATE_COLOURS)


def render(request: Request, template: str, status: int = 200, headers: dict[str, str] | None = None,
           **context: Any) -> HTMLResponse:
    context.setdefault("csrf", getattr(request.state, "admin_csrf", None))
    context.setdefault("notice", None)
    context.setdefault("nav", None)
    if (session := getattr(request.state, "admin_session", None)) is not None:
        context.setdefault("admin", session)
    html = env.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = "/admin/login" + (f"?next={_quote(target)}" if target not in ("/admin", "/admin/") else "")
    if is_htmx(request):  # a poll or a swap: send the whole page to the login form
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def safe_next(target: str | None) -> str:
    """Where to go after the login: a dashboard path only (never another site)."""
    if target and target.startswith("/admin") and not target.startswith("//") and "\\" not in target:
        return target
    return "/admin"


def error_page(request: Request, status: int, title: str, message: str, code: str | None = None,
               details: dict[str, Any] | None = None) -> HTMLResponse:
    return render(request, "error.html", status=status, title=title, message=message, code=code,
                  details=details or {})


class AdminRoute(APIRoute):
    """Dashboard routes answer with pages, never JSON or a stack trace: no session -> the login form,
    a missing CSRF token -> 403, a domain error -> its message and code, anything else -> a page with
    a request id (the traceback goes to the log only)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                return to_login(request)
            except CsrfRefused:
                return error_page(request, 403, "Request refused",
                                  "This form is missing its security token or it has expired. "
                                  "Go back, reload the page and try again.", "csrf_failed")
            except AppError as exc:
                return error_page(request, exc.status, "That did not work", exc.message, exc.code, exc.details)
            except RequestValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}"
                                     for e in exc.errors())
                return error_page(request, 422, "Invalid request", problems, "validation_error")
            except StarletteHTTPException as exc:
                return error_page(request, exc.status_code, "Request refused", str(exc.detail), "http_error")
            except Exception:
                request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
                log.exception("admin page failed (request_id=%s) on %s %s", request_id, request.method,
                              request.url.path)
                return error_page(request, 500, "Something went wrong",
                                  "The dashboard could not show this page. The error is in the server log.",
                                  "internal_error", {"request_id": request_id})

        return route
