"""The worker registry: each worker process reports itself in the ``workers`` table.

A background thread writes the process's state (``starting``, ``loading``, ``idle``,
``busy``, ``stopped``), the job it runs, the models it holds and, on a GPU, the memory in
use, every ``interval_s`` and at once when the state changes. The dashboard and
``/metrics`` read the table; a row whose heartbeat is older than the job staleness limit
belongs to a dead process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.config import Settings
from core.db.models import WorkerRecord, utcnow
from core.db.uow import UnitOfWork
from worker.jobs import worker_id

log = logging.getLogger(__name__)


@dataclass
class WorkerStatus:
    """What this process is doing: the job the runner set, and the model manager's state and models."""

    manager: Any = None  # worker.models.ModelManager of this process
    current_job_id: str | None = None
    stopped: bool = False
    changed: threading.Event = field(default_factory=threading.Event)

    @property
    def state(self) -> str:
        """``starting`` | ``loading`` | ``idle`` | ``busy`` | ``stopped``."""
        if self.stopped:
            return "stopped"
        models_state = self.manager.state.value if self.manager is not None else "idle"
        if models_state == "loading" or (models_state == "starting" and not self.current_job_id):
            return models_state
        return "busy" if self.current_job_id else models_state

    def models(self) -> list[dict[str, Any]]:
        return self.manager.heartbeat()["models"] if self.manager is not None else []

    def watch(self, manager: Any) -> None:
        """Report ``manager``'s state changes (loading, ...) as they happen."""
        self.manager = manager
        manager.subscribe(lambda old, new: self.changed.set())
        self.changed.set()

    def job(self, job_id: str | None) -> None:
        self.current_job_id = job_id
        self.changed.set()

    def stop(self) -> None:
        self.stopped = True
        self.changed.set()


#: This process's status (one per worker pool process).
status = WorkerStatus()


def _gpu_memory_bytes() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_allocated())


def report(settings: Settings, queues: Sequence[str], current: WorkerStatus = status) -> None:
    """Write this process's row now."""
    with UnitOfWork(settings) as uow:
        record = uow.session.get(WorkerRecord, worker_id())
        if record is None:
            record = WorkerRecord(name=worker_id(), started_at=utcnow())
            uow.session.add(record)
        record.queues = list(queues)
        record.state = current.state
        record.current_job_id = current.current_job_id
        record.models = current.models()
        record.gpu_memory_bytes = _gpu_memory_bytes()
        record.heartbeat_at = utcnow()


class RegistryHeartbeat:
    """A daemon thread reporting this process every ``interval_s`` and on every state change."""

    def __init__(self, settings: Settings, queues: Sequence[str], interval_s: float,
                 current: WorkerStatus = status):
        self.settings, self.queues, self.interval_s, self.current = settings, list(queues), interval_s, current
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="likeness-registry", daemon=True)

    def start(self) -> RegistryHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.current.stop()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            self.current.changed.clear()
            try:
                report(self.settings, self.queues, self.current)
            except Exception:  # noqa: BLE001 - the registry must never take a worker down
                log.warning("worker registry heartbeat failed", exc_info=True)
            if self._stop.is_set():
                return
            self.current.changed.wait(self.interval_s)
            if self._stop.is_set():
                try:
                    report(self.settings, self.queues, self.current)
                except Exception:  # noqa: BLE001
                    log.warning("worker registry final report failed", exc_info=True)
                return
