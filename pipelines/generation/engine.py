"""The warm generation engine: one base pipeline per worker, many subjects in turn.

``GenerationEngine`` loads the base model (U-Net, text encoder, VAE) once; ControlNets
and the improved VAE on first use. ``generate`` lends the pipeline to one subject:
attach the adapter, denoise every candidate, detach (the base is bit-for-bit unchanged),
rank, upscale the best k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pipelines.errors import ModelNotFound
from pipelines.generation.conditions import condition_image
from pipelines.generation.request import GenerationSpec, aspect_size
from pipelines.generation.styles import fill_prompt, template_path
from pipelines.models.presets import ModelPreset
from pipelines.progress import (
    CancelFn,
    ProgressFn,
    Stage,
    StageProgress,
    no_progress,
    raise_if_canceled,
)
from pipelines.types import TokenSpec

# Prompt tokens for base-model generation (no adapter): the placeholders become plain words.
BASE_TOKENS = TokenSpec(instance_token="", class_token="person")

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    raise ValueError(name)  # check_request refuses unknown samplers first


class GenerationEngine:
    def __init__(
        self,
        preset: ModelPreset,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        batch_size: int = 8,
        channels_last: bool = False,
        compile: bool = False,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
        safety_checker: SafetyCheckFn | None = None,
        face_embedder=None,
        face_detector: Callable[[Image.Image], list] | None = None,
        pipeline=None,
    ):
        """``pipeline``: an already built StableDiffusionPipeline to serve instead of loading
        ``preset.base_model`` (benchmarks with random weights, custom loaders)."""
        self.preset = preset
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.batch_size = batch_size
        self.face_embedder = face_embedder if face_embedder is not None else "auto"
        self.face_detector = face_detector  # None: the bundled BlazeFace detector
        self._safety_checker = safety_checker
        self.pipe = pipeline.to(self.device, self.dtype) if pipeline is not None else self._load_base()
        self.pipe.set_progress_bar_config(disable=True)
        # diffusers uses SDPA (AttnProcessor2_0) by default on torch 2; keep it explicit.
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.pipe.unet.set_attn_processor(AttnProcessor2_0())
        if channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
        if compile:
            self.pipe.unet.compile(mode="max-autotune-no-cudagraphs", fullgraph=False)
        if vae_tiling:  # large images: decode in overlapping tiles
            self.pipe.vae.enable_tiling()
        if vae_slicing:  # large batches: decode one image at a time
            self.pipe.vae.enable_slicing()
        self._base_vae = self.pipe.vae
        self._improved_vae = None
        self._controlnets: dict[str, torch.nn.Module] = {}
        self._conditions: dict[tuple, Image.Image] = {}

    def _load_base(self):
        from pipelines.models.loading import load_base_pipeline

        return load_base_pipeline(self.preset, self.device, self.dtype)

    # ------------------------------------------------------------------ lazily loaded parts

    def controlnet(self, kind: str):
        if kind not in self._controlnets:
            from diffusers import ControlNetModel

            source = self.preset.controlnets.get(kind)
            if source is None:
                raise ModelNotFound(f"the {self.preset.name} preset has no {kind} ControlNet", {"kind": kind})
            model = ControlNetModel.from_pretrained(source, torch_dtype=self.dtype)
            self._controlnets[kind] = model.to(self.device).eval()
        return self._controlnets[kind]

    def vae(self, improved: bool):
        if not improved or self.preset.vae is None:
            return self._base_vae
        if self._improved_vae is None:
            from diffusers import AutoencoderKL

            vae = (
                AutoencoderKL.from_pretrained(self.preset.vae, torch_dtype=self.dtype).to(self.device).eval()
            )
            if self._base_vae.use_tiling:
                vae.enable_tiling()
            if self._base_vae.use_slicing:
                vae.enable_slicing()
            self._improved_vae = vae
        return self._improved_vae

    def condition(self, spec, width: int, height: int) -> Image.Image:
        """The condition image for one ControlNet spec; shipped templates are cached."""
        key = (spec.kind, spec.template, width, height) if spec.template else None
        if key is not None and key in self._conditions:
            return self._conditions[key]
        source = Image.open(template_path(spec.template)) if spec.template else spec.image
        image = condition_image(spec.kind, source, width, height, preprocessed=spec.preprocessed)
        if key is not None:
            self._conditions[key] = image
        return image

    def _call_pipeline(self, spec: GenerationSpec):
        """A pipeline object for one request over the (possibly adapter-carrying) base modules.

        Built per call so a request's scheduler, VAE and ControlNets never stay on the base.
        """
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        base = self.pipe
        parts = {
            "vae": self.vae(spec.use_improved_vae),
            "text_encoder": base.text_encoder,
            "tokenizer": base.tokenizer,
            "unet": base.unet,
            "scheduler": make_scheduler(spec.sampler, base.scheduler.config),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
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
        # 1. Conditions before touching the pipeline (the spec was checked when the job was accepted).
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
            flags = list(self.safety_checker()(images))

        # 6. Rank and keep the best k.
        raise_if_canceled(should_stop)
        from pipelines.ranking import RANKING_PRESETS, rank

        ranked = rank(
            images,
            prompts,
            reference_images,
            spec.k,
            weights=RANKING_PRESETS[spec.ranking],
            clip=self.preset.clip,
            aesthetic=self.preset.aesthetic_head,
            instance_token=tokens.instance_token,
            face_embedder=self.face_embedder,
            face_detector=self.face_detector,
            device=str(self.device),
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

            model_path = self.preset.upscaler_x2 if spec.upscale == 2 else self.preset.upscaler_x4
            upscaled[: len(delivered)] = upscale(
                [c.image for c in delivered],
                factor=spec.upscale,
                model_path=model_path,
                device=str(self.device),
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
        pipe = self._call_pipeline(spec)  # outside inference mode: lazily loaded nets stay normal tensors
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
            with torch.inference_mode():
                images.extend(pipe(**kwargs).images)
        return images

    # ------------------------------------------------------------------ safety

    def safety_checker(self) -> SafetyCheckFn:
        if self._safety_checker is None:
            self._safety_checker = DiffusersSafetyChecker(device=self.device, dtype=self.dtype)
        return self._safety_checker


class DiffusersSafetyChecker:
    """The Stable Diffusion safety checker, used for its verdict only.

    diffusers' checker blacks out what it flags; we keep the image and return the flag,
    so a false positive is visible and the caller decides what to deliver.
    """

    def __init__(
        self, model: str = "CompVis/stable-diffusion-safety-checker", device="cpu", dtype=torch.float32
    ):
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
