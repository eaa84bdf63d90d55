"""The ``tiny-sdxl`` preset: SDXL's layout at toy size, built locally and deterministically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipelines.models.family import SDXL
from pipelines.models.presets import SDXL as SDXL_PRESET
from pipelines.models.presets import get_preset


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_sdxl_has_sdxl_layout(tiny_sdxl_preset):
    preset = tiny_sdxl_preset
    assert preset.family is SDXL
    root = Path(preset.base_model)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == SDXL.text_to_image
    for slot in SDXL.text_encoders:
        assert slot.encoder in index and slot.tokenizer in index
    unet = json.loads((root / "unet" / "config.json").read_text())
    first = json.loads((root / "text_encoder" / "config.json").read_text())
    second = json.loads((root / "text_encoder_2" / "config.json").read_text())
    assert second["architectures"] == ["CLIPTextModelWithProjection"]
    assert unet["addition_embed_type"] == "text_time"
    # the U-Net attends to both encoders' hidden states side by side and embeds pooled text + 6 size numbers
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == second["projection_dim"] + 6 * unet[
        "addition_time_embed_dim"]
    for kind in ("pose", "depth", "canny"):
        net = json.loads((Path(preset.controlnets[kind]) / "config.json").read_text())
        assert net["addition_embed_type"] == "text_time" and net["cross_attention_dim"] == unet["cross_attention_dim"]
    # tokenizers carry CLIP's real vocabulary; the second pads with "!" as SDXL's does
    assert json.loads((root / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert (root / "tokenizer" / "vocab.json").read_bytes() == (root / "tokenizer_2" / "vocab.json").read_bytes()
    # intake crops at SDXL's native 1024 scaled like the tiny preset's 128 px (SD 1.5's 512 -> 128)
    assert preset.intake_crop_size == 256 and SDXL_PRESET.intake_crop_size == 1024


def test_tiny_sdxl_builds_bit_identically(tmp_path, tiny_sdxl_preset):
    from pipelines.models import tiny_sdxl

    tiny_sdxl.build_stable_diffusion_xl(tmp_path / "sdxl")
    tiny_sdxl.build_controlnet(tmp_path / "controlnet_pose", seed_offset=0)
    assert _digest(tmp_path / "sdxl") == _digest(Path(tiny_sdxl_preset.base_model))
    assert _digest(tmp_path / "controlnet_pose") == _digest(Path(tiny_sdxl_preset.controlnets["pose"]))


def test_models_check_and_pull_build_tiny_sdxl(tmp_path):
    from worker.weights import check, pull

    assert check("tiny-sdxl", tmp_path) != []  # nothing built yet: it says what is missing
    pull("tiny-sdxl", tmp_path)
    assert check("tiny-sdxl", tmp_path) == []
    assert check("tiny", tmp_path) == []  # it shares tiny's CLIP, aesthetic head and upscalers


def test_sdxl_preset_names_sdxl_weights():
    from worker.weights import references

    refs = references(get_preset("sdxl"))
    assert "stabilityai/stable-diffusion-xl-base-1.0" in refs and "madebyollin/sdxl-vae-fp16-fix" in refs
    assert SDXL_PRESET.family is SDXL and set(SDXL_PRESET.controlnets) == {"pose", "depth", "canny"}


@pytest.mark.parametrize("name, fetched", [
    ("unet/diffusion_pytorch_model.safetensors", True),
    ("text_encoder_2/model.safetensors", True),
    ("text_encoder_2/model-00001-of-00002.safetensors", True),
    ("unet/diffusion_pytorch_model.fp16.safetensors", False),
    ("sd_xl_base_1.0.safetensors", False),
    ("diffusion_pytorch_model_twins.safetensors", False),
    ("unet/config.json", True),
])
def test_pull_fetches_only_what_loaders_read(name, fetched):
    from fnmatch import fnmatch

    from worker.weights import ALLOW_PATTERNS

    assert any(fnmatch(name, pattern) for pattern in ALLOW_PATTERNS) is fetched
