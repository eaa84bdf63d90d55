"""What flows through the engine core: a job's settings, its candidates, its results, and the port a
post-pass sees of the engine. Plain data and protocols; the core (:mod:`pipelines.engine.core`) and
the post-passes (:mod:`pipelines.engine.postpasses`) both import it, neither imports the other's code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from pipelines.models.presets import ModelPreset
from pipelines.progress import CancelFn, ProgressFn, StageProgress, no_progress
from pipelines.types import TokenSpec

# Prompt tokens for base-model generation (no adapter): the placeholders become plain words.
BASE_TOKENS = TokenSpec(instance_token="", class_token="person")


class RenderSpec(Protocol):
    """The sampler settings every request carries (``GenerationSpec``, ``TemplateSpec``)."""

    seed: int
    steps: int
    guidance_scale: float
    sampler: str
    negative_prompt: str
    use_improved_vae: bool
    batch_size: int | None


@dataclass(frozen=True)
class Control:
    """One ControlNet of a call: its kind, its condition image, its weight."""

    kind: str
    image: Image.Image
    scale: float


@dataclass
class Candidate:
    """One rendered image before ranking; post-passes replace ``image`` and say what they did."""

    image: Image.Image
    seed: int  # regenerate this candidate alone with the same request and this seed, n=1
    prompt: str
    face_refined: bool = False


@dataclass
class Result:
    image: Image.Image  # the delivered candidate, at generation resolution (template mode: the template's size)
    upscaled: Image.Image | None  # Real-ESRGAN output (None when upscale is off)
    seed: int
    prompt: str
    negative_prompt: str
    style: str | None
    scores: dict[str, float | None] = field(default_factory=dict)
    rank: int = 0  # 1 = best; 0 = not delivered (see ``faces``)
    flagged: bool = False  # the safety checker's verdict (the image itself is never blanked)
    faces: int = 0  # faces detected in the candidate (delivery needs exactly one on real models)
    face_refined: bool = False  # the face-refinement pass redrew this image's face


@dataclass(frozen=True)
class Delivery:
    """How candidates become results: how many, ranked how, upscaled how far, labelled how."""

    k: int
    ranking: str
    upscale: int | None
    negative_prompt: str
    style: str | None
    safety_check: bool = False
    face_refine: bool = False  # the face-refinement pass (a request's "auto" is resolved in the contract)


@dataclass
class Job:
    """One call of a front end: what every step after rendering needs to know."""

    spec: RenderSpec
    delivery: Delivery
    adapter_dir: str | Path | None = None
    reference_images: Sequence[Image.Image] = ()
    tokens: TokenSpec | None = None  # the placeholders' words when no adapter is given
    on_progress: ProgressFn = no_progress
    should_stop: CancelFn | None = None
    return_all: bool = False  # also return the candidates that were not delivered (rank 0, not upscaled)


class Renderer(Protocol):
    """What a post-pass may use of the engine: its preset and models, and its way to render."""

    preset: ModelPreset
    models: Any  # pipelines.engine.components.EngineModels

    def pipeline(self, role: str, spec: RenderSpec, controls: Sequence[Control] = ()) -> tuple[Any, dict[str, Any]]:
        ...

    def render(self, pipe, spec: RenderSpec, prompts: Sequence[str], seeds: Sequence[int], progress: StageProgress,
               should_stop: CancelFn | None, *, per_candidate: Mapping[str, Sequence[Any]] | None = None,
               **call: Any) -> list[Image.Image]: ...


class PostPass(Protocol):
    """A pass over every candidate before ranking, run with the subject's adapter still attached."""

    def applies(self, engine: Renderer, job: Job) -> bool: ...

    def __call__(self, engine: Renderer, candidates: list[Candidate], job: Job,
                 tokens: TokenSpec) -> list[Candidate]: ...


__all__ = ["BASE_TOKENS", "Candidate", "Control", "Delivery", "Job", "PostPass", "RenderSpec", "Renderer", "Result"]
