"""A folder of files mirrored to and from a blob prefix (datasets, adapters, checkpoints)."""

from __future__ import annotations

from pathlib import Path

from core.storage import BlobStore


def upload_folder(store: BlobStore, folder: Path, prefix: str) -> list[str]:
    """Mirror ``folder`` to ``prefix``: stale keys from an earlier run are removed first."""
    store.delete_prefix(prefix)
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(folder).as_posix()
        store.put(key, path.read_bytes())
        keys.append(key)
    return keys


def download_folder(store: BlobStore, prefix: str, folder: Path) -> Path:
    keys = store.list(prefix)
    if not keys:
        raise FileNotFoundError(f"nothing stored under {prefix}")
    for key in keys:
        target = folder / key.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(key))
    return folder
