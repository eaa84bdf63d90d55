"""The models intake runs with, as one bundle the caller loads (or borrows) and passes in.

    models = load_intake_models(config)            # CLI, tests: load now
    with manager.borrow(intake_models(config)) as models:   # worker: shared, locked
        prepare_dataset(photos, config, models)

Importing this module stays light (no torch): the spec functions are imported on call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.errors import InvalidConfig
from pipelines.intake.captions import captioner_spec
from pipelines.intake.config import IntakeConfig
from pipelines.models.specs import BundleSpec
from pipelines.vision.faces import face_detector_spec
from pipelines.vision.identity import face_embedder_spec
from pipelines.vision.persons import person_detector_spec
from pipelines.vision.segmentation import segmenter_spec


@dataclass
class IntakeModels:
    person_detector: Any  # pipelines.vision.persons.PersonDetector: exactly one person
    face_detector: Any  # pipelines.vision.faces.FaceDetector: the face to crop
    face_embedder: Any  # pipelines.vision.identity.FaceEmbedder: identity outliers (may be unavailable)
    clip: Any  # pipelines.models.clip.ClipEmbedder: the class word
    segmenter: Any  # pipelines.vision.segmentation.SelfieSegmenter: person masks
    upscaler: Any = None  # Real-ESRGAN x2, only with ``upscale_small_faces``
    captioner: Any = None  # BLIP, only with ``context_mode="blip"``


def intake_models(config: IntakeConfig) -> BundleSpec[IntakeModels]:
    """What ``prepare_dataset`` needs for ``config``: keys and loaders, nothing loaded yet.

    Raises :class:`InvalidConfig` for a config that can never work, before anything loads.
    """
    from pipelines.models.clip import clip_spec
    from pipelines.upscale import upscaler_spec

    config.check()
    device = config.device
    return BundleSpec(
        {
            "person_detector": person_detector_spec(config.person_backend),
            "face_detector": face_detector_spec(config.face_backend, device),
            "face_embedder": face_embedder_spec(config.identity_backend, device),
            "clip": clip_spec(config.clip_model, device),
            "segmenter": segmenter_spec(),
            "upscaler": upscaler_spec(config.upscaler_model, device) if config.upscale_small_faces else None,
            "captioner": captioner_spec(config.blip_model, device) if config.context_mode == "blip" else None,
        },
        lambda parts: IntakeModels(**parts),
    )


def load_intake_models(config: IntakeConfig) -> IntakeModels:
    return intake_models(config).load()


def check_models(config: IntakeConfig, models: IntakeModels) -> None:
    """The optional parts ``config`` asks for are there."""
    missing = []
    if config.upscale_small_faces and models.upscaler is None:
        missing.append("upscaler (upscale_small_faces)")
    if config.context_mode == "blip" and models.captioner is None:
        missing.append("captioner (context_mode='blip')")
    if missing:
        raise InvalidConfig(
            "intake models lack " + ", ".join(missing) + "; build them with intake_models(config)",
            {"missing": missing},
            code="intake_models_incomplete",
        )
