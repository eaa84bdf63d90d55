"""What the generator is asked to make: a fully resolved, plain-data specification.

Requests from clients are checked and resolved once, in ``likeness.contract.requests``
(style defaults filled, limits applied, precise error codes); the engine trusts the
:class:`GenerationSpec` it gets. Torch-free.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.models.family import get_family

SAMPLERS = ("euler", "dpmpp_2m", "ddim", "euler_a")


class ControlNetSpec(BaseModel):
    """One ControlNet condition: a shipped template image (by name) or an image given in code.

    ``preprocessed`` says ``image`` already is the condition map (a skeleton or a depth map)
    rather than a photo to run the annotator on.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    kind: str
    template: str | None = None
    image: Any = Field(default=None, exclude=True)  # PIL.Image; never serialised
    scale: float = 1.0
    preprocessed: bool = False


class GenerationSpec(BaseModel):
    """Every choice of one generation: candidate ``i`` uses seed ``seed + i`` and prompt template
    ``prompts[(seed + i) % len(prompts)]`` (``{instance}``/``{class}`` filled from the adapter)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    style: str | None = None
    style_version: int | None = None
    prompts: tuple[str, ...] = Field(min_length=1)
    negative_prompt: str = ""
    n: int = Field(8, ge=1)
    k: int = Field(4, ge=1)
    seed: int = 0
    aspect: str = "1:1"
    steps: int = Field(25, ge=1)
    guidance_scale: float = 7.0
    sampler: str = "euler"
    controlnets: tuple[ControlNetSpec, ...] = ()
    upscale: int | None = 2
    ranking: str = "aesthetic"
    safety_checker: bool = False
    use_improved_vae: bool = True
    batch_size: int | None = None  # None: the engine's default
    face_refine: bool = False  # redraw each candidate's face before ranking (pipelines.engine.face_refine)

    def prompt_template(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]


def aspect_size(aspect: str, resolution: int, family: str = "sd15") -> tuple[int, int]:
    """(width, height) for ``aspect`` at a preset's ``resolution``, from the model family's sizes
    (``pipelines.models.family``; the engines ask the same). SD 1.5 at 512: 1:1 -> 512x512, 9:16 ->
    512x912, 4:5 -> 512x640; tiny 128: 128x224, 128x160. SDXL at 1024: 1024x1024, 768x1344, 896x1120."""
    return get_family(family).size_at(aspect, resolution)
