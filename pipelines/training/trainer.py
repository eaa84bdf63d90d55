"""Staged fine-tuning of a diffusers text-to-image base model into a per-subject adapter.

``train`` reads like a diffusers pipeline: check inputs (before any model loads), then
numbered steps. All per-step work happens on the device: latents, token ids, masks and
noise schedule are staged once, batches are drawn by index with a device generator, and
the loss reaches the host only every ``progress_every`` steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.adapters import AdapterManifest, LoraSpec, save_adapter
from pipelines.errors import InvalidConfig
from pipelines.models.loading import load_base_pipeline
from pipelines.progress import CancelFn, ProgressFn, Stage, StageProgress, raise_if_canceled
from pipelines.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipelines.training.config import StagePlan, TrainConfig, check_config, plan_stages
from pipelines.types import TokenSpec, TrainingExample


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    manifest: AdapterManifest
    metrics: dict[str, Any]
    steps: int


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
        components = json.loads(base_index.read_text())
        if "text_encoder_2" in components:
            raise InvalidConfig("bases with two text encoders (SDXL) are not supported by the trainer yet")


def data_fingerprint(examples: Sequence[TrainingExample], tokens: TokenSpec, preset) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([preset.base_model, preset.revision, preset.resolution, list(tokens.new_tokens),
                              tokens.class_token]).encode())
    for example in examples:
        digest.update(example.prompt.encode() + example.photo_id.encode())
        digest.update(np.asarray(example.image.convert("RGB").resize((16, 16))).tobytes())
        if example.mask is not None:
            digest.update(np.asarray(example.mask.convert("L").resize((16, 16))).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- models


def text_encoder_names(pipe) -> list[str]:
    return sorted(n for n, c in pipe.components.items() if n.startswith("text_encoder") and c is not None)


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids)[0]


def image_tensor(image: Image.Image, resolution: int, mode: str = "RGB") -> torch.Tensor:
    """Centre square crop, resize, to [-1, 1] (RGB) or [0, 1] (masks), CHW float."""
    image = image.convert(mode)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC if mode == "RGB" else Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    if mode == "RGB":
        return array.permute(2, 0, 1) * 2.0 - 1.0
    return array.unsqueeze(0)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 4, on_batch: Callable[[int], None] | None = None):
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        out.append((vae.encode(chunk).latent_dist.mean.float() - shift) * scale)
        if on_batch:
            on_batch(chunk.shape[0])
    return torch.cat(out)


# ---------------------------------------------------------------------------- the training run


@dataclass
class _Trainables:
    unet: list[torch.nn.Parameter] = field(default_factory=list)
    text_encoder: list[torch.nn.Parameter] = field(default_factory=list)
    named: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    rows: torch.nn.Parameter | None = None

    def set_stage(self, plan: StagePlan) -> None:
        for params, on in ((self.unet, plan.train_unet), (self.text_encoder, plan.train_text_encoder),
                           ([self.rows], plan.train_tokens)):
            for p in params:
                p.requires_grad_(on)
                p.grad = None


def train(
    examples: Sequence[TrainingExample],
    tokens: TokenSpec,
    config: TrainConfig,
    preset,
    output_dir: str | Path,
    on_progress: ProgressFn | None = None,
    should_stop: CancelFn | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    callbacks: Sequence[TrainCallback] = (),
    class_images_dir: str | Path | None = None,
) -> TrainResult:
    """Fine-tune ``preset.base_model`` on ``examples``; the adapter lands in ``output_dir/adapter``.

    Periodic checkpoints go to ``checkpoint_dir`` (default ``output_dir/checkpoints``); a
    rerun with the same config and data continues from the newest one.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    started = time.perf_counter()
    # 0. Check inputs: everything that can fail without a model fails here.
    check_inputs(examples, tokens, config, preset)
    raise_if_canceled(should_stop)
    plans = plan_stages(config, len(examples))
    total = sum(p.steps for p in plans)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output_dir / "checkpoints"
    fingerprint = config.fingerprint() + data_fingerprint(examples, tokens, preset)
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    trains_unet = any(p.train_unet for p in plans)
    trains_text_encoder = any(p.train_text_encoder for p in plans)
    lora_spec = LoraSpec(config.unet_rank, config.text_encoder_rank, config.lora_alpha)

    # 1. Load the base components.
    pipe = load_base_pipeline(preset, device, torch.float32)
    if len(text_encoder_names(pipe)) != 1:
        raise InvalidConfig("the trainer supports bases with exactly one text encoder for now")
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    load_s = time.perf_counter() - started
    raise_if_canceled(should_stop)

    # 2. Add the tokens; their rows are the only part of the embedding that can change.
    from pipelines.training.tokens import TokenRowsEmbedding, add_tokens, initial_rows

    torch.manual_seed(config.seed)
    init_generator = torch.Generator().manual_seed(config.seed)
    new_tokens = list(tokens.new_tokens)
    base_embedding = text_encoder.get_input_embeddings()
    rows = initial_rows(config, pipe.tokenizer, base_embedding, tokens.instance_token, tokens.class_token,
                        new_tokens, init_generator)
    pipe.tokenizer, first_id = add_tokens(pipe.tokenizer, new_tokens)
    token_embedding = TokenRowsEmbedding(base_embedding, rows, first_id)
    text_encoder.set_input_embeddings(token_embedding)

    # 3. Trainable parameters: LoRA adapters or whole components, plus the token rows.
    trainables = _Trainables(rows=token_embedding.rows)
    if config.mode == "lora":
        if trains_unet:
            unet.add_adapter(LoraConfig(**lora_spec.peft_kwargs("unet")))
        if trains_text_encoder:
            text_encoder.add_adapter(LoraConfig(**lora_spec.peft_kwargs("text_encoder")))
        if autocast_dtype is not None:  # frozen base weights in half precision, LoRA masters in fp32
            for module in (unet, text_encoder):
                module.to(autocast_dtype)
            token_embedding.rows.data = token_embedding.rows.data.float()
        unet_named = [(n, p) for n, p in unet.named_parameters() if "lora_" in n]
        te_named = [(n, p) for n, p in text_encoder.named_parameters() if "lora_" in n]
    else:
        unet_named = list(unet.named_parameters()) if trains_unet else []
        te_named = [(n, p) for n, p in text_encoder.named_parameters()
                    if trains_text_encoder and ".token_embedding." not in n]
    for n, p in unet_named + te_named:
        p.data = p.data.float()
    trainables.unet = [p for _, p in unet_named]
    trainables.text_encoder = [p for _, p in te_named]
    trainables.named = {**{f"unet.{n}": p for n, p in unet_named}, **{f"text_encoder.{n}": p for n, p in te_named},
                        "tokens": token_embedding.rows}
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if trains_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    unet.train()
    text_encoder.train()

    # 4. Cache latents once: every crop and its flip through the VAE.
    caching_started = time.perf_counter()
    resolution = preset.resolution
    pixels = torch.stack([image_tensor(e.image, resolution) for e in examples])
    if config.flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    n_prompts = len(examples)
    class_pixels = None
    if config.prior_preservation:
        class_pixels = torch.stack([image_tensor(im, resolution) for im in _class_images(pipe, config, tokens, preset,
                                                                                          class_images_dir)])
    caching = StageProgress(on_progress, Stage.CACHING, pixels.shape[0] + (0 if class_pixels is None else len(class_pixels)))
    caching.start("encoding photos")
    latents = encode_latents(vae, pixels, on_batch=lambda n: caching.advance(n))
    class_latents = encode_latents(vae, class_pixels, on_batch=lambda n: caching.advance(n)) \
        if class_pixels is not None else None
    latent_size = latents.shape[-1]
    if not callbacks:
        vae.to("cpu")  # only callbacks (evaluation) decode during training
    prompt_of = torch.arange(pixels.shape[0], device=device) % n_prompts
    ids = pipe.tokenizer([e.prompt for e in examples], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    class_ids = pipe.tokenizer([config.class_prompt.format(class_token=tokens.class_token)], padding="max_length",
                               truncation=True, max_length=pipe.tokenizer.model_max_length,
                               return_tensors="pt").input_ids.to(device)

    store = outside = None
    if config.attention_loss_weight > 0:
        from pipelines.training.attention import install_recorder

        store = install_recorder(unet, latent_size)
        side = round(store.tokens**0.5)
        instance_id = pipe.tokenizer.convert_tokens_to_ids(tokens.instance_token)
        has_instance = (ids == instance_id)
        instance_position = has_instance.float().argmax(1)
        masks = torch.stack([image_tensor(e.mask, resolution, "L") if e.mask is not None
                             else torch.ones(1, resolution, resolution) for e in examples])
        valid = torch.tensor([e.mask is not None for e in examples], dtype=torch.float32)
        outside_one = (1.0 - F.interpolate(masks, size=(side, side), mode="area")) * valid.view(-1, 1, 1, 1)
        outside = torch.cat([outside_one, outside_one.flip(-1)]) if config.flip else outside_one
        outside = (outside.to(device) * has_instance.any(1).float()[prompt_of].view(-1, 1, 1, 1).to(device))
    caching_s = time.perf_counter() - caching_started
    raise_if_canceled(should_stop)

    # Noise schedule, on the device once.
    schedule = pipe.scheduler.config
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(schedule)
    alphas_cumprod = ddpm.alphas_cumprod.to(device)
    n_timesteps = int(ddpm.config.num_train_timesteps)
    prediction_type = ddpm.config.prediction_type

    # 5. Optimizer (one for the run; a component outside its stage simply has no gradient), resume.
    groups = [
        {"params": trainables.unet, "lr": config.resolved_unet_lr, "weight_decay": config.weight_decay},
        {"params": trainables.text_encoder, "lr": config.resolved_text_encoder_lr, "weight_decay": config.weight_decay},
        {"params": [trainables.rows], "lr": config.token_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups)
    else:
        optimizer = torch.optim.AdamW(groups, **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scaler = torch.amp.GradScaler(device.type) if (autocast_dtype == torch.float16 and device.type == "cuda") else None
    generator = torch.Generator(device=device).manual_seed(config.seed)
    start_step = 0
    checkpoint = load_checkpoint(checkpoint_dir, fingerprint) if config.resume else None
    if checkpoint is not None:
        with torch.no_grad():
            for name, param in trainables.named.items():
                param.copy_(checkpoint.trainables[name])
        optimizer.load_state_dict(checkpoint.optimizer)
        generator.set_state(checkpoint.generator)
        if scaler is not None and checkpoint.scaler:
            scaler.load_state_dict(checkpoint.scaler)
        start_step = checkpoint.step
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
        latents = latents.contiguous(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.compile:
        unet.compile()

    def save_state(step: int) -> None:
        save_checkpoint(checkpoint_dir, Checkpoint(step, fingerprint, dict(trainables.named), optimizer.state_dict(),
                                                   generator.get_state(), scaler.state_dict() if scaler else None))

    eval_history: list[dict[str, Any]] = []

    def run_callbacks(step: int, stage: str, force: bool = False) -> None:
        for callback in callbacks:
            if force or (callback.every and step % callback.every == 0):
                with torch.no_grad():
                    result = callback.fn(TrainingState(step, total, stage, pipe, tokens, examples, device))
                if result:
                    eval_history.append({"step": step, "stage": stage, **result})

    # 6. The stages.
    if start_step == 0 and callbacks:
        run_callbacks(0, plans[0].name, force=True)
    step = 0
    losses: list[float] = []
    train_started = time.perf_counter()
    steps_done = 0
    for plan in plans:
        stage_end = step + plan.steps
        if stage_end <= start_step:
            step = stage_end
            continue
        trainables.set_stage(plan)
        active = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        cached_text = cached_class_text = None
        if not (plan.train_text_encoder or plan.train_tokens):
            with torch.no_grad(), autocast():
                cached_text = encode_ids(text_encoder, ids)
                cached_class_text = encode_ids(text_encoder, class_ids) if class_latents is not None else None
        progress = StageProgress(on_progress, plan.name, plan.steps)
        resuming = start_step > step
        progress.start(f"resumed from checkpoint at step {start_step}" if resuming else "")
        if resuming:
            progress.advance(start_step - step)
            step = start_step
        running = torch.zeros((), device=device)
        since_report, stage_started, stage_steps = 0, time.perf_counter(), 0
        while step < stage_end:
            raise_if_canceled(should_stop)
            index = torch.randint(0, latents.shape[0], (config.batch_size,), device=device, generator=generator)
            prompt_index = prompt_of[index]
            batch = latents[index]
            with autocast():
                text = cached_text[prompt_index] if cached_text is not None else encode_ids(text_encoder, ids[prompt_index])
                if class_latents is not None:
                    class_index = torch.randint(0, class_latents.shape[0], (config.batch_size,), device=device,
                                                generator=generator)
                    batch = torch.cat([batch, class_latents[class_index]])
                    class_text = cached_class_text if cached_class_text is not None else encode_ids(text_encoder, class_ids)
                    text = torch.cat([text, class_text.expand(config.batch_size, -1, -1).to(text.dtype)])
                noise = torch.randn(batch.shape, device=device, generator=generator)
                if config.offset_noise:
                    noise = noise + config.offset_noise * torch.randn(
                        (batch.shape[0], batch.shape[1], 1, 1), device=device, generator=generator)
                timesteps = torch.randint(0, n_timesteps, (batch.shape[0],), device=device, generator=generator)
                alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
                noisy = alpha.sqrt() * batch + (1 - alpha).sqrt() * noise
                target = noise if prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * batch
                if store is not None:
                    store.reset(instance_position[prompt_index])
                prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
            per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if config.min_snr_gamma is not None:
                snr = (alpha / (1 - alpha)).view(-1)
                clipped = snr.clamp(max=config.min_snr_gamma)
                per_sample = per_sample * (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1))
            loss = per_sample[: config.batch_size].mean()
            if class_latents is not None:
                loss = loss + config.prior_loss_weight * per_sample[config.batch_size :].mean()
            if store is not None:
                from pipelines.training.attention import masked_attention_loss

                loss = loss + config.attention_loss_weight * masked_attention_loss(store, outside[index])
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(active, config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            steps_done += 1
            stage_steps += 1
            since_report += 1
            running += loss.detach()
            if since_report == config.progress_every or step == stage_end:
                mean_loss = float(running / since_report)  # the only host sync, every few steps
                losses.append(mean_loss)
                rate = stage_steps / max(time.perf_counter() - stage_started, 1e-9)
                progress.advance(since_report, loss=mean_loss, steps_per_s=rate, step=float(step))
                running.zero_()
                since_report = 0
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                save_state(step)
            if callbacks and step < total:
                run_callbacks(step, plan.name)
    train_s = time.perf_counter() - train_started
    if callbacks:
        run_callbacks(total, plans[-1].name, force=True)

    # 7. Save the adapter.
    metrics = {
        "final_loss": losses[-1] if losses else None,
        "steps_per_s": steps_done / train_s if train_s > 0 else None,
        "load_s": load_s,
        "caching_s": caching_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - started,
        "stages": {p.name: p.steps for p in plans},
        "resumed_from_step": start_step,
    }
    if eval_history:
        metrics["eval"] = eval_history
    adapter_dir = output_dir / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)  # a rerun replaces, never mixes
    manifest = AdapterManifest(
        mode=config.mode,
        base_model=preset.base_model,
        base_revision=preset.revision,
        instance_token=tokens.instance_token,
        class_token=tokens.class_token,
        tokens=tuple(new_tokens),
        lora=lora_spec if config.mode == "lora" else None,
        training_config=config.to_dict(),
        steps=total,
        metrics={k: v for k, v in metrics.items() if k != "eval"},
    )
    token_rows = {token: token_embedding.rows[i].detach().float().cpu() for i, token in enumerate(new_tokens)}
    if config.mode == "lora":
        save_adapter(adapter_dir, manifest, token_embeddings=token_rows,
                     unet_lora=get_peft_model_state_dict(unet) if trains_unet else None,
                     text_encoder_lora=get_peft_model_state_dict(text_encoder) if trains_text_encoder else None)
    else:
        full: dict[str, torch.nn.Module] = {}
        if trains_unet:
            full["unet"] = unet
        if trains_text_encoder:
            full["text_encoder"] = text_encoder
        text_encoder.set_input_embeddings(token_embedding.base)  # saved with the base vocabulary
        try:
            save_adapter(adapter_dir, manifest, token_embeddings=token_rows, full_components=full)
        finally:
            text_encoder.set_input_embeddings(token_embedding)
    from pipelines.adapters import load_manifest

    manifest = load_manifest(adapter_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the run is complete; nothing left to resume
    return TrainResult(adapter_dir, manifest, metrics, total)


def _class_images(pipe, config: TrainConfig, tokens: TokenSpec, preset, cache_root) -> list[Image.Image]:
    from pipelines.models.presets import default_cache_dir
    from pipelines.training.prior import class_images_folder, ensure_class_images

    prompt = config.class_prompt.format(class_token=tokens.class_token)
    root = Path(cache_root) if cache_root is not None else default_cache_dir() / "class-images"
    folder = class_images_folder(root, preset.base_model, preset.revision, prompt, preset.resolution)
    return ensure_class_images(pipe, folder, prompt, config.num_class_images, preset.resolution, seed=config.seed,
                               num_inference_steps=config.class_image_steps)
