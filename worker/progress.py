"""Turn a pipeline's per-stage :class:`ProgressEvent` stream into one job-level progress and ETA.

Each stage of a job kind owns a share of 0-100 in the job plan
(:mod:`likeness.contract.plan`), so overall progress moves forward monotonically across
stages. The ETA is measured, not promised. Where the history of earlier jobs like this one
(same kind, preset and size: ``expected_s``, the median seconds of each stage, from
:mod:`worker.stage_history`) is known, a stage that has not reported yet is estimated from it,
and the running stage's rest moves from its history to its own measured pace as its work gets
done. Without history: seconds per progress point, smoothed (an exponentially weighted average
of time over work done, so one slow step moves it a little), for the running stage from its own
steps and for the stages still to come from the job's pace so far, weighted by their shares in
the plan. Reported ETAs never change by more than a factor of two from one report to the next.
Writing to the job record is throttled; stage changes and completion always go out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
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


#: weight of the newest measurement in the smoothed pace (0.3: about the last six reports count)
SMOOTHING = 0.3
#: a stage's own pace takes over from the job's as it runs, fully at this fraction of its work
OWN_PACE_FROM = 0.1
#: between two consecutive reports an ETA changes by at most this factor
MAX_ETA_CHANGE = 2.0


class Pace:
    """Seconds per progress point, smoothed: EWMAs of elapsed time and of work done, divided.

    Time without progress (a long step) counts with the next progress, so a stall raises the pace.
    """

    def __init__(self, clock_start: float, points_start: float):
        self._t, self._points = clock_start, points_start
        self._dt = self._dp = 0.0

    def observe(self, now: float, points: float) -> None:
        dp = points - self._points
        if dp <= 0:
            return
        dt = max(now - self._t, 0.0)
        self._t, self._points = now, points
        if self._dp == 0.0:
            self._dt, self._dp = dt, dp
        else:
            self._dt = SMOOTHING * dt + (1 - SMOOTHING) * self._dt
            self._dp = SMOOTHING * dp + (1 - SMOOTHING) * self._dp

    @property
    def seconds_per_point(self) -> float | None:
        return self._dt / self._dp if self._dp > 0 and self._dt > 0 else None


class JobProgress:
    """Aggregates stage events of one job; calls ``write`` at most every ``min_interval_s``."""

    def __init__(
        self,
        kind: str,
        write: Callable[[JobProgressUpdate], None],
        *,
        start_progress: float = 0.0,
        start_eta: float | None = None,
        min_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        expected_s: Mapping[str, float] | None = None,
    ):
        """``start_progress``, ``start_eta``: where an earlier phase (another worker) left the job, so the
        first ETA reported here is bounded by the last one reported there. ``expected_s``: seconds each
        stage took in earlier jobs like this one (stages without history are left out)."""
        plan = plan_for(kind)
        self.stages = [str(stage) for stage in plan.stages]
        self._share = {stage: plan.share(stage) for stage in self.stages}
        self._write = write
        self._clock = clock
        self._min_interval = min_interval_s
        self._last_write = float("-inf")
        self._stage: str | None = None
        self.progress = float(start_progress)
        self._job_pace = Pace(clock(), self.progress)
        self._stage_pace: Pace | None = None
        self._last_eta: float | None = start_eta if start_eta else None
        self._expected = {stage: float(seconds) for stage, seconds in (expected_s or {}).items() if seconds > 0}

    def stage_start(self, stage: str) -> float:
        return sum(self._share[s] for s in self.stages[: self.stages.index(stage)])

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage not in self._share:
            return  # a sub-stage this job kind does not show (kept out of the client's view)
        fraction = min(max(float(event.fraction), 0.0), 1.0)
        overall = self.stage_start(event.stage) + self._share[event.stage] * fraction
        now = self._clock()
        stage_changed = event.stage != self._stage
        if stage_changed:
            self._stage_pace = Pace(now, max(self.progress, overall))
        self.progress = max(self.progress, min(overall, 100.0))
        self._stage = event.stage
        self._job_pace.observe(now, self.progress)
        self._stage_pace.observe(now, self.progress)
        eta = self._eta(event.stage, fraction)
        if not stage_changed and fraction < 1.0 and now - self._last_write < self._min_interval:
            return
        self._last_write = now
        if eta is not None:
            eta = round(eta, 1)  # as reported: the bound below holds between the numbers a person sees
            if self._last_eta is not None:  # a person watching sees no wild swings
                floor = max(self._last_eta, 1.0)
                eta = min(max(eta, math.ceil(10 * floor / MAX_ETA_CHANGE) / 10),
                          math.floor(10 * floor * MAX_ETA_CHANGE) / 10)
            self._last_eta = eta
        self._write(JobProgressUpdate(str(event.stage), round(self.progress, 2), eta, event.message,
                                      stage_started=stage_changed))

    def _eta(self, stage: str, fraction: float) -> float | None:
        """The running stage's rest, then the stages still to come (None: nothing to go on yet)."""
        job = self._job_pace.seconds_per_point
        later = self.stages[self.stages.index(stage) + 1:]
        current = self._measured_rest(stage, fraction, job)
        if stage in self._expected:  # its history, giving way to its own pace as its work gets done
            prior = self._expected[stage] * (1.0 - fraction)
            current = prior if current is None else fraction * current + (1.0 - fraction) * prior
        if current is None:
            return None
        pace = job or (self._stage_pace.seconds_per_point if self._stage_pace else None) or self._history_pace()
        rest = 0.0
        for following in later:  # by their history, else at the job's pace by their shares
            if following in self._expected:
                rest += self._expected[following]
            elif self._expected:  # jobs like this one ran without it (e.g. refining when no face was redrawn)
                continue
            elif pace is not None:
                rest += pace * self._share[following]
            else:
                return None
        return current + rest

    def _history_pace(self) -> float | None:
        """Seconds per progress point of the stages with history (for a stage without any, such as one
        that earlier jobs skipped, before this job has a pace of its own)."""
        shares = sum(self._share[stage] for stage in self._expected if stage in self._share)
        return sum(s for stage, s in self._expected.items() if stage in self._share) / shares if shares else None

    def _measured_rest(self, stage: str, fraction: float, job: float | None) -> float | None:
        """The running stage's rest at its own pace (the job's until it has run a while)."""
        own = self._stage_pace.seconds_per_point if self._stage_pace else None
        if own is None and job is None:
            return None
        if own is None:
            current = job
        elif job is None:
            current = own
        else:
            weight = min(fraction / OWN_PACE_FROM, 1.0)
            current = weight * own + (1 - weight) * job
        return current * self._share[stage] * (1.0 - fraction)


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

    def reset(self) -> None:
        """The next call is True whenever it comes."""
        self._last = float("-inf")
