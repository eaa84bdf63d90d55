"""Metadata stripping without re-encoding: the stored file keeps every pixel and loses every tag but the orientation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipelines.intake.decode import PhotoRejected, decode_photo, inspect_photo
from pipelines.intake.metadata import strip_metadata
from pipelines.intake.reasons import ReasonCode
from tests.conftest import encode

#: strings that must not survive in a stored file (maker, GPS in XMP, a comment, a text chunk)
SECRETS = (b"PhoneMaker", b"48.8566", b"my secret comment", b"Home, 12 Rue X")
XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="48.8566N" '
       'xmlns:dc="http://purl.org/dc/elements/1.1/" dc:description="Home, 12 Rue X"/></rdf:RDF></x:xmpmeta>')


def _exif(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 23.76), "E", (2.0, 21.0, 7.99)
    if orientation is not None:
        exif[0x0112] = orientation
    return exif


def _photo(astronaut: Image.Image, size: int = 384) -> Image.Image:
    return astronaut.resize((size, size * 3 // 4))


def _stored(original: bytes) -> bytes:
    header = inspect_photo(original)
    return strip_metadata(original, header.format, header.orientation)


def _assert_clean(stored: bytes, orientation: int = 1) -> None:
    for secret in SECRETS:
        assert secret not in stored, secret
    image = Image.open(io.BytesIO(stored))
    exif = dict(image.getexif())
    assert exif == ({} if orientation == 1 else {0x0112: orientation})
    assert not image.getexif().get_ifd(0x8825)  # no GPS


def _assert_same_pixels(original: bytes, stored: bytes) -> None:
    a, b = decode_photo(original), decode_photo(stored)
    assert a.size == b.size and a.info["original_size"] == b.info["original_size"]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def _jpeg_variants(photo: Image.Image) -> dict[str, bytes]:
    out = {
        "baseline": encode(photo, "JPEG", quality=90, exif=_exif().tobytes(), comment=b"my secret comment",
                           xmp=XMP.encode()),
        "progressive+restart": encode(photo, "JPEG", quality=85, progressive=True, restart_marker_blocks=4,
                                      exif=_exif().tobytes()),
        "cmyk+adobe+icc": encode(photo.convert("CMYK"), "JPEG", quality=90, exif=_exif().tobytes(),
                                 icc_profile=_srgb_icc()),
        "grey": encode(photo.convert("L"), "JPEG", quality=80, exif=_exif().tobytes()),
    }
    mpo = io.BytesIO()  # a phone's multi-picture file: the second picture carries its own EXIF
    photo.save(mpo, "MPO", save_all=True, append_images=[photo.rotate(90)], exif=_exif().tobytes())
    out["mpo"] = mpo.getvalue()
    return out


def _srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _png_variants(photo: Image.Image) -> dict[str, bytes]:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "my secret comment")
    info.add_itxt("XML:com.adobe.xmp", XMP)
    info.add_text("Raw profile type exif", "Home, 12 Rue X", zip=True)
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    deep = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)
    return {
        "rgb": encode(photo, "PNG", pnginfo=info, exif=_exif().tobytes()),
        "rgba": encode(rgba, "PNG", pnginfo=info),
        "16bit": encode(deep, "PNG", pnginfo=info, exif=_exif().tobytes()),
        "palette": encode(photo.convert("P"), "PNG", pnginfo=info, exif=_exif().tobytes()),
    }


def _webp_variants(photo: Image.Image) -> dict[str, bytes]:
    animated = io.BytesIO()
    photo.save(animated, "WEBP", save_all=True, append_images=[photo.rotate(180)], exif=_exif().tobytes(),
               xmp=XMP.encode(), lossless=True)
    return {
        "lossy": encode(photo, "WEBP", quality=80, exif=_exif().tobytes(), xmp=XMP.encode()),
        "lossless+alpha": encode(photo.convert("RGBA"), "WEBP", lossless=True, exif=_exif().tobytes()),
        "animated": animated.getvalue(),
    }


def _all_variants(astronaut: Image.Image) -> dict[str, bytes]:
    photo = _photo(astronaut)
    variants = {f"jpeg-{k}": v for k, v in _jpeg_variants(photo).items()}
    variants |= {f"png-{k}": v for k, v in _png_variants(photo).items()}
    variants |= {f"webp-{k}": v for k, v in _webp_variants(photo).items()}
    variants["heic"] = encode(photo, "HEIF", quality=80, exif=_exif().tobytes(), xmp=XMP.encode())
    variants["avif"] = encode(photo, "AVIF", quality=70, exif=_exif().tobytes(), xmp=XMP.encode())
    return variants


@pytest.fixture(scope="module")
def variants(astronaut) -> dict[str, bytes]:
    return _all_variants(astronaut)


VARIANT_NAMES = ["jpeg-baseline", "jpeg-progressive+restart", "jpeg-cmyk+adobe+icc", "jpeg-grey", "jpeg-mpo",
                 "png-rgb", "png-rgba", "png-16bit", "png-palette", "webp-lossy", "webp-lossless+alpha",
                 "webp-animated", "heic", "avif"]


def test_the_variant_list_is_complete(variants):
    assert sorted(variants) == sorted(VARIANT_NAMES)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_metadata_goes_and_every_pixel_stays(variants, name):
    original = variants[name]
    assert any(secret in original for secret in SECRETS) or name.startswith(("heic", "avif", "jpeg-progressive",
                                                                              "jpeg-cmyk", "jpeg-grey", "jpeg-mpo"))
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(0x8825) or name == "png-rgba"
    stored = _stored(original)
    _assert_clean(stored)
    _assert_same_pixels(original, stored)
    assert len(stored) <= len(original)
    assert _stored(stored) == stored  # stripping twice changes nothing


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_is_the_one_tag_kept(astronaut, fmt, orientation):
    photo = _photo(astronaut)
    original = encode(photo, fmt, exif=_exif(orientation).tobytes(), **({"xmp": XMP.encode()} if fmt != "PNG" else {}))
    stored = _stored(original)
    _assert_clean(stored, orientation)
    _assert_same_pixels(original, stored)
    upright = decode_photo(stored)
    assert upright.size == (photo.size[::-1] if orientation in (6, 8) else photo.size)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_keep_their_container_rotation(astronaut, fmt):
    photo = _photo(astronaut)
    original = encode(photo, fmt, quality=80, exif=_exif(6).tobytes(), xmp=XMP.encode())
    stored = _stored(original)
    for secret in SECRETS:
        assert secret not in stored
    exif = Image.open(io.BytesIO(stored)).getexif()
    assert not exif.get_ifd(0x8825) and 0x010F not in exif
    _assert_same_pixels(original, stored)
    assert decode_photo(stored).size == photo.size[::-1]  # turned by irot, as the phone meant


def test_orientation_given_only_in_xmp_is_kept(astronaut):
    xmp = XMP.replace('dc:description="Home, 12 Rue X"', 'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
                                                          'tiff:Orientation="6" dc:description="Home, 12 Rue X"')
    original = encode(_photo(astronaut), "JPEG", quality=90, xmp=xmp.encode())
    stored = _stored(original)
    _assert_clean(stored, 6)
    _assert_same_pixels(original, stored)


def test_reduced_jpeg_decode_sees_the_same_pixels(variants):
    original = variants["jpeg-progressive+restart"]
    a, b = decode_photo(original, reduce_to=100), decode_photo(_stored(original), reduce_to=100)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def _png_with_bad_crc(data: bytes) -> bytes:
    broken = bytearray(data)
    broken[40] ^= 0xFF  # inside IHDR's CRC or the first chunk after it
    return bytes(broken)


@pytest.mark.parametrize("name, make", [
    ("jpeg cut off in its pixels", lambda v: v["jpeg-baseline"][: len(v["jpeg-baseline"]) // 2]),
    ("png cut off", lambda v: v["png-rgb"][: len(v["png-rgb"]) - 30]),
    ("png with a bad checksum", lambda v: _png_with_bad_crc(v["png-rgb"])),
    ("webp cut off", lambda v: v["webp-lossy"][: len(v["webp-lossy"]) // 2]),
])
def test_a_damaged_container_is_corrupt_image(variants, name, make):
    data = make(variants)
    with pytest.raises(PhotoRejected) as info:
        header = inspect_photo(data)
        strip_metadata(data, header.format, header.orientation)
    assert info.value.reason is ReasonCode.CORRUPT_IMAGE, name


def test_a_jpeg_without_end_marker_is_refused_as_corrupt_like_a_decoder_does():
    data = encode(Image.new("RGB", (300, 300), (10, 20, 30)), "JPEG")
    with pytest.raises(PhotoRejected) as info:
        strip_metadata(data[:-2], "jpeg")
    assert info.value.reason is ReasonCode.CORRUPT_IMAGE


def test_png_text_after_the_pixels_is_found_and_dropped(astronaut):
    """Pillow reads chunks after IDAT only when it decodes; the orientation in them still counts."""
    photo = _photo(astronaut)
    data = encode(photo, "PNG")
    iend = data.rindex(b"IEND") - 4
    body = _exif(6).tobytes()[6:]  # eXIf holds the TIFF block without the "Exif\0\0" prefix

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    late = data[:iend] + chunk(b"tEXt", b"Comment\x00my secret comment") + chunk(b"eXIf", body) + data[iend:]
    assert inspect_photo(late).orientation == 6
    stored = _stored(late)
    _assert_clean(stored, 6)
    _assert_same_pixels(late, stored)
