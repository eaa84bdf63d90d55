"""Rate limits: a one-minute sliding window per key (the ``limits`` package's sliding-window counter), kept
in Redis (shared by every API process) or, in embedded mode, in this process.

Two uses: requests per minute per client, and failed authentications per address (wrong API keys,
wrong admin sign-ins, bad signed links). Unlike a fixed window, a sliding one lets no double burst
through where two windows meet. Every limited answer carries ``RateLimit-Limit``, ``RateLimit-Remaining``,
``RateLimit-Reset`` and ``RateLimit-Policy`` (IETF draft), and a 429 also ``Retry-After``. A limiter that
cannot reach Redis lets requests through (logged at most once a minute): an outage of the counter must not
take the API down with it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.config import Settings

log = logging.getLogger(__name__)

WINDOW_S = 60
#: where a request's rate-limit headers wait for its response (``request.state``)
HEADERS_STATE = "rate_limit_headers"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # seconds until the window has room again
    counted: bool = True  # False: the counter was unreachable and the request let through

    def headers(self) -> dict[str, str]:
        if not self.counted:
            return {}
        return {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
                "RateLimit-Reset": str(max(0, math.ceil(self.reset_s))),
                "RateLimit-Policy": f"{self.limit};w={WINDOW_S}"}


class RateLimiter:
    """Sliding one-minute windows over a ``limits`` storage (``memory://`` or a Redis URL)."""

    def __init__(self, storage_uri: str = "memory://", key_prefix: str = "likeness:rate"):
        if storage_uri.startswith("memory"):
            storage = MemoryStorage()
        else:
            storage = storage_from_string(storage_uri, key_prefix=key_prefix, wrap_exceptions=True,
                                          socket_timeout=0.5, socket_connect_timeout=0.5)
        self._window = SlidingWindowCounterRateLimiter(storage)
        self._warned_at = 0.0

    def hit(self, key: str, per_minute: int, cost: int = 1) -> RateDecision:
        """Count ``cost`` requests of ``key``; refused (nothing counted) when that would pass ``per_minute``."""
        return self._decide(key, per_minute, lambda item: self._window.hit(item, key, cost=cost))

    def peek(self, key: str, per_minute: int) -> RateDecision:
        """Whether one more request of ``key`` would be allowed, counting nothing."""
        return self._decide(key, per_minute, lambda item: self._window.test(item, key))

    def _decide(self, key: str, per_minute: int, check) -> RateDecision:  # noqa: ANN001
        item = RateLimitItemPerMinute(per_minute)
        try:
            allowed = check(item)
            stats = self._window.get_window_stats(item, key)
        except Exception:  # noqa: BLE001 - fail open, but say so (at most once a minute)
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                log.warning("rate limiter: its storage is unreachable, requests are not limited", exc_info=True)
            return RateDecision(True, per_minute, per_minute, 0.0, counted=False)
        return RateDecision(allowed, per_minute, stats.remaining, max(0.0, stats.reset_time - time.time()))


def rate_limiter(settings: Settings) -> RateLimiter:
    """Redis-backed when the API processes share a Redis (distributed mode), else in-process."""
    url = settings.resolved_redis_url
    return RateLimiter(url, f"{settings.queue_prefix}likeness:rate") if url else RateLimiter()


def client_address(request: Request) -> str:
    """The peer's address (a proxy's forwarded one only when the proxy is trusted: ``app.main.proxy_options``)."""
    return request.client.host if request.client else "-"


def remember_headers(request: Request, decision: RateDecision) -> None:
    """Send ``decision``'s headers with this request's response (:class:`RateLimitHeaders`)."""
    setattr(request.state, HEADERS_STATE, decision.headers())


class RateLimitHeaders:
    """Adds the headers a route's rate check remembered (:func:`remember_headers`) to its response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                remembered = (scope.get("state") or {}).get(HEADERS_STATE)
                if remembered:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    extra = [(k.lower().encode(), v.encode()) for k, v in remembered.items()
                             if k.lower().encode() not in present]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
