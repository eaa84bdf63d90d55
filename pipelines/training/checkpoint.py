"""Resumable training state: trainable tensors, optimizer, sampling RNG, step.

Checkpoints are private to one run (``fingerprint`` ties them to the config and data),
so they use ``torch.save``; only the adapter artifact has to be portable safetensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

NAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    step: int
    fingerprint: str
    trainables: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor
    scaler: dict[str, Any] | None = None


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{NAME}.tmp"
    torch.save({
        "step": checkpoint.step,
        "fingerprint": checkpoint.fingerprint,
        "trainables": {k: v.detach().cpu() for k, v in checkpoint.trainables.items()},
        "optimizer": checkpoint.optimizer,
        "generator": checkpoint.generator.cpu(),
        "scaler": checkpoint.scaler,
    }, tmp)
    os.replace(tmp, folder / NAME)  # a crash mid-write leaves the previous checkpoint intact
    return folder / NAME


def load_checkpoint(folder: Path | None, fingerprint: str) -> Checkpoint | None:
    """The checkpoint in ``folder`` if it belongs to this run, else None."""
    if folder is None or not (folder / NAME).is_file():
        return None
    data = torch.load(folder / NAME, map_location="cpu", weights_only=True)
    if data.get("fingerprint") != fingerprint:
        return None
    return Checkpoint(**data)
