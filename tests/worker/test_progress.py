"""Job progress from pipeline events: shares from the job plan, monotonic, throttled."""

from __future__ import annotations

import pytest

from likeness.contract.plan import plan_for
from pipelines.progress import ProgressEvent, StageProgress
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
    progress(ProgressEvent("selecting", 1.0))
    assert [w.stage for w in writes] == ["intake", "intake", "caching", "caching", "selecting"]
    values = [w.progress for w in writes]
    assert values == sorted(values) and values[-1] == 100.0
    assert values[2] == pytest.approx(plan_for("train").progress("caching", 0.5))  # shares come from the plan
    assert writes[2].eta_s is not None


def test_progress_ignores_stages_the_job_kind_does_not_show():
    writes = []
    progress = JobProgress("generate", writes.append, clock=FakeClock())
    progress(ProgressEvent("caching", 0.5))
    assert writes == []




# A training job on a CPU: intake per photo (slow, uneven), caching, then both training stages whose steps
# alternate fast and slow (a step that also checkpoints or evaluates); seconds per unit of work, per stage.
UNEVEN_TRAIN = [
    ("intake", [1.5, 0.5, 1.2, 0.4, 2.0, 0.6, 1.0, 0.8]),
    ("caching", [0.3] * 8),
    ("training:stage1", [0.2, 0.2, 1.4] * 15),
    ("training:stage2", [0.2, 0.2, 1.4] * 35),
    ("selecting", [2.5, 3.5, 2.5, 3.5]),  # each snapshot renders and scores the validation set
]


def _drive(kind: str, stages: list[tuple[str, list[float]]]):
    """Runs the stages through StageProgress (as pipelines report) on a fake clock; returns the writes, each
    with the clock time it was made and the true time left."""
    clock = FakeClock()
    made: list[tuple[float, object]] = []
    progress = JobProgress(kind, lambda update: made.append((clock.t, update)), clock=clock)
    for stage, steps in stages:
        counter = StageProgress(progress, stage, len(steps), clock=clock)
        counter.start()
        for seconds in steps:
            clock.t += seconds
            counter.advance()
    end = clock.t
    return [(t, update, end - t) for t, update in made]


def test_eta_never_jumps_by_more_than_twice_and_converges_on_uneven_steps():
    writes = _drive("train", UNEVEN_TRAIN)
    etas = [(t, u.eta_s, left, u.stage, u.progress) for t, u, left in writes if u.eta_s is not None]
    assert len(etas) > 50
    for (_, before, *_), (_, after, *_) in zip(etas, etas[1:]):
        floor = max(before, 1.0)
        assert floor / 2 <= after <= floor * 2, (before, after)
    # a naive "this stage's steps so far" estimate swings far more on these steps; this one settles: from a
    # third of the last stage on, within a quarter of the truth (plus a second for the last steps)
    stage2_start = plan_for("train").start_of("training:stage2")
    settled = [(eta, left) for _, eta, left, stage, done in etas
               if stage == "training:stage2" and done >= stage2_start + 0.33 * plan_for("train").share(stage)]
    assert settled and all(abs(eta - left) <= 0.25 * left + 1.0 for eta, left in settled), settled
    # during stage 1 the ETA covers stage 2 too (at the job's pace), so it is already the right size
    stage1 = [(eta, left) for _, eta, left, stage, done in etas if stage == "training:stage1" and
              done >= plan_for("train").progress("training:stage1", 0.5)]
    assert stage1 and all(0.5 * left <= eta <= 2.0 * left for eta, left in stage1), stage1
    # the selecting stage is in the estimate from the start: at the end of stage 2 the ETA is its time
    last_of_stage2 = [(eta, left) for _, eta, left, stage, _ in etas if stage == "training:stage2"][-1]
    assert 0.5 * last_of_stage2[1] <= last_of_stage2[0] <= 2.0 * last_of_stage2[1], last_of_stage2


def test_a_phase_on_another_worker_continues_the_eta_it_was_handed():
    """Intake ran on a CPU worker and left the job at 10 % with an ETA of 60 s; the GPU worker's first
    reports stay within a factor of two of it, however fast or slow its first steps are."""
    writes = []
    clock = FakeClock()
    progress = JobProgress("train", writes.append, start_progress=10.0, start_eta=60.0, clock=clock)
    counter = StageProgress(progress, "caching", 4, clock=clock)
    counter.start()
    for _ in range(4):
        clock.t += 0.05  # far faster than the intake's pace
        counter.advance()
    first = next(w.eta_s for w in writes if w.eta_s is not None)
    assert 30.0 <= first <= 120.0
