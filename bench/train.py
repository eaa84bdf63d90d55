"""Training speed and memory, per mode, against a diffusers-training-script-style loop.

    python bench/train.py                       # CPU: tiny preset at 64 px, 40 steps, a few minutes
    python bench/train.py --device cuda --arch sd15-random   # SD 1.5 architecture, random weights,
                                                             # 512x512, batch 1, 500 steps

Each measurement runs in its own process so peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU) belongs to that run alone. The reference
loop restates what ``train_dreambooth_lora.py`` does per step (VAE encode, tokenise and
text-encode every step, host-side image preprocessing, loss read back every step),
with the same model, optimiser and step count, so the ratio isolates the trainer's
caching and staging.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- models and data


def get_bench_preset(arch: str, cache: Path, resolution: int | None = None):
    from pipelines.models.presets import get_preset, with_overrides
    from pipelines.models.sd15_random import build_sd15_random

    tiny = get_preset("tiny", cache)
    if arch == "tiny":
        return with_overrides(tiny, resolution=resolution or tiny.resolution)
    return with_overrides(tiny, name="sd15-random", base_model=str(build_sd15_random(cache / "sd15-random")),
                          resolution=resolution or 512)


def bench_examples(n: int):
    from PIL import Image
    from skimage import data

    from pipelines.types import TokenSpec, TrainingExample

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.cat()]
    examples = [TrainingExample(Image.fromarray(sources[i % len(sources)]), f"<bg{i}> <subj> girl", photo_id=str(i))
                for i in range(n)]
    return examples, TokenSpec("<subj>", "girl", tuple(f"<bg{i}>" for i in range(n)))


# ---------------------------------------------------------------------------- one measurement


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_trainer(args) -> dict:
    from pipelines.training import TrainConfig, train

    preset = get_bench_preset(args.arch, args.cache, args.resolution)
    examples, tokens = bench_examples(args.photos)
    config = TrainConfig(mode=args.mode, max_train_steps=args.steps, mixed_precision=args.precision,
                         checkpoint_every=0, progress_every=25)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train(examples, tokens, config, preset, out, device=args.device)
    wall = time.perf_counter() - started
    m = result.metrics
    return {"loop": f"likeness {args.mode}", "steps": args.steps, "steps_per_s": m["steps_per_s"], "wall_s": wall,
            "load_cache_s": m["load_s"] + m["caching_s"], "train_s": m["train_s"],
            "peak_mb": peak_memory_mb(args.device)}


def run_reference(args) -> dict:
    """A faithful per-step restatement of diffusers' ``train_dreambooth_lora.py`` (LoRA on the U-Net and,
    in stage 1, the text encoder; full mode trains the weights), written here, not copied."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from pipelines.adapters import LoraSpec
    from pipelines.training.trainer import load_base_pipeline

    preset = get_bench_preset(args.arch, args.cache, args.resolution)
    examples, _ = bench_examples(args.photos)
    device = torch.device(args.device)
    started = time.perf_counter()
    pipe = load_base_pipeline(preset, device)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    spec = LoraSpec()
    if args.mode == "lora":
        unet.add_adapter(LoraConfig(**spec.peft_kwargs("unet")))
        text_encoder.add_adapter(LoraConfig(**spec.peft_kwargs("text_encoder")))
        unet_params = [p for n, p in unet.named_parameters() if "lora_" in n]
        te_params = [p for n, p in text_encoder.named_parameters() if "lora_" in n]
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
        unet_params, te_params = list(unet.parameters()), list(text_encoder.parameters())
    for p in unet_params + te_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": unet_params}, {"params": te_params}], lr=1e-4)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    load_s = time.perf_counter() - started
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    rng = np.random.default_rng(0)
    stage1 = round(args.steps * 0.3)
    res = preset.resolution
    train_started = time.perf_counter()
    for step in range(args.steps):
        if step == stage1:  # the staged schedule: text encoder frozen from here on
            for p in te_params:
                p.requires_grad_(False)
                p.grad = None
        example = examples[int(rng.integers(len(examples)))]
        image = example.image.convert("RGB").resize((res, res))
        if rng.random() < 0.5:
            image = image.transpose(0)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
        prompt = example.prompt.replace("<subj>", "sks").split(" ", 1)[1]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            text = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, text).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in unet_params + te_params if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the script logs the loss to its progress bar every step
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - train_started
    return {"loop": f"reference {args.mode}", "steps": args.steps, "steps_per_s": args.steps / train_s,
            "wall_s": time.perf_counter() - started, "load_cache_s": load_s, "train_s": train_s,
            "peak_mb": peak_memory_mb(args.device)}


# ---------------------------------------------------------------------------- driver


def measure(args, loop: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--one", loop, "--mode", mode, "--device", args.device, "--arch", args.arch,
           "--steps", str(args.steps), "--photos", str(args.photos), "--precision", args.precision,
           "--cache", str(args.cache), "--resolution", str(args.resolution)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{loop}/{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default=None, choices=("tiny", "sd15-random"),
                        help="default: tiny on CPU, sd15-random on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="default: 60 on CPU, 500 on CUDA")
    parser.add_argument("--photos", type=int, default=10)
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--precision", default=None, choices=("no", "fp16", "bf16"),
                        help="default: no on CPU, bf16 on CUDA")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: 64 on CPU (tiny preset, 32x32 latents), 512 on CUDA")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--cache", type=Path, default=ROOT / ".likeness" / "bench-models")
    parser.add_argument("--one", choices=("likeness", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.arch = args.arch or ("sd15-random" if gpu else "tiny")
    args.steps = args.steps or (500 if gpu else 40)
    args.resolution = args.resolution or (512 if gpu else 64)
    args.precision = args.precision or ("bf16" if gpu else "no")

    if args.one:
        result = run_trainer(args) if args.one == "likeness" else run_reference(args)
        print(json.dumps(result))
        return

    get_bench_preset(args.arch, args.cache, args.resolution)  # build models once, outside the timings
    rows = []
    for mode in args.modes.split(","):
        ours = measure(args, "likeness", mode)
        rows.append(ours)
        if not args.no_reference:
            ref = measure(args, "reference", mode)
            ref["ratio"] = ref["train_s"] / ours["train_s"]
            rows.append(ref)
    print(f"\ndevice={args.device} arch={args.arch} steps={args.steps} photos={args.photos} "
          f"precision={args.precision} date={time.strftime('%Y-%m-%d')}")
    print("| loop | steps/s | wall s | load+cache s | train s | peak MB | ref/ours train time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        print(f"| {r['loop']} | {r['steps_per_s']:.2f} | {r['wall_s']:.1f} | {r['load_cache_s']:.1f} | "
              f"{r['train_s']:.1f} | {r['peak_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
