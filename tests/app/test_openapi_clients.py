"""The OpenAPI document is good enough to generate clients from: a typed Python client
(openapi-python-client) and TypeScript types for the mobile app (openapi-typescript), with every
operation kept, no warning, sensible method names, auth, Location, ETag and next-page links."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import py_compile
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.app.helpers import create_subject

ROOT = Path(__file__).resolve().parents[2]
GENERATOR_CONFIG = ROOT / "docs" / "clients" / "openapi-python-client.yaml"
OPENAPI_TYPESCRIPT = "openapi-typescript@7.13.0"
TYPESCRIPT = "typescript@5.9.3"
METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="module")
def spec(app) -> dict:
    return app.openapi()


def _operations(spec: dict) -> dict[str, tuple[str, str, dict]]:
    return {op["operationId"]: (method.upper(), path, op)
            for path, item in spec["paths"].items() for method, op in item.items() if method in METHODS}


# ---- the document ---------------------------------------------------------------------------------------

def test_every_operation_has_a_short_unique_name_a_generator_can_use(spec):
    ids = [op["operationId"] for item in spec["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for operation_id in ids:
        assert re.fullmatch(r"[a-z][a-z0-9_]{2,30}", operation_id), operation_id
        assert not re.search(r"_(get|post|put|delete)$|_v1_", operation_id), f"FastAPI's default id: {operation_id}"
    operations = _operations(spec)
    assert operations["start_training"][:2] == ("POST", "/v1/subjects/{subject_id}/train")
    assert operations["cancel_job"][:2] == ("POST", "/v1/jobs/{job_id}/cancel")
    assert operations["admin_cancel_job"][:2] == ("POST", "/v1/admin/jobs/{job_id}/cancel")


def test_the_documents_version_is_the_packages_one():
    import likeness
    from app.main import create_app
    from core.config import Settings

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("likeness") == declared
    assert likeness.__version__ == declared
    assert create_app(Settings()).openapi()["info"]["version"] == declared


def test_every_authenticated_operation_declares_how_to_send_the_key(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["api_key"] == {**schemes["api_key"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    for operation_id, (_, _path, op) in _operations(spec).items():
        # no API key: operations (/metrics: its own token) and signed links
        if "ops" in op.get("tags", ()) or operation_id in ("signed_blob", "signed_preview"):
            assert "security" not in op, operation_id
        else:
            assert op.get("security") == [{"bearer": []}, {"api_key": []}], operation_id
            assert "401" in op["responses"], operation_id


def test_upscale_is_one_json_type_and_old_bodies_still_work(spec, client_a):
    for name in ("GenerateRequest", "TemplateRequest"):
        upscale = spec["components"]["schemas"][name]["properties"]["upscale"]
        assert upscale["enum"] == [1, 2, 4] and upscale.get("type") == "integer", upscale
    from likeness.contract.requests import GenerateRequest

    assert GenerateRequest(upscale="none").upscale == 1  # what earlier clients send
    subject_id = create_subject(client_a)
    for upscale in ("none", 1, 4):
        answer = client_a.post(f"/v1/subjects/{subject_id}/generations",
                               json={"style": "cinematic", "upscale": upscale})
        assert answer.json()["code"] == "subject_not_trained", answer.json()  # the body itself was valid
    refused = client_a.post(f"/v1/subjects/{subject_id}/generations", json={"style": "cinematic", "upscale": 3})
    assert refused.status_code == 422


def test_downloads_are_documented_as_bytes(spec):
    for operation_id in ("download_image", "signed_blob", "template_thumbnail", "download_adapter"):
        content = _operations(spec)[operation_id][2]["responses"]["200"]["content"]
        assert content and all(c["schema"] == {"type": "string", "format": "binary"} for c in content.values())


# ---- what the HTTP answers carry ------------------------------------------------------------------------

def test_created_work_answers_with_its_location(client_a):
    created = client_a.post("/v1/subjects", json={"name": "Ada"})
    assert created.status_code == 201
    assert created.headers["location"] == f"/v1/subjects/{created.json()['id']}"
    assert client_a.get(created.headers["location"]).json()["name"] == "Ada"
    replayed = client_a.post("/v1/subjects", json={"name": "Ada"}, headers={"Idempotency-Key": "loc-1"})
    again = client_a.post("/v1/subjects", json={"name": "Ada"}, headers={"Idempotency-Key": "loc-1"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == replayed.headers["location"] == f"/v1/subjects/{replayed.json()['id']}"


def test_a_job_poll_answers_304_while_the_job_is_unchanged(client_a, settings):
    from tests.app.helpers import jpeg, upload

    subject_id = create_subject(client_a)
    upload(client_a, subject_id, [("a.jpg", jpeg())])
    started = client_a.post(f"/v1/subjects/{subject_id}/train")
    assert started.status_code == 202 and started.headers["location"] == f"/v1/jobs/{started.json()['id']}"
    first = client_a.get(started.headers["location"])
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"')
    unchanged = client_a.get(started.headers["location"], headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == etag
    assert client_a.get(started.headers["location"], headers={"If-None-Match": f'"x", W/{etag}'}).status_code == 304
    client_a.post(f"/v1/jobs/{started.json()['id']}/cancel")
    changed = client_a.get(started.headers["location"], headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag and changed.json()["state"] == "canceled"


def test_pages_link_to_the_next_page(client_a):
    ref = "pages-user"
    ids = {client_a.post("/v1/subjects", json={"name": f"p{i}", "external_ref": ref}).json()["id"] for i in range(5)}
    seen, url = [], f"/v1/subjects?external_ref={ref}&limit=2"
    while url is not None:
        page = client_a.get(url).json()
        assert page["count"] == 5
        seen += [s["id"] for s in page["data"]]
        url = page["next"]
    assert sorted(seen) == sorted(ids)  # three pages, every subject once, the filter kept


# ---- generated clients --------------------------------------------------------------------------------------

def _generate_python_client(spec: dict, tmp_path: Path) -> tuple[Path, str]:
    source = tmp_path / "openapi.json"
    source.write_text(json.dumps(spec))
    out = tmp_path / "client"
    run = subprocess.run([sys.executable, "-m", "openapi_python_client", "generate", "--path", str(source),
                          "--output-path", str(out), "--meta", "none", "--config", str(GENERATOR_CONFIG)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run.stdout + run.stderr


class _ToApp(httpx.BaseTransport):
    """Sends a plain httpx client's requests to the app under test (through its TestClient)."""

    def __init__(self, http):  # noqa: ANN001
        self.http = http

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.http.request(request.method, str(request.url), headers=request.headers, content=request.read())
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def test_openapi_python_client_generates_every_operation_without_a_warning(spec, tmp_path, client_a, http,
                                                                           monkeypatch):
    pytest.importorskip("openapi_python_client", reason="pip install -c constraints.txt -e '.[test]'")
    out, log = _generate_python_client(spec, tmp_path)
    assert "warning" not in log.lower(), log
    generated = {p.stem for p in (out / "api").glob("*/*.py") if p.stem != "__init__"}
    assert generated == set(_operations(spec)), "dropped or renamed: " + str(generated ^ set(_operations(spec)))
    for path in out.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)

    # The generated client works against the API: it sends the key and reads typed answers.
    monkeypatch.syspath_prepend(str(tmp_path))
    package = importlib.import_module("client")
    create = importlib.import_module("client.api.subjects.create_subject")
    generate = importlib.import_module("client.api.jobs.start_generation")
    models = importlib.import_module("client.models")
    transport = _ToApp(http)
    api = package.AuthenticatedClient(base_url=str(http.base_url), token=client_a.key,
                                      httpx_args={"transport": transport})
    subject = create.sync(client=api, body=models.SubjectCreate(name="Typed"))
    assert isinstance(subject, models.SubjectPublic) and subject.name == "Typed"
    refused = generate.sync_detailed(subject.id, client=api, body=models.GenerateRequest(
        style="cinematic", n=2, k=1, upscale=models.GenerateRequestUpscale.VALUE_4))
    assert refused.status_code == 409 and refused.parsed.code == "subject_not_trained"
    anonymous = package.Client(base_url=str(http.base_url), httpx_args={"transport": transport})
    assert create.sync_detailed(client=anonymous, body=models.SubjectCreate(name="x")).status_code == 401


@pytest.fixture(scope="session")
def openapi_typescript(tmp_path_factory, pytestconfig) -> Path:
    """openapi-typescript and tsc from the npm registry, installed once into pytest's cache folder."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the TypeScript client check needs Node.js and npm")
    cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider: install for this run only
    folder = cache.mkdir("openapi-typescript") if cache is not None else tmp_path_factory.mktemp("openapi-typescript")
    tools = folder / "node_modules" / ".bin"
    if not (tools / "openapi-typescript").exists() or not (tools / "tsc").exists():
        install = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder),
                                  OPENAPI_TYPESCRIPT, TYPESCRIPT], capture_output=True, text=True, timeout=300)
        assert install.returncode == 0, install.stdout + install.stderr
    return tools


def test_openapi_typescript_types_every_path_and_compile(spec, tmp_path, openapi_typescript):
    (tmp_path / "openapi.json").write_text(json.dumps(spec))
    # --default-non-nullable false: a field with a default stays optional in request bodies
    run = subprocess.run([str(openapi_typescript / "openapi-typescript"), "openapi.json", "--default-non-nullable",
                          "false", "-o", "api.d.ts"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "warn" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
    types = (tmp_path / "api.d.ts").read_text()
    for path in spec["paths"]:
        assert f'"{path}": {{' in types, path
    for operation_id in _operations(spec):
        assert f"    {operation_id}: {{" in types, operation_id
    (tmp_path / "use.ts").write_text(
        'import type { operations, paths } from "./api";\n'
        'type Generate = operations["start_generation"]["requestBody"]["content"]["application/json"];\n'
        'export const body: Generate = { style: "cinematic", n: 4, k: 2, upscale: 4 };\n'
        'type Job = paths["/v1/jobs/{job_id}"]["get"]["responses"][200]["content"]["application/json"];\n'
        'export const state = (job: Job): string => job.state;\n'
        'type Subjects = operations["list_subjects"]["responses"][200]["content"]["application/json"];\n'
        'export const next = (page: Subjects): string | null | undefined => page.next;\n')
    compiled = subprocess.run([str(openapi_typescript / "tsc"), "--noEmit", "--strict", "use.ts"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
