"""What the bot remembers survives a restart, in both backends (SQLite file, Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiogram.fsm.storage.base import StorageKey

from likeness.bot.store import PendingJob, RedisBotStore, SqliteBotStore

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """A factory of stores on the same backing data (each test closes what it opens, in its own loop)."""
    prefix = f"test-bot-{uuid.uuid4().hex[:8]}:"

    def make():
        if request.param == "sqlite":
            return SqliteBotStore(tmp_path / "bot.sqlite3")
        return RedisBotStore(REDIS_URL, prefix)

    yield make
    if request.param == "redis":
        async def clean():
            store = RedisBotStore(REDIS_URL, prefix)
            async for key in store.redis.scan_iter(prefix + "*"):
                await store.redis.delete(key)
            await store.close()

        asyncio.run(clean())


def test_pending_jobs_usage_and_conversation_survive_a_reopen(make_store):
    key = StorageKey(bot_id=1, chat_id=42, user_id=42)
    other = StorageKey(bot_id=1, chat_id=43, user_id=43)

    async def write():
        store = make_store()
        await store.save_pending(PendingJob("job-1", "train", 42, 42, 1001, locale="ru"))
        await store.save_pending(PendingJob("job-2", "generate", 43, 43, 1002, style="cinematic"))
        job = (await store.pending())[0]
        job.percent = 55
        await store.save_pending(job)  # an update, not a second row
        await store.fsm.set_state(key, "waiting")
        await store.fsm.set_data(key, {"photo_numbers": {"p1": 1}})
        await store.fsm.set_data(other, {"photo_numbers": {"p9": 1}})
        now = time.time()
        for at in (now - 90000, now - 100, now - 10):
            await store.record_use(42, "train", at)
        await store.touch(42, now - 40 * 86400)
        await store.touch(43, now)
        await store.close()

    async def read():
        store = make_store()
        pending = await store.pending()
        assert [(p.job_id, p.percent, p.locale) for p in pending] == [("job-1", 55, "ru"), ("job-2", 0, "en")]
        assert [p.job_id for p in await store.pending_for(43)] == ["job-2"]
        assert await store.fsm.get_state(key) == "waiting"
        assert await store.fsm.get_data(key) == {"photo_numbers": {"p1": 1}}
        assert len(await store.uses_since(42, "train", time.time() - 86400)) == 2
        assert await store.uses_since(42, "generate", 0) == []
        assert await store.idle_users(time.time() - 30 * 86400) == [42]
        await store.forget_user(42)
        assert [p.job_id for p in await store.pending()] == ["job-2"]
        assert await store.fsm.get_data(key) == {} and await store.fsm.get_data(other) == {"photo_numbers": {"p9": 1}}
        assert await store.idle_users(time.time() - 60) == []  # 43 was seen just now; 42 forgotten
        assert len(await store.uses_since(42, "train", time.time() - 86400)) == 2  # limits still apply
        await store.drop_pending("job-2")
        assert await store.pending() == []
        await store.close()

    asyncio.run(write())
    asyncio.run(read())


def test_limits_count_a_rolling_window(tmp_path):
    from likeness.bot.config import BotSettings
    from likeness.bot.service import Service

    settings = BotSettings(telegram_token="1:x", api_key="k", bot_trainings_per_day=2, bot_generations_per_hour=1)
    store = SqliteBotStore(tmp_path / "bot.sqlite3")
    service = Service(api=None, store=store, settings=settings)  # limits never call the API

    async def check():
        now = 1_000_000.0
        assert await service.wait_s(7, "train", now) == 0
        await store.record_use(7, "train", now - 80000)
        await store.record_use(7, "train", now - 3600)
        assert await service.wait_s(7, "train", now) == pytest.approx(86400 - 80000)  # the oldest leaves the window
        assert await service.wait_s(8, "train", now) == 0  # another user
        await store.record_use(7, "generate", now - 600)
        assert await service.wait_s(7, "generate", now) == pytest.approx(3000)
        assert await service.wait_s(7, "generate", now + 3001) == 0

    asyncio.run(check())
