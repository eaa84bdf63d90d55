"""Class word choice: the candidate whose CLIP text embedding sits closest to the crops."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def class_scores(image_embeddings: np.ndarray, word_embeddings: np.ndarray, words: Sequence[str]) -> dict[str, float]:
    """Mean cosine distance (1 - cos) between each word and all images; lower fits better."""
    images = _unit(np.asarray(image_embeddings, dtype=np.float64))
    texts = _unit(np.asarray(word_embeddings, dtype=np.float64))
    distances = 1.0 - images @ texts.T  # (images, words)
    return {word: float(d) for word, d in zip(words, distances.mean(axis=0))}


def choose_class(scores: dict[str, float], decimals: int = 6) -> str:
    """argmin of the scores; equal scores (to ``decimals``) go to the earlier candidate."""
    words = list(scores)
    rounded = np.round(np.array([scores[w] for w in words]), decimals)
    return words[int(np.argmin(rounded))]  # argmin returns the first of equal minima


def clip_class_scores(crops: Sequence[Image.Image], words: Sequence[str], clip) -> dict[str, float]:
    """``clip``: a loaded :class:`~pipelines.models.clip.ClipEmbedder`."""
    return class_scores(clip.embed_images(list(crops)).numpy(), clip.embed_texts(list(words)).numpy(), words)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
