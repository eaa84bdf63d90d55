"""The admin dashboard at ``/admin``: served by the API process, rendered on the server.

Jinja2 templates, htmx (vendored under ``static/``, no CDN, no build step) for the parts that
update live, charts as inline SVG drawn on the server. Mounted by :func:`install`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from app.admin.routes import router
from app.security_headers import NoSniffStaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app`` (static files first: the pages' catch-all comes last)."""
    app.mount("/admin/static", NoSniffStaticFiles(directory=STATIC_DIR), name="admin-static")
    app.include_router(router)
