"""``prepare_dataset``: uploaded photos -> face crops, masks, captions, class token, report.

Steps (issue 3), in order:

1. decode (safe, upright, sRGB)            per photo
2. person check: exactly one person        per photo (person boxes and faces, two signals)
3. face detection, square crop, resize     per photo
4. set-level checks: near-duplicates, blur, identity outliers, minimum usable photos
5. class token with CLIP (or the client's override, scores still computed)
6. captions (background tokens or BLIP)
7. person masks

Detection runs on a reduced decode (JPEG DCT scaling to ~1024 px); the crop is taken
from a decode just fine enough that the face square needs no upsampling, so a 12 MP
photo is never fully decoded unless its face is small. Only the crop of each photo
is kept in memory.

Every photo gets a :class:`PhotoReport`; rejections never raise, except the set-level
:class:`DatasetRejected` when fewer than ``min_photos`` remain (its
``details["report"]`` holds every photo's report).

The detectors, CLIP and the segmenter come from the caller as an
:class:`~pipelines.intake.models.IntakeModels` bundle; nothing is loaded here.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.errors import DatasetRejected, InvalidConfig
from pipelines.intake import captions
from pipelines.intake.class_token import choose_class, clip_class_scores
from pipelines.intake.config import IntakeConfig
from pipelines.intake.crops import (
    blur_score,
    crop_square,
    hamming,
    perceptual_hash,
    resize_square,
    square_around,
)
from pipelines.intake.dataset import Dataset, DatasetItem, PhotoInput, PhotoReport
from pipelines.intake.decode import PhotoRejected, decode_photo
from pipelines.intake.models import IntakeModels, check_models
from pipelines.intake.reasons import ReasonCode
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, raise_if_canceled
from pipelines.types import CropGeometry
from pipelines.vision.faces import FaceBox, detect_faces
from pipelines.vision.people import People, count_people, detect_in_tiles, face_near
from pipelines.vision.persons import detect_persons
from pipelines.vision.segmentation import person_mask

#: the reduced decode that the detectors look at has at least this long side; JPEG's
#: 1/4 scale of a 4000-4032 px phone photo lands just above it, so the detectors (which
#: shrink anything over 1024 px) never resize again
DETECTION_SIDE = 960
#: photos examined at once (decode of one overlaps detection of another)
PHOTO_WORKERS = 2
#: when nobody shows in the reduced photo, tiles of this many full-resolution pixels are
#: examined, each seen at CLOSER_TILE_VIEW px: the face detector's 192 px input then shows
#: faces from ~48 px (a 12 MP photo: a half-scale decode, 35 tiles, ~0.3 s)
CLOSER_TILE = 768
CLOSER_TILE_VIEW = 384


@dataclass
class _Candidate:
    """A photo that passed the per-photo checks, waiting for the set-level ones."""

    index: int
    photo_id: str
    crop: Image.Image
    face_box: FaceBox  # full-resolution upright photo pixels
    face_in_crop: FaceBox  # the same face in crop pixels
    blur: float
    phash: int
    identity_distance: float | None = None
    geometry: CropGeometry | None = None  # the square cut from the photo (SDXL's size conditioning)

    def report(self, reason: ReasonCode = ReasonCode.ACCEPTED, message: str | None = None) -> PhotoReport:
        return PhotoReport(
            photo_id=self.photo_id,
            accepted=reason is ReasonCode.ACCEPTED,
            reason_code=reason,
            message=message or reason.default_message,
            face_box=self.face_box,
            blur=self.blur,
            identity_distance=self.identity_distance,
        )


def check_inputs(photos: Sequence[PhotoInput], config: IntakeConfig) -> None:
    config.check()
    if not photos:
        raise InvalidConfig("no photos given", code="no_photos")
    if len(photos) > config.max_photos:
        raise InvalidConfig(
            f"{len(photos)} photos given; at most {config.max_photos} are accepted",
            {"count": len(photos), "max_photos": config.max_photos},
            code="too_many_photos",
        )
    ids = [p.photo_id for p in photos]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InvalidConfig(f"photo ids must be unique: {duplicates}", {"duplicate_ids": duplicates})


def prepare_dataset(
    photos: Sequence[PhotoInput],
    config: IntakeConfig,
    models: IntakeModels,
    on_progress: ProgressFn | None = None,
    should_stop: CancelFn | None = None,
) -> Dataset:
    """``models``: :func:`~pipelines.intake.models.load_intake_models` or borrowed by
    :func:`~pipelines.intake.models.intake_models` from the worker's model manager."""
    # 0. inputs, before any model work
    check_inputs(photos, config)
    check_models(config, models)
    progress = StageProgress(on_progress, Stage.INTAKE, total=len(photos))
    progress.start(f"checking {len(photos)} photos")

    # 1-3. per photo: decode, person check, face crop
    reports: dict[str, PhotoReport] = {}
    candidates: list[_Candidate] = []
    for photo, outcome in _examine_all(photos, config, models, should_stop):
        if isinstance(outcome, PhotoRejected):
            box = outcome.details.get("face_box")
            reports[photo.photo_id] = PhotoReport(
                photo.photo_id, False, outcome.reason, outcome.message, FaceBox(**box) if box else None
            )
        else:
            candidates.append(outcome)
        progress.advance(message=f"checked photo {photo.photo_id}", accepted=float(len(candidates)))

    # 4. set-level checks
    raise_if_canceled(should_stop)
    checks: dict[str, str] = {}
    twins: dict[str, str] = {}  # duplicate -> the photo it duplicates
    candidates = _drop_blurry(candidates, config, reports)  # first: a sharp copy of a blurry photo is kept
    candidates = _drop_duplicates(candidates, config, reports, twins)
    raise_if_canceled(should_stop)
    candidates = _drop_identity_outliers(candidates, config, models.face_embedder, reports, checks)
    for candidate in candidates:
        reports[candidate.photo_id] = candidate.report()
    _explain_duplicates(reports, twins)
    report = [reports[p.photo_id] for p in photos]
    if len(candidates) < config.min_photos:
        raise DatasetRejected(_rejection_summary(report, config.min_photos),
                              _rejection_details(report, config.min_photos))

    # 5. class token
    raise_if_canceled(should_stop)
    crops = [c.crop for c in candidates]
    scores = clip_class_scores(crops, config.class_candidates, models.clip)
    class_token = config.class_token.strip() if config.class_token else choose_class(scores)

    # 6. captions
    raise_if_canceled(should_stop)
    if config.context_mode == "blip":
        contexts = captions.blip_contexts(crops, models.captioner)
    else:
        contexts = captions.background_tokens(len(candidates))

    # 7. person masks
    raise_if_canceled(should_stop)
    items = [
        DatasetItem(c.photo_id, c.crop, person_mask(c.crop, models.segmenter), ctx, c.geometry)
        for c, ctx in zip(candidates, contexts)
    ]
    return Dataset(
        items=items,
        instance_token=config.instance_token,
        class_token=class_token,
        class_scores=scores,
        report=report,
        context_mode=config.context_mode,
        checks=checks,
    )


def _examine_all(
    photos: Sequence[PhotoInput], config: IntakeConfig, models: IntakeModels, should_stop: CancelFn | None
):
    """Yield (photo, candidate or rejection) in input order, two photos in flight.

    Decoding and resizing release the GIL, so the next photo decodes while the
    detectors (one graph each, locked) look at the current one. Cancellation is
    checked before each photo starts.
    """
    with ThreadPoolExecutor(max_workers=PHOTO_WORKERS, thread_name_prefix="intake") as pool:
        pending: deque = deque()
        for index, photo in enumerate(photos):
            raise_if_canceled(should_stop)
            pending.append((photo, pool.submit(_examine_or_reject, index, photo, config, models)))
            if len(pending) >= PHOTO_WORKERS:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _examine_or_reject(
    index: int, photo: PhotoInput, config: IntakeConfig, models: IntakeModels
) -> _Candidate | PhotoRejected:
    try:
        return examine_photo(index, photo, config, models)
    except PhotoRejected as rejected:
        return rejected


def examine_photo(index: int, photo: PhotoInput, config: IntakeConfig, models: IntakeModels) -> _Candidate:
    """Steps 1-3 for one photo; raises :class:`PhotoRejected` with the reason."""
    # 1. decode, reduced for detection
    image = decode_photo(photo.data, config.limits, reduce_to=DETECTION_SIDE)
    full_width, full_height = image.info["original_size"]

    # 2. exactly one person: person boxes and faces, two signals (pipelines.vision.people)
    people = _find_people(image, config, models)
    if people.count == 0 and max(full_width, full_height) > 1.5 * CLOSER_TILE:
        # nobody at this scale: a small person in a large photo shows in tiles of a finer decode
        image = _closer(photo, config, full_width, full_height)
        people = _find_people(image, config, models, tile=round(CLOSER_TILE * image.width / full_width))
    _require_one_person(people)

    # 3. the person's face (not a picture in the picture), in full-resolution pixels
    face = people.main_face()
    if face is None:  # a person whose face is too small to show at this scale: look closer
        person = people.persons[0]
        if max(full_width, full_height) * CLOSER_TILE_VIEW / CLOSER_TILE > 1.2 * max(image.size):
            finer = _closer(photo, config, full_width, full_height)
            person = person.scaled(finer.width / image.width)
            image = finer
        face = face_near(image, person, models.face_detector, config.face_min_score)
    if face is None:
        raise PhotoRejected(ReasonCode.NO_FACE)
    scale = image.width / full_width
    face = face.scaled(1.0 / scale)
    if max(face.width, face.height) < config.min_face_px:
        raise PhotoRejected(
            ReasonCode.FACE_TOO_SMALL,
            f"The face is too small ({max(face.width, face.height):.0f} px; at least {config.min_face_px} px).",
            {"face_box": face.to_dict(), "min_face_px": config.min_face_px},
        )

    left, top, side = square_around(face, config.face_margin)
    needed_scale = min(1.0, config.crop_size / side)
    if scale < needed_scale:  # the reduced decode is too coarse for this face: decode finer
        finest = math.ceil(max(full_width, full_height) * needed_scale)
        image = decode_photo(photo.data, config.limits, reduce_to=finest)
        scale = image.width / full_width
    square = crop_square(image, round(left * scale), round(top * scale), max(1, round(side * scale)))
    del image
    if config.upscale_small_faces and square.width < config.crop_size:
        square = _upscale(square, models.upscaler)
    crop = resize_square(square, config.crop_size)

    to_crop = config.crop_size / side
    face_in_crop = FaceBox((face.x0 - left) * to_crop, (face.y0 - top) * to_crop,
                           (face.x1 - left) * to_crop, (face.y1 - top) * to_crop, face.score)
    geometry = CropGeometry(full_width, full_height, left, top, side)
    return _Candidate(index, photo.photo_id, crop, face, face_in_crop, blur_score(crop), perceptual_hash(crop),
                      geometry=geometry)


def _require_one_person(people: People) -> None:
    if people.count == 0:
        raise PhotoRejected(ReasonCode.NO_PERSON)
    if people.count > 1:
        raise PhotoRejected(
            ReasonCode.MULTIPLE_PEOPLE,
            f"{people.count} people are in the photo; use photos of the subject alone.",
            {"persons": people.count},
        )


def the_one_face(image: Image.Image, models, config: IntakeConfig | None = None) -> FaceBox:  # noqa: ANN001
    """Steps 2-3 of intake on one decoded image at one scale: exactly one person (the same two-signal
    count), and their face in ``image``'s pixels; raises :class:`PhotoRejected` with the reason.

    Template mode judges a template photo by this rule: ``models`` needs ``person_detector`` and
    ``face_detector``; ``config`` gives the thresholds (default: intake's own).
    """
    config = config or IntakeConfig(clip_model="")  # only its detection thresholds are read
    people = _find_people(image, config, models)
    _require_one_person(people)
    face = people.main_face() or face_near(image, people.persons[0], models.face_detector, config.face_min_score)
    if face is None:
        raise PhotoRejected(ReasonCode.NO_FACE)
    return face


def _closer(photo: PhotoInput, config: IntakeConfig, full_width: int, full_height: int) -> Image.Image:
    """A decode where CLOSER_TILE full-resolution pixels are CLOSER_TILE_VIEW pixels."""
    return decode_photo(photo.data, config.limits,
                        reduce_to=math.ceil(max(full_width, full_height) * CLOSER_TILE_VIEW / CLOSER_TILE))


def _find_people(image: Image.Image, config: IntakeConfig, models: IntakeModels, tile: int | None = None) -> People:
    """Person boxes and faces in ``image``, counted together.

    With ``tile``: faces only, in ``tile`` x ``tile`` windows (the person detector costs ~7x a
    face look per window and fires on enlarged textures); every face is checked up close.
    """
    if tile is None:
        persons = detect_persons(image, models.person_detector, min_score=config.person_min_score)
        faces = detect_faces(image, models.face_detector, min_score=config.face_min_score)
    else:
        persons = []
        faces = detect_in_tiles(image, lambda view: detect_faces(
            view, models.face_detector, min_score=config.face_min_score, first_look=True), tile)
    return count_people(image, persons, faces, models.face_detector, min_face_score=config.face_min_score,
                        min_face_ratio=config.second_face_min_ratio)


def _upscale(square: Image.Image, upscaler) -> Image.Image:
    from pipelines.upscale import upscale

    return upscale([square], upscaler, factor=2)[0]


def _drop_duplicates(
    candidates: list[_Candidate], config: IntakeConfig, reports: dict[str, PhotoReport], twins: dict[str, str]
) -> list[_Candidate]:
    """Of each group of near-duplicates keep the one with the most face pixels (the earliest on ties).

    Not the "sharpest": JPEG artefacts of a recompressed copy raise the blur score. ``twins``
    records which photo each duplicate duplicates (its message is written once every check ran).
    """
    kept: list[_Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (-round(c.face_box.width), c.index)):
        twin = next((k for k in kept if hamming(k.phash, candidate.phash) <= config.duplicate_hamming), None)
        if twin is None:
            kept.append(candidate)
        else:
            reports[candidate.photo_id] = candidate.report(ReasonCode.DUPLICATE)
            twins[candidate.photo_id] = twin.photo_id
    return sorted(kept, key=lambda c: c.index)


def _explain_duplicates(reports: dict[str, PhotoReport], twins: dict[str, str]) -> None:
    """Each duplicate's message says what became of the photo it duplicates."""
    for photo_id, twin_id in twins.items():
        twin = reports[twin_id]
        if twin.accepted:
            message = f"The photo is a near-duplicate of photo {twin_id!r}, which is kept instead."
        else:
            message = (f"The photo is a near-duplicate of photo {twin_id!r}, which is not used either "
                       f"({twin.reason_code.value}: {twin.message})")
        reports[photo_id] = dataclasses.replace(reports[photo_id], message=message)


def _drop_blurry(
    candidates: list[_Candidate], config: IntakeConfig, reports: dict[str, PhotoReport]
) -> list[_Candidate]:
    kept = []
    for candidate in candidates:
        if candidate.blur < config.blur_threshold:
            reports[candidate.photo_id] = candidate.report(ReasonCode.BLURRY)
        else:
            kept.append(candidate)
    return kept


def _drop_identity_outliers(
    candidates: list[_Candidate],
    config: IntakeConfig,
    embedder,
    reports: dict[str, PhotoReport],
    checks: dict[str, str],
) -> list[_Candidate]:
    """Flag faces far from the set's median face embedding ("looks like a different person")."""
    if embedder is None or not embedder.available:
        why = "no face embedder given" if embedder is None else getattr(embedder, "why", "") or embedder.name
        checks["identity"] = f"not available ({why})"
        return candidates
    embeddings = {c.photo_id: embedder.embed(c.crop, c.face_in_crop) for c in candidates}
    measured = [c for c in candidates if embeddings[c.photo_id] is not None]
    if len(measured) < 3:
        checks["identity"] = "skipped: fewer than 3 faces to compare"
        return candidates
    median = np.median(np.stack([embeddings[c.photo_id] for c in measured]), axis=0)
    threshold = config.identity_threshold if config.identity_threshold is not None else embedder.threshold
    kept = []
    for candidate in candidates:
        vector = embeddings[candidate.photo_id]
        if vector is not None:
            candidate.identity_distance = embedder.distance(vector, median)
        if candidate.identity_distance is not None and candidate.identity_distance >= threshold:
            reports[candidate.photo_id] = candidate.report(ReasonCode.IDENTITY_OUTLIER)
        else:
            kept.append(candidate)
    checks["identity"] = f"ok ({embedder.name}, threshold {threshold:g})"
    return kept


def _rejection_summary(report: list[PhotoReport], min_photos: int) -> str:
    accepted = sum(r.accepted for r in report)
    reasons = Counter(r.reason_code.value for r in report if not r.accepted)
    if not reasons:  # every photo is fine: there are just too few
        missing = min_photos - accepted
        return (f"Only {accepted} photo{'s' if accepted != 1 else ''} given; at least {min_photos} are needed: add "
                f"{missing} more of the same person.")
    why = ", ".join(f"{n} {code}" for code, n in sorted(reasons.items()))
    return f"Only {accepted} of {len(report)} photos are usable; at least {min_photos} are needed ({why})."


def _rejection_details(report: list[PhotoReport], min_photos: int) -> dict:
    return {
        "accepted": sum(r.accepted for r in report),
        "min_photos": min_photos,
        "reasons": dict(Counter(r.reason_code.value for r in report if not r.accepted)),
        "report": [r.to_dict() for r in report],
    }


__all__ = ["check_inputs", "examine_photo", "prepare_dataset"]
