"""The whole intake on a realistic upload: good photos in every phone format, and every kind of bad one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

from pipelines.errors import Canceled, DatasetRejected, InvalidConfig
from pipelines.intake import Dataset, IntakeConfig, PhotoInput, ReasonCode, prepare_dataset
from pipelines.intake.class_token import choose_class
from pipelines.types import TokenSpec
from pipelines.vision.faces import detect_faces
from pipelines.vision.identity import load_face_embedder
from tests.conftest import encode
from tests.pipelines.intake.conftest import person_variants, side_by_side
from tests.pipelines.intake.test_decode import _png_with_header


def _sideways_with_exif(photo: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif.tobytes())


def _sixteen_bit_grey(photo: Image.Image) -> bytes:
    grey = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def _with_alpha(photo: Image.Image) -> bytes:
    rgba = photo.convert("RGBA")
    rgba.putalpha(255)
    return encode(rgba, "PNG")


EXPECTED = {
    "jpeg": ReasonCode.ACCEPTED,
    "exif-rotated": ReasonCode.ACCEPTED,
    "cmyk": ReasonCode.ACCEPTED,
    "alpha-png": ReasonCode.ACCEPTED,
    "16bit-png": ReasonCode.ACCEPTED,
    "heic": ReasonCode.ACCEPTED,
    "recompressed-copy": ReasonCode.DUPLICATE,
    "blurred": ReasonCode.BLURRY,
    "someone-else": ReasonCode.IDENTITY_OUTLIER,
    "two-people": ReasonCode.MULTIPLE_PEOPLE,
    "cat": ReasonCode.NO_PERSON,
    "coffee": ReasonCode.NO_PERSON,
    "truncated": ReasonCode.CORRUPT_IMAGE,
    "zero-bytes": ReasonCode.EMPTY_FILE,
    "notes.jpg": ReasonCode.NOT_AN_IMAGE,
    "thumbnail": ReasonCode.TOO_SMALL,
    "bomb": ReasonCode.DECOMPRESSION_BOMB,
}


@pytest.fixture(scope="module")
def upload(astronaut, grace_hopper) -> list[PhotoInput]:
    v = person_variants(astronaut, 7)
    files = {
        "jpeg": encode(v[0], quality=92),
        "exif-rotated": _sideways_with_exif(v[1]),
        "cmyk": encode(v[2].convert("CMYK"), "JPEG", quality=92),
        "alpha-png": _with_alpha(v[3]),
        "16bit-png": _sixteen_bit_grey(v[4]),
        "heic": encode(v[5], "HEIF", quality=90),
        "recompressed-copy": encode(Image.eval(v[0], lambda x: min(255, int(x * 1.1))), quality=70),
        "blurred": encode(v[6].filter(ImageFilter.GaussianBlur(3.5)), quality=92),
        "someone-else": encode(grace_hopper.resize((1024, 1200)), quality=92),
        "two-people": encode(side_by_side(astronaut, grace_hopper)),
        "cat": encode(Image.fromarray(data.chelsea())),
        "coffee": encode(Image.fromarray(data.coffee())),
        "truncated": encode(v[0])[:20000],
        "zero-bytes": b"",
        "notes.jpg": b"shopping list: milk, eggs, film\n" * 30,
        "thumbnail": encode(astronaut.resize((240, 240))),
        "bomb": _png_with_header(30000, 30000),
    }
    assert list(files) == list(EXPECTED)
    return [PhotoInput(name, blob) for name, blob in files.items()]


@pytest.fixture(scope="module")
def run(upload, tiny_preset, intake_models):
    events = []
    dataset = prepare_dataset(
        upload, IntakeConfig(clip_model=tiny_preset.clip), intake_models, on_progress=events.append
    )
    return dataset, events


@pytest.fixture(scope="module")
def without_identity(intake_models):
    """The models of a config with ``identity_backend="none"``."""
    return dataclasses.replace(intake_models, face_embedder=load_face_embedder("none"))


class Untouchable:
    """Models that must not be touched: any attribute access fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"models.{name} touched before the inputs were checked")


@pytest.mark.slow
def test_every_photo_gets_its_verdict(run):
    dataset, _ = run
    assert {r.photo_id: r.reason_code for r in dataset.report} == EXPECTED
    assert [r.photo_id for r in dataset.report] == list(EXPECTED)  # input order
    for report in dataset.report:
        assert report.accepted == (report.reason_code is ReasonCode.ACCEPTED)
        assert report.message
    duplicate = next(r for r in dataset.report if r.reason_code is ReasonCode.DUPLICATE)
    assert "'jpeg'" in duplicate.message
    outlier = next(r for r in dataset.report if r.reason_code is ReasonCode.IDENTITY_OUTLIER)
    if dataset.checks["identity"].startswith("ok"):
        assert outlier.identity_distance > max(r.identity_distance for r in dataset.report if r.accepted)
    json.dumps([r.to_dict() for r in dataset.report])  # what the API returns


@pytest.mark.slow
def test_accepted_crops_are_upright_centred_faces_with_masks(run, face_detector):
    dataset, _ = run
    assert [item.photo_id for item in dataset.items] == [k for k, v in EXPECTED.items() if v is ReasonCode.ACCEPTED]
    for item in dataset.items:
        assert item.crop.mode == "RGB" and item.crop.size == (512, 512)
        assert item.mask.mode == "L" and item.mask.size == (512, 512)
        faces = detect_faces(item.crop, face_detector)  # BlazeFace finds no sideways faces: this checks uprightness too
        assert len(faces) == 1, item.photo_id
        cx, cy = faces[0].center
        assert abs(cx - 256) < 40 and abs(cy - 256) < 40, item.photo_id
        mask = np.asarray(item.mask)
        assert mask[int(cy), int(cx)] > 200 and mask.mean() < 240  # person, not the whole frame


@pytest.mark.slow
def test_class_token_captions_and_training_examples(run):
    dataset, _ = run
    assert set(dataset.class_scores) == {"girl", "man", "boy", "baby"}
    assert dataset.class_token == choose_class(dataset.class_scores)
    examples = dataset.training_examples()
    assert [e.prompt for e in examples] == [f"<bg{i}> <subj> {dataset.class_token}" for i in range(len(examples))]
    assert all(e.mask is not None and e.image.size == (512, 512) for e in examples)
    # each example knows where its crop came from (SDXL's size conditioning): the square around the face
    faces = {r.photo_id: r.face_box for r in dataset.report}
    for example in examples:
        crop, face = example.crop, faces[example.photo_id]
        assert crop.left <= face.x0 < face.x1 <= crop.left + crop.side
        assert crop.top <= face.y0 < face.y1 <= crop.top + crop.side
        assert max(crop.photo_width, crop.photo_height) >= crop.side
    spec = dataset.token_spec()
    assert spec == TokenSpec("<subj>", dataset.class_token, tuple(f"<bg{i}>" for i in range(len(examples))))


@pytest.mark.slow
def test_progress_counts_one_unit_per_photo(run, upload):
    _, events = run
    assert {e.stage for e in events} == {"intake"}
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert events[-1].metrics["total"] == len(upload)


@pytest.mark.slow
def test_save_and_load_round_trip(run, tmp_path):
    dataset, _ = run
    loaded = Dataset.load(dataset.save(tmp_path / "ds"))
    assert [r.to_dict() for r in loaded.report] == [r.to_dict() for r in dataset.report]
    assert (loaded.class_token, loaded.class_scores, loaded.checks) == \
        (dataset.class_token, dataset.class_scores, dataset.checks)
    assert [e.prompt for e in loaded.training_examples()] == [e.prompt for e in dataset.training_examples()]
    for a, b in zip(loaded.items, dataset.items):
        assert a.geometry == b.geometry is not None
        assert np.array_equal(np.asarray(a.crop), np.asarray(b.crop))
        assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask))


@pytest.mark.slow
def test_same_input_same_output_and_override_keeps_scores(run, upload, tiny_preset, intake_models):
    dataset, _ = run
    accepted = [p for p in upload if EXPECTED[p.photo_id] is ReasonCode.ACCEPTED]
    override = "man" if dataset.class_token != "man" else "girl"
    again = prepare_dataset(accepted, IntakeConfig(clip_model=tiny_preset.clip, class_token=override), intake_models)
    assert again.class_token == override
    assert again.class_scores == pytest.approx(dataset.class_scores)
    for a, b in zip(again.items, dataset.items):
        assert np.array_equal(np.asarray(a.crop), np.asarray(b.crop))


def test_too_few_photos_rejects_the_set_with_the_full_report(astronaut, tiny_preset, without_identity):
    photos = [
        PhotoInput("ok", encode(person_variants(astronaut, 1)[0])),
        PhotoInput("cat", encode(Image.fromarray(data.chelsea()))),
        PhotoInput("empty", b""),
    ]
    config = IntakeConfig(clip_model=tiny_preset.clip, min_photos=2, identity_backend="none")
    with pytest.raises(DatasetRejected) as info:
        prepare_dataset(photos, config, without_identity)
    details = info.value.details
    assert info.value.user_error and "1 of 3" in info.value.message
    assert [(r["photo_id"], r["reason_code"]) for r in details["report"]] == [
        ("ok", "accepted"),
        ("cat", "no_person"),
        ("empty", "empty_file"),
    ]
    assert details["reasons"] == {"no_person": 1, "empty_file": 1}


def test_identity_check_reports_not_available_instead_of_guessing(
    astronaut, grace_hopper, tiny_preset, without_identity
):
    photos = [PhotoInput(f"a{i}", encode(v)) for i, v in enumerate(person_variants(astronaut, 2))]
    photos.append(PhotoInput("g", encode(grace_hopper.resize((1024, 1200)))))
    config = IntakeConfig(clip_model=tiny_preset.clip, min_photos=3, identity_backend="none")
    dataset = prepare_dataset(photos, config, without_identity)
    assert dataset.checks["identity"].startswith("not available")
    assert all(r.accepted and r.identity_distance is None for r in dataset.report)


def test_cancel_stops_between_photos(astronaut, tiny_preset, intake_models):
    photos = [PhotoInput(f"a{i}", encode(v)) for i, v in enumerate(person_variants(astronaut, 3))]
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Canceled):
        prepare_dataset(
            photos, IntakeConfig(clip_model=tiny_preset.clip, min_photos=1), intake_models, should_stop=should_stop
        )
    assert len(calls) == 3  # checked before each photo, stopped before the third


@pytest.mark.parametrize(
    "photos, changes",
    [
        ([], {}),
        ([PhotoInput("x", b"1"), PhotoInput("x", b"2")], {}),
        ([PhotoInput("x", b"1")], {"context_mode": "poem"}),
        ([PhotoInput("x", b"1")], {"class_candidates": ()}),
        ([PhotoInput("x", b"1")], {"upscale_small_faces": True}),
        ([PhotoInput("x", b"1")], {"min_photos": 0}),
    ],
)
def test_invalid_requests_fail_before_any_model_loads(photos, changes):
    with pytest.raises(InvalidConfig):
        prepare_dataset(photos, IntakeConfig(clip_model="/nonexistent/clip", **changes), Untouchable())


@pytest.mark.parametrize(
    "changes", [{"context_mode": "poem"}, {"upscale_small_faces": True}, {"person_backend": "nope"}]
)
def test_invalid_configs_fail_before_any_model_spec_is_made(changes):
    from pipelines.intake import intake_models

    with pytest.raises(InvalidConfig):
        intake_models(IntakeConfig(clip_model="/nonexistent/clip", **changes))


def test_models_a_config_asks_for_must_be_given(intake_models, tiny_preset):
    config = IntakeConfig(clip_model=tiny_preset.clip, upscale_small_faces=True, upscaler_model=tiny_preset.upscaler_x2)
    with pytest.raises(InvalidConfig) as err:
        prepare_dataset([PhotoInput("x", b"1")], config, intake_models)  # loaded without an upscaler
    assert err.value.error_code == "intake_models_incomplete"


def test_the_bundle_names_only_what_the_config_needs(tiny_preset):
    from pipelines.intake import intake_models

    plain = {s.key.what for s in intake_models(IntakeConfig(clip_model=tiny_preset.clip)).specs()}
    assert plain == {"person_detector", "face_detector", "face_embedder", "clip", "segmenter"}
    config = IntakeConfig(clip_model=tiny_preset.clip, context_mode="blip", upscale_small_faces=True,
                          upscaler_model=tiny_preset.upscaler_x2)
    assert {s.key.what for s in intake_models(config).specs()} == plain | {"captioner", "upscaler"}


def test_config_round_trips_through_json():
    config = IntakeConfig(clip_model="clip", class_token="girl", class_candidates=("girl", "man"))
    assert IntakeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
