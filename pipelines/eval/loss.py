"""Denoising loss of a pipeline on fixed images, timesteps and noise: a low-variance
"did training fit the photos" measure, comparable between pipelines and runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image


@torch.no_grad()
def denoising_loss(pipe, images: Sequence[Image.Image], prompts: Sequence[str], resolution: int,
                   timesteps: Sequence[int] = (50, 150, 300, 450, 600, 750, 900), seed: int = 0) -> float:
    """Mean noise-prediction MSE over every (image, timestep) pair with noise fixed by ``seed``."""
    from diffusers import DDPMScheduler

    from pipelines.training.trainer import encode_latents, image_tensor

    device = pipe.unet.device
    latents = encode_latents(pipe.vae, torch.stack([image_tensor(im, resolution) for im in images]))
    ids = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    text = pipe.text_encoder(ids)[0]
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        alpha = schedule.alphas_cumprod[t].to(device)
        noisy = alpha.sqrt() * latents.to(device) + (1 - alpha).sqrt() * noise
        velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        target = noise if schedule.config.prediction_type == "epsilon" else velocity
        step = torch.full((latents.shape[0],), t, device=device)
        prediction = pipe.unet(noisy.to(pipe.unet.dtype), step, encoder_hidden_states=text.to(pipe.unet.dtype)).sample
        losses.append(F.mse_loss(prediction.float(), target.float()).item())
    return sum(losses) / len(losses)
