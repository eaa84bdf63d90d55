"""Intake verdicts a user would dispute: the REST path and ``prepare_dataset`` judge each photo the same.

A varied set made from public-domain photos (NASA's astronaut portrait and Grace Hopper via
skimage/matplotlib, skimage's coffee) goes through both paths:

* REST: uploaded through the API (stored as sent minus metadata), then the intake phase of a
  training job (``worker.phases.run_intake``, with the worker's model manager) writes each
  photo's verdict, read back with ``GET /v1/subjects/{id}/photos``;
* direct: ``prepare_dataset`` on the original files, with the same config and models.

Both must give every photo its expected verdict, with the same message.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageFilter
from skimage import data

from pipelines.errors import DatasetRejected
from pipelines.intake.reasons import ReasonCode
from tests.app.helpers import create_subject, upload
from tests.conftest import MODEL_CACHE, encode
from tests.pipelines.intake.conftest import person_variants, side_by_side

ACCEPTED, MULTIPLE, SMALL, OUTLIER, DUPLICATE, BLURRY, NO_PERSON = (
    ReasonCode.ACCEPTED, ReasonCode.MULTIPLE_PEOPLE, ReasonCode.FACE_TOO_SMALL, ReasonCode.IDENTITY_OUTLIER,
    ReasonCode.DUPLICATE, ReasonCode.BLURRY, ReasonCode.NO_PERSON)

EXPECTED = {
    "astronaut-gps-sideways.jpg": ACCEPTED,  # EXIF orientation 6 and a GPS position: stripped at upload
    "astronaut-q70.jpg": ACCEPTED,
    "astronaut-blurred.jpg": BLURRY,  # a bigger face than its sharp twin (next), which must not be dropped for it
    "astronaut-sharp-twin.jpg": ACCEPTED,
    "astronaut-grey-q85.jpg": ACCEPTED,  # grayscale: the person detector misses it, the face does not
    "astronaut-grey-q95.png": ACCEPTED,
    "hopper-grey.jpg": OUTLIER,  # a clear grayscale portrait of someone else: not "no person"
    "hopper-grey-copy.jpg": DUPLICATE,  # of a photo that is itself rejected: the message must say so
    "pair-384-q70.jpg": MULTIPLE,  # astronaut and grayscale Hopper side by side
    "pair-768-q85.jpg": MULTIPLE,  # Hopper and astronaut
    "pair-1536-q95.jpg": MULTIPLE,  # the astronaut twice (mirrored)
    "small-face-60px.jpg": SMALL,  # 4000 x 3000 with a ~60 px face
    "small-face-80px.jpg": SMALL,
    "coffee.jpg": NO_PERSON,  # a "face" in the cup fools the face detector at 0.5-0.7: still nobody
}


def _sideways_with_gps(photo: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "PhoneMaker"
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 23.76)
    return encode(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes())


def _closer(photo: Image.Image, zoom: float = 1.15) -> Image.Image:
    """The same photo taken a step closer: the face is bigger."""
    side = round(photo.width * zoom)
    big = photo.resize((side, side), Image.Resampling.LANCZOS)
    offset = (side - photo.width) // 2
    return big.crop((offset, offset, offset + photo.width, offset + photo.height))


def _small_face(astronaut: Image.Image, face_px: int) -> bytes:
    canvas = Image.fromarray(data.coffee()).resize((4000, 3000), Image.Resampling.BILINEAR)
    side = round(512 * face_px / 104)  # the astronaut's face is ~104 px of her 512 px portrait
    canvas.paste(astronaut.resize((side, side), Image.Resampling.LANCZOS), (2100, 1300))
    return encode(canvas, quality=88)


@pytest.fixture(scope="module")
def photos(astronaut, grace_hopper) -> dict[str, bytes]:
    a = person_variants(astronaut, 8)
    hopper = grace_hopper.resize((1024, 1200)).convert("L")
    mirrored = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    files = {
        "astronaut-gps-sideways.jpg": _sideways_with_gps(a[0]),
        "astronaut-q70.jpg": encode(a[1], quality=70),
        "astronaut-blurred.jpg": encode(_closer(a[2]).filter(ImageFilter.GaussianBlur(3.5)), quality=92),
        "astronaut-sharp-twin.jpg": encode(a[2], quality=90),
        "astronaut-grey-q85.jpg": encode(a[5].convert("L"), quality=85),
        "astronaut-grey-q95.png": encode(a[7].convert("L"), "PNG"),
        "hopper-grey.jpg": encode(hopper, quality=92),
        "hopper-grey-copy.jpg": encode(hopper.resize((820, 960)), quality=70),  # smaller: the other is kept
        "pair-384-q70.jpg": encode(side_by_side(astronaut, grace_hopper.convert("L").convert("RGB"), 384), quality=70),
        "pair-768-q85.jpg": encode(side_by_side(grace_hopper, astronaut, 768), quality=85),
        "pair-1536-q95.jpg": encode(side_by_side(astronaut, mirrored, 1536), quality=95),
        "small-face-60px.jpg": _small_face(astronaut, 60),
        "small-face-80px.jpg": _small_face(astronaut, 80),
        "coffee.jpg": encode(Image.fromarray(data.coffee()).resize((1200, 800)), quality=90),
    }
    assert list(files) == list(EXPECTED)
    return files


def _verdicts(report: list[dict], names: dict[str, str]) -> dict[str, tuple[str, str]]:
    """name -> (reason code, message with photo ids replaced by names)."""
    out = {}
    for row in report:
        message = row["message"]
        for photo_id, name in names.items():
            message = message.replace(photo_id, name)
        out[names[row["photo_id"]]] = (row["reason_code"], message)
    return out


@pytest.mark.slow
def test_rest_path_and_prepare_dataset_give_the_same_verdicts(client_a, settings, store, photos, tmp_path):
    from core.db.models import Job
    from pipelines.intake import PhotoInput, intake_models, prepare_dataset
    from tests.app.fixtures import session_scope
    from worker.jobs import JobSnapshot
    from worker.models import get_manager
    from worker.phases import PhaseContext, intake_config, run_intake
    from worker.service_edge import ServiceEdge

    # REST: upload, then the intake phase of a training job
    subject_id = create_subject(client_a)
    response = upload(client_a, subject_id, list(photos.items()))
    assert response.status_code == 201 and response.json()["rejected"] == 0, response.text
    names = {f["photo_id"]: f["filename"] for f in response.json()["files"]}
    job_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    with session_scope() as session:
        job = JobSnapshot.of(session.get(Job, job_id))
    worker_settings = settings.model_copy(update={"model_cache_dir": MODEL_CACHE, "device": "cpu"})
    ctx = PhaseContext(job, ServiceEdge(worker_settings, store), get_manager(), "cpu", MODEL_CACHE,
                       on_progress=lambda event: None, should_stop=lambda: False, workdir=tmp_path)
    try:
        run_intake(ctx)
    except DatasetRejected:
        pass
    listed = client_a.get(f"/v1/subjects/{subject_id}/photos").json()["data"]
    rest = _verdicts([{"photo_id": p["id"], "reason_code": p["reason_code"], "message": p["message"]}
                      for p in listed], names)

    # direct: the original files
    config = intake_config(ctx)
    with get_manager().borrow(intake_models(config)) as models:
        try:
            report = [r.to_dict() for r in prepare_dataset([PhotoInput(n, d) for n, d in photos.items()], config,
                                                          models).report]
        except DatasetRejected as exc:
            report = exc.details["report"]
    direct = _verdicts(report, {name: name for name in photos})

    expected = {name: code.value for name, code in EXPECTED.items()}
    assert {name: code for name, (code, _) in direct.items()} == expected
    assert {name: code for name, (code, _) in rest.items()} == expected
    assert rest == direct  # messages included
    assert direct["hopper-grey-copy.jpg"][1].startswith(
        "The photo is a near-duplicate of photo 'hopper-grey.jpg', which is not used either (identity_outlier")
    assert "px; at least 96 px" in direct["small-face-60px.jpg"][1]


def test_the_stored_files_judged_by_intake_are_the_uploads_minus_metadata(client_a, store, photos):
    """What intake reads through the REST path decodes to exactly the pixels of what was sent."""
    import numpy as np

    from pipelines.intake.decode import decode_photo

    subject_id = create_subject(client_a)
    chosen = {k: photos[k] for k in ("astronaut-gps-sideways.jpg", "astronaut-grey-q95.png", "pair-384-q70.jpg")}
    files = upload(client_a, subject_id, list(chosen.items())).json()["files"]
    listed = {p["id"]: p for p in client_a.get(f"/v1/subjects/{subject_id}/photos").json()["data"]}
    for f in files:
        extension = {"jpeg": "jpg", "png": "png"}[listed[f["photo_id"]]["format"]]
        blob = store.get(f"subjects/{subject_id}/photos/{f['photo_id']}/original.{extension}")
        sent = chosen[f["filename"]]
        assert np.array_equal(np.asarray(decode_photo(blob)), np.asarray(decode_photo(sent))), f["filename"]
        assert b"PhoneMaker" not in blob and not Image.open(io.BytesIO(blob)).getexif().get_ifd(0x8825)
