"""Photos for intake tests, made from the two real public-domain photos.

Distinct accepted photos of one person come from mirroring and rotating (0, +-8, +-16
degrees) a photo upscaled to 1024 px (face about 200 px). Their face crops differ by
12 or more of 64 perceptual-hash bits, above the default duplicate threshold (6),
while their dlib identity distances stay below 0.2, far under the 0.6 outlier limit.
Colour jitter or recompression alone would make near-duplicates, so those are used
only where a duplicate is wanted.
"""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import encode

ANGLES = (0, 8, -8, 16, -16)


def person_variants(photo: Image.Image, count: int) -> list[Image.Image]:
    """``count`` distinct photos of the person in ``photo`` (mirror x rotation)."""
    base = photo.resize((photo.width * 2, photo.height * 2), Image.Resampling.LANCZOS)
    out = []
    for flip in (False, True):
        view = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else base
        for angle in ANGLES:
            out.append(view.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(90, 90, 90)))
    assert count <= len(out)
    return out[:count]


def side_by_side(left: Image.Image, right: Image.Image, height: int = 512) -> Image.Image:
    a = left.resize((round(left.width * height / left.height), height))
    b = right.resize((round(right.width * height / right.height), height))
    canvas = Image.new("RGB", (a.width + b.width, height))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    return canvas


@pytest.fixture(scope="session")
def intake_models(tiny_preset):
    """The bundled detectors, identity embedder and segmenter with the tiny CLIP, loaded once."""
    from pipelines.intake import IntakeConfig, load_intake_models

    return load_intake_models(IntakeConfig(clip_model=tiny_preset.clip))


@pytest.fixture(scope="session")
def face_detector(intake_models):
    return intake_models.face_detector


@pytest.fixture(scope="session")
def astronaut_jpegs(astronaut) -> list[bytes]:
    return [encode(v, quality=92) for v in person_variants(astronaut, 6)]
