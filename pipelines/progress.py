"""Progress reporting and cancellation hooks shared by every pipeline stage.

Pipelines never talk to a database or a terminal: they call ``on_progress`` with a
:class:`ProgressEvent` and poll ``should_stop`` at every step boundary. The worker
turns events into job-record updates, the CLI into progress bars.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pipelines.errors import Canceled


class Stage(StrEnum):
    """The steps of the pipeline a client can see, in the order they run.

    Pipelines emit these names in :class:`ProgressEvent`, so the names live here, in the lowest
    room; the job contract (``likeness.contract.plan``) groups them into phases and job kinds and
    is where the API, the workers, the bot and clients import them from.
    """

    INTAKE = "intake"
    CACHING = "caching"
    TRAINING_STAGE1 = "training:stage1"
    TRAINING_STAGE2 = "training:stage2"
    SELECTING = "selecting"  # each training snapshot renders the validation set; the likest one is kept
    MASKING = "masking"  # template mode: find the template's face, mask face and hair, crop around it
    GENERATING = "generating"
    REFINING = "refining"  # the face-refinement pass (when the job asks for it)
    RANKING = "ranking"
    UPSCALING = "upscaling"
    DELIVERING = "delivering"


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    fraction: float  # 0..1 within the stage
    eta_s: float | None = None  # seconds left in this stage, None until it can be estimated
    message: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


def no_progress(_: ProgressEvent) -> None:
    return None


def never_stop() -> bool:
    return False


def raise_if_canceled(should_stop: CancelFn | None) -> None:
    if should_stop is not None and should_stop():
        raise Canceled("canceled by request")


class StageProgress:
    """Counts work units in one stage and emits events with a throughput-based ETA.

    Events are throttled to ``min_interval_s`` except the first and the last, so a
    fast loop does not flood the job record.
    """

    def __init__(
        self,
        on_progress: ProgressFn | None,
        stage: str,
        total: int,
        min_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._emit = on_progress or no_progress
        self.stage = stage
        self.total = max(int(total), 1)
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._last_emit = float("-inf")
        self._min_interval = min_interval_s

    def start(self, message: str = "", **metrics: float) -> None:
        self._emit(ProgressEvent(self.stage, 0.0, None, message, metrics))
        self._last_emit = self._clock()

    def advance(self, n: int = 1, message: str = "", **metrics: float) -> None:
        self.done = min(self.done + n, self.total)
        now = self._clock()
        finished = self.done >= self.total
        if not finished and now - self._last_emit < self._min_interval:
            return
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        metrics = {**metrics, "done": float(self.done), "total": float(self.total)}
        self._emit(ProgressEvent(self.stage, self.done / self.total, eta, message, metrics))
        self._last_emit = now
