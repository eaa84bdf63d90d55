"""Resumable training state: trainable tensors, optimizer, noise RNG, loss scaler, step.

One folder per checkpoint, ``<checkpoint_dir>/step-000200/``::

    state.pt     trainables, optimizer state, noise-generator state, scaler state (torch.save;
                 read back with ``weights_only=True`` and ``mmap=True``: no code runs, no second copy)
    meta.json    step, run fingerprint, format version, and the size of every file; written last

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash never
leaves a half-written ``step-*`` folder; older checkpoints are removed once the new one exists.
Folders are self-contained, so a worker can mirror them to a blob store and another worker can
resume from a copy: :func:`latest_checkpoint` takes the newest folder whose fingerprint matches and
whose files are all present with their recorded sizes, and ignores anything else.

Why not ``accelerate``'s ``save_state``: it would restore process-wide RNGs (python, numpy, torch)
in a worker that serves other jobs, and it unpickles custom state with ``weights_only=False``,
which is unsafe for checkpoints that travel through a blob store. Training samples from private
generators and keeps everything else in plain tensors, so a weights-only file suffices.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
STATE_NAME = "state.pt"
META_NAME = "meta.json"
_FOLDER = re.compile(r"^step-(\d{6,})$")


@dataclass
class Checkpoint:
    step: int
    fingerprint: str
    trainables: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor
    scaler: dict[str, Any] | None = None
    path: Path | None = None


def folder_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(checkpoint_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically as ``checkpoint_dir/step-XXXXXX``; returns that folder."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / folder_name(checkpoint.step)
    tmp = checkpoint_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # torch.save streams each storage to the file; safetensors would first build a full in-memory copy,
    # which for a full-mode U-Net and its optimizer state is gigabytes at the worst moment.
    torch.save({
        "trainables": {k: v.detach() for k, v in checkpoint.trainables.items()},
        "optimizer": checkpoint.optimizer,
        "generator": checkpoint.generator.cpu(),
        "scaler": checkpoint.scaler,
    }, tmp / STATE_NAME)
    meta = {"step": checkpoint.step, "fingerprint": checkpoint.fingerprint, "format": FORMAT_VERSION,
            "files": {STATE_NAME: (tmp / STATE_NAME).stat().st_size}}
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for older in checkpoint_dir.iterdir():  # only the newest is kept
        match = _FOLDER.match(older.name)
        if match and older != final and older.is_dir():
            shutil.rmtree(older, ignore_errors=True)
    return final


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's meta.json if the checkpoint is complete (every file present at its size), else None."""
    try:
        meta = json.loads((folder / META_NAME).read_text())
        files = meta["files"]
        if meta.get("format") != FORMAT_VERSION:
            return None
        if any((folder / name).stat().st_size != size for name, size in files.items()):
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(checkpoint_dir: Path | None, fingerprint: str) -> Path | None:
    """The newest complete checkpoint folder in ``checkpoint_dir`` that belongs to this run."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    candidates = []
    for folder in checkpoint_dir.iterdir():
        match = _FOLDER.match(folder.name)
        if not match or not folder.is_dir():
            continue
        meta = read_meta(folder)
        if meta is None:
            log.warning("ignoring incomplete checkpoint %s", folder)
        elif meta["fingerprint"] == fingerprint and meta["step"] == int(match.group(1)):
            candidates.append((meta["step"], folder))
    return max(candidates)[1] if candidates else None


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read a checkpoint folder (memory-mapped; tensors are copied only where they are used)."""
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} is not a complete checkpoint")
    data = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True, mmap=True)
    return Checkpoint(step=meta["step"], fingerprint=meta["fingerprint"], trainables=data["trainables"],
                      optimizer=data["optimizer"], generator=data["generator"], scaler=data["scaler"], path=folder)
