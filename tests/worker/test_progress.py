"""Job progress from pipeline events: shares from the job plan, monotonic, throttled."""

from __future__ import annotations

import pytest

from likeness.contract.plan import plan_for
from pipelines.progress import ProgressEvent
from worker.progress import JobProgress


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_is_monotonic_across_stages_and_throttled():
    writes = []
    clock = FakeClock()
    progress = JobProgress("train", writes.append, min_interval_s=0.5, clock=clock)
    progress(ProgressEvent("intake", 0.0))
    for i in range(1, 11):  # ten events within 0.1 s: one write (stage change) + the final one
        clock.t += 0.01
        progress(ProgressEvent("intake", i / 10))
    assert [w.progress for w in writes] == [0.0, 10.0]
    clock.t += 1
    progress(ProgressEvent("caching", 0.5, eta_s=3.0))
    clock.t += 1
    progress(ProgressEvent("caching", 0.2))  # a stage restarting its count never moves the job back
    clock.t += 1
    progress(ProgressEvent("training:stage2", 1.0))
    assert [w.stage for w in writes] == ["intake", "intake", "caching", "caching", "training:stage2"]
    values = [w.progress for w in writes]
    assert values == sorted(values) and values[-1] == 100.0
    assert values[2] == pytest.approx(plan_for("train").progress("caching", 0.5))  # shares come from the plan
    assert writes[2].eta_s is not None and writes[2].eta_s > 3.0  # later stages are included


def test_progress_ignores_stages_the_job_kind_does_not_show():
    writes = []
    progress = JobProgress("generate", writes.append, clock=FakeClock())
    progress(ProgressEvent("caching", 0.5))
    assert writes == []


