"""A family's text encoders during training: new tokens in each, and the conditioning the U-Net takes.

SD 1.5 has one CLIP encoder whose last (normed) hidden states the U-Net attends to. SDXL has two; the
U-Net attends to both penultimate layers side by side and also takes the second one's projected
pooled output, plus six size numbers (original size, crop corner, target size). Which of these a
family uses is read from its :class:`~pipelines.models.family.ModelFamily`; nothing here tests a
family's name, so the trainer runs the same code for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.models.family import ModelFamily, TextEncoderSlot


@dataclass
class EncoderTokens:
    """One text encoder of the lent pipeline with the run's new tokens: its slot in the family, the module,
    a tokenizer copy holding the new tokens, the first new id, and the new tokens' initial rows."""

    slot: TextEncoderSlot
    encoder: nn.Module
    tokenizer: object
    first_id: int
    rows_init: torch.Tensor
    embedding: nn.Module | None = None  # the TokenRowsEmbedding installed by the trainer's setup

    @property
    def rows_name(self) -> str:
        """The token rows' checkpoint key: ``tokens`` for the first encoder (as before SDXL), else suffixed."""
        return "tokens" if self.slot.encoder == "text_encoder" else f"tokens.{self.slot.encoder}"


@dataclass
class TextConditioning:
    """What the U-Net takes from text: attended hidden states and, for families that use it, pooled text."""

    hidden: torch.Tensor  # [n, tokens, width]
    pooled: torch.Tensor | None = None  # [n, pooled width]

    def __getitem__(self, index) -> TextConditioning:
        return TextConditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def expand(self, batch: int) -> TextConditioning:
        return TextConditioning(self.hidden.expand(batch, -1, -1),
                                None if self.pooled is None else self.pooled.expand(batch, -1))

    def cat(self, other: TextConditioning) -> TextConditioning:
        hidden = torch.cat([self.hidden, other.hidden.to(self.hidden.dtype)])
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled.to(self.pooled.dtype)])
        return TextConditioning(hidden, pooled)

    @classmethod
    def empty_like(cls, encoded: TextConditioning, rows: int) -> TextConditioning:
        """Zeros with ``encoded``'s shapes and ``rows`` rows (a cache filled where it is used)."""
        def zeros(t):
            return None if t is None else torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)

        return cls(zeros(encoded.hidden), zeros(encoded.pooled))

    def put(self, index, encoded: TextConditioning) -> None:
        self.hidden[index] = encoded.hidden
        if self.pooled is not None:
            self.pooled[index] = encoded.pooled


def encoders_of(pipe, family: ModelFamily) -> list[tuple[TextEncoderSlot, nn.Module, object]]:
    """``(slot, encoder, tokenizer)`` of each of the family's text encoders on ``pipe``, in the family's order."""
    return [(slot, getattr(pipe, slot.encoder), getattr(pipe, slot.tokenizer)) for slot in family.text_encoders]


def encode(slots: Sequence[TextEncoderSlot], encoders: Sequence[nn.Module],
           ids: Sequence[torch.Tensor]) -> TextConditioning:
    """The U-Net's text conditioning for token ``ids`` (one tensor per encoder), as the family's
    diffusers pipeline computes it (``encode_prompt``)."""
    hidden, pooled = [], None
    for slot, encoder, encoder_ids in zip(slots, encoders, ids):
        wants_layers = slot.hidden_state is not None
        out = encoder(encoder_ids, output_hidden_states=wants_layers)
        hidden.append(out.hidden_states[slot.hidden_state] if wants_layers else out.last_hidden_state)
        if slot.pooled:
            pooled = out.text_embeds
    return TextConditioning(hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1), pooled)


def unet_kwargs(family: ModelFamily, text: TextConditioning, time_ids: torch.Tensor | None) -> dict:
    """The keyword arguments the family's U-Net takes besides the noisy latents and timesteps."""
    kwargs: dict = {"encoder_hidden_states": text.hidden}
    added = {}
    if family.pooled_text:
        added["text_embeds"] = text.pooled
    if family.size_conditioning:
        added["time_ids"] = time_ids.to(text.hidden.dtype)
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs
