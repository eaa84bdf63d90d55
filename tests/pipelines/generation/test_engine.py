"""The warm engine: reproducible seeds, clean adapter swaps, ControlNet, sizes, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.errors import Canceled, InvalidConfig, ModelNotFound
from pipelines.generation import ControlNetSpec, GenerationSpec, aspect_size
from pipelines.generation.styles import get_style

# Few steps, no CFG unless a test needs it: the tiny models are random, only the plumbing matters.
FAST = {
    "prompts": ("a photo of {instance} {class}",),
    "steps": 2,
    "guidance_scale": 1.0,
    "upscale": None,
    "controlnets": (),
}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def generate_one(engine, adapter=None, seed=3, **changes):
    request = GenerationSpec(**{**FAST, "n": 1, "k": 1, "seed": seed, **changes})
    (result,) = engine.generate(request, adapter)
    return result


def base_state(pipe) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    state |= {f"text_encoder.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    return state


def test_same_seed_and_adapter_give_the_same_image(engine, adapters):
    first = generate_one(engine, adapters["a"], seed=11)
    again = generate_one(engine, adapters["a"], seed=11)
    other_seed = generate_one(engine, adapters["a"], seed=12)
    assert "<subj_a> girl" in first.prompt
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert not np.array_equal(pixels(first.image), pixels(other_seed.image))


def test_any_candidate_is_reproducible_alone(engine):
    request = GenerationSpec(**{**FAST, "n": 3, "k": 3, "seed": 40})
    batch = {r.seed: r.image for r in engine.generate(request)}
    alone = generate_one(engine, seed=42)
    # Batched and single matmuls may round differently in the last bit: at most one grey level.
    assert np.abs(pixels(batch[42]) - pixels(alone.image)).max() <= 1


def test_adapter_attach_detach_leaves_the_base_bit_for_bit(engine, adapters):
    before_image = generate_one(engine)
    before_state = base_state(engine.pipe)
    vocab = len(engine.pipe.tokenizer)
    with_adapter = generate_one(engine, adapters["a"])
    after_image = generate_one(engine)
    assert not np.array_equal(pixels(with_adapter.image), pixels(before_image.image))
    assert np.array_equal(pixels(after_image.image), pixels(before_image.image))
    after_state = base_state(engine.pipe)
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert len(engine.pipe.tokenizer) == vocab


@pytest.mark.slow
def test_two_subjects_in_turn_do_not_leak(engine, adapters, fast_preset):
    from pipelines.generation import GenerationEngine
    from tests.pipelines.generation.conftest import load_test_models

    generate_one(engine, adapters["a"], seed=5)
    b_after_a = generate_one(engine, adapters["b"], seed=5)
    fresh = GenerationEngine(fast_preset, load_test_models(fast_preset))
    b_fresh = generate_one(fresh, adapters["b"], seed=5)
    assert "<subj_b>" in b_after_a.prompt and "<subj_a>" not in b_after_a.prompt
    assert np.array_equal(pixels(b_after_a.image), pixels(b_fresh.image))


def test_aspect_sizes_are_exact(engine):
    # Short side = the preset's resolution (64 here), long side rounded to a multiple of 8.
    assert generate_one(engine, aspect="9:16", steps=1).image.size == aspect_size("9:16", 64) == (64, 112)
    assert generate_one(engine, aspect="4:5", steps=1).image.size == aspect_size("4:5", 64) == (64, 80)


def test_controlnet_changes_output_and_scale_zero_equals_none(trained_controlnets):
    engine = trained_controlnets
    pose = ControlNetSpec(kind="pose", template="astronaut_portrait.jpg", scale=1.0)
    plain = generate_one(engine, controlnets=())
    posed = generate_one(engine, controlnets=(pose,))
    zero = generate_one(engine, controlnets=(pose.model_copy(update={"scale": 0.0}),))
    assert np.abs(pixels(posed.image) - pixels(plain.image)).mean() > 1.0
    assert np.abs(pixels(zero.image) - pixels(plain.image)).max() <= 1


def test_two_controlnets_with_their_own_scales(trained_controlnets):
    engine = trained_controlnets
    from PIL import Image

    depth_map = Image.linear_gradient("L").convert("RGB")  # a client-supplied depth map
    pose = ControlNetSpec(kind="pose", template="astronaut_portrait.jpg", scale=1.0)
    depth = ControlNetSpec(kind="depth", image=depth_map, preprocessed=True, scale=1.0)
    pose_only = generate_one(engine, controlnets=(pose,))
    both = generate_one(engine, controlnets=(pose, depth))
    depth_off = generate_one(engine, controlnets=(pose, depth.model_copy(update={"scale": 0.0})))
    assert np.abs(pixels(both.image) - pixels(pose_only.image)).mean() > 1.0
    assert np.abs(pixels(depth_off.image) - pixels(pose_only.image)).max() <= 1


def test_depth_from_a_photo_needs_the_optional_annotator(engine, astronaut):
    spec = ControlNetSpec(kind="depth", image=astronaut)
    with pytest.raises(InvalidConfig) as err:
        generate_one(engine, controlnets=(spec,))
    assert err.value.error_code == "depth_annotator_unavailable"


def test_progress_covers_every_stage_and_results_are_ranked(engine):
    events = []
    flagged_first = lambda images: [i == 0 for i in range(len(images))]
    engine.models.safety_checker, previous = flagged_first, engine.models.safety_checker
    try:
        request = GenerationSpec(**{**FAST, "n": 3, "k": 2, "upscale": 2, "safety_checker": True})
        results = engine.generate(request, on_progress=events.append)
    finally:
        engine.models.safety_checker = previous
    assert [r.rank for r in results] == [1, 2]
    assert all(r.upscaled.size == (128, 128) and r.image.size == (64, 64) for r in results)
    assert results[0].scores["combined"] >= results[1].scores["combined"]
    assert {"aesthetic", "identity", "text"} <= results[0].scores.keys()
    assert results[0].scores["identity"] is None  # no face embedder: "not available", not a guess
    # Flags come back per image; a flagged image is kept as generated, not blacked out.
    assert [r.flagged for r in results] == [r.seed == 0 for r in results]
    assert all(pixels(r.image).max() > 0 for r in results)

    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["generating", "ranking", "upscaling"]
    for stage in order:
        fractions = [e.fraction for e in events if e.stage == stage]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_cancel_stops_generation_and_detaches(engine, adapters):
    events = []
    vocab = len(engine.pipe.tokenizer)
    checks = []

    def stop_after_first_step() -> bool:  # progress events are throttled, so count the checks instead
        checks.append(1)
        return len(checks) > 2

    request = GenerationSpec(**{**FAST, "n": 4, "k": 1, "steps": 4, "batch_size": 2})
    with pytest.raises(Canceled):
        engine.generate(request, adapters["a"], on_progress=events.append, should_stop=stop_after_first_step)
    assert len(checks) == 3  # stopped at the first check that asked, no later one
    assert max(e.fraction for e in events) < 0.5
    assert len(engine.pipe.tokenizer) == vocab


def test_samplers_are_selectable(engine):
    expected = {
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "ddim": "DDIMScheduler",
    }
    for name, scheduler in expected.items():
        spec = GenerationSpec(**{**FAST, "sampler": name})
        pipe, _ = engine.pipeline("text_to_image", spec)
        assert type(pipe.scheduler).__name__ == scheduler
    assert type(engine.pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the base keeps its own

    images = {name: pixels(generate_one(engine, sampler=name, steps=4).image) for name in expected}
    assert np.abs(images["euler_a"] - images["euler"]).mean() > 1.0
    assert np.abs(images["dpmpp_2m"] - images["euler"]).mean() > 0.5
    # Deterministic DDIM is Euler on the same ODE (Karras et al. 2022): it may match to the pixel.
    assert np.abs(images["ddim"] - images["euler"]).mean() < 1.0
    assert np.array_equal(images["euler_a"], pixels(generate_one(engine, sampler="euler_a", steps=4).image))


def test_improved_vae_is_swapped_in_only_when_asked(engine):
    improved = generate_one(engine)
    default = generate_one(engine, use_improved_vae=False)
    assert not np.array_equal(pixels(improved.image), pixels(default.image))
    assert engine.pipe.vae is not engine.models.improved_vae  # the base pipeline keeps its own VAE


def test_a_style_candidate_is_reproducible_alone_with_its_prompt(engine):
    style = {
        "style": "oil_painting",
        "prompts": get_style("oil_painting").prompts,
        "steps": 1,
        "guidance_scale": 1.0,
        "upscale": None,
        "controlnets": (),
        "aspect": "1:1",
    }
    batch = engine.generate(GenerationSpec(**style, n=2, k=2, seed=20))
    second = next(r for r in batch if r.seed == 21)
    (alone,) = engine.generate(GenerationSpec(**style, n=1, k=1, seed=21))
    assert alone.prompt == second.prompt
    assert {r.prompt for r in batch} == {
        (
            "oil painting portrait of person, visible brush strokes, canvas texture, "
            "rembrandt lighting, masterpiece"
        ),
        ("classical oil on canvas portrait of person, dark background, warm palette, detailed"),
    }
    assert np.abs(pixels(alone.image) - pixels(second.image)).max() <= 1


@pytest.mark.slow
def test_a_trained_adapter_generates_reproducibly_and_detaches(engine, trained_adapter):
    base = generate_one(engine, seed=9)
    first = generate_one(engine, trained_adapter, seed=9)
    again = generate_one(engine, trained_adapter, seed=9)
    assert first.prompt == "a photo of <subj> girl"
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert np.array_equal(pixels(generate_one(engine, seed=9).image), pixels(base.image))


def test_a_request_names_only_the_models_it_needs(fast_preset):
    from pipelines.generation import generation_models

    def whats(request=None):
        return {spec.key.what for spec in generation_models(fast_preset, "cpu", request=request).specs()}

    ranking = {"clip", "aesthetic", "face_detector", "face_embedder"}
    plain = GenerationSpec(**{**FAST, "use_improved_vae": False})
    assert whats(plain) == {"base"} | ranking
    posed = GenerationSpec(
        **{**FAST, "upscale": 4, "controlnets": (ControlNetSpec(kind="pose", template="astronaut_portrait.jpg"),)}
    )
    assert whats(posed) == {"base", "vae", "upscaler", "controlnet:pose", "pose_estimator"} | ranking
    assert whats() >= {"controlnet:pose", "controlnet:depth", "upscaler", "vae", "pose_estimator"}
    # One dtype for the base and what runs inside it; keys of everything are distinct.
    specs = generation_models(fast_preset, "cpu", torch.bfloat16, request=posed).specs()
    assert {s.key.dtype for s in specs if s.key.what in ("base", "vae", "controlnet:pose")} == {"bfloat16"}
    no_such_net = GenerationSpec(**{**FAST, "controlnets": (ControlNetSpec(kind="seg", template="x.jpg"),)})
    with pytest.raises(ModelNotFound):  # before anything loads
        generation_models(fast_preset, "cpu", request=no_such_net)
