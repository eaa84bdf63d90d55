"""Requests are checked once, with stable codes, before anything is queued; the resolved form is stored."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from likeness.contract.requests import (
    GenerateRequest,
    GenerationLimits,
    RequestRejected,
    ResolvedGenerate,
    ResolvedTrain,
    TemplateRequest,
    TrainRequest,
    read_resolved,
    resolve_generate,
    resolve_generation,
    resolve_templating,
    resolve_train,
)
from pipelines.errors import InvalidConfig
from pipelines.generation import aspect_size, get_style, list_styles
from pipelines.generation.styles import fill_prompt, template_path


def test_shipped_style_packs_are_valid_and_cover_the_issue():
    names = {style.name for style in list_styles()}
    assert len(names) >= 12
    assert {"studio_headshot", "business", "oil_painting", "anime", "cyberpunk", "fantasy", "astronaut", "watercolor",
            "bw_film"} <= names
    for style in list_styles():
        assert style.version >= 1
        assert all("{instance}" in p for p in style.prompts)
        if style.controlnet is not None:
            assert template_path(style.controlnet.template).stat().st_size < 64 * 1024


def test_style_prompt_fills_tokens():
    prompt = fill_prompt(get_style("oil_painting").prompt_for(0), "<subj>", "girl")
    assert "<subj> girl" in prompt and "{" not in prompt


def test_unknown_style_has_code():
    with pytest.raises(InvalidConfig) as err:
        get_style("no_such_style")
    assert err.value.error_code == "unknown_style" and "anime" in err.value.details["known"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"style": "anime", "n": 4, "k": 5}, "k_greater_than_n"),
        ({"style": "anime", "n": 0, "k": 1}, "invalid_n"),
        ({"style": "anime", "n": 2, "k": 0}, "invalid_k"),
        ({"style": "nope"}, "unknown_style"),
        ({"style": "anime", "aspect": "16:9"}, "unknown_aspect"),
        ({"prompts": ["a photo of a dog"]}, "prompt_missing_instance"),
        ({"prompts": ["   "]}, "empty_prompt"),
        ({"prompts": ["{instance} {oops"]}, "invalid_prompt"),
        ({"style": "anime", "n": 65, "k": 4}, "too_many_candidates"),
        ({"style": "anime", "sampler": "heun"}, "unknown_sampler"),
        ({"style": "anime", "steps": 500}, "invalid_steps"),
        ({"style": "anime", "guidance_scale": 50}, "invalid_guidance"),
        ({"style": "anime", "ranking": "random"}, "unknown_ranking"),
        ({"prompts": ["{instance} with {hat}"]}, "unknown_placeholder"),
        ({}, "style_or_prompts_required"),
        ({"style": "anime", "controlnet": {"kind": "pose", "template": "../anime.yaml"}}, "unknown_template"),
    ],
)
def test_bad_requests_fail_with_precise_codes(body, code):
    with pytest.raises(RequestRejected) as err:
        resolve_generation(GenerateRequest(**body), limits=GenerationLimits(max_candidates=64))
    assert err.value.code == code and err.value.message


def test_shape_errors_are_refused_by_the_model_itself():
    for body in ({"style": "anime", "upscale": 3}, {"style": "anime", "controlnet": {"kind": "canny", "template": "x"}},
                 {"style": "anime", "unknown_field": 1}):
        with pytest.raises(ValidationError):
            GenerateRequest(**body)
    with pytest.raises(ValidationError):
        TrainRequest(mode="lora", steps=3)  # at least 10 steps
    with pytest.raises(ValidationError):
        TrainRequest(extra=True)


def test_per_client_candidate_limit():
    body = GenerateRequest(style="anime", n=20, k=4)
    resolve_generation(body, limits=GenerationLimits(max_candidates=20))
    with pytest.raises(RequestRejected) as err:
        resolve_generation(body, limits=GenerationLimits(max_candidates=16))
    assert err.value.code == "too_many_candidates" and err.value.details == {"n": 20, "limit": 16}


def test_prompt_without_instance_is_allowed_when_asked_or_named_literally():
    spec = resolve_generation(GenerateRequest(prompts=["a photo of a dog"], allow_prompt_without_instance=True))
    assert spec.prompts == ("a photo of a dog",)
    resolve_generation(GenerateRequest(prompts=["a photo of <subj> girl"]), instance_token="<subj>")


def test_defaults_come_from_the_style_and_the_request_overrides_them():
    style = get_style("cyberpunk")
    spec = resolve_generation(GenerateRequest(style="cyberpunk"))
    assert (spec.aspect, spec.steps, spec.guidance_scale) == (style.aspect, style.steps, style.guidance_scale)
    assert (spec.style, spec.style_version, spec.prompts) == ("cyberpunk", style.version, style.prompts)
    assert [(c.kind, c.template, c.scale) for c in spec.controlnets] == [
        (style.controlnet.kind, style.controlnet.template, style.controlnet.scale)]
    spec = resolve_generation(GenerateRequest(style="cyberpunk", aspect="1:1", steps=4, no_controlnet=True,
                                              upscale="none"))
    assert (spec.aspect, spec.steps, spec.controlnets, spec.upscale) == ("1:1", 4, (), None)
    assert resolve_generation(GenerateRequest(prompts=["{instance} {class}"])).steps == 25


def test_one_style_pack_serves_every_family_with_that_familys_defaults():
    style = get_style("studio_headshot")
    sd15 = resolve_generation(GenerateRequest(style=style.name), preset="sd15")
    sdxl = resolve_generation(GenerateRequest(style=style.name), preset="sdxl")
    assert (sd15.steps, sd15.guidance_scale) == (style.steps, style.guidance_scale) == (25, 7.0)
    assert (sdxl.steps, sdxl.guidance_scale) == (30, 6.0)  # styles/families/sdxl.yaml
    assert sdxl.prompts == sd15.prompts and sdxl.negative_prompt == sd15.negative_prompt
    assert sdxl.style_version == sd15.style_version == style.version  # the same pack, not a copy
    # The request's own values win on every family; the tiny SDXL preset denoises briefly like tiny.
    chosen = resolve_generation(GenerateRequest(style=style.name, steps=12, guidance_scale=3.0), preset="sdxl")
    assert (chosen.steps, chosen.guidance_scale) == (12, 3.0)
    assert resolve_generation(GenerateRequest(style=style.name), preset="tiny-sdxl").steps == 10


def test_a_packs_own_family_block_wins_over_the_familys_defaults():
    from pipelines.generation.styles import StyleDefaults

    pack = get_style("bw_film").model_copy(
        update={"families": {"sdxl": StyleDefaults(guidance_scale=4.5, negative_prompt="color")}})
    on_sdxl = pack.for_family("sdxl")
    assert (on_sdxl.steps, on_sdxl.guidance_scale, on_sdxl.negative_prompt) == (30, 4.5, "color")
    assert pack.for_family("sd15") == pack


def test_face_refinement_is_on_for_portrait_styles_and_templates_unless_turned_off():
    assert resolve_generation(GenerateRequest(style="studio_headshot")).face_refine is True
    assert resolve_generation(GenerateRequest(prompts=["{instance} {class} on a beach"])).face_refine is False
    assert resolve_generation(GenerateRequest(prompts=["{instance} {class}"], face_refine="on")).face_refine is True
    assert resolve_generation(GenerateRequest(style="studio_headshot", face_refine="off")).face_refine is False
    assert resolve_templating(TemplateRequest(template="id_photo"))[1].face_refine is True
    assert resolve_templating(TemplateRequest(template="id_photo", face_refine="off"))[1].face_refine is False


def test_resolved_requests_round_trip_through_json_exactly():
    generate = resolve_generate(GenerateRequest(style="anime", n=6, k=2, seed=9), preset="tiny", adapter_version=3)
    stored = generate.model_dump(mode="json")
    assert read_resolved("generate", stored) == generate
    train = resolve_train(TrainRequest(mode="full", steps=120, class_token="man"), preset="sd15")
    stored = train.model_dump(mode="json")
    again = read_resolved("train", stored)
    assert isinstance(again, ResolvedTrain) and again == train
    assert again.training.mode == "full" and again.training.max_train_steps == 120 and again.class_token == "man"
    assert isinstance(read_resolved("generate", generate.model_dump(mode="json")), ResolvedGenerate)


def test_train_defaults_depend_on_the_preset_and_the_subject_override():
    tiny = resolve_train(TrainRequest(), preset="tiny")
    sd15 = resolve_train(TrainRequest(), preset="sd15")
    assert tiny.training.max_steps_cap < sd15.training.max_steps_cap  # the noise preset is for demos
    assert sd15.training.strategy == "staged" and sd15.training.stage1_fraction == 0.3  # the method's choice
    assert resolve_train(TrainRequest(), preset="sd15", class_token_override="boy").class_token == "boy"
    chosen = resolve_train(TrainRequest(class_token="man"), preset="sd15", class_token_override="boy")
    assert chosen.class_token == "man"
    assert resolve_train(TrainRequest(attention_loss=True), preset="sd15").training.attention_loss_weight > 0
    # the demo preset: 20 steps for 5 photos, at most 40; sd15: the method's 90 a photo
    from pipelines.training.config import total_steps

    assert total_steps(tiny.training, 5) == 20 and total_steps(tiny.training, 20) == 40
    assert total_steps(sd15.training, 5) == 450


def test_generation_defaults_depend_on_the_preset_and_the_request_wins():
    style = get_style("studio_headshot")
    assert resolve_generation(GenerateRequest(style=style.name), preset="sd15").steps == style.steps == 25
    assert resolve_generation(GenerateRequest(style=style.name), preset="tiny").steps == 10
    assert resolve_generation(GenerateRequest(style=style.name, steps=30), preset="tiny").steps == 30


@pytest.mark.parametrize(
    ("aspect", "resolution", "size"),
    [("1:1", 512, (512, 512)), ("9:16", 512, (512, 912)), ("4:5", 512, (512, 640)), ("1:1", 128, (128, 128)),
     ("9:16", 128, (128, 224)), ("4:5", 128, (128, 160))],
)
def test_aspect_sizes(aspect, resolution, size):
    assert aspect_size(aspect, resolution) == size


def test_the_contract_does_not_import_torch():
    code = ("import sys; from likeness.contract.requests import GenerateRequest, TrainRequest, resolve_generation, "
            "resolve_train; resolve_generation(GenerateRequest(style='anime')); resolve_train(TrainRequest(), "
            "preset='tiny'); import likeness.contract.plan; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_train_request_may_name_its_preset_and_gets_that_presets_defaults():
    assert resolve_train(TrainRequest(), preset="sd15").preset == "sd15"  # the deployment's default
    sdxl = resolve_train(TrainRequest(preset="sdxl"), preset="tiny")
    assert sdxl.preset == "sdxl" and sdxl.training == resolve_train(TrainRequest(), preset="sd15").training
    tiny_sdxl = resolve_train(TrainRequest(preset="tiny-sdxl"), preset="sd15")
    assert tiny_sdxl.training.max_steps_cap == resolve_train(TrainRequest(), preset="tiny").training.max_steps_cap
    with pytest.raises(ValueError, match="preset"):
        TrainRequest(preset="sd3")
