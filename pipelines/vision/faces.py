"""Face detection: ``detect_faces(image) -> list[FaceBox]`` in the image's pixel coordinates.

Backends:

* ``blazeface`` (default, offline): MediaPipe BlazeFace with the bundled *full-range*
  model, which also finds small, far faces; when it finds nothing, the short-range
  model (close-up selfies) gets a second look.
* ``retinaface``: facexlib's RetinaFace-ResNet50 (production quality; ``pip install
  facexlib``; weights fetched by facexlib on first use, so pre-pull them).

Detection runs on a copy whose long side is at most ``max_side`` (the detectors look at
192 px or 640 px inputs anyway), and boxes are mapped back to the full image, so a
12 MP photo costs the same as a thumbnail.

Load a detector with :func:`load_face_detector` (or borrow it from the worker's model
manager by :func:`face_detector_spec`) and pass it to :func:`detect_faces`.
"""

from __future__ import annotations

import functools
import threading
from typing import Protocol

import numpy as np
from PIL import Image

from pipelines.errors import InvalidConfig
from pipelines.models.specs import NO_DTYPE, ModelSpec
from pipelines.vision.boxes import Box, clip_to_image, merge_overlapping

FACE_BACKENDS = ("blazeface", "retinaface")
DETECTION_MAX_SIDE = 1024


class FaceBox(Box):
    """A detected face: pixel box and detector confidence."""


class FaceDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray, min_score: float) -> list[FaceBox]: ...


def detect_faces(
    image: Image.Image, detector: FaceDetector, min_score: float = 0.5, max_side: int = DETECTION_MAX_SIDE,
    *, first_look: bool = False,
) -> list[FaceBox]:
    """Faces in ``image``, best first (score, then size), boxes in ``image``'s pixels.

    ``first_look``: without a detector's more permissive second look (BlazeFace's short-range
    model, which also fires on some textures) — for tiles and zoomed views.
    """
    small, scale = downscaled_rgb(image, max_side)
    detect = getattr(detector, "detect_first_look", detector.detect) if first_look else detector.detect
    faces = detect(small, min_score)
    width, height = image.size
    faces = [clip_to_image(face.scaled(1.0 / scale), width, height) for face in faces]
    return sorted(faces, key=lambda f: (-round(f.score, 4), -f.area, f.x0, f.y0))


def downscaled_rgb(image: Image.Image, max_side: int) -> tuple[np.ndarray, float]:
    """Contiguous uint8 RGB array with long side <= ``max_side``, and the scale applied."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    long_side = max(rgb.size)
    scale = 1.0
    if long_side > max_side:
        scale = max_side / long_side
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        scale = rgb.width / image.width
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), scale


def check_face_backend(backend: str) -> None:
    if backend not in FACE_BACKENDS:
        raise InvalidConfig(f"unknown face backend {backend!r}", {"known": list(FACE_BACKENDS)})


def load_face_detector(backend: str = "blazeface", device: str = "cpu") -> FaceDetector:
    check_face_backend(backend)
    if backend == "blazeface":
        return BlazeFaceDetector()
    return RetinaFaceDetector(device=device)


def face_detector_spec(backend: str = "blazeface", device: str = "cpu") -> ModelSpec:
    """BlazeFace runs on the CPU whatever the worker's device; RetinaFace on ``device``."""
    check_face_backend(backend)
    device = "cpu" if backend == "blazeface" else str(device)
    return ModelSpec.of("face_detector", backend, device, NO_DTYPE,
                        functools.partial(load_face_detector, backend, device))


class BlazeFaceDetector:
    name = "blazeface"

    def __init__(self) -> None:
        import mediapipe as mp

        solution = mp.solutions.face_detection
        # Detection thresholds are applied by us, so keep the graph's low.
        self._full_range = solution.FaceDetection(model_selection=1, min_detection_confidence=0.2)
        self._short_range = solution.FaceDetection(model_selection=0, min_detection_confidence=0.2)
        self._lock = threading.Lock()  # MediaPipe graphs are not re-entrant

    def detect(self, rgb: np.ndarray, min_score: float) -> list[FaceBox]:
        with self._lock:
            faces = self._run(self._full_range, rgb, min_score)
            if not faces:
                faces = self._run(self._short_range, rgb, min_score)
        return merge_overlapping(faces)

    def detect_first_look(self, rgb: np.ndarray, min_score: float) -> list[FaceBox]:
        """The full-range model alone (no short-range second look, which fires on some textures)."""
        with self._lock:
            return merge_overlapping(self._run(self._full_range, rgb, min_score))

    def close(self) -> None:
        with self._lock:
            self._full_range.close()
            self._short_range.close()

    @staticmethod
    def _run(graph, rgb: np.ndarray, min_score: float) -> list[FaceBox]:
        height, width = rgb.shape[:2]
        result = graph.process(rgb)
        faces = []
        for detection in result.detections or []:
            score = float(detection.score[0])
            if score < min_score:
                continue
            rel = detection.location_data.relative_bounding_box
            x0, y0 = rel.xmin * width, rel.ymin * height
            faces.append(FaceBox(x0, y0, x0 + rel.width * width, y0 + rel.height * height, score))
        return faces


class RetinaFaceDetector:
    name = "retinaface"

    def __init__(self, model_name: str = "retinaface_resnet50", device: str | None = None) -> None:
        try:
            import torch
            from facexlib.detection import init_detection_model
        except ImportError as exc:
            raise InvalidConfig("face backend 'retinaface' needs the optional package facexlib") from exc
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = init_detection_model(model_name, half=False, device=self.device)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray, min_score: float) -> list[FaceBox]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        with self._lock, self._torch.inference_mode():
            rows = self._model.detect_faces(bgr, conf_threshold=min_score)
        return [FaceBox(float(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in np.asarray(rows)]
