"""The Stable Diffusion safety checker, for its verdict only (a request's ``safety_checker: true``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from pipelines.errors import ModelNotFound
from pipelines.models.specs import ModelSpec

SAFETY_CHECKER_MODEL = "CompVis/stable-diffusion-safety-checker"


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
