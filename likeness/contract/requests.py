"""What a client may ask for, per job kind, and the one place those requests are checked.

Each kind has a request model (the API body, ``extra="forbid"``) and a resolved model, the
request with every default filled in (style pack name and version, model preset, every
training option). The API checks and resolves a request once, with stable error codes,
and stores the resolved form on the job; the worker, the CLI and a retry read it back with
the same model, so a job can be replayed exactly and the dashboard shows what ran.

Torch-free: the API imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from likeness.contract.plan import JobKind
from pipelines.errors import InvalidConfig
from pipelines.generation.request import SAMPLERS, ControlNetSpec, GenerationSpec
from pipelines.generation.styles import ASPECTS, CONTROLNET_KINDS, StylePack, get_style, placeholders, template_path
from pipelines.training.config import STRATEGIES, TrainConfig

RANKING_PRESETS = ("aesthetic", "balanced")
UPSCALE_FACTORS = (2, 4)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0
CLASS_WORD = r"^[a-z]+$"


class RequestRejected(Exception):
    """A request that can never succeed; ``code`` is stable (clients switch on it)."""

    def __init__(self, code: str, message: str, **details: Any):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- train --------------------------------------------------------------------------------------------------


class TrainRequest(_Body):
    """``POST /v1/subjects/{id}/train``."""

    mode: Literal["lora", "full"] = Field("lora", description="LoRA adapter (small, default) or full fine-tune.")
    steps: int | None = Field(None, ge=10, le=5000, description="Total training steps; default from the preset "
                                                               "and the number of accepted photos.")
    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        "staged", description="staged (text encoder + U-Net, then U-Net: the method's choice), or one of the "
                              "strategies it was compared with.")
    class_token: str | None = Field(None, max_length=64, pattern=CLASS_WORD,
                                    description="Override the class word CLIP would choose (girl, man, boy, baby).")
    attention_loss: bool = Field(False, description="Masked cross-attention penalty: converges about twice as fast "
                                                    "but the model loses expressiveness (off by default).")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"mode": "lora", "steps": 800}]})


class ResolvedTrain(BaseModel):
    """A train job's request as it runs: every training option, and the preset it ran on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["train"] = "train"
    preset: str
    class_token: str | None = None  # None: CLIP chooses at intake
    training: TrainConfig


#: Training defaults that depend on the model preset: the random-weight ``tiny`` preset is
#: for demos and wiring checks, so it trains briefly; ``sd15`` keeps the method's defaults.
PRESET_TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"steps_per_photo": 10, "max_steps_cap": 200, "unet_rank": 4, "text_encoder_rank": 4},
    "sd15": {},
}


def resolve_train(body: TrainRequest, *, preset: str, class_token_override: str | None = None) -> ResolvedTrain:
    values: dict[str, Any] = {**PRESET_TRAINING_DEFAULTS.get(preset, {}), "mode": body.mode,
                              "strategy": body.strategy, "seed": body.seed}
    if body.steps is not None:
        values["max_train_steps"] = body.steps
    if body.attention_loss:
        values["attention_loss_weight"] = 0.1
    if body.mode == "lora":
        # LoRA checkpoints are a few MB: a worker lost mid-training resumes close to where it was.
        values["checkpoint_every"] = 100
    return ResolvedTrain(preset=preset, class_token=body.class_token or class_token_override,
                         training=TrainConfig(**values))


# ---- generate -----------------------------------------------------------------------------------------------


class ControlNetIn(_Body):
    kind: Literal["pose", "depth"]
    template: str = Field(description="Name of a shipped template image (GET /v1/styles shows each style's).")
    scale: float = Field(1.0, ge=0.0, le=2.0)


class GenerateRequest(_Body):
    """``POST /v1/subjects/{id}/generations``: best ``k`` of ``n`` candidates in a style."""

    style: str | None = Field(None, description="A style pack name (GET /v1/styles).", examples=["cinematic"])
    prompts: list[str] | None = Field(None, max_length=16,
                                      description="Custom prompt templates using {instance} and optionally {class}.")
    negative_prompt: str | None = Field(None, max_length=1000)
    n: int = Field(8, description="Candidates to generate.")
    k: int = Field(4, description="Best candidates to keep (k <= n).")
    aspect: str | None = Field(None, description="1:1, 9:16 or 4:5; default: the style's.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Candidate i uses seed + i.")
    steps: int | None = Field(None, description="Denoising steps; default: the style's.")
    guidance_scale: float | None = None
    sampler: str = Field("euler", description=f"One of {', '.join(SAMPLERS)}.")
    controlnet: ControlNetIn | None = Field(None, description="Override the style's ControlNet template.")
    no_controlnet: bool = Field(False, description="Disable the style's ControlNet.")
    upscale: Literal[2, 4, "none"] = 2
    ranking: str = Field("aesthetic", description="aesthetic (the method's choice) or balanced.")
    allow_prompt_without_instance: bool = Field(False, description="Allow custom prompts that do not show the "
                                                                   "subject.")
    adapter_version: int | None = Field(None, ge=1, description="Adapter to use; default: the newest.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"style": "cinematic", "n": 8, "k": 4, "aspect": "4:5", "seed": 42, "upscale": 2},
        {"prompts": ["a watercolor portrait of {instance} {class}"], "n": 4, "k": 2, "upscale": "none"}]})


class ResolvedGenerate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["generate"] = "generate"
    preset: str
    adapter_version: int
    generation: GenerationSpec


@dataclass(frozen=True)
class GenerationLimits:
    """Per-client limits (the API fills them from the client's settings)."""

    max_candidates: int = 64
    max_steps: int = 100
    max_controlnets: int = 2
    max_prompt_chars: int = 1000


def _reject(code: str, message: str, **details: Any):
    raise RequestRejected(code, message, **details)


def resolve_generation(body: GenerateRequest, *, limits: GenerationLimits | None = None,
                       instance_token: str | None = None) -> GenerationSpec:
    """Refuse a request that can never succeed, with a precise code; return it with every default filled.

    Custom prompts must name the subject with ``{instance}`` (or the literal ``instance_token``
    of the subject's adapter) unless ``allow_prompt_without_instance``.
    """
    limits = limits or GenerationLimits()
    style = _style(body.style) if body.style is not None else None
    if style is None and not body.prompts:
        _reject("style_or_prompts_required", "Give a style or at least one prompt.")
    if body.n < 1:
        _reject("invalid_n", f"n must be at least 1, got {body.n}.", n=body.n)
    if body.n > limits.max_candidates:
        _reject("too_many_candidates", f"n={body.n} exceeds this client's limit of {limits.max_candidates}.",
                n=body.n, limit=limits.max_candidates)
    if body.k < 1:
        _reject("invalid_k", f"k must be at least 1, got {body.k}.", k=body.k)
    if body.k > body.n:
        _reject("k_greater_than_n", f"k={body.k} is greater than n={body.n}.", k=body.k, n=body.n)
    aspect = body.aspect or (style.aspect if style else "1:1")
    if aspect not in ASPECTS:
        _reject("unknown_aspect", f"Unknown aspect {aspect!r}.", aspect=aspect, known=list(ASPECTS))
    if body.sampler not in SAMPLERS:
        _reject("unknown_sampler", f"Unknown sampler {body.sampler!r}.", sampler=body.sampler, known=list(SAMPLERS))
    steps = body.steps if body.steps is not None else (style.steps if style else DEFAULT_STEPS)
    if not 1 <= steps <= limits.max_steps:
        _reject("invalid_steps", f"steps must be in 1..{limits.max_steps}, got {steps}.", steps=steps)
    guidance = body.guidance_scale if body.guidance_scale is not None else (
        style.guidance_scale if style else DEFAULT_GUIDANCE)
    if not 0.0 <= guidance <= 30.0:
        _reject("invalid_guidance", f"guidance_scale must be in 0..30, got {guidance}.", guidance_scale=guidance)
    if body.ranking not in RANKING_PRESETS:
        _reject("unknown_ranking", f"Unknown ranking preset {body.ranking!r}.", ranking=body.ranking,
                known=list(RANKING_PRESETS))
    templates = tuple(body.prompts) if body.prompts else style.prompts
    for template in templates:
        _check_prompt(template, body, limits, instance_token)
    negative = body.negative_prompt if body.negative_prompt is not None else (style.negative_prompt if style else "")
    controlnets = _controlnets(body, style)
    if len(controlnets) > limits.max_controlnets:
        _reject("too_many_controlnets", f"At most {limits.max_controlnets} ControlNets per request.",
                count=len(controlnets), limit=limits.max_controlnets)
    return GenerationSpec(
        style=style.name if style else None, style_version=style.version if style else None,
        prompts=templates, negative_prompt=negative, n=body.n, k=body.k, seed=body.seed, aspect=aspect,
        steps=steps, guidance_scale=guidance, sampler=body.sampler, controlnets=controlnets,
        upscale=None if body.upscale == "none" else body.upscale, ranking=body.ranking,
    )


def resolve_generate(body: GenerateRequest, *, preset: str, adapter_version: int,
                     limits: GenerationLimits | None = None, instance_token: str | None = None) -> ResolvedGenerate:
    spec = resolve_generation(body, limits=limits, instance_token=instance_token)
    return ResolvedGenerate(preset=preset, adapter_version=adapter_version, generation=spec)


def _style(name: str) -> StylePack:
    try:
        return get_style(name)
    except InvalidConfig as exc:
        raise RequestRejected(exc.error_code, f"Unknown style {name!r}.", **exc.details) from None


def _check_prompt(template: str, body: GenerateRequest, limits: GenerationLimits, instance_token: str | None):
    if not template.strip():
        _reject("empty_prompt", "Prompts must not be empty.")
    if len(template) > limits.max_prompt_chars:
        _reject("prompt_too_long", f"Prompt longer than {limits.max_prompt_chars} characters.",
                length=len(template), limit=limits.max_prompt_chars)
    try:
        fields = placeholders(template)
    except ValueError as exc:  # unbalanced braces
        _reject("invalid_prompt", f"Prompt {template!r} is not a valid template: {exc}.", prompt=template)
    if unknown := fields - {"instance", "class"}:
        _reject("unknown_placeholder", f"Prompt uses unknown placeholders {sorted(unknown)}; use {{instance}} "
                                       "and {class}.", prompt=template, placeholders=sorted(unknown))
    names_subject = "instance" in fields or (instance_token is not None and instance_token in template)
    if not names_subject and not body.allow_prompt_without_instance:
        _reject("prompt_missing_instance", f"Prompt {template!r} does not contain {{instance}}, so it would not "
                "show the subject; add {instance} or set allow_prompt_without_instance.", prompt=template)


def _controlnets(body: GenerateRequest, style: StylePack | None) -> tuple[ControlNetSpec, ...]:
    if body.no_controlnet:
        return ()
    if body.controlnet is not None:
        spec = ControlNetSpec(kind=body.controlnet.kind, template=body.controlnet.template,
                              scale=body.controlnet.scale)
    elif style is not None and style.controlnet is not None:
        spec = ControlNetSpec(kind=style.controlnet.kind, template=style.controlnet.template,
                              scale=style.controlnet.scale)
    else:
        return ()
    if spec.kind not in CONTROLNET_KINDS:
        _reject("unknown_controlnet", f"Unknown ControlNet kind {spec.kind!r}.", kind=spec.kind,
                known=list(CONTROLNET_KINDS))
    try:
        template_path(spec.template)
    except InvalidConfig as exc:
        raise RequestRejected(exc.error_code, exc.message, **exc.details) from None
    return (spec,)


# ---- one entry point per kind ---------------------------------------------------------------------------------

ResolvedRequest = Annotated[ResolvedTrain | ResolvedGenerate, Field(discriminator="kind")]

REQUEST_MODELS: dict[JobKind, type[BaseModel]] = {JobKind.TRAIN: TrainRequest, JobKind.GENERATE: GenerateRequest}
RESOLVED_MODELS: dict[JobKind, type[BaseModel]] = {JobKind.TRAIN: ResolvedTrain,
                                                     JobKind.GENERATE: ResolvedGenerate}


def read_resolved(kind: str, stored: dict[str, Any]) -> ResolvedTrain | ResolvedGenerate:
    """A job's stored request, parsed with the model of its kind (worker, retries, dashboard)."""
    return RESOLVED_MODELS[JobKind(kind)].model_validate(stored)  # type: ignore[return-value]


def with_training(resolved: ResolvedTrain, **changes: Any) -> ResolvedTrain:
    """``resolved`` with some training options replaced (tests, benchmarks, the CLI's quick runs)."""
    return resolved.model_copy(update={"training": replace(resolved.training, **changes)})
