"""Face identity embeddings, used to flag photos that show someone else.

``load_face_embedder(name)`` returns a :class:`FaceEmbedder` (the worker borrows it from
its model manager by :func:`face_embedder_spec` instead):

* ``dlib`` (default when installed, offline): dlib's ResNet face descriptor (128-d,
  99.4 % on LFW) with its 5-point aligner, weights bundled in the pip package
  ``face-recognition-models`` (CC0), runtime from ``dlib-bin`` (prebuilt dlib wheels).
  Two faces are the same person below a Euclidean distance of 0.6 (dlib's own value).
* ``arcface``: facexlib's ArcFace IR-SE50 (production; optional ``facexlib``; 512-d,
  cosine distance). Weights are fetched by facexlib on first use, so pre-pull them.
* ``none``: ``available`` is False, ``embed`` returns None; the identity check then
  reports "not available" instead of guessing.

``auto`` picks ``dlib`` when it imports, else ``none``.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from pipelines.errors import InvalidConfig
from pipelines.models.specs import NO_DTYPE, ModelSpec
from pipelines.vision.boxes import Box

IDENTITY_BACKENDS = ("auto", "dlib", "arcface", "none")


class FaceEmbedder(Protocol):
    name: str
    available: bool
    #: distance at or above which two faces are taken to be different people
    threshold: float

    def embed(self, image: Image.Image, box: Box) -> np.ndarray | None: ...

    def distance(self, a: np.ndarray, b: np.ndarray) -> float: ...


def resolve_identity_backend(name: str = "auto") -> str:
    """The backend ``name`` stands for: ``auto`` is ``dlib`` when it imports, else ``none``."""
    if name not in IDENTITY_BACKENDS:
        raise InvalidConfig(f"unknown identity backend {name!r}", {"known": list(IDENTITY_BACKENDS)})
    if name == "auto":
        return "dlib" if DlibFaceEmbedder.installed() else "none"
    return name


def load_face_embedder(name: str = "auto", device: str = "cpu") -> FaceEmbedder:
    backend = resolve_identity_backend(name)
    if backend == "none":
        return UnavailableFaceEmbedder("dlib not installed" if name == "auto" else "identity check disabled")
    if backend == "dlib":
        if not DlibFaceEmbedder.installed():
            raise InvalidConfig("identity backend 'dlib' needs dlib (dlib-bin) and face-recognition-models")
        return DlibFaceEmbedder()
    return ArcFaceEmbedder(device=device)


def face_embedder_spec(name: str = "auto", device: str = "cpu") -> ModelSpec:
    """dlib runs on the CPU whatever the worker's device; ArcFace on ``device``."""
    backend = resolve_identity_backend(name)
    device = str(device) if backend == "arcface" else "cpu"
    source = "none:not-installed" if backend == "none" and name == "auto" else backend
    return ModelSpec.of("face_embedder", source, device, NO_DTYPE, functools.partial(load_face_embedder, name, device))


class UnavailableFaceEmbedder:
    name = "none"
    available = False
    threshold = float("inf")

    def __init__(self, why: str = "") -> None:
        self.why = why

    def embed(self, image: Image.Image, box: Box) -> np.ndarray | None:
        return None

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        raise RuntimeError("no face embedder available")


class DlibFaceEmbedder:
    name = "dlib"
    available = True
    threshold = 0.6

    def __init__(self) -> None:
        import dlib

        models = self._models_dir()
        self._aligner = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self._rectangle = dlib.rectangle
        self._lock = threading.Lock()

    @staticmethod
    def installed() -> bool:
        find = importlib.util.find_spec
        return find("dlib") is not None and find("face_recognition_models") is not None

    @staticmethod
    def _models_dir() -> Path:
        # Located without importing the package: its __init__ needs pkg_resources,
        # which current setuptools no longer ships.
        spec = importlib.util.find_spec("face_recognition_models")
        return Path(next(iter(spec.submodule_search_locations))) / "models"

    def embed(self, image: Image.Image, box: Box) -> np.ndarray | None:
        # dlib aligns from the face box; a margin-free box on a <= 800 px view is plenty.
        view, scale = _face_view(image, box, max_side=800)
        rect = self._rectangle(*(int(round(v * scale)) for v in _offset_box(box, view.offset)))
        array = np.ascontiguousarray(np.asarray(view.image.convert("RGB"), dtype=np.uint8))
        with self._lock:
            shape = self._aligner(array, rect)
            descriptor = self._encoder.compute_face_descriptor(array, shape, 0)
        return np.asarray(descriptor, dtype=np.float32)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


class ArcFaceEmbedder:
    name = "arcface"
    available = True
    threshold = 0.7  # cosine distance; same person is typically < 0.6 for IR-SE50

    def __init__(self, device: str | None = None) -> None:
        try:
            import torch
            from facexlib.recognition import init_recognition_model
        except ImportError as exc:
            raise InvalidConfig("identity backend 'arcface' needs the optional package facexlib") from exc
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = init_recognition_model("arcface", half=False, device=self.device).eval()
        self._lock = threading.Lock()

    def embed(self, image: Image.Image, box: Box) -> np.ndarray | None:
        torch = self._torch
        # The IR-SE50 backbone takes a 112x112 face in [-1, 1]; a square around the box
        # stands in for 5-point alignment.
        side = max(box.width, box.height) * 1.1
        cx, cy = box.center
        face = image.convert("RGB").crop((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        face = face.resize((112, 112), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(face, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(self.device)
        with self._lock, torch.inference_mode():
            features = self._model(x)
        return torch.nn.functional.normalize(features.float(), dim=-1)[0].cpu().numpy()

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class _View:
    def __init__(self, image: Image.Image, offset: tuple[float, float]):
        self.image = image
        self.offset = offset


def _face_view(image: Image.Image, box: Box, max_side: int) -> tuple[_View, float]:
    """A region around the face (twice its size), downscaled so its long side <= max_side."""
    side = max(box.width, box.height) * 2.0
    cx, cy = box.center
    x0, y0 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
    x1, y1 = min(image.width, int(cx + side / 2) + 1), min(image.height, int(cy + side / 2) + 1)
    region = image.crop((x0, y0, x1, y1))
    scale = min(1.0, max_side / max(region.size))
    if scale < 1.0:
        size = (max(1, round(region.width * scale)), max(1, round(region.height * scale)))
        region = region.resize(size, Image.Resampling.BILINEAR)
    return _View(region, (x0, y0)), scale


def _offset_box(box: Box, offset: tuple[float, float]) -> tuple[float, float, float, float]:
    dx, dy = offset
    return (box.x0 - dx, box.y0 - dy, box.x1 - dx, box.y1 - dy)
