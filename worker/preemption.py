"""Preemptible workers: on SIGTERM a worker hands its job back within seconds instead of finishing it.

A spot instance or a Kubernetes pod gets SIGTERM and a short grace period before SIGKILL. Celery's
warm shutdown (SIGTERM to the worker's main process) stops consuming at once but waits for the running
task, which for a training is minutes. So, when the warm shutdown starts:

1. the main process (Celery's ``worker_shutting_down`` signal) sends :data:`DRAIN_SIGNAL` to its pool
   processes (:func:`drain_pool`); with the solo or threads pool it sets the flag itself;
2. a pool process's handler (:func:`install_drain_handler`) sets :data:`draining`;
3. the job's next ``should_stop()`` check raises :class:`pipelines.errors.Preempted`
   (:func:`raise_if_draining`); the trainer checkpoints the step it reached (mirrored to the blob store
   like the periodic ones) and re-raises; a generation is dropped whole;
4. the runner hands the job back (:func:`worker.jobs.hand_back`): the lease is released and the job
   queued again in one transaction, so another worker claims it at once (same attempt: a preemption is
   not a failure) instead of waiting out the lease.

The task then returns, the message is acked, and the warm shutdown completes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from pipelines.errors import Preempted

log = logging.getLogger(__name__)

#: what the main process sends its pool processes (Celery resets SIGTERM to its default there)
DRAIN_SIGNAL = signal.SIGUSR2

#: set in a process whose worker is shutting down: its job stops at the next step and is handed back
draining = threading.Event()

PREEMPTED_MESSAGE = "the worker is shutting down; the job goes back to the queue"


def raise_if_draining() -> None:
    """Raise :class:`Preempted` when this worker is shutting down (called from ``should_stop``)."""
    if draining.is_set():
        raise Preempted(PREEMPTED_MESSAGE)


def _on_drain_signal(signum, frame) -> None:  # noqa: ANN001
    draining.set()


def install_drain_handler() -> None:
    """In a pool process: :data:`DRAIN_SIGNAL` marks it as draining."""
    signal.signal(DRAIN_SIGNAL, _on_drain_signal)


def drain_pool() -> int:
    """In the worker's main process, at warm shutdown: mark this process and every pool process as
    draining; returns how many pool processes were signalled."""
    draining.set()
    from billiard.process import active_children

    signalled = 0
    for child in active_children():
        try:
            os.kill(child.pid, DRAIN_SIGNAL)
            signalled += 1
        except (ProcessLookupError, TypeError):  # exited meanwhile / never started
            continue
    log.warning("worker shutting down: %d pool process(es) asked to hand their jobs back", signalled)
    return signalled
