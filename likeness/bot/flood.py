"""Telegram's flood control: a 429 answer says how long to wait (``retry_after``); wait, then resend."""

from __future__ import annotations

import asyncio
import logging

from aiogram.client.session.middlewares.base import BaseRequestMiddleware
from aiogram.exceptions import TelegramRetryAfter

log = logging.getLogger(__name__)


class FloodControl(BaseRequestMiddleware):
    def __init__(self, attempts: int = 5, max_wait_s: float = 120.0):
        self.attempts, self.max_wait_s = attempts, max_wait_s

    async def __call__(self, make_request, bot, method):  # noqa: ANN001 - aiogram's middleware signature
        for attempt in range(1, self.attempts + 1):
            try:
                return await make_request(bot, method)
            except TelegramRetryAfter as exc:
                if attempt == self.attempts or exc.retry_after > self.max_wait_s:
                    raise
                log.warning("flood control on %s: waiting %s s", type(method).__name__, exc.retry_after)
                await asyncio.sleep(exc.retry_after)
        raise AssertionError("unreachable")
