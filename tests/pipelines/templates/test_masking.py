"""Judging and placing a template, compositing geometry, colour transfer (real detectors, no diffusion)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.templates.masking import (
    Region,
    TemplateRejected,
    lab_color_transfer,
    paste,
    prepare_template,
)
from tests.conftest import noise_image
from tests.pipelines.intake.conftest import side_by_side

RESOLUTION = 128  # the tiny preset's


def test_a_template_with_no_person_or_two_people_is_refused_with_a_clear_code(masking, astronaut, grace_hopper):
    with pytest.raises(TemplateRejected) as nobody:
        prepare_template(noise_image(400), masking)
    assert nobody.value.error_code == "template_no_person" and nobody.value.reason == "no_person"
    with pytest.raises(TemplateRejected) as two:
        prepare_template(side_by_side(astronaut, grace_hopper), masking)
    assert two.value.error_code == "template_multiple_people" and two.value.details["persons"] == 2
    assert "2 people are in the template" in two.value.message and two.value.user_error
    with pytest.raises(TemplateRejected) as small:
        prepare_template(astronaut, masking, min_face_px=400)
    assert small.value.error_code == "template_face_too_small" and "400 px" in small.value.message


def test_the_mask_covers_face_and_hair_is_feathered_and_stays_in_its_crop(prepared, id_photo):
    mask = prepared.region.mask
    assert mask.shape == (id_photo.height, id_photo.width) and mask.dtype == np.float32
    face = prepared.face
    w, h = face.width, face.height
    inner = mask[round(face.y0 + h / 6) : round(face.y1 - h / 6), round(face.x0 + w / 6) : round(face.x1 - w / 6)]
    assert inner.min() > 0.9  # eyes, nose, mouth and cheeks are redrawn
    assert ((mask > 0) & (mask < 1)).sum() > 0.05 * (mask > 0).sum()  # a feathered edge, not a hard cut
    above = mask[: max(round(face.y0) - 5, 0), round(face.x0) : round(face.x1)]
    assert above.max() > 0.5  # hair above the face box belongs to the mask
    assert mask[-20:].max() == 0.0 and mask[:, :10].max() == 0.0  # the suit and the background stay
    crop = prepared.region.crop.box
    ys, xs = np.nonzero(mask)
    assert xs.min() >= crop.x0 and xs.max() < crop.x1 and ys.min() >= max(crop.y0, 0) and ys.max() < crop.y1
    # the second pass (face alone) is inside the first
    assert np.all(prepared.face_region.mask[mask == 0] == 0)


def test_paste_keeps_every_pixel_outside_the_mask_bit_for_bit(prepared, id_photo):
    generated = noise_image(RESOLUTION, seed=4)
    result = paste(id_photo, generated, prepared.region)
    before, after = np.asarray(id_photo), np.asarray(result)
    outside = prepared.region.mask == 0
    assert np.array_equal(after[outside], before[outside])
    inside = prepared.region.mask > 0.5
    assert np.abs(after[inside].astype(int) - before[inside].astype(int)).mean() > 20


def test_the_face_lands_where_the_templates_face_was(prepared, id_photo, masking):
    """Compositing geometry with the real face detector: a crop that went to the model's resolution and
    back is pasted where it came from, so the face found in the composite overlaps the template's face
    (IoU >= 0.5). The tiny preset's inpainted faces are noise, so the test pastes the template's own crop
    (what an inpainter that kept the face would return) instead of detecting a face in noise."""
    from pipelines.vision.faces import detect_faces

    region = prepared.region
    crop = region.crop_image(id_photo, RESOLUTION)
    mirrored = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # a face, but not the template's pixels
    composite = paste(id_photo, mirrored, region)
    assert not np.array_equal(np.asarray(composite), np.asarray(id_photo))
    faces = detect_faces(composite, masking.face_detector)
    assert len(faces) == 1
    assert faces[0].iou(prepared.face) >= 0.5
    # the face box in crop coordinates and back is the same box
    back = region.crop.to_template(region.crop.to_crop(prepared.face, RESOLUTION), RESOLUTION)
    assert back.iou(prepared.face) > 0.99


def test_lab_colour_transfer_moves_the_new_face_to_the_templates_colours(prepared, id_photo):
    region: Region = prepared.region
    reference = region.crop_image(id_photo, RESOLUTION)
    cast = Image.fromarray(np.clip(np.asarray(reference, np.int16) + [40, -25, 10], 0, 255).astype(np.uint8))
    soft = region.crop_mask(RESOLUTION)
    matched = lab_color_transfer(cast, reference, soft)
    inside = soft > 0.5

    def mean_error(image: Image.Image) -> float:
        return float(np.abs(np.asarray(image, float)[inside].mean(0) - np.asarray(reference, float)[inside].mean(0))
                     .max())

    assert mean_error(cast) > 20 and mean_error(matched) < 3
