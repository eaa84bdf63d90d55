"""Template mode: put a trained subject into a template photo.

The engine loads nothing. Its models come from the caller as a :class:`TemplateModels`
bundle (the worker borrows it from its model manager by :func:`template_models`; the CLI
and benchmarks call :meth:`TemplateEngine.load`): the base pipeline shared with training
and text-to-image, the pose and canny ControlNets, the ranking models, the upscaler and
the detectors that place the face (:mod:`pipelines.templates.masking`).

Per job: :meth:`TemplateEngine.prepare` judges and places the template once (``masking``
stage). :meth:`TemplateEngine.run` then, like ``GenerationEngine.generate``:

1. checks the spec against the models, builds the crop, its inpainting mask and the
   ControlNet conditions (the template's OpenPose skeleton and canny edges);
2. attaches the subject's adapter to the base (and detaches it in any case: the base is
   bit-for-bit unchanged afterwards);
3. inpaints the crop for every candidate (``StableDiffusionControlNetInpaintPipeline`` built
   per call over the base's modules, strength ~0.45: the composition stays the template's),
   matches the new face's colours to the template's (Lab, inside the mask) and pastes the
   crop back through the feathered mask: outside it every pixel is the template's own;
4. optionally redraws the face alone at higher resolution (a second, weaker pass);
5. ranks (identity to the subject's crops weighs most) and upscales the best k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.errors import InvalidConfig, ModelNotFound
from pipelines.generation.engine import BASE_TOKENS, Result, pipeline_parts, resolve_device, vae_mode
from pipelines.generation.styles import fill_prompt
from pipelines.models.presets import ModelPreset
from pipelines.models.specs import BundleSpec, ModelSpec
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, no_progress, raise_if_canceled
from pipelines.ranking import RankingModels
from pipelines.templates.masking import (
    MaskingModels,
    PreparedTemplate,
    Region,
    edge_condition,
    lab_color_transfer,
    masking_models,
    paste,
    pose_condition,
    prepare_template,
)
from pipelines.templates.spec import TemplateSpec
from pipelines.types import TokenSpec

#: the ControlNets template mode uses: the template's pose, and its edges (which carry its light)
CONTROLNET_KINDS = ("pose", "canny")


@dataclass
class TemplateModels:
    """Everything template mode runs with, loaded (or borrowed) by the caller."""

    base: Any  # the base StableDiffusionPipeline (shared with training and generation; lent, never kept changed)
    ranking: RankingModels
    masking: MaskingModels
    controlnets: Mapping[str, Any] = field(default_factory=dict)  # "pose", "canny" -> ControlNetModel
    improved_vae: Any = None  # sd-vae-ft-mse; None: the base VAE
    upscalers: Mapping[int, Any] = field(default_factory=dict)


def template_models(
    preset: ModelPreset,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    spec: TemplateSpec | None = None,
    *,
    face_backend: str = "blazeface",
    identity_backend: str = "auto",
) -> BundleSpec[TemplateModels]:
    """What running ``spec`` with ``preset`` needs (None: everything template mode can use).

    Raises ``ModelNotFound`` for a ControlNet the preset lacks, before anything loads.
    """
    from pipelines.models.loading import base_spec, controlnet_spec, default_dtype, improved_vae_spec
    from pipelines.ranking import ranking_models
    from pipelines.upscale import upscaler_spec

    device = str(resolve_device(device))
    dtype = dtype or default_dtype(device)
    kinds = list(CONTROLNET_KINDS) if spec is None else _kinds(spec)
    if missing := [kind for kind in kinds if kind not in preset.controlnets]:
        raise ModelNotFound(f"the {preset.name} preset has no ControlNet for {missing}", {"kinds": missing})
    factors = [2, 4] if spec is None else ([spec.upscale] if spec.upscale else [])
    vae = spec is None or spec.use_improved_vae
    parts: dict[str, ModelSpec | BundleSpec | None] = {
        "base": base_spec(preset, device, dtype),
        "ranking": ranking_models(preset, device, face_backend=face_backend, identity_backend=identity_backend),
        "masking": masking_models(device, face_backend=face_backend),
        "improved_vae": improved_vae_spec(preset, device, dtype) if vae else None,
    }
    parts |= {f"controlnet:{kind}": controlnet_spec(preset, kind, device, dtype) for kind in kinds}
    parts |= {
        f"upscaler_x{factor}": upscaler_spec(preset.upscaler_x2 if factor == 2 else preset.upscaler_x4, device)
        for factor in factors
    }
    return BundleSpec(parts, _build)


def _kinds(spec: TemplateSpec) -> list[str]:
    scales = {"pose": spec.pose_scale, "canny": spec.edge_scale}
    return [kind for kind in CONTROLNET_KINDS if scales[kind] > 0]


def _build(parts: dict[str, Any]) -> TemplateModels:
    return TemplateModels(
        base=parts["base"],
        ranking=parts["ranking"],
        masking=parts["masking"],
        controlnets={k.removeprefix("controlnet:"): v for k, v in parts.items() if k.startswith("controlnet:")},
        improved_vae=parts["improved_vae"],
        upscalers={int(k.removeprefix("upscaler_x")): v for k, v in parts.items() if k.startswith("upscaler_x")},
    )


@dataclass
class _Pass:
    """One inpainting pass over every candidate: where, with what conditions, how strongly."""

    region: Region
    strength: float
    kinds: list[str]  # ControlNets used (a pose with too few keypoints in the crop is left out)
    conditions: list[Image.Image]
    scales: list[float]


class TemplateEngine:
    def __init__(self, preset: ModelPreset, models: TemplateModels, *, batch_size: int = 8,
                 vae_tiling: bool = False, vae_slicing: bool = False):
        """Serve ``models`` (loaded or borrowed by the caller; nothing is loaded here)."""
        self.preset = preset
        self.models = models
        self.pipe = models.base
        self.resolution = preset.resolution
        self.batch_size = batch_size
        self.vae_tiling = vae_tiling
        self.vae_slicing = vae_slicing

    @classmethod
    def load(cls, preset: ModelPreset, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             *, spec: TemplateSpec | None = None, face_backend: str = "blazeface", identity_backend: str = "auto",
             **options: Any) -> TemplateEngine:
        """Load now what ``spec`` needs (None: everything) and serve it: for the CLI and benchmarks."""
        bundle = template_models(preset, resolve_device(device), dtype, spec, face_backend=face_backend,
                                 identity_backend=identity_backend)
        return cls(preset, bundle.load(), **options)

    # ------------------------------------------------------------------ parts

    def controlnet(self, kind: str):
        try:
            return self.models.controlnets[kind]
        except KeyError:
            raise ModelNotFound(f"the {kind} ControlNet was not given to the engine (load it with template_models)",
                                {"kind": kind}) from None

    def upscaler(self, factor: int):
        try:
            return self.models.upscalers[factor]
        except KeyError:
            raise ModelNotFound(f"the x{factor} upscaler was not given to the engine (load it with "
                                "template_models)", {"factor": factor}) from None

    def vae(self, improved: bool):
        if improved and self.models.improved_vae is not None:
            return self.models.improved_vae
        return self.pipe.vae

    def _call_pipeline(self, spec: TemplateSpec, kinds: Sequence[str]):
        """An inpainting pipeline for one pass over the (possibly adapter-carrying) base modules.

        Built per call, like ``GenerationEngine._call_pipeline``, so its scheduler, VAE and
        ControlNets never stay on the base. The base U-Net has 4 input channels: the pipeline
        keeps the crop outside the mask by blending the noised original latents at every step.
        """
        from diffusers import StableDiffusionControlNetInpaintPipeline, StableDiffusionInpaintPipeline

        base = self.pipe
        parts = pipeline_parts(base, self.vae(spec.use_improved_vae), spec.sampler)
        if kinds:
            nets = [self.controlnet(kind) for kind in kinds]
            pipe = StableDiffusionControlNetInpaintPipeline(controlnet=nets if len(nets) > 1 else nets[0], **parts)
        else:
            pipe = StableDiffusionInpaintPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ prepare

    def prepare(self, image: Image.Image, on_progress: ProgressFn | None = None,
                should_stop: CancelFn | None = None) -> PreparedTemplate:
        """The ``masking`` stage: judge the template and place the face (raises ``TemplateRejected``)."""
        return prepare_template(image, self.models.masking, on_progress=on_progress, should_stop=should_stop)

    def _pass(self, spec: TemplateSpec, prepared: PreparedTemplate, region: Region, strength: float) -> _Pass:
        crop = region.crop_image(prepared.image, self.resolution)
        nets: list[tuple[str, Image.Image, float]] = []
        pose = pose_condition(prepared, region, self.resolution) if spec.pose_scale > 0 else None
        if pose is not None:
            nets.append(("pose", pose, spec.pose_scale))
        if spec.edge_scale > 0:
            nets.append(("canny", edge_condition(crop), spec.edge_scale))
        return _Pass(region, strength, [n[0] for n in nets], [n[1] for n in nets], [n[2] for n in nets])

    # ------------------------------------------------------------------ run

    def check_inputs(self, spec: TemplateSpec) -> None:
        """Every model the spec needs is here, and each pass runs at least one step (before any model work)."""
        for kind in _kinds(spec):
            self.controlnet(kind)
        if spec.upscale:
            self.upscaler(spec.upscale)
        if spec.first_pass_steps < 1 or (spec.second_pass and spec.second_pass_steps < 1):
            raise InvalidConfig("steps x strength must be at least 1 for every pass",
                                {"steps": spec.steps, "strength": spec.strength}, code="invalid_strength")

    def run(
        self,
        spec: TemplateSpec,
        prepared: PreparedTemplate,
        adapter_dir: str | Path | None = None,
        reference_images: Sequence[Image.Image] = (),
        on_progress: ProgressFn | None = None,
        should_stop: CancelFn | None = None,
        tokens: TokenSpec | None = None,
        return_all: bool = False,
    ) -> list[Result]:
        """``n`` candidates of the subject in ``prepared``; the best ``k`` ranked and upscaled.

        Each result's ``image`` has the template's size. ``return_all``: the candidates that were
        not delivered follow (rank 0, not upscaled).
        """
        on_progress = on_progress or no_progress
        # 1. Inputs, crops and conditions before any model work.
        self.check_inputs(spec)
        passes = [self._pass(spec, prepared, prepared.region, spec.strength)]
        if spec.second_pass:
            passes.append(self._pass(spec, prepared, prepared.face_region, spec.second_pass_strength))
        raise_if_canceled(should_stop)

        # 2. Attach the subject's adapter; 3. inpaint, match colours, paste back; 4. second pass; detach in any case.
        attached = None
        if adapter_dir is not None:
            from pipelines.adapters import attach_adapter

            attached = attach_adapter(self.pipe, adapter_dir)
            tokens = TokenSpec(attached.manifest.instance_token, attached.manifest.class_token)
        tokens = tokens or BASE_TOKENS
        prompt = fill_prompt(spec.prompt, tokens.instance_token, tokens.class_token)
        progress = StageProgress(on_progress, Stage.GENERATING,
                                 total=spec.n * (spec.first_pass_steps + spec.second_pass_steps))
        progress.start(f"{spec.n} candidates in {spec.template}")
        try:
            images = [prepared.image] * spec.n
            for one in passes:
                images = self.composite(spec, prepared, one, images, prompt, progress, should_stop)
        finally:
            if attached is not None:
                from pipelines.adapters import detach_adapter

                detach_adapter(self.pipe, attached)

        # 5. Rank and keep the best k; 6. upscale them.
        raise_if_canceled(should_stop)
        from pipelines.ranking import RANKING_PRESETS, rank

        prompts = [prompt] * spec.n
        ranked = rank(images, prompts, reference_images, spec.k, self.models.ranking, RANKING_PRESETS[spec.ranking],
                      instance_token=tokens.instance_token, on_progress=on_progress,
                      require_one_face=self.preset.require_one_face, return_all=return_all)
        delivered = [c for c in ranked if c.rank > 0]
        upscaled: list[Image.Image | None] = [None] * len(ranked)
        if spec.upscale and delivered:
            raise_if_canceled(should_stop)
            from pipelines.upscale import upscale

            upscaled[: len(delivered)] = upscale([c.image for c in delivered], self.upscaler(spec.upscale),
                                                 factor=spec.upscale, on_progress=on_progress,
                                                 should_stop=should_stop)
        return [
            Result(image=c.image, upscaled=up, seed=spec.seed + c.index, prompt=prompt,
                   negative_prompt=spec.negative_prompt, style=spec.style_label, scores=dict(c.scores), rank=c.rank,
                   faces=c.faces)
            for c, up in zip(ranked, upscaled)
        ]

    def composite(self, spec: TemplateSpec, prepared: PreparedTemplate, one: _Pass, images: Sequence[Image.Image],
                  prompt: str, progress: StageProgress, should_stop: CancelFn | None) -> list[Image.Image]:
        """One pass: inpaint each candidate's crop, match its colours to the template's, paste it back."""
        crops = [one.region.crop_image(image, self.resolution) for image in images]
        generated = self.inpaint(spec, one, crops, prompt, progress, should_stop)
        reference = one.region.crop_image(prepared.image, self.resolution)
        soft = one.region.crop_mask(self.resolution)
        out = []
        for image, crop in zip(images, generated):
            if spec.color_transfer:
                crop = lab_color_transfer(crop, reference, soft)
            out.append(paste(image, crop, one.region))
        return out

    def inpaint(self, spec: TemplateSpec, one: _Pass, crops: Sequence[Image.Image], prompt: str,
                progress: StageProgress, should_stop: CancelFn | None) -> list[Image.Image]:
        """Candidate ``i`` starts from the noise of ``seed + i`` alone, whatever the batch."""
        pipe = self._call_pipeline(spec, one.kinds)
        mask = one.region.inpaint_mask(self.resolution)
        batch_size = spec.batch_size or self.batch_size
        out: list[Image.Image] = []
        for start in range(0, len(crops), batch_size):
            raise_if_canceled(should_stop)
            batch = list(crops[start : start + batch_size])
            generators = [torch.Generator("cpu").manual_seed(spec.seed + start + i) for i in range(len(batch))]
            batch_len = len(batch)

            def on_step_end(_pipe, _step, _timestep, callback_kwargs):
                raise_if_canceled(should_stop)  # Canceled propagates out of the pipeline call
                progress.advance(batch_len)  # noqa: B023 - called only while this batch runs
                return callback_kwargs

            kwargs: dict[str, Any] = {
                "prompt": [prompt] * batch_len,
                "negative_prompt": [spec.negative_prompt] * batch_len,
                "image": batch,  # one per candidate: each candidate's generator encodes its own latents
                "mask_image": mask,
                "width": self.resolution,
                "height": self.resolution,
                "strength": one.strength,
                "num_inference_steps": spec.steps,
                "guidance_scale": spec.guidance_scale,
                "generator": generators,
                "callback_on_step_end": on_step_end,
                "output_type": "pil",
            }
            if one.kinds:
                single = len(one.kinds) == 1
                kwargs["control_image"] = one.conditions[0] if single else list(one.conditions)
                kwargs["controlnet_conditioning_scale"] = one.scales[0] if single else list(one.scales)
            with torch.inference_mode(), vae_mode(pipe.vae, self.vae_tiling, self.vae_slicing):
                out.extend(pipe(**kwargs).images)
        return out


def changed_pixels(template: Image.Image, result: Image.Image) -> np.ndarray:
    """Where ``result`` differs from ``template`` (bool, height x width): for reports and tests."""
    return np.any(np.asarray(template.convert("RGB")) != np.asarray(result.convert("RGB")), axis=-1)


__all__ = ["CONTROLNET_KINDS", "TemplateEngine", "TemplateModels", "changed_pixels", "template_models"]
