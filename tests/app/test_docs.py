"""The API documentation works without internet access: every asset comes from the API itself."""

from __future__ import annotations

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
