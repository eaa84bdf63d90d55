"""Training checkpoints in the blob store, so any worker resumes a training another one lost.

The trainer writes ``<workdir>/checkpoints/step-XXXXXX/`` (``state.pt``, then ``meta.json``) every
``checkpoint_every`` steps (:mod:`pipelines.training.checkpoint`). Each one is mirrored to
``subjects/<subject>/checkpoints/<job>/step-XXXXXX/`` (:func:`core.storage.checkpoint_prefix`):
``meta.json`` is uploaded last and marks the upload complete, then older mirrored steps are
deleted. Before training starts, a worker with nothing newer on its own disk downloads the newest
complete mirrored checkpoint; the trainer resumes from it if it matches the run (same config,
data, device kind and precision) and ignores it otherwise.

The mirrored checkpoints go when the job ends, whatever the outcome (:func:`discard_checkpoints`),
and with the subject (they live under its prefix). A store failure while mirroring is logged and
training continues: the checkpoint only shortens a recovery.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from core.config import Settings
from core.storage import BlobStore, checkpoint_prefix, download_folder, get_blob_store

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step-(\d{6,})$")


def _step(name: str) -> int | None:
    match = _STEP.match(name)
    return int(match.group(1)) if match else None


def mirrored_steps(store: BlobStore, prefix: str) -> dict[int, bool]:
    """Step -> complete (its ``meta.json`` was uploaded) of every checkpoint folder under ``prefix``."""
    from pipelines.training.checkpoint import META_NAME

    steps: dict[int, bool] = {}
    for key in store.list(prefix):
        name, _, file = key.removeprefix(prefix).partition("/")
        step = _step(name)
        if step is not None:
            steps[step] = steps.get(step, False) or file == META_NAME
    return steps


def mirror_checkpoint(store: BlobStore, prefix: str, folder: Path) -> bool:
    """Upload one checkpoint folder (``meta.json`` last), then delete older mirrored ones; False on a
    store failure (logged: training goes on, a recovery would start from an older checkpoint)."""
    from pipelines.training.checkpoint import META_NAME

    step = _step(folder.name)
    target = f"{prefix}{folder.name}/"
    try:
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != META_NAME):
            store.put(target + path.name, path.read_bytes())
        store.put(target + META_NAME, (folder / META_NAME).read_bytes(), "application/json")
        for older in sorted(s for s in mirrored_steps(store, prefix) if step is not None and s < step):
            store.delete_prefix(f"{prefix}step-{older:06d}/")
    except Exception:  # noqa: BLE001 - any store error: the run must not fail for a missed checkpoint
        log.warning("mirroring checkpoint %s to %s failed", folder, target, exc_info=True)
        return False
    return True


def _local_step(checkpoint_dir: Path) -> int:
    """The newest complete checkpoint already on this machine's disk (0: none)."""
    from pipelines.training.checkpoint import read_meta

    if not checkpoint_dir.is_dir():
        return 0
    return max((s for f in checkpoint_dir.iterdir() if (s := _step(f.name)) is not None and read_meta(f)), default=0)


def restore_checkpoint(store: BlobStore, prefix: str, checkpoint_dir: Path) -> int | None:
    """Download the newest complete mirrored checkpoint into ``checkpoint_dir`` unless this machine
    already has one as new; returns the downloaded step, or None."""
    from pipelines.training.checkpoint import read_meta

    complete = [step for step, done in mirrored_steps(store, prefix).items() if done]
    if not complete or max(complete) <= _local_step(checkpoint_dir):
        return None
    step = max(complete)
    name = f"step-{step:06d}"
    staging = checkpoint_dir / f".{name}.download"  # the trainer only looks at step-* folders
    shutil.rmtree(staging, ignore_errors=True)
    download_folder(store, f"{prefix}{name}/", staging)
    if read_meta(staging) is None:  # sizes differ from what meta.json recorded: never resume from it
        log.warning("mirrored checkpoint %s%s is incomplete; training without it", prefix, name)
        shutil.rmtree(staging, ignore_errors=True)
        return None
    shutil.rmtree(checkpoint_dir / name, ignore_errors=True)
    os.replace(staging, checkpoint_dir / name)
    log.info("restored checkpoint %s%s", prefix, name)
    return step


def discard_checkpoints(settings: Settings, subject_id: str, job_id: str, store: BlobStore | None = None) -> int:
    """Delete a job's mirrored checkpoints (it ended: nothing will resume them); returns how many blobs."""
    try:
        return (store or get_blob_store(settings)).delete_prefix(checkpoint_prefix(subject_id, job_id))
    except Exception:  # noqa: BLE001 - the retention purge deletes them later
        log.warning("deleting the checkpoints of job %s failed", job_id, exc_info=True)
        return 0
