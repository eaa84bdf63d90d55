"""Decode an uploaded photo safely into an upright sRGB ``PIL.Image`` in mode RGB.

Imported by the API at upload time, so this module must stay light: Pillow,
pillow-heif and numpy only (no torch, no mediapipe).

Decisions a client can observe:

* Formats: JPEG, PNG, WebP, HEIC/HEIF and AVIF, recognised by their magic bytes (the
  file name and the declared content type are ignored). GIF, BMP and TIFF are known
  but refused as ``unsupported_format``; anything else is ``not_an_image``.
* Animated or multi-image files (animated WebP/PNG, HEIC bursts) are **accepted, first
  frame** (the primary image): a phone's "live" or burst photo still shows the
  subject, and refusing it would only make the user convert it by hand.
* The pixel count is read from the header and checked against
  ``DecodeLimits.max_pixels`` before any pixel is decoded, so a tiny file declaring
  30,000 x 30,000 pixels is refused as ``decompression_bomb`` without allocating.
* EXIF orientation is applied; embedded ICC profiles (CMYK, Display P3) are converted
  to sRGB; palette, grey, 16-bit and alpha images become 8-bit RGB, with transparency
  composited on neutral grey (128, 128, 128) so it reads as neither skin nor sky.
* :func:`inspect_photo` makes the same refusals from the header alone (the API's upload
  check); the API stores the file as sent minus its metadata
  (:func:`pipelines.intake.metadata.strip_metadata`), and intake decodes it here.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from pipelines.errors import PipelineError
from pipelines.intake.reasons import ReasonCode

try:  # HEIC/HEIF opener; registering twice is harmless.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    pillow_heif = None

SUPPORTED_FORMATS = ("jpeg", "png", "webp", "heif", "avif")
KNOWN_UNSUPPORTED_FORMATS = ("gif", "bmp", "tiff")
BACKGROUND_GREY = (128, 128, 128)
_EXIF_ORIENTATION = 0x0112

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 40 * 1024 * 1024
    # 100 MP admits every phone camera up to 108 MP sensors; a decoded RGB frame of
    # that size is 300 MB, the most one worker should allocate for one photo.
    max_pixels: int = 100_000_000
    min_side: int = 256

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.min_side < 1:
            raise ValueError(f"invalid decode limits: {self}")


class PhotoRejected(PipelineError):
    """One photo cannot be used; ``reason`` says why (a :class:`ReasonCode`)."""

    code = "photo_rejected"
    user_error = True

    def __init__(self, reason: ReasonCode | str, message: str | None = None, details: dict[str, Any] | None = None):
        reason = ReasonCode(reason)
        super().__init__(message or reason.default_message, {"reason": reason.value, **(details or {})}, reason.value)

    @property
    def reason(self) -> ReasonCode:
        return ReasonCode(self.details["reason"])

    def __reduce__(self):
        extra = {k: v for k, v in self.details.items() if k != "reason"}
        return (type(self), (self.reason, self.message, extra))


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, or None when it is not an image we know."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        box_size = int.from_bytes(head[0:4], "big")
        brands = {head[8:12]}
        # Compatible brands follow the minor version, up to the end of the ftyp box.
        for offset in range(16, min(max(box_size, 16), len(head)) - 3, 4):
            brands.add(head[offset : offset + 4])
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
        return None  # MP4/MOV video and other ISO-BMFF files
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


@dataclass(frozen=True)
class PhotoHeader:
    """What the upload checks read from a file without decoding a pixel."""

    format: str  # one of SUPPORTED_FORMATS
    width: int  # upright (after the EXIF orientation)
    height: int
    orientation: int  # the EXIF orientation the decoder applies (1: none)


def inspect_photo(data: bytes, limits: DecodeLimits = DecodeLimits()) -> PhotoHeader:
    """Format, upright size and orientation from the header, or :class:`PhotoRejected` for a file
    that can never be used (empty, too large, not an image, unsupported, too small, a bomb)."""
    fmt, image = _checked_header(data, limits)
    orientation = _orientation(image, fmt, data)
    width, height = image.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return PhotoHeader(fmt, width, height, orientation)


def _checked_header(data: bytes, limits: DecodeLimits) -> tuple[str, Image.Image]:
    # 1. cheap checks on the bytes
    if not data:
        raise PhotoRejected(ReasonCode.EMPTY_FILE)
    if len(data) > limits.max_bytes:
        raise PhotoRejected(
            ReasonCode.TOO_LARGE_BYTES,
            f"The file is too large ({len(data) / 2**20:.1f} MiB; at most {limits.max_bytes / 2**20:.0f} MiB).",
            {"bytes": len(data), "max_bytes": limits.max_bytes},
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise PhotoRejected(ReasonCode.NOT_AN_IMAGE)
    if fmt not in SUPPORTED_FORMATS:
        raise PhotoRejected(ReasonCode.UNSUPPORTED_FORMAT, details={"format": fmt})

    # 2. header only: size checks before any pixel is decoded
    image = _open_header(data, limits)
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _bomb(width, height, limits)
    if min(width, height) < limits.min_side:
        raise PhotoRejected(
            ReasonCode.TOO_SMALL,
            f"The image is too small ({width}x{height}); the short side must be at least {limits.min_side} pixels.",
            {"width": width, "height": height, "min_side": limits.min_side},
        )
    return fmt, image


def _orientation(image: Image.Image, fmt: str, data: bytes) -> int:
    """The orientation :func:`decode_photo` will apply (Pillow's reading, from EXIF or XMP)."""
    try:
        if fmt == "png" and "exif" not in image.info and not _png_metadata_after_pixels(data):
            exif = Image.Image.getexif(image)  # what PngImageFile.getexif finds, without decoding the pixels first
        else:
            exif = image.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: Pillow's transpose would see none either
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _png_metadata_after_pixels(data: bytes) -> bool:
    """Is there an eXIf or text chunk after the first IDAT (read by Pillow only once the pixels are)?"""
    pos, seen_idat = 8, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            seen_idat = True
        elif seen_idat and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
            return True
        elif kind == b"IEND":
            return False
        pos += 12 + length
    return False


def decode_photo(data: bytes, limits: DecodeLimits = DecodeLimits(), reduce_to: int | None = None) -> Image.Image:
    """Upright 8-bit sRGB RGB image from an uploaded file, or :class:`PhotoRejected`.

    ``reduce_to``: for JPEG, decode at a reduced scale (1/2, 1/4, 1/8, done inside the
    decoder, several times faster) whose long side is still at least ``reduce_to``;
    other formats decode at full size. ``image.info["original_size"]`` is always the
    upright full-resolution (width, height), so boxes can be mapped between scales.
    """
    # 1-2. bytes and header
    fmt, image = _checked_header(data, limits)
    width, height = image.size

    # 3. decode the first frame, then normalise orientation, colour and mode
    try:
        image.seek(0)
        if reduce_to is not None and fmt == "jpeg" and max(width, height) > reduce_to:
            factor = reduce_to / max(width, height)
            image.draft(image.mode, (math.ceil(width * factor), math.ceil(height * factor)))
        image.load()
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        image = ImageOps.exif_transpose(image)
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        image = _to_srgb_rgb(image)
        image.info["original_size"] = upright
        return image
    except (PhotoRejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - image plugins raise many types on malformed data
        raise PhotoRejected(ReasonCode.CORRUPT_IMAGE, details={"error": str(exc)[:200]}) from None


def _bomb(width: int, height: int, limits: DecodeLimits) -> PhotoRejected:
    return PhotoRejected(
        ReasonCode.DECOMPRESSION_BOMB,
        f"The image declares {width}x{height} pixels; at most {limits.max_pixels / 1e6:.0f} megapixels are allowed.",
        {"width": width, "height": height, "max_pixels": limits.max_pixels},
    )


def _open_header(data: bytes, limits: DecodeLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns (and errors at 2x) on its global limit;
            # ours is the per-call limit checked right after, so silence the warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        width, height = _size_from_message(str(exc))
        raise _bomb(width, height, limits) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, RuntimeError) as exc:
        raise PhotoRejected(ReasonCode.CORRUPT_IMAGE, details={"error": str(exc)[:200]}) from None


def _size_from_message(message: str) -> tuple[int, int]:
    # Pillow says "Image size (N pixels) exceeds limit ..." without the sides.
    match = re.search(r"\((\d+) pixels\)", message)
    total = int(match.group(1)) if match else 0
    side = int(total**0.5)
    return side, side


def _to_srgb_rgb(image: Image.Image) -> Image.Image:
    image = _apply_icc(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
        mode = "L"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND_GREY, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK without profile, YCbCr, LAB, HSV


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit) grey to 8-bit by scaling, not clipping: Pillow's convert clips at 255."""
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0 if array.max(initial=0) <= 1.0 else np.clip(array, 0, 65535) / 257.0
    else:
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


def _apply_icc(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(
            image, source, _srgb_profile(), outputMode=output_mode, renderingIntent=ImageCms.Intent.PERCEPTUAL
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image  # a broken profile is not worth rejecting the photo; Pillow's conversion follows
    converted.info.pop("icc_profile", None)
    return converted


_SRGB = None


def _srgb_profile():
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.createProfile("sRGB")
    return _SRGB
