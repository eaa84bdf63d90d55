"""Fixtures for generation tests: a warm tiny engine and real adapter folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.vision.faces import FaceBox


class WholeImageFace:
    """Random-weight models draw noise, never a face: tests of the generation flow (not of
    the face rule, which tests/…/test_ranking.py checks with the real detector) treat the
    whole image as one face so candidates are deliverable."""

    name = "whole-image"

    def detect(self, rgb, min_score):
        height, width = rgb.shape[:2]
        return [FaceBox(0, 0, width, height, 1.0)]


@pytest.fixture(scope="session")
def fast_preset(tiny_preset):
    """The tiny models generating at 64 px (a quarter of the pixels of 128): same code paths."""
    from pipelines.models.presets import with_overrides

    return with_overrides(tiny_preset, resolution=64)


def load_test_models(preset):
    """Every model of ``preset`` on the CPU, with the whole-image face stand-in and no identity."""
    from pipelines.generation import generation_models

    models = generation_models(preset, "cpu", identity_backend="none").load()
    models.ranking.face_detector = WholeImageFace()
    return models


@pytest.fixture(scope="session")
def engine(fast_preset):
    from pipelines.generation import GenerationEngine

    return GenerationEngine(fast_preset, load_test_models(fast_preset))


def build_lora_adapter(folder: Path, preset, instance_token: str, seed: int) -> Path:
    """A LoRA adapter in the project's format for ``preset``'s model family: random (non-zero) U-Net
    LoRA, LoRA on every text encoder of the family and a random instance-token embedding in each,
    written by ``save_adapter``."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    from pipelines.adapters import AdapterManifest, LoraSpec, save_adapter

    spec = LoraSpec(unet_rank=4, text_encoder_rank=4)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(preset.base_model, subfolder="unet")
    unet.add_adapter(LoraConfig(**spec.peft_kwargs("unet"), init_lora_weights=False))
    encoder_loras, hidden = {}, {}
    for name in preset.family.encoder_names:
        text_encoder = CLIPTextModel.from_pretrained(preset.base_model, subfolder=name)
        text_encoder.add_adapter(LoraConfig(**spec.peft_kwargs("text_encoder"), init_lora_weights=False))
        encoder_loras[name] = get_peft_model_state_dict(text_encoder)
        hidden[name] = text_encoder.config.hidden_size
    manifest = AdapterManifest(
        mode="lora",
        base_model=preset.base_model,
        instance_token=instance_token,
        class_token="girl",
        tokens=(instance_token,),
        family=preset.family.name,
        lora=spec,
    )
    return save_adapter(
        folder,
        manifest,
        unet_lora=get_peft_model_state_dict(unet),
        text_encoder_lora=encoder_loras,
        token_embeddings={instance_token: {name: torch.randn(width) for name, width in hidden.items()}},
    )


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_preset) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": build_lora_adapter(root / "subject_a", tiny_preset, "<subj_a>", seed=1),
        "b": build_lora_adapter(root / "subject_b", tiny_preset, "<subj_b>", seed=2),
    }


@pytest.fixture(scope="session")
def trained_controlnets(engine):
    """The tiny ControlNets are freshly initialised, so their zero convolutions are zero and
    they cannot change anything; give those convolutions weights, as training would."""
    generator = torch.Generator().manual_seed(0)
    for kind in ("pose", "depth"):
        net = engine.controlnet(kind)
        with torch.no_grad():
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    return engine


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_preset, astronaut, grace_hopper) -> Path:
    """An adapter made by the real trainer (a few steps at 32 px), as a subject's job would."""
    from pipelines.models.presets import with_overrides
    from pipelines.training import TrainConfig, train
    from pipelines.types import TokenSpec, TrainingExample

    examples = [
        TrainingExample(astronaut, "<bg0> <subj> girl", photo_id="a"),
        TrainingExample(grace_hopper, "<bg1> <subj> girl", photo_id="g"),
    ]
    config = TrainConfig(max_train_steps=4, unet_rank=4, text_encoder_rank=4)
    result = train(
        examples,
        TokenSpec("<subj>", "girl", ("<bg0>", "<bg1>")),
        config,
        with_overrides(tiny_preset, resolution=32),
        tmp_path_factory.mktemp("trained"),
        device="cpu",
    )
    return result.adapter_dir
