"""The capacity model (bench/capacity.py) against queues whose answers are known in closed form."""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
_SPEC = importlib.util.spec_from_file_location("bench_capacity", BENCH / "capacity.py")
capacity = sys.modules["bench_capacity"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(capacity)


def poisson(rate: float, horizon_s: float, seed: int, kind: str = "job"):  # noqa: ANN201
    return ((t, kind) for t in capacity.poisson_arrivals(rate, horizon_s, random.Random(seed)))


def test_m_d_1_mean_wait_and_utilisation_match_the_pollaczek_khinchine_formula():
    rate, service = 0.05, 10.0  # utilisation 0.5
    outcome = capacity.simulate_queue(poisson(rate, 4_000_000, seed=1), 1, lambda kind: service)
    waits = outcome.waits["job"]
    rho = rate * service
    assert statistics.fmean(waits) == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.05)  # 5 s
    assert outcome.utilisation == pytest.approx(rho, abs=0.01)


def test_m_m_1_p95_wait_matches_the_exponential_tail():
    rate, mean_service = 0.05, 10.0
    rng = random.Random(2)
    outcome = capacity.simulate_queue(poisson(rate, 4_000_000, seed=3), 1,
                                      lambda kind: rng.expovariate(1 / mean_service))
    rho, mu = rate * mean_service, 1 / mean_service
    # P(wait > t) = rho * exp(-(mu - lambda) t): the p95 is ln(rho / 0.05) / (mu - lambda) = 46 s
    expected = math.log(rho / 0.05) / (mu - rate)
    assert capacity.percentile(outcome.waits["job"], 95) == pytest.approx(expected, rel=0.06)


def test_d_d_c_needs_exactly_the_workers_that_keep_up():
    every_10_s = [(10.0 * i, "job") for i in range(1000)]
    three = capacity.simulate_queue(iter(every_10_s), 3, lambda kind: 25.0)
    assert max(three.waits["job"]) == 0.0
    two = capacity.simulate_queue(iter(every_10_s), 2, lambda kind: 25.0)
    assert two.waits["job"][-1] > 2000  # 2 x 10 s < 25 s: the queue grows by 2.5 s per job


def test_every_training_brings_its_generations_and_the_job_mix_sets_the_load():
    durations = capacity.JobDurations.from_stages({"train": {"caching": 10, "training:stage1": 20,
                                                             "training:stage2": 30, "intake": 5},
                                                   "generate": {"generating": 8, "ranking": 1, "upscaling": 1,
                                                                "delivering": 0}})
    assert (durations.training_s, durations.generation_s, durations.intake_s) == (60, 10, 5)
    workload = capacity.Workload(subjects_per_day=2_000, duration_cv=0.0)
    outcome = capacity.simulate(workload, durations, workers=4, days=1.0, warmup_s=0.0)
    assert len(outcome.waits["generate"]) == 3 * len(outcome.waits["train"])
    load = capacity.offered_load(workload, durations)  # 2000 x 90 s / 86400 s
    assert load == pytest.approx(2_000 * 90 / 86_400)
    assert outcome.utilisation == pytest.approx(load / 4, rel=0.08)


def test_workers_needed_is_the_smallest_count_that_meets_the_target():
    durations = capacity.JobDurations.from_stages({})
    workload = capacity.Workload(subjects_per_day=5_000)
    workers, outcome = capacity.workers_needed(workload, durations, target_p95_s=60.0)
    assert outcome.p95() <= 60.0 and outcome.workers == workers
    assert workers >= math.ceil(capacity.offered_load(workload, durations))
    assert capacity.simulate(workload, durations, workers - 1).p95() > 60.0
