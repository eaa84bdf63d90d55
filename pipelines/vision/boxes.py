"""Axis-aligned boxes in pixel coordinates of the image they were found in."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def scaled(self, factor: float, dx: float = 0.0, dy: float = 0.0):
        """The same box in another image: multiply by ``factor``, then shift by (dx, dy)."""
        return type(self)(self.x0 * factor + dx, self.y0 * factor + dy,
                          self.x1 * factor + dx, self.y1 * factor + dy, self.score)

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(float(v), 2) for k, v in asdict(self).items()}


def clip_to_image(box: Box, width: int, height: int) -> Box:
    return type(box)(max(box.x0, 0.0), max(box.y0, 0.0),
                     min(box.x1, float(width)), min(box.y1, float(height)), box.score)


def merge_overlapping(boxes: list[Box], iou_threshold: float = 0.3) -> list[Box]:
    """Greedy non-maximum suppression: keep the best-scoring box of each overlapping group."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: (-b.score, b.x0, b.y0)):
        if all(box.iou(k) < iou_threshold and not _contains_center(k, box) for k in kept):
            kept.append(box)
    return kept


def _contains_center(a: Box, b: Box) -> bool:
    cx, cy = b.center
    return a.x0 <= cx <= a.x1 and a.y0 <= cy <= a.y1
