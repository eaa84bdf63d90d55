"""What the API answers, as the client reads it (kept in step with the OpenAPI document by a test).

Unknown fields are ignored, so a newer API never breaks an older client; a field the client
declares is checked against the API's schema (``tests/likeness/test_client_openapi.py``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from likeness.contract.plan import TERMINAL_STATES, JobKind, JobState

T = TypeVar("T")


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Page(_Answer, Generic[T]):
    data: list[T]
    count: int
    next: str | None = None  # the next page's URL; None on the last


class TrainedModel(_Answer):
    """What a subject's newest adapter was trained on."""

    family: str  # sd15 | sdxl
    preset: str | None = None
    adapter_version: int


class Subject(_Answer):
    id: str
    name: str
    class_token_override: str | None = None
    external_ref: str | None = None
    model: TrainedModel | None = None  # None until a training succeeds
    created_at: datetime


class FileVerdict(_Answer):
    """One uploaded file: ``stored`` (kept, judged by the training's intake) or ``rejected`` (why)."""

    filename: str
    status: Literal["stored", "rejected"]
    photo_id: str | None = None
    reason_code: str | None = None
    message: str | None = None


class UploadResult(_Answer):
    subject_id: str
    stored: int
    rejected: int
    files: list[FileVerdict]


class Photo(_Answer):
    id: str
    subject_id: str
    format: str
    width: int
    height: int
    status: Literal["pending", "accepted", "rejected"]
    reason_code: str | None = None
    message: str | None = None
    face_box: list[Any] | None = None
    has_crop: bool = False
    created_at: datetime


class Preview(_Answer):
    """A validation image a train job showed while it ran: the snapshot after ``step`` steps."""

    step: int
    url: str  # signed, relative to the API's base URL, short-lived (download with download_preview)


class Job(_Answer):
    id: str
    subject_id: str
    kind: JobKind
    state: JobState
    stage: str | None = None
    progress: float = Field(description="0-100")
    eta_s: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    request: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    previews: list[Preview] = Field(default_factory=list)  # a train job's, as they are made

    @property
    def done(self) -> bool:
        """The job reached a final state (succeeded, failed or canceled)."""
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == JobState.SUCCEEDED


class Image(_Answer):
    id: str
    job_id: str
    subject_id: str
    rank: int
    width: int
    height: int
    seed: int
    prompt: str
    style: str | None = None
    scores: dict[str, Any] = Field(default_factory=dict)
    face_refined: bool = False  # the face-refinement pass redrew this image's face
    has_upscaled: bool = False
    created_at: datetime


class SignedUrl(_Answer):
    url: str = Field(description="Absolute once returned by the client (the API sends it relative).")
    expires_at: int


class Style(_Answer):
    name: str
    version: int
    title: str
    description: str
    aspect: str
    controlnet: dict[str, Any] | None = None


class Webhook(_Answer):
    url: str | None
    secret: str | None = None


# ---- request bodies the API defines outside the job contract ----------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubjectCreate(_Body):
    name: str
    class_token_override: str | None = None
    external_ref: str | None = None


class WebhookIn(_Body):
    url: str | None


class SignedUrlRequest(_Body):
    variant: Literal["original", "upscaled"] = "original"
