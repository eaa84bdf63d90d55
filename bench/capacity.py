"""How many GPU workers a load needs: a discrete-event simulation of the gpu queue.

    python bench/capacity.py                                   # the RESULTS.md table (1k, 10k, 100k subjects a day)
    python bench/capacity.py --subjects-per-day 25000 --target-p95-s 120
    python bench/capacity.py --durations stages.json           # measured stage durations instead of the defaults

Each subject is one training and three generations (the job mix of the mobile app and the bot: a person
trains once, then asks for three styles). A subject arrives (Poisson, optionally swinging over the day),
its photos go through intake on the cpu queue (a fixed delay here: cpu workers are cheap to add), its
training phase waits for a GPU worker, and when it ends the three generations join the gpu queue at once.
Each GPU worker runs one job at a time, first come first served, as ``likeness worker --queues gpu
--concurrency 1`` does. The wait of a job is the time from joining the queue to starting on a worker; the
answer is the smallest worker count whose p95 wait over every GPU job stays under the target.

Stage durations are the seconds of each stage of a job, the same ``kind -> stage -> seconds`` the dashboard
shows (``app/services/overview.py``: the p50 column, or better the mean); a job's GPU time is the sum of the
stages of its gpu phase (``likeness.contract.plan``). ``--durations FILE`` reads them as JSON, e.g.
``{"train": {"caching": 5, "training:stage1": 25, "training:stage2": 60}, "generate": {"generating": 10}}``;
stages left out keep their defaults. The defaults are ESTIMATES for SD 1.5 on one H100-class GPU (no GPU was
lent to the session that wrote this): replace them with a deployment's measured ones.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from likeness.contract.plan import PLANS, JobKind, Queue

DAY_S = 86_400.0

#: ESTIMATED seconds per stage for SD 1.5 on one H100-class GPU (README "How long it takes": training 1-2 min
#: for 5 photos, 8 candidates ranked and upscaled in 10-20 s), and intake on a CPU worker. Not measured.
DEFAULT_STAGE_SECONDS: dict[str, dict[str, float]] = {
    "train": {"intake": 8.0, "caching": 5.0, "training:stage1": 25.0, "training:stage2": 60.0},
    "generate": {"generating": 10.0, "ranking": 1.5, "upscaling": 2.5, "delivering": 1.0},
}


@dataclass(frozen=True)
class JobDurations:
    """Seconds of GPU work per job kind, and the cpu intake before a training joins the gpu queue."""

    training_s: float
    generation_s: float
    intake_s: float = 0.0

    @classmethod
    def from_stages(cls, stages: dict[str, dict[str, float]]) -> JobDurations:
        merged = {kind: {**DEFAULT_STAGE_SECONDS.get(kind, {}), **stages.get(kind, {})}
                  for kind in {*DEFAULT_STAGE_SECONDS, *stages}}

        def seconds(kind: JobKind, queue: Queue) -> float:
            return sum(merged.get(kind.value, {}).get(stage.value, 0.0)
                       for phase in PLANS[kind].phases if phase.queue == queue for stage in phase.stage_names)

        return cls(training_s=seconds(JobKind.TRAIN, Queue.GPU), generation_s=seconds(JobKind.GENERATE, Queue.GPU),
                   intake_s=seconds(JobKind.TRAIN, Queue.CPU))

    def gpu_seconds_per_subject(self, generations: int) -> float:
        return self.training_s + generations * self.generation_s


@dataclass(frozen=True)
class Workload:
    subjects_per_day: float
    generations_per_subject: int = 3
    #: 0: a steady Poisson stream; s > 0: the arrival rate swings over the day between (1 - s) and (1 + s) times
    #: the mean (a busy evening, a quiet night), starting at the trough.
    daily_swing: float = 0.0
    #: Coefficient of variation of each job's duration (lognormal around the stage sum); 0 = always the same.
    duration_cv: float = 0.2


@dataclass
class Outcome:
    workers: int
    waits: dict[str, list[float]] = field(default_factory=dict)  # kind -> waits of the jobs counted
    busy_s: float = 0.0
    horizon_s: float = 0.0

    @property
    def all_waits(self) -> list[float]:
        return [wait for waits in self.waits.values() for wait in waits]

    def p95(self, kind: str | None = None) -> float:
        return percentile(self.waits.get(kind, []) if kind else self.all_waits, 95)

    @property
    def utilisation(self) -> float:
        return self.busy_s / (self.workers * self.horizon_s) if self.horizon_s else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def poisson_arrivals(rate_per_s: float, horizon_s: float, rng: random.Random, swing: float = 0.0) -> Iterator[float]:
    """Arrival times of a Poisson process whose rate swings sinusoidally over the day (thinning)."""
    peak = rate_per_s * (1.0 + swing)
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= horizon_s:
            return
        rate = rate_per_s * (1.0 - swing * math.cos(2.0 * math.pi * t / DAY_S))
        if rng.random() * peak <= rate:
            yield t


def service_time(mean_s: float, cv: float, rng: random.Random) -> float:
    if cv <= 0:
        return mean_s
    sigma2 = math.log(1.0 + cv * cv)
    return rng.lognormvariate(math.log(mean_s) - sigma2 / 2.0, math.sqrt(sigma2))


def simulate_queue(arrivals: Iterator[tuple[float, str]], workers: int, duration_of, follow_ups=None,  # noqa: ANN001
                   warmup_s: float = 0.0) -> Outcome:
    """First come, first served on ``workers`` identical servers.

    ``arrivals`` yields (time, kind) in time order; ``duration_of(kind)`` draws a job's service time;
    ``follow_ups(kind)`` lists the kinds of jobs that join the queue when a job of ``kind`` ends. Waits of
    jobs that joined before ``warmup_s`` are not counted."""
    outcome = Outcome(workers)
    events: list[tuple[float, int, str, str, float]] = []  # (time, order, what, kind, joined_at)
    order = 0

    def push(time: float, what: str, kind: str, joined: float = 0.0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (time, order, what, kind, joined))

    pending = iter(arrivals)
    next_arrival = next(pending, None)
    waiting: deque[tuple[float, str]] = deque()
    free, now = workers, 0.0

    def start(kind: str, joined: float) -> None:
        nonlocal free
        free -= 1
        if joined >= warmup_s:
            outcome.waits.setdefault(kind, []).append(now - joined)
        seconds = duration_of(kind)
        outcome.busy_s += seconds
        push(now + seconds, "done", kind)

    while events or next_arrival is not None:
        if next_arrival is not None and (not events or next_arrival[0] <= events[0][0]):
            now, kind = next_arrival
            next_arrival = next(pending, None)
            what, joined = "join", now
        else:
            now, _, what, kind, joined = heapq.heappop(events)
        if what == "join":
            if free:
                start(kind, joined)
            else:
                waiting.append((joined, kind))
        elif what == "done":
            free += 1
            for follow in (follow_ups(kind) if follow_ups else ()):
                push(now, "join", follow, now)
            if waiting and free:
                joined_at, next_kind = waiting.popleft()
                start(next_kind, joined_at)
    outcome.horizon_s = now
    return outcome


def simulate(workload: Workload, durations: JobDurations, workers: int, days: float = 1.0, seed: int = 0,
             warmup_s: float = 3600.0) -> Outcome:
    """The gpu queue of ``days`` of subjects (see the module's docstring)."""
    rng = random.Random(seed)
    rate = workload.subjects_per_day / DAY_S
    arrivals = ((t + durations.intake_s, "train") for t in poisson_arrivals(rate, days * DAY_S, rng,
                                                                          workload.daily_swing))
    means = {"train": durations.training_s, "generate": durations.generation_s}
    generations = ("generate",) * workload.generations_per_subject
    return simulate_queue(arrivals, workers, lambda kind: service_time(means[kind], workload.duration_cv, rng),
                          follow_ups=lambda kind: generations if kind == "train" else (), warmup_s=warmup_s)


def offered_load(workload: Workload, durations: JobDurations) -> float:
    """Busy GPUs on average (Erlangs): below it no worker count keeps up, whatever the target."""
    return workload.subjects_per_day * durations.gpu_seconds_per_subject(workload.generations_per_subject) / DAY_S


def workers_needed(workload: Workload, durations: JobDurations, target_p95_s: float, days: float = 1.0,
                   seed: int = 0) -> tuple[int, Outcome]:
    """The fewest GPU workers whose p95 wait is at most ``target_p95_s``, and that simulation's outcome.

    At most the offered load's worth of workers never keeps up (the queue grows without end, even when a
    finite run's p95 happens to look fine), so the search starts one above it. Waits only grow with fewer
    workers, so: double until the target is met, then halve the interval between the last count that
    failed and the first that met it."""
    outcomes: dict[int, Outcome] = {}

    def meets(workers: int) -> bool:
        outcomes[workers] = simulate(workload, durations, workers, days, seed)
        return outcomes[workers].p95() <= target_p95_s

    low = math.floor(offered_load(workload, durations))  # fails: utilisation 100 % or more
    high = low + 1
    while not meets(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return high, outcomes[high]


def table(subjects: list[float], durations: JobDurations, targets: list[float], swings: list[float],
          generations: int, cv: float, days: float | None, seed: int) -> str:
    header = ["subjects a day", "GPU-hours a day", "busy GPUs (mean)"]
    for swing in swings:
        for target in targets:
            header.append(f"workers for p95 wait <= {target:g} s" + (f", daily swing ±{swing:.0%}" if swing else ""))
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for count in subjects:
        base = Workload(count, generations, 0.0, cv)
        load = offered_load(base, durations)
        cells = [f"{count:,.0f}", f"{load * 24:,.1f}", f"{load:,.1f}"]
        for swing in swings:
            for target in targets:
                workload = Workload(count, generations, swing, cv)
                span = days or min(30.0, max(1.0, 50_000 / count))
                workers, outcome = workers_needed(workload, durations, target, span, seed)
                cells.append(f"**{workers}** (p95 {outcome.p95():.0f} s, {outcome.utilisation:.0%} busy)")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects-per-day", type=float, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--target-p95-s", type=float, nargs="+", default=[60.0, 300.0])
    parser.add_argument("--daily-swing", type=float, nargs="+", default=[0.0, 0.5],
                        help="0: steady arrivals; 0.5: the rate swings between 0.5x and 1.5x the mean over the day")
    parser.add_argument("--generations-per-subject", type=int, default=3)
    parser.add_argument("--duration-cv", type=float, default=0.2)
    parser.add_argument("--durations", type=Path, help="JSON: kind -> stage -> seconds (the dashboard's)")
    parser.add_argument("--days", type=float, help="simulated days (default: enough for ~50,000 subjects, 1-30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stages = json.loads(args.durations.read_text()) if args.durations else {}
    durations = JobDurations.from_stages(stages)
    print(f"GPU seconds: training {durations.training_s:g}, generation {durations.generation_s:g} "
          f"(x{args.generations_per_subject}); cpu intake {durations.intake_s:g} s"
          + ("" if args.durations else "  [defaults: ESTIMATES, not measured]"))
    for count in args.subjects_per_day:
        days = args.days or min(30.0, max(1.0, 50_000 / count))
        print(f"{count:,.0f} subjects a day: {days:g} simulated day(s), the first hour's jobs not counted")
    print(table(args.subjects_per_day, durations, args.target_p95_s, args.daily_swing, args.generations_per_subject,
                args.duration_cv, args.days, args.seed))


if __name__ == "__main__":
    main()
