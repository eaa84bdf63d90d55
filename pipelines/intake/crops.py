"""Per-crop image operations: square face crop with border replication, blur, perceptual hash."""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from pipelines.vision.boxes import Box


def square_around(face: Box, margin: float) -> tuple[int, int, int]:
    """(left, top, side) of the square centred on ``face``, ``margin`` x its size added on each side."""
    side = max(1, math.ceil(max(face.width, face.height) * (1.0 + 2.0 * margin)))
    cx, cy = face.center
    return round(cx - side / 2), round(cy - side / 2), side


def crop_square(image: Image.Image, left: int, top: int, side: int) -> Image.Image:
    """The square (left, top, side) of ``image``; where it leaves the image, edge pixels are replicated."""
    width, height = image.size
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    if x0 >= x1 or y0 >= y1:
        raise ValueError("crop square lies outside the image")
    inside = np.asarray(image.crop((x0, y0, x1, y1)).convert("RGB"))
    pad = ((y0 - top, top + side - y1), (x0 - left, left + side - x1))
    if any(p for pair in pad for p in pair):
        inside = cv2.copyMakeBorder(inside, pad[0][0], pad[0][1], pad[1][0], pad[1][1], cv2.BORDER_REPLICATE)
    return Image.fromarray(np.ascontiguousarray(inside), "RGB")


def resize_square(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0 if image.width > 3 * size else None)


def blur_score(crop: Image.Image, size: int = 256) -> float:
    """Variance of the Laplacian of the grey crop at a fixed size (higher is sharper)."""
    grey = np.asarray(crop.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT hash (pHash): the signs of the 8x8 lowest frequencies of a 32x32 grey view."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float32)
    low = cv2.dct(grey)[:8, :8]
    bits = (low > np.median(low[np.ones_like(low, dtype=bool) ^ _DC_ONLY])).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


_DC_ONLY = np.zeros((8, 8), dtype=bool)
_DC_ONLY[0, 0] = True  # the mean brightness does not vote on the median


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
