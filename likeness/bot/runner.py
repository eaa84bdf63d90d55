"""Build the bot and run it: long polling (default) or a webhook server (``--webhook-url``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer

from likeness.bot.config import BotSettings
from likeness.bot.flood import FloodControl
from likeness.bot.handlers import Context, build_router
from likeness.bot.service import Service
from likeness.bot.store import open_store
from likeness.bot.texts import UserLanguage, make_i18n
from likeness.bot.tracker import Tracker
from likeness.client import AsyncClient, LikenessError, Retry

log = logging.getLogger(__name__)

RETENTION_SWEEP_S = 3600.0
COMMANDS = ("start", "help", "status", "styles", "cancel", "delete")


def build(settings: BotSettings) -> tuple[Bot, Dispatcher, Context]:
    session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_url))
    session.middleware(FloodControl())
    bot = Bot(settings.telegram_token.get_secret_value(), session=session)
    store = open_store(settings)
    api = AsyncClient(settings.api_url, settings.api_key.get_secret_value(), retry=Retry(attempts=2))
    i18n = make_i18n()
    service = Service(api, store, settings)
    ctx = Context(service=service, tracker=Tracker(bot, service, i18n), i18n=i18n)
    dp = Dispatcher(storage=store.fsm, ctx=ctx)
    dp.include_router(build_router())
    UserLanguage(i18n).setup(dp)

    sweeper: list[asyncio.Task] = []

    @dp.startup()
    async def _started() -> None:
        resumed = await ctx.tracker.resume_all()
        sweeper.append(asyncio.create_task(_retention(ctx)))
        log.info("bot started (%s pending job(s) resumed)", resumed)

    @dp.shutdown()
    async def _stopped() -> None:
        for task in sweeper:
            task.cancel()
        await ctx.tracker.close()
        await api.aclose()
        await store.close()

    return bot, dp, ctx


async def _retention(ctx: Context) -> None:
    """Delete the data of users silent for longer than the retention period (what /start promises)."""
    while True:
        try:
            await sweep_idle_users(ctx)
        except LikenessError as exc:
            log.warning("retention sweep postponed: %s", exc)
        await asyncio.sleep(min(RETENTION_SWEEP_S, ctx.settings.bot_retention_days * 86400 / 4))


async def sweep_idle_users(ctx: Context, now: float | None = None) -> list[int]:
    now = time.time() if now is None else now
    idle = await ctx.service.store.idle_users(now - ctx.settings.bot_retention_days * 86400)
    for user_id in idle:
        if await ctx.service.store.pending_for(user_id):
            continue  # still waiting for a job of theirs
        await ctx.service.delete_everything(user_id)
        await ctx.service.store.forget_user(user_id)
        log.info("retention: deleted the data of an idle user")
    return idle


async def run_polling(settings: BotSettings) -> None:
    bot, dp, _ = build(settings)
    await _delete_webhook(bot)
    await dp.start_polling(bot, polling_timeout=20, handle_signals=True)


async def _delete_webhook(bot: Bot) -> None:
    while True:  # Telegram unreachable at start: keep trying (polling would fail the same way)
        try:
            await bot.delete_webhook(drop_pending_updates=False)
            return
        except Exception as exc:  # noqa: BLE001 - network errors of any kind
            log.warning("Telegram not reachable yet (%s); retrying in 5 s", exc)
            await asyncio.sleep(5)


async def run_webhook(settings: BotSettings, url: str, host: str, port: int, path: str = "/telegram") -> None:
    """Serve Telegram's webhook calls on ``host:port`` + ``path``; ``url`` is the public address of it."""
    from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application
    from aiohttp import web

    bot, dp, _ = build(settings)
    secret = (settings.telegram_webhook_secret.get_secret_value() if settings.telegram_webhook_secret
              else secrets.token_urlsafe(32))

    @dp.startup()
    async def _register() -> None:
        await bot.set_webhook(url, secret_token=secret, allowed_updates=dp.resolve_used_update_types())

    app = web.Application()
    SimpleRequestHandler(dispatcher=dp, bot=bot, secret_token=secret).register(app, path=path)
    setup_application(app, dp, bot=bot)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("webhook server on http://%s:%s%s (public %s)", host, port, path, url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
