"""Turn a pipeline's per-stage :class:`ProgressEvent` stream into one job-level progress.

Each stage of a job kind owns a share of 0-100 in the job plan
(:mod:`likeness.contract.plan`), so overall progress moves forward monotonically across
stages, and the ETA covers the stages still to come. Writing to the job record is
throttled; stage changes and completion always go out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from likeness.contract.plan import plan_for
from pipelines.progress import ProgressEvent


@dataclass(frozen=True)
class JobProgressUpdate:
    stage: str
    progress: float  # 0..100, never lower than the previous update
    eta_s: float | None
    message: str = ""
    stage_started: bool = False  # the first update of this stage


class JobProgress:
    """Aggregates stage events of one job; calls ``write`` at most every ``min_interval_s``."""

    def __init__(
        self,
        kind: str,
        write: Callable[[JobProgressUpdate], None],
        *,
        start_progress: float = 0.0,
        min_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        plan = plan_for(kind)
        self.stages = [str(stage) for stage in plan.stages]
        self._share = {stage: plan.share(stage) for stage in self.stages}
        self._write = write
        self._clock = clock
        self._min_interval = min_interval_s
        self._last_write = float("-inf")
        self._stage: str | None = None
        self.progress = float(start_progress)
        self._started = clock()
        self._progress_at_start = float(start_progress)

    def stage_start(self, stage: str) -> float:
        return sum(self._share[s] for s in self.stages[: self.stages.index(stage)])

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage not in self._share:
            return  # a sub-stage this job kind does not show (kept out of the client's view)
        fraction = min(max(float(event.fraction), 0.0), 1.0)
        overall = self.stage_start(event.stage) + self._share[event.stage] * fraction
        self.progress = max(self.progress, min(overall, 100.0))
        stage_changed = event.stage != self._stage
        self._stage = event.stage
        now = self._clock()
        if not stage_changed and fraction < 1.0 and now - self._last_write < self._min_interval:
            return
        self._last_write = now
        self._write(JobProgressUpdate(str(event.stage), round(self.progress, 2), self._eta(event, now), event.message,
                                      stage_started=stage_changed))

    def _eta(self, event: ProgressEvent, now: float) -> float | None:
        """This stage's ETA from the pipeline plus later stages at the job's observed pace."""
        later = sum(self._share[s] for s in self.stages[self.stages.index(event.stage) + 1 :])
        done = self.progress - self._progress_at_start
        elapsed = now - self._started
        seconds_per_point = elapsed / done if done > 0.5 and elapsed > 0 else None
        if event.eta_s is not None:
            current = float(event.eta_s)
        elif seconds_per_point is not None:
            current = seconds_per_point * self._share[event.stage] * (1.0 - min(max(event.fraction, 0.0), 1.0))
        else:
            return None
        if later and seconds_per_point is None:
            return None
        return round(current + (seconds_per_point or 0.0) * later, 1)


class Throttle:
    """True at most once per ``interval_s`` (the first call is always True)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self._interval = interval_s
        self._clock = clock
        self._last = float("-inf")

    def ready(self) -> bool:
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            return True
        return False
