"""SDXL through the same engine core: text-to-image with ControlNet, and a template job (inpainting +
ControlNet), on the random-weight ``tiny-sdxl`` preset. The pipeline classes and sizes come from the
family description; nothing here is SDXL-specific code in the engines."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.engine.job import Control
from pipelines.generation import ControlNetSpec, GenerationSpec
from tests.pipelines.generation.test_engine import FAST, base_state, pixels


@pytest.fixture(scope="module")
def sdxl_preset(tiny_sdxl_preset):
    """tiny-sdxl at 64 px (its U-Net halves twice: 64 is the smallest side whose 4:5 and 9:16 sizes stay whole)."""
    from pipelines.models.presets import with_overrides

    return with_overrides(tiny_sdxl_preset, resolution=64)


@pytest.fixture(scope="module")
def sdxl_engine(sdxl_preset):
    from pipelines.generation import GenerationEngine
    from tests.pipelines.generation.conftest import load_test_models

    return GenerationEngine(sdxl_preset, load_test_models(sdxl_preset))


@pytest.fixture(scope="module")
def sdxl_adapter(tmp_path_factory, tiny_sdxl_preset):
    from tests.pipelines.generation.conftest import build_lora_adapter

    return build_lora_adapter(tmp_path_factory.mktemp("sdxl-adapter") / "subject", tiny_sdxl_preset, "<subj>", seed=7)


def generate(engine, adapter=None, **changes):
    return engine.generate(GenerationSpec(**{**FAST, "n": 1, "k": 1, "seed": 3, **changes}), adapter)[0]


def test_sdxl_text_to_image_with_controlnet_uses_the_familys_pipeline_and_sizes(sdxl_engine, sdxl_adapter):
    pose = ControlNetSpec(kind="pose", template="astronaut_portrait.jpg", scale=1.0)
    spec = GenerationSpec(**{**FAST, "controlnets": (pose,)})
    plain, call = sdxl_engine.pipeline("text_to_image", spec)
    assert type(plain).__name__ == "StableDiffusionXLPipeline" and "text_encoder_2" in plain.components
    assert call == {}
    condition = sdxl_engine.condition(pose, 64, 64)
    posed_pipe, call = sdxl_engine.pipeline("text_to_image", spec, [Control("pose", condition, 0.7)])
    assert type(posed_pipe).__name__ == "StableDiffusionXLControlNetPipeline"
    assert call == {"image": condition, "controlnet_conditioning_scale": 0.7}
    # The family's sizes (SDXL's 1024x1024 and 768x1344, scaled to this preset's 64 px), not SD 1.5's rule.
    family = sdxl_engine.family
    assert family.sizes["9:16"] == (768, 1344)
    assert generate(sdxl_engine, sdxl_adapter, aspect="9:16").image.size == family.scaled_sizes(64)["9:16"]
    posed = generate(sdxl_engine, sdxl_adapter, controlnets=(pose,), upscale=2)
    assert posed.image.size == (64, 64) and posed.upscaled.size == (128, 128)
    assert "<subj> girl" in posed.prompt and posed.rank == 1
    # Face refinement re-renders with the family's image-to-image pipeline (SDXL's img2img here).
    assert type(sdxl_engine.pipeline("image_to_image", spec)[0]).__name__ == "StableDiffusionXLImg2ImgPipeline"
    refined = generate(sdxl_engine, sdxl_adapter, steps=4, face_refine=True)
    assert refined.face_refined and refined.image.size == (64, 64)


def test_sdxl_adapter_changes_the_image_reproducibly_and_detaches_bit_for_bit(sdxl_engine, sdxl_adapter):
    before = generate(sdxl_engine)
    state = base_state(sdxl_engine.pipe) | {
        f"text_encoder_2.{k}": v.clone() for k, v in sdxl_engine.pipe.text_encoder_2.state_dict().items()}
    vocab = (len(sdxl_engine.pipe.tokenizer), len(sdxl_engine.pipe.tokenizer_2))
    first = generate(sdxl_engine, sdxl_adapter)
    again = generate(sdxl_engine, sdxl_adapter)
    after = generate(sdxl_engine)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert not np.array_equal(pixels(first.image), pixels(before.image))
    assert np.array_equal(pixels(after.image), pixels(before.image))
    now = base_state(sdxl_engine.pipe) | {
        f"text_encoder_2.{k}": v for k, v in sdxl_engine.pipe.text_encoder_2.state_dict().items()}
    assert now.keys() == state.keys() and all(np.array_equal(now[k].numpy(), state[k].numpy()) for k in state)
    assert (len(sdxl_engine.pipe.tokenizer), len(sdxl_engine.pipe.tokenizer_2)) == vocab


def test_an_sdxl_template_job_inpaints_with_controlnets_and_keeps_the_rest(sdxl_preset, sdxl_engine, sdxl_adapter):
    from pipelines.templates.catalog import open_template
    from pipelines.templates.engine import TemplateEngine, changed_pixels, template_models
    from pipelines.templates.spec import TemplateSpec

    engine = TemplateEngine(sdxl_preset, template_models(sdxl_preset, "cpu", identity_backend="none").load())
    engine.models.ranking.face_detector = sdxl_engine.models.ranking.face_detector  # whole-image stand-in
    template = open_template("id_photo")
    prepared = engine.prepare(template)
    spec = TemplateSpec(template="id_photo", prompt="{instance} {class}, id photo", n=2, k=1, steps=4,
                        guidance_scale=1.0, upscale=2)
    engine.check_inputs(spec)
    pipe, call = engine.pipeline("inpaint", spec, engine._pass(spec, prepared, prepared.region, spec.strength).controls)
    assert type(pipe).__name__ == "StableDiffusionXLControlNetInpaintPipeline"
    assert len(call["control_image"]) == 2  # the template's pose and its edges
    (result,) = engine.run(spec, prepared, sdxl_adapter)
    assert result.image.size == template.size and result.upscaled.size == (2 * template.width, 2 * template.height)
    assert "<subj> girl" in result.prompt
    changed, mask = changed_pixels(template, result.image), prepared.region.mask
    assert not changed[mask == 0].any()  # outside the mask every pixel is the template's
    assert np.abs(pixels(result.image)[mask > 0.5] - pixels(template)[mask > 0.5]).mean() > 10
