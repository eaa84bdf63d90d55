"""What a run reads each step, prepared once: which image every step draws, the latents of exactly
those images, token ids, person masks and (per stage) text embeddings.

The sampling schedule is drawn up front from the seed, so caching can encode only the images the
run will draw (never more VAE work than the per-step encode it replaces) and a step reads its batch
by slicing a device tensor (no host round trip).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.types import TrainingExample


def image_tensor(image: Image.Image, resolution: int, mode: str = "RGB") -> torch.Tensor:
    """Centre square crop, resize, to [-1, 1] (RGB) or [0, 1] (masks), CHW float."""
    image = image.convert(mode)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    resample = Image.Resampling.BICUBIC if mode == "RGB" else Image.Resampling.BILINEAR
    image = image.resize((resolution, resolution), resample)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    if mode == "RGB":
        return array.permute(2, 0, 1) * 2.0 - 1.0
    return array.unsqueeze(0)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 4, on_batch: Callable[[int], None] | None = None):
    """Scaled VAE latent means (fp32) of ``pixels`` in batches of ``batch_size``."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        out.append((vae.encode(chunk).latent_dist.mean.float() - shift) * scale)
        if on_batch:
            on_batch(chunk.shape[0])
    return torch.cat(out)


def vae_batch_size(device: torch.device) -> int:
    """Images per VAE encode: larger on GPUs, where a batch costs little more than one image."""
    return 8 if device.type == "cuda" else 4


@dataclass(frozen=True)
class SampleSchedule:
    """Which image (``images``) and class image (``classes``) each step draws, ``[steps, batch]``.

    Image ``i`` is example ``i % n`` flipped when ``i >= n``. Drawn on the CPU from the seed alone,
    so a resumed run draws exactly what the uninterrupted one does.
    """

    images: torch.Tensor
    classes: torch.Tensor | None
    n_examples: int

    @classmethod
    def draw(cls, seed: int, steps: int, batch_size: int, n_examples: int, flip: bool,
             n_class_images: int = 0) -> SampleSchedule:
        generator = torch.Generator().manual_seed(seed)
        n_images = n_examples * (2 if flip else 1)
        images = torch.randint(0, n_images, (steps, batch_size), generator=generator)
        classes = torch.randint(0, n_class_images, (steps, batch_size), generator=generator) if n_class_images else None
        return cls(images, classes, n_examples)

    def used_images(self, start: int = 0, stop: int | None = None) -> list[int]:
        return sorted(set(self.images[start:stop].flatten().tolist()))

    def used_prompts(self, start: int = 0, stop: int | None = None) -> list[int]:
        return sorted({i % self.n_examples for i in self.used_images(start, stop)})

    def used_classes(self) -> list[int]:
        return [] if self.classes is None else sorted(set(self.classes.flatten().tolist()))


@dataclass
class CachedData:
    """Device tensors a step indexes into. Rows of ``latents`` the schedule never draws stay zero."""

    schedule: torch.Tensor  # [steps, batch] image indices, on the device
    prompt_of: torch.Tensor  # [n_images] prompt row of each image
    latents: torch.Tensor  # [n_images, C, h, w]
    ids: tuple[torch.Tensor, ...]  # per text encoder: [n_prompts, 77] token ids
    time_ids: torch.Tensor | None = None  # [n_images, 6] size conditioning (families that use it)
    class_schedule: torch.Tensor | None = None  # [steps, batch] class-image indices
    class_latents: torch.Tensor | None = None  # [n_class_images, C, h, w]
    class_ids: tuple[torch.Tensor, ...] | None = None  # per text encoder: [1, 77]
    class_time_ids: torch.Tensor | None = None  # [1, 6]: class images are whole, uncropped images
    outside: torch.Tensor | None = None  # [n_images, 1, s, s] inverted person masks (attention loss)
    instance_position: torch.Tensor | None = None  # [n_prompts] index of the instance token in ``ids[0]``
    vae_images: int = 0  # images the VAE encoded


def cache_data(vae, tokenizers: Sequence, examples: Sequence[TrainingExample], schedule: SampleSchedule, *,
               resolution: int, flip: bool, device: torch.device, instance_token: str,
               class_prompt: str | None = None, class_images: Sequence[Image.Image] = (),
               attention_side: int | None = None, size_conditioning: bool = False,
               on_images: Callable[[int], None] | None = None) -> CachedData:
    """Encode the images ``schedule`` draws (batched), tokenise prompts for each text encoder's tokenizer,
    build masks and (``size_conditioning``) each image's size/crop numbers: once per run."""
    n = len(examples)
    n_images = n * (2 if flip else 1)
    used = schedule.used_images()
    pixels = torch.stack([_pixels(examples[i % n].image, resolution, flipped=i >= n) for i in used])
    batch = vae_batch_size(device)
    encoded = encode_latents(vae, pixels, batch, on_batch=on_images)
    latents = torch.zeros((n_images, *encoded.shape[1:]), dtype=encoded.dtype)
    latents[used] = encoded.cpu()
    del pixels, encoded

    def tokenize(prompts: list[str]) -> tuple[torch.Tensor, ...]:
        return tuple(tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                               return_tensors="pt").input_ids.to(device) for tokenizer in tokenizers)

    ids = tokenize([e.prompt for e in examples])
    data = CachedData(
        schedule=schedule.images.to(device),
        prompt_of=(torch.arange(n_images) % n).to(device),
        latents=latents.to(device),
        ids=ids,
        vae_images=len(used),
    )
    if size_conditioning:
        data.time_ids = torch.tensor([_size_conditioning(examples[i % n], resolution, flipped=i >= n)
                                      for i in range(n_images)], dtype=torch.float32, device=device)
    if device.type == "cuda":
        data.latents = data.latents.contiguous(memory_format=torch.channels_last)

    if schedule.classes is not None:
        used_classes = schedule.used_classes()
        class_pixels = torch.stack([image_tensor(class_images[i], resolution) for i in used_classes])
        encoded = encode_latents(vae, class_pixels, batch, on_batch=on_images)
        class_latents = torch.zeros((len(class_images), *encoded.shape[1:]), dtype=encoded.dtype)
        class_latents[used_classes] = encoded.cpu()
        data.class_latents = class_latents.to(device)
        data.class_schedule = schedule.classes.to(device)
        data.class_ids = tokenize([class_prompt])
        if size_conditioning:
            data.class_time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                               dtype=torch.float32, device=device)
        data.vae_images += len(used_classes)

    if attention_side is not None:
        instance_id = tokenizers[0].convert_tokens_to_ids(instance_token)
        has_instance = (ids[0] == instance_id).cpu()
        masks = torch.stack([image_tensor(e.mask, resolution, "L") if e.mask is not None
                             else torch.ones(1, resolution, resolution) for e in examples])
        valid = torch.tensor([e.mask is not None for e in examples], dtype=torch.float32).view(-1, 1, 1, 1)
        outside = (1.0 - F.interpolate(masks, size=(attention_side, attention_side), mode="area")) * valid
        outside = outside * has_instance.any(1).float().view(-1, 1, 1, 1)
        if flip:
            outside = torch.cat([outside, outside.flip(-1)])
        data.outside = outside.to(device)
        data.instance_position = has_instance.float().argmax(1).to(device)
    return data


def _size_conditioning(example: TrainingExample, resolution: int, flipped: bool) -> tuple[int, ...]:
    """SDXL's (original size, crop corner, target size) for an example: intake's real crop when known,
    else the image taken whole (its centre square, as ``image_tensor`` cuts it)."""
    if example.crop is not None:
        return example.crop.size_conditioning(resolution, flipped)
    width, height = example.image.size
    side = min(width, height)
    scale = resolution / side
    return (height, width, round((height - side) // 2 * scale), round((width - side) // 2 * scale),
            resolution, resolution)


def _pixels(image: Image.Image, resolution: int, flipped: bool) -> torch.Tensor:
    pixels = image_tensor(image, resolution)
    return pixels.flip(-1) if flipped else pixels
