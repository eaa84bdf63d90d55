"""The manager with the real (tiny) pipeline models: one CLIP and one base per worker, lent unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.generation import GenerationEngine, GenerationSpec, generation_models
from pipelines.intake import IntakeConfig, intake_models, prepare_dataset
from pipelines.models.loading import base_spec, default_dtype
from pipelines.models.presets import with_overrides
from pipelines.ranking import rank, ranking_models
from tests.conftest import noise_image
from worker.models import ModelManager, WorkerState

FAST = {"prompts": ("a photo of {instance} {class}",), "steps": 2, "guidance_scale": 1.0, "controlnets": ()}


@pytest.fixture(scope="module")
def preset(tiny_preset):
    return with_overrides(tiny_preset, resolution=64)


@pytest.fixture(scope="module")
def manager():
    return ModelManager(budget_bytes=None, name="test-worker")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_preset):
    from tests.pipelines.generation.conftest import build_lora_adapter

    return build_lora_adapter(tmp_path_factory.mktemp("adapter") / "subject", tiny_preset, "<subj>", seed=3)


def base_state(pipe) -> dict:
    """Everything of the base that a borrower could leave changed."""
    state = {}
    for name in ("unet", "text_encoder", "vae"):
        state |= {f"{name}.{k}": v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()}
    return {
        "tensors": state,
        "vocab": len(pipe.tokenizer),
        "tokenizer": pipe.tokenizer,
        "processors": {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()},
        "scheduler": (type(pipe.scheduler).__name__, dict(pipe.scheduler.config)),
        "vae_flags": (pipe.vae.use_tiling, pipe.vae.use_slicing),
        "modules": (pipe.unet, pipe.text_encoder, pipe.vae),
        "embedding_rows": pipe.text_encoder.get_input_embeddings().weight.shape[0],
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k in before["tensors"] if not torch.equal(before["tensors"][k], after["tensors"][k])]
    assert changed == []
    for key in ("vocab", "processors", "scheduler", "vae_flags", "embedding_rows"):
        assert after[key] == before[key], key
    assert after["tokenizer"] is before["tokenizer"]
    assert all(a is b for a, b in zip(after["modules"], before["modules"]))


def test_intake_ranking_and_generation_share_one_clip(manager, preset, astronaut, grace_hopper):
    from pipelines.intake.class_token import clip_class_scores

    config = IntakeConfig(clip_model=preset.clip, device="cpu")
    request = GenerationSpec(**FAST, n=2, k=1, upscale=2)
    with manager.borrow(intake_models(config)) as intake:
        scores = clip_class_scores([astronaut], config.class_candidates, intake.clip)
        intake_clip = intake.clip
    with manager.borrow(ranking_models(preset, "cpu")) as ranking:
        ranked = rank([noise_image(64)], ["a photo of girl"], [], 1, ranking, require_one_face=False)
        ranking_clip = ranking.clip
    with manager.borrow(generation_models(preset, "cpu", request=request)) as models:
        generation_clip = models.ranking.clip
        assert models.upscalers.keys() == {2} and models.controlnets == {}  # only what the request needs
    assert intake_clip is ranking_clip is generation_clip
    assert set(scores) == set(config.class_candidates) and len(ranked) == 1
    clips = [m for m in manager.loaded() if m["what"] == "clip"]
    assert len(clips) == 1 and clips[0]["borrows"] == 3
    # The face detector is shared as well; the detectors of intake are loaded once.
    assert len([m for m in manager.loaded() if m["what"] == "face_detector"]) == 1


def test_training_and_generation_share_one_base(manager, preset):
    spec = base_spec(preset, "cpu")
    assert spec.key.dtype == "float32" and default_dtype("cuda") == torch.bfloat16
    with manager.borrow(generation_models(preset, "cpu", request=GenerationSpec(**FAST, n=1, k=1))) as models:
        generation_base = models.base
    with manager.borrow(spec) as training_base:
        assert training_base is generation_base
    assert base_spec(preset, "cuda").key.dtype == "bfloat16"  # on a GPU both borrow the bf16 copy


def test_a_borrowed_base_comes_back_bit_for_bit_after_generating_with_an_adapter(manager, preset, adapter):
    request = GenerationSpec(**FAST, n=2, k=2, upscale=None, seed=7)
    states = []
    manager.subscribe(lambda old, new: states.append(new))
    with manager.borrow(generation_models(preset, "cpu", request=request)) as models:
        assert manager.state is WorkerState.BUSY
        before = base_state(models.base)
        engine = GenerationEngine(preset, models, vae_slicing=True, vae_tiling=True)
        plain = engine.generate(request)
        subject = engine.generate(request, adapter)
        assert all("<subj>" in r.prompt for r in subject)
        assert not np.array_equal(np.asarray(plain[0].image), np.asarray(subject[0].image))
        assert_unchanged(before, base_state(models.base))
        again = engine.generate(request)
        assert [np.asarray(r.image).tobytes() for r in again] == [np.asarray(r.image).tobytes() for r in plain]
    assert manager.state is WorkerState.IDLE and states[-1] is WorkerState.IDLE


def test_training_borrows_the_base_and_gives_it_back_unchanged(manager, preset, astronaut, grace_hopper, tmp_path):
    from pipelines.training import TrainConfig, train
    from pipelines.types import TokenSpec, TrainingExample

    small = with_overrides(preset, resolution=32)
    examples = [TrainingExample(astronaut, "<bg0> <subj> girl", photo_id="a"),
                TrainingExample(grace_hopper, "<bg1> <subj> girl", photo_id="g")]
    with manager.borrow(base_spec(small, "cpu")) as base:
        before = base_state(base)
        train(examples, TokenSpec("<subj>", "girl", ("<bg0>", "<bg1>")), TrainConfig(max_train_steps=2, unet_rank=4,
              text_encoder_rank=4), small, tmp_path, device="cpu", base=base)
        assert_unchanged(before, base_state(base))


def test_intake_runs_on_borrowed_models(manager, preset, astronaut):
    from pipelines.intake import PhotoInput
    from tests.conftest import encode
    from tests.pipelines.intake.conftest import person_variants

    config = IntakeConfig(clip_model=preset.clip, min_photos=1)
    photos = [PhotoInput(f"a{i}", encode(v)) for i, v in enumerate(person_variants(astronaut, 2))]
    with manager.borrow(intake_models(config)) as models:
        dataset = prepare_dataset(photos, config, models)
    assert [r.accepted for r in dataset.report] == [True, True]


def test_one_worker_holds_both_families_within_its_budget_and_evicts_the_least_recently_used(
        tiny_preset, tiny_sdxl_preset):
    sd15, sdxl = base_spec(tiny_preset, "cpu"), base_spec(tiny_sdxl_preset, "cpu")
    assert sd15.key != sdxl.key
    roomy = ModelManager(budget_bytes=None)
    with roomy.borrow(sd15) as first, roomy.borrow(sdxl) as second:
        assert type(first).__name__ == "StableDiffusionPipeline"
        assert type(second).__name__ == "StableDiffusionXLPipeline"
    assert sd15.key in roomy and sdxl.key in roomy  # both stay warm: no reload between families

    sizes = {entry["name"]: entry["bytes"] for entry in roomy.loaded()}
    tight = ModelManager(budget_bytes=max(sizes.values()) + 1)  # room for one base at a time
    with tight.borrow(sd15):
        pass
    with tight.borrow(sdxl):
        pass
    assert sdxl.key in tight and sd15.key not in tight  # the idle SD 1.5 base made room
    with tight.borrow(sd15):
        pass
    assert sd15.key in tight and sdxl.key not in tight
