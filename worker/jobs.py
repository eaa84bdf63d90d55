"""Job-record operations used by the runner: claim, progress, heartbeat, finish.

Every write after the claim is conditional on ``worker == <this process>``, so a
process that lost its job to a takeover (it was presumed dead) can never overwrite
the new owner's record.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from sqlalchemy import select, update

from app.db.models import Job, JobState, utcnow
from app.db.session import session_scope

log = logging.getLogger(__name__)

TERMINAL = (JobState.succeeded, JobState.failed, JobState.canceled)


def worker_id() -> str:
    """``host:pid`` of this process (computed per call: pool processes are forked)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:  # SQLite returns naive UTC
        return moment.replace(tzinfo=timezone.utc)
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
    fresh = heartbeat_at is not None and utcnow() - _aware(heartbeat_at) < timedelta(seconds=stale_after_s)
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

    @classmethod
    def of(cls, job: Job) -> "JobSnapshot":
        return cls(
            id=job.id,
            client_id=job.client_id,
            subject_id=job.subject_id,
            kind=job.kind.value,
            request=dict(job.request or {}),
            completed_stages=tuple(job.completed_stages or ()),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            progress=job.progress or 0.0,
            result=dict(job.result or {}),
        )


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job: JobSnapshot | None = None
    previous_state: str | None = None
    webhook: str | None = None  # delivery id to send after the commit


def queue_webhook(session, job: Job) -> str | None:
    """Queue the webhook of the job's new state in the transaction that changed it."""
    from app.webhooks import queue_job_event

    session.flush()
    return queue_job_event(session, job)


WORKER_LOST_MESSAGE = "the worker running this job stopped unexpectedly {n} times; giving up"


def claim(job_id: str, stale_after_s: float) -> Claim:
    """Take ownership of ``job_id`` if it needs running; see :class:`ClaimOutcome`."""
    me = worker_id()
    now = utcnow()
    with session_scope() as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None:
            log.info("job %s no longer exists", job_id)
            return Claim(ClaimOutcome.skip)
        previous = job.state.value
        if job.state in TERMINAL:
            return Claim(ClaimOutcome.skip, JobSnapshot.of(job), previous)
        if job.cancel_requested:
            set_terminal(job, JobState.canceled, "canceled", "canceled by request", now)
            return Claim(ClaimOutcome.canceled, JobSnapshot.of(job), previous, queue_webhook(session, job))
        if job.state == JobState.queued:
            job.attempts = (job.attempts or 0) + 1
            job.started_at = now
        elif job.worker is None:
            pass  # handed over between queues (or released by the sweep): same attempt
        elif owner_alive(job.worker, job.heartbeat_at, stale_after_s):
            log.info("job %s is running on %s; duplicate delivery ignored", job_id, job.worker)
            return Claim(ClaimOutcome.skip, JobSnapshot.of(job), previous)
        else:
            log.warning("job %s: worker %s was lost (attempt %d/%d)", job_id, job.worker, job.attempts, job.max_attempts)
            if job.attempts >= job.max_attempts:
                set_terminal(job, JobState.failed, "worker_lost", WORKER_LOST_MESSAGE.format(n=job.attempts), now)
                return Claim(ClaimOutcome.lost, JobSnapshot.of(job), previous, queue_webhook(session, job))
            job.attempts += 1
        job.state = JobState.running
        job.worker = me
        job.heartbeat_at = now
        webhook = queue_webhook(session, job) if previous == JobState.queued.value else None
        return Claim(ClaimOutcome.run, JobSnapshot.of(job), previous, webhook)


def set_terminal(job: Job, state: JobState, code: str | None, message: str | None, now: datetime) -> None:
    job.state = state
    job.error_code = code if state != JobState.succeeded else None
    job.error_message = message if state != JobState.succeeded else None
    job.finished_at = now
    job.heartbeat_at = now
    job.eta_s = 0.0 if state == JobState.succeeded else None


def _owned(job_id: str):
    return update(Job).where(Job.id == job_id, Job.worker == worker_id(), Job.state == JobState.running)


def write_progress(job_id: str, stage: str, progress: float, eta_s: float | None) -> bool:
    """Store progress (never lower than what is stored); False when this process no longer owns the job."""
    with session_scope() as session:
        current = session.execute(select(Job.progress).where(Job.id == job_id)).scalar_one_or_none()
        values = dict(stage=stage, eta_s=eta_s, heartbeat_at=utcnow())
        if current is None or progress >= current:
            values["progress"] = progress
        return session.execute(_owned(job_id).values(**values)).rowcount == 1


def heartbeat(job_id: str) -> bool:
    with session_scope() as session:
        return session.execute(_owned(job_id).values(heartbeat_at=utcnow())).rowcount == 1


def cancel_requested(job_id: str) -> bool:
    with session_scope() as session:
        row = session.execute(select(Job.cancel_requested, Job.state).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row.cancel_requested) or row.state in TERMINAL


def complete_stages(job_id: str, stages: list[str], result: dict[str, Any] | None = None, release: bool = False) -> bool:
    """Record stages whose outputs are persisted (a rerun skips them); ``release`` hands the job to another queue."""
    with session_scope() as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None or job.worker != worker_id() or job.state != JobState.running:
            return False
        job.completed_stages = [*job.completed_stages, *(s for s in stages if s not in job.completed_stages)]
        if result:
            job.result = {**(job.result or {}), **result}
        job.heartbeat_at = utcnow()
        if release:
            job.worker = None
        return True


@dataclass(frozen=True)
class Finished:
    webhook: str | None  # delivery id to send after the commit


def finish(job_id: str, state: JobState, code: str | None = None, message: str | None = None,
           result: dict[str, Any] | None = None) -> Finished | None:
    """Move an owned job to a terminal state; None when another process owns it now."""
    with session_scope() as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None or job.worker != worker_id() or job.state != JobState.running:
            return None
        set_terminal(job, state, code, message, utcnow())
        if state == JobState.succeeded:
            job.progress = 100.0
        if result:
            job.result = {**(job.result or {}), **result}
        return Finished(queue_webhook(session, job))


def release(job_id: str) -> None:
    """Give an owned job back (worker shutdown, transient error): the next delivery resumes it."""
    with session_scope() as session:
        session.execute(_owned(job_id).values(worker=None, heartbeat_at=utcnow()))
