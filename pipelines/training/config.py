"""Training configuration and the checks that run before any model loads."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidConfig
from pipelines.progress import Stage

MODES = ("lora", "full")
STRATEGIES = ("staged", "textual_inversion", "unet_only", "embedding_then_unet", "whole_model")
TOKEN_INITS = ("face", "rare", "class", "random")
PRECISIONS = ("auto", "no", "fp16", "bf16")
# DreamBooth's rare token; a word the tiny vocabulary also has as one token would do as well.
RARE_TOKEN = "sks"


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "lora"
    strategy: str = "staged"  # text encoder + U-Net, then U-Net only (the published method)
    stage1_fraction: float = 0.3
    max_train_steps: int | None = None  # None -> steps_per_photo x photos, capped at max_steps_cap
    steps_per_photo: int = 90
    max_steps_cap: int = 1500
    batch_size: int = 1
    # learning rates per component (LoRA rates are per-LoRA-parameter, full rates per weight)
    unet_lr: float | None = None  # None -> 1e-4 (lora) / 2e-6 (full)
    text_encoder_lr: float | None = None  # None -> 5e-5 (lora) / 1e-6 (full)
    token_lr: float = 5e-3
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    unet_rank: int = 16
    text_encoder_rank: int = 8
    lora_alpha: float | None = None  # None -> alpha == rank
    token_init: str = "face"
    token_init_word: str | None = None  # overrides the word used by "face"/"rare"
    background_token_std: float = 1e-3  # background tokens start as small noise
    flip: bool = True
    min_snr_gamma: float | None = 5.0
    offset_noise: float = 0.0
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 50
    class_prompt: str = "a photo of {class_token}"
    class_image_steps: int = 25  # sampler steps per generated class image
    attention_loss_weight: float = 0.0  # masked cross-attention penalty, off by default
    # "auto": bf16 autocast with fp32 trainable parameters on CUDA (fp16 where the GPU has no bf16), none on CPU
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    # Step each parameter's optimizer from its gradient hook during backward, so the full set of gradients
    # never exists at once (full mode: about 1/4 less memory). Gradient clipping then works per tensor:
    # each gradient is clipped to max_grad_norm * sqrt(numel / trained numel), which keeps the global
    # bound |g| <= max_grad_norm but is stricter than global clipping on tensors with outsized gradients.
    optimizer_in_backward: bool = False
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 200  # steps between resumable checkpoints; 0 -> none
    resume: bool = True  # continue from the newest compatible checkpoint in checkpoint_dir
    progress_every: int = 5
    eval_every: int = 0  # steps between evaluation callbacks; 0 -> only the hook's own schedule

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise InvalidConfig(f"unknown training options {sorted(unknown)}", {"unknown": sorted(unknown)})
        return cls(**data)

    def fingerprint(self) -> str:
        """Identifies the run a checkpoint belongs to (everything but bookkeeping options)."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("checkpoint_every", "resume", "progress_every",
                                                                      "eval_every")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def resolved_unet_lr(self) -> float:
        return self.unet_lr if self.unet_lr is not None else (1e-4 if self.mode == "lora" else 2e-6)

    @property
    def resolved_text_encoder_lr(self) -> float:
        if self.text_encoder_lr is not None:
            return self.text_encoder_lr
        return 5e-5 if self.mode == "lora" else 1e-6

    def resolved_precision(self, device) -> str:
        """``mixed_precision`` with "auto" resolved for ``device``: bf16 on CUDA (fp16 on GPUs without
        bf16), "no" elsewhere."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        import torch

        if torch.device(device).type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass(frozen=True)
class StagePlan:
    name: str  # progress stage, "training:stage1" / "training:stage2"
    steps: int
    train_unet: bool
    train_text_encoder: bool
    train_tokens: bool


def total_steps(config: TrainConfig, n_examples: int) -> int:
    if config.max_train_steps is not None:
        return config.max_train_steps
    return min(config.steps_per_photo * n_examples, config.max_steps_cap)


def plan_stages(config: TrainConfig, n_examples: int) -> list[StagePlan]:
    """The stages a strategy runs, with their step counts (stages with 0 steps dropped)."""
    total = total_steps(config, n_examples)
    first = round(total * config.stage1_fraction)
    stage1, stage2 = Stage.TRAINING_STAGE1, Stage.TRAINING_STAGE2
    plans = {
        "staged": [StagePlan(stage1, first, True, True, True), StagePlan(stage2, total - first, True, False, False)],
        "embedding_then_unet": [StagePlan(stage1, first, False, False, True),
                                StagePlan(stage2, total - first, True, False, False)],
        "textual_inversion": [StagePlan(stage1, total, False, False, True)],
        "unet_only": [StagePlan(stage1, total, True, False, False)],
        "whole_model": [StagePlan(stage1, total, True, True, True)],
    }[config.strategy]
    return [p for p in plans if p.steps > 0]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_config(config: TrainConfig, preset, n_examples: int) -> None:
    """Raise :class:`InvalidConfig` for anything that can never train; loads nothing."""

    def bad(message: str, **details):
        raise InvalidConfig(message, details)

    if config.mode not in MODES:
        bad(f"mode must be one of {MODES}, not {config.mode!r}", mode=config.mode)
    if config.strategy not in STRATEGIES:
        bad(f"strategy must be one of {STRATEGIES}, not {config.strategy!r}", strategy=config.strategy)
    if config.token_init not in TOKEN_INITS:
        bad(f"token_init must be one of {TOKEN_INITS}, not {config.token_init!r}")
    if config.mixed_precision not in PRECISIONS:
        bad(f"mixed_precision must be one of {PRECISIONS}, not {config.mixed_precision!r}")
    if not 0.0 <= config.stage1_fraction <= 1.0:
        bad(f"stage1_fraction must be within [0, 1], got {config.stage1_fraction}",
            stage1_fraction=config.stage1_fraction)
    if n_examples < 1:
        bad("no training examples")
    if config.max_train_steps is not None and config.max_train_steps < 1:
        bad(f"max_train_steps must be at least 1, got {config.max_train_steps}")
    if config.max_train_steps is None and (config.steps_per_photo < 1 or config.max_steps_cap < 1):
        bad("steps_per_photo and max_steps_cap must be at least 1")
    if total_steps(config, n_examples) < 1 or not plan_stages(config, n_examples):
        bad("the configuration trains for zero steps")
    if config.batch_size < 1:
        bad(f"batch_size must be at least 1, got {config.batch_size}")
    for name in ("unet_lr", "text_encoder_lr", "token_lr"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            bad(f"{name} must be positive, got {value}")
    if config.mode == "lora" and (config.unet_rank < 1 or config.text_encoder_rank < 1):
        bad("LoRA ranks must be at least 1")
    if config.min_snr_gamma is not None and config.min_snr_gamma <= 0:
        bad("min_snr_gamma must be positive (or None to disable)")
    if config.attention_loss_weight < 0 or config.offset_noise < 0 or config.prior_loss_weight < 0:
        bad("loss weights must not be negative")
    if config.prior_preservation and config.num_class_images < 1:
        bad("prior preservation needs num_class_images >= 1")
    if config.optimizer_in_backward and config.mixed_precision == "fp16":
        bad("optimizer_in_backward cannot be combined with fp16 (the loss scaler needs every gradient first)")
    if config.checkpoint_every < 0 or config.progress_every < 1:
        bad("checkpoint_every must be >= 0 and progress_every >= 1")
    if config.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            bad("use_8bit_adam needs the optional bitsandbytes package (pip install 'likeness[bnb]')")
    check_base_model(preset.base_model)
    if preset.resolution % 8 or preset.resolution < 32:
        bad(f"preset resolution {preset.resolution} must be a multiple of 8, at least 32")


def check_base_model(base_model: str) -> None:
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InvalidConfig(f"{base_model!r} is not a diffusers pipeline folder (no model_index.json)",
                                {"base_model": base_model})
        return
    looks_like_path = base_model.startswith(("/", ".", "~")) or base_model.count("/") != 1 or "\\" in base_model
    if looks_like_path or not _HUB_ID.match(base_model):
        raise InvalidConfig(f"base model {base_model!r} is neither an existing folder nor a hub id",
                            {"base_model": base_model})
