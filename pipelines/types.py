"""Plain data passed between pipeline stages (intake -> training -> generation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class TokenSpec:
    """The new tokens a subject's adapter adds, and the class word it pairs them with.

    Prompts read ``"<context> <instance_token> <class_token>"``; ``context_tokens`` are the
    per-photo background tokens (``<bg0>``, ``<bg1>``, ...) when captions use them.
    """

    instance_token: str
    class_token: str
    context_tokens: tuple[str, ...] = ()

    @property
    def new_tokens(self) -> tuple[str, ...]:
        return (self.instance_token, *self.context_tokens)


@dataclass(frozen=True)
class CropGeometry:
    """Where a training crop came from: the photo's size and the square cut from it (which may reach
    past the photo's edges, filled by replicated edge pixels), in the photo's full-resolution pixels."""

    photo_width: int
    photo_height: int
    left: int
    top: int
    side: int

    def size_conditioning(self, resolution: int, flipped: bool = False) -> tuple[int, int, int, int, int, int]:
        """SDXL's micro-conditioning for this crop trained at ``resolution``: (original height, original
        width, crop top, crop left, target height, target width). As in SDXL's training, the original is
        the photo as shot, and the crop's corner is measured in the photo scaled so that the crop is
        ``resolution`` pixels wide (mirrored for a flipped copy); corners outside the photo count as 0."""
        scale = resolution / self.side
        left = self.photo_width - self.left - self.side if flipped else self.left
        return (self.photo_height, self.photo_width, max(0, round(self.top * scale)), max(0, round(left * scale)),
                resolution, resolution)

    def to_dict(self) -> dict[str, int]:
        return {"photo_width": self.photo_width, "photo_height": self.photo_height, "left": self.left,
                "top": self.top, "side": self.side}


@dataclass(frozen=True)
class TrainingExample:
    image: Image.Image  # RGB face crop, square
    prompt: str  # full caption, e.g. "<bg3> <subj> girl"
    mask: Image.Image | None = None  # "L" person mask, same size as image (255 = person)
    photo_id: str = ""
    extra: dict = field(default_factory=dict)
    crop: CropGeometry | None = None  # None: the image is the whole photo, uncropped
