"""The engine core: lend the base to one subject, render candidates, and deliver the best.

A front end (generation, templates) says how its candidates are rendered; everything around that
is here, once:

1. :meth:`EngineCore.adapter_scope` attaches the subject's adapter and detaches it in any case
   (the base is bit-for-bit unchanged afterwards: weights, tokenizers, attention processors);
2. the front end renders candidates inside the scope, with :meth:`EngineCore.pipeline` (the model
   family's diffusers class over the base's modules) and :meth:`EngineCore.render` (batches, each
   candidate from the noise of its own seed, progress and cancel at every step);
3. the post-passes (:data:`pipelines.engine.postpasses.POST_PASSES`) run over every candidate, still
   inside the scope, so a pass re-rendering with the subject's adapter borrows the same models;
4. :meth:`EngineCore.deliver`: safety flags, rank, upscale the best ``k``, one :class:`Result` each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from pipelines.engine.components import EngineModels, build_pipeline, make_scheduler, resolve_device, vae_mode
from pipelines.engine.job import BASE_TOKENS, Candidate, Control, Delivery, Job, PostPass, RenderSpec, Result
from pipelines.engine.postpasses import POST_PASSES
from pipelines.errors import ModelNotFound
from pipelines.models.presets import ModelPreset
from pipelines.progress import CancelFn, StageProgress, raise_if_canceled
from pipelines.types import TokenSpec


class EngineCore:
    """Serve ``models`` (loaded or borrowed by the caller; nothing is loaded here)."""

    #: the front end's ``(preset, device, dtype, request, *, face_backend, identity_backend) -> BundleSpec``
    models_for: Callable[..., Any]

    def __init__(self, preset: ModelPreset, models: EngineModels, *, batch_size: int = 8,
                 vae_tiling: bool = False, vae_slicing: bool = False,
                 post_passes: Sequence[PostPass] | None = None):
        """``vae_tiling`` (large images) and ``vae_slicing`` (large batches) are applied to the VAE for
        each call only, so a shared VAE keeps its own settings. ``post_passes``: None for the standard
        list (:data:`pipelines.engine.postpasses.POST_PASSES`)."""
        self.preset = preset
        self.family = preset.family
        self.models = models
        self.pipe = models.base
        self.device = self.pipe.device
        self.dtype = self.pipe.unet.dtype
        self.batch_size = batch_size
        self.vae_tiling = vae_tiling
        self.vae_slicing = vae_slicing
        self.post_passes = tuple(POST_PASSES if post_passes is None else post_passes)

    @classmethod
    def load(cls, preset: ModelPreset, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             *, request: Any = None, face_backend: str = "blazeface", identity_backend: str = "auto",
             **options: Any) -> Self:
        """Load now what ``request`` needs (None: every model the front end can use) and serve it.

        For the CLI and benchmarks; the worker borrows the front end's ``models_for`` bundle from its manager.
        """
        bundle = cls.models_for(preset, resolve_device(device), dtype, request, face_backend=face_backend,
                                identity_backend=identity_backend)
        return cls(preset, bundle.load(), **options)

    # ------------------------------------------------------------------ the parts a request uses

    def controlnet(self, kind: str):
        try:
            return self.models.controlnets[kind]
        except KeyError:
            raise ModelNotFound(f"the {kind} ControlNet was not given to the engine", {"kind": kind}) from None

    def vae(self, improved: bool):
        if improved and self.models.improved_vae is not None:
            return self.models.improved_vae
        return self.pipe.vae

    def upscaler(self, factor: int):
        try:
            return self.models.upscalers[factor]
        except KeyError:
            raise ModelNotFound(f"the x{factor} upscaler was not given to the engine", {"factor": factor}) from None

    def size(self, aspect: str) -> tuple[int, int]:
        """(width, height) of ``aspect`` at this preset's resolution, from the model family's sizes."""
        return self.family.size_at(aspect, self.preset.resolution)

    def check_delivery(self, delivery: Delivery) -> None:
        """The models the tail needs are here (before any model work)."""
        if delivery.upscale:
            self.upscaler(delivery.upscale)
        if delivery.safety_check and self.models.safety_checker is None:
            raise ModelNotFound("the request asks for the safety checker, which was not given to the engine")

    def pipeline(self, role: str, spec: RenderSpec, controls: Sequence[Control] = ()) -> tuple[Any, dict[str, Any]]:
        """The family's diffusers pipeline for ``role`` (``text_to_image``, ``inpaint``, ``image_to_image``)
        over the (possibly adapter-carrying) base, its ControlNet variant when ``controls`` are given,
        and the call arguments that pass the controls' conditions and weights.

        Built per call, so a request's scheduler, VAE and ControlNets never stay on the base.
        """
        class_name = getattr(self.family, f"controlnet_{role}" if controls else role, None)
        if class_name is None:
            raise ModelNotFound(f"the {self.family.name} family has no ControlNet {role} pipeline", {"role": role})
        overrides: dict[str, Any] = {"vae": self.vae(spec.use_improved_vae),
                                     "scheduler": make_scheduler(spec.sampler, self.pipe.scheduler.config)}
        call: dict[str, Any] = {}
        if controls:
            one = len(controls) == 1
            nets = [self.controlnet(c.kind) for c in controls]
            overrides["controlnet"] = nets[0] if one else nets
            # text-to-image takes the condition as its image; the image-conditioned pipelines as control_image
            call["image" if role == "text_to_image" else "control_image"] = (
                controls[0].image if one else [c.image for c in controls])
            call["controlnet_conditioning_scale"] = controls[0].scale if one else [c.scale for c in controls]
        return build_pipeline(class_name, self.pipe, **overrides), call

    # ------------------------------------------------------------------ lend the base, render

    @contextlib.contextmanager
    def adapter_scope(self, adapter_dir: str | Path | None, tokens: TokenSpec | None = None) -> Iterator[TokenSpec]:
        """The subject's adapter on the base for the block, detached in any case; yields its tokens."""
        if adapter_dir is None:
            yield tokens or BASE_TOKENS
            return
        from pipelines.adapters import adapter_attached

        with adapter_attached(self.pipe, adapter_dir) as attached:
            yield TokenSpec(attached.manifest.instance_token, attached.manifest.class_token)

    def render(self, pipe, spec: RenderSpec, prompts: Sequence[str], seeds: Sequence[int], progress: StageProgress,
               should_stop: CancelFn | None, *, per_candidate: Mapping[str, Sequence[Any]] | None = None,
               **call: Any) -> list[Image.Image]:
        """One image per prompt, in batches; image ``i`` starts from the noise of ``seeds[i]`` alone,
        whatever the batch. ``per_candidate``: pipeline arguments with one value per prompt (init
        images); ``call``: arguments shared by every candidate (size, mask, ControlNet conditions)."""
        per_candidate = per_candidate or {}
        batch_size = spec.batch_size or self.batch_size
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            raise_if_canceled(should_stop)
            stop = min(start + batch_size, len(prompts))
            count = stop - start

            def on_step_end(_pipe, _step, _timestep, callback_kwargs):
                raise_if_canceled(should_stop)  # Canceled propagates out of the pipeline call
                progress.advance(count, candidates=float(len(images)))  # noqa: B023 - runs only in this batch
                return callback_kwargs

            kwargs = {
                "prompt": list(prompts[start:stop]),
                "negative_prompt": [spec.negative_prompt] * count,
                "num_inference_steps": spec.steps,
                "guidance_scale": spec.guidance_scale,
                "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds[start:stop]],
                "callback_on_step_end": on_step_end,
                "output_type": "pil",
                **call,
                **{name: list(values[start:stop]) for name, values in per_candidate.items()},
            }
            with torch.inference_mode(), vae_mode(pipe.vae, self.vae_tiling, self.vae_slicing):
                images.extend(pipe(**kwargs).images)
        return images

    # ------------------------------------------------------------------ candidates -> results

    def produce(self, job: Job, render_candidates: Callable[[TokenSpec], list[Candidate]]) -> list[Result]:
        """Attach, render, post-process, detach; then deliver."""
        with self.adapter_scope(job.adapter_dir, job.tokens) as tokens:
            candidates = render_candidates(tokens)
            for post_pass in self.post_passes:
                if post_pass.applies(self, job):
                    raise_if_canceled(job.should_stop)
                    candidates = post_pass(self, candidates, job, tokens)
        return self.deliver(candidates, job, tokens)

    def deliver(self, candidates: Sequence[Candidate], job: Job, tokens: TokenSpec) -> list[Result]:
        """Safety flags (never blanking an image), rank, upscale the delivered ones."""
        from pipelines.ranking import RANKING_PRESETS, rank

        delivery = job.delivery
        images = [c.image for c in candidates]
        flags = list(self.models.safety_checker(images)) if delivery.safety_check else [False] * len(images)
        raise_if_canceled(job.should_stop)
        ranked = rank(images, [c.prompt for c in candidates], job.reference_images, delivery.k,
                      self.models.ranking, RANKING_PRESETS[delivery.ranking], instance_token=tokens.instance_token,
                      on_progress=job.on_progress, require_one_face=self.preset.require_one_face,
                      return_all=job.return_all)
        delivered = [c for c in ranked if c.rank > 0]
        upscaled: list[Image.Image | None] = [None] * len(ranked)
        if delivery.upscale and delivered:
            raise_if_canceled(job.should_stop)
            from pipelines.upscale import upscale

            upscaled[: len(delivered)] = upscale([c.image for c in delivered], self.upscaler(delivery.upscale),
                                                 factor=delivery.upscale, on_progress=job.on_progress,
                                                 should_stop=job.should_stop)
        return [
            Result(image=c.image, upscaled=up, seed=candidates[c.index].seed, prompt=candidates[c.index].prompt,
                   negative_prompt=delivery.negative_prompt, style=delivery.style, scores=dict(c.scores),
                   rank=c.rank, flagged=flags[c.index], faces=c.faces,
                   face_refined=candidates[c.index].face_refined)
            for c, up in zip(ranked, upscaled)
        ]


__all__ = ["EngineCore"]
