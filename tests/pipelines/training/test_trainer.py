"""The trainer on the tiny preset (CPU). Runs train at 32 px (16x16 latents) to stay fast."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipelines.adapters import adapter_attached, load_manifest, token_embedding_files
from pipelines.errors import Canceled, InvalidConfig
from pipelines.models.presets import with_overrides
from pipelines.training import TrainCallback, TrainConfig, train
from pipelines.training import trainer as trainer_module
from pipelines.types import TokenSpec, TrainingExample
from tests.pipelines.training.helpers import TOKENS, adapter_tensors


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{"max_train_steps": 6, "unet_rank": 4, "text_encoder_rank": 4, "progress_every": 2, **kw})


def run(examples, preset, tmp_path, name="run", **kw):
    return train(examples, TOKENS, fast(**kw.pop("config", {})), preset, tmp_path / name, device="cpu", **kw)




def generate(pipe, prompt="a photo of <subj> girl"):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(3)).images


def snapshot(module, only=None):
    return {n: p.detach().clone() for n, p in module.named_parameters() if only is None or only in n}


# ------------------------------------------------------------------ checks before loading


@pytest.mark.parametrize(
    "config, preset_change, match",
    [
        ({"max_train_steps": 0}, {}, "at least 1"),
        ({"stage1_fraction": 1.5}, {}, r"within \[0, 1\]"),
        ({"stage1_fraction": -0.1}, {}, r"within \[0, 1\]"),
        ({"mode": "qlora"}, {}, "mode must be"),
        ({"strategy": "dreambooth"}, {}, "strategy must be"),
        ({"mixed_precision": "fp8"}, {}, "mixed_precision"),
        ({}, {"base_model": "/nonexistent/models/sd15"}, "neither an existing folder nor a hub id"),
        ({"max_train_steps": None, "steps_per_photo": 0}, {}, "at least 1"),
    ],
)
def test_bad_configs_fail_before_any_model_loads(monkeypatch, examples, preset, tmp_path, config, preset_change,
                                                 match):
    def spy(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(trainer_module, "load_base_pipeline", spy)
    with pytest.raises(InvalidConfig, match=match):
        train(examples, TOKENS, TrainConfig(**{"max_train_steps": 4, **config}),
              with_overrides(preset, **preset_change), tmp_path, device="cpu")


def test_bad_tokens_and_examples_fail_before_any_model_loads(monkeypatch, examples, preset, tmp_path):
    monkeypatch.setattr(trainer_module, "load_base_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(InvalidConfig, match="no training examples"):
        train([], TOKENS, fast(), preset, tmp_path, device="cpu")
    with pytest.raises(InvalidConfig, match="instance token"):
        train(examples, TokenSpec("<other>", "girl"), fast(), preset, tmp_path, device="cpu")


def test_config_serialises_and_plans_stages():
    from pipelines.training import plan_stages

    config = TrainConfig(mode="full", strategy="embedding_then_unet", max_train_steps=None, steps_per_photo=90)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InvalidConfig, match="unknown training options"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    plans = plan_stages(config, n_examples=10)
    assert [(p.name, p.steps, p.train_unet, p.train_tokens) for p in plans] == [
        ("training:stage1", 270, False, True), ("training:stage2", 630, True, False)]
    assert sum(p.steps for p in plan_stages(TrainConfig(), n_examples=40)) == TrainConfig().max_steps_cap
    assert [p.name for p in plan_stages(TrainConfig(stage1_fraction=0.0, max_train_steps=10), 3)] == ["training:stage2"]


# ------------------------------------------------------------------ what each stage changes


def test_stage1_trains_text_encoder_and_unet_stage2_only_unet(examples, preset, tmp_path):
    seen = {}

    def watch(state):
        te = state.pipe.text_encoder
        seen[state.step] = {
            "te": snapshot(te, "lora_"),
            "unet": snapshot(state.pipe.unet, "lora_"),
            "rows": te.get_input_embeddings().rows.detach().clone(),
            "base_rows": te.get_input_embeddings().base.weight.detach().clone(),
        }

    result = run(examples, preset, tmp_path, config={"max_train_steps": 10, "stage1_fraction": 0.3},
                 callbacks=[TrainCallback(every=1, fn=watch)])
    assert result.metrics["stages"] == {"training:stage1": 3, "training:stage2": 7}
    start, boundary, end = seen[0], seen[3], seen[10]
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)
    assert changed(start["te"], boundary["te"]), "stage 1 must update the text encoder"
    assert changed(start["unet"], boundary["unet"]), "stage 1 must update the U-Net"
    assert not torch.equal(start["rows"], boundary["rows"]), "stage 1 must update the new token rows"
    assert not changed(boundary["te"], end["te"]), "stage 2 must leave the text encoder bit for bit"
    assert torch.equal(boundary["rows"], end["rows"])
    assert changed(boundary["unet"], end["unet"]), "stage 2 must keep training the U-Net"
    # the base vocabulary never moves
    base = trainer_module.load_base_pipeline(preset, torch.device("cpu")).text_encoder.get_input_embeddings().weight
    assert torch.equal(end["base_rows"], base)

    manifest = load_manifest(result.adapter_dir)
    assert manifest.tokens == ("<subj>", "<bg0>", "<bg1>") and manifest.components == ("unet", "text_encoder")
    assert manifest.training_config["strategy"] == "staged" and manifest.steps == 10
    # what it was trained on, as anyone can name it: never this machine's model folder
    assert (manifest.base_model, manifest.preset) == ("tiny", "tiny")
    assert preset.base_model not in (result.adapter_dir / "manifest.json").read_text()


def test_full_mode_changes_only_new_token_rows_and_saves_changed_components(examples, preset, tmp_path):
    from transformers import CLIPTextModel

    final = {}

    def at_end(state):
        if state.step == state.total_steps:
            final["image"] = generate(state.pipe)

    result = run(examples, preset, tmp_path, config={"mode": "full", "max_train_steps": 3, "unet_lr": 1e-3,
                                                     "text_encoder_lr": 1e-3},
                 callbacks=[TrainCallback(every=0, fn=at_end)])
    folder = result.adapter_dir
    fresh = trainer_module.load_base_pipeline(preset, torch.device("cpu"))
    with adapter_attached(fresh, folder):
        assert torch.allclose(generate(fresh), final["image"], atol=1e-5), "full adapter must reproduce training"
    assert {p.name for p in folder.iterdir()} == {"manifest.json", "tokens", "unet", "text_encoder"}
    trained = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    base = CLIPTextModel.from_pretrained(preset.base_model, subfolder="text_encoder")
    assert torch.equal(trained.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(trained.encoder.layers[0].mlp.fc1.weight, base.encoder.layers[0].mlp.fc1.weight)

    unet_only = run(examples, preset, tmp_path, "unet_only", config={"mode": "full", "strategy": "unet_only",
                                                                     "max_train_steps": 2})
    assert {p.name for p in unet_only.adapter_dir.iterdir()} == {"manifest.json", "tokens", "unet"}
    ti = run(examples, preset, tmp_path, "ti", config={"mode": "full", "strategy": "textual_inversion",
                                                       "max_train_steps": 2})
    assert {p.name for p in ti.adapter_dir.iterdir()} == {"manifest.json", "tokens"}
    rows = load_file(str(ti.adapter_dir / "tokens" / "0.safetensors"))["<subj>"]
    assert rows.shape == (32,)


# ------------------------------------------------------------------ learning, reproducing


@pytest.mark.slow
@pytest.mark.parametrize("mode, factor", [("full", 0.9), ("lora", 1.0)])
def test_training_lowers_the_loss_on_its_photos(examples, preset, tmp_path, mode, factor):
    """Mean denoising loss over fixed timesteps and noise, on the live pipeline before and after.
    LoRA on the attention projections of a random tiny U-Net moves the loss less than full
    fine-tuning, hence the per-mode margin."""
    from pipelines.eval.loss import denoising_loss

    images, prompts = [e.image for e in examples], [e.prompt for e in examples]
    loss = {}

    def measure(state):
        loss[state.step] = denoising_loss(state.pipe, images, prompts, preset.resolution)

    # LoRA at 1e-3 moved the loss by noise only (+0.005 %) once the tiny text encoder got CLIP's real
    # vocabulary (a different random encoder); at 3e-3 it goes down (-0.05 %), as 30 steps at 1e-3 do.
    config = {"mode": mode, "max_train_steps": 15, "flip": False,
              **({"unet_lr": 3e-4, "text_encoder_lr": 1e-5} if mode == "full" else {"unet_lr": 3e-3})}
    run(examples, preset, tmp_path, config=config, callbacks=[TrainCallback(every=0, fn=measure)])
    before, after = loss[0], loss[15]
    assert after < before * factor, (before, after)


def test_saved_adapter_reproduces_the_trained_pipeline_image(examples, preset, tmp_path):
    final = {}

    def at_end(state):
        if state.step == state.total_steps:
            final["image"] = generate(state.pipe)

    result = run(examples, preset, tmp_path, config={"max_train_steps": 4, "unet_lr": 1e-3},
                 callbacks=[TrainCallback(every=0, fn=at_end)])
    fresh = trainer_module.load_base_pipeline(preset, torch.device("cpu"))
    base_image = generate(fresh)
    with adapter_attached(fresh, result.adapter_dir):
        reloaded = generate(fresh)
    assert torch.allclose(reloaded, final["image"], atol=1e-5)
    assert not torch.allclose(reloaded, base_image, atol=1e-3)
    # plain diffusers loading gives the same image
    native = trainer_module.load_base_pipeline(preset, torch.device("cpu"))
    native.load_lora_weights(str(result.adapter_dir))
    files, tokens = token_embedding_files(result.adapter_dir)
    native.load_textual_inversion(files, token=tokens)
    assert torch.allclose(generate(native), final["image"], atol=1e-5)


def test_cancel_stops_within_one_step_and_resume_matches_uninterrupted_run(examples, preset, tmp_path):
    config = {"max_train_steps": 8, "checkpoint_every": 2}
    uninterrupted = run(examples, preset, tmp_path, "whole", config=config)

    steps_seen, calls = [], []

    def stop_after_five_steps():
        calls.append(1)
        return len(calls) > 8  # checks before loading, after loading, after caching, then one per step

    with pytest.raises(Canceled):
        run(examples, preset, tmp_path, "interrupted", config=config, should_stop=stop_after_five_steps,
            callbacks=[TrainCallback(every=1, fn=lambda s: steps_seen.append(s.step))])
    assert steps_seen[-1] == 5 and len(calls) == 9, "cancel must stop at the next step boundary"
    assert not (tmp_path / "interrupted" / "adapter").exists()
    # the newest checkpoint only, complete (meta.json is written last)
    assert [p.name for p in (tmp_path / "interrupted" / "checkpoints").glob("step-*/meta.json")] == ["meta.json"]
    assert (tmp_path / "interrupted" / "checkpoints" / "step-000004" / "meta.json").is_file()

    events = []
    resumed = run(examples, preset, tmp_path, "interrupted", config=config, on_progress=events.append)
    assert resumed.metrics["resumed_from_step"] == 4
    assert any(e.message == "resumed from checkpoint at step 4" for e in events)
    a, b = adapter_tensors(uninterrupted.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run must equal the uninterrupted one"
    assert not (tmp_path / "interrupted" / "checkpoints").exists()


def test_progress_reports_stages_loss_and_rate(examples, preset, tmp_path):
    events = []
    run(examples, preset, tmp_path, config={"max_train_steps": 4}, on_progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "caching" and "training:stage1" in stages and stages[-1] == "training:stage2"
    assert stages.index("caching") < stages.index("training:stage1") < stages.index("training:stage2")
    last = events[-1]
    assert last.fraction == 1.0 and last.metrics["loss"] > 0 and last.metrics["steps_per_s"] > 0


def test_attention_penalty_and_prior_preservation_train(examples, preset, tmp_path, monkeypatch):
    from PIL import Image

    from pipelines.training import prior

    masked = [TrainingExample(e.image, e.prompt, Image.new("L", e.image.size, 0).resize(e.image.size), e.photo_id)
              for e in examples]
    generated = []
    original = prior.ensure_class_images

    def counting(pipe, folder, *args, **kwargs):
        generated.append(len(list(folder.glob("*.png"))) if folder.exists() else 0)
        return original(pipe, folder, *args, **kwargs)

    monkeypatch.setattr(prior, "ensure_class_images", counting)
    config = {"max_train_steps": 2, "attention_loss_weight": 1.0, "prior_preservation": True,
              "num_class_images": 2, "class_image_steps": 2}
    first = run(masked, preset, tmp_path, "a", config=config, class_images_dir=tmp_path / "classes")
    pngs = list((tmp_path / "classes").rglob("*.png"))
    assert len(pngs) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    run(masked, preset, tmp_path, "b", config=config, class_images_dir=tmp_path / "classes")
    assert {p: p.stat().st_mtime_ns for p in pngs} == mtimes, "class images are generated once and reused"
    assert first.metrics["final_loss"] > 0


def test_same_seed_same_adapter(examples, preset, tmp_path):
    a = run(examples, preset, tmp_path, "a", config={"max_train_steps": 2})
    b = run(examples, preset, tmp_path, "b", config={"max_train_steps": 2})
    c = run(examples, preset, tmp_path, "c", config={"max_train_steps": 2, "seed": 1})
    ta, tb, tc = adapter_tensors(a.adapter_dir), adapter_tensors(b.adapter_dir), adapter_tensors(c.adapter_dir)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
