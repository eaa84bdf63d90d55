"""Decoding what phones and users actually upload, and refusing what must be refused."""

from __future__ import annotations

import io
import pickle
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import PipelineError
from pipelines.intake.decode import DecodeLimits, PhotoRejected, decode_photo, inspect_photo, sniff_format
from pipelines.intake.metadata import strip_metadata
from pipelines.intake.reasons import ReasonCode
from tests.conftest import encode


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16)).mean())


def _png_with_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16), (200, 100, 50))))
    sof = data.index(b"\xff\xc0")  # baseline SOF: marker, length(2), precision(1), height(2), width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _rejection(data: bytes, limits: DecodeLimits = DecodeLimits()) -> PhotoRejected:
    with pytest.raises(PhotoRejected) as info:
        decode_photo(data, limits)
    return info.value


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF", "AVIF"])
def test_phone_formats_decode_to_the_same_rgb_picture(astronaut, fmt):
    data = encode(astronaut, fmt, **({"quality": 95} if fmt != "PNG" else {}))
    image = decode_photo(data)
    assert image.mode == "RGB" and image.size == astronaut.size
    assert _mean_abs_diff(image, astronaut) < 6


@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied(astronaut, orientation, stored):
    # A phone stores the sensor's pixels sideways and says how to turn them in EXIF.
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(astronaut.transpose(stored), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_photo(data)
    assert image.size == astronaut.size
    assert _mean_abs_diff(image, astronaut) < 6
    assert image.info["original_size"] == astronaut.size


def test_reduced_decode_keeps_orientation_and_full_size(astronaut):
    big = astronaut.resize((2048, 1024))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_photo(encode(big.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()), reduce_to=600)
    assert image.info["original_size"] == (2048, 1024)
    assert 600 <= max(image.size) < 2048 and image.width > image.height


def test_cmyk_jpeg_keeps_its_colours(astronaut):
    image = decode_photo(encode(astronaut.convert("CMYK"), "JPEG", quality=95))
    assert image.mode == "RGB"
    assert _mean_abs_diff(image, astronaut) < 8


def test_transparency_is_composited_on_neutral_grey(astronaut):
    rgba = astronaut.convert("RGBA")
    alpha = np.full(astronaut.size[::-1], 255, dtype=np.uint8)
    alpha[:, : astronaut.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    image = np.asarray(decode_photo(encode(rgba, "PNG")))
    assert (image[:, : astronaut.width // 2] == 128).all()  # not black, not white
    assert np.abs(image[:, -10:].astype(int) - np.asarray(astronaut)[:, -10:]).max() == 0


def test_palette_with_transparency_and_grey_alpha(astronaut):
    la = astronaut.convert("LA")
    assert decode_photo(encode(la, "PNG")).mode == "RGB"
    palette = astronaut.convert("P")
    palette.info["transparency"] = 0
    assert decode_photo(encode(palette, "PNG", transparency=0)).mode == "RGB"


def test_16_bit_png_is_scaled_not_clipped(astronaut):
    grey = np.asarray(astronaut.convert("L"))
    deep = Image.fromarray((grey.astype(np.uint16) * 257).astype(np.uint16))
    assert deep.mode.startswith("I;16")
    image = np.asarray(decode_photo(encode(deep, "PNG")))
    assert np.abs(image[..., 0].astype(int) - grey).max() <= 1  # Pillow's convert would give white


def test_animated_webp_gives_its_first_frame(astronaut):
    frames = [astronaut, Image.new("RGB", astronaut.size, (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert _mean_abs_diff(decode_photo(buf.getvalue()), astronaut) < 2


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("zero bytes", lambda a: b"", ReasonCode.EMPTY_FILE),
        ("text renamed to .jpg", lambda a: b"Dear diary, today I took a selfie.\n" * 20, ReasonCode.NOT_AN_IMAGE),
        ("truncated jpeg", lambda a: encode(a)[:6000], ReasonCode.CORRUPT_IMAGE),
        ("jpeg magic then garbage", lambda a: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, ReasonCode.CORRUPT_IMAGE),
        ("gif", lambda a: encode(a, "GIF"), ReasonCode.UNSUPPORTED_FORMAT),
        ("too small", lambda a: encode(a.resize((300, 200))), ReasonCode.TOO_SMALL),
        ("png header 30000x30000", lambda a: _png_with_header(30000, 30000), ReasonCode.DECOMPRESSION_BOMB),
        ("jpeg SOF 30000x30000", lambda a: _jpeg_claiming(30000, 30000), ReasonCode.DECOMPRESSION_BOMB),
    ],
)
def test_bad_files_are_refused_with_their_reason(astronaut, name, make, reason):
    rejected = _rejection(make(astronaut))
    assert rejected.reason is reason, name
    assert rejected.user_error and rejected.error_code == reason.value
    assert rejected.message
    # The upload's check (header, then the container rewritten without metadata) gives the same reason
    # without decoding a pixel.
    with pytest.raises(PhotoRejected) as at_upload:
        header = inspect_photo(make(astronaut))
        strip_metadata(make(astronaut), header.format, header.orientation)
    assert at_upload.value.reason is reason, name


def test_header_gives_the_upright_size_without_decoding(astronaut):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(astronaut.resize((640, 480)).transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    header = inspect_photo(data)
    assert (header.format, header.width, header.height, header.orientation) == ("jpeg", 640, 480, 6)
    assert decode_photo(data).size == (640, 480)


def test_bomb_header_is_refused_without_allocating_pixels():
    tracemalloc.start()
    try:
        rejected = _rejection(_jpeg_claiming(30000, 30000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rejected.reason is ReasonCode.DECOMPRESSION_BOMB
    assert peak < 20 * 2**20  # the full frame would be 2.7 GB


def test_limits_are_per_call(astronaut):
    data = encode(astronaut)
    assert _rejection(data, DecodeLimits(max_bytes=1000)).reason is ReasonCode.TOO_LARGE_BYTES
    assert _rejection(data, DecodeLimits(max_pixels=100_000)).reason is ReasonCode.DECOMPRESSION_BOMB
    assert _rejection(data, DecodeLimits(min_side=600)).reason is ReasonCode.TOO_SMALL


def test_rejection_survives_pickling():
    error = PhotoRejected(ReasonCode.TOO_SMALL, "too small (10x10)", {"width": 10})
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, PipelineError)
    assert (copy.reason, copy.message, copy.details["width"]) == (ReasonCode.TOO_SMALL, "too small (10x10)", 10)


def test_sniff_format_reads_magic_bytes_not_names(astronaut):
    assert sniff_format(encode(astronaut, "HEIF")) == "heif"
    assert sniff_format(encode(astronaut, "AVIF")) == "avif"
    assert sniff_format(encode(astronaut, "WEBP")) == "webp"
    assert sniff_format(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom") is None  # a video
    assert sniff_format(b"%PDF-1.7") is None


def test_reason_codes_are_closed_and_documented():
    assert len({c.value for c in ReasonCode}) == len(ReasonCode)
    assert all(code.default_message.endswith(".") for code in ReasonCode)
    assert ReasonCode("multiple_people") is ReasonCode.MULTIPLE_PEOPLE
