"""The Celery application of the workers: the API's queue configuration (:mod:`core.queue`)
plus the task modules. Start a worker with ``likeness worker`` (or
``celery -A worker.celery_app worker -Q <prefix>gpu,<prefix>cpu``).

Embedded mode's SQLite broker has one gap, a message lost when the whole worker is
SIGKILLed; :mod:`worker.recovery` covers it by requeueing jobs whose heartbeat went stale.
"""

from __future__ import annotations

from core.queue import make_celery

celery_app = make_celery(include=("worker.tasks",))
