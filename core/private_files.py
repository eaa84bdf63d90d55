"""The data folder is the operator's alone: folders 700, files 600.

It holds the embedded database (with personal data and encrypted webhook secrets), the broker,
blobs, the signing secret and the admin key. Folders are created private and the data folder is
tightened if it already exists; the SQLite files are made 600 as soon as they exist (SQLite gives
its ``-wal`` and ``-shm`` files the database file's mode); ``likeness serve`` and ``likeness
worker`` also run with umask 077, so every file their processes create is private.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """``path`` created if missing (with parents) and readable by this user only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # a folder this user does not own stays as its owner set it
        path.chmod(0o700)
    return path


def private_file(path: Path) -> None:
    """Make an existing file (and its SQLite ``-wal``/``-shm`` companions, if any) readable by this user only."""
    for candidate in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            candidate.chmod(0o600)


def private_umask() -> None:
    """From now on, files and folders this process (and its children) creates are private."""
    os.umask(PRIVATE_UMASK)
