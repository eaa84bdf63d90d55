"""Person detection, used to count the people in a photo (none, one, several).

Backends:

* ``blazepose`` (default, offline): the person detector of MediaPipe BlazePose, bundled
  with mediapipe. It finds a person from face and upper body together and returns a box
  around the head. Its 224 px letterboxed input shrinks people standing side by side
  in a wide photo, so it also looks at two overlapping halves of the photo along its
  long side; detections of one person seen in several views are merged.
* ``yolo``: an Ultralytics YOLO model (class 0, "person"). **AGPL-3.0**: optional, never
  imported unless chosen (``pip install likeness[yolo]``). Name the weights as
  ``"yolo:/path/to/yolov8n.pt"``; plain ``"yolo"`` means ``yolov8n.pt``.

The method this project follows found object detection more precise than face
detection for "exactly one person", so persons are counted here, not faces.

Load a detector with :func:`load_person_detector` (or borrow it from the worker's model
manager by :func:`person_detector_spec`) and pass it to :func:`detect_persons`.
"""

from __future__ import annotations

import functools
import threading
from typing import Protocol

import numpy as np
from PIL import Image

from pipelines.errors import InvalidConfig
from pipelines.models.specs import NO_DTYPE, ModelSpec
from pipelines.vision.boxes import Box, clip_to_image, merge_overlapping
from pipelines.vision.faces import downscaled_rgb

PERSON_BACKENDS = ("blazepose", "yolo")
DETECTION_MAX_SIDE = 1024


class PersonBox(Box):
    """A detected person (for ``blazepose``, the box is around the head)."""


class PersonDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray, min_score: float) -> list[PersonBox]: ...


def detect_persons(
    image: Image.Image, detector: PersonDetector, min_score: float = 0.5, max_side: int = DETECTION_MAX_SIDE
) -> list[PersonBox]:
    """People in ``image``, best first, boxes in ``image``'s pixels."""
    small, scale = downscaled_rgb(image, max_side)
    persons = detector.detect(small, min_score)
    width, height = image.size
    persons = [clip_to_image(p.scaled(1.0 / scale), width, height) for p in persons]
    return sorted(persons, key=lambda p: (-round(p.score, 4), -p.area, p.x0, p.y0))


def check_person_backend(backend: str) -> None:
    if backend != "blazepose" and backend != "yolo" and not backend.startswith("yolo:"):
        raise InvalidConfig(f"unknown person backend {backend!r}", {"known": list(PERSON_BACKENDS)})


def load_person_detector(backend: str = "blazepose") -> PersonDetector:
    check_person_backend(backend)
    if backend == "blazepose":
        return BlazePoseDetector()
    return YoloPersonDetector(backend.partition(":")[2] or "yolov8n.pt")


def person_detector_spec(backend: str = "blazepose") -> ModelSpec:
    """Both backends run on the CPU here (the BlazePose graph is CPU-only; YOLO picks its own device)."""
    check_person_backend(backend)
    return ModelSpec.of("person_detector", backend, "cpu", NO_DTYPE, functools.partial(load_person_detector, backend))


# The subgraph PoseDetectionCpu (registered inside mediapipe's binary) expanded, so its
# score threshold is ours to set; the model file is the one bundled with mediapipe.
_POSE_DETECTION_GRAPH = """
input_stream: "image"
output_stream: "detections"
node {
  calculator: "ImageToTensorCalculator"
  input_stream: "IMAGE:image"
  output_stream: "TENSORS:input_tensors"
  output_stream: "LETTERBOX_PADDING:letterbox_padding"
  options {
    [mediapipe.ImageToTensorCalculatorOptions.ext] {
      output_tensor_width: 224
      output_tensor_height: 224
      keep_aspect_ratio: true
      output_tensor_float_range { min: -1 max: 1 }
      gpu_origin: TOP_LEFT
      border_mode: BORDER_ZERO
    }
  }
}
node {
  calculator: "SsdAnchorsCalculator"
  output_side_packet: "anchors"
  options {
    [mediapipe.SsdAnchorsCalculatorOptions.ext] {
      input_size_width: 224
      input_size_height: 224
      min_scale: 0.1484375
      max_scale: 0.75
      anchor_offset_x: 0.5
      anchor_offset_y: 0.5
      num_layers: 5
      strides: 8
      strides: 16
      strides: 32
      strides: 32
      strides: 32
      aspect_ratios: 1
      fixed_anchor_size: true
    }
  }
}
node {
  calculator: "InferenceCalculatorCpu"
  input_stream: "TENSORS:input_tensors"
  output_stream: "TENSORS:detection_tensors"
  options {
    [mediapipe.InferenceCalculatorOptions.ext] {
      model_path: "mediapipe/modules/pose_detection/pose_detection.tflite"
      delegate { xnnpack {} }
    }
  }
}
node {
  calculator: "TensorsToDetectionsCalculator"
  input_stream: "TENSORS:detection_tensors"
  output_stream: "DETECTIONS:unfiltered_detections"
  input_side_packet: "ANCHORS:anchors"
  options {
    [mediapipe.TensorsToDetectionsCalculatorOptions.ext] {
      num_classes: 1
      num_boxes: 2254
      num_coords: 12
      x_scale: 224
      y_scale: 224
      w_scale: 224
      h_scale: 224
      keypoint_coord_offset: 4
      num_keypoints: 4
      num_values_per_keypoint: 2
      box_coord_offset: 0
      reverse_output_order: true
      sigmoid_score: true
      score_clipping_thresh: 100
      min_score_thresh: 0.2
    }
  }
}
node {
  calculator: "NonMaxSuppressionCalculator"
  input_stream: "unfiltered_detections"
  output_stream: "filtered_detections"
  options {
    [mediapipe.NonMaxSuppressionCalculatorOptions.ext] {
      min_suppression_threshold: 0.3
      overlap_type: INTERSECTION_OVER_UNION
      algorithm: WEIGHTED
    }
  }
}
node {
  calculator: "DetectionLetterboxRemovalCalculator"
  input_stream: "DETECTIONS:filtered_detections"
  input_stream: "LETTERBOX_PADDING:letterbox_padding"
  output_stream: "DETECTIONS:detections"
}
"""


class BlazePoseDetector:
    name = "blazepose"
    #: each half-view covers this fraction of the long side (they overlap in the middle)
    window_fraction = 0.6
    #: a half-view shows a zoomed, cut-off scene where the detector fires more easily on
    #: non-people (rockets, textures score 0.5-0.6 there), so it needs stronger evidence
    window_min_score = 0.7

    def __init__(self) -> None:
        from mediapipe.python.solution_base import SolutionBase

        self._graph = SolutionBase(graph_config=_POSE_DETECTION_GRAPH, outputs=["detections"])
        self._lock = threading.Lock()  # MediaPipe graphs are not re-entrant

    def detect(self, rgb: np.ndarray, min_score: float) -> list[PersonBox]:
        height, width = rgb.shape[:2]
        views = [(0, 0, width, height)]
        if width >= height:
            span = round(width * self.window_fraction)
            views += [(0, 0, span, height), (width - span, 0, width, height)]
        else:
            span = round(height * self.window_fraction)
            views += [(0, 0, width, span), (0, height - span, width, height)]
        found: list[PersonBox] = []
        with self._lock:
            for index, (x0, y0, x1, y1) in enumerate(views):
                threshold = min_score if index == 0 else max(min_score, self.window_min_score)
                found += self._run(np.ascontiguousarray(rgb[y0:y1, x0:x1]), threshold, x0, y0)
        return merge_overlapping(found)

    def close(self) -> None:
        with self._lock:
            self._graph.close()

    def _run(self, rgb: np.ndarray, min_score: float, dx: int, dy: int) -> list[PersonBox]:
        height, width = rgb.shape[:2]
        result = self._graph.process({"image": rgb})
        persons = []
        for detection in result.detections or []:
            score = float(detection.score[0])
            if score < min_score:
                continue
            rel = detection.location_data.relative_bounding_box
            x0, y0 = rel.xmin * width + dx, rel.ymin * height + dy
            persons.append(PersonBox(x0, y0, x0 + rel.width * width, y0 + rel.height * height, score))
        return persons


class YoloPersonDetector:
    name = "yolo"

    def __init__(self, weights: str = "yolov8n.pt") -> None:
        try:
            from ultralytics import YOLO  # AGPL-3.0, optional
        except ImportError as exc:
            raise InvalidConfig("person backend 'yolo' needs the optional package ultralytics (AGPL-3.0)") from exc
        self._model = YOLO(weights)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray, min_score: float) -> list[PersonBox]:
        with self._lock:
            # Ultralytics reads numpy arrays as BGR (OpenCV convention).
            results = self._model.predict(rgb[:, :, ::-1], classes=[0], conf=min_score, verbose=False)
        persons = []
        for result in results:
            for xyxy, score in zip(result.boxes.xyxy.cpu().numpy(), result.boxes.conf.cpu().numpy()):
                persons.append(PersonBox(*map(float, xyxy), float(score)))
        return persons
