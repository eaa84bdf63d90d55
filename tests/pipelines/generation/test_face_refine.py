"""The face-refinement pass: only the feathered face region changes, a faceless candidate is delivered
unrefined, refined candidates stay reproducible (tiny SD 1.5 models; template jobs: tests/pipelines/templates)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pipelines.engine.face_refine import FaceRefinePass, face_region
from pipelines.engine.job import BASE_TOKENS, Candidate, Delivery, Job
from pipelines.generation import GenerationSpec
from pipelines.templates.engine import changed_pixels
from pipelines.vision.faces import FaceBox
from tests.pipelines.generation.test_engine import FAST, pixels

REFINE = {**FAST, "steps": 4, "face_refine": True}


class FixedFace:
    """A detector that finds one face at a given box (the tiny models draw noise, never a face)."""

    name = "fixed"

    def __init__(self, box):
        self.box = box

    def detect(self, rgb, min_score):
        return [FaceBox(self.box.x0, self.box.y0, self.box.x1, self.box.y1, 1.0)]


def with_detector(engine, detector):
    """The same engine (same borrowed base) whose ranking and refinement use ``detector``."""
    models = replace(engine.models, ranking=replace(engine.models.ranking, face_detector=detector))
    return type(engine)(engine.preset, models)


@pytest.fixture(scope="module")
def real_faces(engine):
    from pipelines.vision.faces import load_face_detector

    return with_detector(engine, load_face_detector())


def job(**changes) -> Job:
    spec = GenerationSpec(**{**REFINE, **changes})
    return Job(spec, Delivery(k=1, ranking="aesthetic", upscale=None, negative_prompt="", style=None,
                              face_refine=True))


def test_only_the_feathered_face_region_is_redrawn(real_faces, astronaut):
    photo = astronaut.resize((256, 256))
    region = face_region(photo, real_faces.models.ranking.face_detector)
    assert region is not None  # the bundled detector finds the astronaut's face
    (refined,) = FaceRefinePass()(real_faces, [Candidate(photo, seed=5, prompt="a photo of person")], job(),
                                  BASE_TOKENS)
    assert refined.face_refined and refined.seed == 5
    changed = changed_pixels(photo, refined.image)
    assert not changed[region.mask == 0].any()  # outside the feathered mask: the candidate's own pixels
    assert changed[region.mask > 0.5].mean() > 0.5  # inside it: redrawn
    face = region.mask_box
    assert face.width < 0.6 * photo.width  # the face region, not the whole picture


def test_a_faceless_candidate_is_delivered_unrefined(real_faces):
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    (same,) = FaceRefinePass()(real_faces, [Candidate(flat, seed=1, prompt="p")], job(), BASE_TOKENS)
    assert not same.face_refined and same.image is flat
    # Through the engine: random-weight images have no face; every candidate is still delivered.
    results = real_faces.generate(GenerationSpec(**{**REFINE, "n": 2, "k": 2}))
    assert [r.rank for r in results] == [1, 2] and not any(r.face_refined for r in results)


def test_refined_candidates_are_ranked_reproducible_and_differ_from_unrefined(engine):
    """``engine`` sees the whole image as one face: every candidate is refined, with its own seed."""
    refined = engine.generate(GenerationSpec(**{**REFINE, "n": 2, "k": 2, "seed": 30}))
    plain = engine.generate(GenerationSpec(**{**REFINE, "n": 2, "k": 2, "seed": 30, "face_refine": False}))
    assert all(r.face_refined for r in refined) and not any(r.face_refined for r in plain)
    by_seed = {r.seed: r for r in plain}
    assert all(not np.array_equal(pixels(r.image), pixels(by_seed[r.seed].image)) for r in refined)
    (alone,) = engine.generate(GenerationSpec(**{**REFINE, "n": 1, "k": 1, "seed": 31}))
    again = next(r for r in refined if r.seed == 31)
    assert alone.face_refined and np.abs(pixels(alone.image) - pixels(again.image)).max() <= 1
