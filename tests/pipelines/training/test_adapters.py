"""The adapter artifact: save, reload through diffusers, attach/detach on a warm pipeline, kohya export."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.adapters import (
    AdapterManifest,
    LoraSpec,
    adapter_attached,
    attach_adapter,
    detach_adapter,
    export_kohya,
    load_manifest,
    save_adapter,
    token_embedding_files,
)
from pipelines.errors import InvalidConfig

PROMPT = "a photo of <subj> girl"
SPEC = LoraSpec(unet_rank=4, text_encoder_rank=2, alpha=2.0)


def load_pipe(preset):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(preset.base_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def manifest(preset, mode="lora", **kw):
    return AdapterManifest(mode=mode, base_model=preset.base_model, instance_token="<subj>", class_token="girl",
                           tokens=("<subj>", "<bg0>"), lora=SPEC if mode == "lora" else None, **kw)


def token_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"<subj>": torch.randn(32, generator=g), "<bg0>": torch.randn(32, generator=g)}


@pytest.fixture(scope="module")
def base_pipe(tiny_preset):
    return load_pipe(tiny_preset)


@pytest.fixture(scope="module")
def lora_adapter(tiny_preset, tmp_path_factory):
    """An adapter with non-zero LoRA weights, made with peft directly (independent of the trainer)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = load_pipe(tiny_preset)
    donor.unet.add_adapter(LoraConfig(**SPEC.peft_kwargs("unet")))
    donor.text_encoder.add_adapter(LoraConfig(**SPEC.peft_kwargs("text_encoder")))
    torch.manual_seed(0)
    for module in (donor.unet, donor.text_encoder):
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.data.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("adapter") / "subject-1"
    save_adapter(folder, manifest(tiny_preset, steps=7), unet_lora=get_peft_model_state_dict(donor.unet),
                 text_encoder_lora=get_peft_model_state_dict(donor.text_encoder), token_embeddings=token_rows())
    return folder


def snapshot(pipe):
    return {
        "vocab": dict(pipe.tokenizer.get_vocab()),
        "unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()},
        "text_encoder": {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()},
    }


def assert_same_base(pipe, before):
    after = snapshot(pipe)
    assert after["vocab"] == before["vocab"]
    for part in ("unet", "text_encoder"):
        assert after[part].keys() == before[part].keys(), f"{part} has leftover (LoRA) parameters"
        assert all(torch.equal(after[part][k], before[part][k]) for k in before[part]), part


def test_manifest_round_trips_through_json(tiny_preset, lora_adapter):
    loaded = load_manifest(lora_adapter)
    assert loaded.tokens == ("<subj>", "<bg0>")
    assert loaded.lora == SPEC and loaded.steps == 7 and loaded.components == ("unet", "text_encoder")
    assert AdapterManifest.from_json(loaded.to_json()) == loaded
    data = json.loads((lora_adapter / "manifest.json").read_text())
    assert data["format"] == "likeness-adapter" and data["version"] == 1 and data["mode"] == "lora"
    # safetensors only: no pickles anywhere in the folder
    assert not [p for p in lora_adapter.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]


def test_save_refuses_to_write_nothing(tiny_preset, tmp_path):
    m = AdapterManifest(mode="lora", base_model="x", instance_token="<s>", class_token="man", tokens=("<s>",))
    with pytest.raises(InvalidConfig):
        save_adapter(tmp_path / "empty", m, token_embeddings={})
    assert not (tmp_path / "empty").exists()


def test_attach_generate_detach_restores_base_bit_for_bit(base_pipe, lora_adapter):
    before = snapshot(base_pipe)
    base_image = generate(base_pipe)
    attached = attach_adapter(base_pipe, lora_adapter)
    assert "<subj>" in base_pipe.tokenizer.get_vocab()
    adapted = generate(base_pipe)
    assert not torch.allclose(adapted, base_image), "the adapter should change the image"
    detach_adapter(base_pipe, attached)
    assert torch.equal(generate(base_pipe), base_image)
    assert_same_base(base_pipe, before)
    assert "<subj>" not in base_pipe.tokenizer.get_vocab()
    # twice in a row gives the same adapted image (nothing accumulates between subjects)
    with adapter_attached(base_pipe, lora_adapter, adapter_name="again"):
        assert torch.equal(generate(base_pipe), adapted)
    assert_same_base(base_pipe, before)


def test_attached_output_matches_plain_diffusers_loading(tiny_preset, base_pipe, lora_adapter):
    with adapter_attached(base_pipe, lora_adapter):
        attached_image = generate(base_pipe)
    fresh = load_pipe(tiny_preset)
    fresh.load_lora_weights(str(lora_adapter))
    files, tokens = token_embedding_files(lora_adapter)
    fresh.load_textual_inversion(files, token=tokens)
    assert torch.allclose(generate(fresh), attached_image, atol=1e-6)


def test_kohya_export_loads_back_with_same_output(tiny_preset, base_pipe, lora_adapter, tmp_path):
    from safetensors.torch import load_file

    out = export_kohya(lora_adapter, tmp_path / "kohya")
    keys = load_file(str(out.lora)).keys()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(float(v) == 2.0 for k, v in load_file(str(out.lora)).items() if k.endswith(".alpha"))
    # one A1111 embedding per token (SD 1.5: emb_params), named so that the prompt can call it
    assert out.lora.name == "likeness.safetensors"
    assert [p.name for p in out.embeddings.values()] == ["likeness-subj.safetensors", "likeness-bg0.safetensors"]
    assert load_file(str(out.embeddings["<subj>"]))["emb_params"].shape == (1, 32)
    assert "<lora:likeness:1> a portrait photo of likeness-subj girl" in out.readme.read_text()

    with adapter_attached(base_pipe, lora_adapter):
        native = generate(base_pipe)
    kohya = load_pipe(tiny_preset)
    kohya.load_lora_weights(str(out.lora))
    kohya.load_textual_inversion([str(p) for p in out.embeddings.values()], token=list(out.embeddings))
    assert torch.allclose(generate(kohya), native, atol=1e-5)


def test_full_mode_swaps_components_and_restores_them(tiny_preset, base_pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    changed = UNet2DConditionModel.from_pretrained(tiny_preset.base_model, subfolder="unet")
    with torch.no_grad():
        changed.conv_out.weight.mul_(-1.0)
    folder = save_adapter(tmp_path / "full", manifest(tiny_preset, mode="full"), token_embeddings=token_rows(1),
                          full_components={"unet": changed})
    assert (folder / "unet").is_dir() and not (folder / "text_encoder").exists()
    assert not (folder / "pytorch_lora_weights.safetensors").exists()

    before = snapshot(base_pipe)
    original_unet = base_pipe.unet
    base_image = generate(base_pipe)
    with adapter_attached(base_pipe, folder):
        assert base_pipe.unet is not original_unet
        assert not torch.allclose(generate(base_pipe), base_image)
    assert base_pipe.unet is original_unet
    assert torch.equal(generate(base_pipe), base_image)
    assert_same_base(base_pipe, before)


def test_attach_refuses_tokens_already_in_vocabulary(base_pipe, lora_adapter):
    before = snapshot(base_pipe)
    with adapter_attached(base_pipe, lora_adapter, adapter_name="first"), \
            pytest.raises(InvalidConfig, match="already in the vocabulary"):
        attach_adapter(base_pipe, lora_adapter, adapter_name="second")
    assert_same_base(base_pipe, before)
