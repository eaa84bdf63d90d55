"""The bot's service layer against the real app (in-process): a Telegram user's data is found by
``tg:<id>`` only, /delete and the retention sweep remove every subject of that user and no other."""

from __future__ import annotations

import asyncio
import time

import httpx

from likeness.bot.config import BotSettings
from likeness.bot.handlers import Context
from likeness.bot.runner import sweep_idle_users
from likeness.bot.service import Service, user_ref
from likeness.bot.store import PendingJob, SqliteBotStore
from likeness.client import AsyncClient
from tests.app.helpers import jpeg


def _service(app, key: str, tmp_path, **settings) -> Service:
    api = AsyncClient(api_key=key, http=httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                          base_url="http://testserver"))
    config = BotSettings(telegram_token="1:x", api_key=key, bot_retention_days=30, **settings)
    return Service(api, SqliteBotStore(tmp_path / "bot.sqlite3"), config)


def test_users_data_is_found_by_their_reference_and_deleted_whole(app, make_client, tmp_path):
    bot = make_client("bot")
    service = _service(app, bot.key, tmp_path)

    async def scenario():
        grace = await service.subject_or_create(1, "Grace")
        assert await service.subject_or_create(1, "Grace") == grace  # found again, not created twice
        await service.api.upload_photos(grace.id, [("a.jpg", jpeg(seed=1))])
        other = await service.subject_or_create(2, "Ivan")
        assert other.id != grace.id and other.external_ref == user_ref(2)
        extra = await service.api.create_subject("old", external_ref=user_ref(1))  # e.g. from an older bot
        assert (await service.subject(1)).id == extra.id  # the newest
        assert await service.delete_everything(1) == 2
        assert await service.subject(1) is None and (await service.subject(2)).id == other.id
        await service.api.aclose()

    asyncio.run(scenario())


def test_retention_sweep_deletes_idle_users_only(app, make_client, tmp_path):
    bot = make_client("bot")
    service = _service(app, bot.key, tmp_path)
    ctx = Context(service=service, tracker=None, i18n=None)
    now = time.time()

    async def scenario():
        idle = await service.subject_or_create(10, "Idle")
        active = await service.subject_or_create(11, "Active")
        waiting = await service.subject_or_create(12, "Waiting for a job")
        await service.store.touch(10, now - 31 * 86400)
        await service.store.touch(11, now - 29 * 86400)
        await service.store.touch(12, now - 40 * 86400)
        await service.store.save_pending(PendingJob("job-x", "train", 12, 12, 5))
        assert sorted(await sweep_idle_users(ctx, now)) == [10, 12]
        assert await service.subject(10) is None
        assert (await service.subject(11)).id == active.id
        assert (await service.subject(12)).id == waiting.id  # not while a job of theirs is followed
        assert sorted(await service.store.idle_users(now)) == [11, 12]
        assert idle.id != active.id
        await service.api.aclose()

    asyncio.run(scenario())
