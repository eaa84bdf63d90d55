"""The models an engine serves, and the per-call diffusers pipeline built over the base.

Engines load nothing. The caller gives them an :class:`EngineModels` bundle: the worker borrows it
from its model manager by :func:`engine_models` (through a front end's ``generation_models`` or
``template_models``, which say what a request :class:`Needs`); the CLI and benchmarks load it.

The diffusers pipeline of one call is built over the base's own modules (nothing is copied) with
the call's scheduler, VAE and ControlNets, so none of those ever stays on the base. Its class is
the model family's (``preset.family.text_to_image``, ``.inpaint``, ...): SD 1.5 and SDXL run the
same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from pipelines.errors import InvalidConfig, ModelNotFound
from pipelines.models.presets import ModelPreset
from pipelines.models.specs import BundleSpec, ModelSpec
from pipelines.ranking import RankingModels

SafetyCheckFn = Callable[[Sequence[Image.Image]], list[bool]]


@dataclass
class EngineModels:
    """Everything an engine runs with, loaded (or borrowed) by the caller."""

    base: Any  # the family's base text-to-image pipeline (shared with training; lent, never kept changed)
    ranking: RankingModels
    controlnets: Mapping[str, Any] = field(default_factory=dict)  # condition kind -> ControlNetModel
    improved_vae: Any = None  # e.g. sd-vae-ft-mse; None: the base VAE decodes
    upscalers: Mapping[int, Any] = field(default_factory=dict)  # factor -> Real-ESRGAN descriptor
    pose_estimator: Any = None  # pose conditions from photos (generation)
    depth_estimator: Any = None  # depth conditions from photos (optional controlnet-aux)
    safety_checker: SafetyCheckFn | None = None
    masking: Any = None  # template mode's detectors (pipelines.templates.masking.MaskingModels)


@dataclass(frozen=True)
class Needs:
    """What one request needs loaded, besides the base and the ranking models every job uses."""

    controlnets: tuple[str, ...] = ()
    upscale_factors: tuple[int, ...] = ()
    improved_vae: bool = False
    # front-end models, by EngineModels field name (pose_estimator, depth_estimator, safety_checker, masking)
    extras: Mapping[str, ModelSpec | BundleSpec | None] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def engine_models(
    preset: ModelPreset,
    device: str | torch.device,
    dtype: torch.dtype | None,
    needs: Needs,
    *,
    face_backend: str = "blazeface",
    identity_backend: str = "auto",
) -> BundleSpec[EngineModels]:
    """The model specs behind ``needs``, keyed so the worker's manager shares each model between jobs.

    The base, ControlNets and improved VAE share one dtype (``default_dtype``: bf16 on CUDA), so the
    base here is the one training borrows too. Raises ``ModelNotFound`` for a ControlNet the preset
    lacks, before anything loads.
    """
    from pipelines.models.loading import base_spec, controlnet_spec, default_dtype, improved_vae_spec
    from pipelines.ranking import ranking_models
    from pipelines.upscale import upscaler_spec

    if missing := sorted(set(needs.controlnets) - set(preset.controlnets)):
        raise ModelNotFound(f"the {preset.name} preset has no ControlNet for {missing}", {"kinds": missing})
    device = str(resolve_device(device))
    dtype = dtype or default_dtype(device)
    parts: dict[str, ModelSpec | BundleSpec | None] = {
        "base": base_spec(preset, device, dtype),
        "ranking": ranking_models(preset, device, face_backend=face_backend, identity_backend=identity_backend),
        "improved_vae": improved_vae_spec(preset, device, dtype) if needs.improved_vae else None,
        **needs.extras,
    }
    parts |= {f"controlnet:{kind}": controlnet_spec(preset, kind, device, dtype) for kind in sorted(needs.controlnets)}
    parts |= {
        f"upscaler_x{factor}": upscaler_spec(preset.upscaler_x2 if factor == 2 else preset.upscaler_x4, device)
        for factor in needs.upscale_factors
    }
    return BundleSpec(parts, _build)


_EXTRA_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineModels)) - {"base", "ranking", "controlnets",
                                                                               "improved_vae", "upscalers"}


def _build(parts: dict[str, Any]) -> EngineModels:
    return EngineModels(
        base=parts["base"],
        ranking=parts["ranking"],
        controlnets={k.removeprefix("controlnet:"): v for k, v in parts.items() if k.startswith("controlnet:")},
        improved_vae=parts["improved_vae"],
        upscalers={int(k.removeprefix("upscaler_x")): v for k, v in parts.items() if k.startswith("upscaler_x")},
        **{name: parts[name] for name in _EXTRA_FIELDS if name in parts},
    )


# ---------------------------------------------------------------------------- the pipeline of one call


def build_pipeline(class_name: str, base, **overrides: Any):
    """A diffusers pipeline of class ``class_name`` over ``base``'s modules, with ``overrides`` swapped in.

    The class's own signature says which of the base's modules it takes (SDXL's second text
    encoder, a ControlNet, ...); config flags the base was made with (SDXL's
    ``force_zeros_for_empty_prompt``) carry over. No safety checker, no watermark.
    """
    import diffusers

    try:
        cls = getattr(diffusers, class_name)
    except AttributeError:
        raise ModelNotFound(f"this diffusers release has no {class_name}", {"pipeline": class_name}) from None
    params = inspect.signature(cls.__init__).parameters
    config = dict(getattr(base, "config", {}))
    parts: dict[str, Any] = {}
    for name, param in params.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in overrides:
            parts[name] = overrides[name]
        elif name in base.components:
            parts[name] = base.components[name]
        elif name in config and not isinstance(config[name], (list, tuple)):
            parts[name] = config[name]  # a config flag, not a (library, class) component entry
        elif param.default is param.empty:
            parts[name] = None  # an optional module the base does not carry (safety checker, feature extractor)
    for flag in ("requires_safety_checker", "add_watermarker"):
        if flag in params:
            parts[flag] = False
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2)
    raise InvalidConfig(f"unknown sampler {name!r}", {"sampler": name}, code="unknown_sampler")


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


__all__ = ["EngineModels", "Needs", "SafetyCheckFn", "build_pipeline", "engine_models", "make_scheduler",
           "resolve_device", "vae_mode"]
