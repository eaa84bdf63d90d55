"""What a job of each kind produces, as the worker stores it on the job and everyone reads it back.

The counterpart of :mod:`likeness.contract.requests`: one result model per job kind, written by
the phases (``worker/phases.py``, through either edge: the service's database or a local run's
``report.json``) and read through :func:`read_result` by the API, the dashboard and the retention
purge instead of by string keys. Each phase fills in its own part (a train job's ``intake``, then
its ``training`` and ``adapter``); parts not reached yet are None.

Torch-free: the API imports this module.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from likeness.contract.plan import JobKind


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- train --------------------------------------------------------------------------------------------------


class IntakeSummary(_Part):
    """What intake made of the subject's photos."""

    accepted: int
    rejected: int
    class_token: str
    class_scores: dict[str, float]  # mean CLIP distance photo<->word; the chosen word has the lowest
    checks: dict[str, str] = {}


class TrainingSummary(BaseModel):
    """A finished training: its steps, loss curve and the trainer's own measurements (timings in
    seconds such as ``load_s`` or ``train_s``, kept as the trainer reports them)."""

    model_config = ConfigDict(extra="allow")

    steps: int
    final_loss: float | None = None
    steps_per_s: float | None = None
    stages: dict[str, int] = {}  # steps per training stage
    loss_curve: list[list[float]] = []  # [step, loss], thinned to a few hundred points


class AdapterRef(_Part):
    id: str
    version: int


class Resumed(_Part):
    """A training that resumed from a checkpoint another attempt left."""

    from_step: int
    attempt: int
    message: str = ""


class CheckpointCandidate(_Part):
    """One training snapshot's validation scores (None: not measurable, e.g. no face in the images)."""

    step: int
    identity: float | None = None  # stored results leave a None out
    text_alignment: float | None = None


class CheckpointSelection(_Part):
    """Which training snapshot the subject's adapter is (``pipelines.training.selection``'s rule)."""

    selected_step: int
    candidates: list[CheckpointCandidate]


class TrainingPreview(_Part):
    """A validation image rendered while the job runs (``GET /v1/jobs/{id}`` signs a URL for it)."""

    step: int


class HandedBack(_Part):
    """The job went back to the queue when its worker shut down (SIGTERM: a spot reclaim, a pod eviction)."""

    worker: str
    at: str  # ISO time
    checkpoint_step: int | None = None  # the step its training was checkpointed at (None: not training)


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_details: dict[str, Any] | None = None  # a failed job: what the error code refers to
    preempted: HandedBack | None = None  # the last time it was handed back (worker.preemption)

    def stored(self) -> dict[str, Any]:
        """The JSON merged into the job's ``result`` (parts not filled in are left out)."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"kind"})


class TrainResult(_Result):
    kind: Literal["train"] = "train"
    intake: IntakeSummary | None = None
    training: TrainingSummary | None = None
    adapter: AdapterRef | None = None
    resumed: Resumed | None = None
    checkpoint_selection: CheckpointSelection | None = None
    previews: list[TrainingPreview] | None = None  # in the order they were made
    dataset_purged_at: str | None = None  # retention deleted the training's dataset (ISO time)


# ---- generate / template -----------------------------------------------------------------------------------


class CandidateScore(_Part):
    """One generated candidate; rank 0: not delivered."""

    seed: int
    rank: int
    faces: int
    flagged: bool
    face_refined: bool = False  # the face-refinement pass re-rendered its face
    scores: dict[str, float | None]  # None: a score that could not be computed (identity without reference photos)


class GenerateResult(_Result):
    kind: Literal["generate"] = "generate"
    images: int | None = None  # images delivered
    adapter_id: str | None = None
    candidates: list[CandidateScore] | None = None


class TemplatePlacement(_Part):
    """Where the subject went in the template: the template used, its face and the redrawn region."""

    kind: Literal["shipped", "upload"]
    name: str | None = None
    version: int | None = None
    photo_id: str | None = None
    face_box: list[float] | None = None
    mask_box: list[float] | None = None


class TemplateResult(GenerateResult):
    kind: Literal["template"] = "template"  # type: ignore[assignment]
    template: TemplatePlacement | None = None


JobResult = TrainResult | GenerateResult | TemplateResult

RESULT_MODELS: dict[JobKind, type[TrainResult] | type[GenerateResult] | type[TemplateResult]] = {
    JobKind.TRAIN: TrainResult, JobKind.GENERATE: GenerateResult, JobKind.TEMPLATE: TemplateResult}


def read_result(kind: str, stored: dict[str, Any] | None) -> JobResult:
    """A job's stored result, parsed with the model of its kind (an empty one before any phase ended)."""
    return RESULT_MODELS[JobKind(kind)].model_validate({**(stored or {}), "kind": str(JobKind(kind))})
