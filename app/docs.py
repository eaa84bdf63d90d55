"""``/docs`` (Swagger UI) and ``/redoc`` served with no CDN: the assets come from the
``fastapi-offline`` package (Swagger UI and ReDoc bundles) and are served by the API itself, so
the documentation works on a machine without internet access. Swagger UI's online validator
and ReDoc's web fonts are turned off for the same reason."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from app.security_headers import NoSniffStaticFiles, protect_docs_page

ASSETS_PATH = "/docs/assets"


def install_offline_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets (create the app with ``docs_url=None, redoc_url=None``)."""
    app.mount(ASSETS_PATH, NoSniffStaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - docs",
                                   swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})
        return protect_docs_page(page)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - reference",
                              redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png", with_google_fonts=False)
        return protect_docs_page(page, compiles_code=True)  # ReDoc's schema validator (ajv) compiles code
