"""Template requests: checked once with stable codes, stored resolved, read back by the worker's model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from likeness.contract.plan import PLANS, JobKind, Stage, plan_for
from likeness.contract.requests import (
    REQUEST_MODELS,
    RESOLVED_MODELS,
    GenerationLimits,
    RequestRejected,
    ResolvedTemplate,
    TemplatePhotoVerdict,
    TemplateRequest,
    read_resolved,
    resolve_template,
)

PHOTO = "9b2e4c0d1f3a4e5b8c7d6e5f4a3b2c1d"


def test_template_mode_is_a_kind_with_its_own_plan_request_and_resolved_model():
    plan = plan_for("template")
    assert plan.stages == (Stage.MASKING, Stage.GENERATING, Stage.REFINING, Stage.RANKING, Stage.UPSCALING,
                           Stage.DELIVERING)
    assert [p.name for p in plan.phases] == ["templating"] and plan.next_queue([]) == "gpu"
    assert REQUEST_MODELS[JobKind.TEMPLATE] is TemplateRequest and RESOLVED_MODELS[JobKind.TEMPLATE] is ResolvedTemplate
    assert set(PLANS) == set(REQUEST_MODELS) == set(RESOLVED_MODELS) == set(JobKind)


def test_a_shipped_template_resolves_with_every_default_and_reads_back():
    resolved = resolve_template(TemplateRequest(template="naval_officer", n=6, k=3, seed=9), preset="tiny",
                                adapter_version=2)
    spec = resolved.templating
    assert resolved.source.model_dump(exclude_none=True) == {"kind": "shipped", "name": "naval_officer", "version": 1}
    assert spec.prompt.startswith("{instance} {class}, naval officer") and spec.template == "naval_officer"
    assert (spec.n, spec.k, spec.seed, spec.strength, spec.steps, spec.ranking) == (6, 3, 9, 0.45, 30, "identity")
    assert spec.first_pass_steps == 13 and spec.second_pass_steps == 0 and spec.upscale == 2
    stored = resolved.model_dump(mode="json")
    assert read_resolved("template", stored) == resolved


def test_an_uploaded_template_photo_resolves_with_the_clients_caption():
    verdict = TemplatePhotoVerdict(PHOTO, "pending")
    resolved = resolve_template(TemplateRequest(template_photo_id=PHOTO, caption="  wedding photo,  white dress ",
                                                second_pass=True, upscale="none"),
                                preset="sd15", adapter_version=1, photo=verdict)
    assert resolved.source.kind == "upload" and resolved.source.photo_id == PHOTO
    assert resolved.templating.prompt == "{instance} {class}, wedding photo, white dress"
    assert resolved.templating.second_pass and resolved.templating.upscale is None
    assert resolved.templating.style_label == f"template:upload:{PHOTO}"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "template_or_photo_required"),
        ({"template": "astronaut", "template_photo_id": PHOTO}, "template_and_photo_given"),
        ({"template": "no_such_template"}, "unknown_template"),
        ({"template": "astronaut", "n": 4, "k": 5}, "k_greater_than_n"),
        ({"template": "astronaut", "n": 0}, "invalid_n"),
        ({"template": "astronaut", "n": 65}, "too_many_candidates"),
        ({"template": "astronaut", "strength": 1.5}, "invalid_strength"),
        ({"template": "astronaut", "steps": 2, "strength": 0.3}, "invalid_strength"),  # 0.6 of a step
        ({"template": "astronaut", "second_pass_strength": 0.0}, "invalid_strength"),
        ({"template": "astronaut", "steps": 500}, "invalid_steps"),
        ({"template": "astronaut", "guidance_scale": -1}, "invalid_guidance"),
        ({"template": "astronaut", "pose_scale": 3}, "invalid_controlnet_scale"),
        ({"template": "astronaut", "ranking": "random"}, "unknown_ranking"),
        ({"template": "astronaut", "caption": "a {hat}"}, "invalid_prompt"),
    ],
)
def test_bad_template_requests_have_precise_codes(body, code):
    with pytest.raises(RequestRejected) as err:
        resolve_template(TemplateRequest(**body), preset="tiny", adapter_version=1,
                         limits=GenerationLimits(max_candidates=64),
                         photo=TemplatePhotoVerdict(PHOTO, "pending") if "template_photo_id" in body else None)
    assert err.value.code == code, err.value.message
    assert err.value.message


def test_a_template_photo_already_refused_is_refused_at_request_time_with_its_reason():
    refused = TemplatePhotoVerdict(PHOTO, "rejected", "multiple_people", "2 people are in the template; ...")
    with pytest.raises(RequestRejected) as err:
        resolve_template(TemplateRequest(template_photo_id=PHOTO), preset="tiny", adapter_version=1, photo=refused)
    assert err.value.code == "template_multiple_people"
    assert err.value.details == {"template_photo_id": PHOTO, "reason": "multiple_people"}


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError):
        TemplateRequest(template="astronaut", style="anime")
