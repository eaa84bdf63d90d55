"""Style packs and request checks: bad requests fail fast, with codes, before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.errors import InvalidConfig
from pipelines.generation import (
    ControlNetSpec,
    GenerationLimits,
    GenerationRequest,
    aspect_size,
    check_request,
    get_style,
    list_styles,
)
from pipelines.generation.styles import fill_prompt, template_path


def test_shipped_style_packs_are_valid_and_cover_the_issue():
    names = {style.name for style in list_styles()}
    assert len(names) >= 12
    assert {
        "studio_headshot",
        "business",
        "oil_painting",
        "anime",
        "cyberpunk",
        "fantasy",
        "astronaut",
        "watercolor",
        "bw_film",
    } <= names
    for style in list_styles():
        assert style.version >= 1
        assert all("{instance}" in p for p in style.prompts)
        if style.controlnet is not None:
            assert template_path(style.controlnet.template).stat().st_size < 64 * 1024


def test_style_prompt_fills_tokens():
    style = get_style("oil_painting")
    prompt = fill_prompt(style.prompt_for(0), "<subj>", "girl")
    assert "<subj> girl" in prompt and "{" not in prompt


def test_unknown_style_has_code():
    with pytest.raises(InvalidConfig) as err:
        get_style("no_such_style")
    assert err.value.error_code == "unknown_style"
    assert "anime" in err.value.details["known"]


@pytest.mark.parametrize(
    ("request_kwargs", "code"),
    [
        ({"style": "anime", "n": 4, "k": 5}, "k_greater_than_n"),
        ({"style": "nope"}, "unknown_style"),
        ({"style": "anime", "aspect": "16:9"}, "unknown_aspect"),
        ({"prompts": ("a photo of a dog",)}, "prompt_missing_instance"),
        ({"style": "anime", "n": 65, "k": 4}, "too_many_candidates"),
        ({"style": "anime", "sampler": "heun"}, "unknown_sampler"),
        ({"style": "anime", "upscale": 3}, "invalid_upscale"),
        ({"style": "anime", "ranking": "random"}, "unknown_ranking"),
        ({"prompts": ("{instance} with {hat}",)}, "unknown_placeholder"),
        ({}, "style_or_prompts_required"),
        (
            {"style": "anime", "controlnets": (ControlNetSpec(kind="canny", template="astronaut_tall.jpg"),)},
            "unknown_controlnet",
        ),
        (
            {"style": "anime", "controlnets": (ControlNetSpec(kind="pose", template="../anime.yaml"),)},
            "unknown_template",
        ),
        ({"style": "anime", "controlnets": (ControlNetSpec(kind="pose"),)}, "controlnet_condition_required"),
    ],
)
def test_bad_requests_fail_with_precise_codes(request_kwargs, code):
    with pytest.raises(InvalidConfig) as err:
        check_request(GenerationRequest(**request_kwargs), GenerationLimits(max_candidates=64))
    assert err.value.error_code == code


def test_per_client_candidate_limit():
    request = GenerationRequest(style="anime", n=20, k=4)
    check_request(request, GenerationLimits(max_candidates=20))
    with pytest.raises(InvalidConfig) as err:
        check_request(request, GenerationLimits(max_candidates=16))
    assert err.value.error_code == "too_many_candidates"
    assert err.value.details == {"n": 20, "limit": 16}


def test_prompt_without_instance_is_allowed_when_asked():
    resolved = check_request(
        GenerationRequest(prompts=("a photo of a dog",), allow_prompt_without_instance=True)
    )
    assert resolved.prompt_templates == ("a photo of a dog",)
    # The literal instance token also names the subject.
    check_request(GenerationRequest(prompts=("a photo of <subj> girl",)), instance_token="<subj>")


def test_defaults_come_from_the_style_and_request_overrides_them():
    resolved = check_request(GenerationRequest(style="cyberpunk"))
    assert (resolved.aspect, resolved.steps) == ("9:16", 25)
    assert [(c.kind, c.template) for c in resolved.controlnets] == [("pose", "astronaut_tall.jpg")]
    resolved = check_request(GenerationRequest(style="cyberpunk", aspect="1:1", steps=4, controlnets=()))
    assert (resolved.aspect, resolved.steps, resolved.controlnets) == ("1:1", 4, ())
    assert check_request(GenerationRequest(prompts=("{instance} {class}",))).steps == 25
    assert GenerationRequest().sampler == "euler"


@pytest.mark.parametrize(
    ("aspect", "resolution", "size"),
    [
        ("1:1", 512, (512, 512)),
        ("9:16", 512, (512, 912)),
        ("4:5", 512, (512, 640)),
        ("1:1", 128, (128, 128)),
        ("9:16", 128, (128, 224)),
        ("4:5", 128, (128, 160)),
    ],
)
def test_aspect_sizes(aspect, resolution, size):
    assert aspect_size(aspect, resolution) == size


def test_styles_and_checks_do_not_import_torch():
    code = (
        "import sys; from pipelines.generation import check_request, GenerationRequest, list_styles;"
        "check_request(GenerationRequest(style='anime')); list_styles();"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
