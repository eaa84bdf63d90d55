"""The client is kept in step with the API: every route it calls and every field it reads or sends
is compared with the app's own OpenAPI document (built here, no server needed)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from pydantic import TypeAdapter

from likeness.client._calls import ENDPOINTS, Endpoint


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict[str, Any]:
    from app.main import create_app
    from core.config import Settings

    return create_app(Settings(data_dir=tmp_path_factory.mktemp("openapi"))).openapi()


# ---- the checker ------------------------------------------------------------------------------------------

def _resolve(schema: dict, defs: dict) -> dict:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _variants(schema: dict, defs: dict) -> list[dict]:
    schema = _resolve(schema, defs)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return [v for sub in schema[key] for v in _variants(sub, defs)]
    if len(schema.get("allOf", ())) == 1:
        return _variants(schema["allOf"][0], defs)
    return [schema]


def _kind(schema: dict) -> str:
    if "properties" in schema:
        return "object"
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return {str: "string", int: "integer", bool: "boolean", type(None): "null"}.get(type(values[0]), "any")
    kind = schema.get("type", "any")
    return kind if isinstance(kind, str) else "any"


def _accepts(reader: dict, value: dict) -> bool:
    """Whether a reader schema variant takes values of the other variant's kind."""
    r, v = _kind(reader), _kind(value)
    return r == "any" or r == v or (r == "number" and v == "integer") or (r == "object" and v == "object")


def compare(reader: dict, writer: dict, rdefs: dict, wdefs: dict, where: str, *, sending: bool = False) -> list[str]:
    """Problems when values described by ``writer`` are read by code expecting ``reader``.

    Reading an answer, every field the reader (the client) declares must be in the writer's
    schema; sending a body, every field the writer (the client) sends must be in the reader's.
    """
    problems: list[str] = []
    rvars, wvars = _variants(reader, rdefs), _variants(writer, wdefs)
    for w in wvars:
        matches = [r for r in rvars if _accepts(r, w)]
        if not matches:
            problems.append(f"{where}: sends {_kind(w)}, read as {sorted({_kind(r) for r in rvars})}")
            continue
        r = matches[0]
        if "enum" in r and ("enum" in w or "const" in w):
            extra = set(w.get("enum", [w.get("const")])) - set(r["enum"])
            if extra:
                problems.append(f"{where}: values {sorted(map(str, extra))} are not known to the reader")
        if _kind(w) == "array" and "items" in r and "items" in w:
            problems += compare(r["items"], w["items"], rdefs, wdefs, f"{where}[]", sending=sending)
        if "properties" in r and "properties" in w:
            names = w["properties"] if sending else r["properties"]
            for name in names:
                if name not in r["properties"] or name not in w["properties"]:
                    side = "the API's schema" if sending else "the API's answer"
                    problems.append(f"{where}.{name}: not in {side}")
                    continue
                if name in r.get("required", ()) and name not in w.get("required", ()) and "default" not in \
                        w["properties"][name]:
                    problems.append(f"{where}.{name}: required by the reader, optional for the writer")
                problems += compare(r["properties"][name], w["properties"][name], rdefs, wdefs, f"{where}.{name}",
                                    sending=sending)
    return problems


def _schema(model: Any) -> tuple[dict, dict]:
    schema = TypeAdapter(model).json_schema(ref_template="#/$defs/{model}")
    return schema, schema.get("$defs", {})


def endpoint_problems(spec: dict, name: str, endpoint: Endpoint) -> list[str]:
    defs = spec["components"]["schemas"]
    operation = spec["paths"].get(endpoint.path, {}).get(endpoint.method.lower())
    if operation is None:
        return [f"{name}: {endpoint.method} {endpoint.path} is not in the API"]
    problems = []
    params = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
    for query in endpoint.query:
        if ("query", query) not in params:
            problems.append(f"{name}: query parameter {query!r} is not in the API")
    for path_param in re.findall(r"{(\w+)}", endpoint.path):
        if ("path", path_param) not in params:
            problems.append(f"{name}: path parameter {path_param!r} is not in the API")
    if endpoint.idempotency_key and ("header", "Idempotency-Key") not in params:
        problems.append(f"{name}: the API takes no Idempotency-Key")
    body = operation.get("requestBody", {}).get("content", {})
    if endpoint.body is not None:
        if "application/json" not in body:
            problems.append(f"{name}: the API takes no JSON body")
        else:
            client, cdefs = _schema(endpoint.body)  # the client writes, the API reads
            problems += compare(body["application/json"]["schema"], client, defs, cdefs, f"{name} body",
                                sending=True)
            server = _resolve(body["application/json"]["schema"], defs)
            for required in server.get("required", ()):
                if required not in client.get("properties", {}):
                    problems.append(f"{name} body.{required}: required by the API, never sent")
    if endpoint.multipart is not None:
        form = _resolve(body.get("multipart/form-data", {}).get("schema", {}), defs)
        if endpoint.multipart not in form.get("properties", {}):
            problems.append(f"{name}: the API takes no multipart field {endpoint.multipart!r}")
    success = {status: answer for status, answer in operation["responses"].items() if status.startswith("2")}
    if not success:
        problems.append(f"{name}: the API documents no success answer")
    elif endpoint.response is not None:
        json_answers = [a["content"]["application/json"]["schema"] for a in success.values()
                        if "application/json" in a.get("content", {})]
        if not json_answers:
            problems.append(f"{name}: the API's answer is not JSON")
        else:
            client, cdefs = _schema(endpoint.response)  # the API writes, the client reads
            problems += compare(client, json_answers[0], cdefs, defs, f"{name} answer")
    return problems


# ---- the tests ------------------------------------------------------------------------------------------

def test_every_route_and_field_the_client_uses_matches_the_openapi_document(spec):
    problems = [p for name, endpoint in ENDPOINTS.items() for p in endpoint_problems(spec, name, endpoint)]
    assert problems == []


def test_the_checker_catches_drift(spec):
    """The comparison above is not vacuous: each kind of drift a server change could cause is reported."""
    drifted = copy.deepcopy(spec)
    schemas = drifted["components"]["schemas"]
    schemas["JobPublic"]["properties"]["phase"] = schemas["JobPublic"]["properties"].pop("stage")  # renamed field
    schemas["JobState"]["enum"].append("paused")  # a state the client does not know
    schemas["SubjectPublic"]["properties"]["name"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    schemas["SubjectPublic"]["required"].remove("name")  # may now be missing
    schemas["ImagePublic"]["properties"]["rank"] = {"type": "string"}  # changed type
    del drifted["paths"]["/v1/styles"]  # removed route
    drifted["paths"]["/v1/jobs"]["get"]["parameters"] = [
        p for p in drifted["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] != "subject_id"]
    schemas["SubjectCreate"]["properties"].pop("external_ref")  # body field the client sends
    schemas["UploadResult"]["properties"]["verdict"] = schemas["UploadResult"]["properties"].pop("status")

    problems = "\n".join(p for name, endpoint in ENDPOINTS.items() for p in endpoint_problems(drifted, name, endpoint))
    for expected in ("get_job answer.stage", "values ['paused']", "create_subject answer.name",
                     "list_images answer.data[].rank", "list_styles: GET /v1/styles is not in the API",
                     "list_jobs: query parameter 'subject_id'", "create_subject body.external_ref",
                     "upload_photos answer.files[].status"):
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"


def test_the_client_uses_the_contracts_request_models():
    from likeness.contract.requests import GenerateRequest, TrainRequest

    assert ENDPOINTS["train"].body is TrainRequest and ENDPOINTS["generate"].body is GenerateRequest
