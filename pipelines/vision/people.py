"""How many people a photo shows: person boxes and faces, two signals, one count.

Neither detector alone is enough for a verdict a user would accept:

* the person detector (BlazePose) misses some people outright — a grayscale portrait, the
  second of two people whose score a JPEG re-encode pushed just under the threshold;
* the face detector sees no one turned away, and now and then a "face" in a coffee cup or a
  colour wheel (scores up to ~0.7).

So :func:`count_people` matches each face to the person box it belongs to (nearest centres,
one to one) and counts a face no person box explains as one more person only when it is a
real candidate: at least ``min_face_ratio`` of the largest face's size (a picture in the
picture or a far bystander is not "several people") and found again when the face detector
looks at it up close (:func:`verify_face`: textures that fool it on the whole photo do not
survive the zoom; real faces, grayscale ones included, do).

:func:`detect_in_tiles` and :func:`face_near` look closer when a person is small in a large
photo: the detectors see 192-224 px inputs, so a 60 px face in a 4000 px photo is invisible
to them until the photo is cut into tiles, and a small person's face is found in a zoomed
crop around its person box.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from pipelines.vision.boxes import Box, merge_overlapping
from pipelines.vision.faces import FaceBox, FaceDetector, detect_faces
from pipelines.vision.persons import PersonBox

#: a face and a person box belong together when their centres are closer than this many
#: times the larger box's side (measured: 0.2-0.6 for one person, 2.5+ for two side by side)
MATCH_DISTANCE = 1.0
#: the zoomed view :func:`verify_face` looks at: the face with this margin on each side
VERIFY_MARGIN = 0.75
VERIFY_SIDE = 256


@dataclass(frozen=True)
class People:
    persons: list[PersonBox]  # person boxes, best first
    faces: list[FaceBox]  # every face found, best first
    #: face of each person box (None: no face found for it), in ``persons`` order
    person_faces: list[FaceBox | None] = field(default_factory=list)
    #: faces no person box explains that pass the checks: people the person detector missed
    extra: list[FaceBox] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.persons) + len(self.extra)

    def main_face(self) -> FaceBox | None:
        """The largest face that belongs to one of the people counted (not a picture in the picture)."""
        theirs = [f for f in self.person_faces if f is not None] + list(self.extra)
        return max(theirs, key=lambda f: (f.area, f.score), default=None)


def count_people(image: Image.Image, persons: list[PersonBox], faces: list[FaceBox], face_detector: FaceDetector,
                 *, min_face_score: float = 0.5, min_face_ratio: float = 0.4) -> People:
    """Persons plus the faces no person box explains (see the module's docstring); boxes in ``image`` pixels."""
    pairs = sorted(
        ((_distance(face, person), f, p) for f, face in enumerate(faces) for p, person in enumerate(persons)),
        key=lambda t: t[0],
    )
    face_of: dict[int, int] = {}
    taken: set[int] = set()
    for distance, f, p in pairs:
        if distance <= MATCH_DISTANCE and p not in face_of and f not in taken:
            face_of[p] = f
            taken.add(f)
    largest = max((max(f.width, f.height) for f in faces), default=0.0)
    extra = [
        face for f, face in enumerate(faces)
        if f not in taken and max(face.width, face.height) >= min_face_ratio * largest
        and verify_face(image, face, face_detector, min_face_score)
    ]
    person_faces = [faces[face_of[p]] if p in face_of else None for p in range(len(persons))]
    return People(list(persons), list(faces), person_faces, extra)


def _distance(face: Box, person: Box) -> float:
    (fx, fy), (px, py) = face.center, person.center
    size = max(face.width, face.height, person.width, person.height, 1e-6)
    return max(abs(fx - px), abs(fy - py)) / size


def _square(image: Image.Image, box: Box, margin: float, side_px: int) -> tuple[Image.Image, float, float, float]:
    """A square view around ``box`` (``margin`` x its size on each side) resized to ``side_px``:
    (view, scale, left, top) with ``view pixel = (image pixel - (left, top)) * scale``."""
    side = max(box.width, box.height) * (1.0 + 2.0 * margin)
    cx, cy = box.center
    left, top = cx - side / 2, cy - side / 2
    view = image.crop((round(left), round(top), round(left + side), round(top + side)))  # black outside the image
    view = view.convert("RGB").resize((side_px, side_px), Image.Resampling.BILINEAR)
    return view, side_px / round(side), round(left), round(top)


def verify_face(image: Image.Image, face: FaceBox, detector: FaceDetector, min_score: float = 0.5) -> bool:
    """Is ``face`` found again, near the middle, when the detector looks at it up close?"""
    view, _, _, _ = _square(image, face, VERIFY_MARGIN, VERIFY_SIDE)
    found = detect_faces(view, detector, min_score=min_score, first_look=True)
    middle = VERIFY_SIDE / 2
    return any(abs(f.center[0] - middle) < VERIFY_SIDE / 4 and abs(f.center[1] - middle) < VERIFY_SIDE / 4
               for f in found)


def face_near(image: Image.Image, person: PersonBox, detector: FaceDetector, min_score: float = 0.5,
              side_px: int = 512) -> FaceBox | None:
    """The face of a (small) person: the detector looks at a zoomed view around its box."""
    view, scale, left, top = _square(image, person, 1.0, side_px)
    faces = detect_faces(view, detector, min_score=min_score, first_look=True)
    px, py = person.center
    nearest = sorted(
        (f.scaled(1.0 / scale, left, top) for f in faces),
        key=lambda f: max(abs(f.center[0] - px), abs(f.center[1] - py)),
    )
    near = [f for f in nearest if _distance(f, person) <= MATCH_DISTANCE]
    return near[0] if near else None


def detect_in_tiles(image: Image.Image, detect: Callable[[Image.Image], list[Box]], tile: int,
                    overlap: float = 0.25) -> list[Box]:
    """``detect`` on overlapping ``tile`` x ``tile`` windows of ``image``; boxes in ``image`` pixels, merged."""
    width, height = image.size
    stride = max(1, round(tile * (1.0 - overlap)))

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        count = math.ceil((length - tile) / stride) + 1
        return sorted({min(i * stride, length - tile) for i in range(count)})

    found: list[Box] = []
    for top in starts(height):
        for left in starts(width):
            window = image.crop((left, top, min(left + tile, width), min(top + tile, height)))
            found += [box.scaled(1.0, left, top) for box in detect(window)]
    return merge_overlapping(found)
