"""Unit of work: one business operation, one transaction, then what may only happen after it.

Routes (through the ``UoW`` dependency), workers and sweeps all reach the database this way::

    with UnitOfWork(settings) as uow:
        job = jobs.create_train_job(uow, caller, subject_id, request)
        uow.enqueue_job(job)          # an outbox row now, a broker message after the commit

On success the transaction commits and then the after-commit hooks run: queued task
messages are sent (and their outbox rows removed); a hook that fails is logged, never
raised, because the committed work stands and the recovery sweep sends what is left in
the outbox. On error everything rolls back and the rollback hooks run (e.g. remove blobs
written for rows that no longer exist).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.config import Settings, get_settings
from core.db.models import Job, OutboxMessage, utcnow
from core.db.session import SessionLocal
from core.queue import TaskQueue, task_queue
from likeness.contract.plan import Queue, Task, plan_for

log = logging.getLogger(__name__)

#: An outbox message younger than this is left to the process that wrote it (its send gives up
#: after ``core.queue.SEND_TIMEOUT_S``; a message sent twice is harmless, tasks re-check their rows).
OUTBOX_GRACE_S = 5.0


class UnitOfWork:
    def __init__(self, settings: Settings | None = None, *, queue: TaskQueue | None = None):
        self.settings = settings or get_settings()
        self._queue = queue
        self.session: Session = SessionLocal(self.settings.resolved_database_url)
        self._after_commit: list[Callable[[], None]] = []
        self._on_rollback: list[Callable[[], None]] = []
        self._outbox: list[OutboxMessage] = []

    # ---- what happens after ------------------------------------------------------------------------------

    def after_commit(self, hook: Callable[[], None]) -> None:
        self._after_commit.append(hook)

    def on_rollback(self, hook: Callable[[], None]) -> None:
        self._on_rollback.append(hook)

    def enqueue(self, task: Task, args: list[Any], queue: Queue) -> None:
        """Send ``task`` once this transaction has committed (durably: an outbox row in it)."""
        message = OutboxMessage(task=str(task), args=list(args), queue=str(queue))
        self.session.add(message)
        self._outbox.append(message)

    def enqueue_job(self, job: Job) -> None:
        """Queue the job's next phase on the queue the job plan names."""
        queue = plan_for(job.kind).next_queue(job.completed_stages or ())
        self.enqueue(Task.RUN_JOB, [job.id], queue)

    def notify(self, delivery_id: str | None) -> None:
        """Send a webhook delivery (a row added in this transaction) after the commit."""
        if delivery_id:
            self.enqueue(Task.DELIVER_WEBHOOK, [delivery_id], Queue.CPU)

    # ---- the transaction ---------------------------------------------------------------------------------

    def commit(self) -> None:
        self.session.commit()
        hooks, self._after_commit = self._after_commit, []
        messages, self._outbox = self._outbox, []
        self._on_rollback = []
        if messages:
            send_outbox(self.settings, [(m.id, m.task, m.args, m.queue) for m in messages], self._queue)
        for hook in hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - the transaction stands; report and go on
                log.exception("after-commit hook failed")

    def rollback(self) -> None:
        self.session.rollback()
        hooks, self._on_rollback = self._on_rollback, []
        self._after_commit, self._outbox = [], []
        for hook in hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001
                log.exception("rollback hook failed")

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> UnitOfWork:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        try:
            if exc_type is None:
                self.commit()
            else:
                self.rollback()
        except BaseException:
            self.rollback()
            raise
        finally:
            self.close()


def send_outbox(settings: Settings, messages: list[tuple[str, str, list[Any], str]],
                queue: TaskQueue | None = None) -> int:
    """Send outbox messages ``(id, task, args, queue)``; remove the rows of those sent. Never raises."""
    if queue is None:
        queue = task_queue(settings)
    sent: list[str] = []
    for message_id, task, args, queue_name in messages:
        try:
            queue.send(task, args, Queue(queue_name))
        except Exception as exc:  # noqa: BLE001 - broker down: the sweep retries from the outbox
            log.warning("could not send %s%s (kept in the outbox): %s", task, args, exc)
            break
        sent.append(message_id)
    if sent:
        try:
            with SessionLocal(settings.resolved_database_url) as session, session.begin():
                session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(sent)))
        except Exception:  # noqa: BLE001 - a resend is harmless (tasks re-check their rows)
            log.warning("sent outbox messages could not be removed; they will be sent again", exc_info=True)
    return len(sent)


def flush_outbox(settings: Settings | None = None, queue: TaskQueue | None = None, *,
                 grace_s: float = OUTBOX_GRACE_S) -> int:
    """Send what earlier transactions left in the outbox (the broker was down); returns how many."""
    settings = settings or get_settings()
    cutoff = utcnow() - timedelta(seconds=grace_s)
    with SessionLocal(settings.resolved_database_url) as session:
        rows = session.execute(select(OutboxMessage.id, OutboxMessage.task, OutboxMessage.args, OutboxMessage.queue)
                               .where(OutboxMessage.created_at < cutoff)
                               .order_by(OutboxMessage.created_at).limit(500)).all()
    return send_outbox(settings, [tuple(r) for r in rows], queue) if rows else 0
