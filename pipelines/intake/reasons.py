"""Why a photo was not used: a closed set of codes the API returns unchanged to clients.

Codes are stable strings (the enum's value); clients may switch on them. Each has a
default human message; callers may attach a more specific one (with sizes, counts).
Adding a code is an API change: document it here and in the API's schema.
"""

from __future__ import annotations

from enum import Enum


class ReasonCode(str, Enum):
    # Accepted photos carry ACCEPTED so every report row has a code.
    ACCEPTED = "accepted"

    # Decoding (per file, before any model runs)
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_SMALL = "too_small"
    TOO_LARGE_BYTES = "too_large_bytes"
    DECOMPRESSION_BOMB = "decompression_bomb"

    # Content (per photo, detectors)
    NO_PERSON = "no_person"
    MULTIPLE_PEOPLE = "multiple_people"
    NO_FACE = "no_face"
    FACE_TOO_SMALL = "face_too_small"

    # Set-level checks (photo judged against the others)
    BLURRY = "blurry"
    DUPLICATE = "duplicate"
    IDENTITY_OUTLIER = "identity_outlier"

    @property
    def default_message(self) -> str:
        return _MESSAGES[self]

    @property
    def what_to_do(self) -> str:
        """What the person can do about it, in one sentence (``likeness run`` prints it beside the verdict)."""
        return _WHAT_TO_DO[self]

    def __str__(self) -> str:
        return self.value


_MESSAGES: dict[ReasonCode, str] = {
    ReasonCode.ACCEPTED: "Photo accepted.",
    ReasonCode.EMPTY_FILE: "The file is empty.",
    ReasonCode.NOT_AN_IMAGE: "The file is not an image.",
    ReasonCode.UNSUPPORTED_FORMAT: "This image format is not supported; use JPEG, PNG, WebP or HEIC.",
    ReasonCode.CORRUPT_IMAGE: "The image is damaged or truncated and could not be read.",
    ReasonCode.TOO_SMALL: "The image is too small; the short side must be at least 256 pixels.",
    ReasonCode.TOO_LARGE_BYTES: "The file is too large.",
    ReasonCode.DECOMPRESSION_BOMB: "The image has too many pixels to process safely.",
    ReasonCode.NO_PERSON: "No person was found in the photo.",
    ReasonCode.MULTIPLE_PEOPLE: "More than one person is in the photo; use photos of the subject alone.",
    ReasonCode.NO_FACE: "No face was found in the photo.",
    ReasonCode.FACE_TOO_SMALL: "The face is too small in the photo; use a closer shot.",
    ReasonCode.BLURRY: "The photo is too blurry.",
    ReasonCode.DUPLICATE: "The photo is a near-duplicate of another photo in the set.",
    ReasonCode.IDENTITY_OUTLIER: "This photo looks like a different person than the rest of the set.",
}

_WHAT_TO_DO: dict[ReasonCode, str] = {
    ReasonCode.ACCEPTED: "Nothing: it is used for training.",
    ReasonCode.EMPTY_FILE: "Copy the photo again from where it came from.",
    ReasonCode.NOT_AN_IMAGE: "Take it out of the folder, or replace it with a JPEG, PNG, WebP or HEIC photo.",
    ReasonCode.UNSUPPORTED_FORMAT: "Convert it to JPEG or PNG.",
    ReasonCode.CORRUPT_IMAGE: "Export or copy the photo again; this copy is damaged.",
    ReasonCode.TOO_SMALL: "Use the original, full-size photo (at least 256 pixels on the short side).",
    ReasonCode.TOO_LARGE_BYTES: "Use a smaller export of the photo.",
    ReasonCode.DECOMPRESSION_BOMB: "Use an ordinary photo, resized to fewer pixels.",
    ReasonCode.NO_PERSON: "Use a photo in which the person is clearly visible.",
    ReasonCode.MULTIPLE_PEOPLE: "Crop it to the person alone, or use a photo where they are alone.",
    ReasonCode.NO_FACE: "Use a photo where the face is visible, turned towards the camera.",
    ReasonCode.FACE_TOO_SMALL: "Use a closer shot, or crop the photo around the person.",
    ReasonCode.BLURRY: "Use a sharper photo (steady camera, good light).",
    ReasonCode.DUPLICATE: "Use a different photo (another day, place or angle); one of the two is kept.",
    ReasonCode.IDENTITY_OUTLIER: "Use only photos of the one person; take out the others.",
}

assert set(_MESSAGES) == set(ReasonCode), "every reason code needs a default message"
assert set(_WHAT_TO_DO) == set(ReasonCode), "every reason code needs a hint"
