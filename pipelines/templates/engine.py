"""Template mode: put a trained subject into a template photo.

The engine loads nothing. Its models come from the caller as a :class:`TemplateModels`
bundle (the worker borrows it from its model manager by :func:`template_models`; the CLI
and benchmarks call :meth:`TemplateEngine.load`): the base pipeline shared with training
and text-to-image, the pose and canny ControlNets, the ranking models, the upscaler and
the detectors that place the face (:mod:`pipelines.templates.masking`).

Per job: :meth:`TemplateEngine.prepare` judges and places the template once (``masking``
stage). :meth:`TemplateEngine.run` then, on the engine core shared with ``GenerationEngine``
(:mod:`pipelines.engine.core`):

1. checks the spec against the models, builds the crop, its inpainting mask and the
   ControlNet conditions (the template's OpenPose skeleton and canny edges);
2. attaches the subject's adapter to the base (and detaches it in any case: the base is
   bit-for-bit unchanged afterwards);
3. inpaints the crop for every candidate (the model family's ControlNet inpainting pipeline,
   built per call over the base's modules, strength ~0.45: the composition stays the template's),
   matches the new face's colours to the template's (Lab, inside the mask) and pastes the
   crop back through the feathered mask: outside it every pixel is the template's own;
4. optionally redraws the face alone at higher resolution (a second, weaker pass);
5. runs the post-passes, ranks (identity to the subject's crops weighs most) and upscales the best k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.engine.components import EngineModels, Needs, engine_models, resolve_device
from pipelines.engine.core import EngineCore
from pipelines.engine.job import Candidate, Control, Delivery, Job, Result
from pipelines.errors import InvalidConfig
from pipelines.generation.styles import fill_prompt
from pipelines.models.presets import ModelPreset
from pipelines.models.specs import BundleSpec
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, no_progress, raise_if_canceled
from pipelines.templates.masking import (
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

#: the models template mode runs with (one bundle type for every front end; ``masking`` is set)
TemplateModels = EngineModels


def template_models(preset: ModelPreset, device: str | torch.device, dtype: torch.dtype | None = None,
                    spec: TemplateSpec | None = None, *, face_backend: str = "blazeface",
                    identity_backend: str = "auto") -> BundleSpec[EngineModels]:
    """What running ``spec`` with ``preset`` needs (None: everything template mode can use).

    Raises ``ModelNotFound`` for a ControlNet the preset lacks, before anything loads.
    """
    kinds = CONTROLNET_KINDS if spec is None else _kinds(spec)
    factors = (2, 4) if spec is None else ((spec.upscale,) if spec.upscale else ())
    vae = spec is None or spec.use_improved_vae
    masking = masking_models(str(resolve_device(device)), face_backend=face_backend)
    return engine_models(preset, device, dtype, Needs(tuple(kinds), factors, vae, {"masking": masking}),
                         face_backend=face_backend, identity_backend=identity_backend)


def _kinds(spec: TemplateSpec) -> list[str]:
    scales = {"pose": spec.pose_scale, "canny": spec.edge_scale}
    return [kind for kind in CONTROLNET_KINDS if scales[kind] > 0]


@dataclass
class _Pass:
    """One inpainting pass over every candidate: where, how strongly, with which ControlNets.

    A pose with too few keypoints in the crop is left out of ``controls``."""

    region: Region
    strength: float
    controls: list[Control]


class TemplateEngine(EngineCore):
    models_for = staticmethod(template_models)

    @property
    def resolution(self) -> int:
        """The side of the square crop each pass inpaints: the preset's (the family's native) resolution."""
        return self.preset.resolution

    # ------------------------------------------------------------------ prepare

    def prepare(self, image: Image.Image, on_progress: ProgressFn | None = None,
                should_stop: CancelFn | None = None) -> PreparedTemplate:
        """The ``masking`` stage: judge the template and place the face (raises ``TemplateRejected``)."""
        return prepare_template(image, self.models.masking, on_progress=on_progress, should_stop=should_stop)

    def _pass(self, spec: TemplateSpec, prepared: PreparedTemplate, region: Region, strength: float) -> _Pass:
        crop = region.crop_image(prepared.image, self.resolution)
        controls: list[Control] = []
        pose = pose_condition(prepared, region, self.resolution) if spec.pose_scale > 0 else None
        if pose is not None:
            controls.append(Control("pose", pose, spec.pose_scale))
        if spec.edge_scale > 0:
            controls.append(Control("canny", edge_condition(crop), spec.edge_scale))
        return _Pass(region, strength, controls)

    # ------------------------------------------------------------------ run

    @staticmethod
    def delivery(spec: TemplateSpec) -> Delivery:
        return Delivery(k=spec.k, ranking=spec.ranking, upscale=spec.upscale, negative_prompt=spec.negative_prompt,
                        style=spec.style_label, face_refine=spec.face_refine)

    def check_inputs(self, spec: TemplateSpec) -> None:
        """Every model the spec needs is here, and each pass runs at least one step (before any model work)."""
        for kind in _kinds(spec):
            self.controlnet(kind)
        self.check_delivery(self.delivery(spec))
        if spec.first_pass_steps < 1 or (spec.second_pass and spec.second_pass_steps < 1):
            raise InvalidConfig("steps x strength must be at least 1 for every pass",
                                {"steps": spec.steps, "strength": spec.strength}, code="invalid_strength")

    def run(self, spec: TemplateSpec, prepared: PreparedTemplate, adapter_dir: str | Path | None = None,
            reference_images: Sequence[Image.Image] = (), on_progress: ProgressFn | None = None,
            should_stop: CancelFn | None = None, tokens: TokenSpec | None = None,
            return_all: bool = False) -> list[Result]:
        """``n`` candidates of the subject in ``prepared``; the best ``k`` ranked and upscaled.

        Each result's ``image`` has the template's size. ``return_all``: the candidates that were
        not delivered follow (rank 0, not upscaled).
        """
        # 1. Check inputs.
        self.check_inputs(spec)
        # 2. Crops and conditions of every pass, before any model work.
        passes = [self._pass(spec, prepared, prepared.region, spec.strength)]
        if spec.second_pass:
            passes.append(self._pass(spec, prepared, prepared.face_region, spec.second_pass_strength))
        raise_if_canceled(should_stop)
        job = Job(spec, self.delivery(spec), adapter_dir, reference_images, tokens, on_progress or no_progress,
                  should_stop, return_all)

        # 3. Inpaint every candidate's crop, match its colours, paste it back; 4. the second pass.
        def render(tokens: TokenSpec) -> list[Candidate]:
            prompt = fill_prompt(spec.prompt, tokens.instance_token, tokens.class_token)
            progress = StageProgress(job.on_progress, Stage.GENERATING,
                                     total=spec.n * (spec.first_pass_steps + spec.second_pass_steps))
            progress.start(f"{spec.n} candidates in {spec.template}")
            images = [prepared.image] * spec.n
            for one in passes:
                images = self.composite(spec, prepared, one, images, prompt, progress, should_stop)
            return [Candidate(image, spec.seed + i, prompt) for i, image in enumerate(images)]

        # 5. The adapter attached around 3-4 and the post-passes, detached in any case; then rank and
        #    upscale the best k.
        return self.produce(job, render)

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
        """Candidate ``i`` starts from the noise of ``seed + i`` alone, whatever the batch.

        The base U-Net has 4 input channels: the pipeline keeps the crop outside the mask by blending
        the noised original latents at every step. Each candidate's own crop is encoded with its own
        generator."""
        pipe, call = self.pipeline("inpaint", spec, one.controls)
        seeds = [spec.seed + i for i in range(len(crops))]
        return self.render(pipe, spec, [prompt] * len(crops), seeds, progress, should_stop,
                           per_candidate={"image": crops}, mask_image=one.region.inpaint_mask(self.resolution),
                           width=self.resolution, height=self.resolution, strength=one.strength, **call)


def changed_pixels(template: Image.Image, result: Image.Image) -> np.ndarray:
    """Where ``result`` differs from ``template`` (bool, height x width): for reports and tests."""
    return np.any(np.asarray(template.convert("RGB")) != np.asarray(result.convert("RGB")), axis=-1)


__all__ = ["CONTROLNET_KINDS", "TemplateEngine", "TemplateModels", "changed_pixels", "template_models"]
