"""API schemas (request bodies and public views), separate from the ORM models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

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


class ORMModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ---- subjects ----------------------------------------------------------------------------------------------

class SubjectCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, examples=["Grace"])
    class_token_override: str | None = Field(
        None, max_length=64, pattern=r"^[a-z]+$",
        description="Class word used in prompts (e.g. girl, man); by default chosen automatically with CLIP.")

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "Grace", "class_token_override": None}]})


class SubjectPublic(ORMModel):
    id: str
    name: str
    class_token_override: str | None
    created_at: datetime


# ---- photos ------------------------------------------------------------------------------------------------

class UploadResult(BaseModel):
    filename: str
    status: Literal["stored", "rejected"] = Field(description="stored: kept and waiting for intake; rejected: not kept.")
    photo_id: str | None = None
    reason_code: str | None = Field(None, description="Why a file was rejected (see the intake reason codes).")
    message: str | None = None


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

class TrainRequest(BaseModel):
    mode: Literal["lora", "full"] = Field("lora", description="LoRA adapter (small, default) or full fine-tune.")
    steps: int | None = Field(None, ge=10, le=5000, description="Total training steps; default from the preset.")
    class_token: str | None = Field(None, max_length=64, pattern=r"^[a-z]+$",
                                    description="Override the automatically chosen class word.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"mode": "lora", "steps": 800}]})


class ControlNetIn(BaseModel):
    kind: Literal["pose", "depth"]
    template: str = Field(description="Name of a shipped template image (GET /v1/styles lists them per style).")
    scale: float = Field(1.0, ge=0.0, le=2.0)


class GenerateRequest(BaseModel):
    style: str | None = Field(None, description="A style pack name (GET /v1/styles).", examples=["cinematic"])
    prompts: list[str] | None = Field(None, max_length=16,
                                      description="Custom prompt templates using {instance} and optionally {class}.")
    negative_prompt: str | None = Field(None, max_length=1000)
    n: int = Field(8, description="Candidates to generate.")
    k: int = Field(4, description="Best candidates to keep (k <= n).")
    aspect: str | None = Field(None, description="1:1, 9:16 or 4:5; default: the style's.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str = "euler"
    controlnet: ControlNetIn | None = Field(None, description="Override the style's ControlNet template.")
    no_controlnet: bool = Field(False, description="Disable the style's ControlNet.")
    upscale: Literal[2, 4, "none"] = 2
    ranking: str = "aesthetic"

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"style": "cinematic", "n": 8, "k": 4, "aspect": "4:5", "seed": 42, "upscale": 2},
        {"prompts": ["a watercolor portrait of {instance} {class}"], "n": 4, "k": 2, "upscale": "none"}]})


class JobPublic(ORMModel):
    id: str
    subject_id: str
    kind: Literal["train", "generate"]
    state: Literal["queued", "running", "succeeded", "failed", "canceled"]
    stage: str | None
    progress: float = Field(description="0-100")
    eta_s: float | None
    error_code: str | None
    error_message: str | None
    attempts: int
    cancel_requested: bool
    request: dict[str, Any]
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        "id": "5d2f...", "subject_id": "3f0c...", "kind": "train", "state": "running", "stage": "training:stage1",
        "progress": 42.5, "eta_s": 310.0, "error_code": None, "error_message": None, "attempts": 1,
        "cancel_requested": False, "request": {"mode": "lora"}, "result": None,
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
    has_upscaled: bool = False
    created_at: datetime


class SignedUrlRequest(BaseModel):
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


# ---- webhooks and admin ------------------------------------------------------------------------------------

class WebhookIn(BaseModel):
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


class ClientCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    role: Literal["app", "bot", "admin"] = "app"
    max_candidates: int = Field(64, ge=1, le=1024)


class ClientPublic(ORMModel):
    id: str
    name: str
    role: Literal["app", "bot", "admin"]
    max_candidates: int
    created_at: datetime


class ClientCreated(BaseModel):
    client: ClientPublic
    api_key: str = Field(description="Shown once; only its hash is stored.")
