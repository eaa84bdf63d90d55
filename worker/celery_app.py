"""The Celery application of the workers: the API's queue configuration (:mod:`core.queue`)
plus the task modules. Start a worker with ``likeness worker`` (or
``celery -A worker.celery_app worker -Q <prefix>gpu,<prefix>cpu``).

Embedded mode's SQLite broker has one gap, a message lost when the whole worker is
SIGKILLed; :mod:`worker.recovery` covers it by requeueing jobs whose heartbeat went stale.
"""

from __future__ import annotations

from celery import signals

from core import logs
from core.config import get_settings
from core.queue import make_celery

celery_app = make_celery(include=("worker.tasks",))


@signals.setup_logging.connect
def _configure_logging(loglevel=None, **_) -> None:  # noqa: ANN001 - Celery's signal arguments
    """The worker logs as :mod:`core.logs` says (one line per event, JSON off a terminal), not as Celery's
    default, and the ML libraries stay quiet; connecting this signal keeps Celery's own setup out."""
    logs.quiet_libraries()
    logs.configure(loglevel or "INFO", get_settings().log_format)
