"""Rank generated candidates and keep the best k.

Scores per candidate (higher is better):

============  =====================================================================  ===========
score         what                                                                   when absent
============  =====================================================================  ===========
aesthetic     LAION aesthetic predictor: a linear/MLP head on the L2-normalised      never
              CLIP (ViT-L/14) image embedding
identity      cosine between the candidate's face embedding and the mean embedding   no embedder or
              of the subject's reference crops; -1 (the lowest) when no face         no references
text          CLIP cosine between the image and its prompt, instance token removed   never
============  =====================================================================  ===========

Combined score (documented formula)::

    score = sum over available scores s of  w_s * z_s,   z_s = (x_s - mean(x_s)) / std(x_s)

``mean``/``std`` over the n candidates of this request (std 0 -> z 0); a score that is not
available is left out (the others keep their weights). Presets (weights sum to 1):

=========  =========  ========  ====
preset     aesthetic  identity  text
=========  =========  ========  ====
aesthetic  1.0        0.0       0.0   the method's choice (internal vote)
balanced   0.4        0.4       0.2
identity   0.2        0.7       0.1   template mode's default: the template fixes the look
=========  =========  ========  ====

LPIPS to the user's photos is not a ranking score: it needs pretrained backbone weights
(the optional ``likeness[lpips]`` extra) that a worker cannot be assumed to have, and a
preset must not weight a term that is not computed. It remains an evaluation metric
(:mod:`pipelines.eval.metrics`). ``balanced`` is its former 1 : 1 : 0.5 for aesthetic,
identity and text, renormalised after dropping LPIPS.

Delivery rule, whatever the weights: a candidate with no detected face or with several
faces is never returned; ``rank`` returns at most k candidates, best first.

The models come from the caller as a :class:`RankingModels` bundle:
:func:`load_ranking_models` (CLI, tests) or the worker's model manager by
:func:`ranking_models`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.errors import InvalidConfig, ModelNotFound
from pipelines.models.specs import BundleSpec, ModelSpec
from pipelines.progress import ProgressEvent, ProgressFn, Stage, no_progress
from pipelines.vision.faces import detect_faces, face_detector_spec
from pipelines.vision.identity import face_embedder_spec

SCORE_NAMES = ("aesthetic", "identity", "text")
NO_FACE_IDENTITY = -1.0


@dataclass(frozen=True)
class RankingWeights:
    aesthetic: float = 1.0
    identity: float = 0.0
    text: float = 0.0

    def get(self, name: str) -> float:
        return float(getattr(self, name))


RANKING_PRESETS = {
    "aesthetic": RankingWeights(aesthetic=1.0),
    "balanced": RankingWeights(aesthetic=0.4, identity=0.4, text=0.2),
    "identity": RankingWeights(aesthetic=0.2, identity=0.7, text=0.1),
}


@dataclass
class RankedCandidate:
    index: int  # position in the input list (candidate i was generated with seed + i)
    image: Image.Image
    prompt: str
    score: float  # the combined score the ranking sorts by
    scores: dict[str, float | None] = field(default_factory=dict)  # raw scores; None = not available
    faces: int = 0
    deliverable: bool = True
    rank: int = 0  # 1 = best among deliverable candidates; 0 = not delivered


@dataclass
class RankingModels:
    """What ``rank`` scores with: CLIP, the aesthetic head, a face detector, a face embedder.

    ``face_embedder`` None or unavailable -> identity is "not available".
    """

    clip: Any  # pipelines.models.clip.ClipEmbedder
    aesthetic: AestheticHead
    face_detector: Any  # pipelines.vision.faces.FaceDetector
    face_embedder: Any = None  # pipelines.vision.identity.FaceEmbedder


def ranking_models(
    preset, device: str | torch.device = "cpu", *, face_backend: str = "blazeface", identity_backend: str = "auto"
) -> BundleSpec[RankingModels]:
    """The ranking bundle of ``preset`` on ``device``: keys and loaders, nothing loaded yet."""
    from pipelines.models.clip import clip_spec

    return BundleSpec(
        {
            "clip": clip_spec(preset.clip, device),
            "aesthetic": aesthetic_spec(preset.aesthetic_head, device),
            "face_detector": face_detector_spec(face_backend, device),
            "face_embedder": face_embedder_spec(identity_backend, device),
        },
        lambda parts: RankingModels(**parts),
    )


def load_ranking_models(preset, device: str | torch.device = "cpu", **backends: str) -> RankingModels:
    return ranking_models(preset, device, **backends).load()


# ---------------------------------------------------------------------------- aesthetic head


class AestheticHead(torch.nn.Module):
    """Linear layers applied in order, with ReLU between them or not.

    Two layouts load: the project's safetensors (``layers.{i}.weight/bias``, ReLU between)
    and the improved-aesthetic-predictor ``.pth`` state dict (``layers.{0,2,4,6,7}``, an MLP
    whose dropout layers sit between purely linear layers, so no activation at inference).
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], relu: bool):
        super().__init__()
        self.linears = torch.nn.ModuleList(linears)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.linears):
            x = layer(x)
            if self.relu and i < len(self.linears) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], relu: bool) -> AestheticHead:
        indices = sorted(
            {int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")}
        )
        if not indices:
            raise InvalidConfig(
                "aesthetic head has no layers.{i}.weight tensors", code="invalid_aesthetic_head"
            )
        linears = []
        for i in indices:
            weight = state[f"layers.{i}.weight"].float()
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=f"layers.{i}.bias" in state)
            layer.weight.data.copy_(weight)
            if layer.bias is not None:
                layer.bias.data.copy_(state[f"layers.{i}.bias"].float())
            linears.append(layer)
        return cls(linears, relu=relu).eval()


def load_aesthetic_head(path: str, device: str | torch.device = "cpu") -> AestheticHead:
    local = resolve_weight_file(path)
    if local.suffix == ".safetensors":
        from safetensors.torch import load_file

        head = AestheticHead.from_state_dict(load_file(str(local)), relu=True)
    else:
        state = torch.load(str(local), map_location="cpu", weights_only=True)
        head = AestheticHead.from_state_dict(state.get("state_dict", state), relu=False)
    return head.requires_grad_(False).to(device)


def aesthetic_spec(path: str, device: str | torch.device = "cpu") -> ModelSpec:
    """The LAION aesthetic head (a few hundred kB, kept in fp32) at ``path`` on ``device``."""
    return ModelSpec.of("aesthetic", path, device, torch.float32, functools.partial(load_aesthetic_head, path, device))


def resolve_weight_file(path: str) -> Path:
    """A local file for ``path``: a filesystem path, or ``hf://owner/repo/file`` from the
    Hugging Face cache (downloaded by ``likeness models pull``; offline runs never fetch)."""
    if path.startswith("hf://"):
        owner, repo, filename = path[len("hf://") :].split("/", 2)
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(f"{owner}/{repo}", filename))
        except Exception as exc:  # offline, missing file, no network
            raise ModelNotFound(f"weight file {path!r} is not available: {exc}", {"model": path}) from exc
    local = Path(path)
    if not local.is_file():
        raise ModelNotFound(f"weight file {path!r} does not exist", {"model": path})
    return local


# ---------------------------------------------------------------------------- rank


def check_inputs(images: Sequence[Image.Image], prompts: Sequence[str], k: int) -> None:
    if len(images) != len(prompts):
        raise InvalidConfig(
            "one prompt per image is required", {"images": len(images), "prompts": len(prompts)}
        )
    if k < 1:
        raise InvalidConfig(f"k must be at least 1, got {k}", {"k": k}, code="invalid_k")


def rank(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    reference_images: Sequence[Image.Image],
    k: int,
    models: RankingModels,
    weights: RankingWeights = RANKING_PRESETS["aesthetic"],
    *,
    instance_token: str = "",
    on_progress: ProgressFn | None = None,
    return_all: bool = False,
    require_one_face: bool = True,
) -> list[RankedCandidate]:
    """Score every candidate and return the best ``k`` deliverable ones, best first.

    ``return_all``: every candidate, ranked ones first, then the undeliverable ones (rank 0).
    ``require_one_face=False`` lifts the delivery rule (only for random-weight demo models
    whose images are noise).
    """
    # 1. Check inputs.
    check_inputs(images, prompts, k)
    on_progress = on_progress or no_progress
    on_progress(ProgressEvent(Stage.RANKING, 0.0, None, f"scoring {len(images)} candidates"))
    if not images:
        on_progress(ProgressEvent(Stage.RANKING, 1.0, 0.0))
        return []
    clip, head, embedder = models.clip, models.aesthetic, models.face_embedder

    def detect(image: Image.Image) -> list:
        return detect_faces(image, models.face_detector)

    # 2. CLIP embeddings: aesthetic and text alignment.
    image_emb = clip.embed_images(list(images))
    with torch.inference_mode():
        weight = next(head.parameters())
        aesthetic_scores = head(image_emb.to(weight.device, weight.dtype)).float().cpu().tolist()
    text_emb = clip.embed_texts([strip_token(p, instance_token) for p in prompts])
    text_scores = (image_emb * text_emb).sum(-1).tolist()
    on_progress(ProgressEvent(Stage.RANKING, 0.4, None, "faces"))

    # 3. Faces: count (delivery rule) and identity.
    boxes = [detect(im) for im in images]
    identity_scores: list[float | None] = [None] * len(images)
    reference = _reference_embedding(embedder, reference_images, detect)
    if reference is not None:
        for i, (im, found) in enumerate(zip(images, boxes)):
            if len(found) == 0:
                identity_scores[i] = NO_FACE_IDENTITY
                continue
            face = max(found, key=_box_area)
            emb = embedder.embed(im, face)
            identity_scores[i] = NO_FACE_IDENTITY if emb is None else float(_normalise(emb) @ reference)
    on_progress(ProgressEvent(Stage.RANKING, 0.8, None, "combining"))

    # 4. Combine and sort.
    raw = {"aesthetic": aesthetic_scores, "identity": identity_scores, "text": text_scores}
    combined = combine(raw, weights)
    candidates = [
        RankedCandidate(
            index=i,
            image=images[i],
            prompt=prompts[i],
            score=combined[i],
            scores={name: raw[name][i] for name in SCORE_NAMES} | {"combined": combined[i]},
            faces=len(boxes[i]),
            deliverable=len(boxes[i]) == 1 or not require_one_face,
        )
        for i in range(len(images))
    ]
    candidates.sort(key=lambda c: (not c.deliverable, -c.score, c.index))
    delivered = [c for c in candidates if c.deliverable][:k]
    for position, candidate in enumerate(delivered, start=1):
        candidate.rank = position
    on_progress(
        ProgressEvent(
            Stage.RANKING,
            1.0,
            0.0,
            f"{len(delivered)} of {len(images)} kept",
            {"kept": float(len(delivered)), "total": float(len(images))},
        )
    )
    return candidates if return_all else delivered


def combine(raw: dict[str, Sequence[float | None]], weights: RankingWeights) -> list[float]:
    """The documented weighted sum of per-request z-scores (see the module docstring)."""
    n = len(raw["aesthetic"])
    total = np.zeros(n)
    for name in SCORE_NAMES:
        values = raw.get(name)
        w = weights.get(name)
        if values is None or w == 0 or any(v is None for v in values):
            continue
        x = np.asarray(values, dtype=np.float64)
        std = x.std()
        z = (x - x.mean()) / std if std > 1e-12 else np.zeros(n)
        total += w * z
    return [float(v) for v in total]


def strip_token(prompt: str, token: str) -> str:
    """The prompt as CLIP should judge it: the learned instance token means nothing to CLIP."""
    if not token:
        return prompt
    return " ".join(prompt.replace(token, " ").split())


def _reference_embedding(embedder, reference_images, detect) -> np.ndarray | None:
    if embedder is None or not getattr(embedder, "available", False) or not reference_images:
        return None
    embeddings = []
    for im in reference_images:
        found = detect(im)
        if found:
            emb = embedder.embed(im, max(found, key=_box_area))
            if emb is not None:
                embeddings.append(_normalise(emb))
    if not embeddings:
        return None
    return _normalise(np.mean(embeddings, axis=0))


def _normalise(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _box_area(box) -> float:
    return float(box.area)
