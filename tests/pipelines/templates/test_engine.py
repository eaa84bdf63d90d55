"""Template mode on the tiny preset (random weights, real detectors): compositing invariants, the adapter
lent and given back, cancel, progress, seeds, and which models a request names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.errors import Canceled, ModelNotFound
from pipelines.templates.engine import changed_pixels, template_models
from pipelines.templates.spec import TemplateSpec

# Few steps, no CFG: the tiny models are random, only the plumbing matters.
FAST = {"template": "id_photo", "prompt": "{instance} {class}, passport photo", "steps": 4, "strength": 0.5,
        "guidance_scale": 1.0, "upscale": None}


def spec(**changes) -> TemplateSpec:
    return TemplateSpec(**{**FAST, "n": 1, "k": 1, **changes})


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_outside_the_mask_every_pixel_is_the_templates_and_inside_it_changed(template_engine, prepared, id_photo):
    """Both passes (face and hair, then the face alone), two candidates, colour transfer on: the result
    has the template's size, its pixels outside the mask are bit-identical to the template, the masked
    region changed; the stages run in order with monotonic progress."""
    events = []
    results = template_engine.run(spec(n=2, k=2, second_pass=True, second_pass_strength=0.5), prepared,
                                  on_progress=events.append, return_all=True)
    mask = prepared.region.mask
    assert [r.rank for r in results] == [1, 2]
    for result in results:
        assert result.image.size == id_photo.size and result.style == "template:id_photo"
        changed = changed_pixels(id_photo, result.image)
        assert not changed[mask == 0].any()
        inside = mask > 0.5
        assert np.abs(pixels(result.image)[inside] - pixels(id_photo)[inside]).mean() > 10
    assert not np.array_equal(pixels(results[0].image), pixels(results[1].image))  # seeds differ
    stages = list(dict.fromkeys(str(e.stage) for e in events))
    assert stages == ["generating", "ranking"]
    for stage in stages:
        fractions = [e.fraction for e in events if e.stage == stage]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_inpainted_region_is_placed_on_the_templates_face(template_engine, prepared, id_photo):
    """On the tiny preset the inpainted face is noise (no detector finds a face in it), so placement is
    checked on the compositing geometry: what changed covers the template's face box, its centre is
    the face's, and nothing changed outside the mask's box."""
    (result,) = template_engine.run(spec(), prepared)
    ys, xs = np.nonzero(changed_pixels(id_photo, result.image))
    face, mask_box = prepared.face, prepared.region.mask_box
    assert xs.min() <= face.x0 and xs.max() >= face.x1 - 1 and ys.max() >= face.y1 - 1
    assert xs.min() >= mask_box.x0 and xs.max() < mask_box.x1 and ys.min() >= mask_box.y0 and ys.max() < mask_box.y1
    assert abs((xs.min() + xs.max()) / 2 - face.center[0]) < 0.15 * face.width


def test_any_candidate_is_reproducible_alone(template_engine, prepared):
    batch = {r.seed: r.image for r in template_engine.run(spec(n=3, k=3, seed=20), prepared)}
    (alone,) = template_engine.run(spec(seed=22), prepared)
    # Batched and single matmuls may round differently in the last bit; colour transfer and the resize
    # back to template pixels can turn one grey level at model resolution into two.
    difference = np.abs(pixels(batch[22]) - pixels(alone.image))
    assert difference.max() <= 2 and difference.mean() < 0.05
    assert np.abs(pixels(batch[21]) - pixels(alone.image)).mean() > 1  # another seed is another image


def base_state(pipe) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    return state | {f"text_encoder.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}


def test_the_adapter_is_detached_afterwards(template_engine, prepared, adapter):
    """The subject's adapter changes the result while attached; afterwards the base is bit-for-bit the
    same (weights, vocabulary) and gives the same template result as before."""
    before_image = template_engine.run(spec(seed=5), prepared)[0].image
    before_state, vocab = base_state(template_engine.pipe), len(template_engine.pipe.tokenizer)
    with_adapter = template_engine.run(spec(seed=5), prepared, adapter)[0]
    after_image = template_engine.run(spec(seed=5), prepared)[0].image
    assert "<subj> girl, passport photo" == with_adapter.prompt
    assert not np.array_equal(pixels(with_adapter.image), pixels(before_image))
    assert np.array_equal(pixels(after_image), pixels(before_image))
    after_state = base_state(template_engine.pipe)
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert len(template_engine.pipe.tokenizer) == vocab


def test_cancel_stops_within_one_denoising_step_and_detaches(template_engine, prepared, adapter):
    """The stop flag raised while a denoising step runs ends the job at that step's end: no further U-Net
    call, whatever the number of steps or candidates left."""
    calls = []
    hook = template_engine.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    vocab = len(template_engine.pipe.tokenizer)
    try:
        with pytest.raises(Canceled):
            template_engine.run(spec(n=4, k=1, steps=8, batch_size=2), prepared, adapter,
                                should_stop=lambda: len(calls) >= 2)
    finally:
        hook.remove()
    assert len(calls) == 2  # asked during step 2 (of 4 per batch, 2 batches): stopped right after it
    assert len(template_engine.pipe.tokenizer) == vocab


def test_a_request_names_only_the_models_it_needs(template_preset):
    from pipelines.models.presets import with_overrides

    full = {s.key.what for s in template_models(template_preset, "cpu").specs()}
    assert {"base", "controlnet:pose", "controlnet:canny", "face_detector", "person_detector", "segmenter",
            "pose_estimator", "clip", "upscaler"} <= full
    lean = template_models(template_preset, "cpu", spec=spec(pose_scale=0.0, use_improved_vae=False))
    names = {s.key.what for s in lean.specs()}
    assert "controlnet:canny" in names and "controlnet:pose" not in names
    assert "upscaler" not in names and "vae" not in names
    no_canny = with_overrides(template_preset, controlnets={"pose": template_preset.controlnets["pose"]})
    with pytest.raises(ModelNotFound) as err:
        template_models(no_canny, "cpu", spec=spec())
    assert err.value.details == {"kinds": ["canny"]}
