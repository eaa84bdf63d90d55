"""Cross-attention maps of the instance token, for the masked attention penalty.

A processor on every cross-attention layer computes attention explicitly (to see the
probabilities) only at the recorded resolution; every other layer keeps PyTorch SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


class AttentionMapStore:
    def __init__(self, tokens: int):
        self.tokens = tokens  # h*w of the recorded layers
        self.positions: torch.Tensor | None = None  # [batch] instance-token position per sample
        self.maps: list[torch.Tensor] = []

    def mean_map(self) -> torch.Tensor:
        """[batch, side, side] mean over recorded layers and heads."""
        mean = torch.stack(self.maps).mean(0)
        side = round(self.tokens**0.5)
        return mean.reshape(mean.shape[0], side, side)

    def reset(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self.maps = []


class RecordingAttnProcessor:
    def __init__(self, store: AttentionMapStore):
        self.store = store
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        store = self.store
        if (encoder_hidden_states is None or store.positions is None or hidden_states.ndim != 3
                or hidden_states.shape[1] != store.tokens or attn.norm_cross or attn.residual_connection):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [batch*heads, n, tokens]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor
        # The classifier batch may hold prior (class) samples after the instance ones: record those first.
        probs = probs.reshape(batch, attn.heads, probs.shape[1], probs.shape[2])
        n = store.positions.shape[0]
        picked = probs[torch.arange(n, device=probs.device), :, :, store.positions]  # [n, heads, hw]
        store.maps.append(picked.float().mean(1))
        return out


def recorded_resolution(unet, latent_size: int) -> int:
    """The cross-attention resolution closest to latent/4 (16x16 for SD at 512, 64 latents)."""
    config = unet.config
    sizes = [latent_size // 2**i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind]
    if not sizes:
        raise ValueError("the U-Net has no cross-attention blocks")
    return min(sizes, key=lambda s: abs(s - latent_size / 4))


def install_recorder(unet, latent_size: int) -> AttentionMapStore:
    side = recorded_resolution(unet, latent_size)
    store = AttentionMapStore(side * side)
    processors = {
        name: RecordingAttnProcessor(store) if name.endswith("attn2.processor") else proc
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(processors)
    return store


def masked_attention_loss(store: AttentionMapStore, outside: torch.Tensor) -> torch.Tensor:
    """BCE between the instance token's mean map and 0, over pixels outside the person mask."""
    maps = store.mean_map().clamp(0.0, 1.0 - 1e-6)
    if outside.shape[-1] != maps.shape[-1]:
        outside = F.interpolate(outside, size=maps.shape[-2:], mode="area")
    outside = outside.squeeze(1)
    bce = -torch.log1p(-maps)
    return (bce * outside).sum() / outside.sum().clamp(min=1.0)
