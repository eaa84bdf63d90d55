"""Response headers that keep browsers from misreading or framing what the API serves.

Static files (the dashboard's and the docs' assets) are sent with ``nosniff``; the documentation
pages (``/docs``, ``/redoc``) with a Content-Security-Policy that allows only this server's
scripts (plus the one inline script Swagger UI's page starts with, by its hash) and no framing.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

NOSNIFF = {"X-Content-Type-Options": "nosniff"}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


class NoSniffStaticFiles(StaticFiles):
    """``StaticFiles`` whose every answer says ``X-Content-Type-Options: nosniff``."""

    async def get_response(self, path: str, scope: Scope):  # noqa: ANN201
        response = await super().get_response(path, scope)
        response.headers.update(NOSNIFF)
        return response


def docs_policy(html: str, *, compiles_code: bool = False) -> str:
    """The CSP of a documentation page: own scripts and the page's own inline scripts (by hash), inline
    styles (Swagger UI and ReDoc set them), workers from blobs (ReDoc), no framing, no plugins.

    ``compiles_code``: the page's script builds functions at run time (ReDoc's bundled JSON-schema
    validator, ajv, does), so ``'unsafe-eval'`` is allowed for it; still no inline or foreign script.
    """
    sources = ["'self'", *(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                           for s in _INLINE_SCRIPT.findall(html))]
    if compiles_code:
        sources.append("'unsafe-eval'")
    return (f"default-src 'none'; script-src {' '.join(sources)}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'; object-src 'none'")


def protect_docs_page(page: HTMLResponse, *, compiles_code: bool = False) -> HTMLResponse:
    """``page`` with the documentation CSP (:func:`docs_policy`), frame refusal and ``nosniff``."""
    policy = docs_policy(page.body.decode(), compiles_code=compiles_code)
    page.headers.update({"Content-Security-Policy": policy, "X-Frame-Options": "DENY",
                         "Referrer-Policy": "no-referrer", **NOSNIFF})
    return page
