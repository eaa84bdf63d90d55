"""Typed job results: each kind's result model, read back through read_result() as the worker stored it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from likeness.contract.plan import JobKind
from likeness.contract.results import (
    RESULT_MODELS,
    AdapterRef,
    GenerateResult,
    IntakeSummary,
    TemplateResult,
    TrainingSummary,
    TrainResult,
    read_result,
)

INTAKE = {"accepted": 6, "rejected": 1, "class_token": "girl", "class_scores": {"girl": 0.71, "man": 0.8}}


def test_every_job_kind_has_a_result_model():
    assert set(RESULT_MODELS) == set(JobKind)


def test_parts_written_by_each_phase_merge_into_one_result_that_reads_back():
    intake = TrainResult(intake=IntakeSummary(**INTAKE)).stored()
    assert intake == {"intake": {**INTAKE, "checks": {}}}  # no kind, no part not reached yet
    training = TrainResult(adapter=AdapterRef(id="a" * 32, version=2),
                           training=TrainingSummary(steps=40, final_loss=0.1, load_s=1.5)).stored()
    result = read_result("train", {**intake, **training})
    assert isinstance(result, TrainResult) and result.intake.class_token == "girl"
    assert result.adapter.version == 2 and result.training.steps == 40
    assert result.training.model_extra == {"load_s": 1.5}  # the trainer's own timings kept as reported
    assert read_result("train", None) == TrainResult()  # a job no phase has finished yet


def test_template_results_name_the_template_by_its_source():
    stored = {"images": 1, "adapter_id": "a", "candidates": [
        {"seed": 3, "rank": 1, "faces": 1, "flagged": False, "scores": {"identity": 0.5}}],
        "template": {"kind": "upload", "photo_id": "p" * 32, "face_box": [1, 2, 3, 4], "mask_box": [0, 0, 9, 9]}}
    result = read_result("template", stored)
    assert isinstance(result, TemplateResult) and result.template.photo_id == "p" * 32
    assert result.stored() == {**stored, "template": {**stored["template"], "face_box": [1.0, 2.0, 3.0, 4.0],
                                                      "mask_box": [0.0, 0.0, 9.0, 9.0]},
                               "candidates": [{**stored["candidates"][0], "face_refined": False}]}  # stored before
    # the face pass existed: read as not refined
    assert isinstance(read_result("generate", {"images": 2}), GenerateResult)


def test_a_result_that_is_not_of_its_kind_is_refused():
    with pytest.raises(ValidationError):
        read_result("generate", {"intake": INTAKE})
    with pytest.raises(ValidationError):
        read_result("train", {"intake": {"accepted": 1}})
