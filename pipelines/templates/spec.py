"""What template mode is asked to make: a fully resolved, plain-data specification (torch-free).

Client requests are checked and resolved once, in ``likeness.contract.requests``
(:class:`~likeness.contract.requests.TemplateRequest`); the engine trusts the
:class:`TemplateSpec` it gets.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: EasyPhoto's first-pass denoising strength: enough to redraw the face, little enough to keep
#: the template's composition, light and colours.
DEFAULT_STRENGTH = 0.45
DEFAULT_SECOND_PASS_STRENGTH = 0.3
DEFAULT_STEPS = 30
DEFAULT_NEGATIVE_PROMPT = "lowres, blurry, deformed, ugly, bad art"


def passes_steps(steps: int, strength: float) -> int:
    """Denoising steps one pass really runs: img2img-style pipelines skip the first ``1 - strength``
    of a ``steps``-long schedule."""
    return min(int(steps * strength), steps)


class TemplateSpec(BaseModel):
    """Every choice of one template job. Candidate ``i`` uses seed ``seed + i``; all candidates
    share the template's mask, crop and ControlNet conditions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    template: str = Field(description="What the images are labelled with: the shipped template's name, or "
                                      "upload:<template photo id>.")
    prompt: str = Field(min_length=1, description="'{instance} {class}, ' + the template's caption words.")
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    n: int = Field(4, ge=1)
    k: int = Field(2, ge=1)
    seed: int = 0
    steps: int = Field(DEFAULT_STEPS, ge=1, description="Schedule length; a pass runs steps x strength of it.")
    strength: float = Field(DEFAULT_STRENGTH, gt=0.0, le=1.0)
    guidance_scale: float = 7.0
    sampler: str = "euler"
    pose_scale: float = Field(0.8, ge=0.0, le=2.0, description="OpenPose ControlNet (the template's pose).")
    edge_scale: float = Field(0.5, ge=0.0, le=2.0, description="Canny ControlNet (the template's edges, light).")
    color_transfer: bool = True  # match the face's colours to the template (Lab, inside the mask)
    second_pass: bool = False  # redraw the face alone at higher resolution
    second_pass_strength: float = Field(DEFAULT_SECOND_PASS_STRENGTH, gt=0.0, le=1.0)
    upscale: int | None = 2
    ranking: str = "identity"
    use_improved_vae: bool = True
    batch_size: int | None = None  # None: the engine's default
    face_refine: bool = False  # redraw each candidate's face before ranking (pipelines.engine.face_refine)

    @property
    def first_pass_steps(self) -> int:
        return passes_steps(self.steps, self.strength)

    @property
    def second_pass_steps(self) -> int:
        return passes_steps(self.steps, self.second_pass_strength) if self.second_pass else 0

    @property
    def style_label(self) -> str:
        """The label stored with each image (the images API's ``style``)."""
        return f"template:{self.template}"[:64]


__all__ = ["DEFAULT_NEGATIVE_PROMPT", "DEFAULT_SECOND_PASS_STRENGTH", "DEFAULT_STEPS", "DEFAULT_STRENGTH",
           "TemplateSpec", "passes_steps"]
