"""Errors raised by the ML pipeline.

Every error carries a machine-readable ``code`` that the worker stores on the job
and the API returns unchanged, plus a human ``message``. Exceptions must stay
picklable (Celery ships them between processes), so state lives in ``args``.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    code = "pipeline_error"
    #: True when the client can fix it (bad input or config) -> 4xx, never retried.
    user_error = False

    def __init__(self, message: str, details: dict[str, Any] | None = None, code: str | None = None):
        super().__init__(message, details or {}, code or type(self).code)

    @property
    def message(self) -> str:
        return self.args[0]

    @property
    def details(self) -> dict[str, Any]:
        return self.args[1]

    @property
    def error_code(self) -> str:
        return self.args[2]

    def __str__(self) -> str:
        return self.message


class InvalidConfig(PipelineError):
    """A configuration or request that can never succeed; raised before any model loads."""

    code = "invalid_config"
    user_error = True


class ModelNotFound(PipelineError):
    """A model id or path that cannot be resolved (missing locally, no network)."""

    code = "model_not_found"


class DatasetRejected(PipelineError):
    """The photo set as a whole is unusable (e.g. too few accepted photos)."""

    code = "dataset_rejected"
    user_error = True


class Canceled(PipelineError):
    """The caller asked to stop; raised at the next step boundary."""

    code = "canceled"


class Preempted(Canceled):
    """The process running the work is shutting down (spot instance, pod eviction); raised by ``should_stop``.

    Not the caller's wish: the work is handed back, not ended. A training checkpoints the step it
    reached first and records it in ``details["checkpoint_step"]``.
    """

    code = "preempted"
