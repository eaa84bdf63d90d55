"""The generation engine: text-to-image candidates of one subject, over the shared engine core.

The engine loads nothing: the worker borrows its models from its model manager by
:func:`generation_models`; the CLI and benchmarks call :meth:`GenerationEngine.load`.
What it shares with template mode (the adapter scope, the batched denoising, post-passes, rank,
upscale) is :class:`pipelines.engine.core.EngineCore`; this front end adds the ControlNet
conditions, the prompts of a style and the family's text-to-image pipeline.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from pipelines.engine.components import EngineModels, Needs, engine_models, resolve_device
from pipelines.engine.core import EngineCore
from pipelines.engine.job import BASE_TOKENS, Candidate, Control, Delivery, Job, Result
from pipelines.generation.conditions import condition_image, depth_estimator_spec, pose_estimator_spec
from pipelines.generation.request import GenerationSpec
from pipelines.generation.safety import safety_checker_spec
from pipelines.generation.styles import fill_prompt, template_path
from pipelines.models.presets import ModelPreset
from pipelines.models.specs import BundleSpec
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, no_progress, raise_if_canceled
from pipelines.types import TokenSpec

#: the models generation runs with (one bundle type for every front end)
GenerationModels = EngineModels


def generation_models(
    preset: ModelPreset,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    request: GenerationSpec | None = None,
    *,
    face_backend: str = "blazeface",
    identity_backend: str = "auto",
) -> BundleSpec[EngineModels]:
    """What generating ``request`` with ``preset`` needs (None: everything the preset offers).

    Raises ``ModelNotFound`` for a ControlNet the preset lacks, before anything loads.
    """
    from pipelines.models.loading import default_dtype

    dtype = dtype or default_dtype(resolve_device(device))
    if request is None:  # everything the preset ships: the benchmarks' warm engine
        kinds, factors, vae = tuple(sorted(preset.controlnets)), (2, 4), True
        pose, depth, safety = "pose" in kinds, False, False  # optional extras with their own downloads: on request
    else:
        nets = request.controlnets
        kinds = tuple(sorted({c.kind for c in nets}))
        factors, vae = ((request.upscale,) if request.upscale else ()), request.use_improved_vae
        pose = any(c.kind == "pose" and not c.preprocessed for c in nets)
        depth = any(c.kind == "depth" and not c.preprocessed for c in nets)
        safety = request.safety_checker
    extras = {
        "pose_estimator": pose_estimator_spec() if pose else None,
        "depth_estimator": depth_estimator_spec() if depth else None,
        "safety_checker": safety_checker_spec(str(resolve_device(device)), dtype) if safety else None,
    }
    return engine_models(preset, device, dtype, Needs(kinds, factors, vae, extras),
                         face_backend=face_backend, identity_backend=identity_backend)


# Condition images of shipped templates (data, not models): the same for every job.
_TEMPLATE_CONDITIONS: OrderedDict[tuple, Image.Image] = OrderedDict()
_TEMPLATE_CONDITIONS_MAX = 64
_TEMPLATE_CONDITIONS_LOCK = threading.Lock()


class GenerationEngine(EngineCore):
    models_for = staticmethod(generation_models)

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

    def check_inputs(self, spec: GenerationSpec) -> None:
        """Every model the spec needs is here and its aspect is the family's (before any model work).

        The spec itself was checked when the job was accepted (``likeness.contract.requests``).
        """
        for c in spec.controlnets:
            self.controlnet(c.kind)
        self.check_delivery(self.delivery(spec))
        self.size(spec.aspect)

    @staticmethod
    def delivery(spec: GenerationSpec) -> Delivery:
        return Delivery(k=spec.k, ranking=spec.ranking, upscale=spec.upscale, negative_prompt=spec.negative_prompt,
                        style=spec.style, safety_check=spec.safety_checker, face_refine=spec.face_refine)

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

        ``reference_images`` are the subject's face crops (identity score); ``tokens`` names the
        placeholders' words when no adapter is given. ``return_all``: also return the candidates
        that were not delivered (``rank`` 0, not upscaled) after the ranked ones.
        """
        # 1. Check inputs.
        self.check_inputs(spec)
        # 2. The size and the ControlNet conditions, before any model work.
        width, height = self.size(spec.aspect)
        controls = [Control(c.kind, self.condition(c, width, height), c.scale) for c in spec.controlnets]
        raise_if_canceled(should_stop)
        job = Job(spec, self.delivery(spec), adapter_dir, reference_images, tokens, on_progress or no_progress,
                  should_stop, return_all)

        # 3. Prompts from the adapter's tokens (the variation follows the seed, so a candidate re-run
        #    alone with n=1 gets its prompt back); 4. denoise every candidate.
        def render(tokens: TokenSpec) -> list[Candidate]:
            seeds = [spec.seed + i for i in range(spec.n)]
            prompts = [fill_prompt(spec.prompt_template(seed), tokens.instance_token, tokens.class_token)
                       for seed in seeds]
            images = self.denoise(spec, prompts, width, height, controls, job.on_progress, should_stop)
            return [Candidate(image, seed, prompt) for image, seed, prompt in zip(images, seeds, prompts)]

        # 5. The adapter attached around 3-4 and the post-passes, detached in any case; then safety
        #    flags, rank, upscale the best k.
        return self.produce(job, render)

    def denoise(
        self,
        spec: GenerationSpec,
        prompts: Sequence[str],
        width: int,
        height: int,
        controls: Sequence[Control] = (),
        on_progress: ProgressFn | None = None,
        should_stop: CancelFn | None = None,
    ) -> list[Image.Image]:
        """Candidate ``i`` starts from the noise of ``seed + i`` alone, whatever the batch."""
        pipe, call = self.pipeline("text_to_image", spec, controls)
        progress = StageProgress(on_progress, Stage.GENERATING, total=len(prompts) * spec.steps)
        progress.start(f"{len(prompts)} candidates")
        seeds = [spec.seed + i for i in range(len(prompts))]
        return self.render(pipe, spec, prompts, seeds, progress, should_stop, width=width, height=height, **call)


__all__ = ["BASE_TOKENS", "GenerationEngine", "GenerationModels", "Result", "generation_models"]
