"""What a client may ask for, per job kind, and the one place those requests are checked.

Each kind has a request model (the API body, ``extra="forbid"``) and a resolved model, the
request with every default filled in (style pack name and version, model preset, every
training option). The API checks and resolves a request once, with stable error codes,
and stores the resolved form on the job; the worker, the CLI and a retry read it back with
the same model, so a job can be replayed exactly and the dashboard shows what ran.

Torch-free: the API imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from likeness.contract.plan import JobKind
from pipelines.errors import InvalidConfig
from pipelines.generation.request import SAMPLERS, ControlNetSpec, GenerationSpec
from pipelines.generation.styles import (
    ASPECTS,
    CONTROLNET_KINDS,
    StylePack,
    fill_prompt,
    get_style,
    placeholders,
    template_path,
)
from pipelines.models.presets import PRESET_NAMES, preset_family
from pipelines.templates.catalog import get_template
from pipelines.templates.spec import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_SECOND_PASS_STRENGTH,
    DEFAULT_STRENGTH,
    TemplateSpec,
    passes_steps,
)
from pipelines.templates.spec import DEFAULT_STEPS as TEMPLATE_STEPS
from pipelines.text import clip_bpe
from pipelines.text.subject import CLASS_CANDIDATES, INSTANCE_TOKEN
from pipelines.training.config import STRATEGIES, TrainConfig

RANKING_PRESETS = ("aesthetic", "balanced", "identity")  # pipelines.ranking.RANKING_PRESETS (torch-free copy)
UPSCALE_FACTORS = (2, 4)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0
CLASS_WORD = r"^[a-z]+$"


def _upscale_factor(value: Any) -> Any:
    return 1 if value == "none" else value  # the older spelling of "no upscaling", still accepted


#: The upscaling factor of the kept images: 2 or 4, or 1 for none. One JSON type (integer), so every
#: client generator can type it; the string ``"none"`` of earlier versions is read as 1.
Upscale = Annotated[Literal[1, 2, 4], BeforeValidator(_upscale_factor),
                    Field(description='Upscale the kept images 2x or 4x (Real-ESRGAN); 1: keep them as generated '
                                      '(the older "none" is still accepted).')]


class RequestRejected(Exception):
    """A request that can never succeed; ``code`` is stable (clients switch on it)."""

    def __init__(self, code: str, message: str, **details: Any):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


class _Body(BaseModel):
    # NaN and the infinities (JSON's non-standard `NaN`, `Infinity`, or `1e999`) are never a valid setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
    select_checkpoint: bool | None = Field(
        None, description="Keep the training snapshot that looks most like the person (snapshots at 40/60/80/100 % "
                          "of the steps, each scored on a small validation set; the result's checkpoint_selection "
                          "says which). Default: on for LoRA (snapshots are a few MB), off for full mode (each "
                          "snapshot is a copy of the U-Net and text encoders, ~4 GB on SD 1.5).")
    preset: Literal[PRESET_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="The model preset to train on (sd15: Stable Diffusion 1.5 at 512 px; sdxl: SDXL at "
                          "1024 px; tiny, tiny-sdxl: random weights for demos). Default: the deployment's. The "
                          "subject's generations and templates then use the same preset.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"mode": "lora", "steps": 800}]})


class ResolvedTrain(BaseModel):
    """A train job's request as it runs: every training option, and the preset it ran on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["train"] = "train"
    preset: str
    class_token: str | None = None  # None: CLIP chooses at intake
    training: TrainConfig
    select_checkpoint: bool = False  # keep the snapshot that looks most like the person (pipelines.training.selection)


FACE_REFINE_HELP = ("Redraw each candidate's face at the model's native resolution before ranking: on, off, or "
                    "auto (on for portrait styles and template jobs). Each image says face_refined.")


#: Training defaults that depend on the model preset: the random-weight ``tiny`` preset is for demos
#: and wiring checks (its images are noise whatever it learns), so it trains just long enough to run
#: every stage: 4 steps a photo, 20 for the usual 5 photos, at most 40. With its generation defaults
#: below, `likeness serve` -> downloaded images takes about two minutes on a 2-core CPU (README).
#: ``sd15`` keeps the method's defaults (90 steps a photo, at most 1500).
PRESET_TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"steps_per_photo": 4, "max_steps_cap": 40, "unet_rank": 4, "text_encoder_rank": 4},
    "tiny-sdxl": {"steps_per_photo": 4, "max_steps_cap": 40, "unet_rank": 4, "text_encoder_rank": 4},
    "sd15": {},
    "sdxl": {},
}
#: Generation defaults that depend on the model preset (a request's own value always wins): the tiny
#: presets denoise 10 steps instead of a style's; ``sd15`` and ``sdxl`` take the style's as it runs on
#: their family (``StylePack.for_family``).
PRESET_GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 10},
    "tiny-sdxl": {"steps": 10},
    "sd15": {},
    "sdxl": {},
}


def resolve_train(body: TrainRequest, *, preset: str, class_token_override: str | None = None) -> ResolvedTrain:
    """``preset``: the deployment's default, used unless the request names one."""
    preset = body.preset or preset
    values: dict[str, Any] = {**PRESET_TRAINING_DEFAULTS.get(preset, {}), "mode": body.mode,
                              "strategy": body.strategy, "seed": body.seed}
    if body.steps is not None:
        values["max_train_steps"] = body.steps
    if body.attention_loss:
        values["attention_loss_weight"] = 0.1
    if body.mode == "lora":
        # LoRA checkpoints are a few MB: a worker lost mid-training resumes close to where it was.
        values["checkpoint_every"] = 100
    else:
        # Full fine-tuning: each parameter is updated as soon as its gradient exists, so a step never
        # holds every gradient at once (~0.76x the peak memory of diffusers' train_dreambooth.py;
        # clipping becomes per tensor with the same global bound). A full checkpoint is ~10 GB on
        # SD 1.5 (weights + Adam state): none by default; a lost worker restarts the training.
        values["optimizer_in_backward"] = True
        values["checkpoint_every"] = 0
    select = body.select_checkpoint if body.select_checkpoint is not None else body.mode == "lora"
    return ResolvedTrain(preset=preset, class_token=body.class_token or class_token_override,
                         training=TrainConfig(**values), select_checkpoint=select)


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
    upscale: Upscale = 2
    ranking: str = Field("aesthetic", description="aesthetic (the method's choice) or balanced.")
    face_refine: Literal["auto", "on", "off"] = Field("auto", description=FACE_REFINE_HELP)
    allow_prompt_without_instance: bool = Field(False, description="Allow custom prompts that do not show the "
                                                                   "subject.")
    adapter_version: int | None = Field(None, ge=1, description="Adapter to use; default: the newest.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"style": "cinematic", "n": 8, "k": 4, "aspect": "4:5", "seed": 42, "upscale": 2},
        {"prompts": ["a watercolor portrait of {instance} {class}"], "n": 4, "k": 2, "upscale": 1}]})


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
                       instance_token: str | None = None, preset: str | None = None) -> GenerationSpec:
    """Refuse a request that can never succeed, with a precise code; return it with every default filled.

    Custom prompts must name the subject with ``{instance}`` (or the literal ``instance_token``
    of the subject's adapter) unless ``allow_prompt_without_instance``.
    """
    limits = limits or GenerationLimits()
    style = _style(body.style, preset) if body.style is not None else None
    if style is None and not body.prompts:
        _reject("style_or_prompts_required", "Give a style or at least one prompt.")
    _check_candidates(body.n, body.k, limits)
    aspect = body.aspect or (style.aspect if style else "1:1")
    if aspect not in ASPECTS:
        _reject("unknown_aspect", f"Unknown aspect {aspect!r}.", aspect=aspect, known=list(ASPECTS))
    if body.sampler not in SAMPLERS:
        _reject("unknown_sampler", f"Unknown sampler {body.sampler!r}.", sampler=body.sampler, known=list(SAMPLERS))
    steps = body.steps if body.steps is not None else PRESET_GENERATION_DEFAULTS.get(preset or "", {}).get(
        "steps", style.steps if style else DEFAULT_STEPS)
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
        check_clip_window(template, instance_token)
    negative = body.negative_prompt if body.negative_prompt is not None else (style.negative_prompt if style else "")
    check_clip_window(negative, instance_token, field="negative_prompt")
    controlnets = _controlnets(body, style)
    if len(controlnets) > limits.max_controlnets:
        _reject("too_many_controlnets", f"At most {limits.max_controlnets} ControlNets per request.",
                count=len(controlnets), limit=limits.max_controlnets)
    return GenerationSpec(
        style=style.name if style else None, style_version=style.version if style else None,
        prompts=templates, negative_prompt=negative, n=body.n, k=body.k, seed=body.seed, aspect=aspect,
        steps=steps, guidance_scale=guidance, sampler=body.sampler, controlnets=controlnets,
        upscale=None if body.upscale == 1 else body.upscale, ranking=body.ranking,
        face_refine=body.face_refine == "on" or (body.face_refine == "auto" and style is not None and style.portrait),
    )


def _check_candidates(n: int, k: int, limits: GenerationLimits) -> None:
    if n < 1:
        _reject("invalid_n", f"n must be at least 1, got {n}.", n=n)
    if n > limits.max_candidates:
        _reject("too_many_candidates", f"n={n} exceeds this client's limit of {limits.max_candidates}.",
                n=n, limit=limits.max_candidates)
    if k < 1:
        _reject("invalid_k", f"k must be at least 1, got {k}.", k=k)
    if k > n:
        _reject("k_greater_than_n", f"k={k} is greater than n={n}.", k=k, n=n)


def resolve_generate(body: GenerateRequest, *, preset: str, adapter_version: int,
                     limits: GenerationLimits | None = None, instance_token: str | None = None) -> ResolvedGenerate:
    spec = resolve_generation(body, limits=limits, instance_token=instance_token, preset=preset)
    return ResolvedGenerate(preset=preset, adapter_version=adapter_version, generation=spec)


def _style(name: str, preset: str | None = None) -> StylePack:
    """The style pack ``name`` as it runs on ``preset``'s model family (its per-family defaults applied)."""
    try:
        style = get_style(name)
    except InvalidConfig as exc:
        raise RequestRejected(exc.error_code, f"Unknown style {name!r}.", **exc.details) from None
    return style.for_family(preset_family(preset).name) if preset else style


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


def check_clip_window(template: str, instance_token: str | None = None, class_word: str | None = None, *,
                      field: str = "prompts") -> None:
    """Refuse a prompt CLIP's text encoder would cut (it reads 77 tokens and drops the rest, silently).

    Counted with CLIP's real vocabulary, the placeholders filled as at generation: ``{instance}`` is the
    adapter's one added token, ``{class}`` the class word (unknown before intake: the longest candidate).
    """
    instance = instance_token or INSTANCE_TOKEN
    words = (class_word,) if class_word else CLASS_CANDIDATES
    count = max(clip_bpe.token_count(fill_prompt(template, instance, word), added=(instance,)) for word in words)
    if count > clip_bpe.CONTEXT_LENGTH:
        _reject("prompt_too_long_for_clip",
                f"This {'negative prompt' if field == 'negative_prompt' else 'prompt'} takes {count} of CLIP's "
                f"{clip_bpe.CONTEXT_LENGTH} tokens (start and end included); the text encoder would drop the "
                f"last {count - clip_bpe.CONTEXT_LENGTH}. Shorten it.",
                field=field, prompt=template, tokens=count, limit=clip_bpe.CONTEXT_LENGTH)


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


# ---- template -----------------------------------------------------------------------------------------------

UPLOAD_CAPTION = "portrait photo"  # an uploaded template's caption when the client gives none


class TemplateRequest(_Body):
    """``POST /v1/subjects/{id}/templates``: the subject put into a template photo; best ``k`` of ``n``."""

    template: str | None = Field(None, description="A shipped template's name (GET /v1/templates).",
                                 examples=["astronaut"])
    template_photo_id: str | None = Field(None, max_length=32, description=(
        "A template photo uploaded to this subject (POST /v1/subjects/{id}/templates/photos); give it or "
        "`template`, not both."))
    caption: str | None = Field(None, max_length=300, description=(
        "Words describing the template, added to the prompt after the subject's tokens; default: the "
        f"shipped template's caption, or {UPLOAD_CAPTION!r} for an uploaded one."))
    negative_prompt: str | None = Field(None, max_length=1000)
    n: int = Field(4, description="Candidates to make.")
    k: int = Field(2, description="Best candidates to keep (k <= n).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Candidate i uses seed + i.")
    strength: float | None = Field(None, description=(
        f"First-pass denoising strength (default {DEFAULT_STRENGTH}): higher redraws more of the face and hair, "
        "lower keeps more of the template."))
    second_pass: bool = Field(False, description="Then redraw the face alone at higher resolution.")
    second_pass_strength: float | None = Field(None, description=f"Default {DEFAULT_SECOND_PASS_STRENGTH}.")
    steps: int | None = Field(None, description=f"Schedule length (default {TEMPLATE_STEPS}); a pass runs "
                                                "steps x strength of it.")
    guidance_scale: float | None = None
    pose_scale: float | None = Field(None, description="OpenPose ControlNet weight, 0-2 (default 0.8; 0: off).")
    edge_scale: float | None = Field(None, description="Canny ControlNet weight, 0-2 (default 0.5; 0: off).")
    color_transfer: bool = Field(True, description="Match the new face's colours to the template's.")
    upscale: Upscale = 2
    ranking: str = Field("identity", description="identity (default: likeness to the subject weighs most), "
                                                 "balanced or aesthetic.")
    face_refine: Literal["auto", "on", "off"] = Field("auto", description=FACE_REFINE_HELP)
    adapter_version: int | None = Field(None, ge=1, description="Adapter to use; default: the newest.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"template": "astronaut", "n": 4, "k": 2, "seed": 7},
        {"template_photo_id": "9b2e4c0d1f3a4e5b8c7d6e5f4a3b2c1d", "caption": "wedding photo, white dress",
         "n": 8, "k": 2, "strength": 0.5, "second_pass": True}]})


class TemplateSource(BaseModel):
    """Which template a job uses: a shipped one (name and version) or a photo uploaded to the subject."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["shipped", "upload"]
    name: str | None = None
    version: int | None = None
    photo_id: str | None = None


class ResolvedTemplate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["template"] = "template"
    preset: str
    adapter_version: int
    source: TemplateSource
    templating: TemplateSpec


@dataclass(frozen=True)
class TemplatePhotoVerdict:
    """What the API knows of an uploaded template photo (pending until the judge task sent with its upload
    decides; a template job using a pending one fails at ``masking`` with the same code if it is refused)."""

    photo_id: str
    status: str  # pending | accepted | rejected
    reason_code: str | None = None
    message: str | None = None


def resolve_templating(body: TemplateRequest, *, limits: GenerationLimits | None = None,
                       photo: TemplatePhotoVerdict | None = None) -> tuple[TemplateSource, TemplateSpec]:
    """Refuse a template request that can never succeed, with a precise code; return it resolved.

    ``photo``: the uploaded template photo ``body.template_photo_id`` names (the caller found it).
    """
    limits = limits or GenerationLimits()
    if body.template is None and body.template_photo_id is None:
        _reject("template_or_photo_required", "Give a shipped template's name (template) or an uploaded template "
                                              "photo (template_photo_id).")
    if body.template is not None and body.template_photo_id is not None:
        _reject("template_and_photo_given", "Give template or template_photo_id, not both.")
    if body.template is not None:
        try:
            shipped = get_template(body.template)
        except InvalidConfig as exc:
            raise RequestRejected(exc.error_code, f"Unknown template {body.template!r}.", **exc.details) from None
        source = TemplateSource(kind="shipped", name=shipped.name, version=shipped.version)
        label, caption = shipped.name, shipped.caption
    else:
        if photo is None or photo.photo_id != body.template_photo_id:
            raise ValueError("resolve_templating needs the verdict of the template photo the request names")
        if photo.status == "rejected":
            reason = photo.reason_code or "rejected"
            _reject(f"template_{reason}", photo.message or "This template photo was refused.",
                    template_photo_id=photo.photo_id, reason=reason)
        source = TemplateSource(kind="upload", photo_id=photo.photo_id)
        label, caption = f"upload:{photo.photo_id}", UPLOAD_CAPTION
    if body.caption is not None:
        caption = " ".join(body.caption.split())
        if "{" in caption or "}" in caption:
            _reject("invalid_prompt", "The caption must not contain braces.", caption=body.caption)
    _check_candidates(body.n, body.k, limits)
    steps = body.steps if body.steps is not None else TEMPLATE_STEPS
    if not 1 <= steps <= limits.max_steps:
        _reject("invalid_steps", f"steps must be in 1..{limits.max_steps}, got {steps}.", steps=steps)
    strength = body.strength if body.strength is not None else DEFAULT_STRENGTH
    second = body.second_pass_strength if body.second_pass_strength is not None else DEFAULT_SECOND_PASS_STRENGTH
    for name, value in (("strength", strength), ("second_pass_strength", second)):
        if not 0.05 <= value <= 1.0:
            _reject("invalid_strength", f"{name} must be in 0.05..1, got {value}.", **{name: value})
        if passes_steps(steps, value) < 1:
            _reject("invalid_strength", f"steps x {name} = {steps * value:.2f}: the pass would run no step; raise "
                                        "steps or the strength.", steps=steps, **{name: value})
    guidance = body.guidance_scale if body.guidance_scale is not None else DEFAULT_GUIDANCE
    if not 0.0 <= guidance <= 30.0:
        _reject("invalid_guidance", f"guidance_scale must be in 0..30, got {guidance}.", guidance_scale=guidance)
    defaults = TemplateSpec.model_fields
    pose = body.pose_scale if body.pose_scale is not None else defaults["pose_scale"].default
    edge = body.edge_scale if body.edge_scale is not None else defaults["edge_scale"].default
    for name, value in (("pose_scale", pose), ("edge_scale", edge)):
        if not 0.0 <= value <= 2.0:
            _reject("invalid_controlnet_scale", f"{name} must be in 0..2, got {value}.", **{name: value})
    if body.ranking not in RANKING_PRESETS:
        _reject("unknown_ranking", f"Unknown ranking preset {body.ranking!r}.", ranking=body.ranking,
                known=list(RANKING_PRESETS))
    negative = body.negative_prompt if body.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    prompt = f"{{instance}} {{class}}, {caption}" if caption else "{instance} {class}"
    check_clip_window(prompt, field="caption")
    check_clip_window(negative, field="negative_prompt")
    spec = TemplateSpec(
        template=label, prompt=prompt,
        negative_prompt=negative, n=body.n, k=body.k, seed=body.seed, steps=steps, strength=strength,
        guidance_scale=guidance, pose_scale=pose, edge_scale=edge, color_transfer=body.color_transfer,
        second_pass=body.second_pass, second_pass_strength=second,
        upscale=None if body.upscale == 1 else body.upscale, ranking=body.ranking,
        face_refine=body.face_refine != "off",  # auto: template jobs are portraits
    )
    return source, spec


def resolve_template(body: TemplateRequest, *, preset: str, adapter_version: int,
                     limits: GenerationLimits | None = None,
                     photo: TemplatePhotoVerdict | None = None) -> ResolvedTemplate:
    source, spec = resolve_templating(body, limits=limits, photo=photo)
    return ResolvedTemplate(preset=preset, adapter_version=adapter_version, source=source, templating=spec)


# ---- one entry point per kind ---------------------------------------------------------------------------------

ResolvedRequest = Annotated[ResolvedTrain | ResolvedGenerate | ResolvedTemplate, Field(discriminator="kind")]

REQUEST_MODELS: dict[JobKind, type[BaseModel]] = {JobKind.TRAIN: TrainRequest, JobKind.GENERATE: GenerateRequest,
                                                  JobKind.TEMPLATE: TemplateRequest}
RESOLVED_MODELS: dict[JobKind, type[BaseModel]] = {JobKind.TRAIN: ResolvedTrain,
                                                     JobKind.GENERATE: ResolvedGenerate,
                                                     JobKind.TEMPLATE: ResolvedTemplate}


def read_resolved(kind: str, stored: dict[str, Any]) -> ResolvedTrain | ResolvedGenerate | ResolvedTemplate:
    """A job's stored request, parsed with the model of its kind (worker, retries, dashboard)."""
    return RESOLVED_MODELS[JobKind(kind)].model_validate(stored)  # type: ignore[return-value]
