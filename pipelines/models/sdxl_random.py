"""SDXL's architecture with random weights, for speed and memory benchmarks (as ``sd15_random`` for SD 1.5).

``full``: SDXL 1.0 base's shapes (U-Net 2.6 B parameters, CLIP ViT-L + OpenCLIP bigG text encoders,
the 4-channel VAE), for GPU benchmarks without a download. ``small``: the same layout (three U-Net
levels, the first without attention, more transformer layers deeper down, two encoders whose hidden
states are concatenated, text-time conditioning) at a width a shared CPU trains in seconds a step,
for comparing loops on CPU. Tokenizers are CLIP's real one (SDXL's second pads with ``!``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.models import tiny

SIZES = {
    "full": {
        "unet": dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                     attention_head_dim=(5, 10, 20), addition_time_embed_dim=256, layers_per_block=2),
        "encoders": ((768, 3072, 12, 12), (1280, 5120, 32, 20)),  # hidden, intermediate, layers, heads
        "pooled": 1280,
        "vae": (128, 256, 512, 512),
    },
    "small": {
        "unet": dict(block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 1, 2),
                     attention_head_dim=(2, 4, 8), addition_time_embed_dim=32, layers_per_block=2),
        "encoders": ((128, 512, 4, 4), (192, 768, 4, 4)),
        "pooled": 192,
        "vae": (32, 64, 64, 64),
    },
}


def sdxl_random_pipeline(work: Path, size: str = "small", device: str | torch.device | None = None, seed: int = 0):
    """Build the pipeline in memory (on ``device`` directly)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shape = SIZES[size]
    tiny.write_tokenizer(work / "tokenizer")
    tiny.write_tokenizer(work / "tokenizer_2", pad_token="!")
    tokenizers = [tiny.load_tokenizer(work / "tokenizer"), tiny.load_tokenizer(work / "tokenizer_2")]
    (hidden_1, *_), (hidden_2, *_) = shape["encoders"]
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=hidden_1 + hidden_2, use_linear_projection=True, addition_embed_type="text_time",
            projection_class_embeddings_input_dim=shape["pooled"] + 6 * shape["unet"]["addition_time_embed_dim"],
            **shape["unet"],
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2,
            block_out_channels=shape["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
        )
        encoders = []
        for index, ((hidden, intermediate, layers, heads), tokenizer) in enumerate(zip(shape["encoders"], tokenizers)):
            config = CLIPTextConfig(
                vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
                projection_dim=shape["pooled"], bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            encoders.append(CLIPTextModelWithProjection(config) if index else CLIPTextModel(config))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


def build_sdxl_random(folder: Path, size: str = "small") -> Path:
    """Save the random SDXL pipeline as a diffusers folder once, so both trainers load it by path."""
    if not (folder / "model_index.json").is_file():
        sdxl_random_pipeline(folder, size).save_pretrained(str(folder), safe_serialization=True)
    return folder
