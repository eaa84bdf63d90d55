"""Every ``/v1`` request the client makes, built once for the sync and the async client (no I/O here).

:data:`ENDPOINTS` is the client's whole view of the API: method, path template, query
parameters, request body and response model per operation. A test compares it with the
app's OpenAPI document, so a renamed route or field fails CI rather than a user.
"""

from __future__ import annotations

import mimetypes
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from likeness.client import errors
from likeness.client.models import (
    Image,
    Job,
    Page,
    Photo,
    SignedUrl,
    SignedUrlRequest,
    Style,
    Subject,
    SubjectCreate,
    UploadResult,
    Webhook,
    WebhookIn,
)
from likeness.contract.requests import GenerateRequest, TrainRequest

__all__ = ["ENDPOINTS", "Call", "Endpoint", "FileLike"]

#: A photo to upload: a path, or ``(filename, bytes)`` / ``(filename, bytes, content_type)``.
FileLike = str | Path | tuple[str, bytes] | tuple[str, bytes, str]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # the OpenAPI path template
    response: Any = None  # model (or Page[model]) of the JSON answer; None: bytes or no body
    body: type[BaseModel] | None = None  # JSON request body model
    query: tuple[str, ...] = ()
    multipart: str | None = None  # form field of uploaded files
    idempotency_key: bool = False  # the client sends one Idempotency-Key per logical call
    safe_to_retry: bool = False  # same outcome if sent twice (GET, DELETE, pure POSTs)


ENDPOINTS: dict[str, Endpoint] = {
    "create_subject": Endpoint("POST", "/v1/subjects", Subject, body=SubjectCreate, idempotency_key=True),
    "list_subjects": Endpoint("GET", "/v1/subjects", Page[Subject], query=("external_ref", "limit", "offset"),
                              safe_to_retry=True),
    "get_subject": Endpoint("GET", "/v1/subjects/{subject_id}", Subject, safe_to_retry=True),
    "delete_subject": Endpoint("DELETE", "/v1/subjects/{subject_id}", None, safe_to_retry=True),
    "upload_photos": Endpoint("POST", "/v1/subjects/{subject_id}/photos", UploadResult, multipart="files",
                              idempotency_key=True),
    "list_photos": Endpoint("GET", "/v1/subjects/{subject_id}/photos", Page[Photo], safe_to_retry=True),
    "train": Endpoint("POST", "/v1/subjects/{subject_id}/train", Job, body=TrainRequest, idempotency_key=True),
    "generate": Endpoint("POST", "/v1/subjects/{subject_id}/generations", Job, body=GenerateRequest,
                         idempotency_key=True),
    "get_job": Endpoint("GET", "/v1/jobs/{job_id}", Job, safe_to_retry=True),
    "list_jobs": Endpoint("GET", "/v1/jobs", Page[Job], query=("state", "subject_id", "kind", "limit", "offset"),
                          safe_to_retry=True),
    "cancel_job": Endpoint("POST", "/v1/jobs/{job_id}/cancel", Job),
    "list_images": Endpoint("GET", "/v1/subjects/{subject_id}/images", Page[Image],
                            query=("job_id", "limit", "offset"), safe_to_retry=True),
    "download_image": Endpoint("GET", "/v1/images/{image_id}/download", None, query=("variant",),
                               safe_to_retry=True),
    "download_preview": Endpoint("GET", "/v1/previews/signed", None,
                                 query=("client", "subject", "job", "step", "exp", "sig"), safe_to_retry=True),
    "image_url": Endpoint("POST", "/v1/images/{image_id}/url", SignedUrl, body=SignedUrlRequest, safe_to_retry=True),
    "download_adapter": Endpoint("GET", "/v1/subjects/{subject_id}/adapter", None, query=("format", "version"),
                                 safe_to_retry=True),
    "list_styles": Endpoint("GET", "/v1/styles", Page[Style], safe_to_retry=True),
    "set_webhook": Endpoint("PUT", "/v1/webhook", Webhook, body=WebhookIn, safe_to_retry=True),
}


@dataclass
class Call:
    """One logical call: the same request (same Idempotency-Key) on every retry."""

    name: str
    path_params: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    body: BaseModel | None = None
    files: list[tuple[str, bytes, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        endpoint = self.endpoint
        unknown = set(self.params or {}) - set(endpoint.query)
        assert not unknown, f"{self.name}: query parameters {unknown} are not in ENDPOINTS"
        if endpoint.idempotency_key:
            self.headers.setdefault("Idempotency-Key", uuid.uuid4().hex)

    @property
    def endpoint(self) -> Endpoint:
        return ENDPOINTS[self.name]

    @property
    def path(self) -> str:
        return self.endpoint.path.format(**{k: _segment(v) for k, v in self.path_params.items()})

    @property
    def retryable(self) -> bool:
        return self.endpoint.safe_to_retry or "Idempotency-Key" in self.headers

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": self.headers}
        if self.params:
            kwargs["params"] = {k: (v.value if hasattr(v, "value") else v) for k, v in self.params.items()
                                if v is not None}
        if self.body is not None:
            kwargs["json"] = self.body.model_dump(mode="json", exclude_unset=True)
        if self.files is not None:
            kwargs["files"] = [(self.endpoint.multipart, f) for f in self.files]
        return kwargs

    def parse(self, response: httpx.Response) -> Any:
        """The answer as the endpoint's model (bytes when it has none); errors raise :class:`LikenessError`."""
        if response.status_code >= 400:
            raise errors.from_response(response)
        model = self.endpoint.response
        if model is None:
            return response.content
        try:
            return _adapter(model).validate_json(response.content)
        except ValidationError as exc:
            raise errors.LikenessError(errors.INVALID_RESPONSE, f"The API's answer to {self.name} does not match "
                                       f"what this client expects: {exc.errors()[:3]}",
                                       status=response.status_code) from None


_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(model: Any) -> TypeAdapter:
    if model not in _ADAPTERS:
        _ADAPTERS[model] = TypeAdapter(model)
    return _ADAPTERS[model]


def _segment(value: str) -> str:
    value = str(value)
    if not value or "/" in value or value in (".", ".."):
        raise errors.LikenessError("invalid_id", f"{value!r} is not a valid id.")
    return quote(value, safe="")


def read_files(files: Iterable[FileLike]) -> list[tuple[str, bytes, str]]:
    """Files to upload as ``(filename, bytes, content type)`` (read once: retries resend the same bytes)."""
    out = []
    for item in files:
        if isinstance(item, str | Path):
            path = Path(item)
            name, data = path.name, path.read_bytes()
            content_type = None
        elif len(item) == 3:
            name, data, content_type = item  # type: ignore[misc]
        else:
            name, data = item  # type: ignore[misc]
            content_type = None
        out.append((name, data, content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"))
    if not out:
        raise errors.LikenessError("invalid_file_count", "Give at least one file to upload.")
    return out


# ---- one builder per operation (shared by Client and AsyncClient) ------------------------------------------

def create_subject(name: str, external_ref: str | None, class_token_override: str | None) -> Call:
    body = SubjectCreate(name=name, external_ref=external_ref, class_token_override=class_token_override)
    return Call("create_subject", body=body)


def train(subject_id: str, request: TrainRequest | None) -> Call:
    return Call("train", {"subject_id": subject_id}, body=request or TrainRequest())


def generate(subject_id: str, request: GenerateRequest) -> Call:
    return Call("generate", {"subject_id": subject_id}, body=request)


def upload_photos(subject_id: str, files: Iterable[FileLike]) -> Call:
    return Call("upload_photos", {"subject_id": subject_id}, files=read_files(files))


def download_preview(url: str) -> Call:
    """A preview's signed URL (``Job.previews``) as a call: its query is the signature."""
    return Call("download_preview", params=dict(parse_qsl(urlsplit(url).query)))


def image_url(image_id: str, variant: str) -> Call:
    return Call("image_url", {"image_id": image_id}, body=SignedUrlRequest(variant=variant))


def filename_from(response: httpx.Response, default: str) -> str:
    """The file name of a download from its Content-Disposition (never a path)."""
    disposition = response.headers.get("content-disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return Path(value.strip('"')).name or default
    return default

