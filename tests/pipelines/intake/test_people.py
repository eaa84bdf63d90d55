"""Counting people from two signals: person boxes and faces (pipelines.vision.people)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipelines.vision.faces import FaceBox, detect_faces
from pipelines.vision.people import count_people, detect_in_tiles, verify_face
from pipelines.vision.persons import PersonBox, detect_persons
from tests.pipelines.intake.conftest import side_by_side


class ZoomDetector:
    """A face detector that finds a face in every zoomed view whose middle is bright (a 'real' face)."""

    name = "fake"

    def detect(self, rgb: np.ndarray, min_score: float) -> list[FaceBox]:
        return self.detect_first_look(rgb, min_score)

    def detect_first_look(self, rgb: np.ndarray, min_score: float) -> list[FaceBox]:
        h, w = rgb.shape[:2]
        if rgb[h // 2, w // 2].mean() > 128:
            return [FaceBox(w * 0.3, h * 0.3, w * 0.7, h * 0.7, 0.9)]
        return []


def _canvas(*bright_boxes: tuple[int, int, int, int]) -> Image.Image:
    image = np.zeros((600, 1200, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in bright_boxes:
        image[y0:y1, x0:x1] = 255
    return Image.fromarray(image)


def test_a_face_next_to_its_person_box_is_the_same_person():
    image = _canvas((100, 100, 200, 200))
    people = count_people(image, [PersonBox(110, 160, 210, 260, 0.8)], [FaceBox(100, 100, 200, 200, 0.9)],
                          ZoomDetector())
    assert people.count == 1 and people.main_face() == FaceBox(100, 100, 200, 200, 0.9)


def test_a_face_the_person_detector_missed_is_a_second_person():
    image = _canvas((100, 100, 200, 200), (700, 100, 800, 200))
    faces = [FaceBox(100, 100, 200, 200, 0.9), FaceBox(700, 100, 800, 200, 0.9)]
    people = count_people(image, [PersonBox(110, 160, 210, 260, 0.8)], faces, ZoomDetector())
    assert people.count == 2 and people.extra == [faces[1]]


def test_a_face_alone_counts_as_a_person_only_when_it_is_seen_again_up_close():
    real = count_people(_canvas((500, 200, 600, 300)), [], [FaceBox(500, 200, 600, 300, 0.6)], ZoomDetector())
    texture = count_people(_canvas(), [], [FaceBox(500, 200, 600, 300, 0.6)], ZoomDetector())
    assert (real.count, texture.count) == (1, 0)


def test_a_much_smaller_face_is_a_picture_in_the_picture_not_a_second_person():
    image = _canvas((100, 100, 300, 300), (900, 100, 960, 160))
    faces = [FaceBox(100, 100, 300, 300, 0.9), FaceBox(900, 100, 960, 160, 0.9)]  # 0.3 of the main face
    people = count_people(image, [PersonBox(120, 220, 320, 420, 0.8)], faces, ZoomDetector())
    assert people.count == 1 and people.main_face() == faces[0]


def test_one_person_box_explains_one_face_only():
    """Two faces cheek to cheek, one person box: the nearer face is its, the other is another person."""
    image = _canvas((100, 100, 200, 200), (210, 100, 310, 200))
    faces = [FaceBox(100, 100, 200, 200, 0.9), FaceBox(210, 100, 310, 200, 0.9)]
    people = count_people(image, [PersonBox(100, 150, 200, 250, 0.8)], faces, ZoomDetector())
    assert people.count == 2 and people.person_faces == [faces[0]] and people.extra == [faces[1]]


def test_tiles_find_boxes_in_image_pixels_once():
    image = _canvas((1000, 400, 1050, 450))
    seen = []

    def detect(view: Image.Image) -> list:
        seen.append(view.size)
        array = np.asarray(view)
        ys, xs = np.nonzero(array[..., 0] > 128)
        return [FaceBox(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9)] if len(xs) else []

    boxes = detect_in_tiles(image, detect, tile=400)
    assert boxes == [FaceBox(1000, 400, 1050, 450, 0.9)]
    assert all(max(size) <= 400 for size in seen) and len(seen) == 4 * 2


@pytest.mark.parametrize("case", ["grey portrait", "two people, one grey", "face in a coffee cup"])
def test_real_detectors(intake_models, astronaut, grace_hopper, case):
    grey_hopper = grace_hopper.convert("L").convert("RGB")
    image, expected = {
        "grey portrait": (grey_hopper, 1),
        "two people, one grey": (side_by_side(astronaut, grey_hopper, 512), 2),
        "face in a coffee cup": (_coffee_with_small_astronaut(astronaut), 0),
    }[case]
    persons = detect_persons(image, intake_models.person_detector)
    faces = detect_faces(image, intake_models.face_detector)
    people = count_people(image, persons, faces, intake_models.face_detector)
    assert people.count == expected, (case, persons, faces)
    if case == "face in a coffee cup":  # the detector's 'face' there is not seen again up close
        assert faces and not any(verify_face(image, f, intake_models.face_detector) for f in faces)


def _coffee_with_small_astronaut(astronaut: Image.Image) -> Image.Image:
    canvas = Image.fromarray(data.coffee()).resize((1024, 768))
    canvas.paste(astronaut.resize((123, 123)), (300, 200))  # a ~25 px face: too small to see at this scale
    return canvas
