"""Tiny random-weight models, built locally from configs, saved in the same on-disk
layouts as the real ones (diffusers folders, a CLIP folder, a Real-ESRGAN state dict).

The ``tiny`` preset points at these folders, so every loader in the project is
exercised exactly as in production while nothing is downloaded. Images they make are
noise. Building is deterministic (fixed seed), so two builds are bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.text.clip_bpe import END, START, vocabulary

SEED = 1234
# Bump when a builder changes: presets live in a folder named after it, so stale builds are not reused.
BUILD_VERSION = 6  # 5: a canny ControlNet (template mode); 6: CLIP's real vocabulary
CROSS_ATTENTION_DIM = 32
TEXT_HIDDEN = 32
CLIP_PROJECTION = 32


def write_tokenizer(folder: Path, pad_token: str | None = None) -> None:
    """CLIP's real tokenizer (its full BPE vocabulary, shipped in ``pipelines/text``) in the Hugging Face
    layout: a prompt takes exactly as many positions as with SD 1.5, so one that fits CLIP's 77 fits here
    too (a finer vocabulary would cut and warn about prompts that fit), and ``face`` is one token.
    ``pad_token``: SDXL's second tokenizer pads with ``!`` instead of the end token."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab.tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in vocab.merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": START,
                "eos_token": END,
                "unk_token": END,
                "pad_token": pad_token or END,
                "do_lower_case": True,
            }
        )
    )


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def vocab_size(folder: Path) -> int:
    return len(json.loads((folder / "vocab.json").read_text()))


def build_stable_diffusion(folder: Path) -> None:
    """A Stable-Diffusion-1.x-shaped pipeline (U-Net, VAE, CLIP text encoder, tokenizer, Euler)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    write_tokenizer(folder / "tokenizer")
    tokenizer = load_tokenizer(folder / "tokenizer")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = assemble_pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def assemble_pipeline(*, unet, vae, text_encoder, tokenizer):
    """An SD-1.x pipeline from components, with SD 1.5's Euler schedule and no safety checker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_vae(folder: Path) -> None:
    """A stand-alone VAE with the pipeline's shape, standing in for sd-vae-ft-mse."""
    torch.manual_seed(SEED + 1)
    _tiny_vae().save_pretrained(str(folder), safe_serialization=True)


def _tiny_vae():
    """Four blocks, like SD's VAE, so images are downsampled 8x into latents (128 px -> 16x16)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
        sample_size=128,
    )


def build_controlnet(folder: Path, seed_offset: int) -> None:
    from diffusers import ControlNetModel

    torch.manual_seed(SEED + 10 + seed_offset)
    controlnet = ControlNetModel(
        in_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        conditioning_embedding_out_channels=(8, 16, 16, 32),  # 3 stride-2 convs: matches the VAE's 8x
    )
    # A fresh ControlNet's output convolutions are zero-initialised, so it could never change an
    # image; give them small random weights so the condition and its scale are observable.
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) or "conv_out" in name:
                param.normal_(0.0, 0.05)
    controlnet.save_pretrained(str(folder), safe_serialization=True)


def build_clip(folder: Path) -> None:
    """A CLIP dual encoder (stand-in for ViT-L/14) with processor, for class choice, ranking and eval."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    write_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(SEED + 2)
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ).to_dict(),
        projection_dim=CLIP_PROJECTION,
    )
    CLIPModel(config).save_pretrained(str(folder), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))


def build_aesthetic_head(path: Path) -> None:
    """LAION-aesthetic-shaped MLP head over CLIP image embeddings (random weights)."""
    from safetensors.torch import save_file

    torch.manual_seed(SEED + 3)
    dims = [CLIP_PROJECTION, 16, 8, 1]
    tensors = {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layer = torch.nn.Linear(d_in, d_out)
        tensors[f"layers.{i}.weight"] = layer.weight.detach().contiguous()
        tensors[f"layers.{i}.bias"] = layer.bias.detach().contiguous()
    save_file(tensors, str(path))


def build_realesrgan(path: Path, scale: int) -> None:
    """An RRDB (Real-ESRGAN-shaped) upscaler state dict that spandrel recognises."""
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(SEED + 20 + scale)
    # Real-ESRGAN x2 feeds pixel-unshuffled input (shuffle_factor=2) to an x4 body, as the real weights do.
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale,
                   shuffle_factor=2 if scale == 2 else None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
