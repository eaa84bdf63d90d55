"""New-token embeddings trained as full vectors while the vocabulary stays bit-identical."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipelines.errors import InvalidConfig
from pipelines.text.added_tokens import with_added_tokens
from pipelines.training.config import RARE_TOKEN, TrainConfig


class TokenRowsEmbedding(nn.Module):
    """The base embedding (frozen, never written) plus trainable rows for ids >= ``first_id``.

    Looking new ids up in a separate parameter, instead of growing the matrix and masking
    its gradient, keeps every base row exact by construction, also under AdamW's decoupled
    weight decay, and avoids copying the whole matrix each step.
    """

    def __init__(self, base: nn.Embedding, rows: torch.Tensor, first_id: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rows = nn.Parameter(rows.detach().to(base.weight.device, torch.float32).clone())
        self.first_id = first_id

    @property
    def num_embeddings(self) -> int:
        return self.first_id + self.rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects .weight (dtype/device/shape)
        return torch.cat([self.base.weight[: self.first_id], self.rows.to(self.base.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_id
        base = self.base(input_ids.masked_fill(is_new, 0))
        new = self.rows[(input_ids - self.first_id).clamp(0, self.rows.shape[0] - 1)]
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)


def word_embedding(tokenizer, embedding: nn.Embedding, word: str) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidConfig(f"the init word {word!r} tokenizes to nothing")
    return embedding.weight[ids].detach().float().mean(0)


def initial_rows(config: TrainConfig, tokenizer, embedding: nn.Embedding, instance_token: str,
                 class_token: str, new_tokens: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """One row per new token: the instance token per ``config.token_init``, the rest small noise."""
    dim = embedding.embedding_dim
    std = float(embedding.weight.detach().float().std())
    if config.token_init == "face":
        instance = word_embedding(tokenizer, embedding, config.token_init_word or "face")
    elif config.token_init == "rare":
        instance = word_embedding(tokenizer, embedding, config.token_init_word or RARE_TOKEN)
    elif config.token_init == "class":
        instance = word_embedding(tokenizer, embedding, class_token)
    else:
        instance = torch.randn(dim, generator=generator) * std
    rows = torch.randn(len(new_tokens), dim, generator=generator) * config.background_token_std
    rows[list(new_tokens).index(instance_token)] = instance.cpu()
    return rows


def add_tokens(tokenizer, new_tokens: Sequence[str]):
    """A tokenizer with ``new_tokens`` added (``tokenizer`` itself unchanged); returns (tokenizer, first new id)."""
    tokenizer, ids = with_added_tokens(tokenizer, new_tokens)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise InvalidConfig("new token ids are not contiguous", {"ids": ids})
    return tokenizer, ids[0]
