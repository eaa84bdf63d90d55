"""The trainer and the adapter formats on SDXL's layout (the ``tiny-sdxl`` preset at 32 px, CPU).

The same trainer as SD 1.5: what differs (two text encoders, pooled text, size conditioning, the
A1111 names) comes from the family description, so these tests check what a user of SDXL notices:
tokens learned in both encoders, an adapter that plain diffusers and A1111-style loaders reproduce,
and a lent base handed back bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipelines.adapters import (
    adapter_attached,
    export_kohya,
    load_manifest,
    load_token_embeddings,
    load_tokens_with_diffusers,
)
from pipelines.models.family import SDXL
from pipelines.models.presets import with_overrides
from pipelines.training import TrainConfig, train
from pipelines.training import trainer as trainer_module
from pipelines.types import CropGeometry, TrainingExample
from tests.pipelines.training.helpers import TOKENS

pytestmark = pytest.mark.slow  # each test trains or renders on CPU: more than ~20 s on 2 cores

#: where intake cut the astronaut's crop: a 400 px square at (60, 20) of the 512 x 512 photo
ASTRONAUT_CROP = CropGeometry(photo_width=512, photo_height=512, left=60, top=20, side=400)


@pytest.fixture(scope="module")
def preset(tiny_sdxl_preset):
    return with_overrides(tiny_sdxl_preset, resolution=32)


@pytest.fixture(scope="module")
def examples(astronaut, grace_hopper):
    return [TrainingExample(astronaut, "<bg0> <subj> girl", photo_id="a", crop=ASTRONAUT_CROP),
            TrainingExample(grace_hopper, "<bg1> <subj> girl", photo_id="g")]


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{"max_train_steps": 4, "unet_rank": 4, "text_encoder_rank": 4, "progress_every": 2,
                          "unet_lr": 1e-2, "text_encoder_lr": 1e-2, "token_lr": 5e-2, **kw})


def load_pipe(preset):
    return trainer_module.load_base_pipeline(preset, torch.device("cpu"))


def generate(pipe, prompt="a photo of <subj> girl"):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(3)).images


def state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{n}": p.detach().clone() for name in ("unet", "text_encoder", "text_encoder_2")
            for n, p in getattr(pipe, name).state_dict().items()}


@pytest.fixture(scope="module")
def lora_run(examples, preset, tmp_path_factory):
    """A staged LoRA run on a lent base; the base's weights and tokenizers before and after."""
    base = load_pipe(preset)
    before, vocab = state(base), (len(base.tokenizer), len(base.tokenizer_2))
    seen = {}
    trainer = trainer_module.Trainer(examples, TOKENS, fast(), preset, tmp_path_factory.mktemp("lora"),
                                     device="cpu")
    original_setup = trainer.setup

    def setup_and_look():
        original_setup()
        seen["rows_init"] = {e.slot.encoder: e.rows_init.clone() for e in trainer.encoders}
        seen["time_ids"] = trainer.data.time_ids.clone()
        seen["face"] = {e.slot.encoder: e.embedding.base.weight[e.tokenizer("face", add_special_tokens=False)
                                                                ["input_ids"][0]].detach().clone()
                        for e in trainer.encoders}

    trainer.setup = setup_and_look
    result = trainer.run(base)
    return {"result": result, "base": base, "before": before, "vocab": vocab, **seen}


def test_staged_lora_trains_tokens_in_both_encoders_and_restores_the_base(lora_run, preset):
    result, base = lora_run["result"], lora_run["base"]
    manifest = load_manifest(result.adapter_dir)
    assert (manifest.family, manifest.preset) == ("sdxl", "tiny-sdxl")
    assert set(manifest.components) == {"unet", "text_encoder", "text_encoder_2"}  # stage 1 trains both encoders
    assert list(result.metrics["stages"]) == ["training:stage1", "training:stage2"]
    # the instance token starts as "face" in each encoder (pivotal tuning) and then moves in both
    rows = load_token_embeddings(result.adapter_dir)
    for encoder, width in (("text_encoder", 32), ("text_encoder_2", 40)):
        assert torch.equal(lora_run["rows_init"][encoder][0], lora_run["face"][encoder].float())
        assert rows["<subj>"][encoder].shape == (width,)
        assert not torch.allclose(rows["<subj>"][encoder], lora_run["rows_init"][encoder][0])
    # the lent base is handed back bit for bit: weights, vocabularies, no adapter layers
    after = state(base)
    assert after.keys() == lora_run["before"].keys()
    assert all(torch.equal(after[k], v) for k, v in lora_run["before"].items())
    assert (len(base.tokenizer), len(base.tokenizer_2)) == lora_run["vocab"]


def test_size_conditioning_comes_from_intakes_crop(lora_run):
    time_ids = lora_run["time_ids"]  # [original h, w, crop top, left, target h, w] per image (2 photos x flip)
    scale = 32 / 400
    assert time_ids[0].tolist() == [512, 512, round(20 * scale), round(60 * scale), 32, 32]
    assert time_ids[2].tolist() == [512, 512, round(20 * scale), round((512 - 60 - 400) * scale), 32, 32]  # mirrored
    # a photo without intake's record (grace_hopper, 512 x 600) counts as its centre square, uncropped
    assert time_ids[1].tolist() == [600, 512, round((600 - 512) // 2 * 32 / 512), 0, 32, 32]


def test_plain_sdxl_pipeline_reproduces_the_attached_adapter(lora_run, preset):
    adapter = lora_run["result"].adapter_dir
    base = lora_run["base"]
    base_image = generate(base)
    with adapter_attached(base, adapter):
        attached = generate(base)
    assert torch.equal(generate(base), base_image)
    assert not torch.allclose(attached, base_image, atol=1e-3)
    plain = load_pipe(preset)
    assert type(plain).__name__ == "StableDiffusionXLPipeline"
    plain.load_lora_weights(str(adapter))
    load_tokens_with_diffusers(plain, adapter)  # load_textual_inversion once per encoder
    assert torch.equal(generate(plain), attached)


def test_a1111_export_loads_with_diffusers_kohya_loader_and_matches(lora_run, preset, tmp_path):
    adapter = lora_run["result"].adapter_dir
    out = export_kohya(adapter, tmp_path / "a1111", name="likeness-1a2b3c4d-v1")
    keys = load_file(str(out.lora)).keys()
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    embedding = load_file(str(out.embeddings["<subj>"]))
    assert {k: tuple(v.shape) for k, v in embedding.items()} == {"clip_l": (1, 32), "clip_g": (1, 40)}
    assert "<lora:likeness-1a2b3c4d-v1:1> a portrait photo of likeness-1a2b3c4d-v1-subj girl" in out.readme.read_text()

    native = load_pipe(preset)
    native.load_lora_weights(str(adapter))
    load_tokens_with_diffusers(native, adapter)
    kohya = load_pipe(preset)
    kohya.load_lora_weights(str(out.lora))  # diffusers detects the kohya keys and converts them
    for slot in SDXL.text_encoders:
        kohya.load_textual_inversion(embedding[slot.embedding_key], token="<subj>",
                                     text_encoder=getattr(kohya, slot.encoder),
                                     tokenizer=getattr(kohya, slot.tokenizer))
    assert torch.allclose(generate(kohya), generate(native), atol=1e-5)


def test_full_mode_with_checkpointing_resumes_and_restores_the_base(examples, preset, tmp_path):
    from pipelines.errors import Canceled

    config = fast(mode="full", max_train_steps=4, checkpoint_every=2, gradient_checkpointing=True,
                  unet_lr=1e-4, text_encoder_lr=1e-4)
    whole = train(examples, TOKENS, config, preset, tmp_path / "whole", device="cpu")
    base = load_pipe(preset)
    before = state(base)
    calls = []
    with pytest.raises(Canceled):  # checks before loading, after caching, then one per step: stop after step 3
        train(examples, TOKENS, config, preset, tmp_path / "cut", device="cpu", base=base,
              should_stop=lambda: calls.append(1) or len(calls) > 5)
    assert all(torch.equal(state(base)[k], v) for k, v in before.items())
    resumed = train(examples, TOKENS, config, preset, tmp_path / "cut", device="cpu", base=base)
    assert resumed.metrics["resumed_from_step"] == 2
    assert all(torch.equal(state(base)[k], v) for k, v in before.items())
    assert set(load_manifest(resumed.adapter_dir).components) == {"unet", "text_encoder", "text_encoder_2"}
    for component in ("unet", "text_encoder_2"):
        a = load_file(str(next((whole.adapter_dir / component).glob("*.safetensors"))))
        b = load_file(str(next((resumed.adapter_dir / component).glob("*.safetensors"))))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_kohya_zip_and_cli_export_hold_the_lora_every_token_and_how_to_prompt(lora_run, tmp_path):
    import zipfile

    from typer.testing import CliRunner

    from likeness_cli import main as cli
    from pipelines.adapters import kohya_zip

    adapter = lora_run["result"].adapter_dir
    with zipfile.ZipFile(kohya_zip(adapter, tmp_path / "a1111.zip", name="anna")) as archive:
        assert sorted(archive.namelist()) == [
            "HOW-TO-PROMPT.txt", "anna.safetensors", "embeddings/anna-bg0.safetensors",
            "embeddings/anna-bg1.safetensors", "embeddings/anna-subj.safetensors"]
        assert "embeddings/anna-subj.safetensors" in archive.read("HOW-TO-PROMPT.txt").decode()
    result = CliRunner().invoke(cli.app, ["adapters", "export", str(adapter), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "embeddings/likeness-subj.safetensors  a learned token's embedding" in result.output
    assert "likeness.safetensors  the LoRA" in result.output
    assert (tmp_path / "out" / "embeddings" / "likeness-subj.safetensors").is_file()


def test_stage2_caches_hidden_and_pooled_text_and_the_attention_loss_runs(examples, preset, tmp_path):
    from tests.pipelines.training.test_steps import prepared

    trainer = prepared(examples, preset, tmp_path, max_train_steps=4, attention_loss_weight=0.5,
                       prior_preservation=False)
    trainer.begin_stage(0, 0)
    assert trainer.stage_text is None  # stage 1 trains both encoders: encoded every step
    trainer.training_step(0)
    trainer.begin_stage(1, 1)
    cached = trainer.stage_text
    assert cached.hidden.shape[-1] == 32 + 40 and cached.pooled.shape[-1] == 32  # both encoders, then pooled
    used = trainer.schedule.used_prompts(1, 4)
    with torch.no_grad():
        fresh = trainer.encode_text(tuple(ids[used] for ids in trainer.data.ids))
    assert torch.allclose(cached.hidden[used], fresh.hidden, atol=1e-6)
    assert torch.allclose(cached.pooled[used], fresh.pooled, atol=1e-6)
    losses = [trainer.training_step(step) for step in (1, 2, 3)]
    assert all(torch.isfinite(loss) for loss in losses)
