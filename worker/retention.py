"""The embedded worker's retention timer: ``core.retention.purge_expired`` every
``purge_interval_s`` from a daemon thread of the worker's main process (distributed mode sends the
same task from ``likeness beat`` instead)."""

from __future__ import annotations

import logging
import threading

from core.config import Settings
from core.retention import purge_expired

log = logging.getLogger(__name__)


class PeriodicPurge:
    def __init__(self, interval_s: float, settings: Settings | None = None, first_delay_s: float = 60.0):
        self.interval_s = max(float(interval_s), 1.0)
        self.first_delay_s = min(first_delay_s, self.interval_s)  # let the worker start its jobs first
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="likeness-retention", daemon=True)

    def start(self) -> PeriodicPurge:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        if self._stop.wait(self.first_delay_s):
            return
        while True:
            try:
                purge_expired(self.settings)
            except Exception:  # noqa: BLE001 - next time; the data stays until a pass succeeds
                log.warning("retention purge failed", exc_info=True)
            if self._stop.wait(self.interval_s):
                return
