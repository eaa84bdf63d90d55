"""The API documentation works without internet access: every asset comes from the API itself."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import urlparse

import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_no_external_host_and_their_assets_are_served(http, page):
    response = http.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"(https?:)?//", re.sub(r"<!--.*?-->", "", html, flags=re.S))  # no absolute URL at all
    references = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert len(references) >= 3, references  # stylesheet or spec, script, icon
    for url in references:
        parsed = urlparse(url)
        assert not parsed.scheme and not parsed.netloc, url
        asset = http.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url


def test_swagger_ui_calls_no_online_validator(http):
    assert '"validatorUrl": null' in http.get("/docs").text
    script = http.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and b"SwaggerUIBundle" in script.content


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_refuse_framing_and_foreign_scripts(http, page):
    response = http.get(page)
    policy = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in directives["script-src"] and "http" not in directives["script-src"]
    if page == "/docs":
        assert "'unsafe-eval'" not in directives["script-src"]
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
    # The page's own inline script (Swagger UI's start-up) is allowed by its hash, and only it.
    for script in re.findall(r"<script>(.*?)</script>", response.text, flags=re.S):
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in directives["script-src"]


@pytest.mark.parametrize("asset", ["/docs/assets/swagger-ui-bundle.js", "/admin/static/htmx.min.js",
                                   "/admin/static/admin.css"])
def test_static_files_are_sent_with_nosniff(http, asset):
    response = http.get(asset)
    assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
