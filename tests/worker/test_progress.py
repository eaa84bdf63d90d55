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


# Reports (seconds since the job was queued, stage, fraction of the stage) of a tiny training job as the issue
# recorded it: intake reports its first photos quickly and then waits on a long last step; the GPU phase loads
# its models for 2.5 s, caching reports only its start and end, both training stages report every few steps.
TRAIN_TRACE = [
    (0.2, "intake", 0.0), (0.35, "intake", 0.125), (0.5, "intake", 0.25), (0.6, "intake", 0.375),
    (0.75, "intake", 0.5), (0.9, "intake", 0.625), (1.0, "intake", 0.75), (1.1, "intake", 0.875),
    (3.4, "intake", 1.0),
    # the training phase, on a GPU worker
    (6.5, "caching", 0.0), (11.0, "caching", 1.0),
    (11.0, "training:stage1", 0.0), (13.2, "training:stage1", 0.25), (15.4, "training:stage1", 0.5),
    (17.6, "training:stage1", 0.75), (19.8, "training:stage1", 1.0),
    (19.8, "training:stage2", 0.0), (21.6, "training:stage2", 0.125), (23.3, "training:stage2", 0.25),
    (25.1, "training:stage2", 0.375), (26.8, "training:stage2", 0.5), (28.6, "training:stage2", 0.625),
    (30.4, "training:stage2", 0.75), (32.1, "training:stage2", 0.875), (33.9, "training:stage2", 1.0),
    # checkpoint selection (added to the recording): four snapshots validated, one report each
    (33.9, "selecting", 0.0), (34.5, "selecting", 0.25), (35.1, "selecting", 0.5), (35.7, "selecting", 0.75),
    (36.3, "selecting", 1.0),
]
TRAIN_PHASES = {"intake": 0.0, "caching": 4.0}  # the first stage of each phase: when its worker took it
# the p50 seconds of each stage over earlier jobs of the same kind, preset and size (worker.stage_history)
TRAIN_HISTORY = {"intake": 3.0, "caching": 4.5, "training:stage1": 9.5, "training:stage2": 13.0, "selecting": 2.4}
#: history from before checkpoint selection existed (or from jobs that turned it off): no selecting stage in it
TRAIN_HISTORY_WITHOUT_SELECTING = {k: v for k, v in TRAIN_HISTORY.items() if k != "selecting"}

# A generation that the estimate without history started at "165 s" and that finished in 7.6 s.
GENERATE_TRACE = [
    (1.9, "generating", 0.0), (2.0, "generating", 0.02), (2.9, "generating", 0.25), (3.7, "generating", 0.5),
    (4.5, "generating", 0.75), (5.2, "generating", 1.0), (5.2, "ranking", 0.0), (5.8, "ranking", 1.0),
    (5.8, "upscaling", 0.0), (7.1, "upscaling", 1.0), (7.1, "delivering", 0.0), (7.6, "delivering", 1.0),
]
GENERATE_PHASES = {"generating": 0.0}
GENERATE_HISTORY = {"generating": 3.6, "ranking": 0.7, "upscaling": 1.5, "delivering": 0.5}


def _replay(kind: str, trace, phases, history) -> list[tuple[float, float | None]]:  # noqa: ANN001
    """Replays ``trace`` through the estimator on a fake clock, a new JobProgress per phase (as each worker
    makes one, handed the job's progress and last ETA); returns (reported ETA, true time left) per write."""
    clock, made = FakeClock(), []
    progress, end = None, trace[-1][0]
    for at, stage, fraction in trace:
        if stage in phases and (progress is None or progress._stage != stage):
            clock.t = phases[stage]
            last_eta = next((u.eta_s for _, u in reversed(made) if u.eta_s is not None), None)
            progress = JobProgress(kind, lambda u: made.append((clock.t, u)), clock=clock, expected_s=history,
                                   start_progress=made[-1][1].progress if made else 0.0, start_eta=last_eta)
        clock.t = at
        progress(ProgressEvent(stage, fraction))
    return [(update.eta_s, end - t) for t, update in made]


@pytest.mark.parametrize(("kind", "trace", "phases", "history"), [
    ("train", TRAIN_TRACE, TRAIN_PHASES, TRAIN_HISTORY),
    ("train", TRAIN_TRACE, TRAIN_PHASES, TRAIN_HISTORY_WITHOUT_SELECTING),
    ("generate", GENERATE_TRACE, GENERATE_PHASES, GENERATE_HISTORY),
])
def test_the_eta_of_a_recorded_job_starts_near_the_truth_and_never_jumps_more_than_twice(kind, trace, phases,
                                                                                         history):
    reports = _replay(kind, trace, phases, history)
    assert len(reports) >= 8
    etas = [eta for eta, _ in reports]
    assert None not in etas, reports  # an ETA from the first report on, through caching too
    for before, after in zip(etas, etas[1:]):
        floor = max(before, 1.0)
        assert floor / 2 <= after <= floor * 2, (before, after)
    for eta, left in reports:  # within a factor of two of the time truly left (a second's slack at the end)
        assert left / 2 - 1.0 <= eta <= 2 * left + 1.0, (eta, left, reports)


def test_without_history_the_eta_is_the_measured_one():
    assert _replay("generate", GENERATE_TRACE, GENERATE_PHASES, {}) != _replay(
        "generate", GENERATE_TRACE, GENERATE_PHASES, GENERATE_HISTORY)


def test_a_stage_that_jobs_like_this_one_never_ran_adds_nothing_to_the_eta():
    """History has no ``refining`` (the pass redrew no face in earlier jobs like this one): the first ETA is
    the other stages' history, not history plus a guess for a stage that will most likely not run."""
    writes = []
    history = {"generating": 4.0, "ranking": 1.0, "upscaling": 2.0, "delivering": 0.5}
    progress = JobProgress("generate", writes.append, clock=FakeClock(), expected_s=history)
    progress(ProgressEvent("generating", 0.0))
    assert writes[0].eta_s == 7.5
