"""Per-process cache of loaded models: load once, serve many jobs.

A GPU worker runs with ``--concurrency 1``; its pool process keeps engines here between
jobs. Entries are keyed by (what, preset, device); a job borrows an entry under that
entry's lock, so two threads never drive one model at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class ModelCache:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, ...], Any] = {}
        self._locks: dict[tuple[str, ...], threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, key: tuple[str, ...]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    @contextmanager
    def borrow(self, key: tuple[str, ...], load: Callable[[], Any]) -> Iterator[Any]:
        """Yield the model stored under ``key``, loading it with ``load()`` the first time."""
        lock = self._lock_for(key)
        with lock:
            if key not in self._entries:
                log.info("loading %s", "/".join(key))
                self._entries[key] = load()
            yield self._entries[key]

    def __contains__(self, key: tuple[str, ...]) -> bool:
        return key in self._entries

    def clear(self) -> None:
        with self._guard:
            self._entries.clear()


#: The cache of this process (a Celery pool process, or the CLI).
models = ModelCache()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
