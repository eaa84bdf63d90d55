"""What a client asks the generator for, and the checks that refuse a bad request
before any model loads. Torch-free: the API calls :func:`check_request` at request time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.errors import InvalidConfig
from pipelines.generation.styles import (
    ASPECTS,
    CONTROLNET_KINDS,
    StylePack,
    get_style,
    placeholders,
    template_path,
)

SAMPLERS = ("euler", "dpmpp_2m", "ddim", "euler_a")
RANKING_PRESETS = ("aesthetic", "balanced")
UPSCALE_FACTORS = (2, 4)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0


class ControlNetSpec(BaseModel):
    """One ControlNet condition: a shipped template image (by name) or a client image.

    ``preprocessed`` says ``image`` already is the condition map (a skeleton or a depth
    map) rather than a photo to run the annotator on.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    kind: str
    template: str | None = None
    image: Any = Field(default=None, exclude=True)  # PIL.Image; never serialised
    scale: float = 1.0
    preprocessed: bool = False


class GenerationRequest(BaseModel):
    """Loosely typed on purpose: :func:`check_request` owns the error codes a client sees."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    style: str | None = None
    prompts: tuple[str, ...] | None = None  # custom prompt templates, cycled over candidates
    n: int = 8  # candidates generated
    k: int = 4  # best candidates delivered
    aspect: str | None = None  # None: the style's aspect, else 1:1
    seed: int = 0  # candidate i uses seed + i
    sampler: str = "euler"
    steps: int | None = None  # None: the style's steps, else 25
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    controlnets: tuple[ControlNetSpec, ...] | None = None  # None: the style's template; () : none
    upscale: int | None = 2
    ranking: str = "aesthetic"
    allow_prompt_without_instance: bool = False
    safety_checker: bool = False
    use_improved_vae: bool = True
    batch_size: int | None = None  # None: the engine's default


@dataclass(frozen=True)
class GenerationLimits:
    """Per-client limits (the API fills them from the client's plan or settings)."""

    max_candidates: int = 64
    max_steps: int = 100
    max_controlnets: int = 2
    max_prompt_chars: int = 1000


@dataclass(frozen=True)
class ResolvedRequest:
    """A checked request with every default filled from the style pack."""

    request: GenerationRequest
    style: StylePack | None
    prompt_templates: tuple[str, ...]
    negative_prompt: str
    aspect: str
    steps: int
    guidance_scale: float
    controlnets: tuple[ControlNetSpec, ...]

    def prompt_template(self, index: int) -> str:
        return self.prompt_templates[index % len(self.prompt_templates)]


def _fail(code: str, message: str, **details: Any) -> None:
    raise InvalidConfig(message, details, code=code)


def check_request(
    request: GenerationRequest, limits: GenerationLimits | None = None, instance_token: str | None = None
) -> ResolvedRequest:
    """Refuse a request that can never succeed, with a precise code; return it resolved.

    Custom prompts must name the subject with ``{instance}`` (or the literal
    ``instance_token`` when the caller knows it) unless ``allow_prompt_without_instance``.
    """
    limits = limits or GenerationLimits()
    style = get_style(request.style) if request.style is not None else None
    if style is None and not request.prompts:
        _fail("style_or_prompts_required", "give a style or at least one prompt")

    if request.n < 1:
        _fail("invalid_n", f"n must be at least 1, got {request.n}", n=request.n)
    if request.n > limits.max_candidates:
        _fail(
            "too_many_candidates",
            f"n={request.n} exceeds this client's limit of {limits.max_candidates}",
            n=request.n,
            limit=limits.max_candidates,
        )
    if request.k < 1:
        _fail("invalid_k", f"k must be at least 1, got {request.k}", k=request.k)
    if request.k > request.n:
        _fail("k_greater_than_n", f"k={request.k} is greater than n={request.n}", k=request.k, n=request.n)

    aspect = request.aspect or (style.aspect if style else "1:1")
    if aspect not in ASPECTS:
        _fail("unknown_aspect", f"unknown aspect {aspect!r}", aspect=aspect, known=list(ASPECTS))
    if request.sampler not in SAMPLERS:
        _fail(
            "unknown_sampler",
            f"unknown sampler {request.sampler!r}",
            sampler=request.sampler,
            known=list(SAMPLERS),
        )
    steps = request.steps if request.steps is not None else (style.steps if style else DEFAULT_STEPS)
    if not 1 <= steps <= limits.max_steps:
        _fail("invalid_steps", f"steps must be in 1..{limits.max_steps}, got {steps}", steps=steps)
    guidance = (
        request.guidance_scale
        if request.guidance_scale is not None
        else (style.guidance_scale if style else DEFAULT_GUIDANCE)
    )
    if not 0.0 <= guidance <= 30.0:
        _fail("invalid_guidance", f"guidance_scale must be in 0..30, got {guidance}", guidance_scale=guidance)
    if request.upscale is not None and request.upscale not in UPSCALE_FACTORS:
        _fail(
            "invalid_upscale", f"upscale must be 2, 4 or null, got {request.upscale}", upscale=request.upscale
        )
    if request.ranking not in RANKING_PRESETS:
        _fail(
            "unknown_ranking",
            f"unknown ranking preset {request.ranking!r}",
            ranking=request.ranking,
            known=list(RANKING_PRESETS),
        )
    if request.batch_size is not None and request.batch_size < 1:
        _fail("invalid_batch_size", "batch_size must be at least 1", batch_size=request.batch_size)

    templates = tuple(request.prompts) if request.prompts else style.prompts
    for template in templates:
        _check_prompt(template, request, limits, instance_token)
    negative = (
        request.negative_prompt
        if request.negative_prompt is not None
        else (style.negative_prompt if style else "")
    )

    controlnets = _resolve_controlnets(request, style)
    if len(controlnets) > limits.max_controlnets:
        _fail(
            "too_many_controlnets",
            f"at most {limits.max_controlnets} ControlNets per request",
            count=len(controlnets),
            limit=limits.max_controlnets,
        )
    kinds = [spec.kind for spec in controlnets]
    if len(set(kinds)) != len(kinds):
        _fail("duplicate_controlnet", "each ControlNet kind may appear once", kinds=kinds)
    for spec in controlnets:
        _check_controlnet(spec)

    return ResolvedRequest(
        request=request,
        style=style,
        prompt_templates=templates,
        negative_prompt=negative,
        aspect=aspect,
        steps=steps,
        guidance_scale=guidance,
        controlnets=controlnets,
    )


def _check_prompt(
    template: str, request: GenerationRequest, limits: GenerationLimits, instance_token: str | None
):
    if not template.strip():
        _fail("empty_prompt", "prompts must not be empty")
    if len(template) > limits.max_prompt_chars:
        _fail(
            "prompt_too_long",
            f"prompt longer than {limits.max_prompt_chars} characters",
            length=len(template),
        )
    try:
        fields = placeholders(template)
    except ValueError as exc:  # unbalanced braces
        _fail("invalid_prompt", f"prompt {template!r} is not a valid template: {exc}", prompt=template)
    unknown = fields - {"instance", "class"}
    if unknown:
        _fail(
            "unknown_placeholder",
            f"prompt uses unknown placeholders {sorted(unknown)}; use {{instance}} and {{class}}",
            prompt=template,
            placeholders=sorted(unknown),
        )
    names_subject = "instance" in fields or (instance_token is not None and instance_token in template)
    if not names_subject and not request.allow_prompt_without_instance:
        _fail(
            "prompt_missing_instance",
            f"prompt {template!r} does not contain {{instance}}, so it would not show the subject; "
            "add {instance} or set allow_prompt_without_instance",
            prompt=template,
        )


def requested_controlnets(request: GenerationRequest) -> tuple[ControlNetSpec, ...]:
    """The ControlNets ``request`` will run with (its own, else its style's template): what to load."""
    return _resolve_controlnets(request, get_style(request.style) if request.style is not None else None)


def _resolve_controlnets(request: GenerationRequest, style: StylePack | None) -> tuple[ControlNetSpec, ...]:
    if request.controlnets is not None:
        return tuple(request.controlnets)
    if style is not None and style.controlnet is not None:
        c = style.controlnet
        return (ControlNetSpec(kind=c.kind, template=c.template, scale=c.scale),)
    return ()


def _check_controlnet(spec: ControlNetSpec) -> None:
    if spec.kind not in CONTROLNET_KINDS:
        _fail(
            "unknown_controlnet",
            f"unknown ControlNet kind {spec.kind!r}",
            kind=spec.kind,
            known=list(CONTROLNET_KINDS),
        )
    if not 0.0 <= spec.scale <= 2.0:
        _fail(
            "invalid_controlnet_scale",
            f"ControlNet scale must be in 0..2, got {spec.scale}",
            scale=spec.scale,
        )
    if (spec.template is None) == (spec.image is None):
        _fail(
            "controlnet_condition_required",
            f"{spec.kind} ControlNet needs exactly one of template or image",
            kind=spec.kind,
        )
    if spec.template is not None:
        template_path(spec.template)


def aspect_size(aspect: str, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) for ``aspect`` at the base model's ``resolution``: the short side
    is ``resolution`` and the long side is rounded to the nearest ``multiple`` (512: 1:1 ->
    512x512, 9:16 -> 512x912, 4:5 -> 512x640; tiny 128: 128x224, 128x160)."""
    if aspect not in ASPECTS:
        _fail("unknown_aspect", f"unknown aspect {aspect!r}", aspect=aspect, known=list(ASPECTS))
    w, h = (int(x) for x in aspect.split(":"))
    width = resolution
    height = max(multiple, round(resolution * h / w / multiple) * multiple)
    return width, height
