"""The trainer's steps one by one: caching only what a run uses, text caching per stage, a training
step without host reads, optimizer state, in-backward updates, precision, checkpoints that travel."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipelines.errors import Canceled, InvalidConfig
from pipelines.training import TrainConfig, train
from pipelines.training.trainer import LossMeter, Trainer
from tests.pipelines.training.helpers import TOKENS, adapter_tensors


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{"max_train_steps": 6, "unet_rank": 4, "text_encoder_rank": 4, "progress_every": 2, **kw})


def prepared(examples, preset, tmp_path, **kw) -> Trainer:
    """A trainer taken through steps 1-4 (base, tokens, cache, setup), ready for training_step."""
    trainer = Trainer(examples, TOKENS, fast(**kw), preset, tmp_path, device="cpu")
    trainer.pipe = trainer.load_base()
    trainer.prepare_tokens()
    trainer.cache()
    trainer.setup()
    return trainer


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ caching


def test_caching_encodes_only_the_images_the_schedule_draws(examples, preset, tmp_path):
    trainer = prepared(examples, preset, tmp_path, max_train_steps=1, flip=True)
    drawn = trainer.schedule.used_images()
    assert len(drawn) == 1 and trainer.data.vae_images == 1, "one step draws one image: encode one, not four"
    undrawn = [i for i in range(4) if i not in drawn]
    assert not trainer.data.latents[undrawn].any() and trainer.data.latents[drawn].abs().sum() > 0

    many = prepared(examples, preset, tmp_path / "many", max_train_steps=40)
    assert many.data.vae_images == 4  # photos and their flips, each once
    again = prepared(examples, preset, tmp_path / "again", max_train_steps=40)
    assert torch.equal(many.data.schedule, again.data.schedule) and torch.equal(many.data.latents, again.data.latents)


@pytest.mark.parametrize("strategy, cached", [("staged", [False, True]), ("embedding_then_unet", [False, True]),
                                              ("unet_only", [True]), ("textual_inversion", [False]),
                                              ("whole_model", [False])])
def test_text_embeddings_are_cached_only_where_text_encoder_and_tokens_are_frozen(examples, preset, tmp_path,
                                                                                  strategy, cached):
    trainer = prepared(examples, preset, tmp_path, strategy=strategy, max_train_steps=10)
    start = 0
    for index, plan in enumerate(trainer.plans):
        trainer.begin_stage(index, start)
        assert (trainer.stage_text is not None) == cached[index], plan.name
        if trainer.stage_text is not None:
            with torch.no_grad():
                fresh = trainer.pipe.text_encoder(trainer.data.ids[0])[0]
            used = trainer.schedule.used_prompts(start, start + plan.steps)
            assert torch.allclose(trainer.stage_text.hidden[used], fresh[used], atol=1e-6)
        start += plan.steps


# ------------------------------------------------------------------ one step


def test_training_step_reads_nothing_back_to_the_host(monkeypatch, examples, preset, tmp_path):
    trainer = prepared(examples, preset, tmp_path, attention_loss_weight=0.5, offset_noise=0.1)
    trainer.begin_stage(0, 0)
    before = {k: p.detach().clone() for k, p in trainer.trainables.named.items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("a training step read a tensor back to the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    losses = [trainer.training_step(step) for step in range(3)]
    monkeypatch.undo()
    assert all(loss.ndim == 0 and not loss.requires_grad and loss.device.type == "cpu" for loss in losses)
    assert any(not torch.equal(before[k], p) for k, p in trainer.trainables.named.items())


def test_loss_meter_reports_window_means():
    meter = LossMeter(torch.device("cpu"))
    for value in (1.0, 3.0):
        meter.add(torch.tensor(value))
    meter.close_window()
    meter.add(torch.tensor(5.0))
    meter.close_window()
    assert meter.ready() == [2.0, 5.0] and meter.ready() == []


def test_fused_adamw_and_no_state_for_parameters_that_never_train_again(examples, preset, tmp_path):
    trainer = prepared(examples, preset, tmp_path, mode="full", max_train_steps=4, stage1_fraction=0.5)
    inner = trainer.optimizer.optimizer
    assert all(group["fused"] for group in inner.param_groups), "fused AdamW: no full-size foreach temporaries"
    trainer.begin_stage(0, 0)
    trainer.training_step(0)
    te = set(trainer.trainables.text_encoder)
    assert te and te <= set(inner.state)
    trainer.begin_stage(1, 2)
    assert not te & set(inner.state), "the text encoder's Adam moments are dropped once it is frozen for good"
    assert set(trainer.trainables.unet) <= set(inner.state)


# ------------------------------------------------------------------ optimizer in backward


def test_optimizer_in_backward_frees_each_gradient_and_matches_the_fused_optimizer(monkeypatch, examples, preset,
                                                                                   tmp_path):
    from pipelines.training.optim import OptimizerInBackward

    alive = []
    original = OptimizerInBackward._step

    def watch(self, param):
        alive.append(sum(p.grad is not None for p in self.params))
        original(self, param)

    monkeypatch.setattr(OptimizerInBackward, "_step", watch)
    # Without clipping both apply the same AdamW update to each tensor.
    config = {"mode": "full", "max_train_steps": 3, "max_grad_norm": 0.0, "unet_lr": 1e-3, "text_encoder_lr": 1e-3}
    in_backward = train(examples, TOKENS, fast(**config, optimizer_in_backward=True), preset, tmp_path / "ib",
                        device="cpu")
    assert alive and max(alive) == 1, "only the gradient being applied exists at any time"
    plain = train(examples, TOKENS, fast(**config), preset, tmp_path / "plain", device="cpu")
    assert same(adapter_tensors(in_backward.adapter_dir), adapter_tensors(plain.adapter_dir))


def test_optimizer_in_backward_clips_each_gradient_to_its_share():
    from pipelines.training.optim import OptimizerInBackward, adamw

    small, large = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(3))
    seen = {}
    optimizer = OptimizerInBackward([{"params": [small, large], "lr": 0.1}],
                                    lambda groups: _Recording(adamw(groups, torch.device("cpu")), seen), 1.0)
    (100.0 * small.sum() + 100.0 * large.sum()).backward()
    assert small.grad is None and large.grad is None
    assert seen[small] == pytest.approx(0.5) and seen[large] == pytest.approx(3**0.5 / 2)  # sqrt(n / 4)
    assert (seen[small] ** 2 + seen[large] ** 2) ** 0.5 == pytest.approx(1.0)
    optimizer.close()


class _Recording:
    def __init__(self, optimizer, seen):
        self.optimizer, self.seen, self.state = optimizer, seen, optimizer.state

    def step(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.seen[p] = float(p.grad.norm())
        self.optimizer.step()


def test_optimizer_in_backward_resumes_bit_for_bit(examples, preset, tmp_path):
    config = fast(mode="full", max_train_steps=6, checkpoint_every=2, optimizer_in_backward=True)
    whole = train(examples, TOKENS, config, preset, tmp_path / "whole", device="cpu")
    calls = []
    with pytest.raises(Canceled):
        train(examples, TOKENS, config, preset, tmp_path / "cut", device="cpu",
              should_stop=lambda: calls.append(1) or len(calls) > 7)
    resumed = train(examples, TOKENS, config, preset, tmp_path / "cut", device="cpu")
    assert resumed.metrics["resumed_from_step"] == 4
    assert same(adapter_tensors(whole.adapter_dir), adapter_tensors(resumed.adapter_dir))


# ------------------------------------------------------------------ precision


def test_auto_precision_is_bf16_on_gpus_and_none_on_cpu(monkeypatch):
    config = TrainConfig()
    assert config.mixed_precision == "auto" and config.resolved_precision("cpu") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert config.resolved_precision("cuda") == "bf16" and config.resolved_precision("cuda:1") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert config.resolved_precision("cuda") == "fp16"
    assert TrainConfig(mixed_precision="no").resolved_precision("cuda") == "no"


def test_precision_choices_that_cannot_work_fail_before_loading(examples, preset, tmp_path):
    with pytest.raises(InvalidConfig, match="needs a CUDA device"):
        Trainer(examples, TOKENS, fast(mixed_precision="fp16"), preset, tmp_path, device="cpu")
    with pytest.raises(InvalidConfig, match="optimizer_in_backward"):
        Trainer(examples, TOKENS, fast(mixed_precision="fp16", optimizer_in_backward=True), preset, tmp_path,
                device="cpu")


def test_one_process_trains_runs_of_different_precisions(examples, preset, tmp_path):
    """accelerate keeps one process-wide state; a worker trains jobs of any precision one after another."""
    first = train(examples, TOKENS, fast(max_train_steps=2), preset, tmp_path / "a", device="cpu")
    half = train(examples, TOKENS, fast(max_train_steps=2, mixed_precision="bf16"), preset, tmp_path / "b",
                 device="cpu")
    again = train(examples, TOKENS, fast(max_train_steps=2), preset, tmp_path / "c", device="cpu")
    assert (first.metrics["mixed_precision"], half.metrics["mixed_precision"]) == ("no", "bf16")
    assert half.metrics["final_loss"] > 0
    rows = adapter_tensors(half.adapter_dir)
    assert all(v.dtype == torch.float32 for v in rows.values()), "trainables stay fp32 under bf16 autocast"
    assert same(adapter_tensors(first.adapter_dir), adapter_tensors(again.adapter_dir))


# ------------------------------------------------------------------ checkpoints that travel


def test_checkpoints_are_handed_over_and_resume_on_another_worker(examples, preset, tmp_path):
    config = fast(max_train_steps=8, checkpoint_every=2)
    whole = train(examples, TOKENS, config, preset, tmp_path / "whole", device="cpu")

    mirrored = []

    def mirror(folder):  # the worker uploads each checkpoint folder to the blob store
        assert (folder / "meta.json").is_file() and folder.name == f"step-{len(mirrored) * 2 + 2:06d}"
        shutil.copytree(folder, tmp_path / "blob" / folder.name)
        mirrored.append(folder.name)

    calls = []
    with pytest.raises(Canceled):
        train(examples, TOKENS, config, preset, tmp_path / "worker-1", device="cpu", on_checkpoint=mirror,
              should_stop=lambda: calls.append(1) or len(calls) > 8)
    assert mirrored == ["step-000002", "step-000004"]

    # A checkpoint of another run (another seed), at a later step.
    other_calls = []
    with pytest.raises(Canceled):
        train(examples, TOKENS, fast(max_train_steps=10, checkpoint_every=2, seed=1), preset, tmp_path / "other",
              device="cpu", should_stop=lambda: other_calls.append(1) or len(other_calls) > 11)

    # Another worker: a fresh output folder, the newest mirrored checkpoint downloaded into its checkpoint_dir,
    # next to leftovers that must be ignored (an older one, a half-copied one, one from another run).
    elsewhere = tmp_path / "worker-2" / "checkpoints"
    shutil.copytree(tmp_path / "blob" / "step-000004", elsewhere / "step-000004")
    shutil.copytree(tmp_path / "blob" / "step-000002", elsewhere / "step-000002")
    shutil.copytree(tmp_path / "blob" / "step-000004", elsewhere / "step-000006")
    (elsewhere / "step-000006" / "state.pt").write_bytes(b"truncated")
    shutil.copytree(tmp_path / "other" / "checkpoints" / "step-000008", elsewhere / "step-000008")
    resumed = train(examples, TOKENS, config, preset, tmp_path / "worker-2", device="cpu",
                    checkpoint_dir=elsewhere)
    assert resumed.metrics["resumed_from_step"] == 4
    assert same(adapter_tensors(whole.adapter_dir), adapter_tensors(resumed.adapter_dir))
    assert not elsewhere.exists(), "a finished run removes its checkpoints"


def test_an_incompatible_checkpoint_is_ignored(examples, preset, tmp_path):
    calls = []
    with pytest.raises(Canceled):
        train(examples, TOKENS, fast(max_train_steps=6, checkpoint_every=2), preset, tmp_path / "run", device="cpu",
              should_stop=lambda: calls.append(1) or len(calls) > 6)
    changed = train(examples, TOKENS, fast(max_train_steps=6, checkpoint_every=2, unet_lr=3e-4), preset,
                    tmp_path / "run", device="cpu")
    assert changed.metrics["resumed_from_step"] == 0
