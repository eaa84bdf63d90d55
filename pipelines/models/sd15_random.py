"""Stable Diffusion 1.5's architecture with random weights, for speed and memory benchmarks.

Timing and memory depend on shapes, not on weight values, so GPU benchmarks run the real
SD 1.5 U-Net, ViT-L/14 text encoder and VAE without downloading anything. The tokenizer is
CLIP's real one (the tiny preset's, built from the vocabulary shipped in ``pipelines/text``), and
the text encoder has SD 1.5's 49,408-row vocabulary, so the embedding matrix is full size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.models import tiny


def sd15_random_pipeline(work: Path, device: str | torch.device | None = None, seed: int = 0):
    """Build the pipeline in memory (on ``device`` directly, so a GPU build skips the CPU copy)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny.write_tokenizer(work / "tokenizer")
    tokenizer = tiny.load_tokenizer(work / "tokenizer")
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    return tiny.assemble_pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def build_sd15_random(folder: Path) -> Path:
    """Save the random SD 1.5 pipeline as a diffusers folder once, so trainers load it by path."""
    if not (folder / "model_index.json").is_file():
        sd15_random_pipeline(folder).save_pretrained(str(folder), safe_serialization=True)
    return folder


def sd15_random_controlnet(unet, seed: int = 0):
    """A ControlNet shaped like lllyasviel's SD 1.5 ControlNets (a copy of ``unet``'s encoder, random zero
    convolutions), on ``unet``'s device and dtype: for timing template mode's pose and canny nets."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.01)
    return net.to(unet.device, unet.dtype).requires_grad_(False).eval()
