"""Bad input gets the same clear answer everywhere: unknown body fields and query parameters are 422,
bad pagination is 422 (never the first page), an upload with nothing usable is 422 with each file's reason."""

from __future__ import annotations

import pytest

from tests.app.helpers import create_subject, upload

ID = "0" * 32
#: A minimal valid body of every JSON request (the test below fails when a new one is missing here).
MINIMAL_BODIES = {
    ("post", "/v1/subjects"): {"name": "Grace"},
    ("put", "/v1/webhook"): {"url": None},
    ("post", "/v1/images/{image_id}/url"): {"variant": "original"},
    ("post", "/v1/subjects/{subject_id}/train"): {},
    ("post", "/v1/subjects/{subject_id}/generations"): {"style": "cinematic"},
    ("post", "/v1/subjects/{subject_id}/templates"): {"template": "id_photo"},
    ("post", "/v1/admin/clients"): {"name": "app-2"},
    ("put", "/v1/admin/clients/{client_id}/limits"): {},
    ("post", "/v1/subjects/{subject_id}/photos/direct-uploads"): {"files": [{"size_bytes": 10}]},
    ("post", "/v1/subjects/{subject_id}/photos/direct-uploads/complete"): {"uploads": [{"upload_id": "0" * 32}]},
}


def _json_body_operations(app) -> set[tuple[str, str]]:  # noqa: ANN001
    spec = app.openapi()
    return {(method, path) for path, ops in spec["paths"].items() for method, op in ops.items()
            if "application/json" in op.get("requestBody", {}).get("content", {})}


def test_every_json_body_forbids_unknown_fields_in_its_schema(app):
    spec = app.openapi()
    assert _json_body_operations(app) == set(MINIMAL_BODIES)
    for method, path in MINIMAL_BODIES:
        schema = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        ref = schema.get("$ref") or next(s["$ref"] for s in schema.get("anyOf", []) if "$ref" in s)
        model = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        assert model.get("additionalProperties") is False, (method, path, ref)


@pytest.mark.parametrize("method,path", sorted(MINIMAL_BODIES))
def test_unknown_body_fields_are_rejected_the_same_way_on_every_body(admin, method, path):
    url = path.format(image_id=ID, subject_id=ID, client_id=ID)
    response = getattr(admin, method)(url, json={**MINIMAL_BODIES[(method, path)], "unexpected_field": 1})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "validation_error"
    assert {"loc": ["body", "unexpected_field"], "msg": "Extra inputs are not permitted",
            "type": "extra_forbidden"} in body["details"]["errors"]


@pytest.mark.parametrize("query", [{"cursor": "abc"}, {"page": "2"}, {"offset": "abc"}, {"offset": "-1"},
                                   {"offset": str(10**30)}, {"limit": "0"}, {"limit": "100000"}, {"limit": "1.5"}])
def test_bad_pagination_is_422_never_the_first_page(client_a, query):
    for url in ("/v1/jobs", "/v1/subjects", "/v1/webhook/deliveries"):
        response = client_a.get(url, params=query)
        assert response.status_code == 422, (url, query, response.text)
        body = response.json()
        assert body["code"] == "validation_error" and body["details"]["errors"][0]["loc"][0] == "query"


def test_unknown_query_parameter_names_the_parameter(client_a):
    response = client_a.get("/v1/jobs", params={"cursor": "abc", "state": "queued"})
    assert response.json()["details"]["errors"] == [
        {"loc": ["query", "cursor"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}]
    assert client_a.get("/v1/jobs", params={"state": "queued", "limit": 5, "offset": 0}).status_code == 200


def test_an_upload_whose_files_were_all_rejected_is_422_with_each_reason(client_a, store):
    subject_id = create_subject(client_a)
    response = upload(client_a, subject_id, [("empty.jpg", b""), ("notes.jpg", b"not a photo" * 50)])
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "all_files_rejected" and body["message"]
    assert body["details"]["stored"] == 0 and body["details"]["rejected"] == 2
    assert {f["filename"]: f["reason_code"] for f in body["details"]["files"]} == {
        "empty.jpg": "empty_file", "notes.jpg": "not_an_image"}
    assert client_a.get(f"/v1/subjects/{subject_id}/photos").json()["count"] == 0
    assert store.list(f"subjects/{subject_id}/") == []


def test_unparsable_bodies_and_nul_characters_are_422_not_400_or_500(client_a):
    garbage = client_a.post("/v1/subjects", content=b"\xd6\xa3\xff;\x80", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 422 and garbage.json()["code"] == "validation_error"
    for response in (client_a.post("/v1/subjects", json={"name": "Gr\u0000ace"}),
                     client_a.get("/v1/subjects", params={"external_ref": "user\x00-42"}),
                     client_a.get("/v1/jobs/abc%00def")):
        assert response.status_code == 422, response.text
        assert response.json()["details"]["errors"][0]["type"] == "nul_character"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("path,body", [
    ("/v1/subjects/{sid}/generations", '{"style": "cinematic", "guidance_scale": %s}'),
    ("/v1/subjects/{sid}/templates", '{"template": "id_photo", "strength": %s}'),
    ("/v1/subjects/{sid}/train", '{"steps": %s}')])
def test_non_finite_numbers_are_422_with_a_json_body(client_a, number, path, body):
    subject_id = create_subject(client_a)
    response = client_a.post(path.format(sid=subject_id), content=body % number,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["code"] == "validation_error"
    assert error["details"]["errors"][0]["loc"][0] == "body"


def test_a_non_multipart_body_to_an_upload_path_gets_the_small_limit(client_a):
    """Only multipart uploads (spooled to disk) may be large; a form-encoded or raw body is read whole."""
    subject_id = create_subject(client_a)
    for content_type in ("application/x-www-form-urlencoded", "application/octet-stream"):
        response = client_a.post(f"/v1/subjects/{subject_id}/photos", content=b"a=" + b"x" * (2 * 1024 * 1024),
                                 headers={"Content-Type": content_type})
        assert response.status_code == 413 and response.json()["code"] == "request_too_large", content_type
