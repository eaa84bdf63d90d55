"""What a generation delivers: never an empty success."""

from __future__ import annotations

import pytest


def test_a_generation_whose_candidates_all_fail_the_one_face_rule_fails_clearly(tiny_preset):
    """With the delivery rule on (as on real models), noise candidates show no face: the job must fail
    with ``no_deliverable_image`` and say how many candidates were dropped and why."""
    from pipelines.generation import GenerationEngine, GenerationSpec
    from pipelines.models.presets import with_overrides
    from worker.phases import NoDeliverableImage, deliverable_results

    spec = GenerationSpec(prompts=("a photo of {instance} {class}",), n=3, k=2, steps=2, guidance_scale=1.0,
                          upscale=None)
    preset = with_overrides(tiny_preset, resolution=64, require_one_face=True)
    engine = GenerationEngine.load(preset, "cpu", request=spec)
    results = engine.generate(spec, return_all=True)
    assert len(results) == 3 and all(r.rank == 0 and r.faces == 0 for r in results)
    with pytest.raises(NoDeliverableImage) as err:
        deliverable_results(results)
    assert err.value.error_code == "no_deliverable_image"
    assert err.value.details == {"candidates": 3, "dropped": {"no_face": 3}}
    assert "3 no_face" in err.value.message
