"""Load a preset's diffusion weights: the one place a base model, ControlNet or VAE is read from disk.

Training and generation share what :func:`load_base_pipeline` returns (the worker's model
manager keeps one per base, device and dtype, see :func:`base_spec`); neither loads a
second copy. Callers keep what they load; the one thing kept here is each local base's tokenizers
as read from disk (:func:`local_tokenizers`), of which every load gets its own copy.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from pipelines.errors import ModelNotFound
from pipelines.models.presets import ModelPreset
from pipelines.models.specs import ModelSpec
from pipelines.text.added_tokens import copy_tokenizer


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The base weights' dtype: bf16 on CUDA (training and generation share it), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _source(reference: str, revision: str | None = None) -> str:
    return f"{reference}@{revision}" if revision else reference


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
                                                 **extra, **local_tokenizers(Path(preset.base_model)))
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"base model {preset.base_model!r} could not be loaded: {exc}",
                            {"base_model": preset.base_model}) from exc
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    return pipe.to(device)


def local_tokenizers(folder: Path) -> dict[str, object]:
    """A copy of each tokenizer of a base in a local folder, by pipeline component name (none for a hub id).

    Reading a CLIP tokenizer from disk takes about 1.2 s of a CPU core (transformers turns its 49k-entry
    vocabulary into the Rust backend's format on every read), a copy 0.09 s: a base loaded again in the
    same process (after an eviction, in each test) starts from what was read the first time."""
    index = folder / "model_index.json"
    if not index.is_file():
        return {}
    found = {}
    for name, entry in json.loads(index.read_text()).items():  # "tokenizer": ["transformers", "CLIPTokenizer"]
        if name.startswith("tokenizer") and isinstance(entry, list) and entry[:1] == ["transformers"] \
                and (folder / name).is_dir():
            found[name] = copy_tokenizer(_read_tokenizer(str(folder / name), entry[1], _stamp(folder / name)))
    return found


def _stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))


@functools.lru_cache(maxsize=8)
def _read_tokenizer(folder: str, class_name: str, stamp: tuple):  # noqa: ANN202 - stamp: the files as read
    import transformers

    return getattr(transformers, class_name).from_pretrained(folder)


def base_spec(preset: ModelPreset, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelSpec:
    """The base pipeline's key and loader: one copy per (base weights, device, dtype)."""
    dtype = dtype or default_dtype(device)
    return ModelSpec.of("base", _source(preset.base_model, preset.revision), device, dtype,
                        functools.partial(load_base_pipeline, preset, device, dtype))


def load_controlnet(source: str, device: torch.device | str, dtype: torch.dtype):
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"ControlNet {source!r} could not be loaded: {exc}", {"model": source}) from exc
    return model.to(device).requires_grad_(False).eval()


def controlnet_spec(preset: ModelPreset, kind: str, device: torch.device | str,
                    dtype: torch.dtype | None = None) -> ModelSpec:
    """The preset's ControlNet for condition ``kind`` (``pose``, ``depth``), in the base's dtype."""
    source = preset.controlnets.get(kind)
    if source is None:
        raise ModelNotFound(f"the {preset.name} preset has no {kind} ControlNet", {"kind": kind})
    dtype = dtype or default_dtype(device)
    return ModelSpec.of(f"controlnet:{kind}", source, device, dtype,
                        functools.partial(load_controlnet, source, device, dtype))


def load_vae(source: str, device: torch.device | str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"VAE {source!r} could not be loaded: {exc}", {"model": source}) from exc
    return vae.to(device).requires_grad_(False).eval()


def improved_vae_spec(preset: ModelPreset, device: torch.device | str,
                      dtype: torch.dtype | None = None) -> ModelSpec | None:
    """The preset's improved VAE (sd-vae-ft-mse), None when it names none."""
    if preset.vae is None:
        return None
    dtype = dtype or default_dtype(device)
    return ModelSpec.of("vae", preset.vae, device, dtype, functools.partial(load_vae, preset.vae, device, dtype))
