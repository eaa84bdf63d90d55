"""ControlNet condition images from template pictures.

Pose: MediaPipe BlazePose landmarks (weights bundled with mediapipe, so it runs offline
and in tests) drawn as an OpenPose-style 18-keypoint skeleton, the format the SD 1.5
openpose ControlNet was trained on. Production may prefer controlnet-aux's OpenPose
annotator; the output format is the same.

Depth: there is no bundled depth estimator. A depth condition needs either a depth map
supplied by the client (``preprocessed=True``) or the optional controlnet-aux MiDaS
annotator (``pip install controlnet-aux``, weights from ``lllyasviel/Annotators``).
Person segmentation is not depth, so it is not offered as a stand-in.

The estimators come from the caller (:func:`load_pose_estimator`, :func:`load_depth_estimator`,
or the worker's model manager by their ``*_spec`` functions).
"""

from __future__ import annotations

import importlib.util
import math
import threading

import numpy as np
from PIL import Image, ImageOps

from pipelines.errors import InvalidConfig
from pipelines.models.specs import NO_DTYPE, ModelSpec

# OpenPose keypoint order: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow,
# l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear.
# MediaPipe index of each (neck: the shoulders' midpoint).
_MEDIAPIPE_INDEX = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
_LIMBS = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)
_COLORS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)
_MIN_VISIBILITY = 0.3


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop and resize to exactly (width, height), so a template never stretches."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)


class PoseEstimator:
    """MediaPipe BlazePose landmarks (static images), one graph shared under a lock."""

    def __init__(self) -> None:
        import mediapipe as mp

        self._graph = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1)
        self._lock = threading.Lock()  # MediaPipe graphs are not re-entrant

    def process(self, rgb: np.ndarray):
        with self._lock:
            return self._graph.process(rgb)

    def close(self) -> None:
        with self._lock:
            self._graph.close()


def load_pose_estimator() -> PoseEstimator:
    return PoseEstimator()


def pose_estimator_spec() -> ModelSpec:
    return ModelSpec.of("pose_estimator", "mediapipe-blazepose", "cpu", NO_DTYPE, load_pose_estimator)


def depth_annotator_installed() -> bool:
    return importlib.util.find_spec("controlnet_aux") is not None


def load_depth_estimator():
    from controlnet_aux import MidasDetector

    return MidasDetector.from_pretrained("lllyasviel/Annotators")


def depth_estimator_spec() -> ModelSpec | None:
    """controlnet-aux's MiDaS annotator, or None when the optional package is not installed."""
    if not depth_annotator_installed():
        return None
    return ModelSpec.of("depth_estimator", "lllyasviel/Annotators:midas", "cpu", NO_DTYPE, load_depth_estimator)


def pose_keypoints(image: Image.Image, estimator: PoseEstimator) -> list[tuple[float, float] | None]:
    """18 OpenPose keypoints in [0, 1] image coordinates (None where not visible)."""
    result = estimator.process(np.asarray(image.convert("RGB")))
    if result.pose_landmarks is None:
        return []
    marks = result.pose_landmarks.landmark

    def point(index: int) -> tuple[float, float] | None:
        mark = marks[index]
        inside = 0.0 <= mark.x <= 1.0 and 0.0 <= mark.y <= 1.0
        return (mark.x, mark.y) if mark.visibility >= _MIN_VISIBILITY and inside else None

    points = [point(i) if i is not None else None for i in _MEDIAPIPE_INDEX]
    if points[2] and points[5]:
        points[1] = ((points[2][0] + points[5][0]) / 2, (points[2][1] + points[5][1]) / 2)
    return points


def draw_openpose(points: list[tuple[float, float] | None], width: int, height: int) -> Image.Image:
    """An OpenPose-style skeleton: coloured limb ellipses and joint dots on black."""
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    stick = max(2, round(4 * min(width, height) / 512))
    for limb, color in zip(_LIMBS, _COLORS):
        a, b = points[limb[0]], points[limb[1]]
        if a is None or b is None:
            continue
        (xa, ya), (xb, yb) = (a[0] * width, a[1] * height), (b[0] * width, b[1] * height)
        length = math.hypot(xb - xa, yb - ya)
        angle = math.degrees(math.atan2(yb - ya, xb - xa))
        polygon = cv2.ellipse2Poly(
            (int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), stick), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for point, color in zip(points, _COLORS):
        if point is not None:
            cv2.circle(canvas, (int(point[0] * width), int(point[1] * height)), stick, color, thickness=-1)
    return Image.fromarray(canvas)


def pose_condition(image: Image.Image, width: int, height: int, estimator: PoseEstimator) -> Image.Image:
    framed = fit(image, width * 2, height * 2) if min(width, height) < 256 else fit(image, width, height)
    points = pose_keypoints(framed, estimator)
    if sum(p is not None for p in points) < 3:
        raise InvalidConfig(
            "no person pose found in the ControlNet template image", code="no_pose_in_template"
        )
    return draw_openpose(points, width, height)


def depth_condition(image: Image.Image, width: int, height: int, estimator) -> Image.Image:
    if estimator is None:  # the optional production annotator
        raise InvalidConfig(
            "depth ControlNet needs a depth map (send it with preprocessed=true) or the optional "
            "controlnet-aux annotator, which is not installed (or was not loaded for this request)",
            code="depth_annotator_unavailable",
        )
    depth = estimator(fit(image, width, height))
    return fit(depth, width, height)


def condition_image(
    kind: str, image: Image.Image, width: int, height: int, preprocessed: bool = False, estimator=None
) -> Image.Image:
    """The (width, height) RGB condition for ControlNet ``kind`` from a template or client image.

    ``estimator``: a :class:`PoseEstimator` for ``pose``, the MiDaS annotator (or None) for ``depth``.
    """
    if preprocessed:
        return fit(image, width, height)
    if kind == "pose":
        if estimator is None:
            raise InvalidConfig("a pose condition from a photo needs a pose estimator", code="pose_estimator_missing")
        return pose_condition(image, width, height, estimator)
    if kind == "depth":
        return depth_condition(image, width, height, estimator)
    raise InvalidConfig(f"unknown ControlNet kind {kind!r}", code="unknown_controlnet")
