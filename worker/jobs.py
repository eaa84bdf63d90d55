"""Job-record operations of a worker: claim, progress, heartbeat, phase completion, finish.

Every write after the claim is conditional on ``worker == <this process>``, so a process
that lost its job to a takeover (it was presumed dead) can never overwrite the new owner's
record. State changes go through :func:`likeness.contract.plan.transition`; each stage a
job runs leaves a ``job_stages`` row with its duration (the stage-duration metric, the
dashboard's timeline).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, TypeVar

from sqlalchemy import select, update

from core.config import Settings
from core.db.models import Job, JobStage, utcnow
from core.db.session import database_unavailable
from core.db.uow import UnitOfWork
from core.signing import signed_preview_url, signing_secret
from core.webhooks import notify_job, queue_preview_event
from likeness.contract.plan import TERMINAL_STATES, JobState, transition
from likeness.contract.results import HandedBack
from worker.fair_share import fairest_waiting

log = logging.getLogger(__name__)

WORKER_LOST_MESSAGE = "the worker running this job stopped unexpectedly {n} times; giving up"

#: how long a write that ends a stretch of work (a phase's outputs, its record, the job's end) waits for an
#: unavailable database: what it records is computed already, and minutes of GPU work are worth a wait
DB_OUTAGE_WAIT_S = 120.0

T = TypeVar("T")


def through_db_outage(what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, retried while the database is unavailable, for at most ``DB_OUTAGE_WAIT_S``."""
    deadline, delay = time.monotonic() + DB_OUTAGE_WAIT_S, 0.5
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not database_unavailable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, type(exc).__name__, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def worker_id() -> str:
    """``host:pid`` of this process (computed per call: pool processes are forked)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:  # SQLite returns naive UTC
        return moment.replace(tzinfo=UTC)
    return moment


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(owner: str | None, heartbeat_at: datetime | None, stale_after_s: float) -> bool:
    """Is the process recorded in ``owner`` still working on its job?

    On this host the pid answers at once (a SIGKILLed pool process is replaced by a new
    pid); elsewhere a heartbeat older than ``stale_after_s`` means dead.
    """
    if not owner:
        return False
    fresh = heartbeat_at is not None and utcnow() - aware(heartbeat_at) < timedelta(seconds=stale_after_s)
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return int(pid) != os.getpid() and _pid_alive(int(pid)) and fresh
    return fresh


class ClaimOutcome(str, Enum):
    run = "run"  # this process now owns the job
    skip = "skip"  # terminal, deleted, or alive elsewhere: nothing to do
    canceled = "canceled"  # cancel was requested before it started: now canceled
    lost = "lost"  # its worker died too many times: now failed with worker_lost


@dataclass(frozen=True)
class JobSnapshot:
    """What the runner needs from the job row, detached from any session."""

    id: str
    client_id: str
    subject_id: str
    kind: str
    request: dict[str, Any]
    completed_stages: tuple[str, ...]
    attempts: int
    max_attempts: int
    progress: float
    result: dict[str, Any]
    eta_s: float | None = None  # the last ETA reported (by an earlier phase): the next stays within 2x of it

    @classmethod
    def of(cls, job: Job) -> JobSnapshot:
        return cls(id=job.id, client_id=job.client_id, subject_id=job.subject_id, kind=job.kind.value,
                   request=dict(job.request or {}), completed_stages=tuple(job.completed_stages or ()),
                   attempts=job.attempts, max_attempts=job.max_attempts, progress=job.progress or 0.0,
                   result=dict(job.result or {}), eta_s=job.eta_s)


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job: JobSnapshot | None = None
    previous_state: str | None = None


def _locked(uow: UnitOfWork, job_id: str) -> Job | None:
    return uow.session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()


def claim(settings: Settings, job_id: str, queue: str | None = None) -> Claim:
    """Take ownership of ``job_id`` if it needs running; see :class:`ClaimOutcome`.

    ``queue`` (the logical queue the message came from) with ``settings.fair_share``: the message is a
    wake-up; the fairest job waiting on that queue is claimed instead (:mod:`worker.fair_share`), and
    ``job_id`` only when none waits (a redelivery, a takeover, a cancel).
    """
    me, now = worker_id(), utcnow()
    with UnitOfWork(settings) as uow:
        if queue is not None and settings.fair_share:
            job_id = _fairest(uow, settings, queue) or job_id
        job = _locked(uow, job_id)
        if job is None:
            log.info("job %s no longer exists", job_id)
            return Claim(ClaimOutcome.skip)
        previous = job.state.value
        if job.state in TERMINAL_STATES:
            return Claim(ClaimOutcome.skip, JobSnapshot.of(job), previous)
        if job.cancel_requested:
            if job.state == JobState.RUNNING:
                job.worker = me
            transition(job, JobState.CANCELED, now, code="canceled", message="canceled by request")
            notify_job(uow, job)
            return Claim(ClaimOutcome.canceled, JobSnapshot.of(job), previous)
        if job.state == JobState.QUEUED:
            job.attempts = (job.attempts or 0) + 1
            transition(job, JobState.RUNNING, now)
            notify_job(uow, job)
        elif job.worker is None:
            pass  # handed over between queues (or released by the sweep): same attempt
        elif owner_alive(job.worker, job.heartbeat_at, settings.job_stale_after_s):
            log.info("job %s is running on %s; duplicate delivery ignored", job_id, job.worker)
            return Claim(ClaimOutcome.skip, JobSnapshot.of(job), previous)
        else:
            log.warning("job %s: worker %s was lost (attempt %d/%d)", job_id, job.worker, job.attempts,
                        job.max_attempts)
            if job.attempts >= job.max_attempts:
                fail_lost(uow, job, now)
                return Claim(ClaimOutcome.lost, JobSnapshot.of(job), previous)
            job.attempts += 1
        job.worker = me
        job.heartbeat_at = now
        return Claim(ClaimOutcome.run, JobSnapshot.of(job), previous)


def _fairest(uow: UnitOfWork, settings: Settings, queue: str, tries: int = 3) -> str | None:
    """The fairest job waiting on ``queue``, locked and still waiting (where the database cannot lock the
    waiting set, SQLite, another claimer may have taken the one picked: pick again)."""
    for _ in range(tries):
        chosen = fairest_waiting(uow.session, queue, settings.fair_share_window_s)
        job = _locked(uow, chosen) if chosen else None
        if job is None:
            return None
        if job.worker is None and job.state in (JobState.QUEUED, JobState.RUNNING):
            return chosen
    return None


def fail_lost(uow: UnitOfWork, job: Job, now: datetime) -> None:
    """The job's worker died ``max_attempts`` times: it fails with ``worker_lost``."""
    transition(job, JobState.FAILED, now, code="worker_lost", message=WORKER_LOST_MESSAGE.format(n=job.attempts))
    job.heartbeat_at = now
    notify_job(uow, job)


def _owned(job_id: str):
    return update(Job).where(Job.id == job_id, Job.worker == worker_id(), Job.state == JobState.RUNNING)


def write_progress(settings: Settings, job_id: str, kind: str, stage: str, progress: float, eta_s: float | None,
                   *, started: Sequence[tuple[str, datetime]] = (), attempt: int = 1) -> bool:
    """Store progress (never lower than what is stored); False when this process no longer owns the job.

    ``started``: the stages that began since the last write that was recorded, with when, in order
    (usually ``stage`` just now; more when the database was away as they began): each closes the row
    of the stage before it and opens its own.
    """
    now = utcnow()
    with UnitOfWork(settings) as uow:
        session = uow.session
        current = session.execute(select(Job.progress).where(Job.id == job_id)).scalar_one_or_none()
        values: dict[str, Any] = dict(stage=stage, eta_s=eta_s, heartbeat_at=now)
        if current is None or progress >= current:
            values["progress"] = progress
        if session.execute(_owned(job_id).values(**values)).rowcount != 1:
            return False
        _open_stages(session, job_id, kind, started, attempt)
        return True


def _open_stages(session, job_id: str, kind: str, started: Sequence[tuple[str, datetime]],  # noqa: ANN001
                 attempt: int) -> None:
    for name, at in started:
        _close_open_stages(session, job_id, at)
        session.add(JobStage(job_id=job_id, kind=kind, stage=name, attempt=attempt, worker=worker_id(),
                             started_at=at))
        session.flush()


def _close_open_stages(session, job_id: str, now: datetime) -> None:  # noqa: ANN001
    for row in session.scalars(select(JobStage).where(JobStage.job_id == job_id, JobStage.finished_at.is_(None))):
        row.finished_at = now
        row.seconds = round((now - aware(row.started_at)).total_seconds(), 3)


def record_result(settings: Settings, job_id: str, values: dict[str, Any]) -> bool:
    """Merge ``values`` into an owned running job's ``result`` now (e.g. "resumed from step N");
    False when this process no longer owns the job."""
    with UnitOfWork(settings) as uow:
        job = _locked(uow, job_id)
        if job is None or job.worker != worker_id() or job.state != JobState.RUNNING:
            return False
        job.result = {**(job.result or {}), **values}
        job.heartbeat_at = utcnow()
        return True


def record_preview(settings: Settings, job_id: str, step: int) -> bool:
    """A training preview of an owned running job: listed in its ``result.previews`` (the API signs a URL
    for each) and announced by a ``job.preview`` webhook; False when this process no longer owns the job."""
    with UnitOfWork(settings) as uow:
        job = _locked(uow, job_id)
        if job is None or job.worker != worker_id() or job.state != JobState.RUNNING:
            return False
        previews = [p for p in (job.result or {}).get("previews", []) if p.get("step") != step]
        job.result = {**(job.result or {}), "previews": [*previews, {"step": int(step)}]}
        job.heartbeat_at = utcnow()
        url, _ = signed_preview_url(signing_secret(settings), job.client_id, job.subject_id, job.id, step,
                                    settings.signed_url_ttl_s)
        uow.notify(queue_preview_event(uow.session, job, {"step": int(step), "url": url}))
        return True


def heartbeat(settings: Settings, job_id: str) -> bool:
    with UnitOfWork(settings) as uow:
        return uow.session.execute(_owned(job_id).values(heartbeat_at=utcnow())).rowcount == 1


def cancel_requested(settings: Settings, job_id: str) -> bool:
    with UnitOfWork(settings) as uow:
        row = uow.session.execute(select(Job.cancel_requested, Job.state).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row.cancel_requested) or row.state in TERMINAL_STATES


def complete_phase(settings: Settings, job_id: str, stages: list[str], result: dict[str, Any] | None = None,
                   *, hand_over: bool = False, started: Sequence[tuple[str, datetime]] = ()) -> bool:
    """Record stages whose outputs are persisted (a rerun skips them).

    ``started``: stages of the phase whose beginning no progress write recorded (the database was away
    then): their rows are opened at their own start before every open row is closed.

    ``hand_over``: the next phase runs on another queue; the job is released and its next
    task queued in the same transaction. A cancel requested meanwhile ends the job here instead:
    handed over, it would wait for the next queue's worker (maybe behind a long training).
    """
    with UnitOfWork(settings) as uow:
        job = _locked(uow, job_id)
        if job is None or job.worker != worker_id() or job.state != JobState.RUNNING:
            return False
        job.completed_stages = [*job.completed_stages, *(s for s in stages if s not in job.completed_stages)]
        if result:
            job.result = {**(job.result or {}), **result}
        job.heartbeat_at = utcnow()
        _open_stages(uow.session, job_id, job.kind.value, started, job.attempts)
        _close_open_stages(uow.session, job_id, job.heartbeat_at)
        if hand_over and job.cancel_requested:
            transition(job, JobState.CANCELED, job.heartbeat_at, code="canceled", message="canceled by request")
            notify_job(uow, job)
        elif hand_over:
            job.worker = None
            uow.enqueue_job(job)
        return True


def finish(settings: Settings, job_id: str, state: JobState, code: str | None = None, message: str | None = None,
           result: dict[str, Any] | None = None, *, started: Sequence[tuple[str, datetime]] = ()) -> bool:
    """Move an owned job to a terminal state; False when another process owns it now. ``started``: as for
    :func:`complete_phase` (a stage that began while the database was away, then failed or was canceled)."""
    with UnitOfWork(settings) as uow:
        job = _locked(uow, job_id)
        if job is None or job.worker != worker_id() or job.state != JobState.RUNNING:
            return False
        now = utcnow()
        transition(job, state, now, code=code, message=message)
        job.heartbeat_at = now
        _open_stages(uow.session, job_id, job.kind.value, started, job.attempts)
        _close_open_stages(uow.session, job_id, now)
        if result:
            job.result = {**(job.result or {}), **result}
        notify_job(uow, job)
        return True


def release(settings: Settings, job_id: str) -> None:
    """Give an owned job back after a transient error: the next delivery runs what is left of it again,
    as a new attempt (its stage rows say so), as after a takeover from a lost worker."""
    with UnitOfWork(settings) as uow:
        uow.session.execute(_owned(job_id).values(worker=None, heartbeat_at=utcnow(), attempts=Job.attempts + 1))


def hand_back(settings: Settings, job_id: str, checkpoint_step: int | None = None) -> bool:
    """This worker is shutting down: release an owned job and queue it again in one transaction, so
    another worker claims it at once (same attempt) instead of waiting out the lease. The job's
    ``result.preempted`` says by whom, when, and at which step its training was checkpointed.
    False when this process no longer owns the job."""
    with UnitOfWork(settings) as uow:
        job = _locked(uow, job_id)
        if job is None or job.worker != worker_id() or job.state != JobState.RUNNING:
            return False
        job.heartbeat_at = now = utcnow()
        _close_open_stages(uow.session, job_id, now)
        handed_back = HandedBack(worker=job.worker, at=now.isoformat(), checkpoint_step=checkpoint_step)
        job.result = {**(job.result or {}), "preempted": handed_back.model_dump(mode="json")}
        job.worker = None
        uow.enqueue_job(job)
        return True
