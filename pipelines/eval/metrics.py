"""The published method's metrics on generated images.

* Image Alignment: mean CLIP image-image cosine between generations and the user's crops.
* Text Alignment: mean CLIP text-image cosine between generations and their prompts, with
  the instance token removed from the text.
* LPIPS to the user's crops: only with the ``lpips`` package and its backbone weights
  already on disk (nothing is downloaded); otherwise reported as not available.
* Identity similarity: face-embedding cosine (``pipelines.vision.identity``) when a face
  embedder is installed and faces are found; otherwise not available.

A metric that cannot be computed is ``None`` with a reason, never a made-up number.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.vision.faces import detect_faces, load_face_detector
from pipelines.vision.identity import load_face_embedder


@dataclass(frozen=True)
class MetricValue:
    value: float | None
    note: str = ""  # why a value is missing, or what it was computed on


def image_alignment(clip, generated: Sequence[Image.Image], references: Sequence[Image.Image] | torch.Tensor
                    ) -> MetricValue:
    """``references``: images, or their CLIP embeddings (computed once per run by the evaluator)."""
    g = clip.embed_images(list(generated))
    r = references if isinstance(references, torch.Tensor) else clip.embed_images(list(references))
    return MetricValue(float((g @ r.T).mean()), f"{len(generated)} x {len(r)} pairs")


def text_alignment(clip, generated: Sequence[Image.Image], texts: Sequence[str]) -> MetricValue:
    """``texts[i]`` is the prompt of ``generated[i]`` with the instance token already removed."""
    g, t = clip.embed_images(list(generated)), clip.embed_texts(list(texts))
    return MetricValue(float((g * t).sum(-1).mean()), f"{len(generated)} images")


def without_token(prompt: str, token: str) -> str:
    return " ".join(word for word in prompt.split() if word != token)


# ---------------------------------------------------------------------------- LPIPS


class UnavailableLpips:
    available = False

    def __init__(self, why: str):
        self.why = why

    def distance(self, a: Image.Image, b: Image.Image) -> float:
        raise RuntimeError(self.why)


class Lpips:
    """LPIPS (AlexNet) from the ``lpips`` package, with backbone weights already cached locally."""

    available = True

    def __init__(self, device: str = "cpu"):
        import lpips

        self.model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
        self.device = device

    @torch.no_grad()
    def distance(self, a: Image.Image, b: Image.Image) -> float:
        size = (min(a.width, b.width), min(a.height, b.height))
        ta, tb = (_to_tensor(im.convert("RGB").resize(size)).to(self.device) for im in (a, b))
        return float(self.model(ta, tb).mean())


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)


def _alexnet_weights_cached() -> bool:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return any(checkpoints.glob("alexnet-*.pth"))


def get_lpips(name: str = "auto", device: str = "cpu"):
    """``auto``: real LPIPS when it can run offline, else an unavailable stand-in; ``none``: off."""
    if name == "none":
        return UnavailableLpips("LPIPS disabled")
    if importlib.util.find_spec("lpips") is None:
        return UnavailableLpips("lpips package not installed")
    if not _alexnet_weights_cached():
        return UnavailableLpips("LPIPS backbone weights not available locally (never downloaded at run time)")
    return Lpips(device)


def lpips_to_references(metric, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> MetricValue:
    if not metric.available:
        return MetricValue(None, f"not available: {metric.why}")
    values = [metric.distance(g, r) for g in generated for r in references]
    return MetricValue(float(np.mean(values)), f"{len(values)} pairs")


# ---------------------------------------------------------------------------- identity


class IdentityScorer:
    """Face-embedding cosine to the references; reference faces are embedded once.

    ``embedder`` / ``face_detector``: loaded models (e.g. a ``RankingModels``' own); when
    not given, ``backend`` and BlazeFace are loaded here.
    """

    def __init__(self, references: Sequence[Image.Image], backend: str = "auto", *, embedder=None,
                 face_detector=None):
        self.why = ""
        self.embedder = embedder if embedder is not None else load_face_embedder(backend)
        if not self.embedder.available:
            self.why = getattr(self.embedder, "why", "") or "no face embedder installed"
            return
        detector = face_detector if face_detector is not None else load_face_detector()
        self.detect_faces = lambda image: detect_faces(image, detector)
        self.n_references = len(references)
        self.references = self.embed(references)

    def embed(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Unit embeddings of the best face in each image that has one."""
        out = []
        for image in images:
            faces = self.detect_faces(image)
            vector = self.embedder.embed(image, faces[0]) if faces else None
            if vector is not None:
                out.append(vector / (np.linalg.norm(vector) + 1e-12))
        return out

    def similarity(self, generated: Sequence[Image.Image]) -> MetricValue:
        if self.why:
            return MetricValue(None, f"not available: {self.why}")
        g = self.embed(generated)
        if not g or not self.references:
            return MetricValue(None, f"not available: faces found in {len(g)}/{len(generated)} generations, "
                                     f"{len(self.references)}/{self.n_references} references")
        return MetricValue(float(np.mean(np.stack(g) @ np.stack(self.references).T)),
                           f"{len(g)}/{len(generated)} generations with a face")
