"""The job plan: one definition of kinds, phases, stages, queues, progress shares and state changes."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from likeness.contract.plan import (
    ALLOWED_TRANSITIONS,
    PLANS,
    TERMINAL_STATES,
    IllegalTransition,
    JobKind,
    JobState,
    Queue,
    Stage,
    plan_for,
    transition,
)

NOW = datetime(2026, 11, 30, tzinfo=UTC)


def job(state: JobState = JobState.QUEUED) -> SimpleNamespace:
    return SimpleNamespace(state=state, error_code=None, error_message=None, progress=0.0, eta_s=12.0,
                           started_at=None, finished_at=None)


def test_every_kind_has_a_plan_whose_shares_add_up_to_100():
    assert set(PLANS) == set(JobKind)
    for plan in PLANS.values():
        assert sum(plan.share(stage) for stage in plan.stages) == pytest.approx(100.0)
        assert plan.progress(plan.stages[-1], 1.0) == pytest.approx(100.0)
        assert len(set(plan.stages)) == len(plan.stages)


def test_progress_is_monotonic_across_the_stages_of_a_plan():
    plan = plan_for("train")
    points = [plan.progress(stage, f) for stage in plan.stages for f in (0.0, 0.5, 1.0)]
    assert points == sorted(points) and points[0] == 0.0
    assert plan.start_of(Stage.CACHING) == plan.share(Stage.INTAKE)


def test_routing_follows_the_first_phase_still_to_run():
    train = plan_for("train")
    assert train.next_queue([]) == Queue.CPU  # intake needs no GPU
    assert train.next_queue(["intake"]) == Queue.GPU
    assert [p.name for p in train.remaining_phases(["intake"])] == ["training"]
    assert plan_for("generate").next_queue([]) == Queue.GPU


def test_the_allowed_state_changes():
    running = job()
    transition(running, JobState.RUNNING, NOW)
    assert running.state == JobState.RUNNING and running.started_at == NOW
    transition(running, JobState.SUCCEEDED, NOW)
    assert (running.progress, running.eta_s, running.finished_at, running.error_code) == (100.0, 0.0, NOW, None)

    failed = job(JobState.RUNNING)
    transition(failed, JobState.FAILED, NOW, code="worker_lost", message="gone")
    assert (failed.error_code, failed.error_message, failed.eta_s) == ("worker_lost", "gone", None)

    canceled = job()
    transition(canceled, JobState.CANCELED, NOW, code="canceled")
    assert canceled.state == JobState.CANCELED and canceled.finished_at == NOW


def test_a_terminal_job_never_changes_state_and_failures_carry_a_code():
    for state in TERMINAL_STATES:
        assert ALLOWED_TRANSITIONS[state] == frozenset()
        for target in JobState:
            with pytest.raises(IllegalTransition):
                transition(job(state), target, NOW, code="x")
    with pytest.raises(IllegalTransition):
        transition(job(JobState.QUEUED), JobState.SUCCEEDED, NOW)
    with pytest.raises(ValueError):
        transition(job(JobState.RUNNING), JobState.FAILED, NOW)


def test_every_phase_of_the_plan_has_a_worker_runner():
    from worker.phases import PHASE_RUNNERS

    assert {(kind, phase.name) for kind, plan in PLANS.items() for phase in plan.phases} == set(PHASE_RUNNERS)
