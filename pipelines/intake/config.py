"""Intake settings: one frozen, serialisable dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from pipelines.errors import InvalidConfig
from pipelines.intake.decode import DecodeLimits
from pipelines.text.subject import CLASS_CANDIDATES, INSTANCE_TOKEN

CONTEXT_MODES = ("background_token", "blip")


@dataclass(frozen=True)
class IntakeConfig:
    clip_model: str  # CLIP folder or hub id: the preset's ``clip`` (ViT-L/14 for sd15)
    class_token: str | None = None  # client override; CLIP scores are still computed
    class_candidates: tuple[str, ...] = CLASS_CANDIDATES
    instance_token: str = INSTANCE_TOKEN
    context_mode: str = "background_token"  # or "blip"
    blip_model: str = "Salesforce/blip-image-captioning-base"
    min_photos: int = 5
    max_photos: int = 50
    min_face_px: int = 96  # face box side in the full-resolution photo
    # Added on every side of the face box, as a fraction of its longer side: 0.75 gives a
    # square 2.5x the face, i.e. the whole head with hair and a little neck.
    face_margin: float = 0.75
    crop_size: int = 512
    # Variance of the Laplacian of the grey face crop at 256 px; below this the photo
    # is "blurry". Sharp phone photos score in the hundreds, heavy blur under 20.
    blur_threshold: float = 25.0
    duplicate_hamming: int = 6  # of 64 perceptual-hash bits; at or below is a near-duplicate
    identity_threshold: float | None = None  # None: the embedder's own "different person" distance
    person_min_score: float = 0.5
    face_min_score: float = 0.5
    # A face no person box explains counts as one more person when it is at least this
    # fraction of the largest face's size (smaller: a picture in the picture, a bystander).
    second_face_min_ratio: float = 0.4
    person_backend: str = "blazepose"
    face_backend: str = "blazeface"
    identity_backend: str = "auto"
    upscale_small_faces: bool = False  # Real-ESRGAN x2 before resizing faces smaller than crop_size
    upscaler_model: str | None = None  # the preset's ``upscaler_x2`` (spandrel-loadable file)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    device: str = "cpu"  # for CLIP / BLIP / upscaler

    def to_dict(self) -> dict:
        data = asdict(self)
        data["class_candidates"] = list(self.class_candidates)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> IntakeConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "class_candidates" in values:
            values["class_candidates"] = tuple(values["class_candidates"])
        if isinstance(values.get("limits"), dict):
            values["limits"] = DecodeLimits(**values["limits"])
        return cls(**values)

    def check(self) -> None:
        """Raise :class:`InvalidConfig` naming the first field that can never work."""
        problems = []
        if not self.clip_model:
            problems.append("clip_model is required (the preset's clip)")
        if not self.class_candidates or any(not w.strip() for w in self.class_candidates):
            problems.append("class_candidates must be non-empty words")
        if self.class_token is not None and not self.class_token.strip():
            problems.append("class_token must be a word or None")
        if not self.instance_token.strip() or " " in self.instance_token.strip():
            problems.append("instance_token must be one token without spaces")
        if self.context_mode not in CONTEXT_MODES:
            problems.append(f"context_mode must be one of {CONTEXT_MODES}")
        if self.min_photos < 1 or self.max_photos < self.min_photos:
            problems.append("need 1 <= min_photos <= max_photos")
        if self.crop_size < 64:
            problems.append("crop_size must be at least 64")
        if self.face_margin < 0 or self.min_face_px < 1:
            problems.append("face_margin must be >= 0 and min_face_px >= 1")
        if not 0 < self.second_face_min_ratio <= 1:
            problems.append("second_face_min_ratio must be within (0, 1]")
        if not 0 <= self.duplicate_hamming <= 64:
            problems.append("duplicate_hamming must be within 0..64")
        if self.upscale_small_faces and not self.upscaler_model:
            problems.append("upscale_small_faces needs upscaler_model (the preset's upscaler_x2)")
        if problems:
            raise InvalidConfig("invalid intake config: " + "; ".join(problems), {"problems": problems})
