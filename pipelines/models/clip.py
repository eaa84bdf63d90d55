"""CLIP image/text embeddings, shared by class-token choice, ranking and evaluation.

:func:`clip_spec` gives every caller the same key for the same weights and device, so the
worker's model manager holds one CLIP per process for intake, ranking and evaluation.
Embeddings come back L2-normalised, so cosine similarity is a plain dot product.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from PIL import Image

from pipelines.errors import ModelNotFound
from pipelines.models.specs import ModelSpec


class ClipEmbedder:
    def __init__(self, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model_path, torch_dtype=dtype).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model_path)
        except OSError as exc:
            raise ModelNotFound(f"CLIP model {model_path!r} could not be loaded: {exc}", {"model": model_path}) from exc
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(_as_tensor(features).float())
        if not chunks:
            return torch.empty(0, self.dim)
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.dim)
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        features = _as_tensor(self.model.get_text_features(**tokens)).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu()


def _as_tensor(features) -> torch.Tensor:
    # transformers 5 may return a model output instead of a bare tensor.
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output if getattr(features, "pooler_output", None) is not None else features[0]


def clip_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on CUDA (CLIP's own inference precision), fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_clip(model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ClipEmbedder:
    return ClipEmbedder(model_path, device=device, dtype=dtype or clip_dtype(device))


def clip_spec(model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ModelSpec:
    """The CLIP dual encoder at ``model_path`` (the preset's ``clip``) on ``device``."""
    dtype = dtype or clip_dtype(device)
    return ModelSpec.of("clip", model_path, device, dtype, functools.partial(load_clip, model_path, device, dtype))
