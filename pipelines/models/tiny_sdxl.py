"""Tiny random-weight models with SDXL's layout, built locally from configs (the ``tiny-sdxl`` preset).

What makes SDXL different from SD 1.5 is all here, at toy sizes: two CLIP text encoders (the second
with a projection whose pooled output conditions the U-Net), their tokenizers (CLIP's real
vocabulary; the second pads with ``!`` as SDXL's does), a U-Net with ``addition_embed_type="text_time"``
(pooled text + size/crop micro-conditioning), SDXL-shaped ControlNets, a VAE and Euler. Every
loader, trainer and exporter path runs exactly as with the real weights; images are noise.
Building is deterministic (fixed seeds), so two builds are bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.models import tiny

SEED = 4321
# Bump when a builder changes: the preset lives in a folder named after it.
BUILD_VERSION = 2  # 2: the second encoder wider than the first (as SDXL's 1280 vs 768)
TEXT_HIDDEN = 32  # the first encoder (CLIP ViT-L's 768 in SDXL)
TEXT_HIDDEN_2 = 40  # the second (OpenCLIP bigG's 1280): the U-Net's cross-attention width is their sum
POOLED_DIM = 32  # the second encoder's projection
TIME_EMBED_DIM = 8  # per micro-conditioning number (6 of them)
CROSS_ATTENTION_DIM = TEXT_HIDDEN + TEXT_HIDDEN_2
ADDED_EMBED_DIM = POOLED_DIM + 6 * TIME_EMBED_DIM
SECOND_PAD_TOKEN = "!"

# The parts of the U-Net and its ControlNets that SDXL conditions differently from SD 1.5.
_SDXL_CONDITIONING = dict(
    cross_attention_dim=CROSS_ATTENTION_DIM,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=ADDED_EMBED_DIM,
)


def _text_config(tokenizer, hidden_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def build_stable_diffusion_xl(folder: Path) -> None:
    """An SDXL-shaped pipeline folder: U-Net (text-time), VAE, two text encoders, two tokenizers, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tiny.write_tokenizer(folder / "tokenizer")
    tiny.write_tokenizer(folder / "tokenizer_2", pad_token=SECOND_PAD_TOKEN)
    tokenizer = tiny.load_tokenizer(folder / "tokenizer")
    tokenizer_2 = tiny.load_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=32, **_SDXL_CONDITIONING,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TEXT_HIDDEN_2, projection_dim=POOLED_DIM))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def _vae():
    """The tiny VAE with SDXL's latent scale (0.13025) and its fp32 upcast flag."""
    vae = tiny._tiny_vae()
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    return vae


def build_vae(folder: Path) -> None:
    """A stand-alone VAE with the pipeline's shape, standing in for madebyollin/sdxl-vae-fp16-fix."""
    torch.manual_seed(SEED + 1)
    vae = _vae()
    vae.register_to_config(force_upcast=False)  # the fp16 fix's point: it runs in half precision
    vae.save_pretrained(str(folder), safe_serialization=True)


def build_controlnet(folder: Path, seed_offset: int) -> None:
    """An SDXL-shaped ControlNet (text-time conditioning), output convolutions small but not zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(SEED + 10 + seed_offset)
    controlnet = ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8, norm_num_groups=32,
        conditioning_embedding_out_channels=(8, 16, 16, 32), **_SDXL_CONDITIONING,
    )
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) or "conv_out" in name:
                param.normal_(0.0, 0.05)
    controlnet.save_pretrained(str(folder), safe_serialization=True)
