"""Retries of one request and the backoff of job polling (pure arithmetic, shared by both clients)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    """How often one request is retried on a transient failure (no answer, 408/429/502/503/504).

    Only requests that are safe to send twice are retried: reads, deletes, and creating POSTs,
    which carry the same Idempotency-Key on every attempt (the API replays the first answer).
    """

    attempts: int = 3
    initial_s: float = 0.5
    max_s: float = 8.0
    max_retry_after_s: float = 30.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after_s is not None:
            return min(retry_after_s, self.max_retry_after_s)
        base = min(self.max_s, self.initial_s * 2 ** (attempt - 1))
        return base * (0.75 + 0.5 * random.random())  # jitter: many clients never retry in step


NO_RETRY = Retry(attempts=1)


@dataclass(frozen=True)
class Backoff:
    """Job polling: fast while the job moves, slower while it does not (up to ``max_s``)."""

    initial_s: float = 0.5
    factor: float = 1.5
    max_s: float = 5.0

    def next(self, current: float, changed: bool) -> float:
        return self.initial_s if changed else min(self.max_s, current * self.factor)
