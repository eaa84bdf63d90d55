"""Per-photo prompt context: a unique background token (default) or a BLIP caption.

Background tokens (``<bg0>``, ``<bg1>``, ...) are new tokens the training stage adds;
each absorbs its photo's background so it does not leak into the identity. BLIP
captions do the same with words: the person word (man, woman, person, ...) is
replaced by :data:`SUBJECT`, or SUBJECT is prepended when the caption has none.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from PIL import Image

from pipelines.errors import ModelNotFound
from pipelines.intake.dataset import SUBJECT
from pipelines.models.specs import ModelSpec

_PERSON_WORDS = re.compile(
    r"\b(?:an?\s+)?(?:young\s+|old\s+|little\s+)?"
    r"(?:man|woman|person|boy|girl|lady|guy|gentleman|child|kid|baby|toddler|teenager|men|women|people)\b",
    re.IGNORECASE,
)


def background_tokens(count: int) -> list[str]:
    return [f"<bg{i}>" for i in range(count)]


def subject_caption(caption: str) -> str:
    """``"a man sitting on a bench"`` -> ``"a {subject} sitting on a bench"``."""
    caption = " ".join(caption.strip().split())
    replaced, count = _PERSON_WORDS.subn(f"a {SUBJECT}", caption, count=1)
    if count:
        return replaced
    return f"{SUBJECT}, {caption}" if caption else SUBJECT


def blip_contexts(crops: Sequence[Image.Image], captioner: BlipCaptioner) -> list[str]:
    return [subject_caption(caption) for caption in captioner(list(crops))]


class BlipCaptioner:
    """BLIP image captioning: ``captioner(images) -> captions`` (greedy, up to 30 tokens)."""

    def __init__(self, model_path: str, device: str = "cpu") -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        try:
            self.processor = BlipProcessor.from_pretrained(model_path)
            self.model = BlipForConditionalGeneration.from_pretrained(model_path).to(device).eval()
        except OSError as exc:
            raise ModelNotFound(f"BLIP model {model_path!r} could not be loaded: {exc}", {"model": model_path}) from exc
        self.model.requires_grad_(False)
        self.device = device

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        with torch.inference_mode():
            inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
            tokens = self.model.generate(**inputs, max_new_tokens=30, do_sample=False, num_beams=1)
        return [self.processor.decode(t, skip_special_tokens=True) for t in tokens]


def load_captioner(model_path: str, device: str = "cpu") -> BlipCaptioner:
    return BlipCaptioner(model_path, device)


def captioner_spec(model_path: str, device: str = "cpu") -> ModelSpec:
    loader = functools.partial(load_captioner, model_path, device)
    return ModelSpec.of("captioner", model_path, device, "float32", loader)
