"""Person masks with MediaPipe selfie segmentation (bundled weights).

``person_mask(image, segmenter)`` returns a mode-"L" mask the size of ``image``: 255 where
the person is, 0 for background. Used for the training stage's optional masked attention
loss. The general model (256x256 input) suits square face crops. Load the segmenter with
:func:`load_segmenter`, or borrow it from the worker's model manager by :func:`segmenter_spec`.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from pipelines.models.specs import NO_DTYPE, ModelSpec


def person_mask(image: Image.Image, segmenter: SelfieSegmenter, threshold: float | None = None) -> Image.Image:
    """Soft mask (0..255) of the person, or a hard one when ``threshold`` (0..1) is given."""
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    probability = segmenter.probability(rgb)
    if threshold is not None:
        return Image.fromarray(np.where(probability >= threshold, 255, 0).astype(np.uint8), "L")
    return Image.fromarray(np.clip(np.round(probability * 255.0), 0, 255).astype(np.uint8), "L")


class SelfieSegmenter:
    def __init__(self) -> None:
        import mediapipe as mp

        self._graph = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
        self._lock = threading.Lock()  # MediaPipe graphs are not re-entrant

    def probability(self, rgb: np.ndarray) -> np.ndarray:
        with self._lock:
            mask = self._graph.process(rgb).segmentation_mask
        return np.asarray(mask, dtype=np.float32).copy()

    def close(self) -> None:
        with self._lock:
            self._graph.close()


def load_segmenter() -> SelfieSegmenter:
    return SelfieSegmenter()


def segmenter_spec() -> ModelSpec:
    return ModelSpec.of("segmenter", "mediapipe-selfie", "cpu", NO_DTYPE, load_segmenter)
