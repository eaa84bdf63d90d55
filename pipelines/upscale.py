"""Real-ESRGAN upscaling (×2, ×4) with spandrel, tiled so memory stays bounded.

Each tile is upscaled with ``overlap`` pixels of context on every side; overlapping
outputs are blended with linear ramps, so seams vanish and peak memory depends on the
tile size only, never on the image size.

The model comes from the caller: :func:`load_upscaler` (CLI, tests) or the worker's model
manager by :func:`upscaler_spec`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pipelines.errors import InvalidConfig
from pipelines.models.specs import ModelSpec
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, raise_if_canceled


def check_inputs(factor: int | None, tile: int, overlap: int) -> None:
    if factor is not None and factor not in (2, 4):
        raise InvalidConfig(
            f"upscale factor must be 2 or 4, got {factor}", {"factor": factor}, code="invalid_upscale"
        )
    if tile < 16 or overlap < 0 or 2 * overlap >= tile:
        raise InvalidConfig(
            "tile must be >= 16 and overlap < tile / 2",
            {"tile": tile, "overlap": overlap},
            code="invalid_tiling",
        )


def _half(device: str | torch.device, half: bool | None) -> bool:
    return (torch.device(device).type == "cuda") if half is None else half


def load_upscaler(model_path: str, device: str | torch.device = "cpu", half: bool | None = None):
    """A spandrel ImageModelDescriptor, in fp16 on CUDA when the architecture supports it."""
    from spandrel import ModelLoader

    from pipelines.ranking import resolve_weight_file

    if not model_path:
        raise InvalidConfig("upscale needs a model_path (the preset's upscaler_x2/_x4)", code="upscaler_required")
    descriptor = ModelLoader(device=torch.device(device)).load_from_file(str(resolve_weight_file(model_path)))
    descriptor.eval()
    descriptor.model.requires_grad_(False)
    if _half(device, half) and descriptor.supports_half:
        descriptor.half()
    return descriptor


def upscaler_spec(model_path: str, device: str | torch.device = "cpu", half: bool | None = None) -> ModelSpec:
    """Real-ESRGAN weights at ``model_path`` (the preset's ``upscaler_x2``/``_x4``) on ``device``."""
    if not model_path:
        raise InvalidConfig("upscale needs a model_path (the preset's upscaler_x2/_x4)", code="upscaler_required")
    dtype = torch.float16 if _half(device, half) else torch.float32
    return ModelSpec.of("upscaler", model_path, device, dtype,
                        functools.partial(load_upscaler, model_path, device, _half(device, half)))


def upscale(
    images: Sequence[Image.Image],
    upscaler,
    factor: int | None = None,
    tile: int = 256,
    overlap: int = 16,
    on_progress: ProgressFn | None = None,
    should_stop: CancelFn | None = None,
) -> list[Image.Image]:
    """Each image upscaled by exactly ``factor`` (default: the upscaler's own scale)."""
    check_inputs(factor, tile, overlap)
    factor = factor or upscaler.scale
    if upscaler.scale != factor:
        raise InvalidConfig(
            f"the upscaler scales ×{upscaler.scale}, not ×{factor}",
            {"model_scale": upscaler.scale, "factor": factor},
            code="upscaler_scale_mismatch",
        )
    half = next(upscaler.model.parameters()).dtype == torch.float16
    progress = StageProgress(on_progress, Stage.UPSCALING, total=len(images))
    progress.start(f"×{factor} on {len(images)} images")
    out = []
    for image in images:
        raise_if_canceled(should_stop)
        out.append(_upscale_one(upscaler, image.convert("RGB"), factor, tile, overlap, half))
        progress.advance()
    return out


@torch.inference_mode()
def _upscale_one(model, image: Image.Image, factor: int, tile: int, overlap: int, half: bool) -> Image.Image:
    device = next(model.model.parameters()).device
    dtype = torch.float16 if half else torch.float32
    x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
    height, width = x.shape[-2:]
    out = torch.zeros(1, 3, height * factor, width * factor)
    weight = torch.zeros(1, 1, height * factor, width * factor)
    core = tile - 2 * overlap
    for top in range(0, height, core):
        for left in range(0, width, core):
            # Tile with context, clipped to the image.
            y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
            y1, x1 = min(top + core + overlap, height), min(left + core + overlap, width)
            piece = _run(model, x[..., y0:y1, x0:x1], device, dtype)
            ramp = _ramp(
                y1 - y0,
                x1 - x0,
                factor,
                overlap,
                top=y0 > 0,
                left=x0 > 0,
                bottom=y1 < height,
                right=x1 < width,
            )
            out[..., y0 * factor : y1 * factor, x0 * factor : x1 * factor] += piece * ramp
            weight[..., y0 * factor : y1 * factor, x0 * factor : x1 * factor] += ramp
    result = (out / weight.clamp_min(1e-8)).clamp(0, 1)
    return Image.fromarray((result[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))


def _run(model, piece: torch.Tensor, device, dtype) -> torch.Tensor:
    """The model on one tile, padded (reflect) to the sizes the architecture needs."""
    h, w = piece.shape[-2:]
    req = model.size_requirements
    multiple = max(req.multiple_of, 1)
    target_h = max(-(-h // multiple) * multiple, req.minimum)
    target_w = max(-(-w // multiple) * multiple, req.minimum)
    if (target_h, target_w) != (h, w):
        mode = "reflect" if h > target_h - h and w > target_w - w else "replicate"
        piece = torch.nn.functional.pad(piece, (0, target_w - w, 0, target_h - h), mode=mode)
    result = model(piece.to(device, dtype)).float().cpu()
    return result[..., : h * model.scale, : w * model.scale]


def _ramp(h: int, w: int, factor: int, overlap: int, *, top: bool, left: bool, bottom: bool, right: bool):
    """Blend weights for one tile's output: 1 inside, falling linearly across overlaps that
    another tile also covers (edges of the image keep full weight)."""
    size = overlap * factor

    def axis(n: int, start: bool, end: bool) -> torch.Tensor:
        ramp = torch.ones(n * factor)
        if size > 0:
            edge = (torch.arange(size, dtype=torch.float32) + 0.5) / size
            if start:
                ramp[:size] = torch.minimum(ramp[:size], edge)
            if end:
                ramp[-size:] = torch.minimum(ramp[-size:], edge.flip(0))
        return ramp

    return (axis(h, top, bottom)[:, None] * axis(w, left, right)[None, :])[None, None]
