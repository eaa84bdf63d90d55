"""Training on a borrowed base pipeline: no second copy is loaded, and the base is handed back bit for
bit (weights, dtypes, layouts, flags, module tree, vocabulary, generated image) after success,
failure and cancel."""

from __future__ import annotations

import pytest
import torch

from pipelines.errors import Canceled, InvalidConfig
from pipelines.models.loading import load_base_pipeline
from pipelines.training import TrainCallback, TrainConfig, train
from pipelines.training import trainer as trainer_module
from pipelines.types import TrainingExample
from tests.pipelines.training.helpers import TOKENS, adapter_tensors


@pytest.fixture(scope="module")
def examples(astronaut, grace_hopper):
    from PIL import Image

    mask = Image.new("L", astronaut.size, 0)
    return [TrainingExample(astronaut, "<bg0> <subj> girl", mask, photo_id="a"),
            TrainingExample(grace_hopper, "<bg1> <subj> girl", photo_id="g")]


@pytest.fixture(scope="module")
def base(preset):
    """The worker's shared base: loaded once, lent to every run in this module."""
    return load_base_pipeline(preset, "cpu", torch.float32)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"max_train_steps": 4, "unet_rank": 4, "text_encoder_rank": 4, "progress_every": 2,
                          "checkpoint_every": 0, "unet_lr": 1e-2, "text_encoder_lr": 1e-2, **kw})


def generate(pipe, prompt="a photo of girl"):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(3)).images


def state(pipe) -> dict:
    """Everything observable about the base: module tree, flags, attributes, every tensor."""
    out = {"vocab": dict(pipe.tokenizer.get_vocab()), "tokenizer": pipe.tokenizer,
           "components": {k: v for k, v in pipe.components.items()}}
    for name in ("unet", "text_encoder", "vae"):
        module = getattr(pipe, name)
        out[name] = {
            "modules": [(n, type(m).__name__, m.training, sorted(vars(m)), len(m._forward_hooks),
                         len(m._forward_pre_hooks)) for n, m in module.named_modules()],
            "params": {n: (p, p.detach().clone(), p.dtype, p.device, p.stride(), p.requires_grad, p.grad,
                           len(p._post_accumulate_grad_hooks or {})) for n, p in module.named_parameters()},
            "buffers": {n: (b, b.detach().clone(), b.stride()) for n, b in module.named_buffers()},
            "config": module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config),
        }
    out["processors"] = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    out["embedding"] = pipe.text_encoder.get_input_embeddings()
    out["tf32"] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    return out


def assert_same(after: dict, before: dict) -> None:
    assert after["vocab"] == before["vocab"] and after["tokenizer"] is before["tokenizer"]
    assert all(after["components"][k] is v for k, v in before["components"].items())
    assert after["processors"] == before["processors"] and after["embedding"] is before["embedding"]
    assert after["tf32"] == before["tf32"]
    for name in ("unet", "text_encoder", "vae"):
        a, b = after[name], before[name]
        assert a["modules"] == b["modules"], f"{name}: module tree, flags or attributes differ"
        assert a["config"] == b["config"]
        assert a["params"].keys() == b["params"].keys(), f"{name} has leftover (LoRA) parameters"
        for key, (param, values, *meta) in b["params"].items():
            now, now_values, *now_meta = a["params"][key]
            assert now is param, f"{name}.{key} is another Parameter object"
            assert now_meta == meta, f"{name}.{key}: dtype/device/stride/requires_grad/grad/hooks differ"
            assert torch.equal(now_values, values), f"{name}.{key} changed"
        for key, (buffer, values, _stride) in b["buffers"].items():
            assert a["buffers"][key][0] is buffer and torch.equal(a["buffers"][key][1], values)


@pytest.fixture
def check_restored(base):
    """Records the base and its image before the test, asserts both are unchanged after it."""
    before, image = state(base), generate(base)

    def check():
        assert_same(state(base), before)
        assert torch.equal(generate(base), image), "the base must generate the same image, bit for bit"

    return check


def test_borrowed_base_is_used_not_loaded_and_restored_after_lora(monkeypatch, examples, preset, base, tmp_path,
                                                                  check_restored):
    monkeypatch.setattr(trainer_module, "load_base_pipeline", lambda *a, **k: pytest.fail("a second base loaded"))
    seen = []
    result = train(examples, TOKENS, config(attention_loss_weight=1.0, gradient_checkpointing=True), preset,
                   tmp_path / "run", base=base, device="cpu",
                   callbacks=[TrainCallback(every=0, fn=lambda s: seen.append(s.pipe))])
    assert seen and all(p is base for p in seen), "training runs on the lent pipeline itself"
    assert result.metrics["load_s"] == 0.0 and result.metrics["restore_s"] >= 0.0
    assert {"caching_s", "train_s", "steps_per_s"} <= result.metrics.keys()
    check_restored()


def test_borrowed_base_is_restored_after_full_mode(examples, preset, base, tmp_path, check_restored):
    result = train(examples, TOKENS, config(mode="full", unet_lr=1e-3, text_encoder_lr=1e-3, stage1_fraction=0.5),
                   preset, tmp_path / "full", base=base, device="cpu")
    assert (result.adapter_dir / "unet").is_dir() and (result.adapter_dir / "text_encoder").is_dir()
    check_restored()


def test_borrowed_base_is_restored_after_cancel_and_failure(examples, preset, base, tmp_path, check_restored):
    calls = []
    with pytest.raises(Canceled):
        train(examples, TOKENS, config(mode="full", optimizer_in_backward=True), preset, tmp_path / "cancel",
              base=base, device="cpu", should_stop=lambda: calls.append(1) or len(calls) > 5)
    check_restored()

    def broken(state):
        if state.step == 2:
            raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(examples, TOKENS, config(prior_preservation=True, num_class_images=1, class_image_steps=1), preset,
              tmp_path / "fail", base=base, device="cpu", class_images_dir=tmp_path / "classes",
              callbacks=[TrainCallback(every=1, fn=broken)])
    check_restored()


def test_borrowed_and_loaded_bases_train_the_same_adapter(examples, preset, base, tmp_path):
    borrowed = train(examples, TOKENS, config(), preset, tmp_path / "borrowed", base=base, device="cpu")
    loaded = train(examples, TOKENS, config(), preset, tmp_path / "loaded", device="cpu")
    assert loaded.metrics["load_s"] > 0
    a, b = adapter_tensors(borrowed.adapter_dir), adapter_tensors(loaded.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_restoration_is_what_keeps_the_base_intact(monkeypatch, examples, preset, tmp_path):
    """Guard against a vacuous test: with restoration switched off, the checks above fail."""
    from pipelines.training.base import BaseSnapshot

    pipe = load_base_pipeline(preset, "cpu", torch.float32)
    before = state(pipe)
    monkeypatch.setattr(BaseSnapshot, "restore", lambda self, *a, **k: None)
    train(examples, TOKENS, config(), preset, tmp_path / "run", base=pipe, device="cpu")
    with pytest.raises(AssertionError):
        assert_same(state(pipe), before)


def test_lent_base_must_fit_the_run(examples, preset, tmp_path):
    half = load_base_pipeline(preset, "cpu", torch.bfloat16)
    before = state(half)
    with pytest.raises(InvalidConfig, match="needs an fp32 base"):
        train(examples, TOKENS, config(mixed_precision="no"), preset, tmp_path / "run", base=half, device="cpu")
    assert_same(state(half), before)


def test_a_failed_restoration_says_the_base_must_be_discarded(monkeypatch, examples, preset, tmp_path):
    from pipelines.training import BaseNotRestored
    from pipelines.training.base import BaseWeights

    def unreadable(self, component, names):
        raise OSError("disk gone")
        yield  # pragma: no cover

    pipe = load_base_pipeline(preset, "cpu", torch.float32)
    monkeypatch.setattr(BaseWeights, "tensors", unreadable)
    with pytest.raises(BaseNotRestored, match="disk gone"):
        train(examples, TOKENS, config(mode="full", max_train_steps=1), preset, tmp_path / "run", base=pipe,
              device="cpu")
