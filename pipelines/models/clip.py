"""CLIP image/text embeddings, shared by class-token choice, ranking and evaluation.

One loaded model per (path, device, dtype) per process; embeddings come back
L2-normalised, so cosine similarity is a plain dot product.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from PIL import Image

from pipelines.errors import ModelNotFound


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


@functools.lru_cache(maxsize=4)
def get_clip(model_path: str, device: str = "cpu") -> ClipEmbedder:
    """Process-wide cache: the warm worker keeps CLIP loaded between jobs."""
    return ClipEmbedder(model_path, device=device)
