"""Where in a template the subject goes: the face, a soft face-and-hair mask, the crop around it.

``prepare_template`` judges a template by the intake rule (exactly one person, a face; the
same detectors, :func:`pipelines.intake.pipeline.the_one_face`) and places the work:

1. the face box (BlazeFace) and the person's probability (MediaPipe selfie segmentation,
   run on a window three faces wide around the face so hair keeps its detail);
2. the mask: an ellipse over the face, plus what the segmentation calls person inside an
   ellipse around face and hair (hair above, ears to the sides, the chin below), dilated
   and feathered (Gaussian); below 1/255 it is exactly 0, and there the template is kept;
3. the crop: a square around the mask with some context, taken with edge replication where
   it leaves the template, and worked on at the model's resolution;
4. the template's pose (BlazePose landmarks as OpenPose keypoints), drawn in crop coordinates.

``paste`` puts a generated crop back through the feathered mask and copies every pixel
where the mask is 0 from the template, so those pixels are bit-identical to it.
:func:`lab_color_transfer` matches a generated face's colours to the template's inside the mask.

Pure numpy/OpenCV/PIL plus the detectors the caller passes (:func:`masking_models`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pipelines.errors import PipelineError
from pipelines.generation.conditions import draw_openpose, pose_estimator_spec, pose_keypoints
from pipelines.intake.crops import crop_square, resize_square
from pipelines.intake.decode import PhotoRejected
from pipelines.intake.reasons import ReasonCode
from pipelines.models.specs import BundleSpec
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, raise_if_canceled
from pipelines.vision.boxes import Box
from pipelines.vision.faces import FaceBox, face_detector_spec
from pipelines.vision.persons import person_detector_spec
from pipelines.vision.segmentation import segmenter_spec

#: a template's face must be at least this many pixels across (the subject's face is drawn there)
MIN_FACE_PX = 64
#: the mask's hair-and-head region around the face box, as fractions of the face's height (above,
#: below) and width (each side)
HAIR_ABOVE, CHIN_BELOW, SIDES = 0.6, 0.15, 0.3
#: dilation and feathering (Gaussian sigma), as fractions of the face's longer side
DILATE, FEATHER = 0.04, 0.04
#: the crop square is this many times the mask's longer side (context for the inpainting)
CONTEXT = 1.2
#: the second pass redraws the face alone: its box grown by this fraction on every side
FACE_PASS_MARGIN = 0.25
MASK_EPSILON = 1.0 / 255.0


class TemplateRejected(PipelineError):
    """The template cannot take the subject: no person, several people, no face, a face too small.

    ``code`` is ``template_<reason>`` (``template_no_person``, ``template_multiple_people``,
    ``template_no_face``, ``template_face_too_small``); ``details["reason"]`` is the intake reason
    code, as a photo's verdict would say it.
    """

    code = "template_rejected"
    user_error = True

    @classmethod
    def because(cls, rejected: PhotoRejected) -> TemplateRejected:
        reason = rejected.reason.value
        details = {**rejected.details, "reason": reason}
        message = _MESSAGES.get(reason, rejected.message).format(**details)
        return cls(message, details, f"template_{reason}")

    @property
    def reason(self) -> str:
        return str(self.details.get("reason", ""))


_MESSAGES = {
    ReasonCode.NO_PERSON.value: "No person was found in the template; choose a photo of one person.",
    ReasonCode.MULTIPLE_PEOPLE.value: "{persons} people are in the template; choose a photo of one person alone.",
    ReasonCode.NO_FACE.value: "No face was found in the template; choose a photo where the face is visible.",
    ReasonCode.FACE_TOO_SMALL.value: "The face in the template is too small (at least {min_face_px} px across); "
                                     "choose a closer shot.",
}


@dataclass
class MaskingModels:
    """What placing a template needs: the intake detectors, the segmenter and the pose estimator."""

    person_detector: Any  # pipelines.vision.persons.PersonDetector
    face_detector: Any  # pipelines.vision.faces.FaceDetector
    segmenter: Any  # pipelines.vision.segmentation.SelfieSegmenter
    pose_estimator: Any  # pipelines.generation.conditions.PoseEstimator


def masking_models(device: str = "cpu", *, face_backend: str = "blazeface",
                   person_backend: str = "blazepose") -> BundleSpec[MaskingModels]:
    """The detectors of :func:`prepare_template` (keys shared with intake and ranking)."""
    return BundleSpec(
        {
            "person_detector": person_detector_spec(person_backend),
            "face_detector": face_detector_spec(face_backend, device),
            "segmenter": segmenter_spec(),
            "pose_estimator": pose_estimator_spec(),
        },
        lambda parts: MaskingModels(**parts),
    )


# ---------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Square:
    """A square of the template, in its pixels; it may reach outside the template."""

    left: int
    top: int
    side: int

    @property
    def box(self) -> Box:
        return Box(self.left, self.top, self.left + self.side, self.top + self.side)

    def to_crop(self, box: Box, resolution: int) -> Box:
        """``box`` (template pixels) in the pixels of this square resized to ``resolution``."""
        return box.scaled(resolution / self.side, -self.left * resolution / self.side,
                          -self.top * resolution / self.side)

    def to_template(self, box: Box, resolution: int) -> Box:
        """``box`` (pixels of the crop at ``resolution``) back in template pixels."""
        return box.scaled(self.side / resolution, self.left, self.top)

    @classmethod
    def around(cls, box: Box, context: float = CONTEXT) -> Square:
        side = max(8, math.ceil(max(box.width, box.height) * context))
        cx, cy = box.center
        return cls(math.floor(cx - side / 2), math.floor(cy - side / 2), side)


@dataclass
class Region:
    """One inpainting pass: the crop square and the soft mask (template-sized, float32 in [0, 1])."""

    crop: Square
    mask: np.ndarray

    @classmethod
    def around(cls, mask: np.ndarray, context: float = CONTEXT) -> Region:
        """The region that redraws ``mask``, its crop square ``context`` times the mask's longer side."""
        return cls(Square.around(_support(mask), context), mask)

    @property
    def mask_box(self) -> Box:
        """The bounding box of the pixels this pass may change (mask > 0)."""
        return _support(self.mask)

    def crop_image(self, image: Image.Image, resolution: int) -> Image.Image:
        return resize_square(crop_square(image, self.crop.left, self.crop.top, self.crop.side), resolution)

    def crop_mask(self, resolution: int) -> np.ndarray:
        """The soft mask inside the crop at ``resolution`` (0 where the crop leaves the template)."""
        left, top, side = self.crop.left, self.crop.top, self.crop.side
        height, width = self.mask.shape
        window = np.zeros((side, side), np.float32)
        x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
        window[y0 - top : y1 - top, x0 - left : x1 - left] = self.mask[y0:y1, x0:x1]
        return cv2.resize(window, (resolution, resolution), interpolation=cv2.INTER_AREA)

    def inpaint_mask(self, resolution: int) -> Image.Image:
        """What the inpainting pipeline redraws: wherever the feathered mask reaches (binary, L)."""
        return Image.fromarray(np.where(self.crop_mask(resolution) > 0.05, 255, 0).astype(np.uint8), "L")


@dataclass
class PreparedTemplate:
    """A template judged and placed: everything its candidates share."""

    image: Image.Image  # the template as used (RGB); pixels outside the mask come from here
    face: FaceBox  # template pixels
    region: Region  # first pass: face and hair
    face_region: Region  # optional second pass: the face alone
    keypoints: list[tuple[float, float] | None] = field(default_factory=list)  # OpenPose order, in [0, 1]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


# ---------------------------------------------------------------------------- prepare


def prepare_template(
    image: Image.Image,
    models: MaskingModels,
    *,
    min_face_px: int = MIN_FACE_PX,
    on_progress: ProgressFn | None = None,
    should_stop: CancelFn | None = None,
) -> PreparedTemplate:
    """Judge ``image`` as a template (raises :class:`TemplateRejected`) and place the subject's face in it."""
    from pipelines.intake.pipeline import the_one_face

    progress = StageProgress(on_progress, Stage.MASKING, total=4, min_interval_s=0.0)
    progress.start("finding the face")
    image = image.convert("RGB")
    # 1. exactly one person, and the face (the intake rule and detectors)
    try:
        face = the_one_face(image, models)
        if max(face.width, face.height) < min_face_px:
            raise PhotoRejected(ReasonCode.FACE_TOO_SMALL, details={"face_box": face.to_dict(),
                                                                     "min_face_px": min_face_px})
    except PhotoRejected as rejected:
        raise TemplateRejected.because(rejected) from None
    progress.advance(message="segmenting")
    raise_if_canceled(should_stop)
    # 2. the face-and-hair mask
    probability = person_probability(image, face, models.segmenter)
    mask = face_hair_mask(image.size, face, probability)
    progress.advance(message="pose")
    raise_if_canceled(should_stop)
    # 3. the template's pose
    keypoints = pose_keypoints(image, models.pose_estimator)
    progress.advance()
    region = Region.around(mask)
    face_mask = face_only_mask(image.size, face) * (mask > 0)
    prepared = PreparedTemplate(image, face, region, Region.around(face_mask), keypoints)
    progress.advance(message="placed")
    return prepared


def person_probability(image: Image.Image, face: Box, segmenter) -> np.ndarray:
    """The person's probability over the template (float32, 0 outside a window 3 faces wide around the face)."""
    width, height = image.size
    side = max(16, math.ceil(max(face.width, face.height) * 3.0))
    cx, cy = face.center
    left, top = round(cx - side / 2), round(cy - side / 2)
    window = crop_square(image, left, top, side)
    small = window if side <= 512 else window.resize((512, 512), Image.Resampling.BILINEAR)
    probability = segmenter.probability(np.ascontiguousarray(np.asarray(small)))
    probability = cv2.resize(probability.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    full = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    full[y0:y1, x0:x1] = probability[y0 - top : y1 - top, x0 - left : x1 - left]
    return full


def _ellipse(size: tuple[int, int], box: Box) -> np.ndarray:
    width, height = size
    yy, xx = np.ogrid[0:height, 0:width]
    cx, cy = box.center
    rx, ry = max(box.width / 2, 1.0), max(box.height / 2, 1.0)
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


def _feather(hard: np.ndarray, face: Box) -> np.ndarray:
    scale = max(face.width, face.height)
    radius = max(1, round(DILATE * scale))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    grown = cv2.dilate(hard.astype(np.uint8), kernel)
    soft = cv2.GaussianBlur(grown.astype(np.float32), (0, 0), max(1.0, FEATHER * scale))
    soft[soft < MASK_EPSILON] = 0.0
    return np.clip(soft, 0.0, 1.0)


def face_hair_mask(size: tuple[int, int], face: Box, probability: np.ndarray) -> np.ndarray:
    """The first pass's soft mask: the face's ellipse, plus the person inside the head-and-hair ellipse."""
    w, h = face.width, face.height
    head = Box(face.x0 - SIDES * w, face.y0 - HAIR_ABOVE * h, face.x1 + SIDES * w, face.y1 + CHIN_BELOW * h)
    core = _ellipse(size, Box(face.center[0] - 0.55 * w, face.center[1] - 0.62 * h,
                              face.center[0] + 0.55 * w, face.center[1] + 0.62 * h))
    hard = core | (_ellipse(size, head) & (probability >= 0.5))
    return _feather(hard, face)


def face_only_mask(size: tuple[int, int], face: Box) -> np.ndarray:
    """The second pass's soft mask: the face's ellipse grown by :data:`FACE_PASS_MARGIN`."""
    m = FACE_PASS_MARGIN
    grown = Box(face.x0 - m * face.width, face.y0 - m * face.height, face.x1 + m * face.width,
                face.y1 + m * face.height)
    return _feather(_ellipse(size, grown), face)


def _support(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask > 0)
    return Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


# ---------------------------------------------------------------------------- conditions


def edge_condition(crop: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of the crop, white on black, as the canny ControlNet was trained on (no weights)."""
    edges = cv2.Canny(np.asarray(crop.convert("L")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def pose_condition(prepared: PreparedTemplate, region: Region, resolution: int) -> Image.Image | None:
    """The template's OpenPose skeleton in ``region``'s crop at ``resolution``; None when fewer than
    three keypoints fall inside it (the pose ControlNet is then left out)."""
    width, height = prepared.size
    left, top, side = region.crop.left, region.crop.top, region.crop.side
    points = [None if p is None else ((p[0] * width - left) / side, (p[1] * height - top) / side)
              for p in prepared.keypoints]
    inside = sum(p is not None and 0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0 for p in points)
    if inside < 3:
        return None
    return draw_openpose(points, resolution, resolution)


# ---------------------------------------------------------------------------- compositing


def lab_color_transfer(generated: Image.Image, reference: Image.Image, mask: np.ndarray) -> Image.Image:
    """``generated`` with the mean and spread of each Lab channel inside ``mask`` (> 0.5) moved to
    ``reference``'s there (Reinhard et al.): the new face takes the template's light and skin tone."""
    inside = mask > 0.5
    if inside.sum() < 16:
        return generated
    source = cv2.cvtColor(np.asarray(generated.convert("RGB")), cv2.COLOR_RGB2LAB).astype(np.float32)
    target = cv2.cvtColor(np.asarray(reference.convert("RGB")), cv2.COLOR_RGB2LAB).astype(np.float32)
    for channel in range(3):
        s, t = source[..., channel][inside], target[..., channel][inside]
        ratio = float(np.clip(t.std() / max(float(s.std()), 1e-3), 0.5, 2.0))
        source[..., channel] = (source[..., channel] - s.mean()) * ratio + t.mean()
    return Image.fromarray(cv2.cvtColor(np.clip(np.round(source), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB))


def paste(template: Image.Image, generated: Image.Image, region: Region) -> Image.Image:
    """``generated`` (the crop at any resolution) back into ``template`` through the feathered mask.

    Where the mask is 0 the result's pixels are the template's own, bit for bit.
    """
    base = np.asarray(template.convert("RGB"))
    height, width = base.shape[:2]
    left, top, side = region.crop.left, region.crop.top, region.crop.side
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    mask = region.mask
    if (mask > 0).sum() != (mask[y0:y1, x0:x1] > 0).sum():
        raise ValueError("the mask reaches outside its crop square")
    big = np.asarray(generated.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), np.float32)
    out = base.copy()
    kept = base[y0:y1, x0:x1]
    weight = mask[y0:y1, x0:x1, None]
    blended = np.round(kept.astype(np.float32) * (1.0 - weight) + big[y0 - top : y1 - top, x0 - left : x1 - left]
                       * weight)
    out[y0:y1, x0:x1] = np.where(weight > 0, np.clip(blended, 0, 255).astype(np.uint8), kept)
    return Image.fromarray(out, "RGB")


__all__ = [
    "MIN_FACE_PX",
    "MaskingModels",
    "PreparedTemplate",
    "Region",
    "Square",
    "TemplateRejected",
    "edge_condition",
    "face_hair_mask",
    "lab_color_transfer",
    "masking_models",
    "paste",
    "pose_condition",
    "prepare_template",
]
