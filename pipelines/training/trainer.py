"""Staged fine-tuning of a diffusers text-to-image base model into a per-subject adapter.

``train()`` reads like a diffusers pipeline: check inputs (before any model is touched), then
numbered steps, each a method of :class:`Trainer` that tests can call on its own:

1. base        borrow the caller's loaded pipeline (recorded, restored after the job) or load one
2. tokens      per text encoder (the family's: one for SD 1.5, two for SDXL), a tokenizer copy with the
               new tokens and their initial embedding rows
3. cache       the sampling schedule for the whole run, then latents of exactly the images it draws
4. setup       token rows, LoRA or full weights as fp32 trainables, optimizer, mixed precision
5. resume      the newest compatible checkpoint in ``checkpoint_dir``, if any
6. stages      ``training_step`` per step; text embeddings (with SDXL's pooled one) cached in stages that
               freeze the text encoders
7. save        the adapter folder (``pipelines.adapters`` format)

A step never waits for the device: batches are slices of device tensors, noise comes from a device
generator, and the loss is summed on the device and read back asynchronously every
``progress_every`` steps.

How the worker calls it::

    with manager.lease(preset, device) as pipe:      # its one base per (preset, device, dtype), locked
        result = train(examples, tokens, config, preset, workdir / "training", base=pipe, device=device,
                       on_progress=..., should_stop=...,
                       checkpoint_dir=workdir / "checkpoints", on_checkpoint=mirror)
    # BaseNotRestored: putting the base back failed, drop that pipeline from the manager.

``mirror(folder)`` uploads ``folder`` (``step-000200/``; ``meta.json`` last) and may delete older
uploads; a worker that picks the job up again downloads the newest mirrored folder into its
``checkpoint_dir`` before calling ``train``, which resumes from it (or ignores it if incomplete or
from another config). ``should_stop`` may raise :class:`pipelines.errors.Preempted` (the worker is
shutting down): the run then checkpoints the step it reached (``on_checkpoint`` mirrors it) and
re-raises, so the next worker loses no step. A finished run deletes its local checkpoints; the mirrored ones are the
worker's to delete. The lent base must be on ``device`` and, for ``mixed_precision="no"``, fp32
(``"auto"`` on CUDA trains bf16 autocast over the manager's bf16 base, trainables in fp32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.adapters import AdapterManifest, LoraSpec, save_adapter
from pipelines.errors import InvalidConfig, Preempted
from pipelines.models.loading import load_base_pipeline
from pipelines.models.presets import default_cache_dir
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, raise_if_canceled
from pipelines.training import checkpoint as ckpt
from pipelines.training.config import StagePlan, TrainConfig, check_config, plan_stages
from pipelines.training.data import CachedData, SampleSchedule, cache_data, encode_latents, image_tensor
from pipelines.training.text import EncoderTokens, TextConditioning, encode, encoders_of, unet_kwargs
from pipelines.types import TokenSpec, TrainingExample

__all__ = ["TrainCallback", "TrainResult", "Trainer", "TrainingState", "check_inputs", "encode_latents",
           "image_tensor", "train"]

log = logging.getLogger(__name__)

CheckpointFn = Callable[[Path], None]


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    manifest: AdapterManifest
    metrics: dict[str, Any]
    steps: int
    snapshots: dict[int, Path] = field(default_factory=dict)  # step -> adapter folder, before the finished one


@dataclass
class TrainingState:
    """What a training callback sees: the live pipeline (current weights) and where training is."""

    step: int
    total_steps: int
    stage: str
    pipe: Any
    tokens: TokenSpec
    examples: Sequence[TrainingExample]
    device: torch.device


@dataclass
class TrainCallback:
    """Called with a :class:`TrainingState` at step 0 and every ``every`` steps (and at the end);
    a returned mapping of metrics is recorded under ``metrics["eval"]``."""

    every: int
    fn: Callable[[TrainingState], Mapping[str, float] | None]


# ---------------------------------------------------------------------------- inputs


def check_inputs(examples: Sequence[TrainingExample], tokens: TokenSpec, config: TrainConfig, preset) -> None:
    check_config(config, preset, len(examples))
    new = tokens.new_tokens
    if not tokens.instance_token or any(not t or any(c.isspace() for c in t) for t in new):
        raise InvalidConfig("tokens must be non-empty and contain no whitespace", {"tokens": list(new)})
    if len(set(new)) != len(new):
        raise InvalidConfig("tokens must be distinct", {"tokens": list(new)})
    if not tokens.class_token:
        raise InvalidConfig("a class token is required")
    for i, example in enumerate(examples):
        if not isinstance(example.image, Image.Image):
            raise InvalidConfig(f"example {i} has no image")
        if example.mask is not None and example.mask.size != example.image.size:
            raise InvalidConfig(f"example {i}: mask size {example.mask.size} differs from image {example.image.size}")
    if not any(tokens.instance_token in example.prompt.split() for example in examples):
        raise InvalidConfig(f"no prompt contains the instance token {tokens.instance_token!r}")
    base_index = Path(preset.base_model) / "model_index.json"
    if base_index.is_file():
        encoders = {n for n in json.loads(base_index.read_text()) if n.startswith("text_encoder")}
        if encoders != set(preset.family.encoder_names):
            raise InvalidConfig(f"the base model's text encoders {sorted(encoders)} are not the {preset.family.name} "
                                f"family's {list(preset.family.encoder_names)}", {"family": preset.family.name})


def data_fingerprint(examples: Sequence[TrainingExample], tokens: TokenSpec, preset) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([preset.base_model, preset.revision, preset.resolution, list(tokens.new_tokens),
                              tokens.class_token]).encode())
    for example in examples:
        digest.update(example.prompt.encode() + example.photo_id.encode())
        if preset.family.size_conditioning and example.crop is not None:
            digest.update(json.dumps(example.crop.to_dict(), sort_keys=True).encode())
        digest.update(np.asarray(example.image.convert("RGB").resize((16, 16))).tobytes())
        if example.mask is not None:
            digest.update(np.asarray(example.mask.convert("L").resize((16, 16))).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- helpers


def text_encoder_names(pipe) -> list[str]:
    return sorted(n for n, c in pipe.components.items() if n.startswith("text_encoder") and c is not None)


_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(precision: str, device: torch.device):
    """An ``accelerate.Accelerator`` for one run (autocast, loss scaling, clipping, optimizer wrapper)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = device.type == "cpu"
    state = AcceleratorState._shared_state
    if state and (state.get("_mixed_precision") != precision or (PartialState().device.type == "cpu") != cpu):
        # accelerate keeps one process-wide state and refuses to change its precision or device; a worker
        # process trains many jobs (with "auto" precision per device), and nothing else in it uses that state.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=precision, cpu=cpu)


@dataclass
class Trainables:
    """The tensors a run trains, per component, under stable names (checkpoint keys)."""

    unet: list[torch.nn.Parameter] = field(default_factory=list)
    text_encoder: list[torch.nn.Parameter] = field(default_factory=list)  # every text encoder's
    rows: list[torch.nn.Parameter] = field(default_factory=list)  # the new tokens' rows, one per text encoder
    named: dict[str, torch.nn.Parameter] = field(default_factory=dict)

    def groups(self, plan: StagePlan) -> list[tuple[list[torch.nn.Parameter], bool]]:
        return [(self.unet, plan.train_unet), (self.text_encoder, plan.train_text_encoder),
                (self.rows, plan.train_tokens)]

    def set_stage(self, plan: StagePlan) -> list[torch.nn.Parameter]:
        """Freeze what ``plan`` does not train; returns the parameters it trains."""
        active = []
        for params, on in self.groups(plan):
            for p in params:
                p.requires_grad_(on)
                p.grad = None
            if on:
                active += params
        return active


class LossMeter:
    """Sums per-step losses on the device and reads window means back without stalling it: each
    mean is copied to pinned host memory asynchronously and picked up once the copy has landed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.pending: deque[tuple[int, torch.Tensor, Any]] = deque()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.float()
        self.count += 1

    def close_window(self) -> None:
        if not self.count:
            return
        mean = self.total / self.count
        event = None
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)  # the run's device, whichever is current
            host = torch.empty((), pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(mean, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        else:
            host = mean
        self.pending.append((self.count, host, event))
        self.total.zero_()
        self.count = 0

    def ready(self, wait: bool = False) -> list[float]:
        """Means whose copies have finished (all of them when ``wait``), oldest first."""
        out = []
        while self.pending:
            _, host, event = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self.pending.popleft()
            out.append(float(host))
        return out


# ---------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run. ``Trainer(...)`` checks every input (nothing is loaded); :meth:`run` does
    the work on a borrowed or freshly loaded base; the numbered methods are its steps."""

    def __init__(
        self,
        examples: Sequence[TrainingExample],
        tokens: TokenSpec,
        config: TrainConfig,
        preset,
        output_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        checkpoint_dir: str | Path | None = None,
        on_progress: ProgressFn | None = None,
        should_stop: CancelFn | None = None,
        on_checkpoint: CheckpointFn | None = None,
        callbacks: Sequence[TrainCallback] = (),
        class_images_dir: str | Path | None = None,
        snapshot_steps: Sequence[int] = (),
    ):
        check_inputs(examples, tokens, config, preset)
        self.examples, self.tokens, self.config, self.preset = list(examples), tokens, config, preset
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = config.resolved_precision(self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise InvalidConfig("fp16 mixed precision needs a CUDA device; use bf16 or no",
                                {"device": str(self.device)})
        if self.precision == "fp16" and config.optimizer_in_backward:
            raise InvalidConfig("optimizer_in_backward cannot be combined with fp16 (the loss scaler needs every "
                                "gradient first); use bf16")
        self.autocast_dtype = _AUTOCAST_DTYPES.get(self.precision)
        self.plans = plan_stages(config, len(examples))
        self.total = sum(p.steps for p in self.plans)
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.output_dir / "checkpoints"
        self.on_progress, self.should_stop, self.on_checkpoint = on_progress, should_stop, on_checkpoint
        self.callbacks = list(callbacks)
        # Adapter snapshots before the end (checkpoint selection); the finished adapter is the last one.
        self.snapshot_steps = sorted({int(s) for s in snapshot_steps if 0 < int(s) < self.total})
        self.snapshots: dict[int, Path] = {}
        self.class_images_dir = class_images_dir
        # A checkpoint resumes only the same config and data on the same kind of device and precision.
        self.fingerprint = "-".join([config.fingerprint(), data_fingerprint(examples, tokens, preset),
                                     self.device.type, self.precision, f"v{ckpt.FORMAT_VERSION}"])
        self.trains_unet = any(p.train_unet for p in self.plans)
        self.trains_text_encoder = any(p.train_text_encoder for p in self.plans)
        self.lora_spec = LoraSpec(config.unet_rank, config.text_encoder_rank, config.lora_alpha)
        self.metrics: dict[str, Any] = {"load_s": 0.0, "caching_s": 0.0}
        self.eval_history: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self._started = time.perf_counter()
        self._reset_state()

    def _reset_state(self) -> None:
        self.pipe = None
        self.family = self.preset.family
        self.encoders: list[EncoderTokens] = []
        self.schedule: SampleSchedule | None = None
        self.data: CachedData | None = None
        self.trainables: Trainables | None = None
        self.optimizer = self.accelerator = self.generator = self.noise_scheduler = None
        self.unet_forward = self.attention_store = None
        self.stage_text = self.stage_class_text = None
        self.active: list[torch.nn.Parameter] = []

    # ------------------------------------------------------------------ the whole run

    def run(self, base=None) -> TrainResult:
        """Train on ``base`` (a loaded pipeline, restored bit for bit afterwards, whatever happens) or,
        when None, on a freshly loaded copy of ``preset.base_model``."""
        from pipelines.training.base import BaseNotRestored, BaseSnapshot, BaseWeights

        self._started = started = time.perf_counter()
        raise_if_canceled(self.should_stop)
        shutil.rmtree(self.output_dir / "snapshots", ignore_errors=True)  # an earlier run's are not this run's
        snapshot = None
        result = None
        try:
            # 1. The base.
            if base is None:
                self.pipe = self.load_base()  # imports included
                self.metrics["load_s"] = time.perf_counter() - started
            else:
                snapshot = BaseSnapshot.record(base)
                self.pipe = base
                self.check_base(base)
            raise_if_canceled(self.should_stop)
            # 2-3. Tokens and cache.
            self.prepare_tokens()
            self.cache()
            raise_if_canceled(self.should_stop)
            # 4-5. Trainables, optimizer, resume.
            setup_started = time.perf_counter()
            self.setup()
            start_step = self.resume()
            self.metrics["setup_s"] = time.perf_counter() - setup_started
            # 6. The stages.
            self.train_stages(start_step)
            # 7. The adapter.
            result = self.save()
        finally:
            reload = self.changed_weights() if snapshot is not None else None
            self.release()
            if snapshot is not None:
                restore_started = time.perf_counter()
                try:
                    snapshot.restore(reload, BaseWeights(self.preset.base_model, self.preset.revision))
                except Exception as exc:
                    raise BaseNotRestored(f"the lent base pipeline could not be restored: {exc}") from exc
                self.metrics["restore_s"] = time.perf_counter() - restore_started
        result.metrics.update(restore_s=self.metrics.get("restore_s", 0.0), wall_s=time.perf_counter() - started)
        return result

    # ------------------------------------------------------------------ 1. the base

    def load_base(self):
        import accelerate  # noqa: F401  (imports are part of loading)
        import diffusers  # noqa: F401
        import peft  # noqa: F401

        dtype = self.autocast_dtype or torch.float32  # mixed precision: frozen weights in half precision
        pipe = load_base_pipeline(self.preset, self.device, dtype)
        self.check_encoders(pipe)
        return pipe

    def check_encoders(self, pipe) -> None:
        if text_encoder_names(pipe) != sorted(self.family.encoder_names):
            raise InvalidConfig(f"the base pipeline's text encoders {text_encoder_names(pipe)} are not the "
                                f"{self.family.name} family's {list(self.family.encoder_names)}",
                                {"family": self.family.name})

    def check_base(self, pipe) -> None:
        """A lent base must suit the run; checked before anything on it changes."""
        self.check_encoders(pipe)
        if pipe.unet.device.type != self.device.type:
            raise InvalidConfig(f"the lent base is on {pipe.unet.device}, the run on {self.device}")
        if self.precision == "no" and pipe.unet.dtype != torch.float32:
            raise InvalidConfig(f"mixed_precision 'no' needs an fp32 base; this one is {pipe.unet.dtype} "
                                "(use 'auto' or 'bf16')", {"dtype": str(pipe.unet.dtype)})
        if self.config.mode == "full":
            from pipelines.training.base import BaseWeights

            weights = BaseWeights(self.preset.base_model, self.preset.revision)
            for component in ("unet", *self.family.encoder_names):
                weights.files(component)  # full mode restores from these files: fail now, not after training

    # ------------------------------------------------------------------ 2. tokens

    def prepare_tokens(self) -> None:
        """Per text encoder, a tokenizer copy with the new tokens and their initial rows (the instance token
        initialised in each encoder from that encoder's own embedding of the init word, as in pivotal
        tuning); the pipeline is not changed yet."""
        from pipelines.training.tokens import add_tokens, initial_rows

        generator = torch.Generator().manual_seed(self.config.seed)
        new = list(self.tokens.new_tokens)
        self.encoders = []
        for slot, encoder, tokenizer in encoders_of(self.pipe, self.family):
            rows = initial_rows(self.config, tokenizer, encoder.get_input_embeddings(), self.tokens.instance_token,
                                self.tokens.class_token, new, generator)
            tokenizer, first_id = add_tokens(tokenizer, new)
            self.encoders.append(EncoderTokens(slot, encoder, tokenizer, first_id, rows))

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e.encoder for e in self.encoders]

    def encode_text(self, ids: tuple[torch.Tensor, ...]) -> TextConditioning:
        return encode([e.slot for e in self.encoders], self.text_encoders, ids)

    # ------------------------------------------------------------------ 3. cache

    def cache(self) -> CachedData:
        """Encode the images the run will draw (batched), once; class images, token ids and masks."""
        started = time.perf_counter()
        config, pipe = self.config, self.pipe
        class_images: list[Image.Image] = []
        if config.prior_preservation:
            class_images = _class_images(pipe, config, self.tokens, self.preset, self.class_images_dir)
        self.schedule = schedule = SampleSchedule.draw(config.seed, self.total, config.batch_size, len(self.examples),
                                                       config.flip, len(class_images))
        n_images = len(schedule.used_images()) + len(schedule.used_classes())
        progress = StageProgress(self.on_progress, Stage.CACHING, n_images)
        progress.start("encoding photos")
        side = None
        if config.attention_loss_weight > 0:
            from pipelines.training.attention import recorded_resolution

            scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
            side = recorded_resolution(pipe.unet, self.preset.resolution // scale)
        self.data = cache_data(
            pipe.vae, [e.tokenizer for e in self.encoders], self.examples, schedule,
            resolution=self.preset.resolution, flip=config.flip, device=self.device,
            instance_token=self.tokens.instance_token,
            class_prompt=config.class_prompt.format(class_token=self.tokens.class_token),
            class_images=class_images, attention_side=side, size_conditioning=self.family.size_conditioning,
            on_images=progress.advance,
        )
        self.metrics["caching_s"] += time.perf_counter() - started
        self.metrics["vae_images"] = self.data.vae_images
        return self.data

    # ------------------------------------------------------------------ 4. setup

    def setup(self) -> None:
        """Install the token rows, LoRA adapters or full weights as fp32 trainables; optimizer; CUDA paths."""
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params

        from pipelines.training.optim import OptimizerInBackward, adamw
        from pipelines.training.tokens import TokenRowsEmbedding

        config, device, pipe = self.config, self.device, self.pipe
        unet, text_encoders = pipe.unet, self.text_encoders
        for module in (unet, pipe.vae, *text_encoders):
            module.requires_grad_(False)

        # Token rows: the only part of each encoder's embedding that can change.
        for entry in self.encoders:
            entry.embedding = TokenRowsEmbedding(entry.encoder.get_input_embeddings(), entry.rows_init, entry.first_id)
            entry.encoder.set_input_embeddings(entry.embedding)
            setattr(pipe, entry.slot.tokenizer, entry.tokenizer)

        # Trainable parameters: LoRA adapters or whole components (fp32 masters), plus the token rows.
        if config.mode == "lora":
            from peft import LoraConfig

            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # LoRA init draws from the global RNG: seed it privately
                torch.manual_seed(config.seed)
                if self.trains_unet:
                    unet.add_adapter(LoraConfig(**self.lora_spec.peft_kwargs("unet")))
                if self.trains_text_encoder:
                    for text_encoder in text_encoders:
                        text_encoder.add_adapter(LoraConfig(**self.lora_spec.peft_kwargs("text_encoder")))
            unet_named = [(n, p) for n, p in unet.named_parameters() if "lora_" in n]
            te_named = [(f"{e.slot.encoder}.{n}", p) for e in self.encoders
                        for n, p in e.encoder.named_parameters() if "lora_" in n]
        else:
            unet_named = list(unet.named_parameters()) if self.trains_unet else []
            te_named = [(f"{e.slot.encoder}.{n}", p) for e in self.encoders for n, p in e.encoder.named_parameters()
                        if self.trains_text_encoder and ".token_embedding." not in n]
        for _, p in unet_named + te_named:
            p.requires_grad_(True)
        cast_training_params([unet, *text_encoders], dtype=torch.float32)  # the trainables only; frozen stay as lent
        rows = {e.rows_name: e.embedding.rows for e in self.encoders}
        self.trainables = Trainables(
            unet=[p for _, p in unet_named], text_encoder=[p for _, p in te_named], rows=list(rows.values()),
            named={**{f"unet.{n}": p for n, p in unet_named}, **dict(te_named), **rows})
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.trains_text_encoder:
                for text_encoder in text_encoders:
                    text_encoder.gradient_checkpointing_enable()
        unet.train()
        for text_encoder in text_encoders:
            text_encoder.train()
        if config.attention_loss_weight > 0:
            from pipelines.training.attention import install_recorder

            self.attention_store = install_recorder(unet, self.data.latents.shape[-1])

        # Noise schedule, on the device once (add_noise, get_velocity and compute_snr then never copy).
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise InvalidConfig(f"prediction type {self.noise_scheduler.config.prediction_type!r} is not supported")

        # One optimizer for the run (a component outside its stage has no gradient and no update).
        groups = [
            {"params": self.trainables.unet, "lr": config.resolved_unet_lr, "weight_decay": config.weight_decay},
            {"params": self.trainables.text_encoder, "lr": config.resolved_text_encoder_lr,
             "weight_decay": config.weight_decay},
            {"params": self.trainables.rows, "lr": config.token_lr, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.accelerator = make_accelerator(self.precision, device)
        if config.optimizer_in_backward:
            self.optimizer = OptimizerInBackward(groups, lambda g: adamw(g, device, config.use_8bit_adam),
                                                 config.max_grad_norm)
        else:
            self.optimizer = self.accelerator.prepare_optimizer(adamw(groups, device, config.use_8bit_adam),
                                                                device_placement=False)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)

        # CUDA only: channels-last convolutions and TF32 matmuls (restored with the base), compiled U-Net.
        self.unet_forward = unet
        if device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if config.compile:
            self.unet_forward = torch.compile(unet)

    # ------------------------------------------------------------------ 5. resume

    def resume(self) -> int:
        """Load the newest compatible checkpoint in ``checkpoint_dir``; returns the step to continue from."""
        if not self.config.resume:
            return 0
        folder = ckpt.latest_checkpoint(self.checkpoint_dir, self.fingerprint)
        if folder is None:
            return 0
        try:
            checkpoint = ckpt.load_checkpoint(folder)
            if set(checkpoint.trainables) != set(self.trainables.named):
                raise ValueError("its trainable tensors differ from this run's")
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            log.warning("not resuming from %s: %s", folder, exc)
            return 0
        with torch.no_grad():
            for name, param in self.trainables.named.items():
                param.copy_(checkpoint.trainables[name])
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.generator.set_state(checkpoint.generator)
        if self.accelerator.scaler is not None and checkpoint.scaler:
            self.accelerator.scaler.load_state_dict(checkpoint.scaler)
        return checkpoint.step

    # ------------------------------------------------------------------ 6. stages and steps

    def train_stages(self, start_step: int = 0) -> None:
        """Run every stage from ``start_step``: per-step cancel check, progress, checkpoints, callbacks."""
        self.metrics["resumed_from_step"] = start_step
        if start_step == 0 and self.callbacks:
            self.run_callbacks(0, self.plans[0].name, force=True)
        step = steps_done = 0
        train_started = time.perf_counter()
        for index, plan in enumerate(self.plans):
            stage_start, stage_end = step, step + plan.steps
            if stage_end <= start_step:
                step = stage_end
                continue
            self.begin_stage(index, stage_start)
            progress = StageProgress(self.on_progress, plan.name, plan.steps)
            # the first stage run after a checkpoint, also when the checkpoint is exactly where this stage begins
            resuming = start_step > 0 and start_step >= stage_start
            if resuming:
                progress.start(f"resumed from checkpoint at step {start_step}", resumed_from_step=float(start_step))
            else:
                progress.start()
            if start_step > step:
                progress.advance(start_step - step)
                step = start_step
            meter = LossMeter(self.device)
            stage_started, stage_steps, unreported = time.perf_counter(), 0, 0
            while step < stage_end:
                try:
                    raise_if_canceled(self.should_stop)
                except Preempted as exc:  # handed back: the next worker continues from this very step
                    exc.details["checkpoint_step"] = self.checkpoint_on_preemption(step, start_step)
                    raise
                meter.add(self.training_step(step))
                step += 1
                steps_done += 1
                stage_steps += 1
                unreported += 1
                if unreported == self.config.progress_every or step == stage_end:
                    meter.close_window()
                    done = meter.ready(wait=step == stage_end)  # waits only at the end of a stage
                    self.losses += done
                    rate = stage_steps / max(time.perf_counter() - stage_started, 1e-9)
                    metrics = {"steps_per_s": rate, "step": float(step)}
                    if done:
                        metrics["loss"] = done[-1]
                    progress.advance(unreported, **metrics)
                    unreported = 0
                if self.config.checkpoint_every and step % self.config.checkpoint_every == 0 and step < self.total:
                    self.save_checkpoint(step)
                if step in self.snapshot_steps:
                    self.save_snapshot(step)
                if self.callbacks and step < self.total:
                    self.run_callbacks(step, plan.name)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_s = time.perf_counter() - train_started
        self.metrics.update(train_s=train_s, steps_per_s=steps_done / train_s if train_s > 0 else None)
        if self.callbacks:
            self.run_callbacks(self.total, self.plans[-1].name, force=True)

    def begin_stage(self, index: int, stage_start: int) -> None:
        """Freeze what the stage does not train, drop optimizer state that is never needed again, and
        cache text embeddings when the stage freezes the text encoder and the tokens."""
        from pipelines.training.optim import OptimizerInBackward, forget_state

        plan = self.plans[index]
        self.active = self.trainables.set_stage(plan)
        if isinstance(self.optimizer, OptimizerInBackward):
            self.optimizer.set_active(self.active)
        remaining = [self.trainables.groups(later) for later in self.plans[index:]]
        for i, (params, _) in enumerate(self.trainables.groups(plan)):
            if params and not any(groups[i][1] for groups in remaining):
                forget_state(self.optimizer, params)
        self.stage_text = self.stage_class_text = None
        if plan.train_text_encoder or plan.train_tokens:
            return
        started = time.perf_counter()
        data = self.data
        prompts = self.schedule.used_prompts(stage_start, stage_start + plan.steps)
        with torch.no_grad(), self.accelerator.autocast():
            encoded = self.encode_text(tuple(ids[prompts] for ids in data.ids))
            self.stage_text = TextConditioning.empty_like(encoded, data.ids[0].shape[0])
            self.stage_text.put(prompts, encoded)
            if data.class_ids is not None:
                self.stage_class_text = self.encode_text(data.class_ids)
        self.metrics["caching_s"] += time.perf_counter() - started

    def training_step(self, step: int) -> torch.Tensor:
        """One optimizer step on the batch the schedule draws at ``step``; returns the loss as a device
        tensor (nothing here reads a value back to the host)."""
        config, data, scheduler = self.config, self.data, self.noise_scheduler
        batch = config.batch_size
        index = data.schedule[step]
        prompt_index = data.prompt_of[index]
        latents = data.latents[index]
        time_ids = data.time_ids[index] if data.time_ids is not None else None
        with self.accelerator.autocast():
            if self.stage_text is not None:
                text = self.stage_text[prompt_index]
            else:
                text = self.encode_text(tuple(ids[prompt_index] for ids in data.ids))
            if data.class_latents is not None:
                latents = torch.cat([latents, data.class_latents[data.class_schedule[step]]])
                class_text = self.stage_class_text if self.stage_class_text is not None \
                    else self.encode_text(data.class_ids)
                text = text.cat(class_text.expand(batch))
                if time_ids is not None:
                    time_ids = torch.cat([time_ids, data.class_time_ids.expand(batch, -1)])
            noise = torch.randn(latents.shape, device=self.device, generator=self.generator, dtype=latents.dtype)
            if config.offset_noise:
                noise = noise + config.offset_noise * torch.randn(
                    (latents.shape[0], latents.shape[1], 1, 1), device=self.device, generator=self.generator)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=self.device, generator=self.generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            epsilon = scheduler.config.prediction_type == "epsilon"
            target = noise if epsilon else scheduler.get_velocity(latents, noise, timesteps)
            if self.attention_store is not None:
                self.attention_store.reset(data.instance_position[prompt_index])
            prediction = self.unet_forward(noisy, timesteps, **unet_kwargs(self.family, text, time_ids)).sample
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(scheduler, timesteps)
            per_sample = per_sample * snr.clamp(max=config.min_snr_gamma) / (snr if epsilon else snr + 1)
        loss = per_sample[:batch].mean()
        if data.class_latents is not None:
            loss = loss + config.prior_loss_weight * per_sample[batch:].mean()
        if self.attention_store is not None:
            from pipelines.training.attention import masked_attention_loss

            penalty = masked_attention_loss(self.attention_store, data.outside[index])
            loss = loss + config.attention_loss_weight * penalty
        self.accelerator.backward(loss)  # with optimizer_in_backward, every parameter steps in here
        if config.max_grad_norm and not config.optimizer_in_backward:
            self.accelerator.clip_grad_norm_(self.active, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # gradients never live through the next forward
        return loss.detach()

    def run_callbacks(self, step: int, stage: str, force: bool = False) -> None:
        for callback in self.callbacks:
            every = callback.every or self.config.eval_every
            if force or (every and step % every == 0):
                with torch.no_grad(), self.accelerator.autocast():
                    result = callback.fn(TrainingState(step, self.total, stage, self.pipe, self.tokens, self.examples,
                                                       self.device))
                if result:
                    self.eval_history.append({"step": step, "stage": stage, **result})

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> Path:
        """Write a resumable checkpoint after ``step`` and hand its folder to ``on_checkpoint``."""
        scaler = self.accelerator.scaler
        folder = ckpt.save_checkpoint(self.checkpoint_dir, ckpt.Checkpoint(
            step, self.fingerprint, dict(self.trainables.named), self.optimizer.state_dict(),
            self.generator.get_state(), scaler.state_dict() if scaler is not None else None))
        if self.on_checkpoint is not None:
            self.on_checkpoint(folder)
        return folder

    def checkpoint_on_preemption(self, step: int, start_step: int) -> int | None:
        """The worker is shutting down: checkpoint ``step`` unless one exists for it already; returns the
        step the next run resumes from (None: nothing trained yet)."""
        if step == 0:
            return None
        every = self.config.checkpoint_every
        if step != start_step and not (every and step % every == 0):
            self.save_checkpoint(step)
        return step

    # ------------------------------------------------------------------ snapshots

    def save_snapshot(self, step: int) -> Path:
        """The adapter as it is after ``step``, in ``output_dir/snapshots/step-NNNNNN`` (the same format
        as the finished one; a LoRA snapshot is a few MB, a full-mode one a copy of every trained component)."""
        started = time.perf_counter()
        folder = self.output_dir / "snapshots" / f"step-{step:06d}"
        self.write_adapter(folder, step)
        self.snapshots[step] = folder
        self.metrics["snapshot_s"] = self.metrics.get("snapshot_s", 0.0) + time.perf_counter() - started
        return folder

    # ------------------------------------------------------------------ 7. save

    def save(self) -> TrainResult:
        """Write the adapter folder (replacing an older one) and remove the run's checkpoints."""
        from pipelines.adapters import load_manifest

        started = time.perf_counter()
        self.metrics.update(final_loss=self.losses[-1] if self.losses else None,
                            stages={p.name: p.steps for p in self.plans}, mixed_precision=self.precision,
                            wall_s=time.perf_counter() - self._started)
        adapter_dir = self.output_dir / "adapter"
        self.write_adapter(adapter_dir, self.total)
        manifest = load_manifest(adapter_dir)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)  # the run is complete; nothing left to resume
        self.metrics["save_s"] = time.perf_counter() - started
        metrics = dict(self.metrics)
        if self.eval_history:
            metrics["eval"] = self.eval_history
        return TrainResult(adapter_dir, manifest, metrics, self.total, dict(self.snapshots))

    def write_adapter(self, adapter_dir: Path, steps: int) -> None:
        """The adapter of the current weights in ``adapter_dir`` (replacing an older one there)."""
        from peft.utils import get_peft_model_state_dict

        config, pipe = self.config, self.pipe
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)  # a rerun replaces, never mixes
        new_tokens = list(self.tokens.new_tokens)
        manifest = AdapterManifest(
            mode=config.mode, base_model=self.preset.public_base_model, base_revision=self.preset.revision,
            family=self.family.name, preset=self.preset.name,
            instance_token=self.tokens.instance_token, class_token=self.tokens.class_token, tokens=tuple(new_tokens),
            lora=self.lora_spec if config.mode == "lora" else None, training_config=config.to_dict(),
            steps=steps, metrics=dict(self.metrics),
        )
        token_rows = {token: {e.slot.encoder: e.embedding.rows[i].detach().float().cpu() for e in self.encoders}
                      for i, token in enumerate(new_tokens)}
        if config.mode == "lora":
            save_adapter(adapter_dir, manifest, token_embeddings=token_rows,
                         unet_lora=get_peft_model_state_dict(pipe.unet) if self.trains_unet else None,
                         text_encoder_lora={e.slot.encoder: get_peft_model_state_dict(e.encoder) for e in self.encoders}
                         if self.trains_text_encoder else None)
        else:
            full: dict[str, torch.nn.Module] = {}
            if self.trains_unet:
                full["unet"] = pipe.unet
            if self.trains_text_encoder:
                full.update({e.slot.encoder: e.encoder for e in self.encoders})
            for e in self.encoders:
                e.encoder.set_input_embeddings(e.embedding.base)  # saved with the base vocabulary
            try:
                save_adapter(adapter_dir, manifest, token_embeddings=token_rows, full_components=full)
            finally:
                for e in self.encoders:
                    e.encoder.set_input_embeddings(e.embedding)

    # ------------------------------------------------------------------ after the run

    def changed_weights(self) -> dict[str, list[str]]:
        """Per component, the base weights whose values training changed (full mode)."""
        if self.trainables is None or self.config.mode != "full":
            return {}
        out: dict[str, list[str]] = {"unet": [], **{name: [] for name in self.family.encoder_names}}
        for name in self.trainables.named:
            component, _, rest = name.partition(".")
            if component in out:
                out[component].append(rest)
        return out

    def release(self) -> None:
        """Drop the optimizer, caches and references to the pipeline (hooks removed); on an accelerator, collect
        what they held and give the device's cached blocks back. On the CPU there is no device cache, and a forced
        collection walks the whole heap (0.2 s or more in a worker with its models loaded) to free what the
        cyclic collector frees on its own."""
        from accelerate.utils.memory import clear_device_cache

        from pipelines.training.optim import OptimizerInBackward

        if isinstance(self.optimizer, OptimizerInBackward):
            self.optimizer.close()
        on_device = self.accelerator is not None and self.accelerator.device.type != "cpu"
        self._reset_state()  # the references go first: a collection while they are held frees nothing of them
        if on_device:
            clear_device_cache(garbage_collection=True)


def train(
    examples: Sequence[TrainingExample],
    tokens: TokenSpec,
    config: TrainConfig,
    preset,
    output_dir: str | Path,
    *,
    base=None,
    device: str | torch.device | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: CancelFn | None = None,
    checkpoint_dir: str | Path | None = None,
    on_checkpoint: CheckpointFn | None = None,
    callbacks: Sequence[TrainCallback] = (),
    class_images_dir: str | Path | None = None,
    snapshot_steps: Sequence[int] = (),
) -> TrainResult:
    """Fine-tune ``preset.base_model`` on ``examples``; the adapter lands in ``output_dir/adapter``.

    ``base``: None loads a fresh base pipeline; a loaded pipeline (the worker's shared base, on
    ``device``, used by nothing else meanwhile) is borrowed and restored bit for bit when training
    ends, fails or is canceled; if restoring itself fails, ``BaseNotRestored`` is raised and the
    owner must discard that pipeline.
    Checkpoints go to ``checkpoint_dir`` (default ``output_dir/checkpoints``) every
    ``config.checkpoint_every`` steps, each handed to ``on_checkpoint(folder)`` once written; a run
    continues from the newest compatible checkpoint found there when it starts.
    ``snapshot_steps``: steps after which the adapter so far is also kept, in
    ``output_dir/snapshots/step-NNNNNN`` (``TrainResult.snapshots``; a resumed run has those taken
    after it resumed); see :mod:`pipelines.training.selection`.
    """
    trainer = Trainer(examples, tokens, config, preset, output_dir, device=device, checkpoint_dir=checkpoint_dir,
                      on_progress=on_progress, should_stop=should_stop, on_checkpoint=on_checkpoint,
                      callbacks=callbacks, class_images_dir=class_images_dir, snapshot_steps=snapshot_steps)
    return trainer.run(base)


def _class_images(pipe, config: TrainConfig, tokens: TokenSpec, preset, cache_root) -> list[Image.Image]:
    from pipelines.training.prior import class_images_folder, ensure_class_images

    prompt = config.class_prompt.format(class_token=tokens.class_token)
    root = Path(cache_root) if cache_root is not None else default_cache_dir() / "class-images"
    folder = class_images_folder(root, preset.base_model, preset.revision, prompt, preset.resolution)
    return ensure_class_images(pipe, folder, prompt, config.num_class_images, preset.resolution, seed=config.seed,
                               num_inference_steps=config.class_image_steps)
