from __future__ import annotations

import subprocess
import sys

SIGNED_LINK_PATHS = ("/v1/blobs/signed", "/v1/previews/signed")


def test_missing_and_wrong_key_are_401_with_error_envelope(http):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}, {"Authorization": "Basic x"}):
        response = http.get("/v1/subjects", headers=headers)
        assert response.status_code == 401
        body = response.json()
        assert body["code"] == "unauthorized" and body["message"] and body["details"] == {}


def test_both_key_headers_authenticate(http, client_a):
    assert http.get("/v1/subjects", headers={"Authorization": f"Bearer {client_a.key}"}).status_code == 200
    assert http.get("/v1/subjects", headers={"X-API-Key": client_a.key}).status_code == 200


def test_admin_routes_need_admin_role(client_a, admin):
    assert client_a.get("/v1/admin/jobs").status_code == 403
    assert client_a.post("/v1/admin/clients", json={"name": "x"}).json()["code"] == "forbidden"
    created = admin.post("/v1/admin/clients", json={"name": "bot-1", "role": "bot", "max_candidates": 8})
    assert created.status_code == 201
    key = created.json()["api_key"]
    me = admin.http.get("/v1/subjects", headers={"X-API-Key": key})
    assert me.status_code == 200 and me.json() == {"data": [], "count": 0, "next": None}
    assert admin.get("/v1/admin/jobs").status_code == 200


def test_validation_errors_use_the_envelope(client_a):
    response = client_a.post("/v1/subjects", json={"name": ""})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error" and body["details"]["errors"][0]["loc"][-1] == "name"


def test_unknown_route_uses_the_envelope(client_a):
    response = client_a.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_unhandled_error_is_500_without_traceback(app, http, client_a, monkeypatch):
    from app.services import subjects

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(subjects, "list_subjects", boom)
    response = client_a.get("/v1/subjects")
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal_error" and body["details"]["request_id"]
    assert "Traceback" not in response.text and "secret internal detail" not in response.text


def test_app_package_never_imports_torch():
    code = ("import app.main, likeness_cli.main, sys; app.main.create_app(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_openapi_documents_every_route_with_summary_and_error_schema(app):
    spec = app.openapi()
    assert "ErrorBody" in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            assert op.get("summary"), f"{method} {path} has no summary"
            if path.startswith("/v1/") and path not in SIGNED_LINK_PATHS:  # a signed link needs no key: no 401
                err = op["responses"].get("401") or {}
                assert err.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "").endswith(
                    "ErrorBody"), f"{method} {path} does not document its errors"


def test_bootstrap_admin_key_creates_an_admin_at_start(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    bootstrap = settings.model_copy(update={"bootstrap_admin_key": "lk_bootstrap-" + "x" * 20})
    for _ in range(2):  # starting twice must not create a second client
        with TestClient(create_app(bootstrap)) as http:
            response = http.get("/v1/admin/jobs", headers={"X-API-Key": bootstrap.bootstrap_admin_key})
            assert response.status_code == 200
    from sqlalchemy import func, select

    from app.services.clients import hash_key
    from core.db.models import Client
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        count = session.scalar(select(func.count()).select_from(Client)
                               .where(Client.api_key_hash == hash_key(bootstrap.bootstrap_admin_key)))
    assert count == 1
