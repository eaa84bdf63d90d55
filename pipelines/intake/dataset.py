"""What intake returns: accepted crops with masks and captions, and a report per photo."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.intake.reasons import ReasonCode
from pipelines.types import CropGeometry, TokenSpec, TrainingExample
from pipelines.vision.faces import FaceBox

#: In BLIP captions the subject's place is marked with this; it becomes "<instance> <class>".
SUBJECT = "{subject}"
DATASET_FILE = "dataset.json"


@dataclass(frozen=True)
class PhotoInput:
    photo_id: str
    data: bytes


@dataclass(frozen=True)
class PhotoReport:
    photo_id: str
    accepted: bool
    reason_code: ReasonCode
    message: str
    face_box: FaceBox | None = None  # in the upright full-resolution photo's pixels
    blur: float | None = None  # variance of Laplacian of the face crop; higher is sharper
    identity_distance: float | None = None  # to the set's median face; None when not measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "photo_id": self.photo_id,
            "accepted": self.accepted,
            "reason_code": self.reason_code.value,
            "message": self.message,
            "face_box": self.face_box.to_dict() if self.face_box is not None else None,
            "blur": None if self.blur is None else round(float(self.blur), 2),
            "identity_distance": None if self.identity_distance is None else round(float(self.identity_distance), 4),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhotoReport:
        box = data.get("face_box")
        return cls(
            photo_id=data["photo_id"],
            accepted=bool(data["accepted"]),
            reason_code=ReasonCode(data["reason_code"]),
            message=data["message"],
            face_box=FaceBox(**box) if box else None,
            blur=data.get("blur"),
            identity_distance=data.get("identity_distance"),
        )


@dataclass(frozen=True)
class DatasetItem:
    photo_id: str
    crop: Image.Image  # RGB, crop_size x crop_size
    mask: Image.Image  # "L", same size, 255 = person
    context: str  # "<bg3>", or a BLIP caption containing SUBJECT
    geometry: CropGeometry | None = None  # the square cut from the photo (None in datasets saved before it)

    def prompt(self, instance_token: str, class_token: str) -> str:
        subject = f"{instance_token} {class_token}"
        if SUBJECT in self.context:
            return self.context.replace(SUBJECT, subject)
        return f"{self.context} {subject}".strip()


@dataclass
class Dataset:
    items: list[DatasetItem]
    instance_token: str
    class_token: str
    class_scores: dict[str, float]  # mean cosine distance crop<->word (lower fits better)
    report: list[PhotoReport]
    context_mode: str = "background_token"
    #: how each set-level check went, e.g. {"identity": "not available: ..."}
    checks: dict[str, str] = field(default_factory=dict)

    def training_examples(self) -> list[TrainingExample]:
        return [
            TrainingExample(
                image=item.crop,
                prompt=item.prompt(self.instance_token, self.class_token),
                mask=item.mask,
                photo_id=item.photo_id,
                crop=item.geometry,
            )
            for item in self.items
        ]

    def token_spec(self) -> TokenSpec:
        context_tokens = tuple(item.context for item in self.items) if self.context_mode == "background_token" else ()
        return TokenSpec(self.instance_token, self.class_token, context_tokens)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        (folder / "crops").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        entries = []
        for index, item in enumerate(self.items):
            crop_path, mask_path = f"crops/{index:04d}.png", f"masks/{index:04d}.png"
            item.crop.save(folder / crop_path)
            item.mask.save(folder / mask_path)
            entries.append({"photo_id": item.photo_id, "context": item.context, "crop": crop_path, "mask": mask_path,
                            "geometry": item.geometry.to_dict() if item.geometry is not None else None})
        manifest = {
            "version": 1,
            "instance_token": self.instance_token,
            "class_token": self.class_token,
            "class_scores": self.class_scores,
            "context_mode": self.context_mode,
            "checks": self.checks,
            "items": entries,
            "report": [r.to_dict() for r in self.report],
        }
        tmp = folder / (DATASET_FILE + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(folder / DATASET_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Dataset:
        folder = Path(folder)
        manifest = json.loads((folder / DATASET_FILE).read_text())
        items = []
        for entry in manifest["items"]:
            with Image.open(folder / entry["crop"]) as crop, Image.open(folder / entry["mask"]) as mask:
                geometry = CropGeometry(**entry["geometry"]) if entry.get("geometry") else None
                items.append(DatasetItem(entry["photo_id"], crop.convert("RGB"), mask.convert("L"), entry["context"],
                                         geometry))
        return cls(
            items=items,
            instance_token=manifest["instance_token"],
            class_token=manifest["class_token"],
            class_scores={k: float(v) for k, v in manifest["class_scores"].items()},
            report=[PhotoReport.from_dict(r) for r in manifest["report"]],
            context_mode=manifest.get("context_mode", "background_token"),
            checks=dict(manifest.get("checks", {})),
        )


__all__ = ["SUBJECT", "Dataset", "DatasetItem", "PhotoInput", "PhotoReport"]
