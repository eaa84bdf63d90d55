"""The generation engine: serve a borrowed base pipeline to one subject at a time.

The engine loads nothing. Its models come from the caller as a :class:`GenerationModels`
bundle: the base pipeline (U-Net, text encoder, VAE, tokenizer), the ranking models, and
whatever the request needs (ControlNets, the improved VAE, an upscaler, the pose
estimator). The worker borrows that bundle from its model manager by
:func:`generation_models` for one job; the CLI and benchmarks call
:meth:`GenerationEngine.load`.

``generate`` lends the base to one subject: attach the adapter, denoise every candidate,
detach (the base is bit-for-bit unchanged: weights, tokenizer, attention processors,
scheduler, VAE flags), rank, upscale the best k.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.errors import ModelNotFound
from pipelines.generation.conditions import condition_image, depth_estimator_spec, pose_estimator_spec
from pipelines.generation.request import GenerationSpec, aspect_size
from pipelines.generation.styles import fill_prompt, template_path
from pipelines.models.presets import ModelPreset
from pipelines.models.specs import BundleSpec, ModelSpec
from pipelines.progress import (
    CancelFn,
    ProgressFn,
    Stage,
    StageProgress,
    no_progress,
    raise_if_canceled,
)
from pipelines.ranking import RankingModels
from pipelines.types import TokenSpec

# Prompt tokens for base-model generation (no adapter): the placeholders become plain words.
BASE_TOKENS = TokenSpec(instance_token="", class_token="person")
SAFETY_CHECKER_MODEL = "CompVis/stable-diffusion-safety-checker"

SafetyCheckFn = Callable[[Sequence[Image.Image]], list[bool]]


@dataclass
class Result:
    image: Image.Image  # the generated candidate, at generation resolution
    upscaled: Image.Image | None  # Real-ESRGAN output (None when upscale is off)
    seed: int  # regenerate this image alone with the same request and this seed, n=1
    prompt: str
    negative_prompt: str
    style: str | None
    scores: dict[str, float | None] = field(default_factory=dict)
    rank: int = 0  # 1 = best; 0 = not delivered (see ``faces``)
    flagged: bool = False  # the safety checker's verdict (the image itself is never blanked)
    faces: int = 0  # faces detected in the candidate (delivery needs exactly one on real models)


@dataclass
class GenerationModels:
    """Everything ``generate`` runs with, loaded by the caller."""

    base: Any  # the base StableDiffusionPipeline (shared with training; lent, never kept changed)
    ranking: RankingModels
    controlnets: Mapping[str, Any] = field(default_factory=dict)  # condition kind -> ControlNetModel
    improved_vae: Any = None  # sd-vae-ft-mse; None: the base VAE decodes
    upscalers: Mapping[int, Any] = field(default_factory=dict)  # factor -> Real-ESRGAN descriptor
    pose_estimator: Any = None  # pose conditions from template photos
    depth_estimator: Any = None  # depth conditions from photos (optional controlnet-aux)
    safety_checker: SafetyCheckFn | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def generation_models(
    preset: ModelPreset,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    request: GenerationSpec | None = None,
    *,
    face_backend: str = "blazeface",
    identity_backend: str = "auto",
) -> BundleSpec[GenerationModels]:
    """What generating ``request`` with ``preset`` needs (None: everything the preset offers).

    The base, ControlNets and improved VAE share one dtype (``default_dtype``: bf16 on
    CUDA), so the base here is the one training borrows too. Raises ``ModelNotFound`` for a
    ControlNet the preset lacks, before anything loads.
    """
    from pipelines.models.loading import base_spec, controlnet_spec, default_dtype, improved_vae_spec
    from pipelines.ranking import ranking_models
    from pipelines.upscale import upscaler_spec

    device = str(resolve_device(device))
    dtype = dtype or default_dtype(device)
    if request is None:  # everything the preset ships: the benchmarks' warm engine
        kinds = sorted(preset.controlnets)
        factors = [2, 4]
        vae = True
        pose = "pose" in kinds
        depth = safety = False  # optional extras with their own downloads: only when a request asks
    else:
        nets = request.controlnets
        unknown = sorted({spec.kind for spec in nets} - set(preset.controlnets))
        if unknown:
            raise ModelNotFound(f"the {preset.name} preset has no ControlNet for {unknown}", {"kinds": unknown})
        kinds = sorted({spec.kind for spec in nets})
        factors = [request.upscale] if request.upscale else []
        vae = request.use_improved_vae
        pose = any(spec.kind == "pose" and not spec.preprocessed for spec in nets)
        depth = any(spec.kind == "depth" and not spec.preprocessed for spec in nets)
        safety = request.safety_checker
    parts: dict[str, ModelSpec | BundleSpec | None] = {
        "base": base_spec(preset, device, dtype),
        "ranking": ranking_models(preset, device, face_backend=face_backend, identity_backend=identity_backend),
        "improved_vae": improved_vae_spec(preset, device, dtype) if vae else None,
        "pose_estimator": pose_estimator_spec() if pose else None,
        "depth_estimator": depth_estimator_spec() if depth else None,
        "safety_checker": safety_checker_spec(device, dtype) if safety else None,
    }
    parts |= {f"controlnet:{kind}": controlnet_spec(preset, kind, device, dtype) for kind in kinds}
    parts |= {
        f"upscaler_x{factor}": upscaler_spec(preset.upscaler_x2 if factor == 2 else preset.upscaler_x4, device)
        for factor in factors
    }
    return BundleSpec(parts, _build_generation_models)


def _build_generation_models(parts: dict[str, Any]) -> GenerationModels:
    return GenerationModels(
        base=parts["base"],
        ranking=parts["ranking"],
        controlnets={k.removeprefix("controlnet:"): v for k, v in parts.items() if k.startswith("controlnet:")},
        improved_vae=parts["improved_vae"],
        upscalers={int(k.removeprefix("upscaler_x")): v for k, v in parts.items() if k.startswith("upscaler_x")},
        pose_estimator=parts["pose_estimator"],
        depth_estimator=parts["depth_estimator"],
        safety_checker=parts["safety_checker"],
    )


def pipeline_parts(base, vae, sampler: str) -> dict[str, Any]:
    """The modules of a per-request diffusers pipeline over the base: its own VAE and scheduler, no checker."""
    return {"vae": vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer, "unet": base.unet,
            "scheduler": make_scheduler(sampler, base.scheduler.config),
            "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def make_scheduler(name: str, base_config):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(base_config)
    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2
        )
    raise ValueError(name)  # the job contract refuses unknown samplers first


@contextlib.contextmanager
def vae_mode(vae, tiling: bool, slicing: bool) -> Iterator[None]:
    """Tiling/slicing on a shared VAE for one call, then its own settings back."""
    before = (bool(getattr(vae, "use_tiling", False)), bool(getattr(vae, "use_slicing", False)))
    try:
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()
        yield
    finally:
        vae.use_tiling, vae.use_slicing = before


# Condition images of shipped templates (data, not models): the same for every job.
_TEMPLATE_CONDITIONS: OrderedDict[tuple, Image.Image] = OrderedDict()
_TEMPLATE_CONDITIONS_MAX = 64
_TEMPLATE_CONDITIONS_LOCK = threading.Lock()


class GenerationEngine:
    def __init__(
        self,
        preset: ModelPreset,
        models: GenerationModels,
        *,
        batch_size: int = 8,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
    ):
        """Serve ``models`` (loaded or borrowed by the caller; nothing is loaded here).

        ``vae_tiling`` (large images) and ``vae_slicing`` (large batches) are applied to the
        VAE for each call only, so a shared VAE keeps its own settings.
        """
        self.preset = preset
        self.models = models
        self.pipe = models.base
        self.device = self.pipe.device
        self.dtype = self.pipe.unet.dtype
        self.batch_size = batch_size
        self.vae_tiling = vae_tiling
        self.vae_slicing = vae_slicing

    @classmethod
    def load(
        cls,
        preset: ModelPreset,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        request: GenerationSpec | None = None,
        face_backend: str = "blazeface",
        identity_backend: str = "auto",
        **options: Any,
    ) -> GenerationEngine:
        """Load now what ``request`` needs (None: every model the preset ships) and serve it.

        For the CLI and benchmarks; the worker borrows :func:`generation_models` from its manager.
        """
        spec = generation_models(
            preset, resolve_device(device), dtype, request,
            face_backend=face_backend, identity_backend=identity_backend,
        )
        return cls(preset, spec.load(), **options)

    # ------------------------------------------------------------------ the parts a request uses

    def controlnet(self, kind: str):
        try:
            return self.models.controlnets[kind]
        except KeyError:
            raise ModelNotFound(
                f"the {kind} ControlNet was not given to the engine (load it with generation_models)",
                {"kind": kind},
            ) from None

    def vae(self, improved: bool):
        if improved and self.models.improved_vae is not None:
            return self.models.improved_vae
        return self.pipe.vae

    def upscaler(self, factor: int):
        try:
            return self.models.upscalers[factor]
        except KeyError:
            raise ModelNotFound(
                f"the x{factor} upscaler was not given to the engine (load it with generation_models)",
                {"factor": factor},
            ) from None

    def condition(self, spec, width: int, height: int) -> Image.Image:
        """The condition image for one ControlNet spec; shipped templates are computed once per process."""
        key = (spec.kind, spec.template, width, height, spec.preprocessed) if spec.template else None
        if key is not None:
            with _TEMPLATE_CONDITIONS_LOCK:
                if key in _TEMPLATE_CONDITIONS:
                    _TEMPLATE_CONDITIONS.move_to_end(key)
                    return _TEMPLATE_CONDITIONS[key]
        source = Image.open(template_path(spec.template)) if spec.template else spec.image
        estimator = {"pose": self.models.pose_estimator, "depth": self.models.depth_estimator}.get(spec.kind)
        image = condition_image(spec.kind, source, width, height, preprocessed=spec.preprocessed, estimator=estimator)
        if key is not None:
            with _TEMPLATE_CONDITIONS_LOCK:
                _TEMPLATE_CONDITIONS[key] = image
                while len(_TEMPLATE_CONDITIONS) > _TEMPLATE_CONDITIONS_MAX:
                    _TEMPLATE_CONDITIONS.popitem(last=False)
        return image

    def _call_pipeline(self, spec: GenerationSpec):
        """A pipeline object for one request over the (possibly adapter-carrying) base modules.

        Built per call so a request's scheduler, VAE and ControlNets never stay on the base.
        """
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        base = self.pipe
        parts = pipeline_parts(base, self.vae(spec.use_improved_vae), spec.sampler)
        if spec.controlnets:
            nets = [self.controlnet(c.kind) for c in spec.controlnets]
            pipe = StableDiffusionControlNetPipeline(controlnet=nets, **parts)
        else:
            pipe = StableDiffusionPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        spec: GenerationSpec,
        adapter_dir: str | Path | None = None,
        reference_images: Sequence[Image.Image] = (),
        on_progress: ProgressFn | None = None,
        should_stop: CancelFn | None = None,
        tokens: TokenSpec | None = None,
        return_all: bool = False,
    ) -> list[Result]:
        """Generate ``n`` candidates and return the best ``k`` ranked and upscaled.

        ``reference_images`` are the subject's face crops (identity score); ``tokens``
        names the placeholders' words when no adapter is given. ``return_all``: also return
        the candidates that were not delivered (``rank`` 0, not upscaled) after the ranked
        ones, so a report can show every candidate's scores.
        """
        on_progress = on_progress or no_progress
        # 1. Every model the spec needs is here, and the conditions are computed, before any model work
        #    (the spec itself was checked when the job was accepted: likeness.contract.requests).
        for c in spec.controlnets:
            self.controlnet(c.kind)
        upscaler = self.upscaler(spec.upscale) if spec.upscale else None
        safety_checker = self.models.safety_checker
        if spec.safety_checker and safety_checker is None:
            raise ModelNotFound("the request asks for the safety checker, which was not given to the engine")
        width, height = aspect_size(spec.aspect, self.preset.resolution)
        conditions = [self.condition(c, width, height) for c in spec.controlnets]
        raise_if_canceled(should_stop)

        # 2. Attach the subject's adapter; 3. prompts from its tokens; 4. denoise; detach in any case.
        attached = None
        if adapter_dir is not None:
            from pipelines.adapters import attach_adapter

            attached = attach_adapter(self.pipe, adapter_dir)
            tokens = TokenSpec(attached.manifest.instance_token, attached.manifest.class_token)
        tokens = tokens or BASE_TOKENS
        try:
            # The variation follows the seed, so a candidate re-run alone (n=1) gets its prompt back.
            prompts = [
                fill_prompt(
                    spec.prompt_template(spec.seed + i), tokens.instance_token, tokens.class_token
                )
                for i in range(spec.n)
            ]
            images = self.denoise(spec, prompts, width, height, conditions, on_progress, should_stop)
        finally:
            if attached is not None:
                from pipelines.adapters import detach_adapter

                detach_adapter(self.pipe, attached)

        # 5. Safety flags (never blanks an image).
        flags = [False] * len(images)
        if spec.safety_checker:
            flags = list(safety_checker(images))

        # 6. Rank and keep the best k.
        raise_if_canceled(should_stop)
        from pipelines.ranking import RANKING_PRESETS, rank

        ranked = rank(
            images,
            prompts,
            reference_images,
            spec.k,
            self.models.ranking,
            RANKING_PRESETS[spec.ranking],
            instance_token=tokens.instance_token,
            on_progress=on_progress,
            require_one_face=self.preset.require_one_face,
            return_all=return_all,
        )
        delivered = [c for c in ranked if c.rank > 0]

        # 7. Upscale the delivered images.
        upscaled: list[Image.Image | None] = [None] * len(ranked)
        if spec.upscale and delivered:
            raise_if_canceled(should_stop)
            from pipelines.upscale import upscale

            upscaled[: len(delivered)] = upscale(
                [c.image for c in delivered],
                upscaler,
                factor=spec.upscale,
                on_progress=on_progress,
                should_stop=should_stop,
            )

        return [
            Result(
                image=c.image,
                upscaled=up,
                seed=spec.seed + c.index,
                prompt=prompts[c.index],
                negative_prompt=spec.negative_prompt,
                style=spec.style,
                scores=dict(c.scores),
                rank=c.rank,
                flagged=flags[c.index],
                faces=c.faces,
            )
            for c, up in zip(ranked, upscaled)
        ]

    def denoise(
        self,
        spec: GenerationSpec,
        prompts: Sequence[str],
        width: int,
        height: int,
        conditions: Sequence[Image.Image] = (),
        on_progress: ProgressFn | None = None,
        should_stop: CancelFn | None = None,
    ) -> list[Image.Image]:
        """Candidate ``i`` starts from the noise of ``seed + i`` alone, whatever the batch."""
        pipe = self._call_pipeline(spec)
        batch_size = spec.batch_size or self.batch_size
        progress = StageProgress(on_progress, Stage.GENERATING, total=len(prompts) * spec.steps)
        progress.start(f"{len(prompts)} candidates")
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            raise_if_canceled(should_stop)
            batch = list(prompts[start : start + batch_size])
            generators = [
                torch.Generator("cpu").manual_seed(spec.seed + start + i) for i in range(len(batch))
            ]

            batch_len = len(batch)

            def on_step_end(_pipe, step, _timestep, callback_kwargs):
                raise_if_canceled(should_stop)  # Canceled propagates out of the pipeline call
                # Called only while this batch runs, so the loop variable is the right one.
                progress.advance(batch_len, candidates=float(len(images)))  # noqa: B023
                return callback_kwargs

            kwargs = {
                "prompt": batch,
                "negative_prompt": [spec.negative_prompt] * batch_len,
                "width": width,
                "height": height,
                "num_inference_steps": spec.steps,
                "guidance_scale": spec.guidance_scale,
                "generator": generators,
                "callback_on_step_end": on_step_end,
                "output_type": "pil",
            }
            if conditions:
                kwargs["image"] = list(conditions)
                kwargs["controlnet_conditioning_scale"] = [c.scale for c in spec.controlnets]
            with torch.inference_mode(), vae_mode(pipe.vae, self.vae_tiling, self.vae_slicing):
                images.extend(pipe(**kwargs).images)
        return images

class DiffusersSafetyChecker:
    """The Stable Diffusion safety checker, used for its verdict only.

    diffusers' checker blacks out what it flags; we keep the image and return the flag,
    so a false positive is visible and the caller decides what to deliver.
    """

    def __init__(self, model: str = SAFETY_CHECKER_MODEL, device="cpu", dtype=torch.float32):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            self.model = (
                StableDiffusionSafetyChecker.from_pretrained(model, torch_dtype=dtype).to(device).eval()
            )
            self.processor = CLIPImageProcessor.from_pretrained(model)
        except OSError as exc:
            raise ModelNotFound(
                f"safety checker {model!r} could not be loaded: {exc}", {"model": model}
            ) from exc
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[bool]:
        import numpy as np

        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values.to(
            self.device, self.dtype
        )
        arrays = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])
        _, flags = self.model(images=arrays.copy(), clip_input=pixels)
        return [bool(f) for f in flags]


def safety_checker_spec(device: str | torch.device, dtype: torch.dtype, model: str = SAFETY_CHECKER_MODEL) -> ModelSpec:
    return ModelSpec.of("safety_checker", model, device, dtype,
                        lambda: DiffusersSafetyChecker(model, device=device, dtype=dtype))
