"""Requests per minute per client: a fixed one-minute window counted in Redis (shared by every API
process) or, in embedded mode, in this process.

Over the limit, the request is answered 429 ``rate_limited`` with ``Retry-After`` (seconds to the
next window). A limiter that cannot reach Redis lets requests through (logged): an outage of the
counter must not take the API down with it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from core.config import Settings

log = logging.getLogger(__name__)

WINDOW_S = 60


class RateLimiter(Protocol):
    def hit(self, client_id: str, limit: int, now: float | None = None, cost: int = 1) -> float | None:
        """Count ``cost`` requests (0: only look); None when within ``limit`` per window, else seconds until
        the next window."""


def _window(now: float) -> tuple[int, float]:
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now


class LocalRateLimiter:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, client_id: str, limit: int, now: float | None = None, cost: int = 1) -> float | None:
        window, remaining = _window(time.time() if now is None else now)
        with self._lock:
            if len(self._counts) > 50_000:
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= window}
            count = self._counts.get((client_id, window), 0) + cost
            self._counts[(client_id, window)] = count
        return None if count <= limit else remaining


class RedisRateLimiter:
    def __init__(self, url: str, prefix: str = ""):
        import redis

        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._warned_at = 0.0

    def hit(self, client_id: str, limit: int, now: float | None = None, cost: int = 1) -> float | None:
        window, remaining = _window(time.time() if now is None else now)
        key = f"{self.prefix}likeness:rate:{client_id}:{window}"
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.incrby(key, cost)
            pipe.expire(key, 2 * WINDOW_S)
            count = int(pipe.execute()[0])
        except Exception:  # noqa: BLE001 - fail open, but say so (at most once a minute)
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                log.warning("rate limiter: Redis unreachable, requests are not limited", exc_info=True)
            return None
        return None if count <= limit else remaining


def rate_limiter(settings: Settings) -> RateLimiter:
    """Redis-backed when the API processes share a Redis (distributed mode), else in-process."""
    url = settings.resolved_redis_url
    return RedisRateLimiter(url, settings.queue_prefix) if url else LocalRateLimiter()
