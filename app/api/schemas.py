"""API schemas (request bodies and public views), separate from the ORM models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from likeness.contract.plan import JobKind, JobState

T = TypeVar("T")


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code; switch on it.")
    message: str = Field(description="Human-readable explanation.")
    details: dict[str, Any] = Field(default_factory=dict, description="Structured context (ids, limits).")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"code": "subject_not_trained", "message": "Train this subject before generating portraits.",
         "details": {"subject_id": "3f0c9a7e5b0d4a6f9e2b1c8d7a6f5e4d"}}]})


class Page(BaseModel, Generic[T]):
    data: list[T]
    count: int = Field(description="Total matching rows (for pagination).")
    next: str | None = Field(None, description="URL of the next page (same filters and limit); null on the last.")


class ORMModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ---- subjects ----------------------------------------------------------------------------------------------

class SubjectCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, examples=["Grace"])
    class_token_override: str | None = Field(
        None, max_length=64, pattern=r"^[a-z]+$",
        description="Class word used in prompts (e.g. girl, man); by default chosen automatically with CLIP.")
    external_ref: str | None = Field(
        None, min_length=1, max_length=200,
        description="Your own reference of the end user this subject belongs to (e.g. `tg:12345`); "
                    "list a user's subjects with `GET /v1/subjects?external_ref=...`.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "Grace", "class_token_override": None, "external_ref": "user-42"}]})


class TrainedModelPublic(ORMModel):
    family: str = Field(description="The model family the subject was trained on: sd15 (512 px) or sdxl (1024 px).",
                        examples=["sdxl"])
    preset: str | None = Field(description="The model preset trained on (null for adapters older than presets).",
                               examples=["sdxl"])
    adapter_version: int = Field(description="The newest adapter's version; generations use it by default.")


class SubjectPublic(ORMModel):
    id: str
    name: str
    class_token_override: str | None
    external_ref: str | None
    model: TrainedModelPublic | None = Field(
        None, description="What the subject's newest adapter was trained on (its generations and templates use the "
                          "same family); null until a training succeeds.")
    created_at: datetime


# ---- photos ------------------------------------------------------------------------------------------------

class UploadResult(BaseModel):
    filename: str
    status: Literal["stored", "rejected"] = Field(
        description="stored: kept and waiting for intake; rejected: not kept.")
    photo_id: str | None = None
    reason_code: str | None = Field(None, description="Why a file was rejected (see the intake reason codes).")
    message: str | None = None


class DirectUploadFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field("", max_length=255)
    size_bytes: int = Field(ge=1, le=2**40, description="The exact size: the URL accepts this many bytes.")


class DirectUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"files": [{"filename": "selfie1.jpg", "size_bytes": 5242880}]}]})

    files: list[DirectUploadFile] = Field(min_length=1, max_length=30)


class DirectUploadSlot(BaseModel):
    upload_id: str
    filename: str
    url: str = Field(description="PUT the file's bytes here (exactly size_bytes of them) before expires_at.")
    method: Literal["PUT"] = "PUT"
    expires_at: datetime


class DirectUploadSlots(BaseModel):
    data: list[DirectUploadSlot]
    count: int


class ArrivedUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upload_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    filename: str = Field("", max_length=255)


class DirectUploadCompletion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uploads: list[ArrivedUpload] = Field(min_length=1, max_length=30)


class UploadResponse(BaseModel):
    subject_id: str
    stored: int
    rejected: int
    files: list[UploadResult]

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "subject_id": "3f0c9a7e5b0d4a6f9e2b1c8d7a6f5e4d", "stored": 1, "rejected": 1,
        "files": [{"filename": "selfie1.jpg", "status": "stored", "photo_id": "9a1b..."},
                  {"filename": "notes.jpg", "status": "rejected", "reason_code": "not_an_image",
                   "message": "The file is not an image."}]}]})


class PhotoPublic(ORMModel):
    id: str
    subject_id: str
    format: str
    width: int
    height: int
    status: Literal["pending", "accepted", "rejected"] = Field(
        description="pending until the training job's intake judged it.")
    reason_code: str | None
    message: str | None
    face_box: list[Any] | None
    blur: float | None
    identity_distance: float | None
    has_crop: bool = False
    created_at: datetime


# ---- jobs --------------------------------------------------------------------------------------------------

class PreviewLink(BaseModel):
    step: int = Field(description="The training snapshot the image shows (after this many steps).")
    url: str = Field(description="Signed, short-lived URL of the PNG (no API key needed; expires).")


class JobPublic(ORMModel):
    id: str
    subject_id: str
    kind: JobKind
    state: JobState
    stage: str | None
    progress: float = Field(description="0-100")
    eta_s: float | None
    error_code: str | None
    error_message: str | None
    attempts: int
    cancel_requested: bool
    request: dict[str, Any] = Field(description="The request as it runs: every default filled in.")
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    previews: list[PreviewLink] = Field(
        [], description="A train job's validation images, as they are made (before the job ends): one per kept "
                        "training snapshot. Filled on GET /v1/jobs/{id} only (the owner's signed URLs).")

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        "id": "5d2f...", "subject_id": "3f0c...", "kind": "train", "state": "running", "stage": "training:stage1",
        "progress": 42.5, "eta_s": 310.0, "error_code": None, "error_message": None, "attempts": 1,
        "cancel_requested": False, "request": {"kind": "train", "preset": "sd15", "class_token": None,
                                               "training": {"mode": "lora", "strategy": "staged"}},
        "result": None,
        "created_at": "2026-01-01T12:00:00Z", "started_at": "2026-01-01T12:00:02Z", "finished_at": None,
        "updated_at": "2026-01-01T12:03:00Z"}]})


class AdminJobPublic(JobPublic):
    client_id: str
    worker: str | None
    heartbeat_at: datetime | None


# ---- images ------------------------------------------------------------------------------------------------

class ImagePublic(ORMModel):
    id: str
    job_id: str
    subject_id: str
    rank: int = Field(description="1 = best within its job.")
    width: int
    height: int
    seed: int
    prompt: str
    negative_prompt: str | None
    style: str | None
    scores: dict[str, Any]
    face_refined: bool = Field(False, description="The face-refinement pass redrew this image's face "
                                                   "(false: the pass was off, or no face was detected).")
    has_upscaled: bool = False
    created_at: datetime


class SignedUrlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: Literal["original", "upscaled"] = "original"


class SignedUrl(BaseModel):
    url: str = Field(description="Relative URL; GET it without credentials before it expires.")
    expires_at: int = Field(description="Unix time.")


class StylePublic(BaseModel):
    name: str
    version: int
    title: str
    description: str
    aspect: str
    controlnet: dict[str, Any] | None


# ---- templates ---------------------------------------------------------------------------------------------

class TemplatePublic(BaseModel):
    """A shipped template (template mode)."""

    name: str
    version: int
    title: str
    caption: str = Field(description="Words added to the prompt after the subject's tokens.")
    width: int
    height: int
    thumbnail_url: str = Field(description="JPEG, long side 256 px (send your API key).")
    licence: str = Field(description="Every shipped template is public domain or CC0; see LICENSES.md.")


class TemplatePhotoPublic(ORMModel):
    """A photo uploaded to put the subject into."""

    id: str
    subject_id: str
    filename: str | None
    format: str
    width: int
    height: int
    status: Literal["pending", "accepted", "rejected"] = Field(
        description="pending until a worker has judged it, seconds after the upload (one person, a face).")
    reason_code: str | None = Field(description="Why it was refused: no_person, multiple_people, no_face, "
                                                "face_too_small.")
    message: str | None
    face_box: list[Any] | None
    created_at: datetime


# ---- webhooks and admin ------------------------------------------------------------------------------------

class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(max_length=2000, description="http(s) URL; null removes the webhook.",
                            examples=["https://example.com/hooks/likeness"])


class WebhookOut(BaseModel):
    url: str | None
    secret: str | None = Field(description="HMAC-SHA256 secret for X-Likeness-Signature; shown only now.")


class DeliveryPublic(ORMModel):
    id: str
    job_id: str | None
    event: str
    payload: dict[str, Any]
    attempt: int
    status_code: int | None
    error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


class ClientLimits(BaseModel):
    """Per-client limits; ``null`` means the service's default."""

    model_config = ConfigDict(extra="forbid")

    max_candidates: int = Field(64, ge=1, le=1024, description="Most candidates (n) per generation.")
    requests_per_minute: int | None = Field(None, ge=1, le=10**9, description="API requests per minute (429 above).")
    max_concurrent_jobs: int | None = Field(None, ge=1, le=10**6, description="Queued + running jobs at once.")
    max_trainings_per_day: int | None = Field(None, ge=1, le=10**6, description="Training jobs per 24 hours.")
    max_storage_bytes: int | None = Field(None, ge=0, le=2**62, description="Stored photos and images, in bytes.")
    retain_training_data_days: int | None = Field(
        None, ge=1, le=36500, description="Days uploads, crops and datasets are kept after the training that used "
                                          "them (uploads never trained on: after upload).")
    retain_images_days: int | None = Field(None, ge=1, le=36500, description="Days generated images are kept.")
    priority: float = Field(1.0, gt=0, le=1000, allow_inf_nan=False,
                            description="Fair-share weight on the workers: 2 gets twice the GPU share of 1.")


class ClientCreate(ClientLimits):
    name: str = Field(min_length=1, max_length=200)
    role: Literal["app", "bot", "admin"] = "app"


class ClientPublic(ORMModel):
    id: str
    name: str
    role: Literal["app", "bot", "admin"]
    key_hint: str | None = Field(description="The first characters of the current key.")
    max_candidates: int
    requests_per_minute: int | None
    max_concurrent_jobs: int | None
    max_trainings_per_day: int | None
    max_storage_bytes: int | None
    retain_training_data_days: int | None
    retain_images_days: int | None
    priority: float
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime


class ClientCreated(BaseModel):
    client: ClientPublic
    api_key: str = Field(description="Shown once; only its hash is stored.")
