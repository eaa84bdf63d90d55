"""Load a preset's base text-to-image pipeline: the one place a base model is read from disk.

Training and generation share what this returns (the worker's model manager keeps one per
preset, device and dtype); neither loads a second copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.errors import ModelNotFound
from pipelines.models.presets import ModelPreset


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The base weights' dtype: bf16 on CUDA (training and generation share it), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_base_pipeline(preset: ModelPreset, device: torch.device | str, dtype: torch.dtype | None = None):
    """The base pipeline with every component it lists and no safety checker, frozen, on ``device``."""
    from diffusers import DiffusionPipeline

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    extra = {}
    index = Path(preset.base_model) / "model_index.json"
    if not index.is_file() or "safety_checker" in json.loads(index.read_text()):
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = DiffusionPipeline.from_pretrained(preset.base_model, revision=preset.revision, torch_dtype=dtype,
                                                 **extra)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"base model {preset.base_model!r} could not be loaded: {exc}",
                            {"base_model": preset.base_model}) from exc
    pipe.set_progress_bar_config(disable=True)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    return pipe.to(device)
