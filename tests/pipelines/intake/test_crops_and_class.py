"""Face squares, border replication, blur and hashes; the CLIP class-word rule."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipelines.intake.class_token import choose_class, class_scores, clip_class_scores
from pipelines.intake.config import IntakeConfig
from pipelines.intake.crops import blur_score, crop_square, hamming, perceptual_hash, square_around
from pipelines.intake.dataset import PhotoInput
from pipelines.intake.pipeline import examine_photo
from pipelines.upscale import load_upscaler
from pipelines.vision.faces import detect_faces
from tests.conftest import encode


def _config(**changes) -> IntakeConfig:
    return IntakeConfig(clip_model="unused-here", **changes)


def test_crop_square_replicates_edge_pixels():
    image = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    square = np.asarray(crop_square(image, -5, -4, 16))
    original = np.asarray(image)
    assert square.shape == (16, 16, 3)
    assert (square[:4, 5:] == original[0, :11]).all()  # rows above the image repeat its first row
    assert (square[4:, :5] == original[:12, :1]).all()  # columns left of it repeat its first column
    assert (square[4:, 5:] == original[:12, :11]).all()


def test_face_is_centred_and_upright_in_the_crop(astronaut, intake_models, face_detector):
    candidate = examine_photo(0, PhotoInput("a", encode(astronaut.resize((1024, 1024)))), _config(), intake_models)
    assert candidate.crop.size == (512, 512) and candidate.crop.mode == "RGB"
    faces = detect_faces(candidate.crop, face_detector)
    assert len(faces) == 1
    cx, cy = faces[0].center
    assert abs(cx - 256) < 512 * 0.06 and abs(cy - 256) < 512 * 0.06
    # face_margin 0.75 -> the face box is 1 / 2.5 of the crop
    assert faces[0].width == pytest.approx(512 / 2.5, rel=0.2)


def test_face_at_the_image_edge_gets_replicated_border(astronaut, intake_models, face_detector):
    # Cut the photo just above the eyebrows: the head square must leave the image at the top.
    face = detect_faces(astronaut, face_detector)[0]
    photo = astronaut.crop((0, int(face.y0) + 10, 512, 512)).resize((1024, 2 * (512 - int(face.y0) - 10)))
    candidate = examine_photo(0, PhotoInput("edge", encode(photo, "PNG")), _config(), intake_models)
    crop = np.asarray(candidate.crop, dtype=np.int16)
    _, top, side = square_around(candidate.face_box, _config().face_margin)
    first_photo_row = round(-top * 512 / side)  # where the photo's row 0 lands in the crop
    assert first_photo_row > 40
    # Above it every crop row repeats the photo's first row (resampled alike).
    top = crop[: first_photo_row - 4]
    assert np.abs(top - top[0]).max() <= 2
    assert np.abs(crop[first_photo_row + 30] - crop[0]).max() > 30  # below it, the photo itself


def test_small_face_is_refused_with_its_box(astronaut, intake_models):
    from pipelines.intake.decode import PhotoRejected
    from pipelines.intake.reasons import ReasonCode

    with pytest.raises(PhotoRejected) as info:
        examine_photo(0, PhotoInput("far", encode(astronaut)), _config(min_face_px=150), intake_models)
    assert info.value.reason is ReasonCode.FACE_TOO_SMALL
    assert info.value.details["face_box"]["x1"] > info.value.details["face_box"]["x0"]


def test_blur_score_orders_sharpness(astronaut):
    sharp = blur_score(astronaut)
    blurred, very_blurred = (astronaut.filter(ImageFilter.GaussianBlur(r)) for r in (2, 5))
    assert sharp > blur_score(blurred) > blur_score(very_blurred)
    assert blur_score(astronaut.filter(ImageFilter.GaussianBlur(5))) < _config().blur_threshold < sharp


def test_perceptual_hash_matches_recompressed_copies_only(astronaut, grace_hopper):
    recompressed = Image.open(io.BytesIO(encode(astronaut, quality=60)))
    brighter = Image.eval(astronaut, lambda v: min(255, int(v * 1.15)))
    h = perceptual_hash(astronaut)
    assert hamming(h, perceptual_hash(recompressed)) <= 2
    assert hamming(h, perceptual_hash(brighter)) <= 4
    assert hamming(h, perceptual_hash(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))) > 12
    assert hamming(h, perceptual_hash(grace_hopper)) > 12


def test_class_is_argmin_of_mean_cosine_distance():
    words = ["girl", "man", "boy", "baby"]
    texts = np.eye(4, 8)
    # Two images near "man", one exactly on "girl": the mean still favours "man".
    images = np.array([[0.1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 0.2, 0, 0, 0, 0, 0], [1, 0.5, 0, 0, 0, 0, 0, 0]])
    scores = class_scores(images, texts, words)
    assert choose_class(scores) == "man"
    expected = 1 - (images / np.linalg.norm(images, axis=1, keepdims=True)) @ texts.T
    assert scores == pytest.approx(dict(zip(words, expected.mean(axis=0))))


def test_class_ties_go_to_the_earlier_candidate():
    words = ["girl", "man", "boy", "baby"]
    images = np.array([[1.0, 1.0, 0.0, 0.0]])
    scores = class_scores(images, np.eye(4), words)
    assert scores["girl"] == pytest.approx(scores["man"])
    assert choose_class(scores) == "girl"
    assert choose_class(dict(reversed(list(scores.items())))) == "man"


def test_tiny_clip_scores_every_candidate(intake_models, astronaut, grace_hopper):
    words = ("girl", "man", "boy", "baby")
    scores = clip_class_scores([astronaut, grace_hopper], words, intake_models.clip)
    assert list(scores) == list(words)
    assert all(0.0 <= s <= 2.0 for s in scores.values())
    assert len({round(s, 6) for s in scores.values()}) > 1  # words embed differently
    assert scores == clip_class_scores([astronaut, grace_hopper], words, intake_models.clip)  # deterministic


def test_blip_captions_put_the_subject_in_place_of_the_person_word():
    from pipelines.intake.captions import subject_caption
    from pipelines.intake.dataset import DatasetItem

    assert subject_caption("a man sitting on a bench") == "a {subject} sitting on a bench"
    assert subject_caption("a young woman with a red hat") == "a {subject} with a red hat"
    assert subject_caption("a red brick wall") == "{subject}, a red brick wall"
    item = DatasetItem("p", Image.new("RGB", (8, 8)), Image.new("L", (8, 8)), subject_caption("a man on a bench"))
    assert item.prompt("<subj>", "man") == "a <subj> man on a bench"
    assert DatasetItem("p", item.crop, item.mask, "<bg0>").prompt("<subj>", "girl") == "<bg0> <subj> girl"


def test_small_faces_can_go_through_real_esrgan_first(astronaut, tiny_preset, intake_models):
    photo = PhotoInput("small", encode(astronaut))  # face square ~260 px < 512
    plain = examine_photo(0, photo, _config(), intake_models)
    with_upscaler = dataclasses.replace(intake_models, upscaler=load_upscaler(tiny_preset.upscaler_x2))
    upscaled = examine_photo(
        0, photo, _config(upscale_small_faces=True, upscaler_model=tiny_preset.upscaler_x2), with_upscaler
    )
    assert upscaled.crop.size == plain.crop.size == (512, 512)
    assert not np.array_equal(np.asarray(upscaled.crop), np.asarray(plain.crop))
    assert upscaled.face_box == plain.face_box
