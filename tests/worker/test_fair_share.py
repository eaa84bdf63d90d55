"""Fair share: the rule (:func:`worker.fair_share.pick_fairest`) and the claim that applies it."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from tests.worker.conftest import read_job, settings_with

T0 = datetime(2026, 12, 5, 6, 0, tzinfo=UTC)


def _waiting(job_id: str, client: str, end_user: str = "u", age_s: float = 0.0):
    from worker.fair_share import Waiting

    return Waiting(job_id, client, end_user, T0 - timedelta(seconds=age_s))


def _usage(client_s=None, end_user_s=None, priority=None):
    from worker.fair_share import Usage

    return Usage(client_s or {}, end_user_s or {}, priority or {})


def test_the_least_served_client_goes_first_even_behind_an_older_backlog():
    from worker.fair_share import pick_fairest

    backlog = [_waiting(f"a{i}", "A", age_s=100 - i) for i in range(60)]
    newcomer = _waiting("b1", "B", age_s=0)
    assert pick_fairest([*backlog, newcomer], _usage({"A": 300.0})).job_id == "b1"
    assert pick_fairest([*backlog, newcomer], _usage({"A": 300.0, "B": 301.0})).job_id == "a0"  # B had more


def test_priority_divides_recent_time():
    from worker.fair_share import pick_fairest

    jobs = [_waiting("free", "F", age_s=10), _waiting("paid", "P", age_s=0)]
    assert pick_fairest(jobs, _usage({"F": 100.0, "P": 150.0})).job_id == "free"
    assert pick_fairest(jobs, _usage({"F": 100.0, "P": 150.0}, priority={"P": 2.0})).job_id == "paid"  # 75 < 100


def test_within_a_client_the_least_served_end_user_then_the_oldest_job():
    from worker.fair_share import pick_fairest

    jobs = [_waiting("u1-old", "A", "tg:1", age_s=30), _waiting("u1-new", "A", "tg:1", age_s=20),
            _waiting("u2", "A", "tg:2", age_s=10)]
    assert pick_fairest(jobs, _usage({"A": 50.0}, {("A", "tg:1"): 50.0})).job_id == "u2"
    assert pick_fairest(jobs, _usage({"A": 50.0}, {("A", "tg:2"): 50.0})).job_id == "u1-old"


def test_ties_go_to_the_oldest_job_and_nothing_waiting_is_none():
    from worker.fair_share import pick_fairest

    assert pick_fairest([_waiting("new", "A", age_s=1), _waiting("old", "B", age_s=5)], _usage()).job_id == "old"
    assert pick_fairest([], _usage()) is None


def test_gpu_stages_are_training_and_generation_not_intake():
    from likeness.contract.plan import Queue
    from worker.fair_share import queue_stages

    gpu = queue_stages(Queue.GPU)
    assert "caching" in gpu["train"] and "intake" not in gpu["train"]
    assert gpu["generate"]


# ---- the claim, on the migrated database (embedded mode's SQLite) ------------------------------------------------


def _client(session, name: str, priority: float = 1.0):
    from core.db.models import Client

    client = Client(name=name, api_key_hash=os.urandom(16).hex(), priority=priority)
    session.add(client)
    session.flush()
    return client


def _generation(session, client, end_user: str | None, age_s: float) -> str:
    from core.db.models import Job, JobKind, Subject, utcnow

    subject = Subject(client_id=client.id, name="s", external_ref=end_user)
    session.add(subject)
    session.flush()
    job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.GENERATE, completed_stages=[],
              created_at=utcnow() - timedelta(seconds=age_s))
    session.add(job)
    session.flush()
    return job.id


def _ran(session, job_id: str, seconds: float, stage: str = "generating", kind: str = "generate") -> None:
    from core.db.models import Job, JobStage, JobState, utcnow

    session.get(Job, job_id).state = JobState.SUCCEEDED
    started = utcnow() - timedelta(seconds=seconds + 1)
    session.add(JobStage(job_id=job_id, kind=kind, stage=stage, attempt=1, worker="w:1", started_at=started,
                         finished_at=started + timedelta(seconds=seconds), seconds=seconds))


def test_a_claim_takes_the_fairest_waiting_job_not_the_one_its_message_names(sqlite_db, queue):
    from core.db.models import JobState
    from tests.app.fixtures import session_scope
    from worker import jobs

    with session_scope() as session:
        a, b = _client(session, "A"), _client(session, "B")
        done = _generation(session, a, None, age_s=600)
        _ran(session, done, 120.0)
        backlog = [_generation(session, a, None, age_s=300 - i) for i in range(5)]
        newcomer = _generation(session, b, None, age_s=1)

    claim = jobs.claim(settings_with(), backlog[0], "gpu")
    assert claim.outcome is jobs.ClaimOutcome.run and claim.job.id == newcomer
    assert read_job(newcomer).state == JobState.RUNNING and read_job(backlog[0]).state == JobState.QUEUED
    # the newcomer's own message is now the backlog's wake-up: the oldest of A's goes next
    assert jobs.claim(settings_with(), newcomer, "gpu").job.id == backlog[0]
    # first in, first out when fair share is off
    assert jobs.claim(settings_with(fair_share=False), backlog[3], "gpu").job.id == backlog[3]


def test_a_claim_shares_between_one_clients_end_users_and_honours_priority(sqlite_db, queue):
    from tests.app.fixtures import session_scope
    from worker import jobs

    with session_scope() as session:
        bot = _client(session, "bot")
        heavy = _generation(session, bot, "tg:1", age_s=600)
        _ran(session, heavy, 60.0)
        heavy_next = _generation(session, bot, "tg:1", age_s=100)
        light = _generation(session, bot, "tg:2", age_s=5)
        free, paid = _client(session, "free"), _client(session, "paid", priority=4.0)
        free_done, paid_done = _generation(session, free, None, age_s=900), _generation(session, paid, None, age_s=900)
        _ran(session, free_done, 100.0)
        _ran(session, paid_done, 200.0)  # 200 / 4 = 50 < 100
        free_next = _generation(session, free, None, age_s=50)
        paid_next = _generation(session, paid, None, age_s=40)

    assert jobs.claim(settings_with(), heavy_next, "gpu").job.id == paid_next  # 50 < 60 (bot) < 100 (free)
    assert jobs.claim(settings_with(), heavy_next, "gpu").job.id == light  # the bot's other user first
    assert jobs.claim(settings_with(), heavy_next, "gpu").job.id == heavy_next
    assert jobs.claim(settings_with(), heavy_next, "gpu").job.id == free_next
    assert {read_job(j).worker for j in (paid_next, light, heavy_next, free_next)} == {jobs.worker_id()}


def test_time_outside_the_window_does_not_count(sqlite_db, queue):
    from tests.app.fixtures import session_scope
    from worker import jobs

    with session_scope() as session:
        a, b = _client(session, "A"), _client(session, "B")
        _ran(session, _generation(session, a, None, age_s=7200), 300.0)
        _ran(session, _generation(session, b, None, age_s=100), 10.0)
        a_next, b_next = _generation(session, a, None, age_s=20), _generation(session, b, None, age_s=10)

    # A's 300 s ended long ago, B's 10 s are recent: A goes first (with the whole day counted, B would)
    assert jobs.claim(settings_with(fair_share_window_s=60), b_next, "gpu").job.id == a_next
    assert read_job(a_next).worker == jobs.worker_id()
